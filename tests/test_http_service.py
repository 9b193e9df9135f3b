"""HTTP services end to end: a real fluxd, real clients, real backends, a real Prometheus.

One fluxd for the module (``-host-ip 127.0.0.1 -bridge lo``, its own chain, metrics on a free
loopback port, HTTP timeouts short enough to test), the session's etcd, and the test backend of
tests/support/http_backend.py registered as the instance of another host (127.0.0.2, on its own
lease), so no container is needed except where the agent's enrolment is the point.  Service
addresses are in 127.43.0.0/16 (loopback).  Counters are cumulative over the module, so each
test compares the values before and after what it does.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flux._splice import HTTP_ERROR_RESPONSES
from flux.model import Host, HostRef, Instance, InstanceState, encode_record
from flux.store.keys import host_key, instance_key
from tests.support.docker_images import BUSYBOX_IMAGE, ensure_busybox_image
from tests.support.etcd_server import EtcdServer
from tests.support.fluxd_process import wait_until
from tests.support.http_backend import HttpBackend
from tests.support.http_streams import H2_PREFACE
from tests.support.nghttpd import nghttpd
from tests.support.processes import stop_process

HOST = "127.0.0.1"
REMOTE = "127.0.0.2"
HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
Labels = frozenset[tuple[str, str]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])



def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@dataclass
class Stack:
    etcd: EtcdServer
    backend: HttpBackend
    metrics_port: int
    chain: str
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    services: dict[str, str] = field(default_factory=dict)  # name -> VIP

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "ETCD_ADDRESS": self.etcd.endpoint}

    def fluxctl(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "flux.fluxctl", *args],
            env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def scrape_text(self) -> str:
        return get(f"http://{HOST}:{self.metrics_port}/metrics")[1]

    def scrape(self) -> dict[tuple[str, Labels], float]:
        samples = {}
        for family in text_string_to_metric_families(self.scrape_text()):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def total(self, name: str, **labels: str) -> float:
        """Sum of ``name``'s samples whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(
            value for (sample, have), value in self.scrape().items()
            if sample == name and wanted <= have
        )  # fmt: skip

    def forwarding(self, vip: str) -> bool:
        rules = subprocess.run(
            ["iptables", "-w", "-t", "nat", "-S", self.chain], capture_output=True, text=True
        ).stdout
        return f"-d {vip}/32" in rules and "DNAT" in rules


def _register_remote_instances(etcd: EtcdServer, services: dict[str, str]) -> None:
    """The backend as an instance of another host, on that host's lease."""
    lease = re.search(r"lease ([0-9a-f]+) granted", etcd.etcdctl("lease", "grant", "600"))
    assert lease is not None
    lease_id = lease.group(1)
    etcd.etcdctl("put", f"--lease={lease_id}", host_key(REMOTE),
                 encode_record(Host(address=REMOTE, version="test")))
    for service, address in services.items():
        instance = Instance(host=HostRef(address=REMOTE), address=address,
                            state=InstanceState.LIVE)
        etcd.etcdctl("put", f"--lease={lease_id}", instance_key(service, f"{service}-backend"),
                     encode_record(instance))


@pytest.fixture(scope="module")
def stack(etcd_server: EtcdServer) -> Iterator[Stack]:
    etcd_server.start()
    etcd_server.wipe()
    backend = HttpBackend()
    port = free_port()
    chain = "FLUXT" + secrets.token_hex(3).upper()
    args = ["-host-ip", HOST, "-bridge", "lo", "-chain", chain, "-host-ttl", "10",
            "-listen-prometheus", f"{HOST}:{port}",
            "-http-header-timeout", str(HEADER_TIMEOUT), "-http-idle-timeout", str(IDLE_TIMEOUT)]
    process = subprocess.Popen(
        [sys.executable, "-m", "flux", *args],
        env={**os.environ, "ETCD_ADDRESS": etcd_server.endpoint},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    s = Stack(etcd_server, backend, port, chain, process)
    assert process.stderr is not None
    stderr = process.stderr
    threading.Thread(target=lambda: s.lines.extend(line.rstrip() for line in stderr),
                     daemon=True).start()
    try:
        net = secrets.randbelow(200) + 1
        s.services = {"web": f"127.43.{net}.1", "timed": f"127.43.{net}.2"}
        for name, vip in s.services.items():
            s.fluxctl("service", name, "--address", f"{vip}:80", "-p", "http")
        _register_remote_instances(etcd_server, dict.fromkeys(s.services, backend.address))
        for vip in s.services.values():
            wait_until(lambda vip=vip: s.forwarding(vip) or process.poll() is not None, 20,
                       f"fluxd to forward {vip}")
            assert process.poll() is None, "\n".join(s.lines[-30:])
        yield s
    finally:
        stop_process(process, grace=30)
        subprocess.run([sys.executable, "-m", "flux", "cleanup", "-chain", chain, "-host-ip",
                        HOST], capture_output=True, timeout=60)
        backend.close()
        etcd_server.wipe()


def web(stack: Stack) -> str:
    return stack.services["web"]


def counts(stack: Stack, service: str = "web") -> dict[tuple[str, str], float]:
    """flux_http_total by (method, code) for one service."""
    out: dict[tuple[str, str], float] = {}
    for (name, labels), value in stack.scrape().items():
        d = dict(labels)
        if name == "flux_http_total" and d.get("service") == service:
            key = (d["method"], d["code"])
            out[key] = out.get(key, 0.0) + value
    return out


def delta(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]):
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
            if after.get(k, 0) != before.get(k, 0)}


# ---- real clients ----------------------------------------------------------------------------


def test_curl_reuses_one_connection_and_every_request_is_counted(stack: Stack) -> None:
    vip = web(stack)
    before, connections = counts(stack), stack.total("flux_connections_total", service="web")
    urls = [f"http://{vip}/", f"http://{vip}/empty", f"http://{vip}/nothing", f"http://{vip}/"]
    out = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-w", "%{http_code}\\n",
         *[arg for url in urls for arg in ("-o", "/dev/null", url)]],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()  # fmt: skip
    assert out == ["200", "204", "404", "200"]
    assert delta(before, counts(stack)) == {("GET", "200"): 2, ("GET", "204"): 1,
                                            ("GET", "404"): 1}
    # curl kept one connection for all four: counted once, with protocol http.
    assert stack.total("flux_connections_total", service="web", protocol="http") \
        == connections + 1


def test_http_client_methods_and_bodiless_and_chunked_responses(stack: Stack) -> None:
    before = counts(stack)
    conn = http.client.HTTPConnection(web(stack), 80, timeout=10)
    try:
        script = [
            ("GET", "/", None, {}, 200, b"hello from the backend\n"),
            ("HEAD", "/", None, {}, 200, b""),
            ("HEAD", "/chunked", None, {}, 200, b""),
            ("GET", "/chunked", None, {}, 200, b"one two three\n"),
            ("GET", "/notmodified", None, {}, 304, b""),
            ("GET", "/empty", None, {}, 204, b""),
            ("POST", "/continue", b"x" * 5000, {"Expect": "100-continue"}, 201,
             b"got 5000 bytes\n"),
            ("PUT", "/size?n=70000", b"y" * 100_000, {}, 200, b"x" * 70000),
            ("DELETE", "/", None, {}, 200, b"hello from the backend\n"),
            ("PATCH", "/nothing", b"{}", {}, 404, b"not found\n"),
        ]
        for method, path, body, headers, status, expected in script:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            assert (response.status, response.read()) == (status, expected), (method, path)
    finally:
        conn.close()
    assert delta(before, counts(stack)) == {
        ("GET", "200"): 2, ("HEAD", "200"): 2, ("GET", "304"): 1, ("GET", "204"): 1,
        ("POST", "201"): 1, ("PUT", "200"): 1, ("DELETE", "200"): 1, ("PATCH", "404"): 1,
    }


def test_pipelined_requests_are_answered_in_order_and_counted(stack: Stack) -> None:
    before = counts(stack)
    burst = b"".join(
        b"GET %s HTTP/1.1\r\nHost: web\r\n\r\n" % path for path in (b"/", b"/empty", b"/size?n=3")
    ) + b"GET /close HTTP/1.1\r\nHost: web\r\n\r\n"
    with socket.create_connection((web(stack), 80), timeout=10) as sock:
        sock.sendall(burst)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3})", received)
    assert statuses == [b"200", b"204", b"200", b"200"]
    assert b"\r\n\r\nxxxHTTP/1.1 200 OK\r\n" in received and received.endswith(b"\r\n\r\nbye\n")
    assert delta(before, counts(stack)) == {("GET", "200"): 3, ("GET", "204"): 1}


def test_a_pipeline_of_100_requests_is_answered_and_counted_whole(stack: Stack) -> None:
    # Deeper than the framer's ring of 32: fluxd reads on as responses free slots.
    before = counts(stack)
    burst = (b"GET / HTTP/1.1\r\nHost: web\r\n\r\n" * 99
             + b"GET /close HTTP/1.1\r\nHost: web\r\n\r\n")
    received, _ = _exchange_raw(web(stack), burst)
    assert re.findall(rb"HTTP/1\.1 (\d{3})", received) == [b"200"] * 100
    assert received.endswith(b"\r\n\r\nbye\n")
    wait_until(lambda: delta(before, counts(stack)) == {("GET", "200"): 100}, 5,
               f"100 exchanges counted, not {delta(before, counts(stack))}")


def aborted(stack: Stack, side: str) -> float:
    return stack.total("flux_http_aborted_total", service="web", side=side)


def test_a_response_cut_by_the_instance_or_the_client_is_counted_as_aborted(
    stack: Stack,
) -> None:
    before = counts(stack)
    by_instance, by_client = aborted(stack, "instance"), aborted(stack, "client")
    # The instance resets after half the body; fluxd resets the client (which may then lose
    # what it had not read yet).
    received, _ = _exchange_raw(web(stack), b"GET /cut?n=100000 HTTP/1.1\r\nHost: web\r\n\r\n")
    assert len(received) < 100_000
    wait_until(lambda: delta(before, counts(stack)) == {("GET", "aborted"): 1}, 5,
               f"the cut exchange counted, not {delta(before, counts(stack))}")
    assert aborted(stack, "instance") == by_instance + 1
    # A client that reads the head of a 20 MB download and leaves with a reset.
    with socket.create_connection((web(stack), 80), timeout=10) as sock:
        sock.sendall(b"GET /size?n=20000000 HTTP/1.1\r\nHost: web\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(lambda: aborted(stack, "client") == by_client + 1, 5, "the client's cut counted")
    assert delta(before, counts(stack)) == {("GET", "aborted"): 2}


def test_websocket_style_upgrade_relays_both_ways_afterwards(stack: Stack) -> None:
    before = counts(stack)
    with socket.create_connection((web(stack), 80), timeout=10) as sock:
        sock.sendall(b"GET /upgrade HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101 ")
        payload = os.urandom(1 << 20) + b"GET / HTTP/1.1\r\n\r\n not http any more"
        threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
        echoed = b""
        while len(echoed) < len(payload):
            chunk = sock.recv(1 << 16)
            assert chunk, "the upgraded connection ended early"
            echoed += chunk
        assert echoed == payload
    assert delta(before, counts(stack)) == {("GET", "101"): 1}


def test_wrk_load_is_counted_request_for_request(stack: Stack) -> None:
    before = counts(stack)
    out = subprocess.run(
        ["wrk", "-t1", "-c4", "-d1s", f"http://{web(stack)}/"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    made = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    assert made > 100
    counted = delta(before, counts(stack))
    # wrk stops counting at its deadline; up to one request per connection was still in
    # flight then, and fluxd saw it through.
    assert set(counted) == {("GET", "200")}
    assert made <= counted[("GET", "200")] <= made + 4


def test_quantiles_agree_with_the_client_and_count_matches(stack: Stack) -> None:
    vip = stack.services["timed"]
    client_us = []
    conn = http.client.HTTPConnection(vip, 80, timeout=10)
    try:
        for _ in range(10):
            started = time.perf_counter()
            conn.request("GET", "/slow?ms=50")
            response = conn.getresponse()
            response.read()
            client_us.append((time.perf_counter() - started) * 1e6)
    finally:
        conn.close()
    samples = stack.scrape()

    def value(name: str, **labels: str) -> float:
        want = set({"service": "timed", **labels}.items())
        (found,) = [v for (n, have), v in samples.items() if n == name and want <= have]
        return found

    assert value("flux_http_roundtrip_usec_count") == value("flux_http_total_usec_count") == 10
    assert value("flux_http_total", method="GET", code="200") == 10
    roundtrip_median = value("flux_http_roundtrip_usec", quantile="0.5")
    total_median = value("flux_http_total_usec", quantile="0.5")
    # The instance took at least 50 ms; fluxd saw no more than the client did (1 % precision).
    assert 50_000 <= roundtrip_median <= max(client_us) * 1.01
    assert roundtrip_median <= total_median <= max(client_us) * 1.01
    assert value("flux_http_roundtrip_usec_sum") <= sum(client_us)
    buckets = {dict(labels)["le"]: v for (n, labels), v in samples.items()
               if n == "flux_http_request_duration_seconds_bucket"
               and ("service", "timed") in labels}
    assert buckets["0.05"] == 0 and buckets["0.1"] == 10 and buckets["+Inf"] == 10


# ---- what fluxd answers itself ---------------------------------------------------------------


def _exchange_raw(vip: str, data: bytes, *, pause: float = 0.0) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection((vip, 80), timeout=10) as sock:
        sock.sendall(data)
        if pause:
            time.sleep(pause)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return received, time.monotonic() - started


def test_malformed_oversized_and_slow_requests_are_answered_by_fluxd(stack: Stack) -> None:
    vip = web(stack)
    rejected = {code: stack.total("flux_http_rejected_total", service="web", code=code)
                for code in ("400", "431", "408")}
    before = counts(stack)
    received, _ = _exchange_raw(vip, b"GET / HTTP/1.1\r\nHost: web\r\n\r\nGET /x HTTP/1.1\r\n"
                                     b"Host: web\r\nno colon here\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert received.endswith(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 12\r\nConnection: close\r\n\r\nBad Request\n")
    received, _ = _exchange_raw(vip, b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: "
                                + b"a" * 70_000 + b"\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 431 ")
    received, took = _exchange_raw(vip, b"GET / HTTP/1.1\r\nHost: w")
    assert received.startswith(b"HTTP/1.1 408 Request Timeout")
    assert HEADER_TIMEOUT <= took < HEADER_TIMEOUT + 2
    for code, was in rejected.items():
        assert stack.total("flux_http_rejected_total", service="web", code=code) == was + 1
    # Only the good request reached the instance and was counted as an exchange.
    assert delta(before, counts(stack)) == {("GET", "200"): 1}


def test_a_repeated_or_list_content_length_is_refused_with_400_and_counted(stack: Stack) -> None:
    vip = web(stack)
    was = stack.total("flux_http_rejected_total", service="web", code="400")
    before = counts(stack)
    for lengths in (b"Content-Length: 5, 5\r\n", b"Content-Length: 5\r\nContent-Length: 5\r\n"):
        received, _ = _exchange_raw(vip, b"POST / HTTP/1.1\r\nHost: web\r\n" + lengths
                                    + b"\r\nhello")
        assert received == HTTP_ERROR_RESPONSES[400]
    # The client sees the answer and the close before fluxd's completion is counted.
    wait_until(
        lambda: stack.total("flux_http_rejected_total", service="web", code="400") >= was + 2,
        5, "both 400s counted",
    )
    assert stack.total("flux_http_rejected_total", service="web", code="400") == was + 2
    assert delta(before, counts(stack)) == {}  # nothing reached the instance


def test_a_client_that_sends_nothing_is_closed_quietly_after_the_header_timeout(
    stack: Stack,
) -> None:
    vip = web(stack)
    was = stack.total("flux_http_rejected_total", service="web", code="408")
    with socket.create_connection((vip, 80), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(65536) == b""  # no 408: nothing was asked
        assert HEADER_TIMEOUT - 0.1 <= time.monotonic() - started < IDLE_TIMEOUT
    assert stack.total("flux_http_rejected_total", service="web", code="408") == was


def test_an_idle_keep_alive_connection_is_closed_but_a_slow_instance_is_not_idle(
    stack: Stack,
) -> None:
    vip = web(stack)
    with socket.create_connection((vip, 80), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed quietly by fluxd
        assert IDLE_TIMEOUT - 0.1 <= time.monotonic() - started < IDLE_TIMEOUT + 2
    with socket.create_connection((vip, 80), timeout=10) as sock:
        sock.sendall(b"GET /slow?ms=%d HTTP/1.1\r\nHost: web\r\n\r\n" % (IDLE_TIMEOUT * 1500))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


# ---- HTTP/2 with prior knowledge -------------------------------------------------------------

def test_http2_with_prior_knowledge_through_an_http_service_counts_every_stream(
    stack: Stack, tmp_path: Path
) -> None:
    (tmp_path / "index.html").write_text("over h2c\n")
    vip = f"127.43.{secrets.randbelow(200) + 1}.4"
    with nghttpd(tmp_path) as address:
        stack.fluxctl("service", "h2c", "--address", f"{vip}:80", "-p", "http")
        try:
            _register_remote_instances(stack.etcd, {"h2c": address})
            wait_until(lambda: stack.forwarding(vip), 20, "fluxd to forward the h2c service")
            # The preface and an empty SETTINGS frame in one write: the server's own SETTINGS
            # frame comes back (not one byte and EOF, as when the preface was read as
            # HTTP/1.x).
            with socket.create_connection((vip, 80), timeout=10) as sock:
                sock.sendall(H2_PREFACE + bytes.fromhex("000000040000000000"))
                header = b""
                while len(header) < 9 and (chunk := sock.recv(9 - len(header))):
                    header += chunk
                assert len(header) == 9 and header[3] == 4, header  # a SETTINGS frame
            # Fresh connections, each a new race between the client's bytes and the server's.
            curl = ["curl", "-sS", "--noproxy", "*", "--http2-prior-knowledge", "-o", "/dev/null",
                    "-w", "%{http_version} %{http_code}", f"http://{vip}/index.html"]
            answers = [subprocess.run(curl, capture_output=True, text=True, timeout=30).stdout
                       for _ in range(20)]
            assert answers == ["2 200"] * 20
            load = subprocess.run(
                ["h2load", "-n", "100", "-c", "20", "-m", "4", f"http://{vip}/index.html"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert "100 succeeded, 0 failed, 0 errored" in load.stdout, load.stdout
            # Observed as HTTP/2: every stream is one exchange (20 from curl, 100 from h2load).
            assert counts(stack, "h2c") == {("GET", "200"): 120.0}
        finally:
            stack.fluxctl("rm", "h2c")


# ---- the exposition, a Prometheus server, and containers enrolled by the agent -------------


def test_promtool_accepts_the_exposition(stack: Stack) -> None:
    text = stack.scrape_text()
    assert "flux_http_roundtrip_usec{" in text
    assert "flux_http_request_duration_seconds_bucket{" in text
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_prometheus_server_finds_fluxd_through_etcd_and_queries_the_counts(
    stack: Stack, tmp_path: Path
) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "the prometheus binary is missing (Debian package prometheus)"
    for _ in range(5):
        get(f"http://{web(stack)}/")
    # Discovery as README shows it: fluxctl writes the advertised targets for file_sd.
    targets = tmp_path / "flux-targets.json"
    targets.write_text(stack.fluxctl("targets", "-o", "file-sd"))
    assert json.loads(targets.read_text()) == [
        {"targets": [f"{HOST}:{stack.metrics_port}"], "labels": {}}
    ]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: flux\n    file_sd_configs:\n"
        f"      - files: ['{targets}']\n"
    )
    port = free_port()
    server = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={HOST}:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        expected = stack.total("flux_http_total", service="web")
        query = urllib.parse.quote('sum(flux_http_total{service="web",job="flux"})')
        answer: list = []

        def answered() -> bool:
            nonlocal answer
            with contextlib.suppress(OSError, ValueError, KeyError):
                body = json.loads(get(f"http://{HOST}:{port}/api/v1/query?query={query}")[1])
                answer = body["data"]["result"]
            return bool(answer) and float(answer[0]["value"][1]) == expected

        wait_until(answered, 45, f"Prometheus to report {expected} requests (last: {answer})")
    finally:
        stop_process(server, grace=20)


def test_a_busybox_container_enrolled_by_the_agent_is_the_individual(
    stack: Stack, tmp_path: Path
) -> None:
    ensure_busybox_image()
    vip = f"127.43.{secrets.randbelow(200) + 1}.3"
    tag = "flux-test-http-" + secrets.token_hex(3)
    stack.fluxctl("service", "box", "--address", f"{vip}:80", "-p", "http",
                  "--labels", f"http-test={tag}")
    (tmp_path / "index.html").write_text("from the box\n")
    cid = subprocess.run(
        ["docker", "run", "-d", "--label", "flux-test=http", "--label", f"http-test={tag}",
         "-v", f"{tmp_path}:/www:ro", "-p", "127.0.0.1::80",
         BUSYBOX_IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.strip()  # fmt: skip
    try:
        wait_until(lambda: stack.forwarding(vip), 20, "fluxd to forward the box service")
        for _ in range(3):
            assert get(f"http://{vip}/index.html") == (200, "from the box\n")
        assert get(f"http://{vip}/missing")[0] == 404
        by_code = {}
        for (name, labels), v in stack.scrape().items():
            d = dict(labels)
            if name == "flux_http_total" and d.get("service") == "box":
                assert d["individual"] == cid and d["dst"] == HOST and d["src"] == HOST
                by_code[d["code"]] = by_code.get(d["code"], 0) + v
        assert by_code == {"200": 3, "404": 1}
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=120)
        stack.fluxctl("rm", "box")


def test_fluxd_kept_serving_and_logged_nothing_alarming(stack: Stack) -> None:
    assert stack.process.poll() is None
    assert get(f"http://{HOST}:{stack.metrics_port}/healthz")[0] == 200
    assert not [line for line in stack.lines if "Traceback" in line or "ERROR" in line], \
        "\n".join(stack.lines[-40:])
