"""Stopping a child process the tests started: politely, then for certain."""

from __future__ import annotations

import subprocess

__all__ = ["stop_process"]


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, up to ``grace`` s for it to exit, then SIGKILL; returns once it has exited."""
    process.terminate()  # nothing happens to a process that has already exited
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
