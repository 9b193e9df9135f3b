"""tests/support/listening.py: a test server's accept thread ends when its listener is closed."""

from __future__ import annotations

import platform
import socket
import threading
import time
from pathlib import Path

from tests.support.listening import close_listener


def _server() -> tuple[socket.socket, threading.Thread, list[object]]:
    sock = socket.create_server(("127.0.0.1", 0))
    outcome: list[object] = []

    def serve() -> None:
        try:
            outcome.append(sock.accept())
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    _wait_in_accept(thread)
    return sock, thread, outcome


_ACCEPT4 = {"x86_64": "288", "aarch64": "242"}  # accept4(2)'s syscall number


def _wait_in_accept(thread: threading.Thread) -> None:
    """Until the thread is blocked in accept4(2), as /proc shows it."""
    path = Path(f"/proc/self/task/{thread.native_id}/syscall")
    deadline = time.monotonic() + 5
    while path.read_text().split()[0] != _ACCEPT4[platform.machine()]:
        assert time.monotonic() < deadline, "the server thread never blocked in accept4()"
        time.sleep(0.005)


def test_a_plain_close_leaves_the_accept_thread_blocked() -> None:
    # What close_listener is for: after close() alone the thread still waits in accept().
    sock, thread, outcome = _server()
    port = sock.getsockname()[1]
    sock.close()
    thread.join(timeout=0.5)
    assert thread.is_alive() and outcome == []
    # The old socket still listens (the blocked call holds it): one client ends the thread.
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_close_listener_ends_the_accept_thread_then_closes() -> None:
    sock, thread, outcome = _server()
    close_listener(sock, thread)
    # The thread has ended (woken with an error, no client) before the descriptor was closed.
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], OSError)
    assert sock.fileno() == -1
