"""Lint and types run as tests (like uvloop's test_sourcecode): ruff, mypy, cython-lint, and
the compiled modules' stubs checked against the modules."""

from __future__ import annotations

import os
import re
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


def test_no_engine_room_reaches_forward() -> None:
    # STYLE 15: a room of the engine (an include of _splice.pyx) calls a function of a later
    # room only through its declaration in _splice.pxd, so the include order means nothing.
    flux = ROOT / "src/flux"
    rooms = re.findall(r'^include "(.+)"$', (flux / "_splice.pyx").read_text(), re.M)
    function = re.compile(r"^cdef [^(\n]*?\b(\w+)\(", re.M)
    declared = set(function.findall((flux / "_splice.pxd").read_text()))
    room_of = {name: i for i, room in enumerate(rooms)
               for name in function.findall((flux / room).read_text())}
    for i, room in enumerate(rooms):
        text = (flux / room).read_text()
        later = {name for name, j in room_of.items() if j > i and re.search(rf"\b{name}\(", text)}
        assert later <= declared, f"{room} calls {sorted(later - declared)} of a later room"


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
