"""Lint and types run as tests (like uvloop's test_sourcecode): ruff, mypy, cython-lint, and
the compiled modules' stubs checked against the modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


BIN = Path(sys.executable).parent
# cython-lint finds pycodestyle on PATH: put the virtualenv's bin first.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def test_ruff() -> None:
    result = run("ruff", "check", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_on_the_pure_core() -> None:
    # Files are listed in pyproject.toml ([tool.mypy] files).
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_cython_lint() -> None:
    # Every Cython source: .pyx, .pxi, .pxd, wherever it lies under src/flux.
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "src/flux").rglob("*.p[yx][xid]"))
    assert {"src/flux/_splice.pyx", "src/flux/_splice.pxd", "src/flux/_histogram.pyx"} <= set(
        sources
    )
    result = subprocess.run(
        [str(BIN / "cython-lint"), "--max-line-length", "100", *sources],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_match_the_compiled_modules() -> None:
    # mypy's stubtest imports the compiled modules and compares every public name, signature
    # and default with their .pyi; the allowlist holds only what Cython adds by itself.
    result = run(
        "mypy.stubtest",
        "flux._splice",
        "flux._histogram",
        "--allowlist",
        "tests/stubtest_allowlist.txt",
    )
    assert result.returncode == 0, result.stdout + result.stderr
