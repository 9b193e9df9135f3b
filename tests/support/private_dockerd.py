"""A dockerd of a test's own, optionally inside a network namespace the test created.

The engine has its own data root, exec root, pid file, socket and containerd (dockerd starts
one under its exec root) and touches no host networking: no default bridge, no iptables or
ip6tables rules, no IP forwarding or masquerading.  Containers run with ``--net=host``, which
here means the namespace the engine runs in.  The machine's engine is used only to build the
busybox test image (tests/support/docker_images.py), which :meth:`PrivateDockerd.load_image`
copies in.

API (stable; other test modules import it)::

    engine = PrivateDockerd(workdir, netns="fluxh1-ab12cd")   # netns=None: the root namespace
    engine.start()                    # waits until `docker info` answers
    engine.load_image()               # the busybox test image, copied from the main engine
    engine.docker("run", "-d", "--net=host", image, "httpd", "-f", "-p", "8080")
    engine.host                       # "unix:///.../docker.sock": DOCKER_HOST for fluxd
    engine.restart()                  # the engine only (with live_restore, containers stay)
    engine.stop()                     # containers removed, engine stopped, mounts and roots gone

The network namespace is entered with ``nsenter --net`` only: ``ip netns exec`` also remounts
/sys, which hides the cgroup mount dockerd needs.

``--bridge=none`` is used only inside a namespace: with it dockerd *deletes* any interface
called ``docker0`` in its namespace (Moby's ``removeDefaultBridgeInterface``), which in the root
namespace is the machine's engine's bridge.  In the root namespace the engine gets a bridge of
its own instead (``fxd<hex>``, a link-local /30, no ports, deleted at stop).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.docker_images import BUSYBOX_IMAGE, ensure_busybox_image
from tests.support.netns import netns_prefix
from tests.support.processes import stop_process

__all__ = ["PrivateDockerd"]

# A unix socket's path holds at most 107 bytes.
_MAX_SOCKET_PATH = 100


class PrivateDockerd:
    """One private Docker engine under ``workdir`` (a new temporary directory if None)."""

    def __init__(
        self,
        workdir: Path | None = None,
        netns: str | None = None,
        *,
        live_restore: bool = False,
    ) -> None:
        if shutil.which("dockerd") is None or shutil.which("docker") is None:
            raise RuntimeError("dockerd and the docker CLI are not installed: run `make test`")
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="flux-dockerd-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.netns = netns
        self.live_restore = live_restore
        self.data_root = workdir / "data"
        self.exec_root = workdir / "exec"
        self.socket = workdir / "docker.sock"
        if len(str(self.socket)) > _MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long for a unix socket: {self.socket}")
        self.host = f"unix://{self.socket}"
        self.log = workdir / "dockerd.log"
        # Its own containerd namespace too, so nothing is shared with another engine's.
        self.namespace = "fluxtest-" + secrets.token_hex(3)
        # See the module docstring: never --bridge=none in the root namespace.
        self.bridge = "none" if netns is not None else "fxd" + self.namespace[-6:]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start the engine and wait until it answers."""
        if self.running:
            return
        if self.bridge != "none":
            self._create_bridge()
        argv = [
            *netns_prefix(self.netns),
            "dockerd",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.workdir / "dockerd.pid"),
            "-H", self.host,
            f"--bridge={self.bridge}",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--containerd-namespace", self.namespace,
            "--containerd-plugins-namespace", self.namespace + "-plugins",
        ]
        if self.live_restore:
            argv.append("--live-restore")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"the private dockerd exited at start; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the private dockerd not ready within {timeout} s; "
                                   f"see {self.log}")
            time.sleep(0.1)

    def _create_bridge(self) -> None:
        if Path(f"/sys/class/net/{self.bridge}").exists():
            return
        # Link-local and never up (no ports), so it routes nothing; 169.254.169.0/24 is left
        # alone (cloud metadata lives there).
        third = 1 + secrets.randbelow(160)
        for argv in (
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", f"169.254.{third}.1/30", "dev", self.bridge],
        ):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)

    def _delete_bridge(self) -> None:
        if self.bridge != "none" and Path(f"/sys/class/net/{self.bridge}").exists():
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30,
                           check=False)

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        result = subprocess.run(
            ["docker", "-H", self.host, "version", "--format", "{{.Server.Version}}"],
            capture_output=True, timeout=30, check=False,
        )
        return result.returncode == 0

    def docker(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        """Run the docker CLI against this engine and return its stripped output."""
        result = subprocess.run(
            ["docker", "-H", self.host, *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def load_image(self, tag: str = BUSYBOX_IMAGE) -> str:
        """Build the busybox test image in the machine's engine and copy it into this one."""
        ensure_busybox_image(tag)
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
        assert save.stdout is not None
        loaded = subprocess.run(
            ["docker", "-H", self.host, "load", "-q"],
            stdin=save.stdout, capture_output=True, text=True, timeout=120, check=False,
        )
        save.stdout.close()
        if save.wait(timeout=60) != 0 or loaded.returncode != 0:
            raise RuntimeError(f"copying {tag} into the private dockerd failed: "
                               f"{loaded.stderr.strip()}")
        return tag

    def remove_containers(self) -> None:
        """Remove every container of this engine (running or not)."""
        if not self.running:
            return
        ids = self.docker("ps", "-aq", check=False).split()
        if ids:
            self.docker("rm", "-f", "-v", *ids, check=False)

    def terminate(self) -> None:
        """Stop the engine process only (SIGTERM, then SIGKILL); containers are left alone."""
        if self.process is None:
            return
        stop_process(self.process, grace=30)
        self.process = None

    def restart(self, timeout: float = 60.0) -> None:
        """Stop the engine and start it again on the same roots (containers survive only with
        ``live_restore``)."""
        self.terminate()
        self.start(timeout)

    def unmount(self) -> None:
        """Unmount whatever the engine left mounted under its roots, deepest first."""
        roots = (f"{self.data_root}/", f"{self.exec_root}/")
        for _ in range(3):
            with open("/proc/self/mountinfo") as mounts:
                points = {line.split()[4] for line in mounts}
            left = sorted((p for p in points if p.startswith(roots) or p + "/" in roots),
                          key=len, reverse=True)
            if not left:
                return
            for point in left:
                result = subprocess.run(["umount", point], capture_output=True, timeout=30,
                                        check=False)
                if result.returncode != 0:
                    # Busy (a shim still exiting): detach it now, the kernel frees it later.
                    subprocess.run(["umount", "-l", point], capture_output=True, timeout=30,
                                   check=False)

    def stop(self) -> None:
        """Clean stop: containers removed, engine stopped, mounts undone, roots deleted."""
        try:
            self.remove_containers()
        finally:
            self.terminate()
            self.unmount()
            self._delete_bridge()
            for root in (self.data_root, self.exec_root):
                shutil.rmtree(root, ignore_errors=True)
            self.socket.unlink(missing_ok=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
