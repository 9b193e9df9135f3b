"""The PROXY protocol header: what a tcp service with ``--proxy-protocol`` sends its instances
before the client's bytes, so they learn who the client is (pure).

Theory of operation
-------------------
An instance behind fluxd sees its connections come from fluxd.  HAProxy's PROXY protocol
(``proxy-protocol.txt`` in HAProxy's sources; read by HAProxy's ``accept-proxy``, nginx's
``listen ... proxy_protocol``, Postfix, Dovecot and most servers meant to sit behind a proxy)
puts one header at the very start of the stream: the client's address and port and the address
and port it connected to.  Version 1 is a text line (``PROXY TCP4 SRC DST SPORT DPORT\\r\\n``),
version 2 a binary block (a 12-byte signature, version and command, family, length, the
addresses).  Nothing else about the connection changes, which is why it is opt-in per service:
an instance that does not expect it reads it as the client's first bytes.

The header is made where the connection to the instance is: the listener makes it with
:func:`proxy_header` for the clients it accepts (sent on the upstream socket before the relay
takes it, or handed to the engine's connect to go first), and the engine makes the same bytes
itself for the clients it accepts (``accept_proxy_preface`` in ``_relay_accept.pxi``).  The
"server" address is the one the client reached fluxd at as fluxd's socket sees it: a published
port's address, or for a service address (a VIP, DNATed to the listener) the listener's.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["PROXY_V2_SIGNATURE", "PROXY_VERSIONS", "proxy_header"]

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The spec's value (fluxctl --proxy-protocol) -> the version number the relays take.
PROXY_VERSIONS: Mapping[str, int] = MappingProxyType({"v1": 1, "v2": 2})

_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL: no addresses, the receiver uses its own view
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21


def proxy_header(version: int, client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """The PROXY protocol header of ``version`` (1 or 2) for a connection from ``client`` to
    ``server`` (``(ip, port)`` pairs, as ``getpeername()`` and ``getsockname()`` give them).
    A pair whose addresses are not both IPv4 or both IPv6 gets the header that names no
    address (``PROXY UNKNOWN``, v2's LOCAL command)."""
    if version not in (1, 2):
        raise ValueError(f"PROXY protocol version must be 1 or 2, got {version}")
    try:
        src = ipaddress.ip_address(client[0])
        dst = ipaddress.ip_address(server[0])
        known = src.version == dst.version
    except ValueError:
        known = False
    if not known:
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return PROXY_V2_SIGNATURE + bytes((_V2_LOCAL, 0)) + struct.pack("!H", 0)
    if version == 1:
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {client[1]} {server[1]}\r\n".encode("ascii")
    addresses = src.packed + dst.packed + struct.pack("!HH", client[1], server[1])
    family_byte = _V2_TCP4 if src.version == 4 else _V2_TCP6
    return (
        PROXY_V2_SIGNATURE
        + bytes((_V2_PROXY, family_byte))
        + struct.pack("!H", len(addresses))
        + addresses
    )
