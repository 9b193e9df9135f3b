"""The backends and the proxies measured, each a real process on this machine.

Backends (shared by every subject, so each competes for the same two cores in the same way):

- HTTP: nginx, one worker, answering every request with a 100-byte body over keep-alive
  (``keepalive_requests`` raised: nginx 1.22 otherwise closes a connection after 1,000 requests).
- bulk: ``iperf3 -s``;
- HTTP/2 (only when the h2 workload runs): ``nghttpd --no-tls``, one worker, answering every
  request on h2c (HTTP/2 with prior knowledge) with a 300-byte file.
- the edge (only when an edge or sni workload runs): 20 more server blocks in the same nginx,
  one plain HTTP and one TLS port per service ``svc01.bench`` .. ``svc20.bench``, answering as
  the HTTP backend does; the TLS ones hold a wildcard certificate for ``*.bench`` (ECDSA P-256,
  made with openssl for the run).  Clients always ask for ``svc07.bench`` (``EDGE_NAME``): the
  router must look among 20 names, as a host map would.

Subjects, each with one front address per backend:

- ``direct``: the backends themselves (the ceiling);
- ``fluxd`` / ``fluxd-python``: a real fluxd (``python -m flux``) with the Cython splice engine,
  or with the pure-Python fallback relay (``-relay python``), each against its own private
  etcd; ``fluxd-1t`` is ``fluxd`` with ``-engine-threads 1`` (the others run fluxd's default,
  one engine thread per usable CPU), so what the engine gains from more threads shows, and
  ``fluxd-hash`` is ``fluxd`` with ``-engine-steer hash`` (new connections spread by the
  kernel's hash, threads not pinned; the default steers them by CPU).
  Services get floating addresses in 127.42.0.0/16 and the backends are registered as
  instances *of another host* (127.0.0.2, on that host's own lease), the way a remote fluxd's
  agent would write them, so neither Docker nor its userland proxy is in the path;
- ``haproxy-tcp`` / ``haproxy-splice`` / ``haproxy-tcp-2t``: HAProxy in ``mode tcp``, one thread
  without and with ``option splice-auto``, and two threads without splice;
- ``nginx``: nginx ``stream`` proxy, one worker;
- for HTTP services: ``fluxd-http`` (fluxd with the HTTP backend's service marked
  ``protocol http``, so its engine frames every exchange, and metrics served), ``haproxy-http``
  / ``haproxy-http-2t`` (HAProxy ``mode http``, one and two threads) and ``nginx-http`` (nginx
  ``proxy_pass`` with an upstream ``keepalive`` pool, one worker);
- for HTTP/2: every fluxd subject has a third service for the h2c backend (``protocol tcp``, or
  ``protocol http`` for ``fluxd-http``), and ``haproxy-h2`` is HAProxy ``mode http`` with HTTP/2
  on both sides (``proto h2`` on its bind and on its server), one thread;
- at the edge: ``fluxd-http`` also publishes 20 http services on one port at 127.0.0.1
  (``-publish-ip``), one per ``svcNN.bench`` host name, and ``fluxd`` 20 tcp services on
  another port, chosen by TLS server name (passthrough), and so do ``fluxd-http-base`` and
  ``fluxd-base`` when that build has published ports; their peers are ``haproxy-edge`` /
  ``haproxy-edge-2t`` (``mode http``, ``use_backend`` from a host map of 20 entries, 1 and 2
  threads), ``nginx-edge`` (20 ``server_name`` blocks, each with its upstream keep-alive pool)
  and ``haproxy-sni`` / ``haproxy-sni-2t`` (``mode tcp``, ``req.ssl_sni`` looked up in a map
  after ``tcp-request inspect-delay``);
- with ``--baseline DIR`` only: ``fluxd-base`` and ``fluxd-http-base``, the same two fluxd
  subjects run from another checkout (``PYTHONPATH=DIR/src``: its Python and its compiled
  engine), so a change to the engine is measured against the code before it in one run.

Every listener is on 127.0.0.1 (fluxd's on ``lo``'s address, reached through its DNAT rule)
with a backlog of 4,096, like fluxd's.  Configurations are written to a temporary directory,
every process runs in the foreground as a child of the suite and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.system import LOOPBACK, free_port, free_ports, process_tree

__all__ = [
    "BASELINE_SUBJECTS",
    "BODY",
    "EDGE_NAME",
    "EDGE_ONLY",
    "H2_BODY",
    "H2_ONLY",
    "SUBJECTS",
    "Backends",
    "Subject",
    "reported_engine_threads",
    "start_backends",
    "start_subject",
]

ROOT = Path(__file__).resolve().parent.parent
BODY = "x" * 100
H2_BODY = "x" * 300  # what nghttpd serves for "/"
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
HOST_IP = "127.0.0.1"
REMOTE_HOST = "127.0.0.2"  # the "other host" that owns the backend instances
START_TIMEOUT = 30.0
# Floating addresses are 127.42.<net>.1 and .2; one random <net> per run, the next ones for the
# other fluxd subjects.
_VIP_NET = 20 + secrets.randbelow(200)
_FLUXD_NETS = ("fluxd", "fluxd-python", "fluxd-http", "fluxd-1t", "fluxd-base", "fluxd-http-base",
               "fluxd-hash")

# name -> how the report labels it
SUBJECTS: dict[str, str] = {
    "direct": "direct",
    "fluxd": "fluxd",
    "fluxd-1t": "fluxd, 1 engine thread",
    "fluxd-hash": "fluxd, -engine-steer hash",
    "fluxd-python": "fluxd (Python relay)",
    "haproxy-tcp": "HAProxy tcp",
    "haproxy-splice": "HAProxy splice",
    "haproxy-tcp-2t": "HAProxy tcp, 2 threads",
    "nginx": "nginx stream",
    "fluxd-http": "fluxd (http service)",
    "haproxy-http": "HAProxy http",
    "haproxy-http-2t": "HAProxy http, 2 threads",
    "nginx-http": "nginx proxy_pass",
    "haproxy-h2": "HAProxy h2",
    "haproxy-edge": "HAProxy http, host map",
    "haproxy-edge-2t": "HAProxy http, host map, 2 threads",
    "nginx-edge": "nginx server_name",
    "haproxy-sni": "HAProxy tcp, req.ssl_sni",
    "haproxy-sni-2t": "HAProxy tcp, req.ssl_sni, 2 threads",
    # Only with --baseline: fluxd and its http service again, from another checkout's build.
    "fluxd-base": "fluxd, baseline build",
    "fluxd-http-base": "fluxd (http service), baseline build",
}
BASELINE_SUBJECTS = ("fluxd-base", "fluxd-http-base")
H2_ONLY = ("haproxy-h2",)  # subjects that serve HTTP/2 only (no HTTP/1.1, no bulk front)
# Subjects with only an edge front: 20 services by Host ("edge") or by TLS server name ("sni").
EDGE_ONLY = {
    "haproxy-edge": "edge",
    "haproxy-edge-2t": "edge",
    "nginx-edge": "edge",
    "haproxy-sni": "sni",
    "haproxy-sni-2t": "sni",
}
EDGE_SERVICES = 20
EDGE_NAMES = tuple(f"svc{index:02d}.bench" for index in range(1, EDGE_SERVICES + 1))
EDGE_NAME = EDGE_NAMES[6]  # the one every edge client asks for


class Child:
    """A foreground child process with its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self._log_start = 0  # where this run's output begins (the log outlives restarts)

    async def start(self) -> Child:
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def output(self) -> str:
        """What the current run of the process has written so far."""
        with contextlib.suppress(OSError), open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")
        return ""

    def logged(self, text: str) -> bool:
        """Whether the current run of the process has written ``text``."""
        return text in self.output()

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signal the process, wait up to ``timeout`` s, then kill it."""
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await asyncio.wait_for(self.process.wait(), 10)


async def wait_for(
    what: str,
    predicate: Callable[[], object],
    child: Child | None = None,
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll ``predicate`` (a callable) until true; fail with the child's log tail."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited while waiting for {what}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{child.log_tail()}" if child is not None else ""
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        await asyncio.sleep(0.1)


def _accepts(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False


# No proxy from the environment: requests go straight to the loopback address.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _serves_http(address: tuple[str, int]) -> bool:
    try:
        with _OPENER.open(f"http://{address[0]}:{address[1]}/", timeout=2.0) as response:
            return bool(response.read() == BODY.encode())
    except OSError:
        return False


def _serves_h2(address: tuple[str, int]) -> bool:
    """One h2c request (prior knowledge, as the h2 workload sends it) answered 2xx with the file."""
    try:
        result = subprocess.run(
            ["h2load", "-n", "1", "-c", "1", "-m", "1", "-N", "2s",
             f"http://{address[0]}:{address[1]}/"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return (
        "1 succeeded" in result.stdout
        and "status codes: 1 2xx" in result.stdout
        and f"{len(H2_BODY)}B ({len(H2_BODY)}) data" in result.stdout
    )


@dataclass
class Backends:
    """Where the HTTP, the bulk (iperf3) and the HTTP/2 (nghttpd, None: not started) backends
    listen."""

    http: tuple[str, int]
    bulk: tuple[str, int]
    h2: tuple[str, int] | None = None
    children: list[Child] = field(default_factory=list)
    # The edge services' backends, one per EDGE_NAMES entry (empty: not started).
    edge: list[tuple[str, int]] = field(default_factory=list)
    tls: list[tuple[str, int]] = field(default_factory=list)

    async def restart_bulk(self) -> None:
        """A fresh iperf3 server on the same port (after a run that left it confused)."""
        old = next(child for child in self.children if child.name == "backend-iperf3")
        await old.stop()
        await old.start()
        await wait_for("iperf3 to listen again", lambda: _accepts_quietly(old), old)


def _accepts_quietly(child: Child) -> bool:
    # iperf3 logs every connection that is not a test; look for the listening socket instead.
    port = int(child.argv[child.argv.index("-p") + 1])
    with open("/proc/net/tcp") as table:
        return any(
            line.split()[3] == "0A" and int(line.split()[1].rsplit(":", 1)[1], 16) == port
            for line in list(table)[1:]
        )


BACKEND_NGINX = """\
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {dir}/backend-nginx.pid;
error_log stderr error;
events {{ worker_connections 16000; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
    client_header_timeout 600s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "{body}"; }}
    }}
{edge}}}
"""

# One more server block per edge service: plain HTTP, or TLS with the wildcard certificate.
BACKEND_EDGE = """\
    server {{
        listen {host}:{port} backlog=4096{tls};
        location / {{ default_type text/plain; return 200 "{body}"; }}
    }}
"""
BACKEND_TLS = """ ssl;
        ssl_certificate {dir}/edge-cert.pem;
        ssl_certificate_key {dir}/edge-key.pem;
        ssl_session_cache off;
        ssl_session_tickets off"""


def _make_edge_certificate(workdir: Path) -> None:
    """A self-signed ECDSA P-256 certificate for ``*.bench`` (the edge TLS backends')."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=*.bench", "-addext", "subjectAltName=DNS:*.bench",
         "-keyout", str(workdir / "edge-key.pem"), "-out", str(workdir / "edge-cert.pem")],
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip


async def start_backends(
    stack: AsyncExitStack, workdir: Path, h2: bool = False, edge: bool = False
) -> Backends:
    """Start nginx (HTTP, and with ``edge`` the edge services' plain and TLS ports), iperf3
    (bulk) and, with ``h2``, nghttpd (h2c) on free loopback ports; stopped with ``stack``."""
    ports = free_ports(3 + (2 * len(EDGE_NAMES) if edge else 0))  # all distinct
    http_port, bulk_port, h2_port = ports[:3]
    edge_ports = ports[3 : 3 + len(EDGE_NAMES)] if edge else []
    tls_ports = ports[3 + len(EDGE_NAMES) :] if edge else []
    tls = BACKEND_TLS.format(dir=workdir)
    blocks = [
        BACKEND_EDGE.format(host=LOOPBACK, port=port, tls=secure, body=BODY)
        for ports, secure in ((edge_ports, ""), (tls_ports, tls))
        for port in ports
    ]
    if edge:
        _make_edge_certificate(workdir)
    conf = workdir / "backend-nginx.conf"
    conf.write_text(
        BACKEND_NGINX.format(
            dir=workdir, host=LOOPBACK, port=http_port, body=BODY, edge="".join(blocks)
        )
    )
    nginx = Child(
        "backend-nginx", ["nginx", "-e", "stderr", "-p", str(workdir), "-c", str(conf)], workdir
    )
    iperf = Child("backend-iperf3", ["iperf3", "-s", "-B", LOOPBACK, "-p", str(bulk_port)], workdir)
    backends = Backends((LOOPBACK, http_port), (LOOPBACK, bulk_port), children=[nginx, iperf])
    backends.edge = [(LOOPBACK, port) for port in edge_ports]
    backends.tls = [(LOOPBACK, port) for port in tls_ports]
    nghttpd = None
    if h2:
        docroot = workdir / "h2-docroot"
        docroot.mkdir()
        (docroot / "index.html").write_text(H2_BODY)
        nghttpd = Child(
            "backend-nghttpd",
            ["nghttpd", "--no-tls", f"--address={LOOPBACK}", "-d", str(docroot), str(h2_port)],
            workdir,
        )
        backends.h2 = (LOOPBACK, h2_port)
        backends.children.append(nghttpd)
    for child in backends.children:
        await child.start()
        stack.push_async_callback(child.stop)
    await wait_for("the HTTP backend", lambda: _serves_http(backends.http), nginx)
    if backends.tls:
        first = backends.tls[0]
        await wait_for("the TLS backends", lambda: _serves_named(first, tls=True), nginx)
    await wait_for("the iperf3 backend", lambda: _accepts_quietly(iperf), iperf)
    if nghttpd is not None:
        h2_backend = backends.h2
        assert h2_backend is not None
        await wait_for("the HTTP/2 backend", lambda: _serves_h2(h2_backend), nghttpd)
    return backends


def _serves_named(address: tuple[str, int], tls: bool) -> bool:
    """One request for ``EDGE_NAME`` (by Host, and with ``tls`` by TLS server name too)
    answered with the body."""
    request = f"GET / HTTP/1.1\r\nHost: {EDGE_NAME}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection(address, timeout=2.0) as raw:
            sock: socket.socket = raw
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(raw, server_hostname=EDGE_NAME)
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError:
        return False
    return answer.startswith(b"HTTP/1.1 200") and answer.endswith(BODY.encode())


@dataclass
class Subject:
    """One thing measured: where clients connect, and which processes to account."""

    name: str
    http: tuple[str, int]
    bulk: tuple[str, int]
    root_pid: int | None = None  # None: nothing in between (direct)
    h2: tuple[str, int] | None = None  # the HTTP/2 front (None: no HTTP/2 backend this run)
    # The published port of 20 services by Host, and the one of 20 by TLS server name (None:
    # this subject has none).
    edge: tuple[str, int] | None = None
    sni: tuple[str, int] | None = None
    # fluxd's engine threads as its configuration report gave them (None: not reported)
    engine_threads: int | None = None
    metrics: str | None = None  # fluxd's /metrics URL, when it serves one
    # Start the proxy afresh (same addresses): memory figures need a process that has not
    # pooled the memory of earlier runs.
    restart: Callable[[], Awaitable[None]] | None = None

    @property
    def label(self) -> str:
        return SUBJECTS[self.name]

    def pids(self) -> list[int]:
        return [] if self.root_pid is None else process_tree(self.root_pid)

    def front(self, kind: str) -> tuple[str, int]:
        """Where clients connect for ``kind``: http, bulk, h2, edge or sni."""
        if kind in ("h2", "edge", "sni"):
            address: tuple[str, int] | None = getattr(self, kind)
            if address is None:
                raise RuntimeError(f"{self.name} has no {kind} front (its backends not started)")
            return address
        return self.http if kind == "http" else self.bulk


# -- HAProxy and nginx --------------------------------------------------------------------------

HAPROXY = """\
global
    nbthread {threads}
    maxconn 8000
    # Two descriptors per pipe: the default (maxconn / 4 pipes) would not fit the 20,000 cap.
    maxpipes 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    maxconn 8000
    backlog 4096
{splice}
frontend http_in
    bind {host}:{http_front}
    default_backend http_out
backend http_out
    server http1 {host}:{http_port}
frontend bulk_in
    bind {host}:{bulk_front}
    default_backend bulk_out
backend bulk_out
    server bulk1 {host}:{bulk_port}
"""

HAPROXY_HTTP = """\
global
    nbthread {threads}
    maxconn 8000
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-request 10s
    timeout http-keep-alive 600s
    maxconn 8000
    backlog 4096
frontend http_in
    bind {host}:{http_front}
    default_backend http_out
backend http_out
    server http1 {host}:{http_port}
"""

# HTTP/2 on both sides: h2c with prior knowledge on the bind (as h2load speaks it) and to the
# server.  "http-reuse always" multiplexes every client's streams onto a few server connections
# (16 for 32 clients with 50 streams each: nghttpd allows 100 per connection); with the default
# ("safe") HAProxy 2.6 kept about a thousand server connections open for the same load, at a
# rate within the noise of a 2-second probe.
HAPROXY_H2 = """\
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    maxconn 8000
    backlog 4096
frontend h2_in
    bind {host}:{h2_front} proto h2
    default_backend h2_out
backend h2_out
    http-reuse always
    server h2 {host}:{h2_port} proto h2
"""

# nginx as an HTTP proxy (nginx-http, nginx-edge): one worker, its temporary paths, keep-alive.
NGINX_HTTP_TOP = """\
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {dir}/{name}.pid;
error_log stderr error;
events {{ worker_connections 16000; }}
http {{
    access_log off;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
"""

NGINX_HTTP = NGINX_HTTP_TOP + """\
    upstream backend {{
        server {host}:{http_port};
        keepalive 64;
        keepalive_requests 1000000000;
    }}
    server {{
        listen {host}:{http_front} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

NGINX_STREAM = """\
load_module {module};
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {dir}/{name}.pid;
error_log stderr error;
events {{ worker_connections 16000; }}
stream {{
    proxy_timeout 600s;
    tcp_nodelay on;
    server {{ listen {host}:{http_front} backlog=4096; proxy_pass {host}:{http_port}; }}
    server {{ listen {host}:{bulk_front} backlog=4096; proxy_pass {host}:{bulk_port}; }}
}}
"""


# The edge peers: 20 services on one port, by Host (HTTP) or by TLS server name (passthrough).
# HAProxy looks the name up in a map file of 20 lines (one per service, see _edge_map).
HAPROXY_EDGE = """\
global
    nbthread {threads}
    maxconn 8000
defaults
    mode {mode}
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    maxconn 8000
    backlog 4096
{extra_defaults}
frontend edge_in
    bind {host}:{front}
{choose}
{backends}"""
HAPROXY_EDGE_HTTP = """\
    option http-keep-alive
    timeout http-request 10s
    timeout http-keep-alive 600s"""
HAPROXY_CHOOSE_BY_HOST = """\
    use_backend %[req.hdr(host),field(1,:),lower,map({map})]"""
HAPROXY_CHOOSE_BY_SNI = """\
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend %[req.ssl_sni,lower,map({map})]"""

NGINX_EDGE = NGINX_HTTP_TOP + """\
{servers}}}
"""
NGINX_EDGE_SERVER = """\
    upstream edge{index} {{
        server {host}:{port};
        keepalive 64;
        keepalive_requests 1000000000;
    }}
    server {{
        listen {host}:{front}{backlog};
        server_name {hostname};
        location / {{
            proxy_pass http://edge{index};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


async def _start_edge_proxy(
    stack: AsyncExitStack, name: str, workdir: Path, backends: Backends
) -> Subject:
    """One of the edge peers (``EDGE_ONLY``): 20 services on one front port."""
    kind = EDGE_ONLY[name]
    targets = backends.edge if kind == "edge" else backends.tls
    if not targets:
        raise RuntimeError(f"{name}: the edge backends were not started")
    front = (LOOPBACK, free_port())
    conf = workdir / f"{name}.conf"
    if name == "nginx-edge":
        servers = "".join(
            NGINX_EDGE_SERVER.format(
                index=index,
                host=LOOPBACK,
                port=port,
                front=front[1],
                hostname=hostname,
                # Listen options go on the port's first server block only.
                backlog=" backlog=4096" if index == 0 else "",
            )
            for index, (hostname, (_ip, port)) in enumerate(zip(EDGE_NAMES, targets, strict=True))
        )
        conf.write_text(NGINX_EDGE.format(dir=workdir, name=name, servers=servers))
        argv = ["nginx", "-e", "stderr", "-p", str(workdir), "-c", str(conf)]
    else:
        map_file = workdir / f"{name}.map"
        map_file.write_text(
            "".join(f"{hostname} edge{index}\n" for index, hostname in enumerate(EDGE_NAMES))
        )
        choose = HAPROXY_CHOOSE_BY_HOST if kind == "edge" else HAPROXY_CHOOSE_BY_SNI
        conf.write_text(
            HAPROXY_EDGE.format(
                threads=2 if name.endswith("-2t") else 1,
                mode="http" if kind == "edge" else "tcp",
                extra_defaults=HAPROXY_EDGE_HTTP if kind == "edge" else "",
                host=LOOPBACK,
                front=front[1],
                choose=choose.format(map=map_file),
                backends="".join(
                    f"backend edge{index}\n    server s{index} {LOOPBACK}:{port}\n"
                    for index, (_ip, port) in enumerate(targets)
                ),
            )
        )
        argv = ["haproxy", "-db", "-f", str(conf)]
    child = Child(name, argv, workdir)
    subject = Subject(name, front, front, **{kind: front})  # type: ignore[arg-type]

    async def ready() -> None:
        subject.root_pid = child.pid
        await wait_for(
            f"{name} to serve {EDGE_NAME}", lambda: _serves_named(front, kind == "sni"), child
        )

    async def restart() -> None:
        await child.stop()
        await child.start()
        await ready()

    await child.start()
    stack.push_async_callback(child.stop)
    await ready()
    subject.restart = restart
    return subject


async def _start_config_proxy(
    stack: AsyncExitStack, name: str, workdir: Path, backends: Backends
) -> Subject:
    ports = {
        "host": LOOPBACK,
        "http_front": free_port(),
        "bulk_front": free_port(),
        "http_port": backends.http[1],
        "bulk_port": backends.bulk[1],
    }
    conf = workdir / f"{name}.conf"
    if name.endswith("-http") or name.endswith("-http-2t") or name in H2_ONLY:
        # HTTP-only proxies: their "bulk" front is the HTTP one (no bulk workload uses them).
        ports["bulk_front"] = ports["http_front"]
    h2_front = None
    if name in H2_ONLY:
        # HTTP/2 only: every front is the h2 one (only the h2 workload uses it).
        if backends.h2 is None:
            raise RuntimeError(f"{name}: no HTTP/2 backend was started")
        h2_front = (LOOPBACK, ports["http_front"])
        conf.write_text(
            HAPROXY_H2.format(host=LOOPBACK, h2_front=h2_front[1], h2_port=backends.h2[1])
        )
        child = Child(name, ["haproxy", "-db", "-f", str(conf)], workdir)
    elif name.startswith("haproxy-http"):
        threads = 2 if name.endswith("-2t") else 1
        conf.write_text(HAPROXY_HTTP.format(threads=threads, **ports))
        child = Child(name, ["haproxy", "-db", "-f", str(conf)], workdir)
    elif name == "nginx-http":
        conf.write_text(NGINX_HTTP.format(dir=workdir, name=name, **ports))
        child = Child(name, ["nginx", "-e", "stderr", "-p", str(workdir), "-c", str(conf)], workdir)
    elif name.startswith("haproxy"):
        threads = 2 if name.endswith("-2t") else 1
        splice = "    option splice-auto" if name == "haproxy-splice" else ""
        conf.write_text(HAPROXY.format(threads=threads, splice=splice, **ports))
        child = Child(name, ["haproxy", "-db", "-f", str(conf)], workdir)
    else:
        if not Path(NGINX_STREAM_MODULE).exists():
            raise RuntimeError(
                f"nginx stream module {NGINX_STREAM_MODULE} is missing: install libnginx-mod-stream"
                " (make bench does)"
            )
        conf.write_text(
            NGINX_STREAM.format(module=NGINX_STREAM_MODULE, dir=workdir, name=name, **ports)
        )
        child = Child(name, ["nginx", "-e", "stderr", "-p", str(workdir), "-c", str(conf)], workdir)
    await child.start()
    stack.push_async_callback(child.stop)
    subject = Subject(
        name, (LOOPBACK, ports["http_front"]), (LOOPBACK, ports["bulk_front"]), child.pid, h2_front
    )

    async def ready() -> None:
        if h2_front is not None:
            await wait_for(f"{name} to serve HTTP/2", lambda: _serves_h2(h2_front), child)
            return
        await wait_for(f"{name} to serve HTTP", lambda: _serves_http(subject.http), child)
        await wait_for(f"{name} to listen", lambda: _accepts(subject.bulk), child)

    async def restart() -> None:
        await child.stop()
        await child.start()
        subject.root_pid = child.pid
        await ready()

    await ready()
    subject.restart = restart
    return subject


# -- fluxd --------------------------------------------------------------------------------------


# In fluxd's "effective configuration" line.
_ENGINE_THREADS = re.compile(r"\bengine-threads=(\d+)\b")


def reported_engine_threads(log: str) -> int | None:
    """The engine threads fluxd's configuration report in ``log`` gives (None: no such field)."""
    found = _ENGINE_THREADS.search(log)
    return None if found is None else int(found.group(1))


def _chain_has_dnat(chain: str, vips: list[str]) -> bool:
    result = subprocess.run(
        ["iptables", "-w", "-t", "nat", "-S", chain],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return all(f"-d {vip}/32" in result.stdout and "DNAT" in result.stdout for vip in vips)


def _publishes(tree: Path | None) -> bool:
    """Whether the checkout ``tree`` has published ports shared by host name."""
    return tree is not None and (tree / "src/flux/balancer/hostrouter.py").exists()


# A service to define: its name, its spec's fields, and the backend its one instance is.
Definition = tuple[str, dict[str, object], tuple[str, int]]


@asynccontextmanager
async def _instances(endpoint: str, definitions: list[Definition]) -> AsyncIterator[None]:
    """Define the services and register each one's backend as another host's instance."""
    from flux.model import Host, HostRef, Instance, InstanceState, Service
    from flux.store.etcd import EtcdStore

    admin = EtcdStore(endpoint)
    remote = EtcdStore(endpoint)
    keeper = asyncio.create_task(remote.run_lease(60))
    try:
        await asyncio.wait_for(remote.wait_lease(), START_TIMEOUT)
        await remote.register_host(Host(address=REMOTE_HOST, version="bench"))
        for name, spec, (ip, port) in definitions:
            await admin.add_service(name, Service.model_validate(spec))
            await remote.add_instance(
                name,
                f"{name}-backend",
                Instance(
                    host=HostRef(address=REMOTE_HOST),
                    address=f"{ip}:{port}",
                    state=InstanceState.LIVE,
                ),
            )
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await keeper
        with contextlib.suppress(Exception):
            await asyncio.wait_for(remote.revoke_lease(), 5)
        for store in (admin, remote):
            with contextlib.suppress(Exception):
                await store.close()


def _edge_definitions(
    kind: str, protocol: str, backends: list[tuple[str, int]], port: int
) -> list[Definition]:
    """The 20 services published on ``port``, one per ``EDGE_NAMES`` host name."""
    return [
        (
            f"bench-{kind}-{index:02d}",
            {"protocol": protocol, "publish": port, "hostnames": [hostname]},
            backend,
        )
        for index, (hostname, backend) in enumerate(zip(EDGE_NAMES, backends, strict=True), 1)
    ]


async def _start_fluxd(
    stack: AsyncExitStack,
    name: str,
    workdir: Path,
    backends: Backends,
    vip_net: int,
    baseline: Path | None,
) -> Subject:
    sys.path.insert(0, str(ROOT))  # the test helper that runs a private etcd
    from tests.support.etcd_server import EtcdServer

    data = workdir / f"{name}-etcd"
    data.mkdir()
    etcd = EtcdServer(data)
    await asyncio.to_thread(etcd.start)
    stack.callback(etcd.stop)

    chain = "FLUXB" + secrets.token_hex(3).upper()
    relay = "python" if name == "fluxd-python" else "splice"
    http_protocol = "http" if name in ("fluxd-http", "fluxd-http-base") else "tcp"
    threads = 1 if name == "fluxd-1t" else None  # None: fluxd's default (the usable CPUs)
    metrics_port = free_port()
    env = {**os.environ, "ETCD_ADDRESS": etcd.endpoint}
    # The flags below decide, not whatever the caller's environment says.
    env.pop("FLUX_RELAY", None)
    env.pop("FLUX_ENGINE_THREADS", None)
    env.pop("FLUX_ENGINE_STEER", None)
    if name in BASELINE_SUBJECTS:
        if baseline is None:
            raise RuntimeError(f"{name}: no baseline checkout given (--baseline DIR)")
        # Ahead of the editable install on sys.path: fluxd, engine included, from that tree.
        env["PYTHONPATH"] = str(baseline / "src")
    argv = [sys.executable, "-m", "flux", "-host-ip", HOST_IP, "-bridge", "lo", "-chain", chain,
            "-host-ttl", "30", "-relay", relay]  # fmt: skip
    if threads is not None:
        argv += ["-engine-threads", str(threads)]
    if name == "fluxd-hash":
        argv += ["-engine-steer", "hash"]  # spread by the kernel's hash, threads not pinned
    # The edge services: fluxd-http publishes the 20 http ones, fluxd the 20 tls ones.
    edge_kind = {"fluxd-http": "edge", "fluxd": "sni", "fluxd-http-base": "edge",
                 "fluxd-base": "sni"}.get(name)  # fmt: skip
    if name in BASELINE_SUBJECTS and not _publishes(baseline):
        edge_kind = None  # a build from before published ports (issue 18)
    edge_backends = {"edge": backends.edge, "sni": backends.tls}.get(edge_kind or "", [])
    edge_front = (LOOPBACK, free_port()) if edge_backends else None
    if edge_front is not None:
        argv += ["-publish-ip", LOOPBACK]
    if http_protocol == "http":
        argv += ["-listen-prometheus", f"{LOOPBACK}:{metrics_port}"]
    child = Child(name, argv, workdir, env)

    async def stop_and_clean() -> None:
        await child.stop(signal.SIGTERM, timeout=30)
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "flux", "cleanup", "-chain", chain, "-host-ip", HOST_IP],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip

    async def boot() -> None:
        await child.start()
        await wait_for(
            f"{name} to install its chain",
            lambda: child.logged("installed (nat and filter)"),
            child,
        )
        if not child.logged(f"relay={relay}"):
            raise RuntimeError(f"{name}: fluxd does not report relay={relay} in its configuration")
        subject.engine_threads = reported_engine_threads(child.output())
        if threads is not None and subject.engine_threads != threads:
            raise RuntimeError(
                f"{name}: fluxd reports engine-threads={subject.engine_threads} in its "
                f"configuration, not {threads}"
            )

    vips = {"http": f"127.42.{vip_net}.1", "bulk": f"127.42.{vip_net}.2"}
    services = {"http": f"{vips['http']}:80", "bulk": f"{vips['bulk']}:5201"}
    subject = Subject(name, (vips["http"], 80), (vips["bulk"], 5201))
    if backends.h2 is not None:
        vips["h2"] = f"127.42.{vip_net}.3"
        services["h2"] = f"{vips['h2']}:80"
        subject.h2 = (vips["h2"], 80)
    if http_protocol == "http":
        subject.metrics = f"http://{LOOPBACK}:{metrics_port}/metrics"
    kinds = {"http": backends.http, "bulk": backends.bulk, "h2": backends.h2}
    definitions: list[Definition] = []
    for kind, address in services.items():
        backend = kinds[kind]
        assert backend is not None
        protocol = http_protocol if kind in ("http", "h2") else "tcp"
        definitions.append((f"bench-{kind}", {"address": address, "protocol": protocol}, backend))
    if edge_kind is not None and edge_front is not None:
        protocol = "http" if edge_kind == "edge" else "tcp"
        definitions += _edge_definitions(edge_kind, protocol, edge_backends, edge_front[1])
        setattr(subject, edge_kind, edge_front)

    async def ready() -> None:
        subject.root_pid = child.pid
        await wait_for(
            f"{name}'s DNAT rules", lambda: _chain_has_dnat(chain, list(vips.values())), child
        )
        await wait_for(
            f"{name} to serve HTTP on {services['http']}", lambda: _serves_http(subject.http), child
        )
        h2_front = subject.h2
        if h2_front is not None:
            await wait_for(
                f"{name} to serve HTTP/2 on {services['h2']}", lambda: _serves_h2(h2_front), child
            )
        if edge_front is not None:
            await wait_for(
                f"{name} to serve {EDGE_NAME} on its published port {edge_front[1]}",
                lambda: _serves_named(edge_front, edge_kind == "sni"),
                child,
            )

    async def restart() -> None:
        # The services and the other host's instances stay in etcd, as across a real restart.
        await stop_and_clean()
        await boot()
        await ready()

    stack.push_async_callback(stop_and_clean)
    await boot()
    await stack.enter_async_context(_instances(etcd.endpoint, definitions))
    await ready()
    subject.restart = restart
    return subject


async def start_subject(
    stack: AsyncExitStack,
    name: str,
    workdir: Path,
    backends: Backends,
    baseline: Path | None = None,
) -> Subject:
    """Start one subject (its processes are stopped, and fluxd's rules removed, with ``stack``).

    ``baseline`` is the checkout whose build the ``*-base`` subjects run.
    """
    if name == "direct":
        edge = backends.edge[EDGE_NAMES.index(EDGE_NAME)] if backends.edge else None
        sni = backends.tls[EDGE_NAMES.index(EDGE_NAME)] if backends.tls else None
        return Subject(name, backends.http, backends.bulk, h2=backends.h2, edge=edge, sni=sni)
    if name in EDGE_ONLY:
        return await _start_edge_proxy(stack, name, workdir, backends)
    if name.startswith("fluxd"):
        vip_net = _VIP_NET + _FLUXD_NETS.index(name)
        return await _start_fluxd(stack, name, workdir, backends, vip_net, baseline)
    return await _start_config_proxy(stack, name, workdir, backends)
