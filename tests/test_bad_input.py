"""Faults and bad input on one host, against a real fluxd, etcd and iptables.

Records written by someone other than fluxctl/fluxd, two services claiming one address, and an
``-advertise-prometheus`` name: each is named once in one line, and everything else is served.
Service addresses are in 127.42.0.0/16 (loopback); nothing leaves the machine.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.support.etcd_server import EtcdServer, free_port
from tests.support.fluxd_process import (
    HOST,
    Fluxd,
    chain_lines,
    http_get,
    iptables_save,
    wait_until,
)

FLUXD = [sys.executable, "-m", "flux"]
FLUXCTL = [sys.executable, "-m", "flux.fluxctl"]
SERVICE = "/weave-flux/service/"
# Another host's record, written by hand: the agent of the fluxd under test leaves instances of
# other hosts alone (it would remove hand-written ones of its own host).
OTHER_HOST = "127.0.0.2"


class _Answer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.server.answer)  # type: ignore[attr-defined]


@pytest.fixture
def backend() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that answers every connection with ``ok`` and closes it."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Answer)
    server.daemon_threads = True
    server.answer = b"ok"  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


_vips = itertools.count(secrets.randbelow(10_000))


def fresh_vip() -> str:
    """A service address in 127.42.150.0-127.42.199.255, a new one each time."""
    n = next(_vips) % 12_500
    return f"127.42.{150 + n // 250}.{n % 250 + 1}"


def ask(vip: str, port: int = 80) -> bytes:
    with socket.create_connection((vip, port), timeout=5) as sock:
        return sock.recv(16)


def put(etcd: EtcdServer, key: str, value: object) -> None:
    etcd.put(key, value if isinstance(value, str) else json.dumps(value))


def status(port: int) -> dict:
    document = json.loads(http_get(f"http://127.0.0.1:{port}/status"))
    return dict(document["balancer"]["services"])


def start_fluxd(etcd: EtcdServer, fluxd_factory: Callable[..., Fluxd]) -> tuple[Fluxd, int]:
    """A fluxd with /status on a free port, its chains installed, and OTHER_HOST registered."""
    put(etcd, f"/weave-flux/host/{OTHER_HOST}", {"address": OTHER_HOST})
    port = free_port()
    daemon = fluxd_factory("-host-ttl", "10", "-listen-prometheus", f"127.0.0.1:{port}")
    daemon.wait_logged("installed (nat and filter)")
    return daemon, port


def skipped(daemon: Fluxd, key: str) -> list[str]:
    return [line for line in daemon.lines if "skipping" in line and key in line]


def applied(etcd: EtcdServer, daemon: Fluxd) -> None:
    """Wait until fluxd has applied everything written so far (a marker service's rule)."""
    vip = fresh_vip()
    put(etcd, f"{SERVICE}marker-{vip}/spec", {"address": f"{vip}:80"})
    wait_until(lambda: any(vip in line for line in chain_lines(daemon.chain)), 15, "the marker")


# -- records written by others -----------------------------------------------------------------


def test_bad_records_are_logged_once_and_the_good_services_served(
    etcd: EtcdServer, fluxd_factory: Callable[..., Fluxd], backend: str
) -> None:
    daemon, port = start_fluxd(etcd, fluxd_factory)
    good = fresh_vip()
    put(etcd, f"{SERVICE}good/spec", {"address": f"{good}:80"})
    put(etcd, f"{SERVICE}good/instances/ok", {"host": {"address": OTHER_HOST}, "address": backend})
    bad = {
        f"{SERVICE}badjson/spec": "{not json",
        f"{SERVICE}badtype/spec": {"address": 80, "instancePort": "many"},
        f"{SERVICE}badaddress/spec": {"address": "web.example:80"},
        f"{SERVICE}huge/spec": {"address": f"{fresh_vip()}:80", "pad": "x" * (1 << 20)},
        f"{SERVICE}good/instances/labels": {
            "host": {"address": OTHER_HOST},
            "address": "127.0.0.1:9",
            "labels": {f"l{i}": "" for i in range(100_000)},
        },
        f"{SERVICE}good/instances/stray": {
            "host": {"address": "127.0.0.3"},
            "address": "127.0.0.1:9",
        },
        f"{SERVICE}nospec/instances/x": {"host": {"address": OTHER_HOST}, "address": backend},
    }
    for key, value in bad.items():
        put(etcd, key, value)
    wait_until(lambda: any(good in line and "DNAT" in line for line in chain_lines(daemon.chain)))
    assert ask(good) == b"ok"
    applied(etcd, daemon)
    assert [i["name"] for i in status(port)["good"]["instances"]] == ["ok"]

    # A broken watch takes a new snapshot of the same records: nothing new is logged.
    etcd.stop()
    etcd.start()
    daemon.wait_logged("taking a new snapshot", timeout=30)
    applied(etcd, daemon)
    assert ask(good) == b"ok"
    for key in bad:
        where = key.rsplit("/", 2)[0] + "/ has no spec" if "nospec" in key else key
        assert len(skipped(daemon, where)) == 1, (key, skipped(daemon, where))
    huge = skipped(daemon, f"{SERVICE}huge/spec")[0]
    assert "bytes, more than the 262144 a record may hold" in huge and len(huge) < 300
    assert "its host 127.0.0.3 is not registered" in skipped(daemon, "instances/stray")[0]
    # No record, however large, makes a long line; the start-up line listing every setting
    # is long by design (one name=value per setting) and is held to its own bound.
    assert all(len(line) < 600 for line in daemon.lines if "effective configuration" not in line)
    assert all(len(line) < 1000 for line in daemon.lines)

    # The same bad value again: silent; another bad value: one more line.
    put(etcd, f"{SERVICE}badjson/spec", "{not json")
    put(etcd, f"{SERVICE}badjson/spec", "[]")
    applied(etcd, daemon)
    assert len(skipped(daemon, f"{SERVICE}badjson/spec")) == 2
    # The stray instance's host registers: now it is served.
    put(etcd, "/weave-flux/host/127.0.0.3", {"address": "127.0.0.3"})
    wait_until(lambda: len(status(port)["good"]["instances"]) == 2, 15, "the stray instance")


# -- two services, one address -----------------------------------------------------------------


def rules_for(vip: str) -> list[str]:
    """Every rule in iptables that matches ``vip`` (any chain, any table)."""
    return [line for line in iptables_save().splitlines() if f"-d {vip}/32" in line]


def test_the_first_service_keeps_an_address_and_the_second_takes_over_when_it_goes(
    etcd: EtcdServer, fluxd_factory: Callable[..., Fluxd], backend: str
) -> None:
    daemon, port = start_fluxd(etcd, fluxd_factory)
    vip = fresh_vip()
    # Written by hand (fluxctl would refuse the second): web first, without instances ...
    put(etcd, f"{SERVICE}web/spec", {"address": f"{vip}:80"})
    # ... api second, with a live instance.
    put(etcd, f"{SERVICE}api/spec", {"address": f"{vip}:80"})
    put(etcd, f"{SERVICE}api/instances/a1", {"host": {"address": OTHER_HOST}, "address": backend})
    applied(etcd, daemon)
    wait_until(lambda: "api" in status(port), 10, "api in /status")
    lines = rules_for(vip)
    assert len(lines) == 1 and "REJECT" in lines[0], lines
    with pytest.raises(ConnectionRefusedError):
        ask(vip)
    assert status(port)["api"] == {
        "state": "conflict",
        "address": f"{vip}:80",
        "protocol": "tcp",
        "conflict": f"address {vip}:80 is also used by service web",
        "holder": "web",
        # Its settings, as for every service (the refused one keeps them for when it is in).
        "proxy_protocol": "",
        "forwarded": False,
    }
    assert status(port)["web"]["state"] == "rejecting"
    conflict = [line for line in daemon.lines if "is also used by" in line]
    assert len(conflict) == 1
    assert f"service api: address {vip}:80 is also used by service web" in conflict[0]
    # fluxctl sees what fluxd does.
    env = {**os.environ, "ETCD_ADDRESS": etcd.endpoint}
    info = subprocess.run([*FLUXCTL, "info", "-s", "api"], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert info.returncode == 0
    assert f"State: conflict: address {vip}:80 is also used by service web" in info.stdout
    refused = subprocess.run([*FLUXCTL, "service", "db", "--address", f"{vip}:80"], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 1 and 'already used by service "web"' in refused.stderr

    # web goes: api takes the address over, with one rule.
    subprocess.run([*FLUXCTL, "rm", "web"], env=env, check=True, capture_output=True, timeout=60)
    wait_until(lambda: any("DNAT" in line for line in rules_for(vip)), 15, "api's DNAT rule")
    assert len(rules_for(vip)) == 1
    assert ask(vip) == b"ok"
    assert status(port)["api"]["state"] == "forwarding" and "web" not in status(port)
    # web comes back: its spec is newer now, so api keeps the address.
    put(etcd, f"{SERVICE}web/spec", {"address": f"{vip}:80"})
    applied(etcd, daemon)
    assert status(port)["web"]["holder"] == "api"
    assert len(rules_for(vip)) == 1 and ask(vip) == b"ok"


# -- -advertise-prometheus with a DNS name -----------------------------------------------------


def test_advertise_name_is_resolved_and_its_ip_advertised(
    etcd: EtcdServer, fluxd_factory: Callable[..., Fluxd]
) -> None:
    port = free_port()
    daemon = fluxd_factory(
        "-listen-prometheus", f"{HOST}:{port}", "-advertise-prometheus", f"localhost:{port}"
    )
    key = f"/weave-flux/prometheus-targets/{HOST}"
    wait_until(lambda: etcd.get(key) is not None, 20, "the advertised target")
    assert json.loads(etcd.get(key) or "null") == f"127.0.0.1:{port}"
    daemon.wait_logged(f"-advertise-prometheus localhost:{port} resolves to 127.0.0.1")
    assert not daemon.logged("cannot advertise")


def test_advertise_name_that_does_not_resolve_exits_2_with_one_line() -> None:
    # In a network namespace of its own (only a down loopback), the lookup fails on this machine:
    # no query can reach a resolver elsewhere, whatever /etc/nsswitch.conf says.
    name = "flux-test.invalid"
    result = subprocess.run(
        ["unshare", "--net", *FLUXD, "-host-ip", HOST, "-listen-prometheus", f"{HOST}:9000",
         "-advertise-prometheus", f"{name}:9000"],
        env={**os.environ, "ETCD_ADDRESS": "http://127.0.0.1:9"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fluxd: -advertise-prometheus {name}:9000: cannot resolve")
