"""fluxd's production image, bin/run-flux and the deployment examples.

The image is built once per session with ``make image`` on the local Debian base
(``BASE_IMAGE=flux-base:bookworm``, built with debootstrap the first time and reused after), so
no registry is needed; Docker's layer cache makes the build a few seconds when nothing changed.
The container tests run fluxd as the seed does (host network, NET_ADMIN, the Docker socket),
configured like every fluxd in this suite: host IP 127.0.0.1, bridge ``lo``, its own chain
name, the session's etcd; service addresses in 127.42.0.0/16 and instances that publish on
127.0.0.1 only.  bin/run-flux's own logic (defaults, warnings, what it passes to Docker) is
also checked against a stand-in ``docker`` that records its calls.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from flux.config import OPTIONS, parse_args
from tests.support.docker_images import BUSYBOX_IMAGE, ensure_busybox_image
from tests.support.etcd_server import EtcdServer, free_port
from tests.support.fluxd_process import wait_until

ROOT = Path(__file__).resolve().parent.parent
RUN_FLUX = ROOT / "bin" / "run-flux"
DEPLOY = ROOT / "deploy"
IMAGE = "flux-test/fluxd:latest"
LOCAL_BASE = "flux-base:bookworm"
HOST = "127.0.0.1"
# nat: PREROUTING and OUTPUT; filter: FORWARD, INPUT and OUTPUT.
EXPECTED_JUMPS = ["FORWARD", "INPUT", "OUTPUT", "OUTPUT", "PREROUTING"]
IMAGE_SIZE_LIMIT = 250_000_000

# A cold build (debootstrap, then apt and pip downloads) takes a few minutes and falls to
# whichever test asks for the image first; warm, every test here takes seconds.
pytestmark = pytest.mark.timeout(900)



def run(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command; never raises on a non-zero exit (the caller asserts)."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env
    )


def docker(*args: str, timeout: float = 120) -> str:
    result = run("docker", *args, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout.strip()


def chain_lines(chain: str) -> list[str]:
    save = run("iptables-save")
    assert save.returncode == 0, save.stderr
    return [line for line in save.stdout.splitlines() if chain in line]


def clean_environ() -> dict[str, str]:
    """This process's environment without any fluxd or run-flux settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "FLUXD_"))} | {
        "PYTHONDONTWRITEBYTECODE": "1"
    }


# No proxy from the environment: requests go straight to loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with _OPENER.open(url, timeout=timeout) as response:
        return response.status, response.read().decode()


# -- the image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    size: int
    build_seconds: float


@pytest.fixture(scope="session")
def fluxd_image() -> BuiltImage:
    """The production image, built (or found up to date) by ``make image``."""
    started = time.monotonic()
    result = run(
        "make", "-s", "-C", ROOT, "image", f"IMAGE={IMAGE}", f"BASE_IMAGE={LOCAL_BASE}",
        timeout=840,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"make image failed:\n{result.stdout}{result.stderr}")
    seconds = time.monotonic() - started
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE))
    return BuiltImage(IMAGE, size, seconds)


def test_image_holds_the_runtime_only_and_reports_its_size(
    fluxd_image: BuiltImage, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(
            f"\n[image] {fluxd_image.tag} on {LOCAL_BASE}: {fluxd_image.size / 1e6:.0f} MB"
            f" (make image took {fluxd_image.build_seconds:.1f} s)"
        )
    assert fluxd_image.size < IMAGE_SIZE_LIMIT
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", IMAGE))
    assert config["Entrypoint"] == ["fluxd"]
    assert config["Healthcheck"]["Test"] == ["CMD", "fluxd-healthcheck"]
    assert config["StopSignal"] == "SIGTERM"
    # No compiler and no pip at run time; iptables speaks nf_tables, like the host's.
    probe = run(
        "docker", "run", "--rm", "--entrypoint", "sh", IMAGE, "-c",
        "for c in gcc cc pip pip3; do command -v $c && exit 1; done;"
        " python -m pip --version 2>/dev/null && exit 1;"
        " python -c 'import flux._splice' && iptables-restore --version",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "nf_tables" in probe.stdout


def test_readme_quotes_the_image_size(fluxd_image: BuiltImage) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deployment") :]
    quoted = re.search(r"image is about (\d+) MB", section)
    assert quoted, "README's Deployment section should say 'image is about N MB'"
    # Dependencies come and go; a stale figure, off by more than a third, must be redone.
    assert abs(int(quoted.group(1)) * 1e6 - fluxd_image.size) < fluxd_image.size / 3


def test_version_and_a_bad_flag_behave_as_the_binary(fluxd_image: BuiltImage) -> None:
    for args in (["--version"], ["-network-mode", "mesh"], ["-host-ip", "10.0.0.1", "extra"]):
        local = run(sys.executable, "-m", "flux", *args, env=clean_environ())
        image = run("docker", "run", "--rm", IMAGE, *args)
        assert (image.returncode, image.stdout, image.stderr) == (
            local.returncode,
            local.stdout,
            local.stderr,
        ), args
    assert local.returncode == 2 and local.stderr.count("\n") == 1


class _Healthz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        body = b"ok\n" if self.status == 200 else b"chain not installed\n"
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def healthz_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Healthz]]]:
    handler = type("Healthz", (_Healthz,), {})
    server = ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_health_check_asks_healthz_on_the_metrics_listener(
    fluxd_image: BuiltImage, healthz_server: tuple[ThreadingHTTPServer, type[_Healthz]]
) -> None:
    server, handler = healthz_server
    port = server.server_address[1]

    def check(*args: str, env: tuple[str, ...] = ()) -> tuple[int, str]:
        envs = [f"-e={e}" for e in env]
        result = run(
            "docker", "run", "--rm", "--net=host", *envs, "--entrypoint", "fluxd-healthcheck",
            IMAGE, *args,
        )  # fmt: skip
        return result.returncode, result.stdout + result.stderr

    code, out = check("-listen-prometheus", f"{HOST}:{port}")
    assert code == 0 and out.startswith("healthy:"), out
    # The environment works as for fluxd, and an empty host means all interfaces.
    code, out = check("-debug", env=(f"FLUX_LISTEN_PROMETHEUS=:{port}",))
    assert code == 0 and f"http://127.0.0.1:{port}/healthz" in out, out
    handler.status = 503
    code, out = check(f"--listen-prometheus={HOST}:{port}")
    assert code == 1 and "HTTP 503" in out and "chain not installed" in out, out
    closed = free_port()
    code, out = check("-listen-prometheus", f"{HOST}:{closed}")
    assert code == 1 and out.startswith("unhealthy:"), out
    code, out = check("-debug")
    assert code == 0 and "no metrics listener" in out, out


# -- fluxd in its container, as the seed runs it -------------------------------------------------


@pytest.fixture
def web_containers(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start busybox httpd containers (publishing on 127.0.0.1 only) labelled for one test."""
    ensure_busybox_image()
    tag = "flux-test-image-" + secrets.token_hex(3)
    made: list[str] = []

    def start(name: str) -> str:
        site = tmp_path / name
        site.mkdir()
        (site / "index.html").write_text(name)
        cid = docker(
            "run", "-d", "--label", "flux-test=image", "--label", f"e2e={tag}",
            "-v", f"{site}:/www:ro", "-p", "127.0.0.1::80",
            BUSYBOX_IMAGE, "httpd", "-f", "-p", "80", "-h", "/www",
        )  # fmt: skip
        made.append(cid)
        return cid

    start.tag = tag  # type: ignore[attr-defined]
    yield start
    if made:
        run("docker", "rm", "-f", *made)


@dataclass
class FluxdContainer:
    name: str
    chain: str
    metrics_port: int
    env: dict[str, str]

    def logs(self) -> str:
        result = run("docker", "logs", self.name)
        return result.stdout + result.stderr

    def run_flux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(RUN_FLUX, *args, env=self.env, timeout=120)


@pytest.fixture
def fluxd_container(fluxd_image: BuiltImage, etcd: EtcdServer) -> Iterator[FluxdContainer]:
    """Settings for one fluxd container under bin/run-flux; removed, rules and all, after."""
    suffix = secrets.token_hex(3)
    container = FluxdContainer(
        name=f"flux-test-fluxd-{suffix}",
        chain=f"FLUXT{suffix.upper()}",
        metrics_port=free_port(),
        env={},
    )
    container.env = clean_environ() | {
        "FLUXD_IMAGE": fluxd_image.tag,
        "FLUXD_NAME": container.name,
        "HOST_IP": HOST,
        "ETCD_ADDRESS": etcd.endpoint,
        # Configuration by environment, passed through by bin/run-flux.
        "FLUX_BRIDGE": "lo",
        "FLUX_CHAIN": container.chain,
        "FLUX_LISTEN_PROMETHEUS": f"{HOST}:{container.metrics_port}",
    }
    yield container
    run("docker", "rm", "-f", container.name)
    run(
        sys.executable, "-m", "flux", "cleanup", "-chain", container.chain, "-host-ip", HOST,
        env=clean_environ(),
    )  # fmt: skip


def test_run_flux_container_enrols_forwards_reports_health_and_stops_clean(
    fluxd_container: FluxdContainer,
    etcd: EtcdServer,
    web_containers: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    box = fluxd_container
    started = time.monotonic()
    result = box.run_flux("start", "-host-ttl", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stderr  # HOST_IP and ETCD_ADDRESS were given
    inspect = json.loads(docker("container", "inspect", box.name))[0]
    host_config = inspect["HostConfig"]
    assert host_config["NetworkMode"] == "host"
    assert host_config["CapAdd"] in (["NET_ADMIN"], ["CAP_NET_ADMIN"])
    assert "/var/run/docker.sock:/var/run/docker.sock" in host_config["Binds"]
    assert host_config["RestartPolicy"]["Name"] == "unless-stopped"
    assert f"FLUX_CHAIN={box.chain}" in inspect["Config"]["Env"]
    assert inspect["Args"][-2:] == ["-host-ttl", "10"]

    # Start-up time: container start to /healthz answering 200, watched from the side.
    healthz = f"http://{HOST}:{box.metrics_port}/healthz"
    first_200: list[float] = []
    done = threading.Event()

    def watch_healthz() -> None:
        deadline = started + 60
        while time.monotonic() < deadline and not first_200 and not done.is_set():
            try:
                if http_get(healthz, timeout=1)[0] == 200:
                    first_200.append(time.monotonic() - started)
            except OSError:
                time.sleep(0.05)

    watcher = threading.Thread(target=watch_healthz, daemon=True)
    watcher.start()
    wait_until(lambda: "installed (nat and filter)" in box.logs(), 30, "the chain")
    chain_seconds = time.monotonic() - started
    jumps = [line.split()[1] for line in chain_lines(box.chain) if line.startswith("-A ")]
    assert sorted(jumps) == EXPECTED_JUMPS

    vip = f"127.42.201.{secrets.randbelow(200) + 1}"
    fluxctl = [sys.executable, "-m", "flux.fluxctl"]
    env = clean_environ() | {"ETCD_ADDRESS": etcd.endpoint}
    tag = web_containers.tag  # type: ignore[attr-defined]
    defined = run(*fluxctl, "service", "web", "--address", f"{vip}:80", "--labels", f"e2e={tag}",
                  env=env)  # fmt: skip
    assert defined.returncode == 0, defined.stderr
    for i in range(2):
        web_containers(f"site{i}")

    def live_instances() -> int:
        out = run(*fluxctl, "query", "-s", "web", "--state", "live", "-q", env=env).stdout
        return len(out.split())

    wait_until(lambda: live_instances() == 2, 20, "two live instances")
    wait_until(
        lambda: any(vip in line and "DNAT" in line for line in chain_lines(box.chain)), 15, "DNAT"
    )
    seen = {http_get(f"http://{vip}/")[1] for _ in range(20)}
    assert seen == {"site0", "site1"}

    # /healthz exists once fluxd serves metrics (it logs so); until then the check must say
    # it cannot reach the listener it found in process 1's environment.
    serves_healthz = "/healthz" in box.logs()
    check = run("docker", "exec", box.name, "fluxd-healthcheck")
    if serves_healthz:
        watcher.join(timeout=60)
        assert first_200, f"{healthz} never answered 200"
        assert check.returncode == 0 and check.stdout.startswith("healthy:"), check.stdout

        def docker_health() -> str:
            return docker("inspect", "--format", "{{.State.Health.Status}}", box.name)

        wait_until(lambda: docker_health() == "healthy", 45, "Docker to report it healthy")
    else:
        assert check.returncode == 1 and healthz in check.stdout, check.stdout
    done.set()
    # fluxctl ships in the image too.
    info = run(
        "docker", "run", "--rm", "--net=host", "-e", f"ETCD_ADDRESS={etcd.endpoint}",
        "--entrypoint", "fluxctl", IMAGE, "info", "-s", "web",
    )  # fmt: skip
    assert info.returncode == 0 and info.stdout.startswith(f"HOSTS\n{HOST}\n"), info.stderr
    status_line = box.run_flux("status")
    assert status_line.returncode == 0 and f"{box.name}: running" in status_line.stdout

    with capsys.disabled():
        health = f"{first_200[0]:.1f} s" if first_200 else "not served by this fluxd yet"
        print(
            f"\n[image] container start -> chain installed {chain_seconds:.1f} s,"
            f" -> /healthz 200 {health}"
        )

    stopped = box.run_flux("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert chain_lines(box.chain) == []  # no chain, no jump
    assert run("docker", "container", "inspect", box.name).returncode != 0
    assert etcd.get(f"/weave-flux/host/{HOST}") is None  # lease revoked on SIGTERM


def test_container_survives_a_crash_and_cleanup_runs_from_the_image(
    fluxd_container: FluxdContainer,
) -> None:
    box = fluxd_container
    result = box.run_flux("start")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: "installed (nat and filter)" in box.logs(), 30, "the chain")
    # fluxd dies hard: Docker restarts the container, and the new fluxd replaces the rules the
    # old one left behind with one set.
    pid = docker("inspect", "--format", "{{.State.Pid}}", box.name)
    os.kill(int(pid), signal.SIGKILL)
    wait_until(lambda: box.logs().count("installed (nat and filter)") == 2, 30, "a restart")
    restarts = docker("inspect", "--format", "{{.RestartCount}} {{.State.Status}}", box.name)
    assert restarts == "1 running"
    jumps = [line.split()[1] for line in chain_lines(box.chain) if line.startswith("-A ")]
    assert sorted(jumps) == EXPECTED_JUMPS
    # Killed for good (no restart after an explicit kill), it leaves its rules; `fluxd cleanup`
    # run from the image removes them.
    docker("kill", box.name)
    wait_until(lambda: docker("inspect", "--format", "{{.State.Status}}", box.name) == "exited",
               10, "the container to stay down")  # fmt: skip
    assert chain_lines(box.chain) != []
    cleanup = run(
        "docker", "run", "--rm", "--net=host", "--cap-add=NET_ADMIN", IMAGE,
        "cleanup", "-chain", box.chain,
    )  # fmt: skip
    assert cleanup.returncode == 0, cleanup.stderr
    assert chain_lines(box.chain) == []


# -- bin/run-flux's own logic, against a stand-in docker -------------------------------------------

_FAKE_DOCKER = """#!{python}
import json, os, sys
from pathlib import Path
state = Path(os.environ["FAKE_DOCKER_STATE"])  # the container's status; absent: no container
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "HOST_IP": os.environ.get("HOST_IP"),
                          "ETCD_ADDRESS": os.environ.get("ETCD_ADDRESS")}}) + "\\n")
command = sys.argv[1:3]
if command == ["container", "inspect"]:
    if not state.exists():
        sys.exit(1)
    print(state.read_text())
elif command[0] == "run":
    state.write_text("running")
    print("0123456789ab")
elif command[0] == "stop":
    state.write_text("exited")
elif command[0] == "rm":
    state.unlink()
"""


@dataclass
class FakeDocker:
    directory: Path

    @property
    def log(self) -> Path:
        return self.directory / "calls.jsonl"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    def run_flux(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environ = clean_environ() | {
            "PATH": f"{self.directory}{os.pathsep}{os.environ['PATH']}",
            "FAKE_DOCKER_LOG": str(self.log),
            "FAKE_DOCKER_STATE": str(self.state),
        }
        environ.pop("HOST_IP", None)
        environ.pop("ETCD_ADDRESS", None)
        return run(RUN_FLUX, *args, env=environ | env, timeout=30)

    def calls(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def run_call(self) -> dict[str, object]:
        runs = [c for c in self.calls() if c["argv"][0] == "run"]  # type: ignore[index]
        assert len(runs) == 1, self.calls()
        return runs[0]


@pytest.fixture
def fake_docker(tmp_path: Path) -> FakeDocker:
    script = tmp_path / "docker"
    script.write_text(_FAKE_DOCKER.format(python=sys.executable))
    script.chmod(0o755)
    return FakeDocker(tmp_path)


def test_run_flux_start_defaults_and_warns_like_the_original(fake_docker: FakeDocker) -> None:
    result = fake_docker.run_flux("start")
    assert result.returncode == 0, result.stderr
    assert "warning: ETCD_ADDRESS is not set; using http://127.0.0.1:2379" in result.stderr
    guessed = re.search(r"warning: HOST_IP is not set; using (\S+)", result.stderr)
    assert guessed, result.stderr
    host_ip = IPv4Address(guessed.group(1))
    assert not host_ip.is_loopback
    call = fake_docker.run_call()
    assert call["HOST_IP"] == str(host_ip)
    assert call["ETCD_ADDRESS"] == "http://127.0.0.1:2379"
    argv = call["argv"]
    assert isinstance(argv, list)
    for expected in (
        ["--net=host"],
        ["--cap-add=NET_ADMIN"],
        ["-v", "/var/run/docker.sock:/var/run/docker.sock"],
        ["-e", "HOST_IP"],
        ["-e", "ETCD_ADDRESS"],
    ):
        assert any(argv[i : i + len(expected)] == expected for i in range(len(argv))), expected
    image_at = argv.index("fluxd:latest")
    assert argv[image_at + 1 :] == [
        "-listen-prometheus", ":9000", "-advertise-prometheus", f"{host_ip}:9000",
    ]  # fmt: skip


def test_run_flux_passes_settings_and_extra_arguments(fake_docker: FakeDocker) -> None:
    result = fake_docker.run_flux(
        "start", "-host-ttl", "5",
        HOST_IP="192.0.2.7", ETCD_ADDRESS="http://192.0.2.1:2379", FLUX_CHAIN="FLUXX",
        FLUX_LISTEN_PROMETHEUS="192.0.2.7:9100", FLUXD_ARGS="-debug -balance p2c",
        FLUXD_IMAGE="example/fluxd:1", FLUXD_NAME="fluxd-b",
    )  # fmt: skip
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    argv = fake_docker.run_call()["argv"]
    assert isinstance(argv, list)
    assert argv[argv.index("--name") + 1] == "fluxd-b"
    env_names = [argv[i + 1] for i, a in enumerate(argv) if a == "-e"]
    assert {"HOST_IP", "ETCD_ADDRESS", "FLUX_CHAIN", "FLUX_LISTEN_PROMETHEUS"} <= set(env_names)
    assert not any(name.startswith("FLUXD_") for name in env_names)
    # The listener comes from the environment, so no flag overrides it.
    assert argv[argv.index("example/fluxd:1") + 1 :] == [
        "-debug", "-balance", "p2c", "-host-ttl", "5",
    ]  # fmt: skip


def test_run_flux_stop_sends_sigterm_through_docker_stop(fake_docker: FakeDocker) -> None:
    fake_docker.state.write_text("running")
    result = fake_docker.run_flux("stop")
    assert result.returncode == 0, result.stderr
    commands = [c["argv"][:2] for c in fake_docker.calls()]  # type: ignore[index]
    assert commands[1:] == [["stop", "fluxd"], ["rm", "fluxd"]]
    fake_docker.log.unlink()
    result = fake_docker.run_flux("stop")
    assert result.returncode == 0 and "no container fluxd" in result.stdout
    assert [c["argv"][0] for c in fake_docker.calls()] == ["container"]  # type: ignore[index]


def test_run_flux_start_leaves_a_running_fluxd_and_restart_replaces_it(
    fake_docker: FakeDocker,
) -> None:
    environ = {"HOST_IP": "192.0.2.7", "ETCD_ADDRESS": "http://192.0.2.1:2379"}
    assert fake_docker.run_flux("start", **environ).returncode == 0
    again = fake_docker.run_flux("start", **environ)
    assert again.returncode == 0 and "already running" in again.stdout
    fake_docker.log.unlink()
    restarted = fake_docker.run_flux("restart", "-debug", **environ)
    assert restarted.returncode == 0, restarted.stderr
    commands = [c["argv"][0] for c in fake_docker.calls()]  # type: ignore[index]
    assert commands == ["container", "stop", "rm", "container", "run"]
    assert fake_docker.run_call()["argv"][-1] == "-debug"  # type: ignore[index]
    # A container that exited (not by run-flux stop) is replaced on start.
    fake_docker.state.write_text("exited")
    fake_docker.log.unlink()
    assert fake_docker.run_flux("start", **environ).returncode == 0
    commands = [c["argv"][0] for c in fake_docker.calls()]  # type: ignore[index]
    assert commands == ["container", "rm", "run"]


@pytest.mark.parametrize("args", [[], ["launch"], ["stop", "now"]])
def test_run_flux_unknown_subcommand_prints_usage(fake_docker: FakeDocker, args: list[str]) -> None:
    result = fake_docker.run_flux(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: run-flux start|stop|restart")
    assert fake_docker.calls() == []


# -- the deployment examples ---------------------------------------------------------------------


def _env_example() -> tuple[dict[str, str], set[str]]:
    """The example's active settings, and every variable it names (commented or not)."""
    active: dict[str, str] = {}
    named: set[str] = set()
    for line in (DEPLOY / "fluxd.env.example").read_text().splitlines():
        match = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(\S*)", line)
        if match:
            named.add(match.group(2))
            if not match.group(1):
                active[match.group(2)] = match.group(3)
    return active, named


def test_env_example_names_every_setting_and_its_values_parse() -> None:
    active, named = _env_example()
    assert named == {option.env for option in OPTIONS}
    assert {"HOST_IP", "ETCD_ADDRESS"} <= set(active)
    parsed = parse_args([], active)
    assert parsed.settings is not None and parsed.settings.listen_prometheus is not None


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze (package systemd) is not installed"
    # The unit as installed refers to /opt/flux and /etc/flux; point it at this checkout.
    unit = (DEPLOY / "fluxd.service").read_text()
    unit = unit.replace("/opt/flux/bin/fluxd", str(Path(sys.executable).parent / "fluxd"))
    unit = unit.replace("/etc/flux/fluxd.env", str(DEPLOY / "fluxd.env.example"))
    (tmp_path / "fluxd.service").write_text(unit)
    result = run("systemd-analyze", "verify", tmp_path / "fluxd.service", timeout=60)
    assert result.returncode == 0 and "fluxd.service" not in result.stderr, result.stderr


def test_compose_example_runs_fluxd_as_the_seed_does() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    fluxd = text[text.index("  fluxd:") :]
    for needed in ("network_mode: host", "- NET_ADMIN", "/var/run/docker.sock:/var/run/docker.sock",
                   "- fluxd.env", "stop_grace_period"):  # fmt: skip
        assert needed in fluxd, needed
