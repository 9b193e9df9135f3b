"""Stopping a test server whose thread is blocked in ``accept()``.

Closing the listening socket is not enough: the thread stays blocked in ``accept()`` on the
socket it started with, and when a signal reaches that thread (SIGCHLD from any of the
subprocesses tests run, under its default disposition or a handler with SA_RESTART), the
kernel restarts the call on the same descriptor *number*, which by then may be another socket
of the process.  The old server's thread then accepts the new server's clients: an echo server
of one test once answered a later test's HTTP requests with themselves (reproduced in a few
lines: block SIGCHLD in the main thread, close a listener its thread accepts on, open another
with the same number, run a subprocess, connect).  ``shutdown()`` first wakes the blocked
``accept()`` (it fails with EINVAL), the thread ends, and only then is the descriptor given
back.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["close_listener"]


def close_listener(sock: socket.socket, thread: threading.Thread) -> None:
    """Wake ``thread`` out of ``sock.accept()``, wait for it to end, then close ``sock``."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    if thread is not threading.current_thread():
        thread.join(timeout=10)
    if thread.is_alive():
        raise AssertionError(f"the thread serving {sock} did not stop within 10 s")
    sock.close()
