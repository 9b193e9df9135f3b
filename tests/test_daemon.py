"""fluxd as a process: start-up, host lease, signals, and the whole path end to end; and
the daemon in-process, for how it supervises the components that follow the service watch.

Every fluxd here runs with ``-host-ip 127.0.0.1 -bridge lo`` and its own chain name, against
the session's private etcd; service addresses are in 127.42.0.0/16 (loopback), and instances
are containers publishing on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flux.config import load_or_exit
from flux.daemon import WATCH_COMPONENTS, WATCH_MAX_BACKOFF, Daemon, _build_plugins
from flux.model import Service
from flux.store import StoreUnavailable
from flux.store.etcd import EtcdStore
from flux.store.memory import MemoryStore
from tests.support.docker_images import BUSYBOX_IMAGE, ensure_busybox_image
from tests.support.etcd_server import EtcdServer, free_port
from tests.support.fluxd_process import (
    EXPECTED_JUMPS,
    HOST,
    Fluxd,
    chain_lines,
    docker,
    host_record,
    http_get,
    wait_until,
)


def test_bad_flag_exits_2_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flux", "-network-mode", "mesh"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "-network-mode" in result.stderr and "mesh" in result.stderr


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flux", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.startswith("fluxd version ")


def test_start_registers_host_and_sigterm_cleans_up(
    etcd: EtcdServer, fluxd_factory: Callable[..., Fluxd]
) -> None:
    daemon = fluxd_factory("-host-ttl", "30")
    wait_until(lambda: host_record(etcd) is not None, 15, "the host record")
    record = host_record(etcd)
    assert record is not None and record["address"] == HOST and record["version"]
    assert daemon.logged("fluxd version ")
    assert daemon.logged("effective configuration:")
    daemon.wait_logged("installed (nat and filter)")
    jumps = [line for line in chain_lines(daemon.chain) if line.startswith("-A ")]
    assert sorted(line.split()[1] for line in jumps) == EXPECTED_JUMPS
    # fluxctl sees the host.
    info = subprocess.run(
        [sys.executable, "-m", "flux.fluxctl", "info"],
        env={**os.environ, "ETCD_ADDRESS": etcd.endpoint},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith(f"HOSTS\n{HOST}\n")
    assert daemon.signal(signal.SIGTERM) == 0
    assert host_record(etcd) is None  # revoked, not left to expire
    assert chain_lines(daemon.chain) == []
    assert daemon.logged("fluxd stopped")


def test_sigkill_leaves_host_until_ttl_and_restart_leaves_one_set_of_rules(
    etcd: EtcdServer, fluxd_factory: Callable[..., Fluxd]
) -> None:
    daemon = fluxd_factory("-host-ttl", "2")
    daemon.wait_logged("installed (nat and filter)")
    wait_until(lambda: host_record(etcd) is not None, 15, "the host record")
    assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    assert host_record(etcd) is not None
    wait_until(lambda: host_record(etcd) is None, 10, "the lease to expire")
    assert chain_lines(daemon.chain) != []  # a crash leaves rules behind
    again = fluxd_factory("-host-ttl", "2", chain=daemon.chain)
    again.wait_logged("installed (nat and filter)")
    jumps = [line for line in chain_lines(daemon.chain) if line.startswith("-A ")]
    assert sorted(line.split()[1] for line in jumps) == EXPECTED_JUMPS
    assert again.signal(signal.SIGTERM) == 0
    assert chain_lines(daemon.chain) == []


def test_etcd_down_at_start_is_not_fatal(
    etcd: EtcdServer, fluxd_factory: Callable[..., Fluxd]
) -> None:
    etcd.stop()
    try:
        daemon = fluxd_factory("-host-ttl", "5")
        daemon.wait_logged("component lease failed", timeout=20)
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        etcd.start()
    wait_until(lambda: host_record(etcd) is not None, 40, "the host record after etcd came back")
    assert daemon.signal(signal.SIGTERM) == 0


class WatchFollowers:
    """A plugin whose components follow the service watch under the names fluxd's do, each
    noting when it first saw each service."""

    name = "watch-followers"

    def __init__(self, store: EtcdStore, names: Iterable[str]) -> None:
        self.store = store
        self.seen: dict[str, dict[str, float]] = {name: {} for name in names}

    def components(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        return [(name, functools.partial(self.follow, name)) for name in self.seen]

    async def follow(self, name: str) -> None:
        async for update in self.store.watch_services():
            for service in update.services:
                self.seen[name].setdefault(service, time.monotonic())
        raise StoreUnavailable("the service watch ended")

    async def stop_accepting(self) -> None:
        pass

    async def remove_rules(self) -> None:
        pass

    async def drain(self, grace: float) -> None:
        pass


async def test_the_watches_come_back_soon_after_a_long_etcd_outage(
    etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    # An outage longer than the watch's own retry window (1 s here, 15 s by default) hands the
    # watch to the supervisor, whose backoff (1, 2, 4, 8 ... s) once reached 8 s after a 6 s
    # outage and would have reached 30 s after a longer one: the balancer and the agent acted
    # on stale services for that long after etcd was back.
    caplog.set_level(logging.WARNING, logger="flux.supervise")
    store = EtcdStore([etcd.endpoint], timeout=1.0, watch_retry=1.0)
    writer = EtcdStore([etcd.endpoint], timeout=1.0)
    followers = WatchFollowers(store, sorted(WATCH_COMPONENTS))
    daemon = Daemon(
        settings=SimpleNamespace(host_ip=HOST, host_ttl=30, shutdown_grace=0.0),
        store=store,
        plugins=[followers],
    )
    running = asyncio.create_task(daemon.run())
    try:
        await writer.add_service("before", Service(address="127.42.0.1:80"))
        async with asyncio.timeout(10):
            while not all("before" in seen for seen in followers.seen.values()):
                await asyncio.sleep(0.05)

        await asyncio.to_thread(etcd.stop)
        try:
            await asyncio.sleep(6)
        finally:
            await asyncio.to_thread(etcd.start)
        await writer.add_service("after", Service(address="127.42.0.2:80"))
        written = time.monotonic()
        async with asyncio.timeout(30):
            while not all("after" in seen for seen in followers.seen.values()):
                await asyncio.sleep(0.05)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(running, 30)
        await writer.close()

    delays = {
        (match[1], float(match[2]))
        for match in re.finditer(r"component (\S+) failed: .*; restarting in ([\d.]+) s",
                                 caplog.text)
        if match[1] in WATCH_COMPONENTS  # the lease keeper has its own cap
    }
    assert {name for name, _ in delays} == WATCH_COMPONENTS, "each went to the supervisor"
    assert max(delay for _, delay in delays) <= WATCH_MAX_BACKOFF
    for name, seen in followers.seen.items():
        assert seen["after"] - written < WATCH_MAX_BACKOFF + 5, f"{name} saw the change late"


def test_the_watch_components_are_named_as_fluxd_names_them() -> None:
    # The cap goes by name: a component renamed in the agent or the balancer would lose it.
    parsed = load_or_exit(["-host-ip", HOST, "-bridge", "lo"], {})
    plugins = _build_plugins(parsed.settings, MemoryStore())
    names = {name for plugin in plugins for name, _ in plugin.components()}
    assert names >= WATCH_COMPONENTS


def test_cleanup_command_removes_leftovers(fluxd_factory: Callable[..., Fluxd]) -> None:
    daemon = fluxd_factory()
    daemon.wait_logged("installed (nat and filter)")
    daemon.signal(signal.SIGKILL)
    assert chain_lines(daemon.chain) != []
    result = subprocess.run(
        [sys.executable, "-m", "flux", "cleanup", "-chain", daemon.chain, "-host-ip", HOST],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert chain_lines(daemon.chain) == []


# -- end to end: container instances behind a floating address ------------------------------


@pytest.fixture
def web_containers(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    ensure_busybox_image()
    tag = "flux-test-e2e-" + secrets.token_hex(3)
    made: list[str] = []

    def run(name: str) -> str:
        site = tmp_path / name
        site.mkdir()
        (site / "index.html").write_text(name)
        cid = docker(
            "run", "-d", "--label", "flux-test=e2e", "--label", f"e2e={tag}",
            "-v", f"{site}:/www:ro", "-p", "127.0.0.1::80",
            BUSYBOX_IMAGE, "httpd", "-f", "-p", "80", "-h", "/www",
        )  # fmt: skip
        made.append(cid)
        return cid

    run.tag = tag  # type: ignore[attr-defined]
    yield run
    if made:
        subprocess.run(["docker", "rm", "-f", *made], capture_output=True, timeout=120)


def test_host_client_reaches_containers_through_the_floating_address(
    etcd: EtcdServer,
    fluxd_factory: Callable[..., Fluxd],
    web_containers: Callable[[str], str],
) -> None:
    vip = f"127.42.200.{secrets.randbelow(200) + 1}"
    metrics_port = free_port()
    daemon = fluxd_factory("-host-ttl", "10", "-listen-prometheus", f"{HOST}:{metrics_port}")
    daemon.wait_logged("installed (nat and filter)")
    tag = web_containers.tag  # type: ignore[attr-defined]
    fluxctl = [sys.executable, "-m", "flux.fluxctl"]
    env = {**os.environ, "ETCD_ADDRESS": etcd.endpoint}
    subprocess.run(
        [*fluxctl, "service", "web", "--address", f"{vip}:80", "--protocol", "http",
         "--labels", f"e2e={tag}"],
        env=env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip

    def status() -> dict[str, Any]:
        return dict(json.loads(http_get(f"http://{HOST}:{metrics_port}/status")))

    def web_row() -> dict[str, Any]:
        return next(row for row in status()["services"] if row["name"] == "web")

    # No instance yet: refused at once.
    wait_until(lambda: any(vip in line and "REJECT" in line for line in chain_lines(daemon.chain)))
    started = time.monotonic()
    with pytest.raises(OSError):
        http_get(f"http://{vip}/")
    assert time.monotonic() - started < 1.0
    ids = [web_containers(f"site{i}") for i in range(3)]
    wait_until(
        lambda: any(vip in line and "DNAT" in line for line in chain_lines(daemon.chain)), 15
    )

    def live_instances() -> int:
        out = subprocess.run(
            [*fluxctl, "query", "-s", "web", "--state", "live", "-q"],
            env=env, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        return len(out.split())

    wait_until(lambda: live_instances() == 3, 15, "three live instances")
    seen = {http_get(f"http://{vip}/") for _ in range(30)}
    assert seen == {"site0", "site1", "site2"}
    # /status: this fluxd, and the service with its instances and figures that move (the
    # history samples every 5 s).
    fluxd = status()["fluxd"]
    assert fluxd["host_ip"] == HOST and fluxd["uptime"] > 0
    assert fluxd["etcd"]["reachable"] is True and fluxd["etcd"]["endpoint"] == etcd.endpoint
    assert fluxd["docker"]["connected"] is True and fluxd["docker"]["last_reconcile"] > 0
    assert fluxd["engine"]["threads"] >= 1 and fluxd["engine"]["fds_used"] > 0
    row = web_row()
    assert row["state"] == "forwarding" and row["protocol"] == "http"
    assert row["instances_by_state"]["live"] == 3
    assert sorted(i["container_id"] for i in row["instances"]) == sorted(ids)
    assert {i["image"] for i in row["instances"]} == {BUSYBOX_IMAGE}
    assert {i["host"] for i in row["instances"]} == {HOST}
    # Traffic after the service's first sample (before it, it would be the baseline).
    wait_until(lambda: web_row()["figures"]["now"]["conn_rate"] is not None, 15, "a sample")
    assert {http_get(f"http://{vip}/") for _ in range(30)} == {"site0", "site1", "site2"}
    moved: list[dict[str, Any]] = []

    def request_rate_moved() -> bool:
        figures = web_row()["figures"]["now"]
        moved.append(figures)
        return bool((figures["req_rate"] or {}).get("2xx", 0) > 0)

    wait_until(request_rate_moved, 15, "the request rate to move")
    now = moved[-1]
    assert now["conn_rate"] > 0 and now["bytes_rate"] > 0
    assert 0 < now["p50"] <= now["p99"]
    history = json.loads(http_get(f"http://{HOST}:{metrics_port}/status/history"))
    assert any(
        (s["services"].get("web", {}).get("req_rate") or {}).get("2xx", 0) > 0
        for s in history["samples"]
    )
    # One instance dies in the middle of a request loop: no request fails.
    failures = 0
    for i in range(60):
        if i == 20:
            docker("kill", ids[1])
        try:
            http_get(f"http://{vip}/")
        except OSError:
            failures += 1
    assert failures == 0
    wait_until(lambda: live_instances() == 2, 15, "the dead instance to go")
    wait_until(
        lambda: ids[1] not in [i["container_id"] for i in web_row()["instances"]], 15,
        "the dead instance's row to go",
    )
    assert daemon.signal(signal.SIGTERM) == 0
    assert chain_lines(daemon.chain) == []
