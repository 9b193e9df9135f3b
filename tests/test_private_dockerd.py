"""The private test engine itself: it runs inside the namespace it was given, a --net=host
container there listens in that namespace (not the machine's), and a stop leaves nothing."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netns import netns_prefix
from tests.support.private_dockerd import PrivateDockerd

pytestmark = pytest.mark.docker


@pytest.fixture
def netns() -> Iterator[str]:
    name = "fluxt-" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def listening(netns: str | None, port: int) -> bool:
    out = subprocess.run([*netns_prefix(netns), "ss", "-Hltn", f"sport = :{port}"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return bool(out.strip())


def test_engine_in_a_namespace_and_a_clean_stop(netns: str) -> None:
    engine = PrivateDockerd(netns=netns)
    try:
        engine.start()
        image = engine.load_image()
        port = 20000 + secrets.randbelow(20000)
        engine.docker("run", "-d", "--net=host", image, "httpd", "-f", "-p", f"127.0.0.1:{port}")
        for _ in range(100):
            if listening(netns, port):
                break
            time.sleep(0.05)
        assert listening(netns, port)
        assert not listening(None, port)
    finally:
        engine.stop()
    assert not engine.running
    assert not engine.workdir.exists()
    with open("/proc/self/mountinfo") as mounts:
        assert str(engine.workdir) not in mounts.read()


def ifindex(device: str) -> int:
    return int(open(f"/sys/class/net/{device}/ifindex").read())


def test_engine_in_the_root_namespace_leaves_docker0_alone() -> None:
    # dockerd --bridge=none deletes the namespace's docker0: the machine engine's bridge here.
    before = ifindex("docker0")
    engine = PrivateDockerd()
    try:
        engine.start()
        assert engine.docker("info", "--format", "{{.Name}}")
    finally:
        engine.stop()
    assert ifindex("docker0") == before
    assert not engine.workdir.exists()
    assert not Path(f"/sys/class/net/{engine.bridge}").exists()
