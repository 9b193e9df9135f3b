"""The data path end to end through a real fluxd: containers, bulk data, spread, crashes, load.

Every fluxd here is a real process with its own chain name (``FLUXT<hex>``) against the
session's private etcd, and is removed afterwards (``python -m flux cleanup -chain ...``).

- Host clients use service addresses in 127.42.0.0/16 (loopback) with ``-bridge lo``.
- Container clients send through docker0, so that fluxd runs with ``-bridge docker0`` (its
  listeners bind on docker0's IPv4).  Their service addresses are in a /24 of the benchmarking
  range 198.18.0.0/15 that the test first makes *local* (``ip route add local <net> dev lo``)
  and always removes: a packet to such an address cannot leave the machine even if a rule is
  missing.
- Instances are busybox httpd containers publishing on 127.0.0.1 only (``-host-ip 127.0.0.1``,
  local mode), or TCP servers run by the test on 127.0.0.1 and registered through the store by
  "another host" (its own :class:`~flux.store.etcd.EtcdStore` and lease), which is faster than
  a container.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import ipaddress
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.docker_images import BUSYBOX_IMAGE, ensure_busybox_image
from tests.support.etcd_server import EtcdServer
from tests.support.fluxd_process import (
    EXPECTED_JUMPS,
    HOST,
    Fluxd,
    chain_lines,
    docker,
    http_get,
    wait_until,
)
from tests.support.other_host import OtherHost, listener_of, random_loopback_vip, rules_for
from tests.support.process_fds import fd_targets, proxied_sockets
from tests.support.relay_harness import receive_digest
from tests.support.spread import FALSE_FAILURE, min_count_bound

FLUXCTL = [sys.executable, "-m", "flux.fluxctl"]
# The /24s of 198.18.0.0/15 (benchmarking, RFC 2544) the container test may make local, in order
# of preference; one that overlaps any existing route is passed over.
LOCAL_RANGE_CANDIDATES = ("198.18.42.0/24", "198.19.42.0/24", "198.18.142.0/24", "198.19.142.0/24")


# -- helpers ----------------------------------------------------------------------------------


def fluxctl(etcd: EtcdServer, *args: str) -> str:
    result = subprocess.run(
        [*FLUXCTL, *args],
        env={**os.environ, "ETCD_ADDRESS": etcd.endpoint},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"fluxctl {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def live_instances(etcd: EtcdServer, service: str) -> int:
    return len(fluxctl(etcd, "query", "-s", service, "--state", "live", "-q").split())


def jumps(chain: str) -> list[str]:
    """The built-in chains that jump to ``chain`` (once per jump), sorted."""
    return sorted(
        line.split()[1]
        for line in chain_lines(chain)
        if line.startswith("-A ") and not line.startswith(f"-A {chain} ")
    )


def wget(vip: str, seconds: int = 5) -> str:
    """A busybox shell command that prints ``http://<vip>/``, bounded in time.

    busybox 1.35's static wget crashes (SIGSEGV) when given ``-T``, so ``timeout`` bounds it;
    the command must not be the container's PID 1 (PID 1 ignores the SIGTERM ``timeout``
    sends), so callers run it from ``sh -c`` with another command after it.
    """
    return f"timeout {seconds} wget -q -O - http://{vip}/"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def fluxd(etcd: EtcdServer) -> Iterator[Callable[..., Fluxd]]:
    """Start fluxd processes (``-bridge lo`` unless told); kill and clean them up after."""
    started: list[Fluxd] = []

    def make(*args: str, bridge: str = "lo", chain: str | None = None) -> Fluxd:
        daemon = Fluxd(etcd.endpoint, *args, chain=chain)
        daemon.args[daemon.args.index("-bridge") + 1] = bridge
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.stop()


class Containers:
    """busybox containers this test made: httpd instances and one-shot clients."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.tag = "flux-e2e-" + secrets.token_hex(3)
        self.made: list[str] = []

    def httpd(self, page: str, *labels: str) -> str:
        """An httpd serving ``page`` at ``/``, published on 127.0.0.1, labelled e2e=<tag>."""
        site = self.tmp_path / f"site-{page}"
        site.mkdir()
        (site / "index.html").write_text(page)
        label_args = [arg for label in labels for arg in ("--label", label)]
        cid = docker(
            "run", "-d", "--label", "flux-test=e2e", "--label", f"e2e={self.tag}", *label_args,
            "-v", f"{site}:/www:ro", "-p", "127.0.0.1::80",
            BUSYBOX_IMAGE, "httpd", "-f", "-p", "80", "-h", "/www",
        )  # fmt: skip
        self.made.append(cid)
        return cid

    def client(self, *command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in a fresh busybox container on docker0 and return how it ended."""
        name = "flux-e2e-client-" + secrets.token_hex(4)
        self.made.append(name)
        return subprocess.run(
            ["docker", "run", "--rm", "--name", name, "--label", "flux-test=e2e",
             BUSYBOX_IMAGE, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )  # fmt: skip

    def remove_all(self) -> None:
        if self.made:
            subprocess.run(["docker", "rm", "-f", *self.made], capture_output=True, timeout=120)


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[Containers]:
    ensure_busybox_image()
    made = Containers(tmp_path)
    try:
        yield made
    finally:
        made.remove_all()


def _overlapping_routes(network: ipaddress.IPv4Network) -> list[str]:
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    clashes = []
    for line in routes.splitlines():
        for token in line.split():
            if token == "default":
                break  # the default route is what local routes exist to beat
            try:
                other = ipaddress.ip_network(token, strict=False)
            except ValueError:
                continue
            if other.version == 4 and other.overlaps(network):
                clashes.append(line)
            break
    return clashes


@pytest.fixture
def local_range() -> Iterator[ipaddress.IPv4Network]:
    """A /24 of 198.18.0.0/15 routed as local (to lo) for the test's duration, then removed."""
    for candidate in LOCAL_RANGE_CANDIDATES:
        network = ipaddress.IPv4Network(candidate)
        if not _overlapping_routes(network):
            break
    else:
        raise AssertionError(
            f"every candidate range {LOCAL_RANGE_CANDIDATES} overlaps an existing route"
        )
    subprocess.run(
        ["ip", "route", "add", "local", str(network), "dev", "lo"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    try:
        probe = str(network[7])
        route = subprocess.run(
            ["ip", "route", "get", probe], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        # Safety first: nothing sent to this range may leave the machine.
        assert route.startswith(f"local {probe} "), route
        yield network
    finally:
        subprocess.run(
            ["ip", "route", "del", "local", str(network), "dev", "lo", "table", "local"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert not _overlapping_routes(network), f"the local route {network} is still there"


# -- 1. a container client through docker0 ---------------------------------------------------


def test_container_client_reaches_a_local_floating_address_through_docker0(
    etcd: EtcdServer,
    fluxd: Callable[..., Fluxd],
    containers: Containers,
    local_range: ipaddress.IPv4Network,
) -> None:
    served, refused = (str(local_range[i]) for i in random.sample(range(10, 250), 2))
    daemon = fluxd("-host-ttl", "10", bridge="docker0")
    daemon.wait_logged("installed (nat and filter)")
    fluxctl(
        etcd, "service", "web", "--address", f"{served}:80", "--labels", f"e2e={containers.tag}"
    )
    fluxctl(etcd, "service", "nobody", "--address", f"{refused}:80")
    wait_until(lambda: rules_for(daemon.chain, refused, "REJECT"), 15, "the REJECT rule")
    containers.httpd("through-docker0")
    wait_until(lambda: rules_for(daemon.chain, served, "DNAT"), 15, "the DNAT rule")
    # The listener is on docker0's address, where a container's DNAT'd packet is delivered.
    listener_ip, _ = listener_of(daemon.chain, served)
    docker0 = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", "docker0"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()[3].split("/")[0]  # fmt: skip
    assert listener_ip == docker0

    started = time.monotonic()
    got = containers.client("sh", "-c", f"set -e; for i in 1 2 3; do {wget(served)}; echo; done")
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["through-docker0"] * 3
    served_in = time.monotonic() - started

    # No instance: the container's connection is refused at once, not left to time out.
    started = time.monotonic()
    got = containers.client("sh", "-c", f"{wget(refused, seconds=30)}; exit $?")
    refused_in = time.monotonic() - started
    assert got.returncode != 0
    assert "refused" in got.stderr.lower(), got.stderr
    # "refused" is the proof; the time (container start-up included) only bounds it well below
    # the 30 s a dropped SYN would cost.
    assert refused_in < 20.0

    # A host process reaches the same address too (nat OUTPUT).
    assert http_get(f"http://{served}/") == "through-docker0"
    print(f"container client: 3 requests in {served_in:.2f} s, refusal in {refused_in:.2f} s")
    assert daemon.signal(signal.SIGTERM) == 0
    assert chain_lines(daemon.chain) == []


# -- 2. bulk data ------------------------------------------------------------------------------

GIB = 1 << 30
CHUNK = 1 << 20
OFFSETS = 1 << 16
BULK_DEADLINE = 60.0


def _send_stream(sock: socket.socket, seed: int, total: int) -> tuple[int, str]:
    """Send ``total`` pseudo-random bytes from PRNG ``seed``, then half-close; (count, sha256).

    Drawing every byte from the PRNG costs 2.2 s per GiB of GIL-held CPU, so the PRNG draws one
    block of random bytes and then, per chunk, where in that block the chunk starts: any lost,
    repeated or corrupted stretch still changes the digest, at the cost of a copy.
    """
    rng = random.Random(seed)
    block = memoryview(rng.randbytes(CHUNK + OFFSETS))
    digest = hashlib.sha256()
    sent = 0
    while sent < total:
        start = rng.randrange(OFFSETS)
        chunk = block[start : start + min(CHUNK, total - sent)]
        digest.update(chunk)
        sock.sendall(chunk)
        sent += len(chunk)
    sock.shutdown(socket.SHUT_WR)
    return sent, digest.hexdigest()



def test_one_gib_each_way_arrives_intact(
    fluxd: Callable[..., Fluxd], other_host: OtherHost
) -> None:
    vip = random_loopback_vip()
    daemon = fluxd("-host-ttl", "10")
    daemon.wait_logged("installed (nat and filter)")
    server = socket.create_server((HOST, 0))
    server.settimeout(BULK_DEADLINE)
    backend = f"{HOST}:{server.getsockname()[1]}"
    other_host.add_service("bulk", f"{vip}:9000")
    other_host.add_instance("bulk", "bulk-0", backend)
    wait_until(lambda: rules_for(daemon.chain, vip, "DNAT"), 15, "the DNAT rule")

    def serve() -> tuple[tuple[int, str], tuple[int, str]]:
        conn, _ = server.accept()
        with conn, concurrent.futures.ThreadPoolExecutor(1) as pool:
            conn.settimeout(BULK_DEADLINE)
            sending = pool.submit(_send_stream, conn, 2, GIB)
            received = receive_digest(conn)
            return received, sending.result(BULK_DEADLINE)

    started = time.monotonic()
    with server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        serving = pool.submit(serve)
        client = socket.create_connection((vip, 9000), timeout=BULK_DEADLINE)
        with client:
            sending = pool.submit(_send_stream, client, 1, GIB)
            client_received = receive_digest(client)
            client_sent = sending.result(BULK_DEADLINE)
        server_received, server_sent = serving.result(BULK_DEADLINE)
    elapsed = time.monotonic() - started
    print(f"1 GiB each way through fluxd in {elapsed:.1f} s")
    assert client_sent[0] == GIB and server_sent[0] == GIB
    assert server_received == client_sent
    assert client_received == server_sent
    assert elapsed < BULK_DEADLINE


# -- 3. spread over instances ----------------------------------------------------------------

SPREAD_REQUESTS = 150


def test_min_count_bound_matches_the_binomial_tail() -> None:
    # 3 * P(Bin(150, 1/3) < 23) = 5.4e-7 and < 24: 1.6e-6; with 90 requests (< 10: 7.5e-7,
    # < 11: 3.1e-6) the bound would be 11 %, too weak to call a spread even, hence 150.
    assert min_count_bound(SPREAD_REQUESTS, 3, FALSE_FAILURE) == 23
    assert min_count_bound(90, 3, FALSE_FAILURE) == 10
    assert min_count_bound(150, 3, 1.6e-6) == 24


def test_connections_spread_over_instances(
    etcd: EtcdServer, fluxd: Callable[..., Fluxd], containers: Containers
) -> None:
    vip = random_loopback_vip()
    daemon = fluxd("-host-ttl", "10")
    daemon.wait_logged("installed (nat and filter)")
    fluxctl(etcd, "service", "web", "--address", f"{vip}:80", "--labels", f"e2e={containers.tag}")
    pages = [f"site{i}" for i in range(3)]
    for page in pages:
        containers.httpd(page)
    wait_until(lambda: live_instances(etcd, "web") == 3, 20, "three live instances")
    wait_until(lambda: rules_for(daemon.chain, vip, "DNAT"), 15, "the DNAT rule")
    counts = Counter(http_get(f"http://{vip}/") for _ in range(SPREAD_REQUESTS))
    # Each request is a new connection and a uniform random pick: with a false-failure
    # probability below 1e-6, every instance gets at least `bound` of them.
    bound = min_count_bound(SPREAD_REQUESTS, 3, FALSE_FAILURE)
    assert bound >= 0.15 * SPREAD_REQUESTS
    print(
        f"{SPREAD_REQUESTS} connections over 3 instances: {sorted(counts.values())}, bound {bound}"
    )
    assert set(counts) == set(pages), counts
    assert min(counts.values()) >= bound, counts


# -- 4. SIGKILL, then restart ----------------------------------------------------------------


def test_sigkill_then_restart_leaves_one_set_of_rules_with_services(
    etcd: EtcdServer, fluxd: Callable[..., Fluxd], containers: Containers
) -> None:
    forwarding = {name: random_loopback_vip() for name in ("web-a", "web-b")}
    rejecting = {name: random_loopback_vip() for name in ("none-a", "none-b")}
    assert len(set(forwarding.values()) | set(rejecting.values())) == 4
    daemon = fluxd("-host-ttl", "2")
    daemon.wait_logged("installed (nat and filter)")
    for name, vip in forwarding.items():
        fluxctl(etcd, "service", name, "--address", f"{vip}:80", "--labels", f"svc={name}")
        containers.httpd(name, f"svc={name}")
    for name, vip in rejecting.items():
        fluxctl(etcd, "service", name, "--address", f"{vip}:80")

    def converged() -> bool:
        return all(rules_for(daemon.chain, vip, "DNAT") for vip in forwarding.values()) and all(
            rules_for(daemon.chain, vip, "REJECT") for vip in rejecting.values()
        )

    wait_until(converged, 20, "two DNAT and two REJECT rules")
    assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    left = [line for line in chain_lines(daemon.chain) if line.startswith(f"-A {daemon.chain} ")]
    assert len(left) == 4  # a crash leaves its rules behind
    # Its records go with its lease; the restarted fluxd enrols the containers again.
    wait_until(lambda: etcd.get(f"/weave-flux/host/{HOST}") is None, 10, "the lease to expire")

    again = fluxd("-host-ttl", "2", chain=daemon.chain)
    again.wait_logged("installed (nat and filter)")
    wait_until(converged, 20, "two DNAT and two REJECT rules after the restart")
    time.sleep(0.5)  # a duplicate would be added by a sync; give one the chance to happen
    for vip in forwarding.values():
        assert len(rules_for(daemon.chain, vip, "DNAT")) == 1, chain_lines(daemon.chain)
        assert rules_for(daemon.chain, vip, "REJECT") == []
    for vip in rejecting.values():
        assert len(rules_for(daemon.chain, vip, "REJECT")) == 1, chain_lines(daemon.chain)
        assert rules_for(daemon.chain, vip, "DNAT") == []
    rules = [line for line in chain_lines(daemon.chain) if line.startswith(f"-A {daemon.chain} ")]
    assert len(rules) == 4, rules
    assert jumps(daemon.chain) == EXPECTED_JUMPS
    # The rules point at the new listeners.
    for name, vip in forwarding.items():
        assert http_get(f"http://{vip}/") == name
    assert again.signal(signal.SIGTERM) == 0
    assert chain_lines(daemon.chain) == []


def test_restart_within_the_ttl_keeps_the_instances_after_the_old_lease_expires(
    etcd: EtcdServer, fluxd: Callable[..., Fluxd], containers: Containers
) -> None:
    vip = random_loopback_vip()
    daemon = fluxd("-host-ttl", "2")
    daemon.wait_logged("installed (nat and filter)")
    fluxctl(etcd, "service", "web", "--address", f"{vip}:80", "--labels", f"e2e={containers.tag}")
    containers.httpd("survivor")
    wait_until(lambda: live_instances(etcd, "web") == 1, 20, "the live instance")
    assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    # Restarted at once (as `--restart always` would): the crashed run's lease still holds the
    # instance record, which the new run must take over onto its own lease.
    again = fluxd("-host-ttl", "2", chain=daemon.chain)
    again.wait_logged("installed (nat and filter)")
    wait_until(lambda: rules_for(daemon.chain, vip, "DNAT"), 15, "the DNAT rule")
    # Outlive the crashed run's lease (TTL 2 s), then some.
    time.sleep(4.0)
    assert live_instances(etcd, "web") == 1
    assert rules_for(daemon.chain, vip, "DNAT"), chain_lines(daemon.chain)
    assert http_get(f"http://{vip}/") == "survivor"
    assert again.signal(signal.SIGTERM) == 0


# -- 5. many concurrent clients --------------------------------------------------------------

CLIENTS = 500
ROUNDS = 3
# Descriptors fluxd may hold above its idle baseline once the load is over: its etcd and Docker
# connections come and go.  A leak of one descriptor per proxied connection would be 500+.
FD_SLACK = 10


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(b"echo " + line)
            await writer.drain()
    finally:
        writer.close()


async def _round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes
) -> None:
    writer.write(message)
    await writer.drain()
    answer = await reader.readline()
    assert answer == b"echo " + message, (answer, message)


async def _unproxied(pid: int, ports: set[int], timeout: float = 15.0) -> None:
    """Wait until process ``pid`` holds no connection on ``ports``."""
    deadline = time.monotonic() + timeout
    while held := len(proxied_sockets(pid, ports)):
        assert time.monotonic() < deadline, f"fluxd still holds {held} proxied sockets"
        await asyncio.sleep(0.05)


async def _load(vip: str, port: int, pid: int, ports: set[int]) -> tuple[int, int, int]:
    """CLIENTS concurrent connections, ROUNDS round trips each.

    Returns the successes, and at the peak (every client connected and answered once) fluxd's
    descriptor count and its proxied sockets (on ``ports``).
    """
    barrier = asyncio.Barrier(CLIENTS + 1)
    release = asyncio.Event()

    async def client(i: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(vip, port)
            try:
                await _round_trip(reader, writer, f"{i}:0\n".encode())
                await barrier.wait()  # every connection is being relayed now
                await release.wait()
                for r in range(1, ROUNDS):
                    await _round_trip(reader, writer, f"{i}:{r}\n".encode())
            finally:
                writer.close()
                await writer.wait_closed()
        except BaseException:
            await barrier.abort()
            raise

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    peak = proxied = 0
    try:
        async with asyncio.timeout(60):
            try:
                await barrier.wait()
                peak = len(fd_targets(pid))
                proxied = len(proxied_sockets(pid, ports))
            except asyncio.BrokenBarrierError:
                pass
            release.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} clients failed, e.g. {failures[0]!r}"
    return len(results), peak, proxied


def test_many_concurrent_clients_all_succeed_and_no_descriptor_leaks(
    fluxd: Callable[..., Fluxd], other_host: OtherHost
) -> None:
    vip = random_loopback_vip()
    daemon = fluxd("-host-ttl", "10")
    daemon.wait_logged("installed (nat and filter)")
    assert daemon.process is not None
    pid = daemon.process.pid

    async def main() -> tuple[int, int, int, int, float]:
        server = await asyncio.start_server(_echo, HOST, 0, backlog=CLIENTS * 2)
        async with server:
            backend_port = server.sockets[0].getsockname()[1]
            await asyncio.to_thread(other_host.add_service, "echo", f"{vip}:7000")
            await asyncio.to_thread(
                other_host.add_instance, "echo", "echo-0", f"{HOST}:{backend_port}"
            )

            def forwarding() -> bool:
                return bool(rules_for(daemon.chain, vip, "DNAT"))

            await asyncio.to_thread(wait_until, forwarding, 15, "the DNAT rule")
            _, listener_port = listener_of(daemon.chain, vip)
            ports = {backend_port, listener_port}
            # Warm up (lazily made things exist from here on), then let fluxd go idle.
            for i in range(5):
                reader, writer = await asyncio.open_connection(vip, 7000)
                await _round_trip(reader, writer, f"warm{i}\n".encode())
                writer.close()
                await writer.wait_closed()
            await _unproxied(pid, ports)
            baseline = len(fd_targets(pid))
            started = time.monotonic()
            done, peak, proxied = await _load(vip, 7000, pid, ports)
            elapsed = time.monotonic() - started
            await _unproxied(pid, ports)
            return done, baseline, peak, proxied, elapsed

    done, baseline, peak, proxied, elapsed = asyncio.run(main())
    assert done == CLIENTS
    # Every connection was relayed at once: two sockets each in fluxd.
    assert proxied == 2 * CLIENTS
    wait_until(
        lambda: len(fd_targets(pid)) <= baseline + FD_SLACK,
        15,
        f"fluxd's descriptors to return to {baseline} (+{FD_SLACK})",
    )
    after = len(fd_targets(pid))
    print(
        f"{CLIENTS} clients x {ROUNDS} round trips in {elapsed:.2f} s; "
        f"fluxd descriptors idle {baseline}, peak {peak}, after {after}"
    )
    assert daemon.signal(signal.SIGTERM) == 0
