"""Network namespaces for tests: create and delete them, run programs and open sockets in them.

A socket belongs to the network namespace of the thread that created it, for its whole life;
:func:`socket_in` creates one in a short-lived thread that first joins the namespace (setns
applies to the calling thread only), so the test can then connect, send and receive from any
thread while its traffic stays inside that namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading

__all__ = ["add_netns", "delete_netns", "netns_prefix", "netns_run", "socket_in"]

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_prefix(netns: str | None) -> list[str]:
    """The command prefix that runs a program in network namespace ``netns`` (none: as is).

    ``nsenter --net`` enters only the network namespace; ``ip netns exec`` would also remount
    /sys, which hides the cgroup mount that dockerd needs.
    """
    return [] if netns is None else ["nsenter", f"--net=/var/run/netns/{netns}"]


def netns_run(netns: str | None, *argv: str, check: bool = True,
              timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``netns``; a failure (with ``check``) raises with its stderr."""
    result = subprocess.run([*netns_prefix(netns), *argv], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} (in {netns}) failed: {result.stderr.strip()}")
    return result


def add_netns(name: str) -> None:
    """Create namespace ``name`` with its loopback up."""
    netns_run(None, "ip", "netns", "add", name)
    netns_run(None, "ip", "-n", name, "link", "set", "lo", "up")


def delete_netns(name: str) -> None:
    """Delete namespace ``name`` (its interfaces go with it); a missing one is no error."""
    netns_run(None, "ip", "netns", "delete", name, check=False)


def socket_in(netns: str, family: int = socket.AF_INET,
              kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket in namespace ``netns``."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def create() -> None:
        try:
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind))
        except BaseException as error:
            failed.append(error)

    # A thread of its own, which ends here: no other work ever runs in the namespace it joined.
    thread = threading.Thread(target=create, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]
