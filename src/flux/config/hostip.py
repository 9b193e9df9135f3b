"""Host IP discovery, for when neither ``-host-ip`` nor ``HOST_IP`` is given.

:func:`discover_host_ip` finds an address like ``hostname -i`` does, and falls back to the IPv4
address of the interface that holds the default route when the hostname resolves to nothing or
to a loopback address only (common on Debian hosts and in containers).  The adapters (resolver,
``/proc/net/route``, ``SIOCGIFADDR``) are small and injected, so the decision logic is tested
with fakes.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from flux.config.settings import env_name

__all__ = [
    "HostIPUnavailable",
    "default_route_interface",
    "discover_host_ip",
    "interface_ipv4",
]

_SIOCGIFADDR = 0x8915  # <linux/sockios.h>
_RTF_UP = 0x0001


class HostIPUnavailable(Exception):
    """Neither the hostname nor the default route gave a usable host IP address."""


def default_route_interface(route_table: str) -> str | None:
    """The interface of the IPv4 default route in ``/proc/net/route`` text (lowest metric)."""
    best: tuple[int, str] | None = None
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, destination, flags, metric, mask = (
            fields[0],
            fields[1],
            fields[3],
            fields[6],
            fields[7],
        )
        try:
            up = int(flags, 16) & _RTF_UP
            is_default = int(destination, 16) == 0 and int(mask, 16) == 0
            rank = int(metric)
        except ValueError:
            continue
        if up and is_default and (best is None or rank < best[0]):
            best = (rank, iface)
    return best[1] if best else None


def interface_ipv4(name: str) -> IPv4Address | None:
    """The primary IPv4 address of interface ``name`` (SIOCGIFADDR), or None if it has none."""
    encoded = name.encode()
    if not encoded or len(encoded) > 15:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # struct ifreq: char ifr_name[16]; then a struct sockaddr_in whose address is at 20.
        request = struct.pack("16s16s", encoded, b"")
        try:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
        except OSError:
            return None
    return IPv4Address(reply[20:24])


def _hostname_ipv4s(hostname: str) -> list[IPv4Address]:
    try:
        infos = socket.getaddrinfo(hostname, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    seen: list[IPv4Address] = []
    for info in infos:
        address = IPv4Address(info[4][0])
        if address not in seen:
            seen.append(address)
    return seen


def _read_route_table() -> str:
    try:
        return Path("/proc/net/route").read_text()
    except OSError:
        return ""


def discover_host_ip(
    *,
    hostname: Callable[[], str] = socket.gethostname,
    resolve: Callable[[str], list[IPv4Address]] = _hostname_ipv4s,
    route_table: Callable[[], str] = _read_route_table,
    interface_address: Callable[[str], IPv4Address | None] = interface_ipv4,
) -> tuple[IPv4Address, str]:
    """This machine's IPv4 address and where it came from, like the original fluxd.

    First the hostname's addresses (``hostname -i``), skipping loopback ones; then the address
    of the default route's interface; then a loopback address of the hostname, as the original
    would have used it (the caller warns).  Raises HostIPUnavailable when none of those exist.
    """
    name = hostname()
    addresses = resolve(name)
    for address in addresses:
        if not address.is_loopback and not address.is_unspecified:
            return address, f"hostname '{name}'"
    iface = default_route_interface(route_table())
    if iface is not None:
        address_of_iface = interface_address(iface)
        if address_of_iface is not None:
            why = "resolves only to loopback" if addresses else "does not resolve"
            return address_of_iface, f"interface {iface} (default route; hostname '{name}' {why})"
    if addresses:
        return addresses[0], f"hostname '{name}'"
    raise HostIPUnavailable(
        f"cannot determine the host IP address: hostname '{name}' does not resolve and there is"
        f" no default route with an IPv4 address; set {env_name('host_ip')} or -host-ip"
    )
