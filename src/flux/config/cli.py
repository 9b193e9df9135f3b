"""fluxd's command line: the Go-style flag scanner, error messages, help and version.

Flags follow Go's ``flag`` package, as the original daemon did: ``-flag value``, ``-flag=value``,
``--flag value``, ``--flag=value``; a boolean flag takes a value only after ``=``; ``--`` ends the
flags.  Unlike Go, flags may also follow the one optional sub-command (``fluxd cleanup -chain
X``).  Precedence is flags, then environment, then defaults (:func:`parse_args`).

Every bad value becomes a :class:`ConfigError` whose message is one line naming the flag or
variable and the value (:func:`_explain`); pydantic's own multi-line report is never shown.

A DNS name given to ``-advertise-prometheus`` is resolved once, at start, by :func:`load_or_exit`
(:func:`resolve_advertise`): etcd holds the IP, and a name that does not resolve stops fluxd with
exit status 2 rather than leaving it running with an endpoint nobody can use.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Literal, NoReturn

from pydantic import ValidationError

from flux import __version__
from flux.config.hostip import HostIPUnavailable, discover_host_ip
from flux.config.settings import (
    BY_ENV,
    BY_FIELD,
    BY_FLAG,
    OPTIONS,
    Option,
    Problem,
    Settings,
    build_settings,
    default_text,
    env_name,
    printable,
    quote,
    show,
)
from flux.config.values import HostPort

__all__ = [
    "PROGRAM",
    "SUBCOMMANDS",
    "ConfigError",
    "ParsedCommand",
    "load_or_exit",
    "parse_args",
    "resolve_advertise",
    "usage_text",
    "version_text",
]

PROGRAM = "fluxd"
SUBCOMMANDS = ("cleanup",)


class ConfigError(Exception):
    """A bad flag, environment variable or combination; ``str()`` is one line for people."""


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
            raise ConfigError(f"bad flag syntax: {printable(arg)}")
        if name in ("h", "help", "version"):
            if has_value:
                raise ConfigError(f"flag {dashes}{printable(name)} does not take a value")
            return ParsedCommand("version" if name == "version" else "help")
        option = BY_FLAG.get(name)
        if option is None:
            raise ConfigError(f"unknown flag {dashes}{printable(name)}")
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
            raise ConfigError(f"unexpected argument {quote(arg)}")
    return values, subcommand


def _shown_value(option: Option, raw: str) -> str:
    if option.field == "etcd_password":
        return "(hidden)"
    if option.field == "etcd_endpoints":
        # Never echo credentials someone put into a URL.
        raw = re.sub(r"(?<=://)[^/@,]*@", "***@", raw)
    return quote(raw)


def _explain(
    exc: ValidationError,
    flags: Mapping[str, str],
    environ: Mapping[str, str],
    host_ip_source: str | None,
) -> str:
    """pydantic's report → one line naming the setting, where its value came from, and why."""
    error = exc.errors(include_url=False)[0]
    problem = (error.get("ctx") or {}).get("error")
    loc = error["loc"][0] if error["loc"] else ""
    if isinstance(problem, Problem):
        field, reason = problem.field, str(problem)
        if problem.whole_line:
            return reason
    else:
        field = BY_ENV[loc].field if isinstance(loc, str) and loc in BY_ENV else str(loc)
        reason = str(problem) if problem is not None else error["msg"]
    option = BY_FIELD.get(field)
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
        return f"invalid default value {quote(show(default))} for {option.name}: {reason}"
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
    elif environ.get(env_name("host_ip")):
        source = f"{env_name('host_ip')} in environment"
    else:
        try:
            init["host_ip"], source = discover()
        except HostIPUnavailable as exc:
            if subcommand != "cleanup":
                raise ConfigError(str(exc)) from None
            # Cleanup only removes iptables state; it must work even where the daemon's host
            # IP cannot be found, so it gets a placeholder it never uses.
            init["host_ip"], source = IPv4Address("127.0.0.1"), "placeholder (unused by cleanup)"
    try:
        settings = build_settings(init, environ)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, flags, environ, source)) from None
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
        default = default_text(option)
        text = option.help + (f" (default {default})" if default else "")
        entry(head, f"{text} (env {option.env})")
    entry("  -help", "show this help and exit")
    entry("  -version", "show the version and exit")
    lines += ["", "Environment only:"]
    for option in OPTIONS:
        if option.flag:
            continue
        default = default_text(option)
        entry(
            f"  {option.env} {option.metavar}",
            option.help + (f" (default {default})" if default else ""),
        )
    lines += ["", "An empty environment variable counts as unset."]
    return "\n".join(lines) + "\n"
