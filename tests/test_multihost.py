"""Several Docker hosts, each with its own dockerd and fluxd, on one machine.

The harness is tests/support/multihost.py.

Two host network namespaces on a bridge in a third (the switch), where a three-member etcd
cluster runs.  Each host's fluxd has ``-host-ttl 3`` and ``-connect-timeout 0.5``; its
instances are busybox containers on the host's own namespace, so an instance's address is its
host's IP.  Clients are sockets opened inside a host namespace.  The namespaces, engines and
etcd are built once for the module; every test starts from no fluxd, no container, no key.

Faults: a host dying (fluxd SIGKILLed, its cable pulled), a partition that heals, the etcd
leader killed, every etcd member stopped, the member fluxd talks to hung (SIGSTOP).  One case
runs ``-network-mode global``: containers on two Docker bridge networks per host, the hosts
routing each other's container subnets (inside the namespaces).  Timings are printed (``-s``)
for the record; the assertions are about what happened, with bounds from the TTL.

The status page's cluster view is checked here too, in chromium, on host 1's listener: every
host listed, a killed one shown unreachable.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.support.browser import chromium, console_errors, wait_for, wait_renders
from tests.support.fluxd_process import wait_until
from tests.support.multihost import (
    CONNECT_TIMEOUT,
    METRICS_PORT,
    TTL,
    ClientLoop,
    Fabric,
    HostNode,
    vip,
)
from tests.support.netns import PortForward, socket_in
from tests.support.spread import FALSE_FAILURE, min_count_bound

pytestmark = [pytest.mark.etcd, pytest.mark.docker, pytest.mark.iptables]

PORT = 80  # every service's port; instances listen on INSTANCE_PORT in their host namespace
INSTANCE_PORT = 18080


@pytest.fixture(scope="module")
def shared_fabric() -> Iterator[Fabric]:
    fabric = Fabric(hosts=2)
    fabric.start()
    try:
        yield fabric
    finally:
        fabric.close()


@pytest.fixture
def fabric(shared_fabric: Fabric) -> Iterator[Fabric]:
    """The module's hosts, reset: no fluxd, no container, no key, links up, etcd whole."""
    shared_fabric.reset()
    try:
        yield shared_fabric
    finally:
        shared_fabric.stop_fluxds()


def web_service(fabric: Fabric, name: str, n: int) -> str:
    """Define service ``name`` at ``vip(n):80`` selecting ``app=<name>``; its address."""
    address = vip(n)
    fabric.fluxctl("service", name, "--address", f"{address}:{PORT}", "--instance-port",
                   str(INSTANCE_PORT), "--labels", f"app={name}")
    return address


def served_on_both(fabric: Fabric, name: str, n: int) -> str:
    """Start every fluxd, define service ``name`` at ``vip(n)`` and run one httpd instance of
    it on each host (page ``h<index>``); its address, once every host's pool holds both."""
    fabric.start_fluxds()
    address = web_service(fabric, name, n)
    for host in fabric.hosts:
        host.httpd(INSTANCE_PORT, f"h{host.index}", f"app={name}")
    fabric.wait_pools(name, [instance_on(host) for host in fabric.hosts])
    return address


def instance_on(host: HostNode) -> str:
    return f"{host.ip}:{INSTANCE_PORT}"


def host_gone(fabric: Fabric, gone: HostNode, service: str, *views: HostNode) -> bool:
    """Neither etcd nor any of ``views``' balancers knows host ``gone`` or its instance."""
    if gone.ip in fabric.host_keys():
        return False
    if instance_on(gone) in fabric.instance_addresses(service):
        return False
    return all(instance_on(gone) not in view.pool_addresses(service) for view in views)


# -- a. a client on one host, the instance on another ----------------------------------------


def test_client_on_host1_reaches_an_instance_only_on_host2(fabric: Fabric) -> None:
    h1, h2 = fabric[1], fabric[2]
    fabric.start_fluxds()
    address = web_service(fabric, "solo", 10)
    h2.httpd(INSTANCE_PORT, "served-by-h2", "app=solo")
    fabric.wait_pools("solo", [instance_on(h2)])
    assert not h1.listening(INSTANCE_PORT)  # nothing on host 1 could serve it

    # Host 1 intercepts the address and sends it to its own listener, which connects across.
    (rule,) = h1.service_rules(address)
    assert f"--to-destination {h1.ip}:" in rule
    assert [h1.http_get(address, PORT) for _ in range(5)] == ["served-by-h2"] * 5
    (record,) = fabric.instance_records("solo").values()
    assert record["address"] == instance_on(h2)


# -- b. load spreads over hosts --------------------------------------------------------------

SPREAD_REQUESTS = 200


def test_load_from_one_host_spreads_over_both(fabric: Fabric) -> None:
    h1 = fabric[1]
    address = served_on_both(fabric, "spread", 11)

    result = h1.load(address, PORT, SPREAD_REQUESTS, seconds=60, workers=1)
    bound = min_count_bound(SPREAD_REQUESTS, 2, FALSE_FAILURE)
    print(f"spread: {dict(result.served)} in {result.seconds:.2f} s (bound {bound} each)")
    assert result.failures == []
    assert sum(result.served.values()) == SPREAD_REQUESTS
    assert set(result.served) == {"h1", "h2"}
    assert min(result.served.values()) >= bound


# -- c. a host dies under load ---------------------------------------------------------------


def test_host_death_costs_no_request_and_its_records_go_within_the_ttl(fabric: Fabric) -> None:
    h1, h2 = fabric[1], fabric[2]
    address = served_on_both(fabric, "survive", 12)

    loop = ClientLoop(h1, address, PORT, count=5000, seconds=TTL + 15, workers=4, pause=0.01)
    loop.start()
    wait_until(lambda: loop.result.served["h2"] >= 5, 10, "requests served by host 2")
    with loop.quiet():
        h2.kill_fluxd()
        h2.set_link(False)
        cut = time.monotonic()
    wait_until(lambda: host_gone(fabric, h2, "survive", h1), TTL + 5, "host 2's records to go")
    gone_after = time.monotonic() - cut
    served_before_gone = sum(loop.result.served.values())
    time.sleep(1.0)  # and on for a while without it
    result = loop.stop()
    print(f"host death: records gone {gone_after:.2f} s after the cut; {result.requests} "
          f"requests, {len(result.failures)} failed, slowest {loop.slowest:.2f} s; "
          f"{dict(result.served)}")
    assert result.failures == []
    assert gone_after <= TTL + 1
    # The dead host was tried after the cut (a connect timeout, then another instance)...
    assert loop.slowest >= CONNECT_TIMEOUT * 0.8
    # ...and the loop went on well after it was forgotten.
    assert result.requests > served_before_gone
    assert h1.pool_addresses("survive") == [instance_on(h1)]
    assert fabric.host_keys() == [h1.ip]


# -- d. a partition that heals ---------------------------------------------------------------


def rules_per_service(host: HostNode) -> dict[str, int]:
    """How many rules of the host's chain name each service (fluxd comments them by name)."""
    counts: dict[str, int] = {}
    for rule in host.chain_rules():
        words = rule.split()
        name = words[words.index("--comment") + 1] if "--comment" in words else "?"
        counts[name] = counts.get(name, 0) + 1
    return counts


def table_rules(saved: str) -> list[tuple[str, str]]:
    """Every ``-A`` line of an iptables-save output, with its table."""
    rules, table = [], ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            rules.append((table, line))
    return rules


def test_a_partition_that_heals_brings_the_records_back_without_duplicate_rules(
    fabric: Fabric,
) -> None:
    h1, h2 = fabric[1], fabric[2]
    address = served_on_both(fabric, "heal", 13)
    other = web_service(fabric, "heal-b", 14)
    before = h2.fluxd.lines[:] if h2.fluxd else []

    h2.set_link(False)
    cut = time.monotonic()
    # Host 2's lease lapses: host 1 and etcd forget it while it is cut off.
    wait_until(lambda: host_gone(fabric, h2, "heal", h1), TTL + 5, "host 2's records to go")
    gone_after = time.monotonic() - cut
    time.sleep(1.0)  # cut off for longer than the TTL
    h2.set_link(True)
    healed = time.monotonic()
    wait_until(lambda: h2.ip in fabric.host_keys()
               and instance_on(h2) in fabric.instance_addresses("heal"), 20,
               "host 2's records to come back")
    back_after = time.monotonic() - healed
    fabric.wait_pools("heal", [instance_on(h1), instance_on(h2)])
    print(f"partition: records gone {gone_after:.2f} s after the cut, back {back_after:.2f} s "
          f"after the heal; host 2 logged: "
          f"{[line for line in h2.fluxd.lines[len(before):] if 'lease' in line]}")
    assert gone_after <= TTL + 1
    # Host 2 found its lease gone, took a new one and wrote its records again.
    assert h2.fluxd is not None
    assert any("has expired; granting a new one" in line for line in h2.fluxd.lines[len(before):])
    # One rule per service on each host, nothing left over from before the partition, and no
    # line of iptables-save twice (the jumps to the chain included).
    for host in (h1, h2):
        appended = table_rules(host.iptables_save())
        assert len(appended) == len(set(appended)), appended
        assert rules_per_service(host) == {"heal": 1, "heal-b": 1}, host.chain_rules()
        assert len(host.service_rules(address)) == 1
        assert len(host.service_rules(other)) == 1
    result = h1.load(address, PORT, 60, seconds=30, workers=1)
    assert result.failures == []
    assert set(result.served) == {"h1", "h2"}


# -- e. the etcd leader dies under load ------------------------------------------------------


def test_etcd_leader_killed_under_load_costs_no_request_and_no_record(fabric: Fabric) -> None:
    h1, h2 = fabric[1], fabric[2]
    address = served_on_both(fabric, "quorum", 15)
    records = (fabric.host_keys(), fabric.instance_addresses("quorum"))
    assert records == ([h1.ip, h2.ip], [instance_on(h1), instance_on(h2)])

    # The first endpoint is the one every fluxd talks to: make it the leader, so that its
    # death is both an election and a client failover.
    fabric.etcd.move_leader(0)
    loop = ClientLoop(h1, address, PORT, count=5000, seconds=3 * TTL + 15, workers=4,
                      pause=0.01)
    loop.start()
    leader = fabric.etcd.leader()
    assert leader == 0
    fabric.etcd.kill_member(leader)
    killed = time.monotonic()
    new_leader = fabric.etcd.leader()
    elected_after = time.monotonic() - killed
    # The watches were on the dead member too: a service defined now reaches every host.
    late = web_service(fabric, "quorum-late", 20)
    defined = time.monotonic()
    for host in (h1, h2):
        wait_until(lambda h=host: len(h.service_rules(late)) == 1, 20,  # type: ignore[misc]
                   f"host {host.index}'s rule for a service defined after the election")
    watched_after = time.monotonic() - defined
    # Records checked through the TTL several times over: every lease must have been kept
    # alive through (or re-taken after) the election, with nothing missing at any look.
    looks = 0
    missing: list[str] = []
    while time.monotonic() - killed < 3 * TTL:
        now = (fabric.host_keys(), fabric.instance_addresses("quorum"))
        looks += 1
        if now != records:
            missing.append(f"{time.monotonic() - killed:.2f}s {now}")
        time.sleep(0.2)
    result = loop.stop()
    print(f"etcd leader m{leader} killed: m{new_leader} elected {elected_after:.2f} s later; "
          f"{result.requests} requests, {len(result.failures)} failed; {looks} looks at the "
          f"records, {len(missing)} incomplete; a new service on every host "
          f"{watched_after:.2f} s after it was defined")
    assert new_leader != leader
    assert result.failures == []
    assert set(result.served) == {"h1", "h2"}
    assert missing == []
    for host in (h1, h2):
        assert host.pool_addresses("quorum") == [instance_on(h1), instance_on(h2)]
        assert host.fluxd is not None and host.fluxd.process.poll() is None


# -- f. no etcd at all for longer than the TTL -----------------------------------------------

ECHO_PORT = 18081
OUTAGE = 3 * TTL
WATCH_IDLE = 30.0  # flux.store.etcd.EtcdStore's default


def echo_round(conn: socket.socket, text: bytes) -> bytes:
    conn.sendall(text)
    got = b""
    while len(got) < len(text):
        chunk = conn.recv(len(text) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_without_etcd_connections_and_rules_survive_and_records_return(fabric: Fabric) -> None:
    h1, h2 = fabric[1], fabric[2]
    address = served_on_both(fabric, "outage", 16)
    echo_address = vip(17)
    fabric.fluxctl("service", "echo", "--address", f"{echo_address}:{PORT}",
                   "--instance-port", str(ECHO_PORT), "--labels", "app=echo")
    h2.echo(ECHO_PORT, "app=echo")
    fabric.wait_pools("echo", [f"{h2.ip}:{ECHO_PORT}"])
    rules_before = {host.index: host.chain_rules() for host in (h1, h2)}
    logged_before = {host.index: len(host.fluxd.lines) for host in (h1, h2) if host.fluxd}

    with socket_in(h1.netns) as conn:
        conn.settimeout(5.0)
        conn.connect((echo_address, PORT))
        assert echo_round(conn, b"before\n") == b"before\n"
        fabric.etcd.stop()
        stopped = time.monotonic()
        # Every lease would have run out long since, and fluxd's retries have backed off.
        time.sleep(OUTAGE)
        # Proxied bytes, rules and pools do not need etcd.
        assert echo_round(conn, b"during\n") == b"during\n"
        during = h1.load(address, PORT, 40, seconds=20, workers=1)
        for host in (h1, h2):
            assert host.chain_rules() == rules_before[host.index]
        outage = time.monotonic() - stopped

        fabric.etcd.start()
        back = time.monotonic()
        wait_until(lambda: fabric.host_keys() == [h1.ip, h2.ip]
                   and fabric.instance_addresses("outage") == [instance_on(h1), instance_on(h2)]
                   and fabric.instance_addresses("echo") == [f"{h2.ip}:{ECHO_PORT}"],
                   20, "every record back in etcd")
        records_after = time.monotonic() - back
        # Held, not just written once: complete at every look for the TTL three times over.
        incomplete = []
        while time.monotonic() - back < records_after + 3 * TTL:
            now = (fabric.host_keys(), fabric.instance_addresses("outage"))
            if now != ([h1.ip, h2.ip], [instance_on(h1), instance_on(h2)]):
                incomplete.append(f"{time.monotonic() - back:.2f}s {now}")
            time.sleep(0.2)
        assert echo_round(conn, b"after\n") == b"after\n"
        # The watches are back too: a service defined now reaches every host.
        late = web_service(fabric, "outage-late", 22)
        defined = time.monotonic()
        for host in (h1, h2):
            wait_until(lambda h=host: len(h.service_rules(late)) == 1, 30,  # type: ignore[misc]
                       f"host {host.index}'s rule for a service defined after the outage")
        watched_after = time.monotonic() - defined
    lease_lines = [line for host in (h1, h2) if host.fluxd
                   for line in host.fluxd.lines[logged_before[host.index]:] if "lease" in line]
    print(f"etcd outage {outage:.1f} s: {during.requests} requests during it, "
          f"{len(during.failures)} failed; records in etcd {records_after:.2f} s after it came "
          f"back; a new service on every host {watched_after:.2f} s after it was defined; "
          f"lease log: {lease_lines}")
    assert incomplete == []
    assert during.failures == []
    assert set(during.served) == {"h1", "h2"}
    for host in (h1, h2):
        kept = [rule for rule in host.chain_rules() if f"-d {late}/32 " not in rule]
        assert kept == rules_before[host.index]
        assert host.pool_addresses("outage") == [instance_on(h1), instance_on(h2)]


# -- g. global network mode: container addresses, routed between hosts -----------------------


def test_global_mode_enrols_the_first_network_by_name_and_routes_across_hosts(
    fabric: Fabric,
) -> None:
    # Each host's engine has two bridge networks; the hosts route each other's container
    # subnets (inside the namespaces: no default route anywhere), as a global network would.
    subnets = {host.index: [f"198.18.{200 + host.index}.0/24", f"198.18.{210 + host.index}.0/24"]
               for host in fabric.hosts}
    for host in fabric.hosts:
        first, second = subnets[host.index]
        host.network("fluxnet-b", second)
        host.network("fluxnet-a", first)
    fabric.route_container_networks(subnets)
    fabric.start_fluxds("-network-mode", "global")
    address = vip(18)
    fabric.fluxctl("service", "global", "--address", f"{address}:{PORT}", "--labels",
                   "app=global")
    expected = []
    for host in fabric.hosts:
        # Started on the network that sorts last, then connected to the first: the instance
        # moves to the first network's address when Docker reports the connection.
        container = host.httpd(PORT, f"h{host.index}", "app=global", network="fluxnet-b")
        host.dockerd.docker("network", "connect", "fluxnet-a", container)
        first_ip = host.container_ip(container, "fluxnet-a")
        assert first_ip.startswith(subnets[host.index][0].rsplit(".", 2)[0])
        assert host.container_ip(container, "fluxnet-b").startswith(
            subnets[host.index][1].rsplit(".", 2)[0])
        expected.append(f"{first_ip}:{PORT}")
    fabric.wait_pools("global", expected)
    assert fabric.instance_addresses("global") == sorted(expected)

    h1 = fabric[1]
    result = h1.load(address, PORT, 100, seconds=30, workers=1)
    bound = min_count_bound(100, 2, FALSE_FAILURE)
    print(f"global mode: instances {sorted(expected)}; from host 1: {dict(result.served)}, "
          f"{len(result.failures)} failed")
    assert result.failures == []
    assert min(result.served.get("h1", 0), result.served.get("h2", 0)) >= bound


# -- h. the etcd member every fluxd talks to hangs -------------------------------------------


def test_a_hung_etcd_member_costs_no_record(fabric: Fabric) -> None:
    # SIGSTOP: its sockets stay open and nothing answers, so requests time out instead of
    # being refused; the keep-alive must move to another member before the lease runs out.
    h1, h2 = fabric[1], fabric[2]
    address = served_on_both(fabric, "hang", 19)
    records = ([h1.ip, h2.ip], [instance_on(h1), instance_on(h2)])
    fabric.etcd.move_leader(1)  # no election: only the first endpoint, fluxd's, stops answering
    loop = ClientLoop(h1, address, PORT, count=5000, seconds=3 * TTL + 15, workers=2,
                      pause=0.01)
    loop.start()
    fabric.etcd.pause_member(0)
    hung = time.monotonic()
    missing = []
    while time.monotonic() - hung < 3 * TTL:
        now = (fabric.host_keys(), fabric.instance_addresses("hang"))
        if now != records:
            missing.append(f"{time.monotonic() - hung:.2f}s {now}")
        time.sleep(0.2)
    result = loop.stop()
    # The watches hang with the member: a change reaches the hosts only when a watch, silent
    # for the store's watch_idle (30 s), finds that requests have moved on and starts over.
    late = web_service(fabric, "hang-late", 21)
    defined = time.monotonic()
    for host in (h1, h2):
        wait_until(lambda h=host: len(h.service_rules(late)) == 1, WATCH_IDLE + 20,  # type: ignore[misc]
                   f"host {host.index}'s rule for a service defined during the hang")
    watched_after = time.monotonic() - defined
    fabric.etcd.resume_member(0)
    print(f"hung etcd member: {len(missing)} incomplete looks at the records "
          f"({missing[:3]}); {result.requests} requests, {len(result.failures)} failed; a new "
          f"service on every host {watched_after:.2f} s after it was defined")
    assert missing == []
    assert result.failures == []


# -- published ports: a client outside every host ----------------------------------------------

PUBLISHED_PORT = 8080


def published_pool(host: HostNode, service: str) -> list[str]:
    """The instance addresses of ``service``'s published port on this host (sorted)."""
    entry = host.status().get("balancer", {}).get("services", {}).get(service, {})
    published = entry.get("published", {})
    if published.get("state") != "listening":
        return []
    return sorted(item["address"] for item in published.get("instances", []))


def test_a_client_outside_every_host_is_served_through_host1s_published_port(
    fabric: Fabric,
) -> None:
    h1, h2 = fabric[1], fabric[2]
    # Each fluxd publishes on its own veth address only (inside the namespaces made here).
    for host in fabric.hosts:
        host.start_fluxd("-publish-ip", host.ip)
    for host in fabric.hosts:
        host.wait_fluxd_ready()
    fabric.fluxctl("service", "edge", "--publish", str(PUBLISHED_PORT), "--instance-port",
                   str(INSTANCE_PORT), "--labels", "app=edge")  # fmt: skip
    h2.httpd(INSTANCE_PORT, "h2", "app=edge")
    wait_until(lambda: published_pool(h1, "edge") == [instance_on(h2)], 20, "h1's pool")
    assert not h1.listening(INSTANCE_PORT)  # nothing on host 1 could serve it
    outside = fabric.outside()
    assert [outside.http_get(h1.ip, PUBLISHED_PORT) for _ in range(5)] == ["h2"] * 5

    # Served on both hosts, with clients in a loop at host 1's port: host 2 dies.
    h1.httpd(INSTANCE_PORT, "h1", "app=edge")
    both = sorted(instance_on(host) for host in fabric.hosts)
    wait_until(lambda: published_pool(h1, "edge") == both, 20, "both instances in h1's pool")
    loop = ClientLoop(outside, h1.ip, PUBLISHED_PORT, count=5000, seconds=TTL + 15, workers=4,
                      pause=0.01)  # fmt: skip
    loop.start()
    wait_until(lambda: loop.result.served["h2"] >= 5, 10, "requests served by host 2")
    with loop.quiet():
        h2.kill_fluxd()
        h2.set_link(False)
        cut = time.monotonic()
    wait_until(
        lambda: h2.ip not in fabric.host_keys()
        and published_pool(h1, "edge") == [instance_on(h1)],
        TTL + 5,
        "host 2's records to go",
    )
    gone_after = time.monotonic() - cut
    served_before_gone = sum(loop.result.served.values())
    time.sleep(1.0)
    result = loop.stop()
    print(f"published port, host death: records gone {gone_after:.2f} s after the cut;"
          f" {result.requests} requests, {len(result.failures)} failed,"
          f" slowest {loop.slowest:.2f} s; {dict(result.served)}")  # fmt: skip
    assert result.failures == []
    assert result.requests > served_before_gone
    assert set(result.served) == {"h1", "h2"}


# -- the status page's cluster view ------------------------------------------------------------

PAGE_TTL = 10  # long enough for the page to see the killed host before its lease lapses


def page_hosts(driver: WebDriver) -> list[tuple[str, str, str]]:
    """The page's host cards: (title, class, text) each, in order."""
    cards: list[list[str]] = driver.execute_script(
        "return [...document.querySelectorAll('#hosts .card')].map((card) =>"
        " [card.querySelector('h2').textContent, card.className, card.textContent])"
    )
    return [(title, kind, text) for title, kind, text in cards]


def page_services(driver: WebDriver) -> list[tuple[str, str, str, list[str]]]:
    """The page's service rows: (name, host, state, the hosts of its instances) each."""
    rows: list[list[Any]] = driver.execute_script(
        "return [...document.querySelectorAll('tbody.svc')].map((body) => {"
        " const row = body.querySelector('tr.service');"
        " return [row.querySelector('td.name .name').textContent,"
        "  row.querySelector('td.col-host').textContent,"
        "  row.querySelector('td.state .line').textContent,"
        "  [...body.querySelectorAll('tr.instance')].map((tr) => tr.cells[4].textContent)];"
        "})"
    )
    return [(name, host, state, sorted(hosts)) for name, host, state, hosts in rows]


def test_the_status_page_of_host1_shows_every_host_and_a_killed_one_unreachable(
    fabric: Fabric,
) -> None:
    """Host 1's page switched to "whole cluster" (``/status?scope=cluster``) lists both hosts,
    each host's row of the service labelled with it; host 2's fluxd SIGKILLed, its card says
    unreachable at the next refresh, without a reload, until its lease lapses and it leaves.

    The browser runs in the test's own namespace and reaches host 1's listener
    (198.19.0.1:9000, inside host 1's namespace) through a :class:`PortForward`.
    """
    h1, h2 = fabric[1], fabric[2]
    fabric.start_fluxds("-host-ttl", str(PAGE_TTL))
    web_service(fabric, "paged", 16)
    for host in fabric.hosts:
        host.httpd(INSTANCE_PORT, f"h{host.index}", "app=paged")
    fabric.wait_pools("paged", [instance_on(host) for host in fabric.hosts])
    cards = [f"host {h1.ip}", f"host {h2.ip}"]
    with PortForward(h1.netns, h1.ip, METRICS_PORT) as forward, chromium() as browser:
        browser.get(forward.url)
        wait_renders(browser)
        browser.execute_script("window.notReloaded = true")
        assert [title for title, _, _ in page_hosts(browser)] == ["this host"]
        browser.find_element(By.ID, "scope-cluster").click()
        wait_for(browser, lambda d: [title for title, _, _ in page_hosts(d)] == cards, 20,
                 "a card for each host")  # fmt: skip
        assert all("unreachable" not in kind for _, kind, _ in page_hosts(browser))
        both = [h1.ip, h2.ip]
        wait_for(browser, lambda d: page_services(d) == [
            ("paged", h1.ip, "forwarding", both), ("paged", h2.ip, "forwarding", both)],
            20, "each host's row of paged with both instances")  # fmt: skip

        h2.kill_fluxd()
        killed = time.monotonic()
        wait_for(browser, lambda d: "unreachable" in page_hosts(d)[-1][1], PAGE_TTL + 10,
                 "host 2 shown unreachable")  # fmt: skip
        seen_after = time.monotonic() - killed
        title, _, text = page_hosts(browser)[-1]
        assert title == f"host {h2.ip}"
        assert f"unreachable ({h2.ip}:{METRICS_PORT}): cannot connect: Connection refused" in text
        assert "unreachable" not in page_hosts(browser)[0][1]
        # Its lease lapses: host 2 is no longer part of the cluster, and leaves the page.
        wait_for(browser, lambda d: [title for title, _, _ in page_hosts(d)] == cards[:1],
                 PAGE_TTL + 15, "host 2 gone with its lease")  # fmt: skip
        gone_after = time.monotonic() - killed
        assert browser.execute_script("return window.notReloaded") is True
        assert console_errors(browser) == []
    print(f"cluster page: host 2 unreachable on the page {seen_after:.1f} s after the kill, "
          f"gone with its lease after {gone_after:.1f} s (TTL {PAGE_TTL} s)")
