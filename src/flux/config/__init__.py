"""fluxd's configuration: flags, environment, defaults, validation.

Theory of operation
-------------------
Every setting is described once, in the option table (:data:`OPTIONS`: flag name, environment
variable, model field, metavar, parser, help); the rest is code that walks it.  The package has
four rooms:

``settings``
    The option table, the frozen pydantic-settings :class:`Settings` model (one validator runs
    each field through its row's parser) and the cross-checks that compare settings with each
    other, kept as two lists: errors stop start-up, warnings are logged.  Also the README's
    configuration table (:func:`settings_table_markdown`).
``values``
    The value types (:class:`HostPort`, :class:`EtcdEndpoint`) and the parsers of single
    values, each raising ValueError with the reason only.
``cli``
    The Go-style flag scanner and :func:`parse_args` (flags over an explicit environment over
    defaults; ``os.environ`` is never read), one-line :class:`ConfigError` messages,
    ``-help`` and ``-version``, and :func:`load_or_exit` for the entry point (which also
    resolves a DNS name given to ``-advertise-prometheus``, once, at start).
``hostip``
    :func:`discover_host_ip`, for when no host IP is given: like ``hostname -i``, falling back
    to the address of the interface that holds the default route.

Dependencies run one way: ``values`` ← ``settings`` ← ``hostip`` ← ``cli``.
"""

from flux.config.cli import (
    ConfigError,
    ParsedCommand,
    load_or_exit,
    parse_args,
    resolve_advertise,
    usage_text,
    version_text,
)
from flux.config.hostip import (
    HostIPUnavailable,
    default_route_interface,
    discover_host_ip,
    interface_ipv4,
)
from flux.config.settings import (
    OPTIONS,
    Option,
    Settings,
    settings_table_markdown,
    usable_cpus,
)
from flux.config.values import EtcdEndpoint, HostPort

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
    "usable_cpus",
    "usage_text",
    "version_text",
]
