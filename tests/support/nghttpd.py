"""An h2c server for the HTTP/2 tests: nghttpd (Debian's nghttp2-server) without TLS, serving a
directory on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.fluxd_process import wait_until
from tests.support.processes import stop_process

__all__ = ["nghttpd"]

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def nghttpd(docroot: Path) -> Iterator[str]:
    """nghttpd --no-tls serving ``docroot`` on a free loopback port: its address (host:port)."""
    port = _free_port()
    server = subprocess.Popen(
        ["nghttpd", "--no-tls", f"--address={HOST}", "-d", str(docroot), str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return True
        return server.poll() is not None

    try:
        wait_until(listening, 10, "nghttpd to listen")
        assert server.poll() is None, server.communicate()[1]
        yield f"{HOST}:{port}"
    finally:
        stop_process(server)
