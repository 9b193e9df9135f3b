"""fluxd's configuration: Go-style flags, environment, defaults, validation, help.

Most tests call :func:`parse_args` with an explicit environment and a fake host-IP discoverer,
so they never depend on this machine's network set-up; the discovery helpers are tested
separately (with fakes for the decision logic, and against the real loopback interface).
"""

from __future__ import annotations

import os
import socket
import string
import subprocess
import sys
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import ValidationError

from flux import __version__
from flux.config import (
    OPTIONS,
    ConfigError,
    EtcdEndpoint,
    HostIPUnavailable,
    HostPort,
    ParsedCommand,
    Settings,
    default_route_interface,
    discover_host_ip,
    interface_ipv4,
    load_or_exit,
    parse_args,
    resolve_advertise,
    settings_table_markdown,
    usage_text,
    version_text,
)
from flux.config.settings import cross_check

DISCOVERED = IPv4Address("192.0.2.10")


def fake_discover() -> tuple[IPv4Address, str]:
    return DISCOVERED, "hostname 'testhost'"


def failing_discover() -> tuple[IPv4Address, str]:
    raise HostIPUnavailable("cannot determine the host IP address: nothing here")


def parse(argv: Sequence[str] = (), env: Mapping[str, str] | None = None) -> ParsedCommand:
    return parse_args(list(argv), dict(env or {}), discover=fake_discover)


def settings_of(argv: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Settings:
    parsed = parse(argv, env)
    assert parsed.action == "run"
    assert parsed.settings is not None
    return parsed.settings


def error_of(argv: Sequence[str] = (), env: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(argv, env)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def flag_forms(flag: str, value: str) -> list[list[str]]:
    """The four spellings Go's flag package accepts for a flag with a value."""
    return [
        [f"-{flag}", value],
        [f"-{flag}={value}"],
        [f"--{flag}", value],
        [f"--{flag}={value}"],
    ]


# ---------------------------------------------------------------------------------------------
# Defaults


def test_defaults_without_flags_or_environment() -> None:
    parsed = parse()
    assert parsed.action == "run"
    assert parsed.command is None
    assert parsed.host_ip_source == "hostname 'testhost'"
    s = parsed.settings
    assert s is not None
    assert s.host_ip == DISCOVERED
    assert s.host_ttl == 30
    assert s.network_mode == "local"
    assert s.bridge == "docker0"
    assert s.chain == "FLUX"
    assert s.listen_prometheus is None
    assert s.advertise_prometheus is None
    assert s.debug is False
    assert s.reconcile_interval == 60.0
    assert s.connect_timeout == 3.0
    assert s.shutdown_grace == 10.0
    assert s.http_header_timeout == 10.0
    assert s.http_idle_timeout == 60.0
    assert s.balance == "random"
    assert s.relay == "splice"
    assert s.engine_threads == len(os.sched_getaffinity(0))
    assert s.engine_steer == "cpu"
    assert s.publish_ip == IPv4Address("0.0.0.0")
    assert s.metrics_max_clients == 100
    assert s.etcd_endpoints == (EtcdEndpoint("http", "127.0.0.1", 2379),)
    assert s.docker_host == "unix:///var/run/docker.sock"
    assert s.etcd_ca_file is None and s.etcd_cert_file is None and s.etcd_key_file is None
    assert s.etcd_username is None and s.etcd_password is None
    assert s.warnings == ("ETCD_ADDRESS is not set; using http://127.0.0.1:2379",)


def test_etcd_default_warning_disappears_when_etcd_address_is_set() -> None:
    s = settings_of(env={"ETCD_ADDRESS": "http://127.0.0.1:2379"})
    assert s.warnings == ()


def test_settings_are_frozen() -> None:
    s = settings_of()
    with pytest.raises(ValidationError):
        s.chain = "OTHER"


# ---------------------------------------------------------------------------------------------
# Every flag, in all four forms

FLAG_CASES = [
    # flag, value, field, expected, other arguments needed
    ("host-ip", "10.1.2.3", "host_ip", IPv4Address("10.1.2.3"), []),
    ("host-ttl", "45", "host_ttl", 45, []),
    ("host-ttl", "3600", "host_ttl", 3600, []),
    ("network-mode", "global", "network_mode", "global", []),
    ("network-mode", "local", "network_mode", "local", []),
    ("bridge", "br-flux0", "bridge", "br-flux0", []),
    ("chain", "FLUXT_1-a", "chain", "FLUXT_1-a", []),
    ("chain", "x" * 28, "chain", "x" * 28, []),
    ("listen-prometheus", ":9100", "listen_prometheus", HostPort("", 9100), []),
    ("listen-prometheus", "127.0.0.1:65535", "listen_prometheus", HostPort("127.0.0.1", 65535), []),
    ("listen-prometheus", "localhost:1", "listen_prometheus", HostPort("localhost", 1), []),
    ("listen-prometheus", "[::1]:9000", "listen_prometheus", HostPort("::1", 9000), []),
    (
        "advertise-prometheus",
        "192.168.42.221:9000",
        "advertise_prometheus",
        HostPort("192.168.42.221", 9000),
        ["-listen-prometheus", ":9000"],
    ),
    (
        "advertise-prometheus",
        "prom-target.example:9100",
        "advertise_prometheus",
        HostPort("prom-target.example", 9100),
        ["-listen-prometheus", ":9000"],
    ),
    ("reconcile-interval", "30", "reconcile_interval", 30.0, []),
    ("reconcile-interval", "2m", "reconcile_interval", 120.0, []),
    ("connect-timeout", "0.25", "connect_timeout", 0.25, []),
    ("connect-timeout", "500ms", "connect_timeout", 0.5, []),
    ("connect-timeout", "300", "connect_timeout", 300.0, []),
    ("shutdown-grace", "0", "shutdown_grace", 0.0, []),
    ("shutdown-grace", "1h", "shutdown_grace", 3600.0, []),
    ("http-header-timeout", "5s", "http_header_timeout", 5.0, []),
    ("http-idle-timeout", ".5", "http_idle_timeout", 0.5, []),
    ("balance", "p2c", "balance", "p2c", []),
    ("balance", "random", "balance", "random", []),
    ("relay", "python", "relay", "python", []),
    ("relay", "splice", "relay", "splice", []),
    ("engine-threads", "1", "engine_threads", 1, []),
    ("engine-threads", "256", "engine_threads", 256, []),
    ("engine-steer", "cpu", "engine_steer", "cpu", []),
    ("engine-steer", "hash", "engine_steer", "hash", []),
    ("publish-ip", "127.0.0.7", "publish_ip", IPv4Address("127.0.0.7"), []),
    ("publish-ip", "0.0.0.0", "publish_ip", IPv4Address("0.0.0.0"), []),
    ("publish-ip", "none", "publish_ip", None, []),
    ("publish-ip", "None", "publish_ip", None, []),
    ("metrics-max-clients", "0", "metrics_max_clients", 0, []),
    ("metrics-max-clients", "1000", "metrics_max_clients", 1000, []),
    ("metrics-max-clients", "100000", "metrics_max_clients", 100000, []),
]


@pytest.mark.parametrize("form", range(4), ids=["-f v", "-f=v", "--f v", "--f=v"])
@pytest.mark.parametrize(
    ("flag", "value", "field", "expected", "extra"),
    FLAG_CASES,
    ids=[f"{case[0]}={case[1]}" for case in FLAG_CASES],
)
def test_every_flag_in_every_form(
    flag: str, value: str, field: str, expected: object, extra: list[str], form: int
) -> None:
    s = settings_of([*flag_forms(flag, value)[form], *extra])
    assert getattr(s, field) == expected


def test_every_option_with_a_flag_is_covered_by_the_flag_cases() -> None:
    covered = {case[0] for case in FLAG_CASES} | {"debug"}
    assert covered == {option.flag for option in OPTIONS if option.flag}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-debug"], True),
        (["--debug"], True),
        (["-debug=true"], True),
        (["--debug=true"], True),
        (["-debug=false"], False),
        (["--debug=false"], False),
        (["-debug=1"], True),
        (["-debug=0"], False),
        (["-debug=TRUE"], True),
        (["-debug=F"], False),
        ([], False),
    ],
)
def test_debug_flag_forms(argv: list[str], expected: bool) -> None:
    assert settings_of(argv).debug is expected


def test_boolean_flag_does_not_take_the_next_argument_as_its_value() -> None:
    # Go semantics: "-debug false" is -debug followed by a positional argument.
    assert error_of(["-debug", "false"]) == 'unexpected argument "false"'


def test_a_value_may_look_like_a_flag_and_contain_equals_signs() -> None:
    # Go's flag package takes the next argument as the value whatever it looks like.
    message = error_of(["-chain", "-debug"])
    assert message.startswith('invalid value "-debug" for flag -chain:')
    assert settings_of(["-bridge=a=b"]).bridge == "a=b"


def test_last_occurrence_of_a_flag_wins() -> None:
    assert settings_of(["-host-ttl", "10", "--host-ttl=20"]).host_ttl == 20


def test_double_dash_ends_flags() -> None:
    assert error_of(["--", "-debug"]) == 'unexpected argument "-debug"'
    parsed = parse(["-debug", "--", "cleanup"])
    assert parsed.command == "cleanup"
    assert parsed.settings is not None and parsed.settings.debug


# ---------------------------------------------------------------------------------------------
# Every environment variable


ENV_CASES = [
    ("HOST_IP", "10.9.8.7", "host_ip", IPv4Address("10.9.8.7")),
    ("FLUX_HOST_TTL", "5", "host_ttl", 5),
    ("FLUX_NETWORK_MODE", "global", "network_mode", "global"),
    ("FLUX_BRIDGE", "br0", "bridge", "br0"),
    ("FLUX_CHAIN", "MYFLUX", "chain", "MYFLUX"),
    ("FLUX_LISTEN_PROMETHEUS", ":9000", "listen_prometheus", HostPort("", 9000)),
    ("FLUX_DEBUG", "true", "debug", True),
    ("FLUX_DEBUG", "1", "debug", True),
    ("FLUX_DEBUG", "yes", "debug", True),
    ("FLUX_DEBUG", "false", "debug", False),
    ("FLUX_DEBUG", "off", "debug", False),
    ("FLUX_RECONCILE_INTERVAL", "15", "reconcile_interval", 15.0),
    ("FLUX_CONNECT_TIMEOUT", "1.5", "connect_timeout", 1.5),
    ("FLUX_SHUTDOWN_GRACE", "30s", "shutdown_grace", 30.0),
    ("FLUX_HTTP_HEADER_TIMEOUT", "2", "http_header_timeout", 2.0),
    ("FLUX_HTTP_IDLE_TIMEOUT", "90", "http_idle_timeout", 90.0),
    ("FLUX_BALANCE", "p2c", "balance", "p2c"),
    ("FLUX_RELAY", "python", "relay", "python"),
    ("FLUX_ENGINE_THREADS", "3", "engine_threads", 3),
    ("FLUX_ENGINE_STEER", "cpu", "engine_steer", "cpu"),
    ("FLUX_PUBLISH_IP", "10.1.2.3", "publish_ip", IPv4Address("10.1.2.3")),
    ("FLUX_PUBLISH_IP", "none", "publish_ip", None),
    ("FLUX_METRICS_MAX_CLIENTS", "250", "metrics_max_clients", 250),
    (
        "ETCD_ADDRESS",
        "http://10.0.0.1:2379",
        "etcd_endpoints",
        (EtcdEndpoint("http", "10.0.0.1", 2379),),
    ),
    (
        "ETCD_ADDRESS",
        "http://10.0.0.1:2379, http://etcd-2.example:2379 ,http://[fd00::3]:2379/",
        "etcd_endpoints",
        (
            EtcdEndpoint("http", "10.0.0.1", 2379),
            EtcdEndpoint("http", "etcd-2.example", 2379),
            EtcdEndpoint("http", "fd00::3", 2379),
        ),
    ),
    (
        "ETCD_ADDRESS",
        "HTTPS://etcd.example:2379",
        "etcd_endpoints",
        (EtcdEndpoint("https", "etcd.example", 2379),),
    ),
    ("DOCKER_HOST", "unix:///run/docker.sock", "docker_host", "unix:///run/docker.sock"),
    ("DOCKER_HOST", "tcp://127.0.0.1:2375", "docker_host", "tcp://127.0.0.1:2375"),
    ("DOCKER_HOST", "tcp://docker.example:2376", "docker_host", "tcp://docker.example:2376"),
]


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    ENV_CASES,
    ids=[f"{case[0]}={case[1]}" for case in ENV_CASES],
)
def test_every_environment_variable(name: str, value: str, field: str, expected: object) -> None:
    assert getattr(settings_of(env={name: value}), field) == expected


def test_advertise_prometheus_from_environment() -> None:
    s = settings_of(
        env={"FLUX_LISTEN_PROMETHEUS": ":9000", "FLUX_ADVERTISE_PROMETHEUS": "10.0.0.2:9999"}
    )
    assert s.advertise_prometheus == HostPort("10.0.0.2", 9999)


def test_etcd_tls_and_auth_from_environment(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem"))
    for path in (ca, cert, key):
        path.write_text("-----BEGIN-----\n")
    s = settings_of(
        env={
            "ETCD_ADDRESS": "https://127.0.0.1:2379",
            "ETCD_CA_FILE": str(ca),
            "ETCD_CERT_FILE": str(cert),
            "ETCD_KEY_FILE": str(key),
            "ETCD_USERNAME": "flux",
            "ETCD_PASSWORD": "s3cret pass",
        }
    )
    assert (s.etcd_ca_file, s.etcd_cert_file, s.etcd_key_file) == (ca, cert, key)
    assert s.etcd_username == "flux"
    assert s.etcd_password is not None
    assert s.etcd_password.get_secret_value() == "s3cret pass"
    assert s.warnings == ()


def test_ca_file_alone_is_enough_for_https(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = settings_of(env={"ETCD_ADDRESS": "https://127.0.0.1:2379", "ETCD_CA_FILE": str(ca)})
    assert s.etcd_ca_file == ca and s.etcd_cert_file is None


def test_every_environment_variable_is_covered() -> None:
    covered = {case[0] for case in ENV_CASES} | {
        "FLUX_ADVERTISE_PROMETHEUS",
        "ETCD_CA_FILE",
        "ETCD_CERT_FILE",
        "ETCD_KEY_FILE",
        "ETCD_USERNAME",
        "ETCD_PASSWORD",
    }
    assert covered == {option.env for option in OPTIONS}


@pytest.mark.parametrize("name", [option.env for option in OPTIONS])
def test_an_empty_environment_variable_counts_as_unset(name: str) -> None:
    assert settings_of(env={name: ""}) == settings_of()


def test_unrelated_and_lowercase_environment_names_are_ignored() -> None:
    s = settings_of(env={"host_ttl": "7", "flux_chain": "X", "FLUX_UNKNOWN": "1", "chain": "Y"})
    assert s == settings_of()


def test_password_alone_over_http_warns_that_it_travels_in_clear() -> None:
    s = settings_of(env={"ETCD_ADDRESS": "http://127.0.0.1:2379", "ETCD_USERNAME": "u",
                         "ETCD_PASSWORD": "p"})  # fmt: skip
    assert any("unencrypted" in warning for warning in s.warnings)


# ---------------------------------------------------------------------------------------------
# Flags override the environment; the environment overrides defaults

OVERRIDE_CASES = [
    ("host-ip", "HOST_IP", "10.0.0.1", "10.0.0.2", "host_ip", IPv4Address("10.0.0.2")),
    ("host-ttl", "FLUX_HOST_TTL", "10", "20", "host_ttl", 20),
    ("network-mode", "FLUX_NETWORK_MODE", "global", "local", "network_mode", "local"),
    ("bridge", "FLUX_BRIDGE", "br-env", "br-flag", "bridge", "br-flag"),
    ("chain", "FLUX_CHAIN", "ENVCHAIN", "FLAGCHAIN", "chain", "FLAGCHAIN"),
    (
        "listen-prometheus",
        "FLUX_LISTEN_PROMETHEUS",
        ":9000",
        "127.0.0.1:9100",
        "listen_prometheus",
        HostPort("127.0.0.1", 9100),
    ),
    ("debug", "FLUX_DEBUG", "true", "false", "debug", False),
    ("reconcile-interval", "FLUX_RECONCILE_INTERVAL", "10", "20", "reconcile_interval", 20.0),
    ("connect-timeout", "FLUX_CONNECT_TIMEOUT", "1", "2", "connect_timeout", 2.0),
    ("shutdown-grace", "FLUX_SHUTDOWN_GRACE", "1", "0", "shutdown_grace", 0.0),
    ("http-header-timeout", "FLUX_HTTP_HEADER_TIMEOUT", "1", "2", "http_header_timeout", 2.0),
    ("http-idle-timeout", "FLUX_HTTP_IDLE_TIMEOUT", "1", "2", "http_idle_timeout", 2.0),
    ("balance", "FLUX_BALANCE", "p2c", "random", "balance", "random"),
]


@pytest.mark.parametrize(
    ("flag", "env_name", "env_value", "flag_value", "field", "expected"),
    OVERRIDE_CASES,
    ids=[case[0] for case in OVERRIDE_CASES],
)
def test_flags_override_environment(
    flag: str, env_name: str, env_value: str, flag_value: str, field: str, expected: object
) -> None:
    s = settings_of([f"-{flag}={flag_value}"], {env_name: env_value})
    assert getattr(s, field) == expected


def test_flag_overrides_environment_for_advertise_prometheus() -> None:
    s = settings_of(
        ["-advertise-prometheus", "10.0.0.9:1234"],
        {"FLUX_LISTEN_PROMETHEUS": ":9000", "FLUX_ADVERTISE_PROMETHEUS": "10.0.0.8:9000"},
    )
    assert s.advertise_prometheus == HostPort("10.0.0.9", 1234)


def test_an_empty_flag_switches_off_a_listener_set_in_the_environment() -> None:
    s = settings_of(["-listen-prometheus="], {"FLUX_LISTEN_PROMETHEUS": ":9000"})
    assert s.listen_prometheus is None and s.advertise_prometheus is None


def test_a_bad_environment_value_is_not_reported_when_a_flag_replaces_it() -> None:
    assert settings_of(["-host-ttl", "9"], {"FLUX_HOST_TTL": "nine"}).host_ttl == 9


def test_parse_args_never_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_IP", "10.66.66.66")
    monkeypatch.setenv("FLUX_HOST_TTL", "7")
    monkeypatch.setenv("FLUX_CHAIN", "FROMOSENV")
    monkeypatch.setenv("ETCD_ADDRESS", "http://10.0.0.1:2379")
    s = settings_of()
    assert s.host_ip == DISCOVERED
    assert (s.host_ttl, s.chain) == (30, "FLUX")
    assert s.etcd_endpoints == (EtcdEndpoint("http", "127.0.0.1", 2379),)


def test_direct_construction_never_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_CHAIN", "FROMOSENV")
    s = Settings(host_ip="127.0.0.1", bridge="lo")  # type: ignore[arg-type]
    assert (s.chain, s.bridge, s.host_ip) == ("FLUX", "lo", IPv4Address("127.0.0.1"))


def test_direct_construction_accepts_typed_values() -> None:
    s = Settings(
        host_ip=IPv4Address("10.0.0.1"),
        listen_prometheus=HostPort("127.0.0.1", 9000),
        etcd_endpoints=(EtcdEndpoint("http", "127.0.0.1", 23790),),
        connect_timeout=0.2,
    )
    assert s.listen_prometheus == HostPort("127.0.0.1", 9000)
    assert s.advertise_prometheus == HostPort("10.0.0.1", 9000)
    assert s.etcd_endpoints[0].url == "http://127.0.0.1:23790"
    assert s.connect_timeout == 0.2


# ---------------------------------------------------------------------------------------------
# Host IP: where it comes from


def test_host_ip_source_flag_then_environment_then_discovery() -> None:
    assert parse(["-host-ip", "10.0.0.1"], {"HOST_IP": "10.0.0.2"}).host_ip_source == (
        "-host-ip option"
    )
    parsed = parse([], {"HOST_IP": "10.0.0.2"})
    assert parsed.host_ip_source == "HOST_IP in environment"
    assert parsed.settings is not None and parsed.settings.host_ip == IPv4Address("10.0.0.2")
    assert parse([], {"HOST_IP": ""}).host_ip_source == "hostname 'testhost'"


def test_discovery_runs_only_when_no_host_ip_is_given() -> None:
    calls: list[int] = []

    def counting() -> tuple[IPv4Address, str]:
        calls.append(1)
        return DISCOVERED, "x"

    parse_args(["-host-ip", "10.0.0.1"], {}, discover=counting)
    parse_args([], {"HOST_IP": "10.0.0.1"}, discover=counting)
    assert calls == []
    parse_args([], {}, discover=counting)
    assert calls == [1]


def test_discovery_failure_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot determine the host IP address"):
        parse_args([], {}, discover=failing_discover)


def test_cleanup_works_without_a_discoverable_host_ip() -> None:
    parsed = parse_args(["cleanup"], {}, discover=failing_discover)
    assert parsed.command == "cleanup" and parsed.settings is not None
    assert parsed.host_ip_source is not None and "cleanup" in parsed.host_ip_source


def test_loopback_host_ip_is_accepted_with_a_warning() -> None:
    s = settings_of(["-host-ip", "127.0.0.1"], {"ETCD_ADDRESS": "http://127.0.0.1:2379"})
    assert s.host_ip == IPv4Address("127.0.0.1")
    assert len(s.warnings) == 1 and "loopback" in s.warnings[0]


ROUTE_HEADER = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (ROUTE_HEADER + "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n", "eth0"),
        (
            ROUTE_HEADER
            + "docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
            + "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
            + "eth1\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n",
            "eth1",
        ),
        # A default route that is down does not count.
        (ROUTE_HEADER + "eth0\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n", None),
        (ROUTE_HEADER + "docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n", None),
        (ROUTE_HEADER, None),
        ("", None),
        (ROUTE_HEADER + "garbage line\n" + "eth0\tzz\t0\t0003\t0\t0\t0\t0\t0\t0\t0\n", None),
    ],
    ids=["one", "lowest-metric", "down", "no-default", "header-only", "empty", "garbage"],
)
def test_default_route_interface(table: str, expected: str | None) -> None:
    assert default_route_interface(table) == expected


def test_interface_ipv4_reads_the_real_loopback_address() -> None:
    assert interface_ipv4("lo") == IPv4Address("127.0.0.1")


@pytest.mark.parametrize("name", ["flux-nonexist0", "", "x" * 16])
def test_interface_ipv4_of_missing_or_bad_interface_is_none(name: str) -> None:
    assert interface_ipv4(name) is None


ROUTE_ETH0 = ROUTE_HEADER + "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"


@pytest.mark.parametrize(
    ("resolved", "route", "iface_addr", "expected"),
    [
        (
            ["127.0.1.1", "10.0.0.5"],
            ROUTE_ETH0,
            "192.0.2.2",
            ("10.0.0.5", "hostname 'node1'"),
        ),
        (
            ["127.0.1.1"],
            ROUTE_ETH0,
            "192.0.2.2",
            (
                "192.0.2.2",
                "interface eth0 (default route; hostname 'node1' resolves only to loopback)",
            ),
        ),
        (
            [],
            ROUTE_ETH0,
            "192.0.2.2",
            ("192.0.2.2", "interface eth0 (default route; hostname 'node1' does not resolve)"),
        ),
        (["127.0.1.1"], ROUTE_HEADER, None, ("127.0.1.1", "hostname 'node1'")),
        (["127.0.1.1"], ROUTE_ETH0, None, ("127.0.1.1", "hostname 'node1'")),
    ],
    ids=["hostname", "loopback-then-route", "unresolved-then-route", "loopback-only", "no-addr"],
)
def test_discover_host_ip_decisions(
    resolved: list[str], route: str, iface_addr: str | None, expected: tuple[str, str]
) -> None:
    address, source = discover_host_ip(
        hostname=lambda: "node1",
        resolve=lambda name: [IPv4Address(a) for a in resolved] if name == "node1" else [],
        route_table=lambda: route,
        interface_address=lambda iface: (
            IPv4Address(iface_addr) if iface == "eth0" and iface_addr else None
        ),
    )
    assert (str(address), source) == expected


def test_discover_host_ip_fails_when_nothing_is_available() -> None:
    with pytest.raises(HostIPUnavailable, match="set HOST_IP or -host-ip"):
        discover_host_ip(
            hostname=lambda: "lonely",
            resolve=lambda name: [],
            route_table=lambda: ROUTE_HEADER,
            interface_address=lambda iface: None,
        )


def test_discover_host_ip_on_this_machine() -> None:
    address, source = discover_host_ip()
    assert isinstance(address, IPv4Address) and not address.is_unspecified
    assert source.startswith(("hostname '", "interface "))


# ---------------------------------------------------------------------------------------------
# Derived advertise address


def test_advertise_defaults_to_host_ip_and_listen_port() -> None:
    s = settings_of(["-host-ip", "10.0.0.7", "-listen-prometheus", ":9000"])
    assert s.advertise_prometheus == HostPort("10.0.0.7", 9000)
    assert str(s.advertise_prometheus) == "10.0.0.7:9000"
    assert not any("loopback" in warning for warning in s.warnings)


@pytest.mark.parametrize("listen", ["127.0.0.1:9000", "localhost:9000", "[::1]:9000"])
def test_advertising_a_loopback_only_listener_warns(listen: str) -> None:
    s = settings_of(["-host-ip", "10.0.0.7", "-listen-prometheus", listen])
    assert s.advertise_prometheus == HostPort("10.0.0.7", 9000)
    assert any("loopback only" in warning for warning in s.warnings)


def test_no_advertise_without_listener() -> None:
    assert settings_of(["-host-ip", "10.0.0.7"]).advertise_prometheus is None


def test_host_port_renders_ipv6_with_brackets() -> None:
    assert str(HostPort("::1", 9000)) == "[::1]:9000"
    assert str(HostPort("", 9000)) == ":9000"


# ---------------------------------------------------------------------------------------------
# Bad values: one line naming the flag or variable and the value

MAX_CLIENTS_REASON = "must be a whole number of client addresses from 0 to 100000"
CHAIN_REASON = "not an iptables chain name (1-28 of A-Z a-z 0-9 _ -, not starting with '-')"
BRIDGE_REASON = "not an interface name (1-15 printable characters, no '/', ':' or spaces)"
TTL_REASON = "must be a whole number of seconds from 1 to 3600"
DURATION_SYNTAX = (
    "not a duration: give seconds (e.g. 2.5) or a number with a unit (500ms, 10s, 2m, 1h)"
)
PORT_REASON = "port must be a number from 1 to 65535"
LISTEN_HOST_REASON = "host must be empty (all interfaces), an IP address or localhost"
DOCKER_REASON = "must be unix:///path/to/socket or tcp://host:port"
EXAMPLE = "(e.g. http://10.0.0.1:2379)"
SCHEME = "endpoint URLs must start with http:// or https:// " + EXAMPLE
NO_PATH = "endpoint URL must not have a path or query " + EXAMPLE
BAD_HOST = "endpoint host is not an IP address or DNS name " + EXAMPLE

BAD_FLAG_VALUES = [
    ("host-ip", "abc", "not an IP address"),
    ("host-ip", "", "not an IP address"),
    ("host-ip", "10.0.0.256", "not an IP address"),
    ("host-ip", "010.0.0.1", "not an IP address"),
    ("host-ip", " 10.0.0.1", "not an IP address"),
    ("host-ip", "::1", "IPv6 is not supported; give the host's IPv4 address"),
    ("host-ip", "0.0.0.0", "0.0.0.0 is not an address other hosts can reach"),
    ("host-ip", "224.0.0.1", "not a unicast address"),
    ("host-ip", "255.255.255.255", "not a unicast address"),
    ("host-ttl", "abc", TTL_REASON),
    ("host-ttl", "0", TTL_REASON),
    ("host-ttl", "-5", TTL_REASON),
    ("host-ttl", "3601", TTL_REASON),
    ("host-ttl", "1.5", TTL_REASON),
    ("host-ttl", "", TTL_REASON),
    ("network-mode", "xyz", 'must be "local" or "global"'),
    ("network-mode", "Global", 'must be "local" or "global"'),
    ("network-mode", "", 'must be "local" or "global"'),
    ("balance", "roundrobin", 'must be "random" or "p2c"'),
    ("relay", "copy", 'must be "splice" or "python"'),
    ("engine-threads", "0", "must be a whole number of threads from 1 to 256"),
    ("engine-steer", "rss", 'must be "cpu" or "hash"'),
    ("engine-threads", "257", "must be a whole number of threads from 1 to 256"),
    ("engine-threads", "two", "must be a whole number of threads from 1 to 256"),
    ("engine-threads", "1.5", "must be a whole number of threads from 1 to 256"),
    ("publish-ip", "all", 'not an IP address or "none"'),
    ("publish-ip", "10.0.0.256", 'not an IP address or "none"'),
    ("publish-ip", "::", "IPv6 is not supported; give an IPv4 address"),
    ("publish-ip", "224.0.0.1", "not a unicast address"),
    ("publish-ip", "255.255.255.255", "not a unicast address"),
    ("metrics-max-clients", "-1", MAX_CLIENTS_REASON),
    ("metrics-max-clients", "100001", MAX_CLIENTS_REASON),
    ("metrics-max-clients", "many", MAX_CLIENTS_REASON),
    ("metrics-max-clients", "1e3", MAX_CLIENTS_REASON),
    ("chain", "", CHAIN_REASON),
    ("chain", "x" * 29, CHAIN_REASON),
    ("chain", "-X", CHAIN_REASON),
    ("chain", "A B", CHAIN_REASON),
    ("chain", "A.B", CHAIN_REASON),
    ("chain", "A;rm", CHAIN_REASON),
    ("chain", "FLÜX", CHAIN_REASON),
    ("chain", "INPUT", "is a built-in iptables chain or target"),
    ("chain", "DNAT", "is a built-in iptables chain or target"),
    ("chain", "accept", "is a built-in iptables chain or target"),
    ("chain", "DOCKER", "belongs to Docker's iptables chains"),
    ("chain", "DOCKER-USER", "belongs to Docker's iptables chains"),
    ("bridge", "", BRIDGE_REASON),
    ("bridge", "x" * 16, BRIDGE_REASON),
    ("bridge", "br/0", BRIDGE_REASON),
    ("bridge", "br:0", BRIDGE_REASON),
    ("bridge", "br 0", BRIDGE_REASON),
    ("bridge", "br\t0", BRIDGE_REASON),
    ("bridge", ".", BRIDGE_REASON),
    ("bridge", "..", BRIDGE_REASON),
    ("bridge", "brü", BRIDGE_REASON),
    ("listen-prometheus", "9000", "not host:port (e.g. :9000 or 10.0.0.1:9000)"),
    ("listen-prometheus", ":0", PORT_REASON),
    ("listen-prometheus", ":65536", PORT_REASON),
    ("listen-prometheus", ":http", PORT_REASON),
    ("listen-prometheus", ":+90", PORT_REASON),
    ("listen-prometheus", ":", PORT_REASON),
    ("listen-prometheus", "example.com:9000", LISTEN_HOST_REASON),
    ("listen-prometheus", "::1:9000", "IPv6 addresses need brackets, e.g. [::1]:9000"),
    ("listen-prometheus", "[::1:9000", "not host:port"),
    ("listen-prometheus", "[10.0.0.1]:9000", "brackets are only for IPv6 addresses"),
    ("debug", "maybe", "not a boolean (use true or false)"),
    ("debug", "", "not a boolean (use true or false)"),
    ("reconcile-interval", "0", "must be more than 0 and at most 86400 seconds"),
    ("reconcile-interval", "-1", "must be more than 0 and at most 86400 seconds"),
    ("reconcile-interval", "2d", DURATION_SYNTAX),
    ("connect-timeout", "0", "must be more than 0 and at most 300 seconds"),
    ("connect-timeout", "0ms", "must be more than 0 and at most 300 seconds"),
    ("connect-timeout", "301", "must be more than 0 and at most 300 seconds"),
    ("connect-timeout", "abc", DURATION_SYNTAX),
    ("connect-timeout", "inf", DURATION_SYNTAX),
    ("connect-timeout", "nan", DURATION_SYNTAX),
    ("connect-timeout", "", DURATION_SYNTAX),
    ("shutdown-grace", "-1", "must be from 0 to 3600 seconds"),
    ("shutdown-grace", "2h", "must be from 0 to 3600 seconds"),
    ("http-header-timeout", "0", "must be more than 0 and at most 3600 seconds"),
    ("http-idle-timeout", "-0.5", "must be more than 0 and at most 86400 seconds"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    BAD_FLAG_VALUES,
    ids=[f"{case[0]}={case[1]!r}" for case in BAD_FLAG_VALUES],
)
def test_bad_flag_value(flag: str, value: str, reason: str) -> None:
    quoted = '"' + value.replace("\t", "\\t") + '"'
    assert error_of([f"--{flag}={value}"]) == f"invalid value {quoted} for flag -{flag}: {reason}"


BAD_ADVERTISE = [
    ("9000", "not host:port (e.g. :9000 or 10.0.0.1:9000)"),
    (":9000", "needs a host that Prometheus can reach, e.g. 192.168.42.221:9000"),
    ("0.0.0.0:9000", "0.0.0.0 is not an address Prometheus can reach"),
    ("[::]:9000", ":: is not an address Prometheus can reach"),
    ("host:0", PORT_REASON),
    ("bad_host!:9000", "host must be an IP address or a DNS name"),
    ("-bad-.example:9000", "host must be an IP address or a DNS name"),
    ("[name]:9000", "host must be an IP address or a DNS name"),
]


@pytest.mark.parametrize(("value", "reason"), BAD_ADVERTISE, ids=[c[0] for c in BAD_ADVERTISE])
def test_bad_advertise_prometheus(value: str, reason: str) -> None:
    message = error_of(["-listen-prometheus", ":9000", "-advertise-prometheus", value])
    assert message == f'invalid value "{value}" for flag -advertise-prometheus: {reason}'


def test_advertise_without_listen_is_an_error() -> None:
    assert error_of(["-advertise-prometheus", "10.0.0.1:9000"]) == (
        'invalid value "10.0.0.1:9000" for flag -advertise-prometheus: needs -listen-prometheus'
        " (nothing would serve the advertised address)"
    )
    assert error_of(env={"FLUX_ADVERTISE_PROMETHEUS": "10.0.0.1:9000"}).startswith(
        'invalid value "10.0.0.1:9000" for FLUX_ADVERTISE_PROMETHEUS: needs -listen-prometheus'
    )


BAD_ENV_VALUES = [
    ("HOST_IP", "abc", "not an IP address"),
    ("FLUX_HOST_TTL", "zero", TTL_REASON),
    ("FLUX_NETWORK_MODE", "xyz", 'must be "local" or "global"'),
    ("FLUX_BRIDGE", "a/b", BRIDGE_REASON),
    ("FLUX_CHAIN", "BAD CHAIN", CHAIN_REASON),
    ("FLUX_LISTEN_PROMETHEUS", ":99999", PORT_REASON),
    ("FLUX_DEBUG", "sometimes", "not a boolean (use true or false)"),
    ("FLUX_RECONCILE_INTERVAL", "0", "must be more than 0 and at most 86400 seconds"),
    ("FLUX_CONNECT_TIMEOUT", "-3", "must be more than 0 and at most 300 seconds"),
    ("FLUX_SHUTDOWN_GRACE", "forever", DURATION_SYNTAX),
    ("FLUX_HTTP_HEADER_TIMEOUT", "0", "must be more than 0 and at most 3600 seconds"),
    ("FLUX_HTTP_IDLE_TIMEOUT", "0", "must be more than 0 and at most 86400 seconds"),
    ("FLUX_BALANCE", "P2C", 'must be "random" or "p2c"'),
    ("ETCD_ADDRESS", "10.0.0.1:2379", SCHEME),
    ("ETCD_ADDRESS", "ftp://10.0.0.1:2379", SCHEME),
    ("ETCD_ADDRESS", "http://10.0.0.1", "endpoint needs a port " + EXAMPLE),
    ("ETCD_ADDRESS", "http://10.0.0.1:0", "endpoint needs a port " + EXAMPLE),
    ("ETCD_ADDRESS", "http://10.0.0.1:99999", "not an endpoint URL " + EXAMPLE),
    ("ETCD_ADDRESS", "http://10.0.0.1:port", "not an endpoint URL " + EXAMPLE),
    ("ETCD_ADDRESS", "http://:2379", "endpoint has no host " + EXAMPLE),
    ("ETCD_ADDRESS", "http://bad host:2379", BAD_HOST),
    ("ETCD_ADDRESS", "http://10.0.0.1:2379/v2/keys", NO_PATH),
    ("ETCD_ADDRESS", "http://10.0.0.1:2379?x=1", NO_PATH),
    ("ETCD_ADDRESS", "http://10.0.0.1:2379,", "empty entry in the list of endpoints"),
    ("ETCD_ADDRESS", "http://a:1,,http://b:1", "empty entry in the list of endpoints"),
    ("ETCD_ADDRESS", "http://a:1,http://a:1", "endpoint http://a:1 is listed twice"),
    ("ETCD_ADDRESS", "http://a:1,https://b:1",
     "endpoints mix http:// and https://; use one scheme"),
    ("DOCKER_HOST", "ssh://docker.example", DOCKER_REASON),
    ("DOCKER_HOST", "/var/run/docker.sock", DOCKER_REASON),
    ("DOCKER_HOST", "unix://var/run/docker.sock", DOCKER_REASON),
    ("DOCKER_HOST", "tcp://docker.example", DOCKER_REASON),
    ("DOCKER_HOST", "tcp://docker.example:0", PORT_REASON),
    ("DOCKER_HOST", "tcp://bad host:2375", DOCKER_REASON),
    ("ETCD_CA_FILE", "/nonexistent/flux-ca.pem", "no such file"),
    ("ETCD_CERT_FILE", "/nonexistent/flux-cert.pem", "no such file"),
    ("ETCD_KEY_FILE", "/nonexistent/flux-key.pem", "no such file"),
    ("ETCD_CA_FILE", "/", "is a directory, not a file"),
    ("ETCD_USERNAME", "bad\x07name", "must be printable text"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    BAD_ENV_VALUES,
    ids=[f"{case[0]}={case[1]!r}" for case in BAD_ENV_VALUES],
)
def test_bad_environment_value(name: str, value: str, reason: str) -> None:
    env = {name: value}
    if name.startswith("ETCD_") and name.endswith("_FILE"):
        env["ETCD_ADDRESS"] = "https://127.0.0.1:2379"
    quoted = '"' + value.replace("\x07", "\\x07") + '"'
    assert error_of(env=env) == f"invalid value {quoted} for {name}: {reason}"


def test_every_setting_has_a_bad_value_case() -> None:
    flags = {case[0] for case in BAD_FLAG_VALUES} | {"advertise-prometheus"}
    envs = {case[0] for case in BAD_ENV_VALUES} | {"FLUX_ADVERTISE_PROMETHEUS", "ETCD_PASSWORD"}
    for option in OPTIONS:
        assert option.flag in flags or option.env in envs, option


def test_credentials_in_an_etcd_url_are_refused_and_not_echoed() -> None:
    message = error_of(env={"ETCD_ADDRESS": "http://root:hunter2@10.0.0.1:2379"})
    assert "hunter2" not in message and "root" not in message
    assert message == (
        'invalid value "http://***@10.0.0.1:2379" for ETCD_ADDRESS: credentials do not belong'
        " in the URL; use ETCD_USERNAME/ETCD_PASSWORD"
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"ETCD_CERT_FILE": "{cert}"},
            "ETCD_CERT_FILE is set but ETCD_KEY_FILE is not: a client certificate and its key"
            " go together",
        ),
        (
            {"ETCD_KEY_FILE": "{key}"},
            "ETCD_KEY_FILE is set but ETCD_CERT_FILE is not: a client certificate and its key"
            " go together",
        ),
        ({"ETCD_USERNAME": "flux"}, "ETCD_USERNAME is set but ETCD_PASSWORD is not"),
        ({"ETCD_PASSWORD": "hunter2"}, "ETCD_PASSWORD is set but ETCD_USERNAME is not"),
        (
            {"ETCD_CA_FILE": "{cert}", "ETCD_ADDRESS": "http://10.0.0.1:2379"},
            'invalid value "http://10.0.0.1:2379" for ETCD_ADDRESS: ETCD_CA_FILE is set, so the'
            " endpoints must use https://",
        ),
        (
            {"ETCD_CERT_FILE": "{cert}", "ETCD_KEY_FILE": "{key}"},
            'invalid default value "http://127.0.0.1:2379" for ETCD_ADDRESS: ETCD_CERT_FILE is'
            " set, so the endpoints must use https://",
        ),
    ],
    ids=["cert-no-key", "key-no-cert", "user-no-password", "password-no-user", "tls-http",
         "tls-default-http"],
)  # fmt: skip
def test_settings_that_go_together(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    filled = {k: v.format(cert=cert, key=key) for k, v in env.items()}
    assert error_of(env=filled) == expected


def test_the_password_never_appears_in_messages_repr_or_summary() -> None:
    secret = "pa$$-hunter2"
    message = error_of(env={"ETCD_PASSWORD": secret})
    assert secret not in message
    message = error_of(env={"ETCD_PASSWORD": "bad\x00" + secret, "ETCD_USERNAME": "u"})
    assert secret not in message
    assert message == "invalid value (hidden) for ETCD_PASSWORD: must be printable text"
    s = settings_of(env={"ETCD_USERNAME": "u", "ETCD_PASSWORD": secret})
    assert secret not in repr(s) and secret not in str(s) and secret not in s.summary()
    assert "ETCD_PASSWORD=***" in s.summary()


def test_describe_gives_the_start_up_log_lines() -> None:
    parsed = parse(["-host-ip", "10.0.0.1"], {"ETCD_USERNAME": "u", "ETCD_PASSWORD": "hunter2"})
    lines = parsed.describe()
    assert lines[0] == "Using host IP address 10.0.0.1 from -host-ip option"
    assert len(lines) == 1 + len(OPTIONS)
    assert "bridge=docker0" in lines and "ETCD_PASSWORD=***" in lines
    assert not any("hunter2" in line for line in lines)
    assert parse(["-version"]).describe() == ()


def test_summary_shows_the_effective_configuration() -> None:
    s = settings_of(["-host-ip", "10.0.0.1", "-listen-prometheus", ":9000", "-debug"])
    summary = s.summary()
    assert "\n" not in summary
    for part in (
        "host-ip=10.0.0.1",
        "host-ttl=30",
        "listen-prometheus=:9000",
        "advertise-prometheus=10.0.0.1:9000",
        "debug=true",
        "connect-timeout=3s",
        "ETCD_ADDRESS=http://127.0.0.1:2379",
        "ETCD_CA_FILE=none",
    ):
        assert part in summary.split(" "), part


def test_the_first_problem_is_reported_when_several_values_are_bad() -> None:
    message = error_of(["-host-ttl", "0", "-chain", "-x"])
    assert message.startswith('invalid value "0" for flag -host-ttl:')


def test_control_characters_in_values_cannot_break_the_line() -> None:
    message = error_of(["-bridge", "a\nb\u2028c"])
    assert message.startswith('invalid value "a\\nb\\u2028c" for flag -bridge:')


# ---------------------------------------------------------------------------------------------
# Command-line structure


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-foo"], "unknown flag -foo"),
        (["--foo=1"], "unknown flag --foo"),
        (["-Host-IP", "1.2.3.4"], "unknown flag -Host-IP"),
        (["-host_ip", "1.2.3.4"], "unknown flag -host_ip"),
        (["-host-ttl"], "flag -host-ttl needs a value"),
        (["--host-ip"], "flag -host-ip needs a value"),
        (["-debug", "-chain"], "flag -chain needs a value"),
        (["bar"], 'unexpected argument "bar"'),
        (["-debug", "bar"], 'unexpected argument "bar"'),
        (["cleanup", "bar"], 'unexpected argument "bar"'),
        (["cleanup", "cleanup"], 'unexpected argument "cleanup"'),
        (["-"], 'unexpected argument "-"'),
        (["---host-ip=1"], "bad flag syntax: ---host-ip=1"),
        (["-=x"], "bad flag syntax: -=x"),
        (["-help=true"], "flag -help does not take a value"),
        (["--version=1"], "flag --version does not take a value"),
        (["-foo", "-help"], "unknown flag -foo"),
    ],
)
def test_command_line_errors(argv: list[str], expected: str) -> None:
    assert error_of(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["cleanup"],
        ["-chain", "FLUXT9", "cleanup"],
        ["cleanup", "-chain", "FLUXT9"],
        ["--chain=FLUXT9", "cleanup", "--debug"],
        ["--", "cleanup"],
    ],
)
def test_cleanup_subcommand(argv: list[str]) -> None:
    parsed = parse(argv)
    assert parsed.action == "run"
    assert parsed.command == "cleanup"
    assert parsed.settings is not None


def test_cleanup_with_flags_uses_them() -> None:
    parsed = parse(["-chain", "FLUXT9", "cleanup", "--debug"])
    assert parsed.settings is not None
    assert (parsed.settings.chain, parsed.settings.debug) == ("FLUXT9", True)


@pytest.mark.parametrize(
    ("argv", "action"),
    [
        (["-h"], "help"),
        (["-help"], "help"),
        (["--help"], "help"),
        (["--h"], "help"),
        (["-version"], "version"),
        (["--version"], "version"),
        # Help wins over bad values (nothing is validated) and over later arguments.
        (["-host-ip", "bad", "-h"], "help"),
        (["-h", "-foo", "bar"], "help"),
        (["cleanup", "--help"], "help"),
        (["-host-ttl=-1", "--version"], "version"),
    ],
)
def test_help_and_version_actions(argv: list[str], action: str) -> None:
    parsed = parse_args(argv, {}, discover=failing_discover)
    assert parsed.action == action
    assert parsed.settings is None


def test_version_text() -> None:
    assert version_text() == f"fluxd version {__version__}"


def test_usage_text_lists_every_flag_with_default_and_environment_name() -> None:
    text = usage_text()
    lines = text.splitlines()
    assert lines[0] == "Usage of fluxd:"
    assert any("cleanup" in line for line in lines[:4])
    flag_heads = [line.split()[0] for line in lines if line.startswith("  -")]
    # Go lists flags alphabetically; -help and -version come last.
    options = [head for head in flag_heads if head not in ("-help", "-version")]
    assert options == sorted(options)
    assert set(options) == {f"-{option.flag}" for option in OPTIONS if option.flag}
    for option in OPTIONS:
        assert option.env in text
    assert '  -bridge string\n    \tbridge device (default "docker0") (env FLUX_BRIDGE)' in text
    assert "  -host-ttl int\n" in text and "(default 30)" in text
    assert "  -debug\n    \toutput debugging logs (env FLUX_DEBUG)" in text
    assert '(default "local")' in text
    assert "ETCD_ADDRESS url[,url...]" in text


def test_readme_table_has_one_row_per_setting() -> None:
    table = settings_table_markdown()
    rows = table.strip().splitlines()
    assert rows[0] == "| flag | environment | default | meaning |"
    assert len(rows) == 2 + len(OPTIONS)
    for row, option in zip(rows[2:], OPTIONS, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 4, row
        assert cells[0] == (f"`-{option.flag}`" if option.flag else "—")
        assert cells[1] == f"`{option.env}`"
    assert "| `-bridge` | `FLUX_BRIDGE` | `docker0` | bridge device |" in rows
    assert "| `-debug` | `FLUX_DEBUG` | off | output debugging logs |" in rows
    assert "| `-host-ttl` | `FLUX_HOST_TTL` | 30 |" in table
    assert "| — | `ETCD_ADDRESS` | `http://127.0.0.1:2379` (with a warning) |" in table


def test_options_table_matches_the_model() -> None:
    assert [option.field for option in OPTIONS] == list(Settings.model_fields)
    for option in OPTIONS:
        assert Settings.model_fields[option.field].validation_alias == option.env
    flags = [option.flag for option in OPTIONS if option.flag]
    assert len(flags) == len(set(flags))
    assert len({option.env for option in OPTIONS}) == len(OPTIONS)


def test_cross_checks_report_errors_and_warnings_apart(tmp_path: Path) -> None:
    # Built without validation, so the errors are found rather than raised.
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    settings = Settings.model_construct(
        host_ip=IPv4Address("127.0.0.1"), etcd_cert_file=cert, etcd_username="u"
    )
    checked = cross_check(settings)
    assert [str(error) for error in checked.errors] == [
        "ETCD_CERT_FILE is set but ETCD_KEY_FILE is not: a client certificate and its key go"
        " together",
        "ETCD_USERNAME is set but ETCD_PASSWORD is not",
        "ETCD_CERT_FILE is set, so the endpoints must use https://",
    ]
    assert checked.warnings == (
        "ETCD_ADDRESS is not set; using http://127.0.0.1:2379",
        "host IP 127.0.0.1 is a loopback address: other hosts cannot reach this host's"
        " instances (set HOST_IP or -host-ip)",
    )
    # Through parse_args, the first error stops start-up and is the one line reported.
    env = {"ETCD_CERT_FILE": str(cert), "ETCD_USERNAME": "u"}
    assert error_of(["-host-ip=127.0.0.1"], env) == str(checked.errors[0])


# ---------------------------------------------------------------------------------------------
# The entry point


def test_load_or_exit_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_or_exit(["--help"], {})
    assert info.value.code == 0
    out, err = capsys.readouterr()
    assert out == usage_text() and err == ""


def test_load_or_exit_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_or_exit(["-version"], {})
    assert info.value.code == 0
    assert capsys.readouterr() == (f"fluxd version {__version__}\n", "")


def test_load_or_exit_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_or_exit(["-network-mode", "xyz"], {"HOST_IP": "10.0.0.1"})
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == 'fluxd: invalid value "xyz" for flag -network-mode: must be "local" or "global"\n'


def test_load_or_exit_returns_the_parsed_command() -> None:
    parsed = load_or_exit(["cleanup"], {"HOST_IP": "10.0.0.1"})
    assert parsed.command == "cleanup"
    assert parsed.settings is not None and parsed.settings.host_ip == IPv4Address("10.0.0.1")


ENTRY = (
    "import os, sys; from flux.config import load_or_exit; load_or_exit(sys.argv[1:], os.environ)"
)


def run_entry(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {o.env for o in OPTIONS}}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_entry_point_exit_statuses_in_a_real_process() -> None:
    help_run = run_entry("--help")
    assert (help_run.returncode, help_run.stderr) == (0, "")
    assert help_run.stdout == usage_text()

    version_run = run_entry("-version")
    assert (version_run.returncode, version_run.stdout, version_run.stderr) == (
        0,
        f"fluxd version {__version__}\n",
        "",
    )

    bad = run_entry("-host-ip", "abc")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == 'fluxd: invalid value "abc" for flag -host-ip: not an IP address\n'

    bad_env = run_entry(env={"HOST_IP": "10.0.0.1", "FLUX_NETWORK_MODE": "xyz"})
    assert bad_env.returncode == 2
    assert bad_env.stderr == (
        'fluxd: invalid value "xyz" for FLUX_NETWORK_MODE: must be "local" or "global"\n'
    )

    positional = run_entry("bar", env={"HOST_IP": "10.0.0.1"})
    assert (positional.returncode, positional.stderr) == (2, 'fluxd: unexpected argument "bar"\n')

    fine = run_entry("cleanup", env={"HOST_IP": "10.0.0.1"})
    assert (fine.returncode, fine.stdout, fine.stderr) == (0, "", "")


# ---------------------------------------------------------------------------------------------
# Properties


def _chain_ok(name: str) -> bool:
    try:
        Settings(host_ip="10.0.0.1", chain=name)  # type: ignore[arg-type]
    except ValidationError:
        return False
    return True


def _duration(high: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(1, high).map(str),
        st.integers(1, 1000).map(lambda ms: f"{ms}ms"),
        st.integers(1, high).map(lambda s: f"{s}s"),
        st.decimals(min_value="0.001", max_value=high, places=3).map(str),
    )


@st.composite
def valid_raw_settings(draw: st.DrawFn) -> dict[str, str]:
    """Raw text for a random valid combination of flag-bearing settings (field → text)."""
    raw: dict[str, str] = {}
    optional = {
        "host_ip": st.ip_addresses(v=4)
        .filter(lambda a: not (a.is_unspecified or a.is_multicast or a.is_reserved))
        .map(str),
        "host_ttl": st.integers(1, 3600).map(str),
        "network_mode": st.sampled_from(["local", "global"]),
        "bridge": st.text(string.ascii_letters + string.digits + "-_.@", min_size=1, max_size=15)
        .filter(lambda name: name not in (".", "..")),
        "chain": st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,27}", fullmatch=True)
        .filter(_chain_ok),
        "listen_prometheus": st.one_of(
            st.integers(1, 65535).map(lambda p: f":{p}"),
            st.integers(1, 65535).map(lambda p: f"127.0.0.1:{p}"),
        ),
        "debug": st.sampled_from(["true", "false"]),
        "reconcile_interval": _duration(86400),
        "connect_timeout": _duration(300),
        "shutdown_grace": st.one_of(st.just("0"), _duration(3600)),
        "http_header_timeout": _duration(3600),
        "http_idle_timeout": _duration(86400),
        "balance": st.sampled_from(["random", "p2c"]),
        "relay": st.sampled_from(["splice", "python"]),
        "publish_ip": st.sampled_from(["none", "0.0.0.0", "127.0.0.1", "192.0.2.7"]),
        "metrics_max_clients": st.integers(0, 100_000).map(str),
    }  # fmt: skip
    for field, strategy in optional.items():
        if draw(st.booleans()):
            raw[field] = draw(strategy)
    if "listen_prometheus" in raw and draw(st.booleans()):
        raw["advertise_prometheus"] = draw(
            st.tuples(st.sampled_from(["10.1.1.1", "prom.example", "192.0.2.9"]),
                      st.integers(1, 65535)).map(lambda hp: f"{hp[0]}:{hp[1]}")
        )  # fmt: skip
    return raw


def to_argv(raw: Mapping[str, str], forms: list[int]) -> list[str]:
    argv: list[str] = []
    options = {option.field: option for option in OPTIONS}
    for index, (field, value) in enumerate(raw.items()):
        option = options[field]
        assert option.flag is not None
        if option.is_bool:
            dashes = "--" if forms[index] % 2 else "-"
            argv.append(
                f"{dashes}{option.flag}" if value == "true" else f"{dashes}{option.flag}={value}"
            )
        else:
            argv.extend(flag_forms(option.flag, value)[forms[index]])
    return argv


def to_env(raw: Mapping[str, str]) -> dict[str, str]:
    options = {option.field: option for option in OPTIONS}
    return {options[field].env: value for field, value in raw.items()}


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=valid_raw_settings(), forms=st.lists(st.integers(0, 3), min_size=20, max_size=20))
def test_valid_settings_round_trip_through_flags_and_environment_identically(
    raw: dict[str, str], forms: list[int]
) -> None:
    from_flags = settings_of(to_argv(raw, forms))
    from_env = settings_of(env=to_env(raw))
    assert from_flags == from_env
    assert from_flags.warnings == from_env.warnings


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env_raw=valid_raw_settings(), flag_raw=valid_raw_settings())
def test_flags_override_environment_property(
    env_raw: dict[str, str], flag_raw: dict[str, str]
) -> None:
    # Each raw set that has an advertise address also has a listener, so the union is valid.
    combined = {**env_raw, **flag_raw}
    mixed = settings_of(to_argv(flag_raw, [0] * 20), to_env(env_raw))
    assert mixed == settings_of(env=to_env(combined))


@hsettings(max_examples=300, deadline=None)
@given(
    argv=st.lists(
        st.one_of(
            st.sampled_from([f"-{o.flag}" for o in OPTIONS if o.flag] + ["cleanup", "--", "-"]),
            st.text(max_size=12),
            st.from_regex(r"--?[a-z-]{1,12}(=.{0,8})?", fullmatch=True),
        ),
        max_size=6,
    )
)
def test_any_command_line_gives_settings_or_one_line_error(argv: list[str]) -> None:
    try:
        parsed = parse(argv)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
        assert str(exc).isprintable()
    else:
        assert parsed.action in ("run", "help", "version")
        assert (parsed.settings is None) == (parsed.action != "run")


# -- -advertise-prometheus with a DNS name: resolved once, at start ---------------------------


def _answers(*addresses: str) -> list[tuple[object, object, object, object, tuple[object, ...]]]:
    """getaddrinfo's answers for ``addresses``, in that order."""
    return [
        (
            socket.AF_INET6 if ":" in a else socket.AF_INET,
            socket.SOCK_STREAM,
            6,
            "",
            (a, 9000, 0, 0) if ":" in a else (a, 9000),
        )
        for a in addresses
    ]


ADVERTISE_ARGS = ["-listen-prometheus", ":9000", "-advertise-prometheus"]

RESOLVED = [
    # (answers, advertised, the note's tail)
    (["192.0.2.7"], "192.0.2.7:9000", "advertising 192.0.2.7:9000"),
    # IPv4 preferred even when the resolver answers IPv6 first; the others are named.
    (["2001:db8::7", "192.0.2.7", "192.0.2.8"], "192.0.2.7:9000",
     "(not the other addresses 2001:db8::7, 192.0.2.8)"),
    (["2001:db8::7"], "[2001:db8::7]:9000", "advertising [2001:db8::7]:9000"),
    (["127.0.0.1", "::1"], "127.0.0.1:9000",
     "(not the other addresses ::1); a loopback address is reachable from this host only"),
    (["192.0.2.7", "192.0.2.7"], "192.0.2.7:9000", "advertising 192.0.2.7:9000"),
]  # fmt: skip


@pytest.mark.parametrize(("answers", "advertised", "tail"), RESOLVED)
def test_advertise_name_is_resolved_to_one_ip(
    answers: list[str], advertised: str, tail: str
) -> None:
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list:  # type: ignore[type-arg]
        asked.append((host, port))
        return _answers(*answers)

    parsed = resolve_advertise(parse([*ADVERTISE_ARGS, "metrics.example:9000"]), resolve=resolve)
    assert asked == [("metrics.example", 9000)]
    assert parsed.settings is not None
    assert str(parsed.settings.advertise_prometheus) == advertised
    assert parsed.resolved is not None and parsed.resolved.endswith(tail)
    assert parsed.resolved.startswith("-advertise-prometheus metrics.example:9000 resolves to")
    assert f"advertise-prometheus={advertised}" in " ".join(parsed.describe())


def test_advertise_ip_and_cleanup_are_not_resolved() -> None:
    def resolve(host: str, port: int) -> list:  # type: ignore[type-arg]
        raise AssertionError(f"looked up {host}")

    parsed = parse([*ADVERTISE_ARGS, "192.0.2.9:9000"])
    assert resolve_advertise(parsed, resolve=resolve) is parsed
    cleanup = parse(["cleanup", *ADVERTISE_ARGS, "metrics.example:9000"])
    assert resolve_advertise(cleanup, resolve=resolve) is cleanup


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
         "cannot resolve 'metrics.example': Name or service not known"),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
         "cannot resolve 'metrics.example': Temporary failure in name resolution"),
        ([], "'metrics.example' resolves to no usable address"),
    ],
)  # fmt: skip
def test_advertise_name_that_does_not_resolve_is_refused(
    failure: BaseException | list[str], message: str
) -> None:
    def resolve(host: str, port: int) -> list:  # type: ignore[type-arg]
        if isinstance(failure, BaseException):
            raise failure
        return _answers(*failure)

    with pytest.raises(ConfigError) as info:
        resolve_advertise(parse([*ADVERTISE_ARGS, "metrics.example:9000"]), resolve=resolve)
    assert str(info.value) == f"-advertise-prometheus metrics.example:9000: {message}"
