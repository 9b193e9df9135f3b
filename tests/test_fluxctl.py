"""fluxctl against a real etcd: every command's output, errors and what it leaves in the store.

Most cases call ``main(argv)`` in-process (fast); a handful run ``python -m flux.fluxctl`` and the
installed ``fluxctl`` script in a subprocess to prove the entry points and exit statuses.
Instances and hosts are written straight into etcd with etcdctl, as a fluxd agent would.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import flux
from flux import fluxctl
from flux.fluxctl import main
from tests.support.etcd_server import EtcdServer, free_port

PREFIX = "/weave-flux/"
SERVICE = PREFIX + "service/"


@dataclass(frozen=True)
class Result:
    status: int
    out: str
    err: str


class Ctl:
    """Runs fluxctl in-process against the test etcd and captures what it prints."""

    def __init__(self, etcd: EtcdServer, capsys: pytest.CaptureFixture[str]) -> None:
        self.etcd = etcd
        self.endpoint = etcd.endpoint
        self._capsys = capsys

    def __call__(self, *argv: str) -> Result:
        self._capsys.readouterr()
        status = main(list(argv))
        captured = self._capsys.readouterr()
        return Result(status, captured.out, captured.err)

    def ok(self, *argv: str) -> str:
        """Run a command that must succeed silently on stderr; return its stdout."""
        result = self(*argv)
        assert (result.status, result.err) == (0, ""), result
        return result.out

    def put(self, key: str, record: object) -> None:
        self.etcd.etcdctl("put", key, json.dumps(record))

    def record(self, key: str) -> object:
        value = self.etcd.get(key)
        assert value is not None, f"{key} is missing"
        return json.loads(value)

    def snapshot(self) -> tuple[int, dict[str, str]]:
        """The store's revision (bumped by every write, even of an equal value) and every key
        and value, in one etcdctl call."""
        out = json.loads(self.etcd.etcdctl("get", "", "--from-key", "-w", "json"))
        values = {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in out.get("kvs", [])
        }
        return int(out["header"]["revision"]), values

    def refused(self, status: int, *argv: str) -> str:
        """Run a command that must fail with ``status``, one stderr line, no stdout and no
        change to the store; return the stderr line."""
        before = self.snapshot()
        result = self(*argv)
        assert result.status == status, result
        assert result.out == ""
        lines = result.err.splitlines()
        assert len(lines) == 1, result.err
        assert lines[0].startswith("fluxctl: ")
        assert "Traceback" not in result.err
        assert self.snapshot() == before
        return lines[0]


def use_etcd(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point fluxctl at ``endpoint`` with no TLS or authentication settings."""
    monkeypatch.setenv("ETCD_ADDRESS", endpoint)
    for name in ("CA_FILE", "CERT_FILE", "KEY_FILE", "USERNAME", "PASSWORD"):
        monkeypatch.delenv(f"ETCD_{name}", raising=False)


@pytest.fixture
def ctl(
    etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Ctl:
    use_etcd(monkeypatch, etcd.endpoint)
    return Ctl(etcd, capsys)


def unreachable_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


def instance(
    host: str,
    address: str | None = None,
    *,
    rule: str = "",
    labels: dict[str, str] | None = None,
    state: str | None = None,
) -> dict[str, object]:
    record: dict[str, object] = {"host": {"address": host}, "containerRule": rule, "labels": labels}
    if address is not None:
        record["address"] = address
    if state is not None:
        record["state"] = state
    return record


# -- the original's tests (reference §5.10) ----------------------------------------------------


class TestList:
    def test_one_service(self, ctl: Ctl) -> None:
        ctl.ok("service", "foo")
        assert ctl("list") == Result(0, "foo\n", "")


class TestSelect:
    def test_select_and_deselect(self, ctl: Ctl) -> None:
        line = ctl.refused(1, "select", "foo-svc", "ok-rule", "--image", "foo/bar")
        assert line == 'fluxctl: no service named "foo-svc"'

        ctl.ok("service", "foo-svc")
        line = ctl.refused(2, "select", "foo-svc", "empty-rule")
        assert line == "fluxctl: Nothing will be selected by empty rule"

        result = ctl("select", "foo-svc", "ok-rule", "--image", "foo/bar")
        assert result == Result(0, "ok-rule\n", "")
        assert ctl.record(SERVICE + "foo-svc/rules/ok-rule") == {"selector": {"image": "foo/bar"}}
        assert ctl.etcd.keys(SERVICE + "foo-svc/rules/") == [SERVICE + "foo-svc/rules/ok-rule"]

        assert ctl("deselect", "foo-svc", "ok-rule") == Result(0, "ok-rule\n", "")
        assert ctl.etcd.keys(SERVICE + "foo-svc/rules/") == []


class TestService:
    def test_no_argument(self, ctl: Ctl) -> None:
        line = ctl.refused(2, "service")
        assert "required: name" in line


class TestMinimal:
    def test_creates_exactly_one_service(self, ctl: Ctl) -> None:
        assert ctl("service", "foo") == Result(0, "foo\n", "")
        assert ctl.etcd.keys("") == [SERVICE + "foo/spec"]
        assert ctl.record(SERVICE + "foo/spec") == {}


class TestParseAddress:
    def test_address_without_port(self, ctl: Ctl) -> None:
        line = ctl.refused(2, "service", "foo", "--address", "10.3.4.5")
        assert line == (
            'fluxctl: Did not understand the address supplied "10.3.4.5"; '
            "expected to be ipaddress:port"
        )

    def test_address_with_port(self, ctl: Ctl) -> None:
        ctl.ok("service", "foo", "--address", "192.168.45.76:8000")
        assert ctl.record(SERVICE + "foo/spec") == {
            "address": "192.168.45.76:8000",
            "instancePort": 8000,
        }


class TestServiceAddress:
    def test_address_and_instance_port(self, ctl: Ctl) -> None:
        ctl.ok("service", "foo", "--address", "10.3.4.5:8000", "--instance-port", "7777")
        spec = ctl.record(SERVICE + "foo/spec")
        assert spec == {"address": "10.3.4.5:8000", "instancePort": 7777}


class TestServiceSelect:
    def test_selector_flags_make_the_default_rule(self, ctl: Ctl) -> None:
        ctl.ok("service", "svc", "--image", "repo/image")
        assert ctl.record(SERVICE + "svc/rules/default") == {"selector": {"image": "repo/image"}}


# -- service ------------------------------------------------------------------------------------


def test_service_with_every_flag(ctl: Ctl) -> None:
    out = ctl.ok(
        "service", "web", "--address", "10.128.0.1:80", "-p", "http", "--instance-port", "8080",
        "--image", "nginx", "--tag", "1.25", "--labels", "tier=front,team=a",
        "--env", "MODE=prod,URL=http://x/?a=b",
    )
    assert out == "web\n"
    assert ctl.record(SERVICE + "web/spec") == {
        "address": "10.128.0.1:80",
        "instancePort": 8080,
        "protocol": "http",
    }
    assert ctl.record(SERVICE + "web/rules/default") == {
        "selector": {
            "image": "nginx",
            "tag": "1.25",
            "tier": "front",
            "team": "a",
            "env.MODE": "prod",
            "env.URL": "http://x/?a=b",
        }
    }


def test_service_ipv6_address(ctl: Ctl) -> None:
    ctl.ok("service", "v6", "--address", "[fd00::1]:443", "--protocol", "tcp")
    assert ctl.record(SERVICE + "v6/spec") == {
        "address": "[fd00::1]:443",
        "instancePort": 443,
        "protocol": "tcp",
    }


def test_service_replaces_the_spec_and_keeps_rules(ctl: Ctl) -> None:
    ctl.ok("service", "web", "--address", "10.128.0.1:80", "-p", "http", "--image", "nginx")
    ctl.ok("service", "web")
    assert ctl.record(SERVICE + "web/spec") == {}
    assert ctl.record(SERVICE + "web/rules/default") == {"selector": {"image": "nginx"}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["service", "bad/name"], "invalid service name 'bad/name'"),
        (["service", "-lead"], "required: name"),
        (["service", "x" * 64], "invalid service name"),
        (["service", "web", "--address", "10.3.4.5:0"], "port must be 1-65535"),
        (["service", "web", "--address", "10.3.4.5:99999"], "port must be 1-65535"),
        (["service", "web", "--address", "web:80"], "'web' is not an IP address"),
        (["service", "web", "--address", "0.0.0.0:80"], "must not be unspecified"),
        (["service", "web", "--address", ":80"], 'address supplied ":80"'),
        (["service", "web", "-p", "udp"], "invalid choice: 'udp'"),
        (["service", "web", "--instance-port", "0"], "invalid port '0': must be 1-65535"),
        (["service", "web", "--instance-port", "65536"], "invalid port '65536'"),
        (["service", "web", "--instance-port", "http"], "invalid port 'http': not a number"),
        (["service", "web", "--labels", "=x"], "--labels '=x': every item needs a name"),
        (["service", "web", "--env", "a=1,=2"], "--env 'a=1,=2': every item needs a name"),
        (["service", "web", "extra"], "unrecognized arguments: extra"),
        (["service", "web", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_service_refuses_bad_input(ctl: Ctl, argv: list[str], message: str) -> None:
    ctl.ok("service", "keep", "--address", "10.0.0.1:80")
    assert message in ctl.refused(2, *argv)


# -- select / deselect --------------------------------------------------------------------------


def test_select_default_rule_with_instance_port_and_env(ctl: Ctl) -> None:
    ctl.ok("service", "web")
    assert ctl.ok("select", "web", "--env", "ROLE=web", "--instance-port", "8080") == "default\n"
    assert ctl.record(SERVICE + "web/rules/default") == {
        "selector": {"env.ROLE": "web"},
        "instancePort": 8080,
    }
    # Selecting again replaces the rule wholesale.
    ctl.ok("select", "web", "--tag", "2")
    assert ctl.record(SERVICE + "web/rules/default") == {"selector": {"tag": "2"}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["select", "web", "bad rule", "--image", "x"], "invalid rule name 'bad rule'"),
        (["select", "web", "r", "--labels", ","], "Nothing will be selected by empty rule"),
        (["select", "web", "r", "--image", "x", "--instance-port", "-1"], "invalid port '-1'"),
        (["select"], "required: service"),
        (["deselect", "web", "a/b"], "invalid rule name 'a/b'"),
        (["deselect"], "required: service"),
    ],
)
def test_select_refuses_bad_input(ctl: Ctl, argv: list[str], message: str) -> None:
    ctl.ok("service", "web", "--image", "nginx")
    assert message in ctl.refused(2, *argv)


def test_deselect_default_rule(ctl: Ctl) -> None:
    ctl.ok("service", "web", "--image", "nginx")
    assert ctl("deselect", "web") == Result(0, "default\n", "")
    assert ctl.etcd.keys(SERVICE + "web/rules/") == []
    assert ctl.etcd.keys(SERVICE) == [SERVICE + "web/spec"]


def test_deselect_unknown_rule_or_service(ctl: Ctl) -> None:
    ctl.ok("service", "web", "--image", "nginx")
    line = ctl.refused(1, "deselect", "web", "other")
    assert line == 'fluxctl: service "web" has no rule named "other"'
    line = ctl.refused(1, "deselect", "api", "default")
    assert line == 'fluxctl: no service named "api"'


# -- rm -----------------------------------------------------------------------------------------


def test_rm_one_service_with_its_rules_and_instances(ctl: Ctl) -> None:
    ctl.ok("service", "web", "--image", "nginx")
    ctl.ok("service", "api")
    ctl.put(SERVICE + "web/instances/c1", instance("10.0.0.2", "10.0.0.2:3000"))
    assert ctl("rm", "web") == Result(0, "", "")
    assert ctl.etcd.keys("") == [SERVICE + "api/spec"]


def test_rm_all(ctl: Ctl) -> None:
    ctl.ok("service", "web", "--image", "nginx")
    ctl.ok("service", "api")
    ctl.put(PREFIX + "host/10.0.0.2", {"address": "10.0.0.2"})
    assert ctl("rm", "--all") == Result(0, "", "")
    assert ctl.etcd.keys(SERVICE) == []
    # Only services go; hosts belong to their fluxd.
    assert ctl.etcd.keys("") == [PREFIX + "host/10.0.0.2"]
    assert ctl("rm", "--all") == Result(0, "", "")


def test_rm_refusals(ctl: Ctl) -> None:
    ctl.ok("service", "web")
    assert ctl.refused(1, "rm", "api") == 'fluxctl: no service named "api"'
    line = ctl.refused(2, "rm")
    assert line.startswith('fluxctl: Please supply either a service name, or "--all"')
    assert "not allowed with" in ctl.refused(2, "rm", "web", "--all")
    assert "unrecognized arguments: api" in ctl.refused(2, "rm", "web", "api")
    assert "invalid service name" in ctl.refused(2, "rm", "a/b")


# -- list ---------------------------------------------------------------------------------------


@pytest.fixture
def services(ctl: Ctl) -> Ctl:
    """Three services, created out of order, with rules."""
    ctl.ok("service", "web", "--address", "10.128.0.1:80", "-p", "http", "--image", "nginx")
    ctl.ok("select", "web", "canary", "--image", "nginx", "--tag", "next", "--instance-port", "81")
    ctl.ok("service", "api", "--address", "10.128.0.2:8080", "--instance-port", "9000")
    ctl.ok("service", "db")
    ctl.ok("select", "db", "--labels", "role=db")
    return ctl


def test_list_is_sorted(services: Ctl) -> None:
    assert services.ok("list") == "api\ndb\nweb\n"


def test_list_verbose(services: Ctl) -> None:
    assert services.ok("list", "-v") == (
        "api\n"
        "  Address: 10.128.0.2:8080\n"
        "  Instance port: 9000\n"
        "db\n"
        '  Rule: default {"role":"db"}\n'
        "web\n"
        "  Address: 10.128.0.1:80\n"
        "  Instance port: 80\n"
        "  Protocol: http\n"
        '  Rule: canary {"image":"nginx","tag":"next"}\n'
        '  Rule: default {"image":"nginx"}\n'
    )


def test_list_empty(ctl: Ctl) -> None:
    assert ctl("list") == Result(0, "", "")
    assert ctl("list", "-o", "json") == Result(0, '{\n  "services": {}\n}\n', "")


def test_list_format(services: Ctl) -> None:
    out = services.ok("list", "--format", "{name}|{address}|{instancePort}|{protocol}")
    assert out == "api|10.128.0.2:8080|9000|\ndb||0|\nweb|10.128.0.1:80|80|http\n"
    out = services.ok("list", "-f", "{name:>4} {address!j} {rules}")
    assert out == (
        ' api "10.128.0.2:8080" {}\n'
        '  db "" {"default":{"selector":{"role":"db"}}}\n'
        ' web "10.128.0.1:80" {"canary":{"instancePort":81,"selector":{"image":"nginx",'
        '"tag":"next"}},"default":{"selector":{"image":"nginx"}}}\n'
    )


def test_list_format_index_depends_on_the_data(ctl: Ctl) -> None:
    ctl.ok("service", "database")
    assert ctl.ok("list", "-f", "{name[0]}{name[4]}") == "db\n"
    ctl.ok("service", "web")
    line = ctl.refused(2, "list", "-f", "{name[4]}")
    assert line == "fluxctl: --format '{name[4]}': string index out of range"


def test_list_format_instances(ctl: Ctl) -> None:
    ctl.ok("service", "web")
    ctl.put(SERVICE + "web/instances/c1", instance("10.0.0.2", "10.0.0.2:80"))
    assert ctl.ok("list", "-f", "{name} {instances}") == (
        'web {"c1":{"address":"10.0.0.2:80","containerRule":"","host":{"address":"10.0.0.2"},'
        '"labels":null,"state":"live"}}\n'
    )
    assert ctl.ok("list", "-f", "{instances[c1][host][address]}") == "10.0.0.2\n"


def test_list_format_rule(services: Ctl) -> None:
    out = services.ok(
        "list", "-f", "{name}", "--format-rule", "  {service}/{name} {selector} {instancePort}"
    )
    assert out == (
        "api\n"
        "db\n"
        '  db/default {"role":"db"} 0\n'
        "web\n"
        '  web/canary {"image":"nginx","tag":"next"} 81\n'
        '  web/default {"image":"nginx"} 0\n'
    )
    # A missing selector entry renders as empty; --format-rule alone implies -v.
    out = services.ok("list", "--format-rule", "{name}:{selector[tag]}")
    assert out.splitlines()[-3:] == ["  Protocol: http", "canary:next", "default:"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["list", "-f", "{nope}"], 'unknown field "nope"; fields are name, address,'),
        (["list", "-f", "{name} {Name}"], 'unknown field "Name"'),
        (["list", "--format-rule", "{address}"], 'unknown field "address"; fields are service,'),
        (["list", "-f", "{name"], "expected '}' before end of string"),
        (["list", "-f", "name}"], "Single '}' encountered"),
        (["list", "-f", "{}"], "positional fields are not allowed"),
        (["list", "-f", "{0}"], 'unknown field "0"'),
        (["list", "-f", "{name:d}"], "Unknown format code 'd'"),
        (["list", "-f", "{name!x}"], "unknown conversion !x"),
        (["list", "-f", "{name.nope}"], "has no attribute 'nope'"),
        (["list", "-f", "{name:{nope}}"], 'unknown field "nope"'),
        (["list", "-o", "json", "-f", "{name}"], "-o json cannot be combined"),
        (["list", "-o", "yaml"], "invalid choice: 'yaml'"),
    ],
)
def test_list_bad_format(services: Ctl, argv: list[str], message: str) -> None:
    line = services.refused(2, *argv)
    assert message in line
    assert line.startswith("fluxctl: ")


def test_list_json(services: Ctl) -> None:
    out = services.ok("list", "-o", "json")
    assert list(json.loads(out)["services"]) == ["api", "db", "web"]
    assert json.loads(out) == {
        "services": {
            "api": {"spec": {"address": "10.128.0.2:8080", "instancePort": 9000}, "rules": {}},
            "db": {"spec": {}, "rules": {"default": {"selector": {"role": "db"}}}},
            "web": {
                "spec": {"address": "10.128.0.1:80", "instancePort": 80, "protocol": "http"},
                "rules": {
                    "canary": {"selector": {"image": "nginx", "tag": "next"}, "instancePort": 81},
                    "default": {"selector": {"image": "nginx"}},
                },
            },
        }
    }


# -- info and query (instances and hosts written as fluxd would) -------------------------------


@pytest.fixture
def enrolled(services: Ctl) -> Ctl:
    services.put(PREFIX + "host/10.0.0.10", {"address": "10.0.0.10", "version": "0.1.0"})
    services.put(PREFIX + "host/10.0.0.9", {"address": "10.0.0.9"})
    services.put(
        SERVICE + "web/instances/bbb222",
        instance("10.0.0.9", "10.0.0.9:32768", rule="default", labels={"app": "w"}, state="live"),
    )
    services.put(
        SERVICE + "web/instances/aaa111",
        instance("10.0.0.10", "10.0.0.10:32770", rule="canary", labels={"app": "w"},
                 state="draining"),
    )
    services.put(
        SERVICE + "web/instances/ccc333",
        instance(
            "10.0.0.9",
            None,
            rule="default",
            labels={"app": "w", "v": "2", "image": "nginx", "env.ROLE": "front"},
        ),
    )
    # An original-style record: no state, so it is derived from the address (live).
    services.put(SERVICE + "db/instances/ddd444", instance("10.0.0.10", "10.0.0.10:5432"))
    services.put(
        SERVICE + "db/instances/eee555",
        instance("10.0.0.9", "10.0.0.9:5432", rule="default", state="unhealthy"),
    )
    return services


INFO = """\
HOSTS
10.0.0.9
10.0.0.10

SERVICES
api
  Address: 10.128.0.2:8080
  Instance port: 9000
  RULES
  INSTANCES
db
  RULES
    default {"role":"db"}
  INSTANCES
    ddd444 10.0.0.10:5432 live
    eee555 10.0.0.9:5432 unhealthy
web
  Address: 10.128.0.1:80
  Instance port: 80
  Protocol: http
  RULES
    canary {"image":"nginx","tag":"next"}
    default {"image":"nginx"}
  INSTANCES
    aaa111 10.0.0.10:32770 draining
    bbb222 10.0.0.9:32768 live
    ccc333 <nil> no address
"""


def test_info(enrolled: Ctl) -> None:
    assert enrolled.ok("info") == INFO


def test_info_one_service(enrolled: Ctl) -> None:
    assert enrolled.ok("info", "-s", "db") == (
        "HOSTS\n10.0.0.9\n10.0.0.10\n\nSERVICES\n"
        "db\n"
        "  RULES\n"
        '    default {"role":"db"}\n'
        "  INSTANCES\n"
        "    ddd444 10.0.0.10:5432 live\n"
        "    eee555 10.0.0.9:5432 unhealthy\n"
    )
    assert enrolled.refused(1, "info", "--service", "nope") == 'fluxctl: no service named "nope"'


def test_info_empty(ctl: Ctl) -> None:
    assert ctl.ok("info") == "HOSTS\n\nSERVICES\n"


def test_info_json(enrolled: Ctl) -> None:
    document = json.loads(enrolled.ok("info", "-o", "json", "-s", "db"))
    assert document == {
        "hosts": {
            "10.0.0.10": {"address": "10.0.0.10", "version": "0.1.0"},
            "10.0.0.9": {"address": "10.0.0.9"},
        },
        "services": {
            "db": {
                "spec": {},
                "rules": {"default": {"selector": {"role": "db"}}},
                "instances": {
                    "ddd444": {
                        "host": {"address": "10.0.0.10"},
                        "address": "10.0.0.10:5432",
                        "containerRule": "",
                        "labels": None,
                        "state": "live",
                    },
                    "eee555": {
                        "host": {"address": "10.0.0.9"},
                        "address": "10.0.0.9:5432",
                        "containerRule": "default",
                        "labels": None,
                        "state": "unhealthy",
                    },
                },
            }
        },
    }
    assert list(json.loads(enrolled.ok("info", "-o", "json"))["services"]) == ["api", "db", "web"]


def test_query_table(enrolled: Ctl) -> None:
    assert enrolled.ok("query") == (
        "SERVICE  INSTANCE  ADDRESS          STATE\n"
        "db       ddd444    10.0.0.10:5432   live\n"
        "db       eee555    10.0.0.9:5432    unhealthy\n"
        "web      aaa111    10.0.0.10:32770  draining\n"
        "web      bbb222    10.0.0.9:32768   live\n"
        "web      ccc333    <nil>            no address\n"
    )


def test_query_nothing_found(enrolled: Ctl) -> None:
    assert enrolled.ok("query", "--image", "nope") == "SERVICE  INSTANCE  ADDRESS  STATE\n"
    assert enrolled.ok("query", "-q", "--image", "nope") == ""


QUERY_FILTERS = [
    ([], ["ddd444", "eee555", "aaa111", "bbb222", "ccc333"]),
    (["-s", "web"], ["aaa111", "bbb222", "ccc333"]),
    (["--host", "10.0.0.9"], ["eee555", "bbb222", "ccc333"]),
    (["--state", "live"], ["ddd444", "bbb222"]),
    (["--state", "no address"], ["ccc333"]),
    (["--state", "draining"], ["aaa111"]),
    (["--state", "unhealthy"], ["eee555"]),
    (["--state", "paused"], []),
    (["--rule", "default"], ["eee555", "bbb222", "ccc333"]),
    (["--rule", "canary", "-s", "web"], ["aaa111"]),
    (["--labels", "app=w"], ["aaa111", "bbb222", "ccc333"]),
    (["--labels", "app=w,v=2"], ["ccc333"]),
    (["--labels", "v="], ["ddd444", "eee555", "aaa111", "bbb222"]),
    (["--host", "10.0.0.9", "--state", "live", "--rule", "default"], ["bbb222"]),
    (["-s", "db", "--host", "10.0.0.10"], ["ddd444"]),
    (["--image", "nginx"], ["ccc333"]),
    (["--env", "ROLE=front"], ["ccc333"]),
    (["--env", "ROLE=back"], []),
    (["--labels", "ROLE=front"], []),
]


def test_query_filters(enrolled: Ctl) -> None:
    # One table over one set of records: building the records is the slow part.
    for filters, names in QUERY_FILTERS:
        assert enrolled.ok("query", "-q", *filters).splitlines() == names, filters


def test_query_format(enrolled: Ctl) -> None:
    out = enrolled.ok(
        "query", "-s", "web", "--format",
        "{service} {name} {state} {host} {containerRule} {address} {labels} [{labels[v]}]",
    )
    assert out == (
        'web aaa111 draining 10.0.0.10 canary 10.0.0.10:32770 {"app":"w"} []\n'
        'web bbb222 live 10.0.0.9 default 10.0.0.9:32768 {"app":"w"} []\n'
        'web ccc333 no address 10.0.0.9 default  {"app":"w","env.ROLE":"front","image":"nginx",'
        '"v":"2"} [2]\n'
    )


def test_query_json(enrolled: Ctl) -> None:
    document = json.loads(enrolled.ok("query", "-o", "json", "--host", "10.0.0.9"))
    assert document == {
        "instances": [
            {
                "service": "db",
                "name": "eee555",
                "host": {"address": "10.0.0.9"},
                "address": "10.0.0.9:5432",
                "containerRule": "default",
                "labels": None,
                "state": "unhealthy",
            },
            {
                "service": "web",
                "name": "bbb222",
                "host": {"address": "10.0.0.9"},
                "address": "10.0.0.9:32768",
                "containerRule": "default",
                "labels": {"app": "w"},
                "state": "live",
            },
            {
                "service": "web",
                "name": "ccc333",
                "host": {"address": "10.0.0.9"},
                "containerRule": "default",
                "labels": {"app": "w", "v": "2", "image": "nginx", "env.ROLE": "front"},
                "state": "no address",
            },
        ]
    }


QUERY_REFUSALS = [
    (["query", "-q", "-f", "{name}"], 2, "not allowed with argument"),
    (["query", "-o", "json", "-q"], 2, "not allowed with argument"),
    (["query", "-f", "{nope}"], 2, 'unknown field "nope"; fields are service, name, state'),
    (["query", "-f", "{address"], 2, "expected '}'"),
    (["query", "--state", "dead"], 2, "invalid choice: 'dead'"),
    (["query", "--host", "host1"], 2, "invalid --host 'host1': not an IP address"),
    (["query", "--rule", "a/b"], 2, "invalid rule name 'a/b'"),
    (["query", "--labels", "=v"], 2, "every item needs a name"),
    (["query", "-s", "nope"], 1, 'no service named "nope"'),
]


def test_query_refusals(enrolled: Ctl) -> None:
    for argv, status, message in QUERY_REFUSALS:
        assert message in enrolled.refused(status, *argv), argv


def test_bad_records_are_skipped_with_a_warning(ctl: Ctl) -> None:
    ctl.ok("service", "web", "--image", "nginx")
    ctl.etcd.etcdctl("put", SERVICE + "junk/spec", "{not json")
    ctl.put(SERVICE + "odd/spec", {"protocol": "udp"})
    ctl.put(SERVICE + "web/rules/broken", {"selector": {"": "x"}})
    result = ctl("list", "-v")
    assert (result.status, result.out) == (0, 'web\n  Rule: default {"image":"nginx"}\n')
    warnings = result.err.splitlines()
    assert len(warnings) == 3, result.err
    assert all(line.startswith("fluxctl: warning: ") for line in warnings)
    for key in ("junk/spec", "odd/spec", "web/rules/broken"):
        assert any(key in line for line in warnings), (key, warnings)


# -- version, help, usage -----------------------------------------------------------------------


class NoEtcd(Ctl):
    """fluxctl pointed at a loopback port nothing listens on."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.endpoint = unreachable_endpoint()
        self._capsys = capsys


@pytest.fixture
def no_etcd(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Ctl:
    ctl = NoEtcd(capsys)
    use_etcd(monkeypatch, ctl.endpoint)
    return ctl


def test_version_without_etcd(no_etcd: Ctl) -> None:
    banner = f"fluxctl version {flux.__version__}\n"
    assert no_etcd("version") == Result(0, banner, "")
    assert no_etcd("--version") == Result(0, banner, "")


def test_help_without_etcd(no_etcd: Ctl) -> None:
    result = no_etcd("--help")
    assert (result.status, result.err) == (0, "")
    for command in ("service", "select", "deselect", "rm", "list", "info", "query", "version"):
        assert command in result.out
    result = no_etcd("query", "--help")
    assert (result.status, result.err) == (0, "")
    assert "--quiet" in result.out and "--env" in result.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["version", "extra"], "unrecognized arguments: extra"),
        ([], "missing command"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_without_etcd(no_etcd: Ctl, argv: list[str], message: str) -> None:
    result = no_etcd(*argv)
    assert result.status == 2 and result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fluxctl: ") and message in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["list"],
        ["info"],
        ["query"],
        ["service", "web"],
        ["rm", "--all"],
        ["select", "web", "--tag", "1"],
    ],
)
def test_unreachable_etcd_is_one_line_naming_it(no_etcd: Ctl, argv: list[str]) -> None:
    started = time.monotonic()
    result = no_etcd(*argv)
    assert time.monotonic() - started < 10
    assert (result.status, result.out) == (1, "")
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("fluxctl: ")
    assert no_etcd.endpoint in lines[0]


def test_several_endpoints_fail_over(ctl: Ctl, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = unreachable_endpoint()
    monkeypatch.setenv("ETCD_ADDRESS", f"{dead}, {ctl.endpoint},")
    assert ctl.ok("service", "web") == "web\n"
    assert ctl.etcd.keys("") == [SERVICE + "web/spec"]


def test_default_endpoint() -> None:
    assert fluxctl._endpoints({}) == ["http://127.0.0.1:2379"]
    assert fluxctl._endpoints({"ETCD_ADDRESS": ""}) == ["http://127.0.0.1:2379"]
    assert fluxctl._endpoints({"ETCD_ADDRESS": "a:1, b:2"}) == ["a:1", "b:2"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ETCD_ADDRESS": "ftp://127.0.0.1:2379"}, "invalid etcd endpoint 'ftp://127.0.0.1:2379'"),
        ({"ETCD_CA_FILE": "/nonexistent/ca.pem"}, "cannot load the etcd TLS files"),
        ({"ETCD_PASSWORD": "secret"}, "an etcd password needs a user name too"),
    ],
)
def test_bad_etcd_configuration(
    no_etcd: Ctl, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = no_etcd("list")
    assert (result.status, result.out) == (1, "")
    assert len(result.err.splitlines()) == 1 and message in result.err, result.err
    assert "secret" not in result.err


# -- the entry points, in a subprocess ----------------------------------------------------------


def run_fluxctl(
    *argv: str, endpoint: str, command: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    env["ETCD_ADDRESS"] = endpoint
    return subprocess.run(
        [*(command or [sys.executable, "-m", "flux.fluxctl"]), *argv],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_module_entry_point(etcd: EtcdServer) -> None:
    result = run_fluxctl("service", "web", "--address", "10.0.0.1:80", endpoint=etcd.endpoint)
    assert (result.returncode, result.stdout, result.stderr) == (0, "web\n", "")
    result = run_fluxctl("list", "-v", endpoint=etcd.endpoint)
    assert (result.returncode, result.stdout) == (
        0, "web\n  Address: 10.0.0.1:80\n  Instance port: 80\n"
    )
    result = run_fluxctl("deselect", "web", endpoint=etcd.endpoint)
    assert result.returncode == 1
    assert result.stderr == 'fluxctl: service "web" has no rule named "default"\n'


def test_module_entry_point_usage_error(etcd: EtcdServer) -> None:
    result = run_fluxctl("service", "web", "--address", "10.0.0.1", endpoint=etcd.endpoint)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        'fluxctl: Did not understand the address supplied "10.0.0.1"; '
        "expected to be ipaddress:port\n"
    )
    assert etcd.keys("") == []


def test_module_entry_point_without_etcd() -> None:
    endpoint = unreachable_endpoint()
    result = run_fluxctl("version", endpoint=endpoint)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"fluxctl version {flux.__version__}\n", ""
    )
    result = run_fluxctl("list", endpoint=endpoint)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and endpoint in result.stderr


def test_console_script(etcd: EtcdServer) -> None:
    script = Path(sys.executable).parent / "fluxctl"
    result = run_fluxctl("service", "api", endpoint=etcd.endpoint, command=[str(script)])
    assert (result.returncode, result.stdout, result.stderr) == (0, "api\n", "")
    result = run_fluxctl("rm", "nope", endpoint=etcd.endpoint, command=[str(script)])
    assert (result.returncode, result.stderr) == (1, 'fluxctl: no service named "nope"\n')
    assert etcd.keys("") == [SERVICE + "api/spec"]


def test_targets_lists_advertised_endpoints_and_writes_file_sd(ctl: Ctl) -> None:
    assert ctl.ok("targets") == ""
    assert json.loads(ctl.ok("targets", "-o", "file-sd")) == []
    for host, target in (("10.0.0.10", "10.0.0.10:9000"), ("10.0.0.9", "10.0.0.9:9000"),
                         ("10.0.0.2", "10.0.0.2:9100")):
        ctl.put(f"/weave-flux/prometheus-targets/{host}", target)
    ctl.etcd.etcdctl("put", "/weave-flux/prometheus-targets/10.0.0.3", "not json")
    ordered = ["10.0.0.2:9100", "10.0.0.9:9000", "10.0.0.10:9000"]
    result = ctl("targets")
    assert (result.status, result.out.splitlines()) == (0, ordered)
    assert "10.0.0.3" in result.err  # the bad record is named, the rest still listed
    document = json.loads(ctl("targets", "-o", "file-sd").out)
    assert document == [{"targets": ordered, "labels": {}}]


# -- two services, one address; instances of hosts that are not registered ----------------------


def test_service_refuses_an_address_another_service_has(ctl: Ctl) -> None:
    ctl.ok("service", "web", "--address", "127.42.0.9:80")
    line = ctl.refused(1, "service", "api", "--address", "127.42.0.9:80", "--image", "x")
    assert line == (
        'fluxctl: address 127.42.0.9:80 is already used by service "web": give "api" another'
        ' address, or move or remove "web" first'
    )
    assert ctl.ok("service", "web", "--address", "127.42.0.9:80", "-p", "http") == "web\n"
    assert ctl.ok("service", "api", "--address", "127.42.0.9:81") == "api\n"
    # Moving web away frees the address.
    ctl.ok("service", "web", "--address", "127.42.0.10:80")
    assert ctl.ok("service", "db", "--address", "127.42.0.9:80") == "db\n"


def test_info_and_query_show_conflicts_and_skip_instances_of_unregistered_hosts(ctl: Ctl) -> None:
    # Written by another tool: fluxctl would have refused the second spec.
    ctl.put(SERVICE + "web/spec", {"address": "127.42.0.9:80"})
    ctl.put(SERVICE + "api/spec", {"address": "127.42.0.9:80"})
    ctl.put(PREFIX + "host/10.0.0.9", {"address": "10.0.0.9"})
    ctl.put(SERVICE + "web/instances/good", instance("10.0.0.9", "10.0.0.9:8080", state="live"))
    ctl.put(SERVICE + "web/instances/stray", instance("10.0.0.66", "10.0.0.66:8080"))
    warning = (
        "fluxctl: warning: skipping /weave-flux/service/web/instances/stray: its host 10.0.0.66"
        " is not registered (no /weave-flux/host/10.0.0.66 record)\n"
    )

    result = ctl("info")
    assert (result.status, result.err) == (0, warning)
    assert result.out == (
        "HOSTS\n10.0.0.9\n\nSERVICES\n"
        "api\n  Address: 127.42.0.9:80\n"
        "  State: conflict: address 127.42.0.9:80 is also used by service web\n"
        "  RULES\n  INSTANCES\n"
        "web\n  Address: 127.42.0.9:80\n  RULES\n  INSTANCES\n    good 10.0.0.9:8080 live\n"
    )
    single = ctl("info", "-s", "api")
    assert "State: conflict: address 127.42.0.9:80 is also used by service web" in single.out
    document = json.loads(ctl("info", "-o", "json").out)
    assert document["services"]["api"]["conflict"] == (
        "address 127.42.0.9:80 is also used by service web"
    )
    assert "conflict" not in document["services"]["web"]
    query = ctl("query", "-q")
    assert (query.status, query.out, query.err) == (0, "good\n", warning)


# -- published ports ------------------------------------------------------------------------------


def test_service_publish_writes_the_port_and_defaults_the_instance_port(ctl: Ctl) -> None:
    assert ctl.ok("service", "web", "--publish", "8080", "-p", "http", "--image", "x") == "web\n"
    assert ctl.record(SERVICE + "web/spec") == {
        "instancePort": 8080,
        "protocol": "http",
        "publish": 8080,
    }
    ctl.ok("service", "api", "--address", "10.128.0.1:80", "--publish", "8081")
    assert ctl.record(SERVICE + "api/spec") == {
        "address": "10.128.0.1:80",
        "instancePort": 80,
        "publish": 8081,
    }
    out = ctl.ok("list", "-f", "{name} {publish} {address}")
    assert out == "api 8081 10.128.0.1:80\nweb 8080 \n"
    assert "  Published port: 8081\n" in ctl.ok("list", "-v")
    info = ctl.ok("info", "-s", "web")
    assert "web\n  Instance port: 8080\n  Protocol: http\n  Published port: 8080\n" in info
    document = json.loads(ctl.ok("list", "-o", "json"))
    assert document["services"]["web"]["spec"]["publish"] == 8080
    document = json.loads(ctl.ok("info", "-o", "json"))
    assert document["services"]["api"]["spec"]["publish"] == 8081


def test_publish_and_unpublish_change_only_the_port(ctl: Ctl) -> None:
    ctl.ok("service", "web", "--address", "10.128.0.1:80", "-p", "http", "--image", "nginx")
    assert ctl.ok("publish", "web", "8080") == "web 8080\n"
    assert ctl.record(SERVICE + "web/spec") == {
        "address": "10.128.0.1:80",
        "instancePort": 80,
        "protocol": "http",
        "publish": 8080,
    }
    assert ctl.record(SERVICE + "web/rules/default") == {"selector": {"image": "nginx"}}
    assert ctl.ok("publish", "web", "9090") == "web 9090\n"
    assert ctl.record(SERVICE + "web/spec") == {
        "address": "10.128.0.1:80",
        "instancePort": 80,
        "protocol": "http",
        "publish": 9090,
    }
    assert ctl.ok("unpublish", "web") == "web\n"
    assert ctl.record(SERVICE + "web/spec") == {
        "address": "10.128.0.1:80",
        "instancePort": 80,
        "protocol": "http",
    }
    # Nothing to unpublish: nothing written.
    before = ctl.snapshot()
    assert ctl.ok("unpublish", "web") == "web\n"
    assert ctl.snapshot() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["service", "web", "--publish", "0"], "invalid port '0': must be 1-65535"),
        (["service", "web", "--publish", "65536"], "invalid port '65536': must be 1-65535"),
        (["service", "web", "--publish", "http"], "invalid port 'http': not a number"),
        (["publish", "keep", "0"], "invalid port '0'"),
        (["publish", "keep", "-1"], "invalid port '-1'"),
        (["publish", "keep"], "required: port"),
        (["publish", "bad/name", "80"], "invalid service name 'bad/name'"),
        (["unpublish"], "required: name"),
        (["unpublish", "keep", "80"], "unrecognized arguments: 80"),
    ],
)
def test_publish_refuses_bad_input(ctl: Ctl, argv: list[str], message: str) -> None:
    ctl.ok("service", "keep", "--address", "10.0.0.1:80")
    assert message in ctl.refused(2, *argv)


def test_publish_refuses_a_port_another_service_publishes(ctl: Ctl) -> None:
    ctl.ok("service", "web", "--publish", "8080")
    ctl.ok("service", "api", "--address", "10.0.0.1:80")
    expected = (
        'fluxctl: port 8080 is already published by service "web": publish "api" on another'
        ' port, or unpublish or remove "web" first'
    )
    assert ctl.refused(1, "service", "api", "--publish", "8080", "--image", "x") == expected
    assert ctl.refused(1, "publish", "api", "8080") == expected
    assert ctl.refused(1, "publish", "nosuch", "8081") == 'fluxctl: no service named "nosuch"'
    assert ctl.refused(1, "unpublish", "nosuch") == 'fluxctl: no service named "nosuch"'
    # A service may publish again the port it already has; freeing the port frees it.
    assert ctl.ok("service", "web", "--publish", "8080", "-p", "http") == "web\n"
    assert ctl.ok("publish", "web", "8080") == "web 8080\n"
    ctl.ok("unpublish", "web")
    assert ctl.ok("publish", "api", "8080") == "api 8080\n"


def test_info_shows_a_published_port_conflict_and_skips_bad_published_ports(ctl: Ctl) -> None:
    # Written by other tools: fluxctl would have refused the second claim and the bad values.
    ctl.put(SERVICE + "web/spec", {"publish": 8080})
    ctl.put(SERVICE + "api/spec", {"address": "10.0.0.1:80", "publish": 8080})
    ctl.put(SERVICE + "odd/spec", {"publish": "8080"})
    ctl.put(SERVICE + "big/spec", {"publish": 70000})
    result = ctl("info")
    assert result.status == 0
    assert result.out == (
        "HOSTS\n\nSERVICES\n"
        "api\n  Address: 10.0.0.1:80\n  Published port: 8080\n"
        "  State: conflict: port 8080 is also published by service web\n"
        "  RULES\n  INSTANCES\n"
        "web\n  Published port: 8080\n  RULES\n  INSTANCES\n"
    )
    warnings = result.err.splitlines()
    assert len(warnings) == 2, result.err
    assert "big/spec" in warnings[0] and "publish" in warnings[0]
    assert "odd/spec" in warnings[1] and "publish" in warnings[1]
    document = json.loads(ctl("info", "-o", "json").out)
    assert document["services"]["api"]["publishConflict"] == (
        "port 8080 is also published by service web"
    )
    assert "publishConflict" not in document["services"]["web"]


# -- the PROXY protocol ----------------------------------------------------------------------------


def test_service_proxy_protocol_is_stored_and_shown(ctl: Ctl) -> None:
    assert ctl.ok("service", "db", "--address", "10.128.0.5:5432", "--proxy-protocol", "v2") == (
        "db\n"
    )
    assert ctl.record(SERVICE + "db/spec") == {
        "address": "10.128.0.5:5432",
        "instancePort": 5432,
        "proxyProtocol": "v2",
    }
    ctl.ok("service", "smtp", "--publish", "2525", "-p", "tcp", "--proxy-protocol", "v1")
    ctl.ok("service", "plain", "--address", "10.128.0.6:80")
    assert ctl.ok("list", "-f", "{name} {proxyProtocol}") == "db v2\nplain \nsmtp v1\n"
    verbose = ctl.ok("list", "-v")
    assert "db\n  Address: 10.128.0.5:5432\n  Instance port: 5432\n  PROXY protocol: v2\n" in (
        verbose
    )
    assert "plain\n  Address: 10.128.0.6:80\n  Instance port: 80\n" in verbose
    assert "PROXY protocol: v1" in ctl.ok("info", "-s", "smtp")
    document = json.loads(ctl.ok("list", "-o", "json"))
    assert document["services"]["db"]["spec"]["proxyProtocol"] == "v2"
    assert "proxyProtocol" not in document["services"]["plain"]["spec"]
    document = json.loads(ctl.ok("info", "-o", "json"))
    assert document["services"]["smtp"]["spec"]["proxyProtocol"] == "v1"
    # Redefining the service without the flag turns it off, as for every other field.
    ctl.ok("service", "db", "--address", "10.128.0.5:5432")
    assert ctl.record(SERVICE + "db/spec") == {"address": "10.128.0.5:5432", "instancePort": 5432}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--proxy-protocol", "v3"], "invalid choice: 'v3' (choose from 'v1', 'v2')"),
        (["--proxy-protocol", "V1"], "invalid choice: 'V1'"),
        (["--proxy-protocol"], "expected one argument"),
        (
            ["-p", "http", "--proxy-protocol", "v1"],
            "invalid service: proxyProtocol v1 is for tcp services, not http ones",
        ),
    ],
)
def test_service_proxy_protocol_refuses_bad_input(
    ctl: Ctl, argv: list[str], message: str
) -> None:
    assert message in ctl.refused(2, "service", "web", "--address", "10.0.0.1:80", *argv)


def test_a_bad_proxy_protocol_written_by_another_tool_is_skipped_with_a_warning(ctl: Ctl) -> None:
    ctl.put(SERVICE + "good/spec", {"address": "10.0.0.1:80", "proxyProtocol": "v1"})
    ctl.put(SERVICE + "odd/spec", {"address": "10.0.0.2:80", "proxyProtocol": "v9"})
    ctl.put(SERVICE + "web/spec", {"address": "10.0.0.3:80", "protocol": "http",
                                   "proxyProtocol": "v2"})  # fmt: skip
    result = ctl("list")
    assert result.status == 0
    assert result.out.split() == ["good"]
    warnings = result.err.splitlines()
    assert len(warnings) == 2, result.err
    assert "odd/spec" in warnings[0] and "proxyProtocol" in warnings[0]
    assert "web/spec" in warnings[1] and "tcp services" in warnings[1]


# -- X-Forwarded-For ------------------------------------------------------------------------------


def test_service_forwarded_is_stored_and_shown(ctl: Ctl) -> None:
    assert ctl.ok("service", "web", "--address", "10.128.0.7:80", "-p", "http",
                  "--forwarded") == "web\n"  # fmt: skip
    assert ctl.record(SERVICE + "web/spec") == {
        "address": "10.128.0.7:80",
        "instancePort": 80,
        "protocol": "http",
        "forwarded": True,
    }
    ctl.ok("service", "site", "--publish", "8080", "-p", "http", "--forwarded")
    ctl.ok("service", "plain", "--address", "10.128.0.8:80", "-p", "http")
    assert ctl.ok("list", "-f", "{name} {forwarded}") == (
        "plain False\nsite True\nweb True\n"
    )
    verbose = ctl.ok("list", "-v")
    assert (
        "web\n  Address: 10.128.0.7:80\n  Instance port: 80\n  Protocol: http\n"
        "  Forwarded: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host\n"
    ) in verbose
    assert "plain\n  Address: 10.128.0.8:80\n  Instance port: 80\n  Protocol: http\n" in (
        verbose
    )
    assert "Forwarded: X-Forwarded-For" not in verbose.split("plain\n")[1].split("site\n")[0]
    assert "Forwarded: X-Forwarded-For" in ctl.ok("info", "-s", "site")
    document = json.loads(ctl.ok("list", "-o", "json"))
    assert document["services"]["web"]["spec"]["forwarded"] is True
    assert "forwarded" not in document["services"]["plain"]["spec"]
    # Redefining the service without the flag turns it off, as for every other field.
    ctl.ok("service", "web", "--address", "10.128.0.7:80", "-p", "http")
    assert ctl.record(SERVICE + "web/spec") == {
        "address": "10.128.0.7:80", "instancePort": 80, "protocol": "http"
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--forwarded"], "invalid service: forwarded (X-Forwarded-For) is for http services,"
                          " not tcp ones"),
        (["-p", "tcp", "--forwarded"], "is for http services, not tcp ones"),
        (["-p", "http", "--forwarded=yes"], "ignored explicit argument 'yes'"),
    ],
)  # fmt: skip
def test_service_forwarded_refuses_bad_input(ctl: Ctl, argv: list[str], message: str) -> None:
    assert message in ctl.refused(2, "service", "web", "--address", "10.0.0.1:80", *argv)


def test_a_bad_forwarded_written_by_another_tool_is_skipped_with_a_warning(ctl: Ctl) -> None:
    ctl.put(SERVICE + "good/spec", {"address": "10.0.0.1:80", "protocol": "http",
                                    "forwarded": True})  # fmt: skip
    ctl.put(SERVICE + "odd/spec", {"address": "10.0.0.2:80", "protocol": "http",
                                   "forwarded": "yes"})  # fmt: skip
    ctl.put(SERVICE + "db/spec", {"address": "10.0.0.3:80", "forwarded": True})
    result = ctl("list")
    assert result.status == 0
    assert result.out.split() == ["good"]
    warnings = result.err.splitlines()
    assert len(warnings) == 2, result.err
    assert "db/spec" in warnings[0] and "http services" in warnings[0]
    assert "odd/spec" in warnings[1] and "forwarded" in warnings[1]


# -- host names on a shared published port --------------------------------------------------------


def test_hostnames_are_written_shown_and_let_http_services_share_a_port(ctl: Ctl) -> None:
    assert ctl.ok("service", "www", "--publish", "8080", "-p", "http", "--hostname",
                  "WWW.Example.com.", "--hostname", "*.apps.example.com") == "www\n"  # fmt: skip
    assert ctl.record(SERVICE + "www/spec") == {
        "hostnames": ["*.apps.example.com", "www.example.com"],
        "instancePort": 8080,
        "protocol": "http",
        "publish": 8080,
    }
    ctl.ok("service", "api", "--publish", "8080", "-p", "http", "--hostname", "api.example.com")
    ctl.ok("service", "fallback", "--publish", "8080", "-p", "http")  # the default
    info = ctl.ok("info", "-s", "www")
    assert "  Published port: 8080\n  Host names: *.apps.example.com, www.example.com\n" in info
    assert ctl.ok("list", "-f", "{name} {hostnames}") == (
        'api ["api.example.com"]\nfallback []\nwww ["*.apps.example.com","www.example.com"]\n'
    )
    document = json.loads(ctl.ok("info", "-o", "json"))
    assert document["services"]["api"]["spec"]["hostnames"] == ["api.example.com"]
    assert all("publishConflict" not in s for s in document["services"].values())
    # publish keeps the names; a service may claim again the names it has.
    assert ctl.ok("publish", "www", "8080") == "www 8080\n"
    assert ctl.record(SERVICE + "www/spec") == {
        "hostnames": ["*.apps.example.com", "www.example.com"],
        "instancePort": 8080,
        "protocol": "http",
        "publish": 8080,
    }


def test_hostname_conflicts_on_a_port_are_refused_up_front(ctl: Ctl) -> None:
    ctl.ok("service", "www", "--publish", "8080", "-p", "http", "--hostname", "www.example.com")
    ctl.ok("service", "fallback", "--publish", "8080", "-p", "http")
    ctl.ok("service", "raw", "--publish", "9090")
    assert ctl.refused(
        1, "service", "copy", "--publish", "8080", "-p", "http", "--hostname", "WWW.example.com"
    ) == (
        'fluxctl: host name www.example.com on port 8080 is already claimed by service "www":'
        ' give "copy" other host names or another port, or remove the name from "www" first'
    )
    assert ctl.refused(1, "service", "tcp", "--publish", "8080") == (
        'fluxctl: port 8080 is published by http service "www" (tcp and http services cannot'
        ' share a port): publish "tcp" on another port, or unpublish or remove "www" first'
    )
    assert ctl.refused(1, "service", "other", "--publish", "8080", "-p", "http") == (
        'fluxctl: port 8080 is already published by service "fallback": publish "other" on'
        ' another port, or unpublish or remove "fallback" first'
    )
    assert ctl.refused(1, "publish", "raw", "8080").startswith(
        "fluxctl: port 8080 is published by http service"
    )
    # A tcp port keeps one service; an http one cannot join it, names or not.
    assert 'already published by service "raw"' in ctl.refused(
        1, "service", "web", "--publish", "9090"
    )
    assert 'port 9090 is published by tcp service "raw"' in ctl.refused(
        1, "service", "web", "--publish", "9090", "-p", "http", "--hostname", "a.example.com"
    )


def test_info_shows_a_host_name_conflict_written_by_another_tool(ctl: Ctl) -> None:
    ctl.put(SERVICE + "www/spec", {"publish": 8080, "protocol": "http",
                                   "hostnames": ["www.example.com"]})  # fmt: skip
    ctl.put(SERVICE + "copy/spec", {"publish": 8080, "protocol": "http",
                                    "hostnames": ["www.example.com"]})  # fmt: skip
    ctl.put(SERVICE + "odd/spec", {"publish": 8080, "hostnames": ["bad name"]})
    result = ctl("info")
    assert result.status == 0
    assert (
        "copy\n  Protocol: http\n  Published port: 8080\n  Host names: www.example.com\n"
        "  State: conflict: host name www.example.com on port 8080 is also claimed by service"
        " www\n"
    ) in result.out
    assert "odd/spec" in result.err and "invalid host name 'bad name'" in result.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hostname", "bad name"], "--hostname: invalid host name 'bad name'"),
        (["--hostname", "a.*.example"], "invalid host name 'a.*.example'"),
        (["--hostname=-a.example"], "invalid host name '-a.example'"),
        (["--hostname", "a" * 64 + ".example"], "invalid host name"),
    ],
)
def test_service_refuses_bad_hostnames(ctl: Ctl, argv: list[str], message: str) -> None:
    assert message in ctl.refused(2, "service", "web", "--publish", "80", "-p", "http", *argv)


def test_hostname_needs_a_published_service(ctl: Ctl) -> None:
    assert "--hostname needs --publish" in ctl.refused(
        2, "service", "web", "-p", "http", "--hostname", "a.example"
    )
    assert "--hostname needs --publish" in ctl.refused(
        2, "service", "tls", "--hostname", "a.example"
    )


def test_tcp_services_share_a_port_by_tls_server_name(ctl: Ctl) -> None:
    assert ctl.ok("service", "a", "--publish", "443", "--hostname", "A.example.com") == "a\n"
    assert ctl.record(SERVICE + "a/spec") == {
        "hostnames": ["a.example.com"],
        "instancePort": 443,
        "publish": 443,
    }
    ctl.ok("service", "b", "--publish", "443", "--hostname", "*.b.example.com")
    ctl.ok("service", "fallback", "--publish", "443", "--proxy-protocol", "v2")
    assert "b\n  Instance port: 443\n  Published port: 443\n  Host names: *.b.example.com\n" in (
        ctl.ok("info")
    )
    assert ctl.refused(1, "service", "copy", "--publish", "443", "--hostname", "a.example.com") == (
        'fluxctl: host name a.example.com on port 443 is already claimed by service "a":'
        ' give "copy" other host names or another port, or remove the name from "a" first'
    )
    assert 'already published by service "fallback"' in ctl.refused(
        1, "service", "second", "--publish", "443"
    )
    assert 'port 443 is published by tcp service "a"' in ctl.refused(
        1, "service", "web", "--publish", "443", "-p", "http", "--hostname", "w.example.com"
    )
