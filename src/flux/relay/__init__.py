"""Relays: carry bytes both ways between an accepted client socket and an upstream socket.

The rooms: :mod:`flux.relay.base` holds the roles every relay takes (typed Protocols), the
records and the shared helpers, and states the behaviour both relays share;
:mod:`flux.relay.engine` the splice relay over the compiled engine (the default);
:mod:`flux.relay.python` its twin on asyncio, the oracle, with :mod:`flux.relay.h2watch`, its
HTTP/2 observer (``hyperframe`` and ``hpack``).  :func:`make_relay` picks one.
"""

from __future__ import annotations

from typing import Any, Literal

from flux.relay.base import (
    HTTP_CUT_SIDES,
    OTHER_CLIENT,
    AcceptHandler,
    Acceptor,
    ConnectHandler,
    Connector,
    EngineCounts,
    ExchangeObserver,
    GrpcCall,
    Relay,
    RelayCounters,
    RelayResult,
    packed_sockaddr,
    reset_and_close,
)
from flux.relay.engine import SpliceRelay
from flux.relay.python import PythonRelay

__all__ = [
    "HTTP_CUT_SIDES",
    "OTHER_CLIENT",
    "AcceptHandler",
    "Acceptor",
    "ConnectHandler",
    "Connector",
    "EngineCounts",
    "ExchangeObserver",
    "GrpcCall",
    "PythonRelay",
    "Relay",
    "RelayCounters",
    "RelayResult",
    "SpliceRelay",
    "make_relay",
    "packed_sockaddr",
    "reset_and_close",
]


def make_relay(kind: Literal["splice", "python"] = "splice", **options: Any) -> Relay:
    """The relay to use: the compiled splice engine by default, or its Python twin."""
    if kind == "splice":
        return SpliceRelay(**options)
    if kind == "python":
        # One event loop: shards mean nothing to it.
        options.pop("shards", None)
        # It counts nothing itself (the metrics fold its clients): no client cap either.
        options.pop("max_clients", None)
        extra = set(options) - {"http_header_timeout", "http_idle_timeout", "notices"}
        if extra:
            raise TypeError(
                f"the python relay takes only the HTTP timeouts and notices, got {sorted(extra)}"
            )
        return PythonRelay(**options)
    raise ValueError(f"relay kind must be 'splice' or 'python', got {kind!r}")
