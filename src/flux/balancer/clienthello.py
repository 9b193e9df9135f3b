"""The server name (SNI) a TLS client asks for, read from its ClientHello (pure).

Theory of operation
-------------------
A published tcp port shared by host name (:mod:`flux.balancer.entrypoints`) picks the service
by the name in the ``server_name`` extension of the client's first TLS message, and passes
the TLS bytes on untouched: the instance holds the certificate and does the handshake.  The
router peeks the bytes received so far and asks :func:`read_server_name` whether they settle
it:

- the first TLS record must be a handshake record (content type 22, version ``0x03 0x0x``);
  anything else is not TLS, and has no name;
- the ClientHello (handshake type 1) may span several handshake records: their fragments are
  joined until the whole message is there (else: more bytes are needed);
- its extensions are walked for ``server_name`` (type 0), whose list's first ``host_name``
  entry (type 0) is the name, compared as routes compare names: lower case, no trailing dot.

Bounded: a ClientHello that would need more than ``HELLO_MAX`` bytes, a malformed one, or one
without the extension, has no name, as a client that does not speak TLS.  RFC 8446 §4.1.2 and
RFC 6066 §3 give the layouts.
"""

from __future__ import annotations

__all__ = ["HELLO_MAX", "read_server_name"]

HELLO_MAX = 16 * 1024  # bytes a router reads at most for a ClientHello

_HANDSHAKE = 22  # TLS record content type
_CLIENT_HELLO = 1  # handshake type
_SERVER_NAME = 0  # extension type
_HOST_NAME = 0  # server name type


class _Short(Exception):
    """The message ends before a field it announces."""


class _Reader:
    __slots__ = ("at", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise _Short
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def _handshake_message(data: bytes) -> tuple[bool, bytes | None]:
    """The first handshake message of ``data`` (TLS records), joined from its records:
    (False, None) when more bytes are needed, (True, None) when there is none to read."""
    fragments = bytearray()
    at = 0
    wanted: int | None = None  # the handshake message's length, header included
    while wanted is None or len(fragments) < wanted:
        header = data[at : at + 5]
        if header and header[0] != _HANDSHAKE:
            return True, None
        if len(header) >= 2 and header[1] != 3:
            return True, None
        if len(header) >= 3 and header[2] > 4:
            return True, None
        if len(header) < 5:
            return at + 5 > HELLO_MAX, None
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or at + 5 + length > HELLO_MAX:
            return True, None
        if len(data) < at + 5 + length:
            return False, None
        fragments += data[at + 5 : at + 5 + length]
        at += 5 + length
        if wanted is None and len(fragments) >= 4:
            if fragments[0] != _CLIENT_HELLO:
                return True, None
            wanted = 4 + int.from_bytes(fragments[1:4], "big")
            if wanted > HELLO_MAX:
                return True, None
    return True, bytes(fragments[4:wanted])


def _server_name(hello: bytes) -> str | None:
    r = _Reader(hello)
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    if r.left == 0:
        return None  # no extensions at all
    extensions = _Reader(r.vector(2))
    while extensions.left:
        kind = extensions.number(2)
        body = extensions.vector(2)
        if kind != _SERVER_NAME:
            continue
        names = _Reader(_Reader(body).vector(2))
        while names.left:
            name_type = names.number(1)
            name = names.vector(2)
            if name_type == _HOST_NAME:
                try:
                    text = name.decode("ascii")
                except UnicodeDecodeError:
                    return None
                return text.lower().removesuffix(".") or None
        return None
    return None


def read_server_name(data: bytes) -> tuple[bool, str | None]:
    """What the first bytes a client sent say about the name it wants: ``(done, name)``.

    ``done`` False: the ClientHello is not complete yet (and fits ``HELLO_MAX``), read more.
    ``done`` True: ``name`` is the server name asked for (lower case, no trailing dot), or
    None when there is none (not TLS, no ``server_name``, malformed, or too large).
    """
    done, hello = _handshake_message(data)
    if hello is None:
        return done, None
    try:
        return True, _server_name(hello)
    except _Short:
        return True, None
