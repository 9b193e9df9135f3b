"""The alerting rules and the Grafana dashboard in deploy/, checked against the real tools.

``promtool check rules`` and ``promtool test rules`` (the unit tests in
``deploy/prometheus/flux-rules.test.yml``) must pass, and the unit tests must not be vacuous:
with any one alert's expression replaced by one that never fires, they fail.  Then a real
Prometheus server (Debian's ``prometheus``: the tests fail when it or promtool is missing)
scrapes a real :class:`~flux.metrics.MetricsPlugin` on a loopback port, every second, while the
metrics hooks are fed the events the balancer and the relay report (connections, exchanges with
2xx, 5xx and aborted ones, gRPC calls, connect failures, resets, iptables syncs and a failed
one, instances in several states).  Every query of the dashboard, with its variables replaced as
Grafana would (all hosts and services, then one host and two services chosen), must be accepted
by that server and return series, so the metric and label names it uses (``exported_instance``
for the container of a connect failure) are the ones a scrape really gives, and each series has
the labels its legend names (a grouping by a label the series lack gives one nameless series,
not an error); the variables' ``label_values`` queries must find the services and hosts; and the
rule file loaded into the server must evaluate every rule without an error.  Each metric name in
the dashboard and the rules must be in what the plugin exports (or be ``up``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flux._splice import RELAY_COUNTERS
from flux.metrics import Metrics, MetricsPlugin
from flux.model import ConnectionInfo, HostRef, Instance, InstanceState
from flux.relay import GrpcCall, RelayResult, SpliceRelay
from tests.support.etcd_server import free_port
from tests.support.processes import stop_process

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "flux-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "flux-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "flux.json"
HOST = "127.0.0.1"

# What Grafana puts in place of its variables: a rate interval of four scrapes at the test's
# 1 s interval, and every host and service ("All" is ".*" in the dashboard).
EVERYTHING = {
    "$__rate_interval": "4s",
    "$host": ".*",
    "$service": ".*",
}
# Words of PromQL that are not metric names (function names are followed by "(").
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, (
        f"{name} is missing: install Debian's 'prometheus' package (scripts/setup-system.sh)"
    )
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def alert_names(rules: str) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", rules, flags=re.MULTILINE)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers,
    ranges and grouping clauses are taken out, without function names and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # an exponent: 1e6
            continue
        if text[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def chosen(port: int) -> dict[str, str]:
    """The variables with one host and two services chosen, as Grafana writes them into a
    regex matcher: alternatives in parentheses, the host's dots escaped for the regex."""
    host = f"{HOST}:{port}".replace(".", "\\\\.")
    return {**EVERYTHING, "$host": f"({host})", "$service": "(web|api)"}


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a dashboard variable the test does not know: {expr}"
    return expr


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in model["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_targets(model: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, expression, legend) of every target."""
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in panels(model)
        for target in panel.get("targets", [])
    ]


def variable_queries(model: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, selector, label) of every ``label_values(selector, label)`` variable."""
    out = []
    for variable in model["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text)
        assert match, f"variable {variable['name']}: not a label_values query: {text}"
        out.append((variable["name"], match.group(1), match.group(2)))
    return out


# -- promtool ------------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    count = len(alert_names(RULES.read_text()))
    assert count == 7 and f"SUCCESS: {count} rules found" in result.stdout, result.stdout


def test_promtool_runs_the_rules_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", RULE_TESTS.read_text())
    for alert in alert_names(RULES.read_text()):
        kinds = {bool(quiet) for name, quiet in cases if name == alert}
        assert kinds == {True, False}, f"{alert}: cases {kinds} (True: nothing fires)"


def test_the_unit_tests_fail_when_an_alert_never_fires(tmp_path: Path) -> None:
    rules = RULES.read_text()
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    for alert in alert_names(rules):
        block = re.compile(rf"(- alert: {alert}\n\s+expr: )(.*?)(\n\s+for: )", re.DOTALL)
        mutated, count = block.subn(r"\g<1>vector(0) > 1\g<3>", rules)
        assert count == 1, alert
        (tmp_path / RULES.name).write_text(mutated)
        result = promtool("test", "rules", tmp_path / RULE_TESTS.name)
        assert result.returncode != 0, f"the unit tests pass without {alert} firing"
        assert f"alertname: {alert}," in result.stdout + result.stderr


def test_metric_names_are_found_in_expressions() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, service) (rate(flux_http_request_duration_'
        'seconds_bucket{code!="aborted", service=~"$service"}[5m]))) / 1e6 > bool 2 '
        "unless on (service) up offset 5m or vector(0)"
    )
    assert metric_names(expr) == {"flux_http_request_duration_seconds_bucket", "up"}
    assert metric_names('{__name__="x"} + count(y{a="b"})') == {"y"}


# -- the dashboard as a Grafana model ------------------------------------------------------------


def test_the_dashboard_is_a_grafana_model_with_its_variables() -> None:
    model = dashboard()
    assert model["schemaVersion"] >= 36 and model["uid"] and model["title"] == "flux"
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {name for name, _, _ in variable_queries(model)} == {"host", "service"}
    ids = [panel["id"] for panel in panels(model)]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in panels(model):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            # Every selector is narrowed to the hosts chosen.
            for matchers in re.findall(r"\{([^}]*)\}", target["expr"]):
                assert 'instance=~"$host"' in matchers, (panel["title"], target["expr"])


def test_the_label_values_the_dashboard_names_exist() -> None:
    exprs = " ".join(expr for _, expr, _ in dashboard_targets(dashboard()))
    for alternatives in re.findall(r'event=~"([^"]*)"', exprs):
        assert set(alternatives.split("|")) <= set(RELAY_COUNTERS), alternatives
    states = {str(state) for state in InstanceState}
    assert set(re.findall(r'state="([^"]*)"', exprs)) <= states
    rules = RULES.read_text()
    assert set(re.findall(r'state!?="([^"]*)"', rules)) <= states


# -- a real Prometheus scraping a real metrics plugin --------------------------------------------


class Agent:
    """The agent's view the plugin reads flux_instances from: this host's instances."""

    docker_connected = True

    def __init__(self) -> None:
        host = HostRef(address=HOST)
        self.instances = {
            ("web", "c1"): Instance(host=host, address="127.0.0.1:32768"),
            ("web", "c2"): Instance(host=host, address="127.0.0.1:32769",
                                    state=InstanceState.UNHEALTHY),
            ("api", "c3"): Instance(host=host, address="127.0.0.1:32770"),
        }  # fmt: skip


def traffic(metrics: Metrics) -> None:
    """One round of what the balancer and the relay report to the metrics hooks."""
    for service, instance, protocol in (("web", "c1", "http"), ("api", "c3", "http")):
        info = ConnectionInfo(service, protocol, instance, "10.0.0.2:8080", "192.0.2.7")
        metrics.on_connection(info)
        for status in (200, 200, 404, 503):
            metrics.record_exchange(info, "GET", status, 900, 1500)
        metrics.record_exchange(info, "GET", 1, 300, 400)  # cut short by the client
        metrics.record_exchange(info, "POST", 200, 2000, 2500, GrpcCall("/pkg.Greeter/Hello", 0))
        metrics.record_exchange(info, "POST", 200, 2000, 2500, GrpcCall("/pkg.Greeter/Hello", 14))
        metrics.on_done(info, RelayResult(300, 5000, None, 0.01, answered=400))
        metrics.on_connection(info)  # one stays open
        metrics.on_connect_failure(service, "c9")
        metrics.on_reset(service, "published:8443")
    metrics.on_iptables_sync(0.004)
    metrics.on_iptables_sync_failure()


@pytest.fixture
async def plugin() -> AsyncIterator[MetricsPlugin]:
    metrics = Metrics()
    metrics.relay_counters.append(SpliceRelay(shards=1).engine_counters)
    traffic(metrics)
    served = MetricsPlugin(
        metrics, listen=(HOST, 0), host_address=HOST, agent=Agent(), version="test"
    )
    await served.start()

    async def feed() -> None:
        while True:  # cancelled below; rates need counters that move between scrapes
            await asyncio.sleep(0.25)
            traffic(metrics)

    feeder = asyncio.create_task(feed())
    try:
        yield served
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        await served.close()


@pytest.fixture
def prometheus(plugin: MetricsPlugin, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server on a loopback port scraping the plugin every second, with the rules."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n  - job_name: flux\n    static_configs:\n"
        f"      - targets: ['{HOST}:{plugin.port}']\n"
    )
    port = free_port()
    server = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={HOST}:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield f"http://{HOST}:{port}"
    finally:
        stop_process(server, grace=20)
        assert server.stderr is not None
        server.stderr.close()


async def api(session: aiohttp.ClientSession, url: str, **params: str) -> dict[str, Any]:
    async with session.get(url, params=params) as response:
        body: dict[str, Any] = await response.json(content_type=None)
        return body


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.5)


@pytest.mark.timeout(180)
async def test_every_query_runs_on_a_real_prometheus_scraping_fluxd(
    plugin: MetricsPlugin, prometheus: str
) -> None:
    model = dashboard()
    targets = dashboard_targets(model)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:  # trust_env=False: no proxy
        async with session.get(f"http://{HOST}:{plugin.port}/metrics") as response:
            exposition = await response.text()
        exported = {
            sample.name
            for family in text_string_to_metric_families(exposition)
            for sample in family.samples
        } | {"up"}  # the one series Prometheus adds itself

        async def scraped() -> bool:
            try:
                body = await api(
                    session, f"{prometheus}/api/v1/query",
                    query='count_over_time(up{job="flux"}[1m]) >= 6 and up{job="flux"} == 1',
                )  # fmt: skip
            except (aiohttp.ClientError, ValueError):  # not listening, or not ready (503 text)
                return False
            return body.get("status") == "success" and bool(body["data"]["result"])

        await wait_for(scraped, 90, "Prometheus to scrape the plugin six times")

        failures = []
        for (title, expr, legend), variables in itertools.product(
            targets, (EVERYTHING, chosen(plugin.port))
        ):
            names = metric_names(expr) - exported
            if names:
                failures.append(f"{title}: {sorted(names)} not exported")
            query = substitute(expr, variables)
            body = await api(session, f"{prometheus}/api/v1/query", query=query)
            if body["status"] != "success":
                failures.append(f"{title}: {query}: {body.get('error')}")
                continue
            if not body["data"]["result"]:
                failures.append(f"{title}: {query}: no series")
            for series in body["data"]["result"]:
                missing = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) - set(series["metric"])
                if missing:
                    failures.append(f"{title}: {query}: no {sorted(missing)} in {series['metric']}")
        for name, selector, label in variable_queries(model):
            match = {"match[]": substitute(selector, chosen(plugin.port))}
            body = await api(session, f"{prometheus}/api/v1/series", **match)
            values = {series.get(label) for series in body.get("data", [])}
            wanted = {"web", "api"} if label == "service" else {f"{HOST}:{plugin.port}"}
            if body["status"] != "success" or not wanted <= values:
                failures.append(f"variable {name}: {selector} gives {label} {values}")
        assert not failures, "\n".join(failures)

        async def evaluated() -> list[dict[str, Any]] | None:
            body = await api(session, f"{prometheus}/api/v1/rules")
            rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
            return None if any(rule["health"] == "unknown" for rule in rules) else rules

        async def all_evaluated() -> bool:
            return await evaluated() is not None

        await wait_for(all_evaluated, 30, "Prometheus to evaluate every rule")
        rules = await evaluated()
        assert rules is not None
        assert sorted(rule["name"] for rule in rules) == sorted(alert_names(RULES.read_text()))
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule
            assert metric_names(rule["query"]) <= exported, rule["query"]
