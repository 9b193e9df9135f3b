"""Faults and bad input on one host, against a real fluxd, etcd and iptables.

Records written by someone other than fluxctl/fluxd, two services claiming one address, and an
``-advertise-prometheus`` name: each is named once in one line, and everything else is served.
Service addresses are in 127.42.0.0/16 (loopback); nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from tests.etcd_server import EtcdServer, free_port
from tests.fluxd_process import HOST, Fluxd, wait_until

FLUXD = [sys.executable, "-m", "flux"]


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
