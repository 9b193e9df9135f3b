"""A fluxd process for tests, and helpers to look at what it did (iptables, etcd, HTTP).

Every fluxd here runs with ``-host-ip 127.0.0.1 -bridge lo`` and its own chain name; the
``fluxd_factory`` fixture (tests/conftest.py) starts them against the session's etcd and stops
them (and removes their chains) after the test.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping

from tests.support.etcd_server import EtcdServer
from tests.support.netns import netns_prefix

HOST = "127.0.0.1"
# nat: PREROUTING and OUTPUT; filter: FORWARD, INPUT and OUTPUT.
EXPECTED_JUMPS = ["FORWARD", "INPUT", "OUTPUT", "OUTPUT", "PREROUTING"]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.05)


def iptables_save() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout


class Fluxd:
    """A fluxd process whose stderr is collected line by line.

    By default it is this machine's host 127.0.0.1 on ``lo``; tests/support/multihost.py runs one
    per network namespace (``netns``) with that namespace's address and device.
    """

    def __init__(
        self,
        etcd_endpoint: str,
        *args: str,
        chain: str | None = None,
        host_ip: str = HOST,
        bridge: str = "lo",
        netns: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.chain = chain or "FLUXT" + secrets.token_hex(3).upper()
        self.host_ip = host_ip
        self.netns = netns
        self.args = ["-host-ip", host_ip, "-bridge", bridge, "-chain", self.chain, *args]
        self.env = {**os.environ, "ETCD_ADDRESS": etcd_endpoint, **(env or {})}
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> Fluxd:
        self.process = subprocess.Popen(
            [*netns_prefix(self.netns), sys.executable, "-m", "flux", *self.args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_logged(self, text: str, timeout: float = 15.0) -> None:
        wait_until(lambda: self.logged(text) or self.process.poll() is not None, timeout, text)
        assert self.logged(text), "\n".join(self.lines[-30:])

    def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        subprocess.run(
            [*netns_prefix(self.netns), sys.executable, "-m", "flux", "cleanup",
             "-chain", self.chain, "-host-ip", self.host_ip],
            capture_output=True,
            timeout=60,
        )


def chain_lines(chain: str) -> list[str]:
    return [line for line in iptables_save().splitlines() if chain in line]


def host_record(etcd: EtcdServer) -> dict | None:
    value = etcd.get(f"/weave-flux/host/{HOST}")
    return None if value is None else json.loads(value)


def docker(*args: str) -> str:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


# No proxy from the environment: requests must go straight to the loopback service address.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0) -> str:
    with _OPENER.open(url, timeout=timeout) as response:
        return response.read().decode()
