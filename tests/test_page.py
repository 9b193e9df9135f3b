"""The status page in a real browser: Debian's chromium, headless, driven by Selenium.

Two kinds of server are behind the page here:

- a :class:`~tests.support.status_fixture.FixtureServer` serving the page's real files (the
  routes fluxd uses) with generated ``/status`` documents in the full shape, to check what the
  page does with every field, with none, with hostile strings, with the cluster view, with
  1,000 services and 5,000 instances (the figures are printed: ``-s`` shows them), and how it
  updates in place;
- a real fluxd (``-listen-prometheus`` on a free loopback port, the session's etcd) with real
  busybox httpd containers as instances, to check the page against what fluxd serves today:
  states, requests/s appearing as requests go through, gzip-compressed JSON, a killed
  instance, connections held open, the filter, the headers, and the stale marker when fluxd
  stops.

Every wait has a deadline; nothing asserts on timings.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from flux.metrics import Metrics, MetricsPlugin
from flux.metrics.statuspage import CONTENT_SECURITY_POLICY, PAGE_FILES, accepts_gzip
from tests.support.browser import (
    cell,
    chromium,
    console_errors,
    exchanges,
    instance_rows,
    renders,
    service_rows,
    wait_for,
    wait_renders,
)
from tests.support.docker_images import BUSYBOX_IMAGE, ensure_busybox_image
from tests.support.etcd_server import EtcdServer
from tests.support.fluxd_process import HOST, Fluxd, docker, wait_until
from tests.support.other_host import random_loopback_vip, rules_for
from tests.support.status_fixture import FixtureServer, history_document, status_document

DASH = "\u2013"  # what the page shows for a figure it does not have
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
XSS = "<img src=x onerror=alert(1)>"
# The policy of the issue-19 contract, spelled out once more so a change to the constant shows.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# -- helpers --------------------------------------------------------------------------------


def history_asks(requests: list[str]) -> list[tuple[float | None, list[str]]]:
    """The page's ``/status/history`` requests among ``requests``: (since, services) each."""
    asks = []
    for request in requests:
        url = urllib.parse.urlsplit(request)
        if url.path == "/status/history":
            query = urllib.parse.parse_qs(url.query)
            since = float(query["since"][0]) if "since" in query else None
            asks.append((since, query.get("service", [])))
    return asks


def transfers(driver: WebDriver) -> list[tuple[str, int, int]]:
    """The JSON the page fetched since the last call, from its resource timing: (path and
    query, bytes on the wire, bytes decoded) each."""
    entries: list[list[Any]] = driver.execute_script(TRANSFERS)
    return [(str(path), int(wire), int(decoded)) for path, wire, decoded in entries]


TRANSFERS = """
const entries = performance.getEntriesByType('resource')
  .filter((e) => new URL(e.name).pathname.startsWith('/status'))
  .map((e) => {
    const url = new URL(e.name);
    return [url.pathname + url.search, e.encodedBodySize, e.decodedBodySize];
  });
performance.clearResourceTimings();
return entries;
"""


def no_alert(driver: WebDriver) -> bool:
    try:
        driver.switch_to.alert  # noqa: B018 - the property raises when there is none
    except NoAlertPresentException:
        return True
    return False


def table_mutations(driver: WebDriver) -> int:
    return int(driver.execute_script("return window.mutationCount"))


OBSERVE_TABLE = """
window.mutationCount = 0;
new MutationObserver((records) => { window.mutationCount += records.length; })
  .observe(document.getElementById('services'),
           {subtree: true, childList: true, characterData: true, attributes: true});
"""


# -- the files and their headers ------------------------------------------------------------


async def test_page_files_are_served_with_the_policy_headers_and_get_only() -> None:
    plugin = MetricsPlugin(Metrics(), listen=("127.0.0.1", 0), host_address="10.0.0.1")
    port = await plugin.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for page_file in PAGE_FILES:
                url = f"http://127.0.0.1:{port}{page_file.route}"
                async with session.get(url) as response:
                    body = await response.read()
                    assert response.status == 200
                    assert response.content_type == page_file.content_type
                    assert response.headers["Content-Security-Policy"] == POLICY
                    assert response.headers["X-Content-Type-Options"] == "nosniff"
                    assert response.headers["Cache-Control"] == "no-cache"
                    packaged = resources.files("flux.metrics").joinpath("page", page_file.name)
                    assert body == packaged.read_bytes()
                async with session.post(url, data=b"x") as response:
                    assert response.status == 405
            # The JSON and the exposition are where they were.
            for path in ("/metrics", "/healthz", "/status"):
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    assert response.status == 200, path
    finally:
        await plugin.close()
    assert CONTENT_SECURITY_POLICY == POLICY


async def test_every_route_answers_gzip_to_a_browser() -> None:
    """A browser accepts gzip, deflate, br and zstd: fluxd answers gzip, on every route."""
    plugin = MetricsPlugin(Metrics(), listen=("127.0.0.1", 0), host_address="10.0.0.1")
    plugin.sample()
    port = await plugin.start()
    codings = {
        "gzip, deflate, br, zstd": "gzip",  # chromium's
        "deflate, gzip": "gzip",
        "deflate": "deflate",
        "gzip;q=0, deflate": "deflate",
        "br, zstd": None,
        "identity": None,
    }
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for path in ("/", "/page/app.js", "/status", "/status?scope=cluster",
                         "/status/history", "/status/history?since=0&service=x", "/metrics"):
                for accepted, coding in codings.items():
                    url = f"http://127.0.0.1:{port}{path}"
                    async with session.get(url, headers={"Accept-Encoding": accepted}) as answer:
                        body = await answer.read()
                        assert answer.status == 200, path
                        assert answer.headers.get("Content-Encoding") == coding, (path, accepted)
                        if coding == "gzip":
                            assert gzip.decompress(body)
    finally:
        await plugin.close()
    assert accepts_gzip("x-gzip") and accepts_gzip("GZIP; q=0.5")
    assert not accepts_gzip("gzip;q=0") and not accepts_gzip("gzip;q=x") and not accepts_gzip("")


def test_the_page_files_are_package_data(tmp_path: Path) -> None:
    """What the wheel and the image get: setuptools' build_py copies the files beside the code."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for page_file in PAGE_FILES:
        built = tmp_path / "flux" / "metrics" / "page" / page_file.name
        source = root / "src" / "flux" / "metrics" / "page" / page_file.name
        assert built.read_bytes() == source.read_bytes(), page_file.name


class _InlineFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "style" or "style" in names or any(name.startswith("on") for name in names):
            self.inline.append(tag)
        if tag == "script":
            self._in_script = True
            if "src" not in names:
                self.inline.append("script without src")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("script body")


def test_index_has_no_inline_script_or_style_and_the_script_no_markup_sink() -> None:
    page = resources.files("flux.metrics").joinpath("page")
    finder = _InlineFinder()
    finder.feed(page.joinpath("index.html").read_text())
    assert finder.inline == []
    script = page.joinpath("app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):  # fmt: skip
        assert sink not in script, sink


# -- the page with generated documents ------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def test_every_field_of_the_full_document_is_shown(browser: WebDriver) -> None:
    document = status_document(3, 3)
    with FixtureServer(document, history_document(document)) as server:
        browser.get(server.url)
        first = wait_renders(browser)
        card = browser.find_element(By.CSS_SELECTOR, "#hosts .card").text
        for shown in ("version\n0.1.0", "uptime\n1d 2h", "host IP\n10.0.0.1",
                      "reachable · http://10.0.0.9:2379 · lease 4s old",
                      "events connected · reconciled 31s ago", "engine threads\n2",
                      "open connections\n1234", "descriptors\n2540 of 65536",
                      "health\nhealthy"):  # fmt: skip
            assert shown in card, (shown, card)
        rows = service_rows(browser)
        assert list(rows) == ["svc-0000", "svc-0001", "svc-0002"]
        web = rows["svc-0000"]
        figures = document["services"][0]["figures"]["now"]
        assert cell(web, "protocol") == "http" and cell(web, "state") == "forwarding"
        assert "10.128.0.0:80" in cell(web, "address") and ":8000 svc-0000.example" in cell(
            web, "address"
        )
        assert cell(web, "instances") == "3 live"
        assert cell(web, "open") == str(document["services"][0]["connections_open"])
        assert f"5xx {figures['req_rate']['5xx']:.2g}"[:7] in cell(web, "req")
        assert " ms · " in cell(web, "latency") and "kB" in cell(web, "bytes")
        instances = instance_rows(rows["svc-0001"])
        assert sorted(instances) == ["svc-0001-i0", "svc-0001-i1", "svc-0001-i2"]
        backoff = instances["svc-0001-i2"]
        assert "until" in backoff[5] and "connect refused" in backoff[5]
        assert backoff[6] == "registry.example/team/svc-0001:v2" and backoff[4] == "10.0.0.3"
        assert cell(rows["svc-0001"], "req") == DASH * 2  # a tcp service has no request figures
        points = web.find_element(By.CSS_SELECTOR, "svg.spark polyline.total")
        assert len(str(points.get_attribute("points")).split()) == 180
        # The history is asked for the charted services only: the first time whole, then
        # only the samples newer than the last one the page holds.
        wait_renders(browser, first)
        asked = history_asks(server.requests)
        names = ["svc-0000", "svc-0001", "svc-0002"]
        assert asked[0] == (None, names)
        assert (document["fluxd"]["now"], names) in asked[1:]
        assert "stale" not in str(browser.find_element(By.ID, "asof").get_attribute("class"))
        assert console_errors(browser) == []


def test_missing_fields_show_a_dash_and_the_older_shape_works(browser: WebDriver) -> None:
    bare = {"services": [{"name": "bare", "instances": [{"name": "only"}]}, {}]}
    with FixtureServer(bare, history={}) as server:
        browser.get(server.url)
        wait_renders(browser)
        rows = service_rows(browser)
        assert set(rows) == {"bare", DASH}
        for name in ("protocol", "open", "conn", "bytes"):
            assert set(cell(rows["bare"], name)) <= {DASH}, name
        assert instance_rows(rows["bare"])["only"][3] == DASH
        assert "uptime\n" + DASH in browser.find_element(By.CSS_SELECTOR, "#hosts .card").text
        # What fluxd served before the full shape: the balancer's pools and the agent's list.
        asked = len(server.requests)
        server.document = {
            "host": "10.0.0.1", "version": "0.0.9", "healthy": False,
            "problems": ["Docker event stream is down"],
            "balancer": {"ready": True, "relay_active": 1, "publish_ip": None, "services": {
                "web": {"state": "forwarding", "address": "10.128.0.1:80", "protocol": "tcp",
                        "instances": [
                            {"name": "c1", "address": "10.0.0.2:80", "ready": True,
                             "failures": 0, "retry_in": None, "active": 3},
                            {"name": "c2", "address": "10.0.0.3:80", "ready": False,
                             "failures": 2, "retry_in": 1.5, "active": 0}]},
                "db": {"state": "conflict", "address": "10.128.0.1:80", "protocol": "tcp",
                       "conflict": "address 10.128.0.1:80 is web's", "holder": "web"}}},
            "agent": {"docker_connected": False, "instances": [
                {"service": "web", "instance": "c1", "state": "live", "address": "10.0.0.2:80",
                 "rule": "default"},
                {"service": "web", "instance": "c3", "state": "draining",
                 "address": "10.0.0.4:80", "rule": None}]},
        }  # fmt: skip
        wait_for(browser, lambda d: set(service_rows(d)) == {"web", "db"}, 15, "the older shape")
        rows = service_rows(browser)
        assert cell(rows["db"], "state") == "conflictaddress 10.128.0.1:80 is web's"
        assert cell(rows["web"], "open") == "3"
        assert cell(rows["web"], "instances") == "1 live · 1 backoff · 1 draining"
        instances = instance_rows(rows["web"])
        assert instances["c1"][5] == "live" and instances["c1"][7] == "3"
        assert instances["c2"][5].startswith("backoffuntil ")
        assert instances["c3"][5] == "draining"
        card = browser.find_element(By.CSS_SELECTOR, "#hosts .card")
        assert "Docker event stream is down" in card.text and "unhealthy" in str(
            card.get_attribute("class")
        )
        # No history route asked for: this fluxd has none.
        assert not [r for r in server.requests[asked + 1 :] if r.startswith("/status/history")]
        assert console_errors(browser) == []


def test_hostile_strings_are_shown_as_text_and_run_nothing(browser: WebDriver) -> None:
    document = status_document(2, 2)
    service = document["services"][0]
    service["name"] = XSS
    service["reason"] = XSS
    service["published"] = [{"port": 80, "hostnames": [XSS], "state": XSS, "reason": XSS}]
    for instance in service["instances"]:
        instance.update(image=XSS, reason=XSS, host=XSS, address=XSS, container_id=XSS)
    service["instances"][0]["name"] = XSS
    document["fluxd"]["etcd"]["endpoint"] = XSS
    document["problems"] = [XSS]
    document["healthy"] = False
    with FixtureServer(document) as server:
        browser.get(server.url)
        wait_renders(browser)
        assert no_alert(browser)
        assert browser.find_elements(By.CSS_SELECTOR, "img") == []
        rows = service_rows(browser)
        assert XSS in rows
        assert XSS in instance_rows(rows[XSS])
        assert cell(rows[XSS], "address").count(XSS) >= 2
        assert browser.find_element(By.CSS_SELECTOR, "#hosts .card").text.count(XSS) == 2
        browser.find_element(By.ID, "filter").send_keys("<img")
        wait_for(browser, lambda d: not service_rows(d)["svc-0001"].is_displayed(), 5, "filter")
        assert rows[XSS].is_displayed()
        time.sleep(0.5)
        assert no_alert(browser)
        assert console_errors(browser) == []


def test_refreshes_update_rows_in_place_and_keep_the_filter(browser: WebDriver) -> None:
    document = status_document(5, 2)
    with FixtureServer(document, history_document(document)) as server:
        browser.get(server.url)
        count = wait_renders(browser)
        before = service_rows(browser)
        browser.execute_script(OBSERVE_TABLE)
        count = wait_renders(browser, count)
        count = wait_renders(browser, count)
        # The same document again: not one node in the table was touched.
        assert table_mutations(browser) == 0
        changed = json.loads(json.dumps(document))
        changed["services"][2]["connections_open"] = 424242
        changed["services"][2]["instances"][1]["state"] = "draining"
        server.document = changed
        wait_for(browser, lambda d: cell(service_rows(d)["svc-0002"], "open") == "424242", 10,
                 "the new figure")  # fmt: skip
        after = service_rows(browser)
        assert [after[name].id for name in after] == [before[name].id for name in before]
        assert instance_rows(after["svc-0002"])["svc-0002-i1"][5].startswith("draining")
        # Two cells' text and the state cell's class changed, nothing else.
        assert 0 < table_mutations(browser) <= 8
        # The filter hides the others and holds across refreshes and a reload.
        box = browser.find_element(By.ID, "filter")
        box.send_keys("SVC-0003")
        wait_for(browser, lambda d: not service_rows(d)["svc-0001"].is_displayed(), 5, "filter")
        wait_renders(browser, renders(browser))
        shown = [name for name, row in service_rows(browser).items() if row.is_displayed()]
        assert shown == ["svc-0003"]
        box.clear()
        box.send_keys("svc-0004-i1")  # an instance's name finds its service
        wait_for(browser, lambda d: [n for n, r in service_rows(d).items() if r.is_displayed()]
                 == ["svc-0004"], 5, "filter on an instance")  # fmt: skip
        browser.refresh()
        wait_renders(browser)
        assert browser.find_element(By.ID, "filter").get_attribute("value") == "svc-0004-i1"
        shown = [name for name, row in service_rows(browser).items() if row.is_displayed()]
        assert shown == ["svc-0004"]
        assert console_errors(browser) == []


def test_the_marker_turns_stale_when_answers_stop_and_clears_when_they_return(
    browser: WebDriver,
) -> None:
    document = status_document(2, 1)
    with FixtureServer(document) as server:
        browser.get(server.url)
        wait_renders(browser)
        asof = browser.find_element(By.ID, "asof")
        assert asof.text == "as of 08:00:00" or asof.text.startswith("as of ")
        assert "stale" not in str(asof.get_attribute("class"))
        server.failing = True
        wait_for(browser, lambda d: "stale" in str(asof.get_attribute("class")), 15, "stale")
        assert "stale" in asof.text and "503" in asof.text
        server.failing = False
        wait_for(browser, lambda d: "stale" not in str(asof.get_attribute("class")), 15, "fresh")


def test_the_cluster_view_labels_each_host_and_shows_the_unreachable(browser: WebDriver) -> None:
    here = status_document(2, 1)
    there = status_document(1, 1, seed=2)
    there["fluxd"]["host_ip"] = there["host"] = "10.0.0.2"
    cluster = {
        "now": here["fluxd"]["now"],
        "hosts": [
            {"host": "10.0.0.1", "endpoint": "10.0.0.1:9380", "reachable": True, "status": here},
            {"host": "10.0.0.2", "endpoint": "10.0.0.2:9380", "reachable": True, "status": there},
            {"host": "10.0.0.3", "endpoint": "10.0.0.3:9380", "reachable": False,
             "error": "no answer in 1 s"},
        ],
    }  # fmt: skip
    with FixtureServer(here) as server:
        browser.get(server.url)
        count = wait_renders(browser)
        assert not browser.find_element(By.CSS_SELECTOR, "th.col-host").is_displayed()
        server.document = cluster
        browser.find_element(By.ID, "scope-cluster").click()
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#hosts .card")) == 3,
                 10, "three host cards")  # fmt: skip
        assert "/status?scope=cluster" in server.requests
        cards = browser.find_elements(By.CSS_SELECTOR, "#hosts .card")
        assert [card.find_element(By.TAG_NAME, "h2").text for card in cards] == [
            "host 10.0.0.1", "host 10.0.0.2", "host 10.0.0.3"]  # fmt: skip
        assert "unreachable" in str(cards[2].get_attribute("class"))
        assert "unreachable (10.0.0.3:9380): no answer in 1 s" in cards[2].text
        hosts = [
            str(td.get_attribute("textContent"))
            for td in browser.find_elements(By.CSS_SELECTOR, "tr.service td.col-host")
        ]
        assert hosts == ["10.0.0.1", "10.0.0.1", "10.0.0.2"]
        assert browser.find_element(By.CSS_SELECTOR, "th.col-host").is_displayed()
        assert renders(browser) > count
        assert console_errors(browser) == []


def test_a_thousand_services_and_five_thousand_instances(browser: WebDriver) -> None:
    document = status_document(1000, 5)
    history = history_document(document)
    with FixtureServer(document, history) as server:
        browser.get(server.url)
        first = wait_renders(browser, 0, timeout=60)
        first_render = float(browser.execute_script("return document.body.dataset.renderMs"))
        first_fetched = transfers(browser)
        # Collapsed past the threshold: no instance row is built until asked for.
        assert len(service_rows(browser)) == 1000
        assert browser.find_elements(By.CSS_SELECTOR, "tr.instance") == []
        # Only the rows on screen are charted, their history asked for whole once.
        charted = int(browser.execute_script("return document.body.dataset.charted"))
        (asked,) = history_asks(server.requests)
        assert asked[0] is None and len(asked[1]) == charted
        assert 10 <= charted <= 50 and asked[1][0] == "svc-0000"
        steady, later_fetched = [], []
        count = first
        for step in range(1, 4):
            # fluxd moves on: new figures, and one more sample in the ring.
            now = document["fluxd"]["now"] + 5 * step
            server.document = status_document(1000, 5, figures=1 + 0.1 * step, now=now)
            sample = history_document(server.document, samples=1)["samples"]
            server.history = {**history, "samples": server.history["samples"][1:] + sample}
            count = wait_renders(browser, count, timeout=60)
            steady.append(float(browser.execute_script("return document.body.dataset.renderMs")))
            later_fetched += transfers(browser)
        refresh = float(browser.execute_script("return document.body.dataset.refreshMs"))
        # Each later ask is the new samples of services charted already, or the whole history
        # of services newly on screen (a row's height may change with its figures).
        known = set(asked[1])
        for since, names in history_asks(server.requests)[1:]:
            assert 0 < len(names) <= 50
            if since is None:
                assert known.isdisjoint(names), names
                known.update(names)
            else:
                assert known.issuperset(names), names
        assert any(since is not None for since, _ in history_asks(server.requests))
        # Scrolled to the middle: the rows now on screen are charted within a refresh or so.
        row = service_rows(browser)["svc-0500"]
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
        wait_for(browser, lambda d: len(str(service_rows(d)["svc-0500"].find_element(
            By.CSS_SELECTOR, "svg.spark polyline.total").get_attribute("points")).split()) == 180,
            30, "svc-0500 charted once on screen")  # fmt: skip
        toggle = service_rows(browser)["svc-0500"].find_element(By.CSS_SELECTOR, "button.toggle")
        toggle.click()
        assert len(instance_rows(service_rows(browser)["svc-0500"])) == 5

        def sizes(fetched: list[tuple[str, int, int]], path: str, since: bool = False
                  ) -> tuple[float, float]:  # fmt: skip
            mine = [(wire, decoded) for url, wire, decoded in fetched
                    if url.split("?")[0] == path and ("since=" in url) == since]  # fmt: skip
            assert mine, (path, fetched)
            return (sum(w for w, _ in mine) / len(mine), sum(d for _, d in mine) / len(mine))

        status_wire, status_json = sizes(first_fetched + later_fetched, "/status")
        first_wire, first_json = sizes(first_fetched, "/status/history")
        next_wire, next_json = sizes(later_fetched, "/status/history", since=True)
        assert status_wire < status_json / 5  # gzip, as the browser asked
        whole = json.dumps(history, separators=(",", ":")).encode()
        print(
            f"\n1,000 services / 5,000 instances: /status {status_json / 1e6:.2f} MB per "
            f"refresh ({status_wire / 1e3:.0f} kB gzipped); /status/history of the {charted} "
            f"services charted: {first_json / 1e3:.0f} kB the first time "
            f"({first_wire / 1e3:.0f} kB gzipped), {next_json / 1e3:.1f} kB per refresh with a "
            f"new sample ({next_wire / 1e3:.1f} kB gzipped); the whole ring of all 1,000 "
            f"services would be {len(whole) / 1e6:.1f} MB ({len(gzip.compress(whole)) / 1e6:.1f}"
            f" MB gzipped); first render {first_render:.0f} ms, later renders "
            f"{', '.join(f'{ms:.0f}' for ms in steady)} ms, a whole refresh (fetch, parse, "
            f"render, charts) {refresh:.0f} ms"
        )
        assert console_errors(browser) == []


# -- the page against a real fluxd with containers ------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def fluxctl(etcd: EtcdServer, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "flux.fluxctl", *args],
        env={**os.environ, "ETCD_ADDRESS": etcd.endpoint},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"fluxctl {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


class Containers:
    """busybox httpd containers published on 127.0.0.1; removed by :meth:`remove_all`."""

    def __init__(self) -> None:
        self.tag = "flux-page-" + secrets.token_hex(3)
        self.made: list[str] = []

    def httpd(self, *labels: str) -> str:
        label_args = [arg for label in labels for arg in ("--label", label)]
        cid = docker(
            "run", "-d", "--label", "flux-test=page", "--label", f"page={self.tag}", *label_args,
            "-p", "127.0.0.1::80", BUSYBOX_IMAGE, "httpd", "-f", "-p", "80", "-h", "/",
        )  # fmt: skip
        self.made.append(cid)
        return cid

    def remove_all(self) -> None:
        if self.made:
            subprocess.run(["docker", "rm", "-f", *self.made], capture_output=True, timeout=120)


@pytest.fixture
def containers() -> Iterator[Containers]:
    ensure_busybox_image()
    made = Containers()
    try:
        yield made
    finally:
        made.remove_all()


def instance_named(rows: dict[str, list[str]], cid: str) -> list[str] | None:
    for name, texts in rows.items():
        if cid.startswith(name) or name.startswith(cid[:12]):
            return texts
    return None


def status_of(url: str) -> int:
    try:
        with _OPENER.open(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def send_requests(url: str, count: int, codes: Counter[int]) -> None:
    """``count`` GETs of ``url`` one after another, 0.1 s apart; their statuses into ``codes``."""
    for _ in range(count):
        codes[status_of(url)] += 1
        time.sleep(0.1)


def lines(tbody: WebElement, name: str) -> list[str]:
    """The lines (10 s, 5 min) of the service row's two-line cell of class ``name``."""
    found: list[str] = tbody.parent.execute_script(
        "return [...arguments[0].querySelectorAll(`tr.service td.${arguments[1]} .line`)]"
        ".map((line) => line.textContent)", tbody, name)  # fmt: skip
    return found


def class_rate(line: str, code: str) -> float:
    """The rate of class ``code`` in a line such as ``2xx 0 3xx 0 4xx 3.2 5xx 0``."""
    match = re.search(rf"{code} ([0-9.e+-]+)", line)
    assert match is not None, (code, line)
    return float(match[1])


def web_requests_shown(driver: WebDriver, cids: tuple[str, ...]) -> bool:
    """The web row shows 4xx requests/s over the last 10 s, each instance of ``cids`` a
    non-zero req/s, and its chart a non-zero peak."""
    row = service_rows(driver)["web"]
    now = lines(row, "req")[0]
    if now == DASH or class_rate(now, "4xx") == 0:
        return False
    instances = instance_rows(row)
    for cid in cids:
        texts = instance_named(instances, cid)
        if texts is None or texts[9] in (DASH, "0"):
            return False
    title = row.find_element(By.CSS_SELECTOR, "svg.spark title").get_attribute("textContent")
    peak = re.search(r"peak ([0-9.e+-]+)$", str(title))
    return peak is not None and float(peak[1]) > 0


def hold_connections(vip: str, count: int) -> list[socket.socket]:
    """Connections to the service's address that send nothing yet (the relay holds them)."""
    return [socket.create_connection((vip, 80), timeout=5) for _ in range(count)]


@pytest.mark.etcd
@pytest.mark.docker
@pytest.mark.iptables
def test_the_page_follows_a_real_fluxd_and_its_containers(
    etcd: EtcdServer,
    fluxd_factory: Callable[..., Fluxd],
    containers: Containers,
    browser: WebDriver,
) -> None:
    port = free_port()
    daemon = fluxd_factory("-host-ttl", "10", "-listen-prometheus", f"{HOST}:{port}")
    daemon.wait_logged("installed (nat and filter)")
    base = f"http://{HOST}:{port}/"
    web, odd = random_loopback_vip(), random_loopback_vip()
    fluxctl(etcd, "service", "web", "--address", f"{web}:80", "--protocol", "http",
            "--labels", f"page={containers.tag},role=web")  # fmt: skip
    fluxctl(etcd, "service", "other", "--address", f"{random_loopback_vip()}:80")
    fluxctl(etcd, "service", "odd", "--address", f"{odd}:80", "--labels", f"xss={XSS}")
    first, second = containers.httpd("role=web"), containers.httpd("role=web")
    hostile = containers.httpd(f"xss={XSS}")

    browser.get(base)
    browser.execute_script("window.notReloaded = true")

    def web_row_says(text: str) -> Callable[[WebDriver], bool]:
        def says(driver: WebDriver) -> bool:
            rows = service_rows(driver)
            return "web" in rows and cell(rows["web"], "instances") == text

        return says

    wait_for(browser, web_row_says("2 live"), 30, "two live instances of web on the page")
    rows = service_rows(browser)
    assert cell(rows["web"], "state") == "forwarding" and cell(rows["web"], "protocol") == "http"
    assert cell(rows["other"], "state").startswith("rejecting")
    assert cell(rows["other"], "instances") == "none"
    for cid in (first, second):
        texts = instance_named(instance_rows(rows["web"]), cid)
        assert texts is not None and texts[5] == "live", instance_rows(rows["web"])
        assert texts[3].startswith("127.0.0.1:") and texts[4] == HOST
    wait_for(browser, lambda d: cell(service_rows(d)["odd"], "instances") == "1 live", 30,
             "the instance selected by the hostile label")  # fmt: skip
    assert instance_named(instance_rows(service_rows(browser)["odd"]), hostile) is not None
    assert no_alert(browser) and browser.find_elements(By.CSS_SELECTOR, "img") == []
    assert console_errors(browser) == []

    # 200 requests, paced over 20 s or so: the figures of the last 10 s (fluxd samples every
    # 5 s) turn non-zero on the page while they go, those of 5 minutes stay so after, and the
    # chart has a peak; all without a reload.
    wait_until(lambda: rules_for(daemon.chain, web, "DNAT"), 15, "the DNAT rule for web")
    codes: Counter[int] = Counter()
    sender = threading.Thread(target=send_requests, args=(f"http://{web}/missing", 200, codes))
    sender.start()
    try:
        wait_for(browser, lambda d: web_requests_shown(d, (first, second)), 60,
                 "4xx requests/s, the instances' req/s and a chart peak for web")  # fmt: skip
    finally:
        sender.join(120)
    assert not sender.is_alive()
    assert codes == {404: 200}  # the image holds no site: busybox httpd answers 404
    rates = lines(service_rows(browser)["web"], "req")
    assert class_rate(rates[1], "4xx") > 0 and class_rate(rates[1], "2xx") == 0, rates
    # Every answer of fluxd's JSON came gzip-compressed, as chromium asked.
    answers = [x for x in exchanges(browser) if urllib.parse.urlsplit(x.url).path in (
        "/status", "/status/history")]  # fmt: skip
    assert {urllib.parse.urlsplit(x.url).path for x in answers} == {"/status", "/status/history"}
    for answer in answers:
        assert "gzip" in answer.sent["accept-encoding"], answer
        assert answer.received.get("content-encoding") == "gzip", answer

    # Ten connections held open.
    held = hold_connections(web, 10)
    try:
        wait_for(browser, lambda d: cell(service_rows(d)["web"], "open") == "10", 20,
                 "ten open connections on the page")  # fmt: skip
        actives = [
            int(texts[7]) for texts in instance_rows(service_rows(browser)["web"]).values()
        ]
        assert sum(actives) == 10
    finally:
        for sock in held:
            sock.close()
    wait_for(browser, lambda d: cell(service_rows(d)["web"], "open") == "0", 20, "closed")

    # A killed instance leaves the page.
    docker("kill", first)
    wait_for(browser, web_row_says("1 live"), 30, "one live instance after the kill")
    rows = instance_rows(service_rows(browser)["web"])
    assert instance_named(rows, first) is None and instance_named(rows, second) is not None

    # The filter hides the other services.
    browser.find_element(By.ID, "filter").send_keys("web")
    wait_for(browser, lambda d: [n for n, r in service_rows(d).items() if r.is_displayed()]
             == ["web"], 5, "only web shown")  # fmt: skip
    assert browser.execute_script("return window.notReloaded") is True

    # The headers, as fluxd sends them.
    with _OPENER.open(base, timeout=5) as response:
        assert response.headers["Content-Security-Policy"] == POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert console_errors(browser) == []

    # fluxd stops: the "as of" marker says the page is stale.
    daemon.stop()
    asof = browser.find_element(By.ID, "asof")
    wait_for(browser, lambda d: "stale" in str(asof.get_attribute("class")), 20, "stale marker")
    assert "stale" in asof.text
