"""fluxd as a process: start-up, host lease, signals, and the whole path end to end.

Every fluxd here runs with ``-host-ip 127.0.0.1 -bridge lo`` and its own chain name, against
the session's private etcd; service addresses are in 127.42.0.0/16 (loopback), and instances
are containers publishing on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.docker_images import BUSYBOX_IMAGE, ensure_busybox_image
from tests.etcd_server import EtcdServer
from tests.fluxd_process import (
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
    daemon = fluxd_factory("-host-ttl", "10")
    daemon.wait_logged("installed (nat and filter)")
    tag = web_containers.tag  # type: ignore[attr-defined]
    fluxctl = [sys.executable, "-m", "flux.fluxctl"]
    env = {**os.environ, "ETCD_ADDRESS": etcd.endpoint}
    subprocess.run(
        [*fluxctl, "service", "web", "--address", f"{vip}:80", "--labels", f"e2e={tag}"],
        env=env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
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
    assert daemon.signal(signal.SIGTERM) == 0
    assert chain_lines(daemon.chain) == []
