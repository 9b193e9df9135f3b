"""A private etcd for the test session: real server, free loopback ports, temporary data.

Fault tests stop and restart it on the same ports and data directory, so clients see an
outage and a recovery, not a different server.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.processes import stop_process

__all__ = ["EtcdServer", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """One etcd member listening on loopback only."""

    # What etcdctl runs under: tests/support/etcd_cluster.py's members put ``nsenter --net=...``
    # here.
    command_prefix: tuple[str, ...] = ()

    def __init__(self, data_dir: Path) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed: run `make test`, which installs etcd-server")
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.log_path = data_dir.parent / f"etcd-{self.client_port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start the member (again) and wait until it serves requests."""
        if self.running:
            return
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self._process = subprocess.Popen(
            [
                "etcd",
                "--name", "flux-test",
                "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.endpoint,
                "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"flux-test={peer}",
                "--log-level", "warn",
                # Automatic compaction stays off: fault tests compact explicitly.
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"etcd exited at start; see {self.log_path}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy within {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        """Stop the member (SIGTERM, then SIGKILL) and wait for it to exit."""
        if self._process is None:
            return
        stop_process(self._process)
        self._process = None

    def etcdctl(self, *args: str, check: bool = True) -> str:
        """Run etcdctl (v3 API) against this member and return its output."""
        result = subprocess.run(
            [*self.command_prefix, "etcdctl", f"--endpoints={self.endpoint}", "--dial-timeout=2s",
             *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def healthy(self) -> bool:
        try:
            self.etcdctl("endpoint", "health")
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def wipe(self) -> None:
        """Delete every key (between tests)."""
        self.etcdctl("del", "", "--from-key=true")

    def put(self, key: str, value: str | bytes) -> None:
        """Write one key through etcd's JSON gateway: any size (a command line holds at most
        128 KiB in one argument), and no etcdctl process."""
        raw = value.encode() if isinstance(value, str) else value
        encoded = {"key": key.encode(), "value": raw}
        body = json.dumps({k: base64.b64encode(v).decode() for k, v in encoded.items()}).encode()
        request = urllib.request.Request(f"{self.endpoint}/v3/kv/put", data=body, method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            response.read()

    def get(self, key: str) -> str | None:
        """The value at ``key``, or None."""
        out = self.etcdctl("get", key, "--print-value-only")
        return out[:-1] if out.endswith("\n") else (out or None)

    def keys(self, prefix: str = "/") -> list[str]:
        out = self.etcdctl("get", prefix, "--prefix", "--keys-only")
        return [line for line in out.splitlines() if line]
