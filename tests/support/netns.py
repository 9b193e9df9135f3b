"""Network namespaces for tests: create and delete them, run programs and open sockets in them.

A socket belongs to the network namespace of the thread that created it, for its whole life;
:func:`socket_in` creates one in a short-lived thread that first joins the namespace (setns
applies to the calling thread only), so the test can then connect, send and receive from any
thread while its traffic stays inside that namespace.

:class:`PortForward` builds on it for a program that cannot be put into a namespace as easily
as a socket (a browser driven over a local port by its driver): a listener on 127.0.0.1 here
whose every connection is relayed, byte for byte, to one address inside the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from types import TracebackType

__all__ = ["PortForward", "add_netns", "delete_netns", "netns_prefix", "netns_run", "socket_in"]

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


class PortForward:
    """127.0.0.1:``port`` in the test's own namespace, relayed to ``address:target_port``
    inside ``netns``: each accepted connection gets a socket of its own in the namespace and
    two threads copying bytes (a half-close passed on).  Closing it closes every connection.

    Only loopback clients reach it, and only the one address in the namespace is ever
    connected to, so no traffic leaves the namespaces the test made.
    """

    def __init__(self, netns: str, address: str, target_port: int) -> None:
        self.netns = netns
        self.target = (address, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept, name=f"forward-{netns}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> PortForward:
        self._acceptor.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            sockets, self._sockets = self._sockets, []
        with contextlib.suppress(OSError):  # wakes the acceptor up
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):  # not connected, or already shut
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._acceptor.join(10)
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket_in(self.netns)
                upstream.settimeout(5.0)
                upstream.connect(self.target)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closing:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    thread = threading.Thread(target=_copy, args=(source, sink), daemon=True)
                    self._threads.append(thread)
                    thread.start()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    """Bytes from ``source`` to ``sink`` until ``source`` ends; then end ``sink``'s side."""
    with contextlib.suppress(OSError):  # a side closed: the connection is over
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
