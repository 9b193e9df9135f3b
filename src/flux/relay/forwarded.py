"""X-Forwarded-For: the request head an instance of a ``--forwarded`` http service gets (pure).

Theory of operation
-------------------
An http service with ``forwarded`` (fluxctl ``--forwarded``) has every request head fluxd relays
to its instances rewritten on the way out, on VIP and published connections and through either
relay; the framer judged the head as the client sent it (its size limit, its ``Host``, its
framing are the client's), and what goes out differs from it in three fields only:

- ``X-Forwarded-For``: the client's address (as the socket gives it: ``10.0.0.7``,
  ``2001:db8::7``) is appended.  A client that sent the field keeps it and gets
  ``, <address>`` after the value of its *last* ``X-Forwarded-For`` line (several lines of
  one field are one comma-separated list, in order, so this is the list with the address at
  its end; trailing whitespace of that value is dropped, and an empty value becomes the
  address alone); a client that sent none gets a new line.  A client may write anything
  there, so an instance should trust only the last element, the one fluxd added (or as many
  from the end as it has proxies it trusts).
- ``X-Forwarded-Proto: http`` and ``X-Forwarded-Host: <the request's Host value>`` (none when
  the request has no ``Host`` or an empty one) *replace* every line of those fields the client
  sent: fluxd is where the client's request came in, so what the client claims about it is not
  passed on.
- Nothing else changes: the request line, the other fields in their order and spelling, the
  line ends (new lines end in CRLF), the body.  ``Forwarded`` (RFC 7239) is left alone.

:func:`forwarded_head` is the rewrite for one complete head, the Python relay's; the engine's
``_relay_forwarded.pxi`` does the same in C and is checked against it
(``tests/test_forwarded.py``).  A rewritten head is at most ``len(head)`` (the ``Host`` value
copied) plus :data:`FORWARDED_GROWTH_MAX` bytes longer.
"""

from __future__ import annotations

__all__ = ["FORWARDED_GROWTH_MAX", "forwarded_head"]

_OWS = b" \t"
# The fields a router sets for what the client cannot be trusted to say, and drops from it.
_REPLACED = (b"x-forwarded-proto", b"x-forwarded-host")
# Bytes the new lines add beyond a copy of the Host value: "X-Forwarded-For: " (17) + an IPv6
# address (at most 45) + CRLF, "X-Forwarded-Proto: http" + CRLF (25), "X-Forwarded-Host: "
# + CRLF (20).
FORWARDED_GROWTH_MAX = 128


def _content_end(line: bytes) -> int:
    """Where ``line`` (ending in LF) ends without its line end (CRLF or LF)."""
    end = len(line) - 1
    if end > 0 and line[end - 1] == 0x0D:
        end -= 1
    return end


def forwarded_head(head: bytes, client_ip: str) -> bytes:
    """``head`` (a complete request head the framer accepted: the request line, field lines,
    the empty line; CRLF or LF line ends) as a ``--forwarded`` service's instance gets it from
    a client at ``client_ip`` (see the module docstring)."""
    ip = client_ip.encode("ascii")
    lines = [line + b"\n" for line in head.split(b"\n")[:-1]]
    kept: list[bytes] = [lines[0]]
    host = b""
    last_xff = -1
    for line in lines[1:-1]:
        name, _, rest = line.partition(b":")
        lower = name.lower()
        if lower in _REPLACED:
            continue
        if lower == b"host":
            host = rest[: _content_end(rest)].strip(_OWS)
        elif lower == b"x-forwarded-for":
            last_xff = len(kept)
        kept.append(line)
    if last_xff < 0:
        kept.append(b"X-Forwarded-For: " + ip + b"\r\n")
    else:
        line = kept[last_xff]
        end = _content_end(line)
        colon = line.index(b":")
        value = line[colon + 1 : end].rstrip(_OWS)
        if value.strip(_OWS):
            kept[last_xff] = line[: colon + 1] + value + b", " + ip + line[end:]
        else:
            kept[last_xff] = line[: colon + 1] + b" " + ip + line[end:]
    kept.append(b"X-Forwarded-Proto: http\r\n")
    if host:
        kept.append(b"X-Forwarded-Host: " + host + b"\r\n")
    kept.append(lines[-1])
    return b"".join(kept)
