"""Routing by Host, and by TLS server name, in the engine (``accept_by_host``, through
``route_probe``) against its oracle, the host router's Python reading (``request_host``,
``read_server_name`` and ``HostRoutes.pick``).

The engine may hand any client over (the Python router then decides), but whenever it routes a
client itself it must pick the service the oracle picks; and the plain case (a complete head
with one Host) must be routed, not handed over.  Pure: no sockets.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flux._splice import route_probe
from flux.balancer.clienthello import read_server_name
from flux.balancer.entrypoints import HostRoutes, request_host
from flux.balancer.hostrouter import _H2_PREFACE, _HEAD_END
from tests.support.tls import client_hello, refragment

SERVICES = ("www", "api", "apps", "fallback")
IDS = {name: index + 1 for index, name in enumerate(SERVICES)}
NAMES = (("www.example.test", "www"), ("api.example.test", "api"), ("*.apps.example.test", "apps"))


def oracle(data: bytes, routes: HostRoutes) -> str | None:
    """The service the Python router hands a client with first bytes ``data`` to (None: it
    answers, waits for more, or sends HTTP/2 elsewhere)."""
    body = data.lstrip(b"\r\n")
    if _H2_PREFACE.startswith(body[: len(_H2_PREFACE)]):
        return None
    end = _HEAD_END.search(body)
    if end is None:
        return None
    return routes.pick(request_host(body[: end.end()]))


def engine(data: bytes, routes: HostRoutes) -> str | None:
    default = IDS[routes.default] if routes.default else -1
    picked = route_probe(data, [(host, IDS[service]) for host, service in routes.names], default)
    return None if picked < 0 else SERVICES[picked - 1]


HOSTS = st.sampled_from([
    "www.example.test", "WWW.Example.TEST", "www.example.test.", "www.example.test:8080",
    "www.example.test.:80", "api.example.test", "x.apps.example.test", "a.b.apps.example.test",
    "apps.example.test", ".apps.example.test", "nowhere.test", "", " ", "[::1]:80", "[::1]",
    "www.example.test:", ":80", "ünïcode.test", "www.example.test\x0b", "a" * 300,
    "*.apps.example.test",
])  # fmt: skip
FIELD_NAMES = st.sampled_from(
    ["Host", "host", "HOST", " Host", "Host ", "X-Host", "Hostx", "ost"]
)
OTHER = st.sampled_from(["User-Agent: t", "Accept: */*", "X: y:z", "no colon", ""])
ENDS = st.sampled_from(["\r\n", "\n"])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    lines = [draw(st.sampled_from(["GET / HTTP/1.1", "POST /x HTTP/1.0", "PRI * HTTP/2.0"]))]
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            lines.append(f"{draw(FIELD_NAMES)}:{draw(st.sampled_from(['', ' ', '  ']))}"
                         f"{draw(HOSTS)}{draw(st.sampled_from(['', ' ', chr(9)]))}")  # fmt: skip
        else:
            lines.append(draw(OTHER))
    text = "".join(line + draw(ENDS) for line in lines) + draw(ENDS)
    lead = draw(st.sampled_from(["", "\r\n", "\n\r\n"]))
    data = (lead + text).encode("utf-8")
    cut = draw(st.integers(0, 3))
    return data if cut == 0 else data[: max(0, len(data) - draw(st.integers(1, 8)))]


ROUTE_TABLES = [HostRoutes(NAMES), HostRoutes(NAMES, "fallback")]


@settings(max_examples=600, deadline=None)
@given(data=heads(), table=st.sampled_from(ROUTE_TABLES))
@example(b"GET / HTTP/1.1\r\nX: y\n\nHost: www.example.test\r\n\r\n", ROUTE_TABLES[0])
@example(b"GET / HTTP/1.1\r\nHost: a\r\nHost: www.example.test\r\n\r\n", ROUTE_TABLES[1])
def test_what_the_engine_routes_it_routes_where_the_oracle_would(
    data: bytes, table: HostRoutes
) -> None:
    picked = engine(data, table)
    if picked is not None:
        assert picked == oracle(data, table), data


@pytest.mark.parametrize(
    ("host", "service"),
    [
        ("www.example.test", "www"),
        ("WWW.Example.Test.:8080", "www"),
        ("api.example.test:443", "api"),
        ("x.apps.example.test", "apps"),
        ("nowhere.test", "fallback"),
    ],
)
def test_a_plain_head_is_routed_in_the_engine(host: str, service: str) -> None:
    head = f"GET /a HTTP/1.1\r\nUser-Agent: t\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()
    table = HostRoutes(NAMES, "fallback")
    assert engine(head, table) == service == oracle(head, table)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: www.example.test\r\n",  # not complete yet
        b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n",  # no such host, no default: 404
        b"GET / HTTP/1.0\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nhost: www.example.test\r\n\r\n",  # two
        b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \xc3\xbcber.test\r\n\r\n",
        _H2_PREFACE,
        b"GET / HTTP/1.1\r\nX: " + b"y" * 5000 + b"\r\nHost: www.example.test\r\n\r\n",  # large
    ],
)
def test_the_unusual_is_handed_over(data: bytes) -> None:
    assert engine(data, HostRoutes(NAMES)) is None


def test_a_name_whose_service_the_engine_lacks_is_handed_over_not_defaulted() -> None:
    head = b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n"
    assert route_probe(head, [("www.example.test", -1)], IDS["fallback"]) == -1
    # The oracle answers 404 for a name (or wildcard) whose service has no listener.
    assert route_probe(head, [("*.example.test", -1)], IDS["fallback"]) == -1
    other = b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n"
    assert route_probe(other, [("*.example.test", -1)], IDS["fallback"]) == IDS["fallback"]


# ---- TLS passthrough: by the server name of a ClientHello ----------------------------------------

TLS_NAMES = (("db.example.test", "www"), ("*.apps.example.test", "apps"))
TLS_TABLES = [HostRoutes(TLS_NAMES), HostRoutes(TLS_NAMES, "fallback")]


def tls_oracle(data: bytes, routes: HostRoutes) -> str | None:
    done, name = read_server_name(data)
    return routes.pick(name) if done else None


def tls_engine(data: bytes, routes: HostRoutes) -> str | None:
    default = IDS[routes.default] if routes.default else -1
    names = [(host, IDS[service]) for host, service in routes.names]
    picked = route_probe(data, names, default, tls=True)
    return None if picked < 0 else SERVICES[picked - 1]


SERVER_NAMES = ["db.example.test", "DB.Example.Test", "db.example.test.", "x.apps.example.test",
                "a.b.apps.example.test", "nowhere.test", ".".join(["d" * 60] * 4)]  # fmt: skip
# One real ClientHello per name (and TLS 1.3 only), made once: making them is the slow part.
HELLOS = {(name, only13): client_hello(name, tls13_only=only13)
          for name in SERVER_NAMES for only13 in (False, True)}  # fmt: skip


@st.composite
def client_hellos(draw: st.DrawFn) -> bytes:
    hello = HELLOS[(draw(st.sampled_from(SERVER_NAMES)), draw(st.booleans()))]
    if draw(st.booleans()):
        hello = refragment(hello, draw(st.integers(1, 600)))
    data = bytearray(hello)
    for _ in range(draw(st.integers(0, 3))):  # a few bytes changed anywhere
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


@settings(max_examples=600, deadline=None)
@given(data=client_hellos(), table=st.sampled_from(TLS_TABLES))
def test_what_the_engine_routes_by_server_name_it_routes_where_the_oracle_would(
    data: bytes, table: HostRoutes
) -> None:
    picked = tls_engine(data, table)
    if picked is not None:
        assert picked == tls_oracle(data, table), data


@pytest.mark.parametrize(
    ("name", "service"),
    [("db.example.test", "www"), ("DB.Example.Test.", "www"), ("x.apps.example.test", "apps"),
     ("nowhere.test", "fallback")],
)  # fmt: skip
def test_a_whole_client_hello_is_routed_in_the_engine(name: str, service: str) -> None:
    for only13 in (False, True):
        hello = HELLOS.get((name, only13)) or client_hello(name, tls13_only=only13)
        table = HostRoutes(TLS_NAMES, "fallback")
        assert tls_engine(hello, table) == service == tls_oracle(hello, table)


def test_a_client_hello_over_several_records_or_without_a_name_is_handed_over() -> None:
    table = HostRoutes(TLS_NAMES, "fallback")
    split = refragment(HELLOS[("db.example.test", False)], 100)
    assert tls_oracle(split, table) == "www" and tls_engine(split, table) is None
    bare = client_hello(None)
    assert tls_oracle(bare, table) == "fallback" and tls_engine(bare, table) is None
    assert tls_engine(b"GET / HTTP/1.1\r\nHost: db.example.test\r\n\r\n", table) is None
