"""``python -m benchmarks.soak --minutes N``: fluxd under steady load and repeated faults.

For ``N`` minutes (``make soak``: 30) a real fluxd proxies a steady mix of new TCP and HTTP
connections to busybox httpd containers, while instances are started and killed every few
seconds, the Docker engine is restarted, one member of a three-member etcd cluster is
restarted, and fluxd itself is SIGKILLed and restarted twice.  Every request, fault and
one-second sample of fluxd's RSS and descriptor count is kept; the verdict and the report come
from benchmarks/soak_report.py, which says what counts as a failed request and which failures
a fault explains.  The run fails (exit status 1) on any unexpected failed request, on RSS or
descriptors growing over a fluxd's life, or when a fault could not be carried out.

Isolation: nothing here touches the machine's Docker engine beyond building the test image in
it and saving it.  The soak runs a private dockerd (its own data and exec roots and socket, no
bridge, no iptables rules) whose containers use the host network and listen on loopback ports
only; fluxd runs with ``-host-ip 127.0.0.1 -bridge lo``, its own chain, and service addresses
in 127.60.0.0/16; etcd members listen on loopback.  Clients only ever connect to those
addresses.  The load is bounded twice: a fixed number of client loops, each paced to a fixed
rate, and the run's length.  Everything is kept under ``.var/soak/<time>/`` (requests, samples,
faults, every daemon's log); the report goes to ``benchmarks/results/soak.md`` and ``soak.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VAR = ROOT / ".var" / "soak"
sys.path.insert(0, str(ROOT))  # the test helpers: fluxd, etcd, the busybox image

from tests.support.etcd_cluster import EtcdCluster  # noqa: E402
from tests.support.fluxd_process import Fluxd  # noqa: E402
from tests.support.private_dockerd import PrivateDockerd  # noqa: E402

from benchmarks.soak_report import (  # noqa: E402
    REQUEST_TIMEOUT,
    Fault,
    Plan,
    Request,
    Sample,
    plan,
    render_chart,
    render_markdown,
)
from benchmarks.system import free_port, rss_kib  # noqa: E402

KINDS = ("tcp", "http")
SLOTS = 6  # instances per service
STABLE = 2  # of which never churned: a service always has a live instance
# Every request is a new connection; busybox httpd answers HTTP/1.0 and closes.  The tcp
# service relays the bytes blind, the http service frames and times each exchange.
REQUESTS = {
    "tcp": b"GET / HTTP/1.0\r\n\r\n",
    "http": b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n",
}
START_TIMEOUT = 60.0
ETCD_DOWN = 5.0  # how long the etcd member stays stopped


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the load ----------------------------------------------------------------------------------


async def one_request(
    kind: str, address: tuple[str, int], timeout: float = REQUEST_TIMEOUT
) -> str:
    """One request to ``kind``'s service at ``address``; ``""`` when an instance of that
    service answered it, else what went wrong."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*address)
            try:
                writer.write(REQUESTS[kind])
                await writer.drain()
                response = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except OSError as exc:
        return f"error {exc.errno}"
    head, _, body = response.partition(b"\r\n\r\n")
    if not head:
        return "truncated"
    if not head.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 ")):
        return "bad status " + head.split(b"\r\n", 1)[0].decode(errors="replace")[:40]
    if not body:
        return "truncated"
    if not body.startswith(f"soak {kind} slot ".encode()):
        # Another service's instance, say: a routing mistake, not a lost request.
        return "bad body " + body[:40].decode(errors="replace").strip()
    return ""


async def client_loop(
    kind: str, address: tuple[str, int], rate: float, t0: float, until: float,
    stop: threading.Event, out: list[Request],
) -> None:  # fmt: skip
    """Requests one after the other at ``rate`` a second (a slow one delays the next, never
    makes a burst) until ``until`` seconds into the run or ``stop``."""
    interval = 1.0 / rate
    due = time.monotonic() + random.random() * interval
    while not stop.is_set():
        now = time.monotonic()
        if now - t0 >= until:
            return
        if due > now:
            await asyncio.sleep(due - now)
        start = time.monotonic()
        error = await one_request(kind, address)
        out.append(Request(kind, start - t0, time.monotonic() - t0, error))
        due = max(due + interval, time.monotonic())


def remote_addresses(pid: int) -> set[tuple[str, int]]:
    """The (IPv4, port) pairs process ``pid``'s established TCP sockets are connected to."""
    inodes = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{name}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                ip_hex, port_hex = fields[2].split(":")
                ip = ".".join(str(b) for b in reversed(bytes.fromhex(ip_hex)))
                found.add((ip, int(port_hex, 16)))
    return found


async def serves(address: tuple[str, int], kind: str) -> bool:
    return await one_request(kind, address) == ""


# -- the parts ----------------------------------------------------------------------------------


class Instances:
    """The busybox httpd containers of both services in the private dockerd, one per slot.

    Slot ``k`` of service ``kind`` listens on its own loopback port with the host network, and
    carries the label ``soak-slot=<kind>-<k>`` that its own rule selects (with ``--net=host``
    fluxd takes the rule's instance port, so each slot needs a rule of its own).
    """

    def __init__(self, engine: PrivateDockerd, image: str, tag: str, workdir: Path) -> None:
        self.engine = engine
        self.image = image
        self.tag = tag
        self.workdir = workdir
        self.ports = {(kind, k): free_port() for kind in KINDS for k in range(SLOTS)}
        self.running: dict[tuple[str, int], str] = {}
        self.started = 0

    def label(self, kind: str, k: int) -> str:
        return f"soak-slot={self.tag}-{kind}-{k}"

    def start(self, kind: str, k: int) -> str:
        site = self.workdir / "sites" / f"{kind}-{k}"
        site.mkdir(parents=True, exist_ok=True)
        (site / "index.html").write_text(f"soak {kind} slot {k}\n")
        self.started += 1
        cid = self.engine.docker(
            "run", "-d", "--net=host", "--name", f"soak-{self.tag}-{kind}-{k}-{self.started}",
            "--label", f"soak={self.tag}", "--label", self.label(kind, k),
            "-v", f"{site}:/www:ro", self.image,
            "httpd", "-f", "-p", f"127.0.0.1:{self.ports[kind, k]}", "-h", "/www",
        )  # fmt: skip
        self.running[kind, k] = cid
        return cid

    def kill(self, kind: str, k: int) -> None:
        cid = self.running.pop((kind, k))
        self.engine.docker("kill", cid)
        self.engine.docker("rm", cid)



def fluxctl(endpoints: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "flux.fluxctl", *args],
        env={**os.environ, "ETCD_ADDRESS": endpoints},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"fluxctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


# -- the run -----------------------------------------------------------------------------------


class Soak:
    """One run: the parts, the load, the faults, the samples."""

    def __init__(self, run: Plan, workdir: Path, loops: int, rate: float) -> None:
        self.run = run
        self.workdir = workdir
        self.loops = loops
        self.rate = rate
        self.tag = secrets.token_hex(3)
        net = random.randrange(1, 250)
        self.vips = {"tcp": (f"127.60.{net}.1", 80), "http": (f"127.60.{net}.2", 80)}
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.samples: list[Sample] = []
        self.problems: list[str] = []
        self.checks: list[str] = []
        self.fluxds: list[Fluxd] = []
        self.t0 = 0.0
        self.killing = False  # a fluxd kill is under way: its exit is not a problem
        self.docker_lock = threading.Lock()  # the churn waits while dockerd restarts
        self.stop = threading.Event()
        self.etcd = EtcdCluster(workdir / "etcd")  # three members on loopback
        self.etcd_endpoints = self.etcd.endpoints
        # Live restore: containers keep running (and serving) while the engine restarts.
        self.dockerd = PrivateDockerd(workdir / "docker", live_restore=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def problem(self, text: str) -> None:
        _log("PROBLEM: " + text)
        self.problems.append(f"{self.now():.1f} s: {text}")

    # fluxd

    def start_fluxd(self, chain: str | None = None) -> Fluxd:
        daemon = Fluxd(self.etcd_endpoints, "-host-ttl", "10", chain=chain)
        daemon.env["DOCKER_HOST"] = self.dockerd.host
        daemon.start()
        self.fluxds.append(daemon)
        daemon.wait_logged("installed (nat and filter)", timeout=START_TIMEOUT)
        return daemon

    @property
    def fluxd(self) -> Fluxd:
        return self.fluxds[-1]

    def wait_serving(self, timeout: float = START_TIMEOUT) -> bool:
        """Wait until both services answer a request (not counted in the load)."""
        deadline = time.monotonic() + timeout
        pending = set(KINDS)
        while pending and time.monotonic() < deadline:
            for kind in list(pending):
                if asyncio.run(serves(self.vips[kind], kind)):
                    pending.discard(kind)
            time.sleep(0.05)
        return not pending

    def enrolled(self) -> set[tuple[str, int]]:
        """The slots fluxd has enrolled as live instances, according to etcd."""
        out = fluxctl(self.etcd_endpoints, "query", "--state", "live", "-f",
                      "{service} {containerRule}")  # fmt: skip
        slots = set()
        for line in out.splitlines():
            service, rule = line.split()
            slots.add((service.removeprefix("soak-"), int(rule.removeprefix("slot"))))
        return slots

    def check_enrolment(self, after: str, timeout: float = 20.0) -> None:
        """Wait (the churn paused) until etcd's live instances are the running containers:
        fluxd's view of Docker converges after ``after``."""
        with self.docker_lock:
            start = time.monotonic()
            running = set(self.instances.running)
            while (enrolled := self.enrolled()) != running:
                if time.monotonic() - start > timeout:
                    self.problem(f"after {after}: {timeout:g} s on, the live instances in etcd "
                                 f"{sorted(enrolled)} are not the running containers "
                                 f"{sorted(running)}")  # fmt: skip
                    return
                time.sleep(0.2)
            self.checks.append(f"after {after}: the {len(running)} running containers are "
                               f"the live instances (within {time.monotonic() - start:.1f} s)")

    # faults, each run in a worker thread

    def kill_fluxd(self, number: int) -> None:
        old = self.fluxd
        self.killing = True
        start = self.now()
        old.process.kill()
        old.process.wait(timeout=30)
        # Restarted at once, as `--restart always` would: the crashed run's lease still holds
        # the instances, which the new run takes over.
        self.start_fluxd(chain=old.chain)
        self.killing = False
        served = self.wait_serving()
        end = self.now()
        if not served:
            self.problem(f"fluxd did not serve both services within {START_TIMEOUT:g} s of "
                         f"the restart after SIGKILL {number}")  # fmt: skip
        self.faults.append(Fault("fluxd-kill", start, end, f"{number}, outage {end - start:.1f} s"))

    def restart_dockerd(self) -> None:
        with self.docker_lock:
            start = self.now()
            self.dockerd.restart()
            end = self.now()
        before = set(self.instances.running.values())
        alive = set(self.dockerd.docker("ps", "-q", "--no-trunc", "--filter",
                                          f"label=soak={self.tag}").split())  # fmt: skip
        if not before <= alive:
            self.problem(f"{len(before - alive)} containers did not survive the dockerd restart")
        self.faults.append(
            Fault("dockerd-restart", start, end, f"{len(before & alive)} containers kept")
        )

    def restart_etcd_member(self) -> None:
        # The member fluxd talks to, so that its client has to move to another one.
        used = remote_addresses(self.fluxd.process.pid)
        members = self.etcd.members
        chosen = next((i for i, m in enumerate(members) if (m.ip, m.client_port) in used), None)
        leader = self.etcd.leader()
        index = leader if chosen is None else chosen
        what = "fluxd's" if chosen is not None else "the leader"
        if index == leader and chosen is not None:
            what += ", the leader"
        start = self.now()
        self.etcd.stop_member(index)
        time.sleep(ETCD_DOWN)
        self.etcd.start_member(index, timeout=START_TIMEOUT)
        end = self.now()
        self.faults.append(Fault("etcd-restart", start, end, f"{members[index].name} of "
                                 f"{len(members)} ({what}), down {ETCD_DOWN:g} s"))  # fmt: skip

    def churn_once(self, rng: random.Random) -> None:
        kind, k = rng.choice([(kind, k) for kind in KINDS for k in range(STABLE, SLOTS)])
        if not self.docker_lock.acquire(blocking=False):
            return  # dockerd is restarting
        try:
            start = self.now()
            if (kind, k) in self.instances.running:
                self.instances.kill(kind, k)
                self.faults.append(Fault("instance-kill", start, self.now(), f"{kind} slot {k}"))
            else:
                self.instances.start(kind, k)
                self.faults.append(Fault("instance-start", start, self.now(), f"{kind} slot {k}"))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            self.problem(f"container churn ({kind} slot {k}): {exc}")
        finally:
            self.docker_lock.release()

    def faults_thread(self) -> None:
        actions = {"fluxd-kill": self.kill_fluxd, "dockerd-restart": self.restart_dockerd,
                   "etcd-restart": self.restart_etcd_member}  # fmt: skip
        kills = 0
        for at, kind in self.run.faults:
            if self.stop.wait(max(0.0, at - self.now())):
                return
            _log(f"fault: {kind}")
            try:
                if kind == "fluxd-kill":
                    kills += 1
                    self.kill_fluxd(kills)
                else:
                    actions[kind]()
                self.check_enrolment(f"{kind} at {at:.0f} s")
            except Exception as exc:  # any failure of a fault is reported
                self.problem(f"{kind} failed: {exc!r}")
                self.stop.set()
                return

    def churn_thread(self) -> None:
        rng = random.Random()
        while not self.stop.wait(self.run.churn_interval):
            if self.now() >= self.run.total - self.run.churn_interval:
                return
            self.churn_once(rng)

    async def sampler(self) -> None:
        while self.now() < self.run.total and not self.stop.is_set():
            process = self.fluxd.process
            pid = process.pid
            if process.poll() is not None and not self.killing:
                self.problem(f"fluxd {pid} exited by itself (status {process.returncode})")
                self.stop.set()
                return
            with contextlib.suppress(OSError):
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                rss = rss_kib([pid])
                if rss:
                    self.samples.append(Sample(self.now(), pid, rss, fds))
            await asyncio.sleep(1.0)

    async def load(self) -> None:
        tasks = [
            asyncio.create_task(
                client_loop(
                    kind, self.vips[kind], self.rate, self.t0, self.run.total, self.stop,
                    self.requests,
                )
            )
            for kind in KINDS
            for _ in range(self.loops)
        ]
        # The run's end, or a problem (which sets stop), ends every one of them.
        await asyncio.gather(self.sampler(), *tasks)

    # set-up and the whole run

    def setup(self) -> None:
        _log(f"work directory {self.workdir}")
        self.etcd.start(timeout=START_TIMEOUT)
        self.dockerd.start()
        image = self.dockerd.load_image()
        self.instances = Instances(self.dockerd, image, self.tag, self.workdir)
        for kind in KINDS:
            ip, port = self.vips[kind]
            fluxctl(self.etcd_endpoints, "service", f"soak-{kind}", "--address", f"{ip}:{port}",
                    "-p", kind)  # fmt: skip
            for k in range(SLOTS):
                fluxctl(self.etcd_endpoints, "select", f"soak-{kind}", f"slot{k}",
                        "--instance-port", str(self.instances.ports[kind, k]),
                        "--labels", self.instances.label(kind, k))  # fmt: skip
        self.start_fluxd()
        for kind in KINDS:
            for k in range(SLOTS):
                if k < STABLE or k % 2 == 0:
                    self.instances.start(kind, k)
        if not self.wait_serving():
            raise RuntimeError(f"fluxd did not serve both services within {START_TIMEOUT:g} s")

    def execute(self) -> None:
        self.t0 = time.monotonic()
        threads = [threading.Thread(target=self.faults_thread, daemon=True),
                   threading.Thread(target=self.churn_thread, daemon=True)]  # fmt: skip
        for thread in threads:
            thread.start()
        asyncio.run(self.load())
        self.stop.set()
        for thread in threads:
            thread.join(timeout=2 * START_TIMEOUT)
        if not self.problems:
            self.check_enrolment("the run")

    def teardown(self) -> None:
        for daemon in self.fluxds[-1:]:
            with contextlib.suppress(Exception):
                daemon.stop()  # kills it and removes its chain
        for index, daemon in enumerate(self.fluxds, start=1):
            (self.workdir / f"fluxd-{index}.log").write_text("\n".join(daemon.lines) + "\n")
        try:
            self.dockerd.stop()  # its containers, mounts and roots too
        finally:
            self.etcd.stop()

    def save(self, header: dict[str, str], settings: dict[str, str]) -> dict[str, object]:
        """Everything the report needs, also written to ``soak.json`` in the work directory."""
        raw: dict[str, object] = {
            "header": header,
            "settings": settings,
            "plan": asdict(self.run),
            "requests": [asdict(r) for r in self.requests],
            "faults": [asdict(f) for f in self.faults],
            "samples": [asdict(s) for s in self.samples],
            "problems": self.problems,
            "checks": self.checks,
        }
        (self.workdir / "soak.json").write_text(json.dumps(raw))
        return raw


def report(raw: dict[str, Any], out: Path, chart: bool) -> bool:
    """Write soak.md (and soak.png) into ``out`` from a run's data; whether the run passed."""
    run = Plan(**{**raw["plan"], "faults": tuple(tuple(f) for f in raw["plan"]["faults"])})
    requests = [Request(**r) for r in raw["requests"]]
    faults = [Fault(**f) for f in raw["faults"]]
    samples = [Sample(**s) for s in raw["samples"]]
    header = raw["header"]
    text, passed = render_markdown(run, requests, faults, samples, header, raw["settings"],
                                   raw["problems"], raw["checks"])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.md").write_text(text)
    if chart:
        render_chart(run, requests, faults, samples, out / "soak.png",
                     f"fluxd soak, {run.total / 60:g} min ({header['date']})")  # fmt: skip
    print(text)
    _log(f"{'PASS' if passed else 'FAIL'}: report in {out / 'soak.md'}")
    return passed


def _header() -> dict[str, str]:
    from benchmarks.system import describe_machine

    machine = describe_machine()
    keep = ("date", "cpus", "memory", "kernel", "python", "fluxd", "descriptor limit")
    header = {key: machine[key] for key in keep}
    for name, argv in (("docker", ["dockerd", "--version"]), ("etcd", ["etcd", "--version"])):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            header[name] = subprocess.run(argv, capture_output=True, text=True, timeout=10
                                          ).stdout.splitlines()[0]  # fmt: skip
    return header


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Soak fluxd: steady TCP and HTTP load while instances churn, dockerd and "
        "an etcd member restart and fluxd is SIGKILLed twice; fail on unexpected failed "
        "requests or on RSS/descriptor growth.  Writes soak.md and soak.png.",
    )
    parser.add_argument("--minutes", type=float, default=30.0, metavar="N",
                        help="length of the run (default 30); the faults scale with it")
    parser.add_argument("--loops", type=int, default=4, metavar="N",
                        help="client loops per service (default 4)")
    parser.add_argument("--rate", type=float, default=10.0, metavar="R",
                        help="requests per second of each loop (default 10)")
    parser.add_argument("--churn", type=float, default=3.0, metavar="S",
                        help="seconds between instance starts/kills (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help="where soak.md and soak.png go (default benchmarks/results)")
    parser.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                        help="where the raw data and logs go (default .var/soak/<time>)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG (no matplotlib)")
    parser.add_argument("--report-only", type=Path, default=None, metavar="DIR",
                        help="rebuild soak.md and soak.png from DIR/soak.json, running nothing")
    args = parser.parse_args(argv)  # fmt: skip
    if not 2 <= args.minutes <= 600:
        parser.error(f"--minutes must be 2 to 600, got {args.minutes:g}")
    if not 1 <= args.loops <= 64:
        parser.error(f"--loops must be 1 to 64, got {args.loops}")
    if not 0.1 <= args.rate <= 200:
        parser.error(f"--rate must be 0.1 to 200 requests per second, got {args.rate:g}")
    if not 0.5 <= args.churn <= 60:
        parser.error(f"--churn must be 0.5 to 60 seconds, got {args.churn:g}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.report_only is not None:
        raw = json.loads((args.report_only / "soak.json").read_text())
        return 0 if report(raw, args.out, not args.no_chart) else 1
    if os.geteuid() != 0:
        print("soak: needs root (fluxd installs iptables rules, dockerd runs)", file=sys.stderr)
        return 2
    for tool in ("dockerd", "docker", "etcd", "etcdctl", "iptables"):
        if shutil.which(tool) is None:
            print(f"soak: {tool} is not installed: run `make test` first", file=sys.stderr)
            return 2
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    workdir = (args.workdir or VAR / stamp).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(plan(args.minutes, args.churn), workdir, args.loops, args.rate)

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # tear down on the way out

    signal.signal(signal.SIGTERM, terminate)
    try:
        soak.setup()
        _log(f"soak for {args.minutes:g} min: {2 * args.loops} loops at {args.rate:g} req/s, "
             f"faults at {[f'{at:.0f} s {kind}' for at, kind in soak.run.faults]}")  # fmt: skip
        soak.execute()
    except Exception as exc:  # the report says what stopped the run
        soak.problem(f"the run stopped: {exc!r}")
    finally:
        soak.teardown()
    settings = {
        "command": "python -m benchmarks.soak " + " ".join(argv),
        "length": f"{args.minutes:g} min",
        "load": f"{args.loops} loops per service at {args.rate:g} req/s each, a new connection "
        "per request",
        "instances": f"{SLOTS} per service ({STABLE} never churned)",
        "churn": f"an instance started or killed every {args.churn:g} s",
        "raw data": str(workdir.relative_to(ROOT) if workdir.is_relative_to(ROOT) else workdir),
    }
    return 0 if report(soak.save(_header(), settings), args.out, not args.no_chart) else 1


if __name__ == "__main__":
    sys.exit(main())
