"""Published ports on one host: a real fluxd, real clients and backends, the session's etcd.

Each test runs its own fluxd (``-host-ip 127.0.0.1 -bridge lo``, its own chain, metrics on a
free loopback port) with ``-publish-ip`` on a random loopback address (127.44.0.0/16): a
published port is never bound to anything but loopback here.  Services and instances are
written as another host would (tests/support/other_host.py: host 127.0.0.2 on its own lease);
the instances are tests/support/http_backend.py servers on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flux.balancer.balancer import Balancer
from flux.config import load_or_exit
from flux.daemon import _build_plugins
from flux.store.memory import MemoryStore
from tests.support.etcd_server import EtcdServer
from tests.support.fluxd_process import HOST, Fluxd, http_get, wait_until
from tests.support.haproxy import haproxy_reading_proxy_headers
from tests.support.http_backend import HttpBackend
from tests.support.other_host import OtherHost, random_loopback_vip, rules_for
from tests.support.published_fluxd import Published, free_port, start_published
from tests.support.tls import TlsServer, make_certificate, peer_common_name

REQUESTS = 20  # per load loop: every loop here is bounded
HELLO = "hello from the backend\n"  # what the backend answers on /


@pytest.fixture
def backends() -> Iterator[list[HttpBackend]]:
    made = [HttpBackend(), HttpBackend()]
    yield made
    for backend in made:
        backend.close()


@pytest.fixture
def published(
    request: pytest.FixtureRequest,
    etcd: EtcdServer,
    fluxd_factory: Callable[..., Fluxd],
    other_host: OtherHost,
) -> Published:
    """A fluxd publishing on a random loopback address (``request.param``: more flags)."""
    return start_published(fluxd_factory, other_host, getattr(request, "param", ()))


def reset(ip: str, port: int) -> bool:
    """A GET to ``ip:port`` is answered by a reset (or a close) without a byte."""
    try:
        with socket.create_connection((ip, port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def refused(ip: str, port: int) -> bool:
    """Nothing listens on ``ip:port`` (a reset: a listener closing with this client queued)."""
    try:
        socket.create_connection((ip, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


# The engine accepting on two shards (SO_REUSEPORT), on one, and the Python relay's own accept.
@pytest.mark.parametrize(
    "published",
    [(), ("-engine-threads", "1"), ("-relay", "python")],
    ids=["engine", "one-shard", "python-relay"],
    indirect=True,
)
def test_a_published_port_reaches_the_instances_with_retries_and_counts_per_entry_point(
    published: Published, backends: list[HttpBackend]
) -> None:
    web_port, both_port = free_port(published.ip), free_port(published.ip)
    vip = random_loopback_vip()
    published.service("web", publish=web_port, instancePort=80, protocol="http")
    published.service("both", address=f"{vip}:80", publish=both_port, protocol="http")
    # No live instance yet: the port is open and resets its clients, without a line for each.
    published.wait_state("web", "listening")
    for _ in range(3):
        assert reset(published.ip, web_port)
    assert not published.daemon.logged("no instance could take the connection")
    # ... but counted, per entry point, as what fluxd answered itself.
    answered = {"service": "web", "entry": f"published:{web_port}", "code": "reset"}
    assert published.total("flux_entry_answered_total", **answered) == 3
    # web's second instance is a port nobody listens on: connects to it fail and are retried.
    dead = f"127.0.0.2:{free_port('127.0.0.2')}"
    published.host.add_instance("web", "web-1", backends[0].address)
    published.host.add_instance("web", "web-dead", dead)
    published.host.add_instance("both", "both-1", backends[1].address)
    assert published.wait_state("web", "listening")["listener"] == f"{published.ip}:{web_port}"
    published.wait_state("both", "listening")
    wait_until(lambda: rules_for(published.daemon.chain, vip, "DNAT"), 15, "both's DNAT rule")
    wait_until(
        lambda: len(published.published("web").get("instances", [])) == 2, 10, "both instances"
    )

    for _ in range(REQUESTS):
        assert published.get(web_port) == HELLO
    assert backends[0].requests == REQUESTS
    assert published.total("flux_connect_failures_total", service="web") >= 1
    entry = f"published:{web_port}"
    assert published.total("flux_entry_connections_total", service="web", entry=entry) == REQUESTS
    assert published.total("flux_entry_connections_total", service="web", entry="vip") == 0
    assert published.total("flux_connections_total", service="web") == REQUESTS
    assert published.total("flux_http_total", service="web", code="200") == REQUESTS

    # A service with both: each entry point reaches the same instances and is counted apart.
    for _ in range(3):
        assert published.get(both_port) == HELLO
    assert http_get(f"http://{vip}/") == HELLO
    assert backends[1].requests == 4
    both = f"published:{both_port}"
    assert published.total("flux_entry_connections_total", service="both", entry=both) == 3
    assert published.total("flux_entry_connections_total", service="both", entry="vip") == 1
    # Only -publish-ip: the port is not open on the host's other loopback addresses.
    assert refused("127.0.0.1", web_port)

    # Unpublished: the port closes; published again, it opens again.
    published.service("web", instancePort=80, protocol="http")
    wait_until(lambda: refused(published.ip, web_port), 15, "the unpublished port to close")
    assert "web" not in published.status()
    published.service("web", publish=web_port, instancePort=80, protocol="http")
    published.wait_state("web", "listening")
    assert published.get(web_port) == HELLO


def test_a_busy_port_is_logged_once_retried_and_leaves_other_services_alone(
    published: Published, backends: list[HttpBackend]
) -> None:
    busy_port, ok_port = free_port(published.ip), free_port(published.ip)
    holder = socket.create_server((published.ip, busy_port))
    try:
        published.service("busy", publish=busy_port, instancePort=80)
        published.service("ok", publish=ok_port, instancePort=80)
        published.host.add_instance("busy", "busy-1", backends[0].address)
        published.host.add_instance("ok", "ok-1", backends[1].address)
        line = f"service busy: cannot publish port {busy_port} on {published.ip}:"
        published.daemon.wait_logged(line)
        state = published.wait_state("busy", "busy")
        assert "Address already in use" in str(state["error"])
        published.wait_state("ok", "listening")
        for _ in range(REQUESTS):
            assert published.get(ok_port) == HELLO
        time.sleep(2)  # retries go on (0.5 s, 1 s, ...) without another line
        assert sum(line in entry for entry in published.daemon.lines) == 1
        assert published.published("busy")["state"] == "busy"
        assert backends[0].requests == 0
    finally:
        holder.close()
    published.wait_state("busy", "listening", timeout=20)
    published.daemon.wait_logged(f"service busy: published port {busy_port} on {published.ip}")
    assert published.get(busy_port) == HELLO
    assert backends[0].requests == 1


def test_two_services_on_one_port_the_first_created_wins_and_bad_records_are_skipped(
    published: Published, backends: list[HttpBackend], etcd: EtcdServer
) -> None:
    port = free_port(published.ip)
    # Written by other tools: fluxctl refuses the second claim up front.
    published.service("first", publish=port, instancePort=80)
    published.service("second", publish=port, instancePort=80)
    published.host.add_instance("first", "first-1", backends[0].address)
    published.host.add_instance("second", "second-1", backends[1].address)
    published.wait_state("first", "listening")
    conflict = published.wait_state("second", "conflict")
    assert conflict["conflict"] == f"port {port} is also published by service first"
    assert conflict["holder"] == "first"
    line = f"service second: port {port} is also published by service first, which claimed it"
    published.daemon.wait_logged(line)
    for _ in range(3):
        assert published.get(port) == HELLO
    assert (backends[0].requests, backends[1].requests) == (3, 0)

    # A bad published port written by another tool: one line, and nothing else changes.
    etcd.put("/weave-flux/service/odd/spec", json.dumps({"publish": "8080"}))
    bad = "skipping service 'odd': /weave-flux/service/odd/spec: publish: Input should be"
    published.daemon.wait_logged(bad)
    assert published.get(port) == HELLO

    # The holder goes: the other takes the port over.
    published.remove("first")
    published.wait_state("second", "listening")
    assert published.get(port) == HELLO
    assert backends[1].requests == 1
    assert sum(line in entry for entry in published.daemon.lines) == 1
    assert sum(bad in entry for entry in published.daemon.lines) == 1
    assert published.daemon.logged(f"service second: no longer refused port {port}")


@pytest.mark.parametrize(
    ("value", "bind_ip"), [("none", None), ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "0.0.0.0")]
)
def test_publish_ip_decides_whether_and_where_the_balancer_publishes(
    value: str, bind_ip: str | None
) -> None:
    # Built, never started: nothing is bound here, whatever the value.
    parsed = load_or_exit(["-host-ip", HOST, "-bridge", "lo", "-publish-ip", value], {})
    assert parsed.settings is not None
    plugins = _build_plugins(parsed.settings, MemoryStore())
    (balancer,) = [plugin for plugin in plugins if isinstance(plugin, Balancer)]
    if bind_ip is None:
        assert balancer.published is None
        assert balancer.status()["publish_ip"] is None
    else:
        assert balancer.published is not None and balancer.published.bind_ip == bind_ip


@pytest.mark.parametrize("published", [("-publish-ip", "none")], ids=["none"], indirect=True)
def test_a_host_with_publish_ip_none_opens_no_published_port_and_still_serves_the_vip(
    published: Published, backends: list[HttpBackend]
) -> None:
    # The fixture's -publish-ip is overridden by the later "none": this host is no entry point.
    port, vip = free_port(), random_loopback_vip()
    published.service("both", address=f"{vip}:80", publish=port, protocol="http")
    published.host.add_instance("both", "both-1", backends[0].address)
    wait_until(lambda: rules_for(published.daemon.chain, vip, "DNAT"), 15, "both's DNAT rule")
    wait_until(lambda: http_get(f"http://{vip}/") == HELLO, 15, "the VIP to serve")
    document = json.loads(http_get(f"http://{HOST}:{published.metrics_port}/status"))
    assert document["balancer"]["publish_ip"] is None
    assert "published" not in document["balancer"]["services"]["both"]
    # Nothing listens on the published port, on the fixture's address or anywhere local.
    for ip in (published.ip, HOST):
        assert refused(ip, port)
    assert published.total("flux_entry_connections_total", service="both", entry="vip") == 1


def ask(ip: str, port: int) -> tuple[str, tuple[str, int]]:
    """One HTTP request to ``ip:port``: the answer's body and the client's own address."""
    with socket.create_connection((ip, port), timeout=5) as sock:
        client = sock.getsockname()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    return body.decode(), client


@pytest.mark.parametrize(
    "published", [(), ("-relay", "python")], ids=["engine", "python-relay"], indirect=True
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_tcp_service_with_the_proxy_protocol_tells_its_instance_the_client(
    published: Published, version: str, tmp_path: Path
) -> None:
    """Its instance is HAProxy reading the header (``accept-proxy``): through the published port
    and through the service address, it answers with the client's address and port."""
    db_port = free_port(published.ip)
    vip = random_loopback_vip()
    with haproxy_reading_proxy_headers(tmp_path, "127.0.0.1") as (host, port):
        published.service(
            "db", address=f"{vip}:80", publish=db_port, instancePort=port, proxyProtocol=version
        )
        published.host.add_instance("db", "db-1", f"{host}:{port}")
        published.wait_state("db", "listening")
        wait_until(lambda: rules_for(published.daemon.chain, vip, "DNAT"), 15, "db's DNAT rule")
        wait_until(
            lambda: len(published.published("db").get("instances", [])) == 1, 10, "the instance"
        )
        for ip, target in [(published.ip, db_port), (vip, 80)] * 3:
            body, (client_ip, client_port) = ask(ip, target)
            assert body == f"{client_ip} {client_port}"
    assert published.total("flux_entry_connections_total", service="db") == 6


# -- one port, many http services, by host name ----------------------------------------------


def converse(ip: str, port: int, *requests: bytes) -> tuple[list[bytes], bool]:
    """Send ``requests`` one by one on one connection, each after the previous response; return
    the responses and whether the server then closed the connection (within 5 s)."""
    responses: list[bytes] = []
    with socket.create_connection((ip, port), timeout=5) as sock:
        buf = b""
        for request in requests:
            sock.sendall(request)
            while True:
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if sep:
                    found = re.search(rb"(?im)^content-length: *(\d+)", head)
                    length = int(found.group(1)) if found else 0
                    if len(rest) >= length:
                        responses.append(head + sep + rest[:length])
                        buf = rest[length:]
                        break
                chunk = sock.recv(65536)
                if not chunk:
                    return responses, True
                buf += chunk
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
    return responses, closed


def get_for(host: str | None, *, version: str = "1.1", path: str = "/") -> bytes:
    field = "" if host is None else f"Host: {host}\r\n"
    return f"GET {path} HTTP/{version}\r\n{field}\r\n".encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


@pytest.fixture
def three_backends() -> Iterator[list[HttpBackend]]:
    made = [HttpBackend(), HttpBackend(), HttpBackend()]
    yield made
    for backend in made:
        backend.close()


@pytest.mark.parametrize(
    "published", [(), ("-relay", "python")], ids=["engine", "python-relay"], indirect=True
)
def test_http_services_share_a_port_by_host_with_404_421_wildcards_and_a_default(
    published: Published, three_backends: list[HttpBackend]
) -> None:
    port = free_port(published.ip)
    www, api, fallback = three_backends
    published.service(
        "www", publish=port, instancePort=80, protocol="http", hostnames=["WWW.example.test"]
    )
    published.service(
        "api",
        publish=port,
        instancePort=80,
        protocol="http",
        hostnames=["api.example.test", "*.apps.example.test"],
    )
    published.host.add_instance("www", "www-1", www.address)
    published.host.add_instance("api", "api-1", api.address)
    for name in ("www", "api"):
        wait_until(
            lambda name=name: len(published.published(name).get("instances", [])) == 1,
            15,
            f"{name}'s instance on the shared port",
        )
    status = published.published("api")
    assert status["state"] == "listening" and status["default"] is False
    assert status["hostnames"] == ["*.apps.example.test", "api.example.test"]
    assert published.published("www")["hostnames"] == ["www.example.test"]

    # By Host: case-insensitive, the port and a trailing dot ignored; a wildcard, one label.
    for host, backend, served in (
        ("www.example.test", www, 1),
        ("WWW.Example.TEST.:8080", www, 2),
        ("api.example.test", api, 1),
        ("x.apps.example.test", api, 2),
    ):
        (response,), _ = converse(published.ip, port, get_for(host, version="1.0"))
        assert body_of(response) == HELLO.encode(), response
        assert backend.requests == served, host
    # With the engine, each of them was routed there, with no Python on its way.
    routed = published.total("flux_engine_events_total", event="routed")
    assert routed == (4 if published.engine else 0)

    # Unknown or missing host, no default: fluxd answers 404 naming the host, and closes.
    for request, named in (
        (get_for("nowhere.test"), b"for host nowhere.test"),
        (get_for("a.b.apps.example.test"), b"for host a.b.apps.example.test"),
        (get_for(None, version="1.0"), b"without a Host"),
    ):
        (response,), closed = converse(published.ip, port, request)
        assert status_of(response) == 404 and named in body_of(response), response
        assert body_of(response).count(b"\n") == 1 and closed
    entry = f"published:{port}"
    assert published.total("flux_entry_answered_total", entry=entry, code="404") == 3
    # The engine handed them to the router's Python side, which answered them.
    assert published.total("flux_engine_events_total", event="routed") == routed
    # The router answered them, before any service was chosen.
    assert published.total("flux_entry_answered_total", service="", entry=entry, code="404") == 3
    published.daemon.wait_logged(
        f"http service {entry}: answered 404 to 127.0.0.1:"
    )
    assert published.daemon.logged("(unknown host nowhere.test)")

    # A later request for another host on the same connection: 421, then close; the first
    # service's requests on it go on as before.
    responses, closed = converse(
        published.ip,
        port,
        get_for("www.example.test"),
        get_for("www.example.test:80"),
        get_for("api.example.test"),
    )
    assert [status_of(r) for r in responses] == [200, 200, 421] and closed
    assert body_of(responses[2]) == b"Misdirected Request\n"
    assert (www.requests, api.requests) == (4, 2)
    wait_until(
        lambda: published.total("flux_entry_answered_total", entry=entry, code="421") == 1,
        10,
        "the 421 counted",
    )
    assert published.total("flux_http_rejected_total", service="www", code="421") == 1
    # ... under the service whose relay answered it.
    assert published.total("flux_entry_answered_total", service="www", code="421") == 1
    published.daemon.wait_logged("http service www: answered 421 to 127.0.0.1:")

    # A service without host names on the port is the default for every other host.
    published.service("fallback", publish=port, instancePort=80, protocol="http")
    published.host.add_instance("fallback", "fallback-1", fallback.address)
    wait_until(
        lambda: len(published.published("fallback").get("instances", [])) == 1,
        15,
        "the default's instance",
    )
    assert published.published("fallback")["default"] is True
    for request in (get_for("nowhere.test"), get_for(None, version="1.0")):
        (response,), _ = converse(published.ip, port, request)
        assert body_of(response) == HELLO.encode(), response
    assert fallback.requests == 2
    (response,), _ = converse(published.ip, port, get_for("www.example.test"))
    assert www.requests == 5
    assert published.total("flux_entry_answered_total", entry=entry, code="404") == 3
    # Still one listening socket: the port never closed while services joined it.
    assert published.daemon.logged(f"published port {port} on {published.ip} (http, by host name)")
    assert not published.daemon.logged(f"closed published port {port}")


def test_host_name_conflicts_on_a_shared_port_the_first_created_wins(
    published: Published, three_backends: list[HttpBackend], etcd: EtcdServer
) -> None:
    port = free_port(published.ip)
    published.service("www", publish=port, instancePort=80, protocol="http",
                      hostnames=["www.example.test"])  # fmt: skip
    published.host.add_instance("www", "www-1", three_backends[0].address)
    published.wait_state("www", "listening")
    # Written by other tools (fluxctl refuses each of these up front).
    published.service("copy", publish=port, instancePort=80, protocol="http",
                      hostnames=["www.example.test", "other.example.test"])  # fmt: skip
    published.service("raw", publish=port, instancePort=80)
    published.service("fallback", publish=port, instancePort=80, protocol="http")
    published.service("fallback-2", publish=port, instancePort=80, protocol="http")
    published.host.add_instance("copy", "copy-1", three_backends[1].address)
    published.host.add_instance("fallback", "fallback-1", three_backends[2].address)
    copy = published.wait_state("copy", "conflict")
    assert copy["conflict"] == (
        f"host name www.example.test on port {port} is also claimed by service www"
    )
    raw = published.wait_state("raw", "conflict")
    assert raw["conflict"] == (
        f"port {port} is published by http service www (tcp and http services cannot share"
        " a port)"
    )
    second = published.wait_state("fallback-2", "conflict")
    assert second["conflict"] == f"port {port} is also published by service fallback"
    published.wait_state("fallback", "listening")
    line = f"service copy: host name www.example.test on port {port} is also claimed"
    published.daemon.wait_logged(line)
    # A bad host name written by another tool: one line, the record skipped.
    spec = {"publish": port, "protocol": "http", "hostnames": ["bad name"]}
    etcd.put("/weave-flux/service/odd/spec", json.dumps(spec))
    bad = "skipping service 'odd': /weave-flux/service/odd/spec: hostnames:"
    published.daemon.wait_logged(bad)
    assert published.daemon.logged("invalid host name 'bad name'")
    # Refused whole: copy's other name is not routed to it (the default serves it).
    (response,), _ = converse(published.ip, port, get_for("other.example.test"))
    assert body_of(response) == HELLO.encode()
    (response,), _ = converse(published.ip, port, get_for("www.example.test"))
    assert body_of(response) == HELLO.encode()
    assert [b.requests for b in three_backends] == [1, 0, 1]
    # The holder of the name goes: the other takes it over, once.
    published.remove("www")
    published.wait_state("copy", "listening")
    wait_until(
        lambda: len(published.published("copy").get("instances", [])) == 1, 15, "copy's instance"
    )
    (response,), _ = converse(published.ip, port, get_for("www.example.test"))
    assert body_of(response) == HELLO.encode()
    assert three_backends[1].requests == 1
    assert sum(line in entry for entry in published.daemon.lines) == 1
    assert sum(bad in entry for entry in published.daemon.lines) == 1
    assert "odd" not in published.status()


def test_a_port_of_one_service_becomes_shared_when_a_service_with_host_names_joins(
    published: Published, backends: list[HttpBackend]
) -> None:
    port = free_port(published.ip)
    published.service("site", publish=port, instancePort=80, protocol="http")
    published.host.add_instance("site", "site-1", backends[0].address)
    published.wait_state("site", "listening")
    wait_until(
        lambda: len(published.published("site").get("instances", [])) == 1, 15, "site's instance"
    )
    assert published.get(port) == HELLO
    published.service("api", publish=port, instancePort=80, protocol="http",
                      hostnames=["api.example.test"])  # fmt: skip
    published.host.add_instance("api", "api-1", backends[1].address)
    published.daemon.wait_logged(f"published port {port} on {published.ip} (http, by host name)")
    wait_until(
        lambda: len(published.published("api").get("instances", [])) == 1, 15, "api's instance"
    )
    (response,), _ = converse(published.ip, port, get_for("api.example.test"))
    assert body_of(response) == HELLO.encode()
    assert published.get(port) == HELLO  # any other host: site, the default
    assert (backends[0].requests, backends[1].requests) == (2, 1)
    assert published.published("site")["default"] is True
    # api goes: the port is site's alone again, accepted by the engine as before.
    published.remove("api")
    wait_until(lambda: "hostnames" not in published.published("site"), 15, "site alone")
    published.wait_state("site", "listening")
    assert published.get(port) == HELLO
    # Closed and opened again in another form each time, without a line about a busy port
    # (the engine's sockets close a moment later: retried quietly).
    assert not published.daemon.logged(f"cannot publish port {port}")


# -- one port, many tcp services, by TLS server name (passthrough) ---------------------------


def tls_ask(
    ip: str, port: int, server_name: str, cafile: Path, *, check_name: bool = True
) -> tuple[str, str]:
    """A TLS handshake through ``ip:port`` asking for ``server_name``, verifying the server's
    certificate against ``cafile`` (and that it holds the name, with ``check_name``): its
    subject's CN and the line the server then sends."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = check_name
    with (
        socket.create_connection((ip, port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        subject = peer_common_name(tls)
        line = b""
        while chunk := tls.recv(4096):
            line += chunk
    return subject, line.decode()


def tls_refused(ip: str, port: int, server_name: str | None) -> bool:
    """A TLS client asking for ``server_name`` (None: none) is closed before any byte."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((ip, port), timeout=5) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=server_name):
                return False
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return True
        except ssl.SSLError as exc:
            return "EOF" in str(exc) or "reset" in str(exc)


@pytest.fixture
def tls_servers(tmp_path: Path) -> Iterator[tuple[dict[str, TlsServer], Path]]:
    """Two TLS instances on loopback, each with a self-signed certificate of its own name, and
    a CA file holding both (so that a client verifies whichever it reaches)."""
    names = ("a.example.test", "b.example.test")
    certificates = {name: make_certificate(tmp_path, name) for name in names}
    cafile = tmp_path / "both.pem"
    cafile.write_text("".join(cert.read_text() for cert, _ in certificates.values()))
    servers = {name: TlsServer(name, *certificates[name]) for name in names}
    yield servers, cafile
    for server in servers.values():
        server.close()


def test_tcp_services_share_a_port_by_tls_server_name_passed_through(
    published: Published, tls_servers: tuple[dict[str, TlsServer], Path]
) -> None:
    servers, cafile = tls_servers
    a, b = servers["a.example.test"], servers["b.example.test"]
    port = free_port(published.ip)
    published.service("a", publish=port, instancePort=443, hostnames=["A.example.test"])
    published.service("b", publish=port, instancePort=443, hostnames=["*.b.example.test"])
    published.host.add_instance("a", "a-1", a.address)
    published.host.add_instance("b", "b-1", b.address)
    for name in ("a", "b"):
        wait_until(
            lambda name=name: len(published.published(name).get("instances", [])) == 1,
            15,
            f"{name}'s instance on the shared port",
        )
    assert published.published("b")["hostnames"] == ["*.b.example.test"]
    assert published.daemon.logged(f"published port {port} on {published.ip} (tcp, by host name)")

    # Each name reaches its instance, whose certificate the client verifies: the TLS bytes
    # went through untouched (case-insensitive; a wildcard, one label).
    for server_name, subject in (
        ("a.example.test", "a.example.test"),
        ("A.EXAMPLE.test", "a.example.test"),
        ("x.b.example.test", "b.example.test"),  # its certificate names b.example.test only
    ):
        check_name = not server_name.startswith("x.")
        assert tls_ask(published.ip, port, server_name, cafile, check_name=check_name) == (
            subject,
            subject + "\n",
        ), server_name
    assert (a.handshakes, b.handshakes) == (2, 1)
    # The engine read each ClientHello's server name and sent the client on itself.
    assert published.total("flux_engine_events_total", event="routed") == 3

    # An unknown name, none at all, or no TLS, with no default: closed, counted, noted.
    entry = f"published:{port}"
    assert tls_refused(published.ip, port, "nowhere.example.test")
    assert tls_refused(published.ip, port, "a.b.b.example.test")
    assert tls_refused(published.ip, port, None)
    assert reset(published.ip, port)
    assert (a.handshakes, b.handshakes) == (2, 1)
    wait_until(
        lambda: published.total(
            "flux_entry_answered_total", service="", entry=entry, code="no-sni-match"
        )
        == 4,
        10,
        "the closed clients counted",
    )
    published.daemon.wait_logged(f"tcp service {entry}: closed 127.0.0.1:")
    assert published.daemon.logged("(unknown server name nowhere.example.test)")
    # ... those by the router's Python side, which the engine handed them to.
    assert published.total("flux_engine_events_total", event="routed") == 3
