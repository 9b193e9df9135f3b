"""Several Docker hosts on one machine: network namespaces, a switch, etcd, dockerd, fluxd.

Layout (every name carries a random suffix, so concurrent sessions never meet)::

      switch namespace fluxsw-<hex>: bridge "fabric", 198.19.0.250-252/24,
      |                              the 3 etcd members (one per address)
      +-- h1 --veth-- eth0 198.19.0.1/24  host namespace fluxh1-<hex>: dockerd, fluxd
      +-- h2 --veth-- eth0 198.19.0.2/24  host namespace fluxh2-<hex>: dockerd, fluxd
      ...

Nothing has a default route, and no namespace forwards except a host whose containers' own
networks are routed on purpose (:meth:`Fabric.route_container_networks`), so every packet stays
inside namespaces this module created.  Service addresses are in :data:`VIP_RANGE`, which every
host namespace routes as *local* (to ``lo``): even with a rule missing nothing could leave.

Each host runs its own :class:`~tests.support.private_dockerd.PrivateDockerd` and its own fluxd
(``-host-ip 198.19.0.K -bridge eth0``: listeners bind to the veth's address, so other hosts can
reach them too).  Instances are busybox containers on ``--net=host`` (the host's namespace),
so an instance's address is the host's IP and its port.  Clients are sockets the test opens in
a host namespace (:func:`tests.support.netns.socket_in`), so a test drives and times them
directly; a client outside every host (of a published port) opens them in the switch namespace
(:meth:`Fabric.outside`).

The expensive parts (namespaces, engines, etcd) are built once by :meth:`Fabric.start` and
shared; :meth:`Fabric.reset` puts them back between tests (links up, every etcd member running,
no fluxd, no containers, no keys) and :meth:`Fabric.close` removes everything, also after a
failure.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.docker_images import BUSYBOX_IMAGE, ensure_busybox_image
from tests.support.etcd_cluster import EtcdCluster
from tests.support.fluxd_process import Fluxd, wait_until
from tests.support.netns import add_netns, delete_netns, netns_run, socket_in
from tests.support.private_dockerd import PrivateDockerd

__all__ = [
    "DEVICE",
    "ETCD_IPS",
    "METRICS_PORT",
    "TTL",
    "VIP_RANGE",
    "ClientLoop",
    "Fabric",
    "HostNode",
    "LoadResult",
    "Outside",
    "vip",
]

SUBNET = ipaddress.IPv4Network("198.19.0.0/24")
ETCD_IPS = ("198.19.0.250", "198.19.0.251", "198.19.0.252")
VIP_RANGE = ipaddress.IPv4Network("198.18.77.0/24")
DEVICE = "eth0"
METRICS_PORT = 9000
TTL = 3
# Low: a connect to a host whose link is down is never refused, it just times out, and the
# client waits that long before fluxd tries another instance.
CONNECT_TIMEOUT = 0.5
FLUXCTL = [sys.executable, "-m", "flux.fluxctl"]


def vip(n: int) -> str:
    """The ``n``-th service address of :data:`VIP_RANGE`."""
    return str(VIP_RANGE[n])


@dataclass
class LoadResult:
    """What a bounded client loop saw: bodies served (counted), failures (why), time taken."""

    served: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.served.values()) + len(self.failures)


class ClientLoop:
    """``workers`` threads on ``host`` sending GET / to ``address:port`` one after another
    (``pause`` between), ``count`` requests at most and for ``seconds`` at most; each request
    is bounded too (5 s).

    :meth:`quiet` holds new requests back and waits until none is in flight, so a test can cut
    a link between requests: one in flight when its instance's cable is pulled is lost whatever
    a router does, while every request sent after the cut must be served.
    """

    def __init__(self, host: HostNode | Outside, address: str, port: int, count: int,
                 seconds: float, workers: int = 4, pause: float = 0.0) -> None:
        self.host = host
        self.address = address
        self.port = port
        self.count = count
        self.seconds = seconds
        self.pause = pause
        self.result = LoadResult()
        self.slowest = 0.0
        self._lock = threading.Condition()
        self._issued = 0
        self._in_flight = 0
        self._held = False
        self._started = 0.0
        self._threads = [threading.Thread(target=self._work) for _ in range(workers)]

    def start(self) -> ClientLoop:
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> LoadResult:
        """End the loop early (no new request) and return what it saw."""
        with self._lock:
            self._issued = self.count
        return self.join()

    def join(self) -> LoadResult:
        for thread in self._threads:
            thread.join()
        self.result.seconds = time.monotonic() - self._started
        return self.result

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No request in flight inside the block (none is started either)."""
        with self._lock:
            self._held = True
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=10)
            assert self._in_flight == 0, "a request stayed in flight for 10 s"
        try:
            yield
        finally:
            with self._lock:
                self._held = False
                self._lock.notify_all()

    def _work(self) -> None:
        deadline = self._started + self.seconds
        while True:
            with self._lock:
                self._lock.wait_for(lambda: not self._held, timeout=10)
                if self._issued >= self.count or time.monotonic() >= deadline:
                    return
                self._issued += 1
                self._in_flight += 1
            sent = time.monotonic()
            try:
                body = self.host.http_get(self.address, self.port)
            except OSError as error:
                body, failure = None, f"{sent - self._started:.2f}s {error!r}"
            took = time.monotonic() - sent
            with self._lock:
                self._in_flight -= 1
                self.slowest = max(self.slowest, took)
                if body is None:
                    self.result.failures.append(failure)
                else:
                    self.result.served[body] += 1
                self._lock.notify_all()
            if self.pause:
                time.sleep(self.pause)


def _http_get(netns: str, address: str, port: int, timeout: float) -> str:
    """GET / from ``address:port`` from inside ``netns``; the body, or an OSError."""
    with socket_in(netns) as sock:
        sock.settimeout(timeout)
        sock.connect((address, port))
        sock.sendall(b"GET / HTTP/1.0\r\nHost: flux\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise OSError(f"HTTP status {status.decode(errors='replace')!r}")
    return body.decode()


class Outside:
    """A client outside every host: sockets in the switch namespace, as a machine on the
    hosts' network (a load balancer, a browser) would connect to a published port."""

    def __init__(self, fabric: Fabric) -> None:
        self.netns = fabric.switch

    def http_get(self, address: str, port: int, timeout: float = 5.0) -> str:
        return _http_get(self.netns, address, port, timeout)


class HostNode:
    """One Docker host: a namespace, its veth to the switch, a dockerd and (when started) a
    fluxd."""

    def __init__(self, fabric: Fabric, index: int) -> None:
        self.fabric = fabric
        self.index = index
        self.ip = str(SUBNET[index])
        self.netns = f"fluxh{index}-{fabric.suffix}"
        self.peer = f"h{index}"  # the veth's other end, in the switch namespace
        self.workdir = fabric.workdir / f"h{index}"
        self.workdir.mkdir()
        self.dockerd = PrivateDockerd(self.workdir / "docker", self.netns)
        self.fluxd: Fluxd | None = None
        self._sites = 0

    # -- set-up ---------------------------------------------------------------------------

    def create(self) -> None:
        """The namespace, its link to the switch, its address and the local service range."""
        add_netns(self.netns)
        netns_run(None, "ip", "link", "add", DEVICE, "netns", self.netns, "type", "veth",
                  "peer", "name", self.peer, "netns", self.fabric.switch)
        netns_run(None, "ip", "-n", self.fabric.switch, "link", "set", self.peer, "master",
                  Fabric.BRIDGE, "up")
        netns_run(None, "ip", "-n", self.netns, "addr", "add", f"{self.ip}/{SUBNET.prefixlen}",
                  "dev", DEVICE)
        netns_run(None, "ip", "-n", self.netns, "link", "set", DEVICE, "up")
        netns_run(None, "ip", "-n", self.netns, "route", "add", "local", str(VIP_RANGE),
                  "dev", "lo")
        route = netns_run(self.netns, "ip", "route", "get", vip(7)).stdout
        # Safety first: nothing sent to a service address may leave the namespace.
        assert route.startswith(f"local {vip(7)} "), route

    def start_engine(self) -> None:
        self.dockerd.start()
        self.dockerd.docker("load", "-q", "-i", str(self.fabric.image_archive))

    # -- fluxd ----------------------------------------------------------------------------

    def start_fluxd(self, *args: str) -> Fluxd:
        """Start this host's fluxd (TTL :data:`TTL`, metrics on :data:`METRICS_PORT`)."""
        if self.fluxd is not None:
            self.stop_fluxd()
        self.fluxd = Fluxd(
            self.fabric.etcd.endpoints,
            "-host-ttl", str(TTL),
            "-connect-timeout", str(CONNECT_TIMEOUT),
            "-listen-prometheus", f"{self.ip}:{METRICS_PORT}",
            *args,
            host_ip=self.ip,
            bridge=DEVICE,
            netns=self.netns,
            env={"DOCKER_HOST": self.dockerd.host},
        )
        return self.fluxd.start()

    def wait_fluxd_ready(self, timeout: float = 30.0) -> None:
        assert self.fluxd is not None
        self.fluxd.wait_logged("installed (nat and filter)", timeout)

    def kill_fluxd(self) -> None:
        """SIGKILL this host's fluxd: no goodbye, its lease and rules stay behind."""
        assert self.fluxd is not None and self.fluxd.process is not None
        self.fluxd.process.kill()
        self.fluxd.process.wait(timeout=10)

    def stop_fluxd(self) -> None:
        """SIGTERM (revokes the lease), SIGKILL if that hangs, then ``fluxd cleanup``."""
        daemon, self.fluxd = self.fluxd, None
        if daemon is None:
            return
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.process.wait(timeout=15)
        daemon.stop()

    # -- the network ----------------------------------------------------------------------

    def set_link(self, up: bool) -> None:
        """Bring this host's veth (both ends) up or down: a cable pulled or put back."""
        state = "up" if up else "down"
        netns_run(None, "ip", "-n", self.netns, "link", "set", DEVICE, state)
        netns_run(None, "ip", "-n", self.fabric.switch, "link", "set", self.peer, state)

    def iptables_save(self) -> str:
        return netns_run(self.netns, "iptables-save").stdout

    def chain_rules(self) -> list[str]:
        """The ``-A`` rules of this host's fluxd chain (not the jumps to it)."""
        assert self.fluxd is not None
        chain = self.fluxd.chain
        return [line for line in self.iptables_save().splitlines()
                if line.startswith(f"-A {chain} ")]

    def service_rules(self, address: str) -> list[str]:
        """The chain's rules for service address ``address`` (IP only)."""
        return [line for line in self.chain_rules() if f"-d {address}/32 " in line]

    # -- clients --------------------------------------------------------------------------

    def http_get(self, address: str, port: int, timeout: float = 5.0) -> str:
        """GET / from ``address:port`` from inside this host; the body, or an OSError."""
        return _http_get(self.netns, address, port, timeout)

    def load(self, address: str, port: int, count: int, seconds: float, workers: int = 4,
             pause: float = 0.0) -> LoadResult:
        """Run a :class:`ClientLoop` from this host to its end and return what it saw."""
        loop = ClientLoop(self, address, port, count, seconds, workers, pause)
        loop.start()
        return loop.join()

    def status(self) -> dict[str, Any]:
        """This host's fluxd ``/status`` document (from inside the host)."""
        with socket_in(self.netns) as sock:
            sock.settimeout(5.0)
            sock.connect((self.ip, METRICS_PORT))
            sock.sendall(b"GET /status HTTP/1.0\r\nHost: flux\r\n\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        body = b"".join(chunks).partition(b"\r\n\r\n")[2]
        document: dict[str, Any] = json.loads(body)
        return document

    def pool_addresses(self, service: str) -> list[str]:
        """The instance addresses this host's balancer holds for ``service`` (sorted)."""
        entry = self.status().get("balancer", {}).get("services", {}).get(service, {})
        return sorted(item["address"] for item in entry.get("instances", []))

    # -- instances ------------------------------------------------------------------------

    def site(self, page: str) -> Path:
        """A directory holding ``index.html`` = ``page``, for httpd to serve."""
        self._sites += 1
        path = self.workdir / f"site-{self._sites}"
        path.mkdir()
        (path / "index.html").write_text(page)
        return path

    def httpd(self, port: int, page: str, *labels: str, network: str | None = None) -> str:
        """A busybox httpd instance serving ``page``: on the host's namespace at ``port``
        (``--net=host``), or on Docker network ``network`` at ``port`` inside the container."""
        label_args = [arg for label in labels for arg in ("--label", label)]
        net = ["--net=host"] if network is None else ["--network", network]
        return self.dockerd.docker(
            "run", "-d", *net, *label_args, "-v", f"{self.site(page)}:/www:ro",
            BUSYBOX_IMAGE, "httpd", "-f", "-p", str(port), "-h", "/www",
        )  # fmt: skip

    def echo(self, port: int, *labels: str) -> str:
        """A busybox TCP echo server on the host's namespace at ``port``, one process per
        connection (``nc -ll -e cat``)."""
        label_args = [arg for label in labels for arg in ("--label", label)]
        return self.dockerd.docker(
            "run", "-d", "--net=host", *label_args,
            BUSYBOX_IMAGE, "nc", "-ll", "-p", str(port), "-e", "cat",
        )  # fmt: skip

    def network(self, name: str, subnet: str) -> None:
        """A user-defined bridge network of this host's engine (a bridge in its namespace)."""
        self.dockerd.docker("network", "create", "--driver", "bridge", "--subnet", subnet, name)

    def container_ip(self, container: str, network: str) -> str:
        return self.dockerd.docker(
            "inspect", "--format",
            f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}', container,
        )  # fmt: skip

    def listening(self, port: int) -> bool:
        out = netns_run(self.netns, "ss", "-Hltn", f"sport = :{port}").stdout
        return bool(out.strip())


class Fabric:
    """The switch namespace with its bridge and etcd cluster, and ``hosts`` host namespaces."""

    BRIDGE = "fabric"

    def __init__(self, hosts: int = 2) -> None:
        for tool in ("ip", "nsenter", "iptables-save", "dockerd", "etcd"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed: run `make test`")
        self.suffix = secrets.token_hex(3)
        # Short: unix socket paths under it must stay below 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="flux-mh-"))
        self.switch = f"fluxsw-{self.suffix}"
        self.image_archive = self.workdir / "busybox.tar"
        self.etcd = EtcdCluster(self.workdir / "etcd", ETCD_IPS, self.switch)
        self.hosts = [HostNode(self, index) for index in range(1, hosts + 1)]
        self._created: list[str] = []
        self._routes: list[tuple[str, str]] = []  # (namespace, subnet) routed across hosts

    def __getitem__(self, index: int) -> HostNode:
        """Host ``index``, counted from 1 like the addresses."""
        return self.hosts[index - 1]

    def outside(self) -> Outside:
        """A client in the switch namespace, outside every host."""
        return Outside(self)

    def start(self) -> None:
        """Build everything; engines and etcd start in parallel.  On failure, undo it all."""
        try:
            self._create_switch()
            for host in self.hosts:
                self._created.append(host.netns)
                host.create()
            ensure_busybox_image()
            subprocess.run(["docker", "save", "-o", str(self.image_archive), BUSYBOX_IMAGE],
                           check=True, capture_output=True, timeout=120)
            with concurrent.futures.ThreadPoolExecutor(len(self.hosts) + 1) as pool:
                jobs = [pool.submit(host.start_engine) for host in self.hosts]
                jobs.append(pool.submit(self.etcd.start))
                for job in jobs:
                    job.result()
        except BaseException:
            self.close()
            raise

    def _create_switch(self) -> None:
        self._created.append(self.switch)
        add_netns(self.switch)
        netns_run(self.switch, "ip", "link", "add", self.BRIDGE, "type", "bridge")
        for ip in ETCD_IPS:
            netns_run(self.switch, "ip", "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev",
                      self.BRIDGE)
        netns_run(self.switch, "ip", "link", "set", self.BRIDGE, "up")

    # -- between tests --------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the shared starting point: no fluxd, links up, every etcd member running,
        no containers, no keys."""
        self.stop_fluxds()
        for host in self.hosts:
            host.set_link(True)
        self.etcd.start()
        with concurrent.futures.ThreadPoolExecutor(len(self.hosts)) as pool:
            list(pool.map(lambda host: host.dockerd.remove_containers(), self.hosts))
        for host in self.hosts:
            host.dockerd.docker("network", "prune", "-f")
        for netns, net in self._routes:
            netns_run(netns, "ip", "route", "del", net, check=False)
        self._routes.clear()
        for host in self.hosts:
            netns_run(host.netns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        self.etcd.wipe()

    def start_fluxds(self, *args: str, hosts: Iterable[HostNode] | None = None) -> None:
        """Start every host's fluxd (together) and wait until each has its rules in place."""
        chosen = list(self.hosts if hosts is None else hosts)
        for host in chosen:
            host.start_fluxd(*args)
        for host in chosen:
            host.wait_fluxd_ready()

    def stop_fluxds(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(self.hosts)) as pool:
            list(pool.map(lambda host: host.stop_fluxd(), self.hosts))

    # -- etcd and fluxctl -----------------------------------------------------------------

    def fluxctl(self, *args: str) -> str:
        """Run fluxctl (from the switch namespace, where etcd is) and return its output."""
        result = subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{self.switch}", *FLUXCTL, *args],
            env={**os.environ, "ETCD_ADDRESS": self.etcd.endpoints},
            capture_output=True, text=True, timeout=60, check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"fluxctl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def host_keys(self) -> list[str]:
        """The host records in etcd (their addresses)."""
        prefix = "/weave-flux/host/"
        return sorted(key[len(prefix):] for key in self.etcd.keys(prefix))

    def instance_records(self, service: str) -> dict[str, dict[str, Any]]:
        """The instance records of ``service`` in etcd, by instance name."""
        prefix = f"/weave-flux/service/{service}/instances/"
        out = self.etcd.etcdctl("get", prefix, "--prefix")
        lines = out.splitlines()
        pairs = zip(lines[::2], lines[1::2], strict=True)
        return {key[len(prefix):]: json.loads(value) for key, value in pairs}

    def instance_addresses(self, service: str) -> list[str]:
        return sorted(record["address"] for record in self.instance_records(service).values())

    def wait_pools(self, service: str, addresses: list[str], timeout: float = 20.0,
                   hosts: Iterable[HostNode] | None = None) -> None:
        """Wait until every (chosen) host's balancer holds exactly ``addresses``."""
        want = sorted(addresses)
        for host in self.hosts if hosts is None else hosts:
            wait_until(lambda h=host: h.pool_addresses(service) == want, timeout,  # type: ignore[misc]
                       f"host {host.index}'s pool of {service} to be {want}")

    # -- container networks across hosts (global mode) ------------------------------------

    def route_container_networks(self, subnets: dict[int, list[str]]) -> None:
        """Make the container subnets of each host reachable from the others: the host
        forwards (inside its own namespace only), the others route those subnets to it."""
        for index, nets in subnets.items():
            netns_run(self[index].netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for other in self.hosts:
                if other.index != index:
                    for net in nets:
                        netns_run(other.netns, "ip", "route", "replace", net, "via",
                                  self[index].ip)
                        self._routes.append((other.netns, net))

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Remove everything, whatever state it is in; every step runs even if one fails."""
        steps: list[Callable[[], None]] = [self.stop_fluxds]
        steps += [host.dockerd.stop for host in self.hosts]
        steps.append(self.etcd.stop)
        steps += [lambda name=name: delete_netns(name) for name in reversed(self._created)]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as error:  # the rest must still be removed
                errors.append(error)
        self._created.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]
