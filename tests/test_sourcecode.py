"""Lint and types run as tests (like uvloop's test_sourcecode): ruff, mypy, cython-lint, and
the compiled modules' stubs checked against the modules."""

from __future__ import annotations

import ast
import importlib.util
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


def imported_modules(path: Path) -> set[str]:
    """The modules `path` imports, by dotted name; ``from tests import test_x`` imports test_x."""
    package = ".".join(path.relative_to(ROOT).parent.parts)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_imports_a_test_module() -> None:
    # What tests share lives in tests/support/: only pytest imports a test module.
    test_modules = {f"tests.{path.stem}" for path in (ROOT / "tests").glob("test_*.py")}
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & test_modules)
        for directory in ("tests", "benchmarks", "fuzz")
        for path in (ROOT / directory).rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_test_helpers_live_in_tests_support() -> None:
    tests = ROOT / "tests"
    misplaced = [
        str(path.relative_to(ROOT))
        for path in tests.rglob("*.py")
        if path.name not in ("conftest.py", "__init__.py")
        and not (path.parent == tests and path.name.startswith("test_"))
        and path.parent != tests / "support"
    ]
    assert misplaced == [], "modules that tests import belong in tests/support/"


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
