"""HAProxy as a server that reads the PROXY protocol (``bind ... accept-proxy``), for the tests
of fluxctl's --proxy-protocol: it answers every HTTP request with the client address and port
the header gave it (``src src_port``), so a test sees what an instance behind fluxd learns."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["haproxy_reading_proxy_headers"]


@contextlib.contextmanager
def haproxy_reading_proxy_headers(directory: Path, ip: str) -> Iterator[tuple[str, int]]:
    """HAProxy listening on ``ip`` (a loopback address) and a free port, its configuration in
    ``directory``; yields ``(ip, port)`` once it accepts, and stops it after."""
    binary = shutil.which("haproxy")
    assert binary is not None, "haproxy is not installed (Debian's haproxy package)"
    with socket.create_server((ip, 0)) as probe:
        port = probe.getsockname()[1]
    config = directory / "haproxy.cfg"
    config.write_text(
        "defaults\n"
        "  mode http\n"
        "  timeout client 5s\n"
        "  timeout server 5s\n"
        "  timeout connect 5s\n"
        "frontend instance\n"
        f"  bind {ip}:{port} accept-proxy\n"
        '  http-request return status 200 content-type text/plain lf-string "%[src] %[src_port]"\n'
    )
    process = subprocess.Popen(
        [binary, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, process.communicate()[0]
            with contextlib.suppress(OSError), socket.create_connection((ip, port), 1):
                break
            assert time.monotonic() < deadline, "haproxy did not start listening"
            time.sleep(0.05)
        yield ip, port
    finally:
        process.terminate()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()
