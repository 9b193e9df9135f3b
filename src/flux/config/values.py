"""The value types of fluxd's settings and the parsers for single values.

Each parser takes what a flag, the environment or Python code may give (text, or a value of
the target type) and returns the value, or raises ValueError with the reason only; the caller
adds the setting's name and the value.  Parsers that differ only in their bounds or choices
are made by a factory (:func:`whole`, :func:`seconds`, :func:`choice`), so the option table
(:data:`flux.config.settings.OPTIONS`) names each setting's parser with its bounds in one
place.  Values go into iptables rules and log lines, so the parsers are strict rather than
forgiving.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import typing
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import SecretStr

from flux.balancer.rules import CHAIN_PATTERN, RESERVED_CHAINS

__all__ = [
    "EtcdEndpoint",
    "HostPort",
    "Parser",
    "choice",
    "parse_advertise",
    "parse_bool",
    "parse_bridge",
    "parse_chain",
    "parse_docker_host",
    "parse_etcd_endpoints",
    "parse_file",
    "parse_host_ip",
    "parse_listen",
    "parse_optional_text",
    "parse_publish_ip",
    "seconds",
    "whole",
]

Parser = Callable[[object], Any]
"""Raw value → parsed value; raises ValueError with the reason only."""


class HostPort(NamedTuple):
    """A ``host:port`` address; ``host`` is empty for "all interfaces" (``:9000``)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class EtcdEndpoint(NamedTuple):
    """One etcd client URL, split into what a client constructor needs."""

    scheme: Literal["http", "https"]
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


_PORT_RE = re.compile(r"[0-9]{1,5}")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_DURATION_RE = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
_FALSE = frozenset({"0", "f", "false", "n", "no", "off"})


def _unicast_ipv4(raw: object, what: str, ipv6: str) -> IPv4Address:
    """``raw`` as an IPv4 address that is neither multicast nor the broadcast address; ``what``
    names what it must be and ``ipv6`` says why an IPv6 one is refused, in the errors."""
    if isinstance(raw, IPv4Address):
        address = raw
    elif isinstance(raw, str):
        try:
            address = IPv4Address(raw)
        except ValueError:
            try:
                ipaddress.IPv6Address(raw)
            except ValueError:
                raise ValueError(f"not {what}") from None
            raise ValueError(ipv6) from None
    else:
        raise ValueError(f"not {what}")
    if address.is_multicast or address == IPv4Address("255.255.255.255"):
        raise ValueError("not a unicast address")
    return address


def parse_host_ip(raw: object) -> IPv4Address:
    """The host's IPv4 address: unicast, not 0.0.0.0."""
    # Instance addresses are written as "IP:port" and matched by iptables (not ip6tables), so
    # an IPv6 host address would break both.
    address = _unicast_ipv4(
        raw, "an IP address", "IPv6 is not supported; give the host's IPv4 address"
    )
    if address.is_unspecified:
        raise ValueError("0.0.0.0 is not an address other hosts can reach")
    return address


def parse_publish_ip(raw: object) -> IPv4Address | None:
    """Where published ports listen: an IPv4 address (0.0.0.0 for every address of the host),
    or None for ``none`` (or an empty flag value): this host is not an entry point."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    return _unicast_ipv4(
        raw, 'an IP address or "none"', "IPv6 is not supported; give an IPv4 address"
    )


def whole(low: int, high: int, unit: str) -> Parser:
    """A parser of whole numbers of ``unit`` from ``low`` to ``high`` (both allowed)."""
    reason = f"must be a whole number of {unit} from {low} to {high}"

    def parse_whole(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError(reason)
        if isinstance(raw, str):
            if not _INT_RE.fullmatch(raw):
                raise ValueError(reason)
            raw = int(raw)
        if not isinstance(raw, int) or not low <= raw <= high:
            raise ValueError(reason)
        return raw

    return parse_whole


def choice(words: object) -> Parser:
    """A parser accepting exactly the strings of the ``Literal`` type ``words``."""
    choices: tuple[str, ...] = typing.get_args(words)
    listed = " or ".join(f'"{word}"' for word in choices)

    def parse_choice(raw: object) -> str:
        if isinstance(raw, str) and raw in choices:
            return raw
        raise ValueError(f"must be {listed}")

    return parse_choice


def parse_bridge(raw: object) -> str:
    """A network interface name."""
    # Linux's dev_valid_name(): 1-15 bytes, not "." or "..", no "/", ":" or whitespace.
    # Printable ASCII only, as the name is also shown in logs and errors.
    if (
        not isinstance(raw, str)
        or not 1 <= len(raw) <= 15
        or raw in (".", "..")
        or any(c in "/:" or not (c.isascii() and c.isprintable()) or c.isspace() for c in raw)
    ):
        raise ValueError("not an interface name (1-15 printable characters, no '/', ':' or spaces)")
    return raw


def parse_chain(raw: object) -> str:
    """An iptables chain name fluxd may own (not built in, not Docker's)."""
    # One definition of a safe chain name, shared with the rules that render it.
    if not isinstance(raw, str) or not CHAIN_PATTERN.fullmatch(raw):
        raise ValueError(
            "not an iptables chain name (1-28 of A-Z a-z 0-9 _ -, not starting with '-')"
        )
    if raw.upper() in RESERVED_CHAINS:
        raise ValueError("is a built-in iptables chain or target")
    if raw.upper().startswith("DOCKER"):
        raise ValueError("belongs to Docker's iptables chains")
    return raw


def _is_hostname(text: str) -> bool:
    if not text or len(text) > 253:
        return False
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    return all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def _split_host_port(text: str) -> tuple[str, str, bool]:
    """``host:port`` → (host, port text, host was bracketed); raises ValueError."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError("not host:port")
        return host, rest[1:], True
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("not host:port (e.g. :9000 or 10.0.0.1:9000)")
    if ":" in host:
        raise ValueError("IPv6 addresses need brackets, e.g. [::1]:9000")
    return host, port, False


def _check_brackets(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, bracketed: bool
) -> None:
    if address.version == 6 and not bracketed:
        raise ValueError("IPv6 addresses need brackets, e.g. [::1]:9000")
    if address.version == 4 and bracketed:
        raise ValueError("brackets are only for IPv6 addresses")


def _parse_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError("port must be a number from 1 to 65535")
    return int(text)


def _as_host_port(raw: object) -> str | None:
    """Let Python callers pass a HostPort (or a plain 2-tuple) instead of text."""
    if raw is None:
        return None
    if isinstance(raw, tuple) and len(raw) == 2:
        host, port = raw
        return str(HostPort(str(host), int(port)))
    if isinstance(raw, str):
        return raw
    raise ValueError("not host:port")


def parse_listen(raw: object) -> HostPort | None:
    """A local address to listen on (empty host: all interfaces); empty text is None."""
    text = _as_host_port(raw)
    if text is None or text == "":
        return None
    host, port_text, bracketed = _split_host_port(text)
    port = _parse_port(port_text)
    if host in ("", "localhost"):
        return HostPort(host, port)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            "host must be empty (all interfaces), an IP address or localhost"
        ) from None
    _check_brackets(address, bracketed)
    return HostPort(str(address), port)


def parse_advertise(raw: object) -> HostPort | None:
    """An address others can reach (an IP address or a DNS name); empty text is None."""
    text = _as_host_port(raw)
    if text is None or text == "":
        return None
    host, port_text, bracketed = _split_host_port(text)
    port = _parse_port(port_text)
    if not host:
        raise ValueError("needs a host that Prometheus can reach, e.g. 192.168.42.221:9000")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or not _is_hostname(host):
            raise ValueError("host must be an IP address or a DNS name") from None
        return HostPort(host, port)
    _check_brackets(address, bracketed)
    if address.is_unspecified:
        raise ValueError(f"{address} is not an address Prometheus can reach")
    return HostPort(str(address), port)


def parse_bool(raw: object) -> bool:
    """A boolean in Go's spellings (1, t, true, ... and their opposites), any case."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        word = raw.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError("not a boolean (use true or false)")


def seconds(low: float, high: float, *, low_allowed: bool) -> Parser:
    """A parser of durations from ``low`` (itself allowed or not) to ``high`` seconds.

    Text is seconds (``2.5``) or a number with a unit (``500ms``, ``10s``, ``2m``, ``1h``).
    """
    if low_allowed:
        bounds = f"must be from {low:g} to {high:g} seconds"
    else:
        bounds = f"must be more than {low:g} and at most {high:g} seconds"

    def parse_seconds(raw: object) -> float:
        if isinstance(raw, bool):
            raise ValueError(bounds)
        if isinstance(raw, str):
            match = _DURATION_RE.fullmatch(raw)
            if not match:
                raise ValueError(
                    "not a duration: give seconds (e.g. 2.5) or a number with a unit"
                    " (500ms, 10s, 2m, 1h)"
                )
            sign, number, unit = match.groups()
            value = float(number) * _DURATION_UNITS[unit] * (-1.0 if sign == "-" else 1.0)
        elif isinstance(raw, int | float):
            value = float(raw)
        else:
            raise ValueError(bounds)
        if not math.isfinite(value) or value > high or value < low:
            raise ValueError(bounds)
        if value == low and not low_allowed:
            raise ValueError(bounds)
        return value

    return parse_seconds


def _parse_etcd_url(text: str) -> EtcdEndpoint:
    example = "e.g. http://10.0.0.1:2379"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"not an endpoint URL ({example})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"endpoint URLs must start with http:// or https:// ({example})")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the URL; use ETCD_USERNAME/ETCD_PASSWORD")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"endpoint has no host ({example})")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _is_hostname(host):
            raise ValueError(
                f"endpoint host is not an IP address or DNS name ({example})"
            ) from None
    if port is None or port == 0:
        raise ValueError(f"endpoint needs a port ({example})")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"endpoint URL must not have a path or query ({example})")
    return EtcdEndpoint("https" if scheme == "https" else "http", host, port)


def parse_etcd_endpoints(raw: object) -> tuple[EtcdEndpoint, ...]:
    """A comma-separated list of etcd URLs (or a sequence): no repeats, one scheme."""
    items: Sequence[object]
    if isinstance(raw, str):
        items = [item.strip() for item in raw.split(",")]
    elif isinstance(raw, list | tuple):
        items = raw
    else:
        raise ValueError("not a list of endpoint URLs")
    endpoints: list[EtcdEndpoint] = []
    for item in items:
        if isinstance(item, EtcdEndpoint):
            endpoint = item
        elif isinstance(item, str):
            if not item:
                raise ValueError("empty entry in the list of endpoints")
            endpoint = _parse_etcd_url(item)
        else:
            raise ValueError("not a list of endpoint URLs")
        if endpoint in endpoints:
            raise ValueError(f"endpoint {endpoint.url} is listed twice")
        endpoints.append(endpoint)
    if not endpoints:
        raise ValueError("no endpoints")
    if len({endpoint.scheme for endpoint in endpoints}) > 1:
        raise ValueError("endpoints mix http:// and https://; use one scheme")
    return tuple(endpoints)


def parse_docker_host(raw: object) -> str:
    """A Docker API address: ``unix:///path`` or ``tcp://host:port`` (kept as text)."""
    reason = "must be unix:///path/to/socket or tcp://host:port"
    if not isinstance(raw, str):
        raise ValueError(reason)
    if raw.startswith("unix://"):
        path = raw[len("unix://") :]
        if not path.startswith("/") or "\0" in path:
            raise ValueError(reason)
        return raw
    if raw.startswith("tcp://"):
        rest = raw[len("tcp://") :]
        try:
            host, port_text, _ = _split_host_port(rest)
        except ValueError:
            raise ValueError(reason) from None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _is_hostname(host):
                raise ValueError(reason) from None
        _parse_port(port_text)
        return raw
    raise ValueError(reason)


def parse_file(raw: object) -> Path | None:
    """The path of a file that exists now; empty text is None."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str | os.PathLike):
        raise ValueError("not a file path")
    path = Path(raw)
    if path.is_dir():
        raise ValueError("is a directory, not a file")
    if not path.is_file():
        raise ValueError("no such file")
    return path


def parse_optional_text(raw: object) -> str | None:
    """Printable text (a SecretStr is unwrapped); empty text is None."""
    if isinstance(raw, SecretStr):
        raw = raw.get_secret_value()
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or any(not c.isprintable() for c in raw):
        raise ValueError("must be printable text")
    return raw
