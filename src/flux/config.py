"""fluxd's configuration: flags, environment, defaults, validation.

Theory of operation
-------------------
Every setting is described once, in :data:`OPTIONS` (flag name, environment variable, model
field, metavar, help).  The flag parser, ``fluxd -help``, the README's configuration table
(:func:`settings_table_markdown`) and the environment names declared on :class:`Settings` (as
validation aliases) are all generated from that table, so they cannot drift apart.

Precedence is flags, then environment, then defaults.  :class:`Settings` is a frozen
pydantic-settings model whose only sources are its keyword arguments (the flags) and an
environment source fed from the mapping passed to :func:`parse_args` -- never ``os.environ``
directly, so parsing is a function of ``(argv, environ)`` and tests need no patching.  An empty
environment variable counts as unset (``docker run -e HOST_IP`` with nothing to pass is common);
an empty flag value (``-listen-prometheus=``) is a value, which for the optional addresses means
"none".

Flags follow Go's ``flag`` package, as the original daemon did: ``-flag value``, ``-flag=value``,
``--flag value``, ``--flag=value``; a boolean flag takes a value only after ``=``; ``--`` ends the
flags.  Unlike Go, flags may also follow the one optional sub-command (``fluxd cleanup -chain
X``).

Every bad value becomes a :class:`ConfigError` whose message is one line naming the flag or
variable and the value; pydantic's own multi-line report is never shown.  Values go into
iptables rules and log lines, so the validators are strict rather than forgiving.

A DNS name given to ``-advertise-prometheus`` is resolved once, at start, by :func:`load_or_exit`
(:func:`resolve_advertise`): etcd holds the IP, and a name that does not resolve stops fluxd with
exit status 2 rather than leaving it running with an endpoint nobody can use.

When no host IP is given, :func:`discover_host_ip` finds one like ``hostname -i`` does, and falls
back to the IPv4 address of the interface that holds the default route when the hostname
resolves to nothing or to a loopback address only (common on Debian hosts and in containers).
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import math
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, NoReturn
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from flux import __version__
from flux.balancer.rules import CHAIN_PATTERN, RESERVED_CHAINS

__all__ = [
    "OPTIONS",
    "ConfigError",
    "EtcdEndpoint",
    "HostIPUnavailable",
    "HostPort",
    "Option",
    "ParsedCommand",
    "Settings",
    "default_route_interface",
    "discover_host_ip",
    "interface_ipv4",
    "load_or_exit",
    "parse_args",
    "resolve_advertise",
    "settings_table_markdown",
    "usage_text",
    "version_text",
]

PROGRAM = "fluxd"
SUBCOMMANDS = ("cleanup",)
DEFAULT_ETCD_ADDRESS = "http://127.0.0.1:2379"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


class ConfigError(Exception):
    """A bad flag, environment variable or combination; ``str()`` is one line for people."""


class HostIPUnavailable(Exception):
    """Neither the hostname nor the default route gave a usable host IP address."""


# --------------------------------------------------------------------------------------------
# The one table of settings


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: how it is spelled on the command line and in the environment.

    ``flag`` is None for settings read only from the environment (the seed's ``ETCD_ADDRESS``
    and ``DOCKER_HOST``, and the etcd TLS/auth variables).  ``metavar`` is the Go-style type word
    shown by ``-help`` (empty for booleans).  ``default_doc`` describes a default that is not a
    constant (or reads better in words); otherwise the model's default is shown.
    """

    field: str
    flag: str | None
    env: str
    metavar: str
    help: str
    default_doc: str | None = None

    @property
    def is_bool(self) -> bool:
        return self.metavar == ""

    @property
    def name(self) -> str:
        """How messages refer to this setting: ``flag -host-ip`` or ``ETCD_ADDRESS``."""
        return f"flag -{self.flag}" if self.flag else self.env


ENGINE_THREADS_MAX = 256


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# fmt: off
OPTIONS: tuple[Option, ...] = (
    #      field                   flag                    env                          metavar
    Option("host_ip",              "host-ip",              "HOST_IP",                   "string",
           "IP address for instances with mapped ports",
           default_doc="the address this machine's hostname resolves to, else that of the"
                       " interface holding the default route"),
    Option("host_ttl",             "host-ttl",             "FLUX_HOST_TTL",             "int",
           "The daemon will give its records this time-to-live in seconds, and refresh them"
           " while it is running (1 to 3600)"),
    Option("network_mode",         "network-mode",         "FLUX_NETWORK_MODE",         "string",
           'Kind of network to assume for containers (either "local" or "global")'),
    Option("bridge",               "bridge",               "FLUX_BRIDGE",               "string",
           "bridge device"),
    Option("chain",                "chain",                "FLUX_CHAIN",                "string",
           "iptables chain name"),
    Option("listen_prometheus",    "listen-prometheus",    "FLUX_LISTEN_PROMETHEUS",    "string",
           "listen for connections from Prometheus on this IP address and port; e.g., :9000"),
    Option("advertise_prometheus", "advertise-prometheus", "FLUX_ADVERTISE_PROMETHEUS", "string",
           "IP address and port to advertise to Prometheus; e.g. 192.168.42.221:9000",
           default_doc="the host IP and the -listen-prometheus port, when listening"),
    Option("debug",                "debug",                "FLUX_DEBUG",                "",
           "output debugging logs"),
    Option("reconcile_interval",   "reconcile-interval",   "FLUX_RECONCILE_INTERVAL",   "seconds",
           "how often to list running containers and repair any drift from missed Docker"
           " events"),
    Option("connect_timeout",      "connect-timeout",      "FLUX_CONNECT_TIMEOUT",      "seconds",
           "how long to wait for a connection to an instance before trying another"),
    Option("shutdown_grace",       "shutdown-grace",       "FLUX_SHUTDOWN_GRACE",       "seconds",
           "how long proxied connections may go on after SIGTERM/SIGINT (0: close them at"
           " once)"),
    Option("http_header_timeout",  "http-header-timeout",  "FLUX_HTTP_HEADER_TIMEOUT",  "seconds",
           "how long a client of an http service may take to send a request head"),
    Option("http_idle_timeout",    "http-idle-timeout",    "FLUX_HTTP_IDLE_TIMEOUT",    "seconds",
           "how long an idle keep-alive connection to an http service is kept open"),
    Option("balance",              "balance",              "FLUX_BALANCE",              "string",
           'how to pick an instance: "random" (uniform) or "p2c" (power of two choices: the'
           " one with fewer active connections of two picked at random)"),
    Option("relay",                "relay",                "FLUX_RELAY",                "string",
           'what carries proxied bytes: "splice" (the compiled engine) or "python" (the'
           " pure-Python fallback, for comparison and debugging)"),
    Option("engine_threads",       "engine-threads",       "FLUX_ENGINE_THREADS",       "int",
           "how many native threads (engine shards) relay and accept proxied connections,"
           f" 1 to {ENGINE_THREADS_MAX}; each has its own epoll loop and its own listening"
           " socket per service",
           default_doc="the number of CPUs fluxd may run on"),
    Option("etcd_endpoints",       None,                   "ETCD_ADDRESS",         "url[,url...]",
           "etcd endpoint URL, or a comma-separated list of them (http:// or https://, with a"
           " port)",
           default_doc=f'"{DEFAULT_ETCD_ADDRESS}" (with a warning)'),
    Option("docker_host",          None,                   "DOCKER_HOST",               "url",
           "Docker API address: unix:///path/to/socket or tcp://host:port"),
    Option("etcd_ca_file",         None,                   "ETCD_CA_FILE",              "path",
           "CA certificate (PEM) to verify etcd's server certificate; needs https:// endpoints",
           default_doc="the system's CA certificates"),
    Option("etcd_cert_file",       None,                   "ETCD_CERT_FILE",            "path",
           "client certificate (PEM) to present to etcd; needs ETCD_KEY_FILE"),
    Option("etcd_key_file",        None,                   "ETCD_KEY_FILE",             "path",
           "private key (PEM) of ETCD_CERT_FILE"),
    Option("etcd_username",        None,                   "ETCD_USERNAME",             "string",
           "etcd user name; needs ETCD_PASSWORD"),
    Option("etcd_password",        None,                   "ETCD_PASSWORD",             "string",
           "password of ETCD_USERNAME (never logged)"),
)
# fmt: on

_BY_FIELD: dict[str, Option] = {option.field: option for option in OPTIONS}
_BY_FLAG: dict[str, Option] = {option.flag: option for option in OPTIONS if option.flag}
_BY_ENV: dict[str, Option] = {option.env: option for option in OPTIONS}


def _env(field: str) -> str:
    return _BY_FIELD[field].env


# --------------------------------------------------------------------------------------------
# Value types


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


class _Problem(ValueError):
    """A validation failure that knows which setting it is about.

    Model-level checks (a certificate without its key, ...) have no field of their own in
    pydantic's report, so they carry one; ``whole_line`` marks messages that already name
    everything and should not get the ``invalid value ... for ...`` prefix.
    """

    def __init__(self, field: str, reason: str, *, whole_line: bool = False) -> None:
        super().__init__(reason)
        self.field = field
        self.whole_line = whole_line


# --------------------------------------------------------------------------------------------
# Parsers for single values.  Each takes what a flag, the environment or Python code may give
# and raises ValueError with the reason only; the caller adds the setting's name and value.

_PORT_RE = re.compile(r"[0-9]{1,5}")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_DURATION_RE = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
_FALSE = frozenset({"0", "f", "false", "n", "no", "off"})


HOST_TTL_RANGE = (1, 3600)
# (lowest, lowest allowed itself?, highest) in seconds, per duration setting.
_DURATION_BOUNDS: dict[str, tuple[float, bool, float]] = {
    "reconcile_interval": (0.0, False, 86400.0),
    "connect_timeout": (0.0, False, 300.0),
    "shutdown_grace": (0.0, True, 3600.0),
    "http_header_timeout": (0.0, False, 3600.0),
    "http_idle_timeout": (0.0, False, 86400.0),
}


def _parse_host_ip(raw: object) -> IPv4Address:
    if isinstance(raw, IPv4Address):
        address = raw
    elif isinstance(raw, str):
        try:
            address = IPv4Address(raw)
        except ValueError:
            try:
                ipaddress.IPv6Address(raw)
            except ValueError:
                raise ValueError("not an IP address") from None
            # Instance addresses are written as "IP:port" and matched by iptables (not
            # ip6tables), so an IPv6 host address would break both.
            raise ValueError("IPv6 is not supported; give the host's IPv4 address") from None
    else:
        raise ValueError("not an IP address")
    if address.is_unspecified:
        raise ValueError("0.0.0.0 is not an address other hosts can reach")
    if address.is_multicast or address == IPv4Address("255.255.255.255"):
        raise ValueError("not a unicast address")
    return address


def _parse_whole(raw: object, low: int, high: int, unit: str) -> int:
    reason = f"must be a whole number of {unit} from {low} to {high}"
    if isinstance(raw, bool):
        raise ValueError(reason)
    if isinstance(raw, str):
        if not _INT_RE.fullmatch(raw):
            raise ValueError(reason)
        raw = int(raw)
    if not isinstance(raw, int) or not low <= raw <= high:
        raise ValueError(reason)
    return raw


def _parse_host_ttl(raw: object) -> int:
    return _parse_whole(raw, *HOST_TTL_RANGE, "seconds")


def _parse_engine_threads(raw: object) -> int:
    return _parse_whole(raw, 1, ENGINE_THREADS_MAX, "threads")


def _parse_choice(raw: object, choices: tuple[str, ...]) -> str:
    if isinstance(raw, str) and raw in choices:
        return raw
    listed = " or ".join(f'"{choice}"' for choice in choices)
    raise ValueError(f"must be {listed}")


def _parse_bridge(raw: object) -> str:
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


def _parse_chain(raw: object) -> str:
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


def _parse_listen(raw: object) -> HostPort | None:
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


def _parse_advertise(raw: object) -> HostPort | None:
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


def _parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        word = raw.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError("not a boolean (use true or false)")


def _parse_seconds(raw: object, field: str) -> float:
    low, low_allowed, high = _DURATION_BOUNDS[field]
    if low_allowed:
        bounds = f"must be from {low:g} to {high:g} seconds"
    else:
        bounds = f"must be more than {low:g} and at most {high:g} seconds"
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
        seconds = float(number) * _DURATION_UNITS[unit] * (-1.0 if sign == "-" else 1.0)
    elif isinstance(raw, int | float):
        seconds = float(raw)
    else:
        raise ValueError(bounds)
    if not math.isfinite(seconds) or seconds > high or seconds < low:
        raise ValueError(bounds)
    if seconds == low and not low_allowed:
        raise ValueError(bounds)
    return seconds


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


def _parse_etcd_endpoints(raw: object) -> tuple[EtcdEndpoint, ...]:
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


def _parse_docker_host(raw: object) -> str:
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


def _parse_file(raw: object) -> Path | None:
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


def _parse_optional_text(raw: object) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or any(not c.isprintable() for c in raw):
        raise ValueError("must be printable text")
    return raw


# --------------------------------------------------------------------------------------------
# The model

# The mapping that stands in for os.environ while a Settings is being built (see parse_args).
# Empty by default, so Settings(...) built directly by Python code sees no environment at all.
_ENVIRON: ContextVar[Mapping[str, str]] = ContextVar(
    "flux_config_environ", default=MappingProxyType({})
)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading the mapping given to parse_args."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            name: value
            for name, value in _ENVIRON.get().items()
            if name in _BY_ENV and not (self.env_ignore_empty and value == "")
        }


class Settings(BaseSettings):
    """fluxd's validated, immutable configuration.

    Build it with :func:`parse_args` (flags + an explicit environment mapping).  Direct
    construction by field name, e.g. ``Settings(host_ip="127.0.0.1", chain="FLUXT1")``, is for
    tests and never reads ``os.environ``.  ``warnings`` holds lines the caller should log
    (defaults that deserve attention).
    """

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        case_sensitive=True,
        validate_by_name=True,
        validate_by_alias=True,
        env_ignore_empty=True,
        # Values arrive as text and our validators parse them; no JSON decoding of lists.
        enable_decoding=False,
        validate_default=True,
    )

    host_ip: IPv4Address = Field(validation_alias=_env("host_ip"))
    host_ttl: int = Field(default=30, validation_alias=_env("host_ttl"))
    network_mode: Literal["local", "global"] = Field(
        default="local", validation_alias=_env("network_mode")
    )
    bridge: str = Field(default="docker0", validation_alias=_env("bridge"))
    chain: str = Field(default="FLUX", validation_alias=_env("chain"))
    listen_prometheus: HostPort | None = Field(
        default=None, validation_alias=_env("listen_prometheus")
    )
    advertise_prometheus: HostPort | None = Field(
        default=None, validation_alias=_env("advertise_prometheus")
    )
    debug: bool = Field(default=False, validation_alias=_env("debug"))
    reconcile_interval: float = Field(default=60.0, validation_alias=_env("reconcile_interval"))
    connect_timeout: float = Field(default=3.0, validation_alias=_env("connect_timeout"))
    shutdown_grace: float = Field(default=10.0, validation_alias=_env("shutdown_grace"))
    http_header_timeout: float = Field(default=10.0, validation_alias=_env("http_header_timeout"))
    http_idle_timeout: float = Field(default=60.0, validation_alias=_env("http_idle_timeout"))
    balance: Literal["random", "p2c"] = Field(default="random", validation_alias=_env("balance"))
    relay: Literal["splice", "python"] = Field(default="splice", validation_alias=_env("relay"))
    engine_threads: int = Field(
        default_factory=usable_cpus, validation_alias=_env("engine_threads")
    )
    etcd_endpoints: tuple[EtcdEndpoint, ...] = Field(
        default=_parse_etcd_endpoints(DEFAULT_ETCD_ADDRESS), validation_alias=_env("etcd_endpoints")
    )
    docker_host: str = Field(default=DEFAULT_DOCKER_HOST, validation_alias=_env("docker_host"))
    etcd_ca_file: Path | None = Field(default=None, validation_alias=_env("etcd_ca_file"))
    etcd_cert_file: Path | None = Field(default=None, validation_alias=_env("etcd_cert_file"))
    etcd_key_file: Path | None = Field(default=None, validation_alias=_env("etcd_key_file"))
    etcd_username: str | None = Field(default=None, validation_alias=_env("etcd_username"))
    etcd_password: SecretStr | None = Field(default=None, validation_alias=_env("etcd_password"))

    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (keyword arguments) first, then the explicit environment; nothing else."""
        return (init_settings, _MappingEnvSource(settings_cls))

    @property
    def warnings(self) -> tuple[str, ...]:
        """One-line warnings for the caller to log at start (e.g. the etcd default)."""
        return self._warnings

    @field_validator("host_ip", mode="before")
    @classmethod
    def _v_host_ip(cls, raw: object) -> IPv4Address:
        return _parse_host_ip(raw)

    @field_validator("host_ttl", mode="before")
    @classmethod
    def _v_host_ttl(cls, raw: object) -> int:
        return _parse_host_ttl(raw)

    @field_validator("network_mode", mode="before")
    @classmethod
    def _v_network_mode(cls, raw: object) -> str:
        return _parse_choice(raw, ("local", "global"))

    @field_validator("balance", mode="before")
    @classmethod
    def _v_balance(cls, raw: object) -> str:
        return _parse_choice(raw, ("random", "p2c"))

    @field_validator("relay", mode="before")
    @classmethod
    def _v_relay(cls, raw: object) -> str:
        return _parse_choice(raw, ("splice", "python"))

    @field_validator("engine_threads", mode="before")
    @classmethod
    def _v_engine_threads(cls, raw: object) -> int:
        return _parse_engine_threads(raw)

    @field_validator("bridge", mode="before")
    @classmethod
    def _v_bridge(cls, raw: object) -> str:
        return _parse_bridge(raw)

    @field_validator("chain", mode="before")
    @classmethod
    def _v_chain(cls, raw: object) -> str:
        return _parse_chain(raw)

    @field_validator("listen_prometheus", mode="before")
    @classmethod
    def _v_listen(cls, raw: object) -> HostPort | None:
        return _parse_listen(raw)

    @field_validator("advertise_prometheus", mode="before")
    @classmethod
    def _v_advertise(cls, raw: object) -> HostPort | None:
        return _parse_advertise(raw)

    @field_validator("debug", mode="before")
    @classmethod
    def _v_debug(cls, raw: object) -> bool:
        return _parse_bool(raw)

    @field_validator(*_DURATION_BOUNDS, mode="before")
    @classmethod
    def _v_seconds(cls, raw: object, info: ValidationInfo) -> float:
        assert info.field_name is not None
        return _parse_seconds(raw, info.field_name)

    @field_validator("etcd_endpoints", mode="before")
    @classmethod
    def _v_etcd(cls, raw: object) -> tuple[EtcdEndpoint, ...]:
        return _parse_etcd_endpoints(raw)

    @field_validator("docker_host", mode="before")
    @classmethod
    def _v_docker(cls, raw: object) -> str:
        return _parse_docker_host(raw)

    @field_validator("etcd_ca_file", "etcd_cert_file", "etcd_key_file", mode="before")
    @classmethod
    def _v_file(cls, raw: object) -> Path | None:
        return _parse_file(raw)

    @field_validator("etcd_username", "etcd_password", mode="before")
    @classmethod
    def _v_text(cls, raw: object) -> str | None:
        if isinstance(raw, SecretStr):
            raw = raw.get_secret_value()
        return _parse_optional_text(raw)

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        warnings: list[str] = []
        if (self.etcd_cert_file is None) != (self.etcd_key_file is None):
            given, missing = (
                ("etcd_cert_file", "etcd_key_file")
                if self.etcd_key_file is None
                else ("etcd_key_file", "etcd_cert_file")
            )
            raise _Problem(
                given,
                f"{_env(given)} is set but {_env(missing)} is not: a client certificate"
                " and its key go together",
                whole_line=True,
            )
        if (self.etcd_username is None) != (self.etcd_password is None):
            given, missing = (
                ("etcd_username", "etcd_password")
                if self.etcd_password is None
                else ("etcd_password", "etcd_username")
            )
            raise _Problem(
                given, f"{_env(given)} is set but {_env(missing)} is not", whole_line=True
            )
        tls_files = [
            _env(field)
            for field in ("etcd_ca_file", "etcd_cert_file", "etcd_key_file")
            if getattr(self, field) is not None
        ]
        if tls_files and self.etcd_endpoints[0].scheme == "http":
            raise _Problem(
                "etcd_endpoints",
                f"{tls_files[0]} is set, so the endpoints must use https://",
            )
        if "etcd_endpoints" not in self.model_fields_set:
            warnings.append(f"{_env('etcd_endpoints')} is not set; using {DEFAULT_ETCD_ADDRESS}")
        if self.etcd_password is not None and self.etcd_endpoints[0].scheme == "http":
            warnings.append(
                f"{_env('etcd_password')} is sent to etcd unencrypted over http://;"
                " use https:// endpoints"
            )
        if self.host_ip.is_loopback:
            warnings.append(
                f"host IP {self.host_ip} is a loopback address: other hosts cannot reach"
                f" this host's instances (set {_env('host_ip')} or -host-ip)"
            )
        if self.advertise_prometheus is not None and self.listen_prometheus is None:
            raise _Problem(
                "advertise_prometheus",
                "needs -listen-prometheus (nothing would serve the advertised address)",
            )
        if self.listen_prometheus is not None and self.advertise_prometheus is None:
            derived = HostPort(str(self.host_ip), self.listen_prometheus.port)
            # The model is frozen; this is its own construction, the only place it may fill
            # in a derived default.
            object.__setattr__(self, "advertise_prometheus", derived)
            if _is_loopback_host(self.listen_prometheus.host):
                warnings.append(
                    f"-listen-prometheus {self.listen_prometheus} is on loopback only, so the"
                    f" advertised {derived} is unreachable (set -advertise-prometheus)"
                )
        self._warnings = tuple(warnings)
        return self

    def describe(self) -> tuple[str, ...]:
        """The effective configuration, one ``name=value`` per setting (secrets masked)."""
        return tuple(
            f"{option.flag or option.env}={_show(getattr(self, option.field))}"
            for option in OPTIONS
        )

    def summary(self) -> str:
        """:meth:`describe` on one line."""
        return " ".join(self.describe())


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}s"
    if isinstance(value, tuple) and not isinstance(value, HostPort):
        return ",".join(str(item) for item in value)
    return str(value)


# --------------------------------------------------------------------------------------------
# Host IP discovery (the adapters are small so the decision logic can be tested with fakes)

_SIOCGIFADDR = 0x8915  # <linux/sockios.h>
_RTF_UP = 0x0001


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
        f" no default route with an IPv4 address; set {_env('host_ip')} or -host-ip"
    )


# --------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """What fluxd was asked to do.

    ``action`` is ``run`` (then ``settings`` is set and ``command`` is None for the daemon or
    ``"cleanup"``), ``help`` or ``version`` (then ``settings`` is None: nothing was validated).
    ``host_ip_source`` says where ``settings.host_ip`` came from, for the start-up log line
    ``Using host IP address <ip> from <source>``.
    """

    action: Literal["run", "help", "version"]
    settings: Settings | None = None
    command: Literal["cleanup"] | None = None
    host_ip_source: str | None = None
    # How a DNS name given to -advertise-prometheus was resolved (a line for the start-up log).
    resolved: str | None = None

    def describe(self) -> tuple[str, ...]:
        """Lines for the start-up log: where the host IP came from, then every setting."""
        if self.settings is None:
            return ()
        return (
            f"Using host IP address {self.settings.host_ip} from {self.host_ip_source}",
            *self.settings.describe(),
        )


def _printable(text: str) -> str:
    """``text`` with anything that could break a one-line message escaped."""
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def _quote(text: str) -> str:
    return '"' + _printable(text).replace('"', '\\"') + '"'


def _scan(argv: Sequence[str]) -> ParsedCommand | tuple[dict[str, str], str | None]:
    """Go-style flags → (field → raw value, sub-command), or a help/version request."""
    values: dict[str, str] = {}
    positionals: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            positionals.extend(argv[index:])
            break
        if not arg.startswith("-") or arg == "-":
            positionals.append(arg)
            continue
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, has_value, value = body.partition("=")
        dashes = arg[: len(arg) - len(body)]
        if not name or name.startswith("-"):
            raise ConfigError(f"bad flag syntax: {_printable(arg)}")
        if name in ("h", "help", "version"):
            if has_value:
                raise ConfigError(f"flag {dashes}{_printable(name)} does not take a value")
            return ParsedCommand("version" if name == "version" else "help")
        option = _BY_FLAG.get(name)
        if option is None:
            raise ConfigError(f"unknown flag {dashes}{_printable(name)}")
        if option.is_bool:
            # As in Go, a boolean flag takes a value only after "=", so that
            # "fluxd -debug cleanup" means what it says.
            value = value if has_value else "true"
        elif not has_value:
            if index >= len(argv):
                raise ConfigError(f"flag -{option.flag} needs a value")
            value = argv[index]
            index += 1
        values[option.field] = value
    subcommand: str | None = None
    for position, arg in enumerate(positionals):
        if position == 0 and arg in SUBCOMMANDS:
            subcommand = arg
        else:
            raise ConfigError(f"unexpected argument {_quote(arg)}")
    return values, subcommand


def _shown_value(option: Option, raw: str) -> str:
    if option.field == "etcd_password":
        return "(hidden)"
    if option.field == "etcd_endpoints":
        # Never echo credentials someone put into a URL.
        raw = re.sub(r"(?<=://)[^/@,]*@", "***@", raw)
    return _quote(raw)


def _explain(
    exc: ValidationError,
    flags: Mapping[str, str],
    environ: Mapping[str, str],
    host_ip_source: str | None,
) -> str:
    error = exc.errors(include_url=False)[0]
    problem = (error.get("ctx") or {}).get("error")
    loc = error["loc"][0] if error["loc"] else ""
    if isinstance(problem, _Problem):
        field, reason = problem.field, str(problem)
        if problem.whole_line:
            return reason
    else:
        field = _BY_ENV[loc].field if loc in _BY_ENV else str(loc)
        reason = str(problem) if problem is not None else error["msg"]
    option = _BY_FIELD.get(field)
    if option is None:
        return f"invalid setting {field}: {reason}"
    if field in flags:
        shown, where = _shown_value(option, flags[field]), option.name
    elif environ.get(option.env):
        shown, where = _shown_value(option, environ[option.env]), option.env
    elif field == "host_ip" and host_ip_source:
        return f"invalid host IP address from {host_ip_source}: {reason}"
    else:
        default = Settings.model_fields[field].default
        return f"invalid default value {_quote(_show(default))} for {option.name}: {reason}"
    return f"invalid value {shown} for {where}: {reason}"


def parse_args(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    discover: Callable[[], tuple[IPv4Address, str]] = discover_host_ip,
) -> ParsedCommand:
    """Parse fluxd's arguments (without the program name) against an explicit environment.

    Flags override ``environ``, which overrides defaults.  ``os.environ`` is never read; host IP
    discovery (``discover``) runs only when neither ``-host-ip`` nor ``HOST_IP`` is given.
    Raises ConfigError with a one-line message for anything invalid.
    """
    scanned = _scan(argv)
    if isinstance(scanned, ParsedCommand):
        return scanned
    flags, subcommand = scanned
    init: dict[str, Any] = dict(flags)
    if "host_ip" in flags:
        source = "-host-ip option"
    elif environ.get(_env("host_ip")):
        source = f"{_env('host_ip')} in environment"
    else:
        try:
            init["host_ip"], source = discover()
        except HostIPUnavailable as exc:
            if subcommand != "cleanup":
                raise ConfigError(str(exc)) from None
            # Cleanup only removes iptables state; it must work even where the daemon's host
            # IP cannot be found, so it gets a placeholder it never uses.
            init["host_ip"], source = IPv4Address("127.0.0.1"), "placeholder (unused by cleanup)"
    token = _ENVIRON.set(environ)
    try:
        settings = Settings(**init)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, flags, environ, source)) from None
    finally:
        _ENVIRON.reset(token)
    return ParsedCommand(
        "run",
        settings=settings,
        command="cleanup" if subcommand == "cleanup" else None,
        host_ip_source=source,
    )


_AddrInfo = list[tuple[Any, Any, Any, Any, tuple[Any, ...]]]


def resolve_advertise(
    parsed: ParsedCommand,
    *,
    resolve: Callable[[str, int], _AddrInfo] = lambda host, port: socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ),
) -> ParsedCommand:
    """Replace a DNS name in ``-advertise-prometheus`` by the IP it resolves to, once.

    The etcd record Prometheus discovery reads holds ``IP:port`` (the original's format, and
    what every reader parses), so a name is resolved here, at start, rather than advertised or
    dropped.  An IPv4 address is preferred (the rules and the host IP are IPv4), then the
    resolver's first answer; the other answers are named in :attr:`ParsedCommand.resolved`.
    A name that does not resolve raises :class:`ConfigError`: better to refuse at start than
    to run with an endpoint nobody can find.  The name is not looked up again: restart fluxd
    after moving it.
    """
    settings = parsed.settings
    target = settings.advertise_prometheus if settings is not None else None
    if settings is None or parsed.command is not None or target is None:
        return parsed
    try:
        ipaddress.ip_address(target.host)
        return parsed
    except ValueError:
        pass
    flag = f"-advertise-prometheus {target}"
    try:
        infos = resolve(target.host, target.port)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{flag}: cannot resolve {target.host!r}: {reason}") from None
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
        if address not in found and not address.is_unspecified:
            found.append(address)
    if not found:
        raise ConfigError(f"{flag}: {target.host!r} resolves to no usable address")
    chosen = next((a for a in found if a.version == 4), found[0])
    resolved = HostPort(str(chosen), target.port)
    others = [str(a) for a in found if a != chosen]
    note = f"-advertise-prometheus {target} resolves to {chosen}; advertising {resolved}"
    if others:
        note += f" (not the other addresses {', '.join(others)})"
    if chosen.is_loopback:
        note += "; a loopback address is reachable from this host only"
    return dataclasses.replace(
        parsed,
        settings=settings.model_copy(update={"advertise_prometheus": resolved}),
        resolved=note,
    )


def load_or_exit(argv: Sequence[str], environ: Mapping[str, str]) -> ParsedCommand:
    """:func:`parse_args` for the entry point: help/version print and exit 0, errors exit 2.

    The daemon's ``-advertise-prometheus`` name is resolved here too (:func:`resolve_advertise`).
    Errors are printed to stderr as ``fluxd: <message>``; nothing else has happened by then.
    """
    try:
        parsed = resolve_advertise(parse_args(argv, environ))
    except ConfigError as exc:
        _exit(2, f"{PROGRAM}: {exc}", sys.stderr)
    if parsed.action == "help":
        _exit(0, usage_text().rstrip("\n"), sys.stdout)
    if parsed.action == "version":
        _exit(0, version_text(), sys.stdout)
    return parsed


def _exit(status: int, text: str, stream: Any) -> NoReturn:
    print(text, file=stream, flush=True)
    raise SystemExit(status)


# --------------------------------------------------------------------------------------------
# Documentation generated from OPTIONS


def _default_text(option: Option) -> str | None:
    """The default in Go's style: strings quoted, numbers bare, false and none omitted."""
    if option.default_doc is not None:
        return option.default_doc
    default = Settings.model_fields[option.field].default
    if default is None or default is False:
        return None
    if isinstance(default, str):
        return _quote(default)
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def version_text() -> str:
    """The version banner, as ``fluxd -version`` prints it."""
    return f"{PROGRAM} version {__version__}"


def usage_text() -> str:
    """``fluxd -help``: Go's flag layout (sorted flags, tab-indented help), plus env names."""
    lines = [
        f"Usage of {PROGRAM}:",
        f"  {PROGRAM} [flags]            run the daemon",
        f"  {PROGRAM} [flags] cleanup    remove the iptables chain and jumps left behind by a"
        f" {PROGRAM} that crashed, then exit",
        "",
        "Flags (-flag value, -flag=value, --flag value or --flag=value; flags override the"
        " environment):",
    ]

    def entry(head: str, help_text: str) -> None:
        lines.append(head)
        lines.append("    \t" + help_text)

    for option in sorted((o for o in OPTIONS if o.flag), key=lambda o: o.flag or ""):
        head = f"  -{option.flag}" + (f" {option.metavar}" if option.metavar else "")
        default = _default_text(option)
        text = option.help + (f" (default {default})" if default else "")
        entry(head, f"{text} (env {option.env})")
    entry("  -help", "show this help and exit")
    entry("  -version", "show the version and exit")
    lines += ["", "Environment only:"]
    for option in OPTIONS:
        if option.flag:
            continue
        default = _default_text(option)
        entry(
            f"  {option.env} {option.metavar}",
            option.help + (f" (default {default})" if default else ""),
        )
    lines += ["", "An empty environment variable counts as unset."]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_table_markdown() -> str:
    """The README's configuration table (one row per setting, in :data:`OPTIONS` order)."""
    rows = [
        "| flag | environment | default | meaning |",
        "|---|---|---|---|",
    ]
    for option in OPTIONS:
        flag = f"`-{option.flag}`" if option.flag else "—"
        default = _default_text(option)
        if default is None:
            default = "off" if option.is_bool else "none"
        # Go quotes string defaults; Markdown shows them as code.
        default = _cell(re.sub(r'"([^"]*)"', r"`\1`", default))
        rows.append(f"| {flag} | `{option.env}` | {default} | {_cell(option.help)} |")
    return "\n".join(rows) + "\n"
