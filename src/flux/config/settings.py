"""The option table and the :class:`Settings` model built from it.

Every setting is described once, in :data:`OPTIONS`: model field, flag name, environment
variable, metavar, parser, help.  The flag scanner (:mod:`flux.config.cli`), ``fluxd -help``,
the README's configuration table (:func:`settings_table_markdown`), the environment names
declared on :class:`Settings` (as validation aliases) and the parsing of every field (one
validator that walks the table) all come from that table, so they cannot drift apart.

:class:`Settings` is a frozen pydantic-settings model whose only sources are its keyword
arguments (the flags) and an environment source fed from an explicit mapping
(:func:`build_settings`) -- never ``os.environ`` directly, so parsing is a function of
``(argv, environ)`` and tests need no patching.  An empty environment variable counts as unset
(``docker run -e HOST_IP`` with nothing to pass is common); an empty flag value
(``-listen-prometheus=``) is a value, which for the optional addresses means "none".

After the fields, the cross-checks compare settings with each other (:func:`cross_check`).  Their
two lists are kept apart: an error (:data:`ERROR_CHECKS`, a certificate without its key, ...)
stops start-up and the first one found is reported; a warning (:data:`WARNING_CHECKS`, the etcd
default, a loopback host IP, ...) lets fluxd start and is logged (:attr:`Settings.warnings`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
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

from flux.config.values import (
    EtcdEndpoint,
    HostPort,
    Parser,
    choice,
    parse_advertise,
    parse_bool,
    parse_bridge,
    parse_chain,
    parse_docker_host,
    parse_etcd_endpoints,
    parse_file,
    parse_host_ip,
    parse_listen,
    parse_optional_text,
    parse_publish_ip,
    seconds,
    whole,
)

__all__ = [
    "BY_ENV",
    "BY_FIELD",
    "BY_FLAG",
    "DEFAULT_DOCKER_HOST",
    "DEFAULT_ETCD_ADDRESS",
    "ENGINE_THREADS_MAX",
    "ERROR_CHECKS",
    "METRICS_MAX_CLIENTS_LIMIT",
    "OPTIONS",
    "WARNING_CHECKS",
    "CrossCheck",
    "Option",
    "Problem",
    "Settings",
    "build_settings",
    "cross_check",
    "default_text",
    "derived_advertise",
    "env_name",
    "printable",
    "quote",
    "settings_table_markdown",
    "show",
    "usable_cpus",
]

DEFAULT_ETCD_ADDRESS = "http://127.0.0.1:2379"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
ENGINE_THREADS_MAX = 256
# Each named client costs a few label sets per service (a summary pair per HTTP label set).
METRICS_MAX_CLIENTS_LIMIT = 100_000

NetworkMode = Literal["local", "global"]
Balance = Literal["random", "p2c"]
EngineSteer = Literal["cpu", "hash"]
RelayKind = Literal["splice", "python"]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# The one table of settings


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: how it is spelled on the command line and in the environment, and parsed.

    ``flag`` is None for settings read only from the environment (the seed's ``ETCD_ADDRESS``
    and ``DOCKER_HOST``, and the etcd TLS/auth variables).  ``metavar`` is the Go-style type word
    shown by ``-help`` (empty for booleans).  ``parse`` turns what a flag, the environment or
    Python code gives into the field's value (:mod:`flux.config.values`).  ``default_doc``
    describes a default that is not a constant (or reads better in words); otherwise the model's
    default is shown.
    """

    field: str
    flag: str | None
    env: str
    metavar: str
    parse: Parser
    help: str
    default_doc: str | None = None

    @property
    def is_bool(self) -> bool:
        return self.metavar == ""

    @property
    def name(self) -> str:
        """How messages refer to this setting: ``flag -host-ip`` or ``ETCD_ADDRESS``."""
        return f"flag -{self.flag}" if self.flag else self.env


# fmt: off
OPTIONS: tuple[Option, ...] = (
    #      field                   flag                    env                          metavar
    #      parse
    Option("host_ip",              "host-ip",              "HOST_IP",                   "string",
           parse_host_ip,
           "IP address for instances with mapped ports",
           default_doc="the address this machine's hostname resolves to, else that of the"
                       " interface holding the default route"),
    Option("host_ttl",             "host-ttl",             "FLUX_HOST_TTL",             "int",
           whole(1, 3600, "seconds"),
           "The daemon will give its records this time-to-live in seconds, and refresh them"
           " while it is running (1 to 3600)"),
    Option("network_mode",         "network-mode",         "FLUX_NETWORK_MODE",         "string",
           choice(NetworkMode),
           'Kind of network to assume for containers (either "local" or "global")'),
    Option("bridge",               "bridge",               "FLUX_BRIDGE",               "string",
           parse_bridge,
           "bridge device"),
    Option("chain",                "chain",                "FLUX_CHAIN",                "string",
           parse_chain,
           "iptables chain name"),
    Option("listen_prometheus",    "listen-prometheus",    "FLUX_LISTEN_PROMETHEUS",    "string",
           parse_listen,
           "listen for connections from Prometheus on this IP address and port; e.g., :9000"),
    Option("advertise_prometheus", "advertise-prometheus", "FLUX_ADVERTISE_PROMETHEUS", "string",
           parse_advertise,
           "IP address and port to advertise to Prometheus; e.g. 192.168.42.221:9000",
           default_doc="the host IP and the -listen-prometheus port, when listening"),
    Option("debug",                "debug",                "FLUX_DEBUG",                "",
           parse_bool,
           "output debugging logs"),
    Option("reconcile_interval",   "reconcile-interval",   "FLUX_RECONCILE_INTERVAL",   "seconds",
           seconds(0.0, 86400.0, low_allowed=False),
           "how often to list running containers and repair any drift from missed Docker"
           " events"),
    Option("connect_timeout",      "connect-timeout",      "FLUX_CONNECT_TIMEOUT",      "seconds",
           seconds(0.0, 300.0, low_allowed=False),
           "how long to wait for a connection to an instance before trying another"),
    Option("shutdown_grace",       "shutdown-grace",       "FLUX_SHUTDOWN_GRACE",       "seconds",
           seconds(0.0, 3600.0, low_allowed=True),
           "how long proxied connections may go on after SIGTERM/SIGINT (0: close them at"
           " once)"),
    Option("http_header_timeout",  "http-header-timeout",  "FLUX_HTTP_HEADER_TIMEOUT",  "seconds",
           seconds(0.0, 3600.0, low_allowed=False),
           "how long a client of an http service may take to send a request head"),
    Option("http_idle_timeout",    "http-idle-timeout",    "FLUX_HTTP_IDLE_TIMEOUT",    "seconds",
           seconds(0.0, 86400.0, low_allowed=False),
           "how long an idle keep-alive connection to an http service is kept open"),
    Option("balance",              "balance",              "FLUX_BALANCE",              "string",
           choice(Balance),
           'how to pick an instance: "random" (uniform) or "p2c" (power of two choices: the'
           " one with fewer active connections of two picked at random)"),
    Option("relay",                "relay",                "FLUX_RELAY",                "string",
           choice(RelayKind),
           'what carries proxied bytes: "splice" (the compiled engine) or "python" (the'
           " pure-Python fallback, for comparison and debugging)"),
    Option("engine_threads",       "engine-threads",       "FLUX_ENGINE_THREADS",       "int",
           whole(1, ENGINE_THREADS_MAX, "threads"),
           "how many native threads (engine shards) relay and accept proxied connections,"
           f" 1 to {ENGINE_THREADS_MAX}; each has its own epoll loop and its own listening"
           " socket per service",
           default_doc="the number of CPUs fluxd may run on"),
    Option("engine_steer",         "engine-steer",         "FLUX_ENGINE_STEER",         "string",
           choice(EngineSteer),
           'how new connections are shared out among the engine threads: "cpu" (each thread is'
           " pinned to CPUs of its own and takes the connections that arrive on them, steered"
           " by a BPF program on each port's SO_REUSEPORT group; with 2 or more threads and at"
           " most one per CPU, else fluxd says so at start and keeps the hash; fluxd goes back"
           " to the hash for good if one thread takes most new connections, or does most of the"
           " work, for 15 s) or"
           " \"hash\" (by the kernel's hash of their addresses, threads not pinned)"),
    Option("publish_ip",           "publish-ip",           "FLUX_PUBLISH_IP",           "string",
           parse_publish_ip,
           "IPv4 address to listen on for services' published ports (fluxctl --publish), or"
           ' "none": this host is not an entry point',
           default_doc="0.0.0.0 (every address of the host)"),
    Option("metrics_max_clients",  "metrics-max-clients",  "FLUX_METRICS_MAX_CLIENTS",  "int",
           whole(0, METRICS_MAX_CLIENTS_LIMIT, "client addresses"),
           "how many distinct client addresses each service's metrics name in their src label,"
           f' 0 to {METRICS_MAX_CLIENTS_LIMIT}; connections from any other client are counted'
           ' under src="other"'),
    Option("etcd_endpoints",       None,                   "ETCD_ADDRESS",         "url[,url...]",
           parse_etcd_endpoints,
           "etcd endpoint URL, or a comma-separated list of them (http:// or https://, with a"
           " port)",
           default_doc=f'"{DEFAULT_ETCD_ADDRESS}" (with a warning)'),
    Option("docker_host",          None,                   "DOCKER_HOST",               "url",
           parse_docker_host,
           "Docker API address: unix:///path/to/socket or tcp://host:port"),
    Option("etcd_ca_file",         None,                   "ETCD_CA_FILE",              "path",
           parse_file,
           "CA certificate (PEM) to verify etcd's server certificate; needs https:// endpoints",
           default_doc="the system's CA certificates"),
    Option("etcd_cert_file",       None,                   "ETCD_CERT_FILE",            "path",
           parse_file,
           "client certificate (PEM) to present to etcd; needs ETCD_KEY_FILE"),
    Option("etcd_key_file",        None,                   "ETCD_KEY_FILE",             "path",
           parse_file,
           "private key (PEM) of ETCD_CERT_FILE"),
    Option("etcd_username",        None,                   "ETCD_USERNAME",             "string",
           parse_optional_text,
           "etcd user name; needs ETCD_PASSWORD"),
    Option("etcd_password",        None,                   "ETCD_PASSWORD",             "string",
           parse_optional_text,
           "password of ETCD_USERNAME (never logged)"),
)
# fmt: on

BY_FIELD: Mapping[str, Option] = MappingProxyType({option.field: option for option in OPTIONS})
BY_FLAG: Mapping[str, Option] = MappingProxyType(
    {option.flag: option for option in OPTIONS if option.flag}
)
BY_ENV: Mapping[str, Option] = MappingProxyType({option.env: option for option in OPTIONS})


def env_name(field: str) -> str:
    """The environment variable of the setting ``field``."""
    return BY_FIELD[field].env


class Problem(ValueError):
    """A validation failure that knows which setting it is about.

    Cross-checks (a certificate without its key, ...) have no field of their own in pydantic's
    report, so they carry one; ``whole_line`` marks messages that already name everything and
    should not get the ``invalid value ... for ...`` prefix.
    """

    def __init__(self, field: str, reason: str, *, whole_line: bool = False) -> None:
        super().__init__(reason)
        self.field = field
        self.whole_line = whole_line


# --------------------------------------------------------------------------------------------
# How values are shown in messages, logs and help


def printable(text: str) -> str:
    """``text`` with anything that could break a one-line message escaped."""
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def quote(text: str) -> str:
    """``text`` in double quotes, escaped for a one-line message."""
    return '"' + printable(text).replace('"', '\\"') + '"'


def show(value: object) -> str:
    """A setting's value as the start-up log shows it (secrets masked, seconds with ``s``)."""
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
# The model

# The mapping that stands in for os.environ while a Settings is being built (build_settings).
# Empty by default, so Settings(...) built directly by Python code sees no environment at all.
_ENVIRON: ContextVar[Mapping[str, str]] = ContextVar(
    "flux_config_environ", default=MappingProxyType({})
)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading the mapping given to build_settings."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            name: value
            for name, value in _ENVIRON.get().items()
            if name in BY_ENV and not (self.env_ignore_empty and value == "")
        }


class Settings(BaseSettings):
    """fluxd's validated, immutable configuration.

    Build it with :func:`flux.config.parse_args` (flags + an explicit environment mapping).
    Direct construction by field name, e.g. ``Settings(host_ip="127.0.0.1", chain="FLUXT1")``,
    is for tests and never reads ``os.environ``.  ``warnings`` holds lines the caller should
    log (defaults that deserve attention).
    """

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        case_sensitive=True,
        validate_by_name=True,
        validate_by_alias=True,
        env_ignore_empty=True,
        # Values arrive as text and the table's parsers parse them; no JSON decoding of lists.
        enable_decoding=False,
        validate_default=True,
    )

    host_ip: IPv4Address = Field(validation_alias=env_name("host_ip"))
    host_ttl: int = Field(default=30, validation_alias=env_name("host_ttl"))
    network_mode: NetworkMode = Field(default="local", validation_alias=env_name("network_mode"))
    bridge: str = Field(default="docker0", validation_alias=env_name("bridge"))
    chain: str = Field(default="FLUX", validation_alias=env_name("chain"))
    listen_prometheus: HostPort | None = Field(
        default=None, validation_alias=env_name("listen_prometheus")
    )
    advertise_prometheus: HostPort | None = Field(
        default=None, validation_alias=env_name("advertise_prometheus")
    )
    debug: bool = Field(default=False, validation_alias=env_name("debug"))
    reconcile_interval: float = Field(default=60.0, validation_alias=env_name("reconcile_interval"))
    connect_timeout: float = Field(default=3.0, validation_alias=env_name("connect_timeout"))
    shutdown_grace: float = Field(default=10.0, validation_alias=env_name("shutdown_grace"))
    http_header_timeout: float = Field(
        default=10.0, validation_alias=env_name("http_header_timeout")
    )
    http_idle_timeout: float = Field(default=60.0, validation_alias=env_name("http_idle_timeout"))
    balance: Balance = Field(default="random", validation_alias=env_name("balance"))
    relay: RelayKind = Field(default="splice", validation_alias=env_name("relay"))
    engine_threads: int = Field(
        default_factory=usable_cpus, validation_alias=env_name("engine_threads")
    )
    engine_steer: EngineSteer = Field(default="cpu", validation_alias=env_name("engine_steer"))
    publish_ip: IPv4Address | None = Field(
        default=IPv4Address("0.0.0.0"), validation_alias=env_name("publish_ip")
    )
    metrics_max_clients: int = Field(
        default=100, validation_alias=env_name("metrics_max_clients")
    )
    etcd_endpoints: tuple[EtcdEndpoint, ...] = Field(
        default=parse_etcd_endpoints(DEFAULT_ETCD_ADDRESS),
        validation_alias=env_name("etcd_endpoints"),
    )
    docker_host: str = Field(default=DEFAULT_DOCKER_HOST, validation_alias=env_name("docker_host"))
    etcd_ca_file: Path | None = Field(default=None, validation_alias=env_name("etcd_ca_file"))
    etcd_cert_file: Path | None = Field(default=None, validation_alias=env_name("etcd_cert_file"))
    etcd_key_file: Path | None = Field(default=None, validation_alias=env_name("etcd_key_file"))
    etcd_username: str | None = Field(default=None, validation_alias=env_name("etcd_username"))
    etcd_password: SecretStr | None = Field(
        default=None, validation_alias=env_name("etcd_password")
    )

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

    @field_validator("*", mode="before")
    @classmethod
    def _parse(cls, raw: object, info: ValidationInfo) -> Any:
        """Every field is parsed by the parser its row of :data:`OPTIONS` names."""
        assert info.field_name is not None
        return BY_FIELD[info.field_name].parse(raw)

    @model_validator(mode="after")
    def _check_and_derive(self) -> Settings:
        checked = cross_check(self)
        if checked.errors:
            raise checked.errors[0]
        self._warnings = checked.warnings
        derived = derived_advertise(self)
        if derived is not None:
            # The model is frozen; this is its own construction, the only place it may fill
            # in a derived default.
            object.__setattr__(self, "advertise_prometheus", derived)
        return self

    def describe(self) -> tuple[str, ...]:
        """The effective configuration, one ``name=value`` per setting (secrets masked)."""
        return tuple(
            f"{option.flag or option.env}={show(getattr(self, option.field))}" for option in OPTIONS
        )

    def summary(self) -> str:
        """:meth:`describe` on one line."""
        return " ".join(self.describe())


def build_settings(init: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Settings from ``init`` (field → value, the flags) over ``environ`` (never os.environ).

    Raises pydantic's ValidationError; :func:`flux.config.parse_args` turns it into one line.
    """
    token = _ENVIRON.set(environ)
    try:
        return Settings(**init)
    finally:
        _ENVIRON.reset(token)


# --------------------------------------------------------------------------------------------
# Cross-checks: settings compared with each other, once every field is parsed.  An error check
# returns the Problem that stops start-up, a warning check the line to log; None when all is well.


def _missing_partner(settings: Settings, first: str, second: str) -> tuple[str, str] | None:
    """(given, missing) when exactly one of two settings that go together is set."""
    first_set = getattr(settings, first) is not None
    if first_set == (getattr(settings, second) is not None):
        return None
    return (first, second) if first_set else (second, first)


def _certificate_without_key(settings: Settings) -> Problem | None:
    pair = _missing_partner(settings, "etcd_cert_file", "etcd_key_file")
    if pair is None:
        return None
    given, missing = pair
    return Problem(
        given,
        f"{env_name(given)} is set but {env_name(missing)} is not: a client certificate"
        " and its key go together",
        whole_line=True,
    )


def _user_without_password(settings: Settings) -> Problem | None:
    pair = _missing_partner(settings, "etcd_username", "etcd_password")
    if pair is None:
        return None
    given, missing = pair
    return Problem(
        given, f"{env_name(given)} is set but {env_name(missing)} is not", whole_line=True
    )


def _tls_files_over_http(settings: Settings) -> Problem | None:
    tls_files = [
        env_name(field)
        for field in ("etcd_ca_file", "etcd_cert_file", "etcd_key_file")
        if getattr(settings, field) is not None
    ]
    if not tls_files or settings.etcd_endpoints[0].scheme != "http":
        return None
    return Problem("etcd_endpoints", f"{tls_files[0]} is set, so the endpoints must use https://")


def _advertise_without_listen(settings: Settings) -> Problem | None:
    if settings.advertise_prometheus is None or settings.listen_prometheus is not None:
        return None
    return Problem(
        "advertise_prometheus",
        "needs -listen-prometheus (nothing would serve the advertised address)",
    )


def _etcd_default(settings: Settings) -> str | None:
    if "etcd_endpoints" in settings.model_fields_set:
        return None
    return f"{env_name('etcd_endpoints')} is not set; using {DEFAULT_ETCD_ADDRESS}"


def _password_over_http(settings: Settings) -> str | None:
    if settings.etcd_password is None or settings.etcd_endpoints[0].scheme != "http":
        return None
    return (
        f"{env_name('etcd_password')} is sent to etcd unencrypted over http://;"
        " use https:// endpoints"
    )


def _loopback_host_ip(settings: Settings) -> str | None:
    if not settings.host_ip.is_loopback:
        return None
    return (
        f"host IP {settings.host_ip} is a loopback address: other hosts cannot reach"
        f" this host's instances (set {env_name('host_ip')} or -host-ip)"
    )


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def derived_advertise(settings: Settings) -> HostPort | None:
    """What to advertise when only -listen-prometheus is given: the host IP and that port."""
    listen = settings.listen_prometheus
    if listen is None or settings.advertise_prometheus is not None:
        return None
    return HostPort(str(settings.host_ip), listen.port)


def _derived_advertise_unreachable(settings: Settings) -> str | None:
    derived = derived_advertise(settings)
    listen = settings.listen_prometheus
    if derived is None or listen is None or not _is_loopback_host(listen.host):
        return None
    return (
        f"-listen-prometheus {listen} is on loopback only, so the"
        f" advertised {derived} is unreachable (set -advertise-prometheus)"
    )


# In the order they are reported.
ERROR_CHECKS: tuple[Callable[[Settings], Problem | None], ...] = (
    _certificate_without_key,
    _user_without_password,
    _tls_files_over_http,
    _advertise_without_listen,
)
WARNING_CHECKS: tuple[Callable[[Settings], str | None], ...] = (
    _etcd_default,
    _password_over_http,
    _loopback_host_ip,
    _derived_advertise_unreachable,
)


@dataclass(frozen=True, slots=True)
class CrossCheck:
    """What the cross-checks found: ``errors`` stop start-up, ``warnings`` are logged."""

    errors: tuple[Problem, ...]
    warnings: tuple[str, ...]


def cross_check(settings: Settings) -> CrossCheck:
    """Every error and every warning about ``settings``, each list in table order.

    ``settings`` holds the parsed values, before :class:`Settings` fills in the derived
    ``advertise_prometheus`` (:func:`derived_advertise`), which one warning is about.
    """
    return CrossCheck(
        errors=tuple(p for check in ERROR_CHECKS if (p := check(settings)) is not None),
        warnings=tuple(w for check in WARNING_CHECKS if (w := check(settings)) is not None),
    )


# --------------------------------------------------------------------------------------------
# Documentation generated from OPTIONS


def default_text(option: Option) -> str | None:
    """The default in Go's style: strings quoted, numbers bare, false and none omitted."""
    if option.default_doc is not None:
        return option.default_doc
    default = Settings.model_fields[option.field].default
    if default is None or default is False:
        return None
    if isinstance(default, str):
        return quote(default)
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


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
        default = default_text(option)
        if default is None:
            default = "off" if option.is_bool else "none"
        # Go quotes string defaults; Markdown shows them as code.
        default = _cell(re.sub(r'"([^"]*)"', r"`\1`", default))
        rows.append(f"| {flag} | `{option.env}` | {default} | {_cell(option.help)} |")
    return "\n".join(rows) + "\n"
