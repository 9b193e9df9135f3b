"""What the suite reads from (and, briefly, sets on) this machine.

Process accounting comes from ``/proc``: CPU seconds are ``utime + stime`` of every process in
a tree (``/proc/<pid>/stat`` already sums the process's threads, so fluxd's engine thread is
included), memory is the sum of ``VmRSS``.  The machine description and the tool versions go
into the report's header, so a figure can be traced to what produced it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
import re
import resource
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "LOOPBACK",
    "Counters",
    "conntrack_drops",
    "cpu_seconds",
    "describe_machine",
    "free_port",
    "process_tree",
    "raise_nofile",
    "rss_kib",
    "sysctls",
    "tcp_established",
]

LOOPBACK = "127.0.0.1"
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


# Servers in the run (backends, proxies' front ports) listen below the kernel's ephemeral
# range, as real services do (80, 8080, 5201...): a port inside it is also a source port the
# kernel hands to connect(), and fluxd checks its upstream connections for meeting themselves
# only where that can happen (a local address, a port in the range).
_LOWEST_PORT = 10000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1, below the ephemeral range, that nothing
    listens on right now (held together while picked, so none is picked twice).  Falls back to
    the kernel's pick when the range leaves no room below it."""
    top = _ephemeral_low() - 1
    rng = random.Random()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        tries = 0
        while len(ports) < count:
            sock = stack.enter_context(socket.socket())
            tries += 1
            port = rng.randint(_LOWEST_PORT, top) if top - _LOWEST_PORT > 4 * count else 0
            if tries > 1000:
                port = 0
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue  # taken (or in TIME_WAIT): another one
            ports.append(int(sock.getsockname()[1]))
        return ports


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant (nginx's workers, for instance)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes (all threads of each)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # After the command name: state is index 0, utime index 11, stime index 12.
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def _own_cpu_seconds() -> float:
    """CPU of this process, its live descendants and every child they have reaped."""
    total = 0
    for pid in process_tree(os.getpid()):
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return total / _TICKS


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICKS


def conntrack_drops() -> int:
    """Packets netfilter's connection tracking dropped or failed to insert, all CPUs."""
    try:
        lines = Path("/proc/net/stat/nf_conntrack").read_text().split("\n")
    except OSError:
        return 0
    header = lines[0].split()
    wanted = [header.index(name) for name in ("insert_failed", "drop") if name in header]
    return sum(int(line.split()[i], 16) for line in lines[1:] if line.strip() for i in wanted)


class Counters:
    """Machine-wide noise around one measurement.

    ``other_cpu_s``: CPU seconds the machine was busy beyond the suite's own processes (other
    work on the machine, plus kernel threads such as ksoftirqd); ``conntrack_drops``: packets
    dropped by a full connection-tracking table.  Either being large makes a figure suspect.
    """

    def __init__(self) -> None:
        self._busy = _busy_cpu_seconds()
        self._own = _own_cpu_seconds()
        self._drops = conntrack_drops()

    def read(self) -> dict[str, float]:
        return {
            "other_cpu_s": (_busy_cpu_seconds() - self._busy) - (_own_cpu_seconds() - self._own),
            "conntrack_drops": conntrack_drops() - self._drops,
        }


def rss_kib(pids: list[int]) -> int:
    """Resident memory of these processes, KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def tcp_established(remote_port: int) -> int:
    """Established IPv4 TCP connections on this machine whose remote port is ``remote_port``."""
    count = 0
    # /proc/net/tcp: "sl local rem st ..." with addresses HEX_IP:HEX_PORT; state 01: ESTABLISHED.
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            parts = line.split(None, 4)
            if parts[3] == "01" and int(parts[2].rsplit(":", 1)[1], 16) == remote_port:
                count += 1
    return count


def raise_nofile() -> int:
    """Raise this process's descriptor limit to the hard limit; return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def sysctls(wanted: dict[str, str]) -> Iterator[dict[str, str]]:
    """Set kernel settings for the duration of the block and put the old values back.

    Yields the settings actually changed (name -> ``old -> new``); one that cannot be read or
    written is left alone.
    """
    changed: dict[str, str] = {}
    old: dict[str, str] = {}
    for name, value in wanted.items():
        path = Path("/proc/sys") / name.replace(".", "/")
        try:
            current = path.read_text().strip()
            if current != value:
                path.write_text(value)
                old[name] = current
                changed[name] = f"{current} -> {value}"
        except OSError:
            continue
    try:
        yield changed
    finally:
        for name, value in old.items():
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / name.replace(".", "/")).write_text(value)


def _first_line(*argv: str, pattern: str = r".*") -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    match = re.search(pattern, result.stdout + result.stderr)
    return match.group(0).strip() if match else "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def describe_machine() -> dict[str, str]:
    """What the report's header says about this machine and the tools measured."""
    from flux import __version__

    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} ({_cpu_model()})",
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fluxd": __version__,
        "wrk": _first_line("wrk", "-v", pattern=r"wrk \S+"),
        "iperf3": _first_line("iperf3", "--version", pattern=r"iperf \S+"),
        "haproxy": _first_line("haproxy", "-v", pattern=r"HAProxy version \S+"),
        "nginx": _first_line("nginx", "-v", pattern=r"nginx/\S+"),
        "descriptor limit": str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
    }
