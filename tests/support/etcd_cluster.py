"""A three-member etcd cluster for fault tests: real members, a real quorum, real elections.

Members listen on the IPs the caller gives, either inside a network namespace the caller
created (``netns``: every member and every etcdctl runs under ``nsenter --net=...``, so no
client or peer traffic leaves that namespace) or, without one, on loopback addresses
(127.0.0.0/8 is all local, so 127.0.0.11, .12 and .13 work without configuration).

API (stable; other test modules import it)::

    cluster = EtcdCluster(tmp_path, ["198.19.0.250", "198.19.0.251", "198.19.0.252"], "ns")
    cluster.start()                   # all members, then wait until each one is healthy
    cluster.endpoints                 # "http://198.19.0.250:2379,..." (fluxd's ETCD_ADDRESS)
    cluster.leader()                  # index of the member that leads now
    cluster.move_leader(i)            # hand leadership to member i
    cluster.kill_member(i)            # SIGKILL; stop_member(i) is SIGTERM; start_member(i)
    cluster.pause_member(i)           # SIGSTOP (a hung member); resume_member(i), start() too
    cluster.wait_healthy()            # every running member answers (the cluster has quorum)
    cluster.etcdctl("get", "/", "--prefix")   # against every running member
    cluster.get(key), cluster.keys(prefix), cluster.wipe()
    cluster.stop()                    # every member; data stays until the directory goes

Each member is an :class:`EtcdMember`, an :class:`tests.support.etcd_server.EtcdServer` on a
given IP and port (optionally in a namespace), so a member also has the single server's helpers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.etcd_server import EtcdServer
from tests.support.netns import netns_prefix

__all__ = ["EtcdCluster", "EtcdMember", "netns_prefix"]

CLIENT_PORT = 2379
PEER_PORT = 2380
LOOPBACK_IPS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")


def _free_port_on(ip: str) -> int:
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


class EtcdMember(EtcdServer):
    """One member of an :class:`EtcdCluster` (start it through the cluster the first time)."""

    def __init__(
        self,
        name: str,
        ip: str,
        data_dir: Path,
        netns: str | None,
        client_port: int,
        peer_port: int,
    ) -> None:
        # The parent's constructor picks free loopback ports; a member's address is given.
        self.name = name
        self.ip = ip
        self.netns = netns
        self.command_prefix = tuple(netns_prefix(netns))
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.endpoint = f"http://{ip}:{client_port}"
        self.peer_url = f"http://{ip}:{peer_port}"
        self.log_path = data_dir.parent / f"etcd-{name}.log"
        self.initial_cluster = ""
        self.cluster_token = ""
        self._process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def spawn(self) -> None:
        """Start the member's process without waiting (a new cluster needs a quorum first)."""
        if self.running:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self._process = subprocess.Popen(
            [
                *netns_prefix(self.netns),
                "etcd",
                "--name", self.name,
                "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.endpoint,
                "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster,
                "--initial-cluster-token", self.cluster_token,
                "--initial-cluster-state", "new",
                "--log-level", "warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def start(self, timeout: float = 20.0) -> None:
        """Start the member (again) and wait until it serves requests (needs a quorum)."""
        self.spawn()
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"etcd member {self.name} is not running; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd member {self.name} not healthy within {timeout} s; see {self.log_path}"
                )
            time.sleep(0.1)

    def pause(self) -> None:
        """SIGSTOP: the member hangs, its sockets stay open and nothing answers."""
        if self._process is not None and not self.paused:
            self._process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused member."""
        if self._process is not None and self.paused:
            self._process.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL the member (a crash: no goodbye to its peers) and reap it."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait(timeout=10)
        self._process = None
        self.paused = False

    def stop(self) -> None:
        """Stop the member (SIGTERM, then SIGKILL); a paused one is resumed first."""
        self.resume()
        super().stop()


class EtcdCluster:
    """Three (or more) etcd members forming one cluster, in ``netns`` or on loopback.

    ``ips`` are the members' addresses (default: three loopback addresses).  In a namespace
    every member uses the standard ports 2379 (clients) and 2380 (peers); on loopback, free
    ports are picked so that concurrent sessions do not collide.
    """

    def __init__(
        self,
        base_dir: Path,
        ips: Sequence[str] = LOOPBACK_IPS,
        netns: str | None = None,
    ) -> None:
        base_dir.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        self.command_prefix = tuple(netns_prefix(netns))
        self.base_dir = base_dir
        self.members: list[EtcdMember] = []
        for index, ip in enumerate(ips):
            if netns is None:
                client_port, peer_port = _free_port_on(ip), _free_port_on(ip)
            else:
                client_port, peer_port = CLIENT_PORT, PEER_PORT
            self.members.append(
                EtcdMember(f"m{index}", ip, base_dir / f"m{index}", netns, client_port, peer_port)
            )
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"flux-test-{os.getpid()}-{base_dir.name}"
        for member in self.members:
            member.initial_cluster = initial
            member.cluster_token = token

    @property
    def endpoints(self) -> str:
        """Every member's client URL, comma-separated: the form fluxd's ETCD_ADDRESS takes."""
        return ",".join(member.endpoint for member in self.members)

    @property
    def endpoint(self) -> str:
        """The running members' client URLs: what :meth:`etcdctl` asks."""
        return ",".join(member.endpoint for member in self.members
                        if member.running and not member.paused)

    def start(self, timeout: float = 30.0) -> None:
        """Start every member that is not running (resume paused ones) and wait until all are
        healthy."""
        for member in self.members:
            member.resume()
            member.spawn()
        self.wait_healthy(timeout)

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL).  Data directories stay."""
        for member in self.members:
            member.stop()

    def start_member(self, index: int, timeout: float = 20.0) -> None:
        """Start one member again (on its old data) and wait until it serves."""
        self.members[index].start(timeout)

    def stop_member(self, index: int) -> None:
        """Stop one member cleanly (SIGTERM)."""
        self.members[index].stop()

    def kill_member(self, index: int) -> None:
        """SIGKILL one member."""
        self.members[index].kill()

    def pause_member(self, index: int) -> None:
        """SIGSTOP one member: it hangs (connections open, no answers) until resumed."""
        self.members[index].pause()

    def resume_member(self, index: int) -> None:
        """SIGCONT one paused member."""
        self.members[index].resume()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running member answers a quorum read."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            if member.running:
                member.wait_healthy(max(0.1, deadline - time.monotonic()))

    def status(self) -> list[dict[str, Any]]:
        """``etcdctl endpoint status`` of every running member (its JSON objects)."""
        out = self.etcdctl("endpoint", "status", "-w", "json", check=False)
        try:
            parsed = json.loads(out) if out.strip() else []
        except json.JSONDecodeError:
            return []
        return parsed if isinstance(parsed, list) else []

    def leader(self, timeout: float = 10.0) -> int:
        """The index of the member that leads now (waits for an election to finish)."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.status():
                status = entry.get("Status", {})
                if status.get("leader") and status.get("header", {}).get("member_id") == status[
                    "leader"
                ]:
                    for index, member in enumerate(self.members):
                        if member.endpoint == entry.get("Endpoint"):
                            return index
            if time.monotonic() > deadline:
                raise RuntimeError(f"no etcd leader within {timeout} s")
            time.sleep(0.1)

    def move_leader(self, index: int, timeout: float = 10.0) -> None:
        """Hand leadership to member ``index`` (``etcdctl move-leader``) and wait for it."""
        current = self.leader(timeout)
        if current == index:
            return
        ids = {entry.get("Endpoint"): entry.get("Status", {}).get("header", {}).get("member_id")
               for entry in self.status()}
        member_id = ids.get(self.members[index].endpoint)
        if not member_id:
            raise RuntimeError(f"etcd member {self.members[index].name} is not running")
        self.members[current].etcdctl("move-leader", f"{int(member_id):x}")
        deadline = time.monotonic() + timeout
        while self.leader(timeout) != index:
            if time.monotonic() > deadline:
                raise RuntimeError(f"leadership did not move to {self.members[index].name}")
            time.sleep(0.1)

    # The single server's helpers run etcdctl under self.command_prefix against self.endpoint,
    # which here are the namespace and every running member.
    etcdctl = EtcdServer.etcdctl
    get = EtcdServer.get
    keys = EtcdServer.keys
    wipe = EtcdServer.wipe
