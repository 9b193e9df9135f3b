"""An echo server in a process of its own, for tests that need thousands of connections.

Every byte a connection sends comes back on it.  The server runs as a subprocess
(``python -m tests.support.echo_backend``) with its descriptor limit raised to the hard limit,
so the test's own clients and this server's connections count against two processes' limits rather
than one: the machine caps each process at 20,000 descriptors.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import TracebackType

import uvloop

from flux.daemon import raise_descriptor_limit

__all__ = ["EchoBackend"]


class _Echo(asyncio.Protocol):
    transport: asyncio.WriteTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport: it writes

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close when the client does


async def _serve(host: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, host, 0, backlog=65535)
    print(server.sockets[0].getsockname()[1], flush=True)
    # Serve until the test closes our stdin (or dies).
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


class EchoBackend:
    """The echo server subprocess on ``host``; ``port`` is known once started."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> EchoBackend:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.echo_backend", self.host],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__(None, None, None)
            raise AssertionError(f"the echo backend did not start: {line!r}")
        self.port = int(line)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


if __name__ == "__main__":
    raise_descriptor_limit()
    uvloop.run(_serve(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"))
