"""What a process's descriptors are, from /proc: to count them and find leaks."""

from __future__ import annotations

import os

__all__ = ["fd_targets", "proxied_sockets"]


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of process ``pid`` points at (vanished ones left out)."""
    out = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out.append(os.readlink(f"{base}/{name}"))
        except FileNotFoundError:
            continue
    return out


def proxied_sockets(pid: int, ports: set[int], reads: int = 3) -> set[str]:
    """The inodes of process ``pid``'s connected (not listening) TCP sockets with a local or
    remote port in ``ports``: the proxied connections it holds.

    /proc/net/tcp is read in pieces while other processes' sockets come and go, so one read
    can list a socket twice or skip it: the inodes are collected as a set over ``reads`` reads.
    """
    inodes = {
        target[len("socket:[") : -1] for target in fd_targets(pid) if target.startswith("socket:[")
    }
    found: set[str] = set()
    for _ in range(reads):
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                    if inode not in inodes or state == "0A":  # 0A: LISTEN
                        continue
                    if int(local.rsplit(":", 1)[1], 16) in ports or (
                        int(remote.rsplit(":", 1)[1], 16) in ports
                    ):
                        found.add(inode)
    return found
