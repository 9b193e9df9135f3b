"""One behaviour suite for both stores: etcd (the real one) and memory (the test double).

Adapted from the original's store suite (reference §2.9) to leases: instead of sessions and
garbage collection, host-owned records live on a lease, and revoking or losing the lease
removes them.  Every test runs once per implementation; the ``cluster`` fixture gives the
backdoor each one needs (write raw values, revoke a lease behind a store's back).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from flux.model import Host, HostRef, Instance, RecordError, Rule, Service, ServiceInfo
from flux.store import NotFound, ServiceUpdate, Store
from flux.store.etcd import EtcdStore
from flux.store.memory import MemoryBackend, MemoryStore
from tests.support.etcd_server import EtcdServer

SPEC = Service(address="1.2.3.4:1234", protocol="tcp")
OTHER_SPEC = Service(address="10.128.0.9:80", instance_port=8080, protocol="http")
RULE = Rule(selector={"foo": "bar"})
INSTANCE = Instance(
    host=HostRef(address="192.168.3.165"),
    container_rule="group",
    address="1.2.3.4:12345",
    labels={"key": "val"},
)
OTHER_INSTANCE = Instance(host=HostRef(address="192.168.3.166"), address="192.168.3.166:80")
CONTAINER_ID = "f" * 64


# -- the two implementations ------------------------------------------------------------------


class Cluster:
    """Stores (hosts) on one backend, a backdoor into it, and cleanup."""

    kind = ""

    def __init__(self) -> None:
        self.stores: list[Store] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.watches: list[AsyncGenerator[ServiceUpdate, None]] = []

    def _new_store(self) -> Store:
        raise NotImplementedError

    def store(self) -> Store:
        """A new store object: another host on the same cluster."""
        store = self._new_store()
        self.stores.append(store)
        return store

    def run_lease(self, store: Store, ttl: int = 10) -> asyncio.Task[None]:
        task = asyncio.create_task(store.run_lease(ttl))
        self.tasks.append(task)
        return task

    async def put_raw(self, key: str, value: str) -> None:
        raise NotImplementedError

    async def delete_raw(self, key: str) -> None:
        raise NotImplementedError

    async def expire_lease(self, lease_id: int) -> None:
        """Drop a lease behind its holder's back."""
        raise NotImplementedError

    async def keys(self, prefix: str = "/weave-flux/") -> list[str]:
        raise NotImplementedError

    async def lease_of(self, key: str) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        for watch in self.watches:
            await watch.aclose()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for store in self.stores:
            await store.close()


class MemoryCluster(Cluster):
    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.backend = MemoryBackend()

    def _new_store(self) -> Store:
        return MemoryStore(self.backend)

    async def put_raw(self, key: str, value: str) -> None:
        self.backend.put_raw(key, value)

    async def delete_raw(self, key: str) -> None:
        self.backend.delete_raw(key)

    async def expire_lease(self, lease_id: int) -> None:
        self.backend.expire_lease(lease_id)

    async def keys(self, prefix: str = "/weave-flux/") -> list[str]:
        return self.backend.keys(prefix)

    async def lease_of(self, key: str) -> int:
        return self.backend.lease_of(key)


class EtcdCluster(Cluster):
    kind = "etcd"

    def __init__(self, server: EtcdServer) -> None:
        super().__init__()
        self.server = server

    def _new_store(self) -> Store:
        return EtcdStore([self.server.endpoint], timeout=2.0)

    async def _etcdctl(self, *args: str) -> str:
        return await asyncio.to_thread(self.server.etcdctl, *args)

    async def put_raw(self, key: str, value: str) -> None:
        await asyncio.to_thread(self.server.put, key, value)

    async def delete_raw(self, key: str) -> None:
        await self._etcdctl("del", key)

    async def expire_lease(self, lease_id: int) -> None:
        await self._etcdctl("lease", "revoke", f"{lease_id:x}")

    async def keys(self, prefix: str = "/weave-flux/") -> list[str]:
        return sorted(await asyncio.to_thread(self.server.keys, prefix))

    async def lease_of(self, key: str) -> int:
        out = json.loads(await self._etcdctl("get", key, "-w", "json"))
        kvs = out.get("kvs") or []
        return int(kvs[0].get("lease", 0)) if kvs else 0


@pytest.fixture(params=["memory", "etcd"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    if request.param == "memory":
        return MemoryCluster()
    return EtcdCluster(request.getfixturevalue("etcd"))


@pytest.fixture
async def hosts(cluster: Cluster) -> AsyncIterator[Cluster]:
    """The cluster, with every store and lease task it made cleaned up afterwards."""
    try:
        yield cluster
    finally:
        await cluster.close()


@pytest.fixture
async def store(hosts: Cluster) -> Store:
    return hosts.store()


# -- helpers ---------------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 8.0) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


def info(name: str = "svc", spec: Service = SPEC, **items: Any) -> ServiceInfo:
    return ServiceInfo(name=name, spec=spec, **items)


_sentinels = itertools.count()


async def next_update(
    watch: AsyncGenerator[ServiceUpdate, None], timeout: float = 5.0
) -> ServiceUpdate:
    async with asyncio.timeout(timeout):
        return await anext(watch)


async def changes_until_sentinel(
    store: Store, watch: AsyncGenerator[ServiceUpdate, None]
) -> list[dict[str, ServiceInfo | None]]:
    """Every update the watch yields up to a fresh marker service (markers left out).

    Adding a new service always yields an update, so the list is exact without sleeping.
    """
    sentinel = f"zz-sentinel-{next(_sentinels)}"
    await store.add_service(sentinel, Service())
    seen = []
    while True:
        update = await next_update(watch)
        assert not update.reset, update
        services = {k: v for k, v in update.services.items() if not k.startswith("zz-sentinel")}
        if services:
            seen.append(services)
        if sentinel in update.services:
            return seen


async def open_watch(
    hosts: Cluster,
    store: Store,
    *,
    rules: bool = False,
    instances: bool = False,
    known_hosts: bool = False,
) -> tuple[AsyncGenerator[ServiceUpdate, None], ServiceUpdate]:
    """A watch (closed with the cluster) and its first update, which must be a reset."""
    watch = store.watch_services(rules=rules, instances=instances, known_hosts=known_hosts)
    hosts.watches.append(watch)
    first = await next_update(watch)
    assert first.reset
    return watch, first


async def with_lease(hosts: Cluster, store: Store, ttl: int = 10) -> int:
    hosts.run_lease(store, ttl)
    async with asyncio.timeout(5):
        await store.wait_lease()
    assert store.lease_id is not None
    return store.lease_id


# -- basics ----------------------------------------------------------------------------------


async def test_ping(store: Store) -> None:
    await store.ping()


async def test_reachable_and_the_age_of_the_lease(hosts: Cluster) -> None:
    store = hosts.store()
    assert store.lease_age() is None  # no lease yet
    await store.ping()
    assert store.reachable is True
    await with_lease(hosts, store, ttl=6)
    age = store.lease_age()
    assert age is not None and 0 <= age < 6

    async def older() -> bool:
        now = store.lease_age()
        return now is not None and now >= 1.0

    async def kept_alive() -> bool:  # every TTL/3: the age starts again
        now = store.lease_age()
        return now is not None and now < 1.0

    await eventually(older)
    await eventually(kept_alive)
    await store.revoke_lease()
    assert store.lease_age() is None


async def test_services(store: Store) -> None:
    await store.add_service("svc", SPEC)
    assert await store.get_service("svc") == info()
    assert await store.get_all_services() == {"svc": info()}

    assert await store.remove_service("svc") is True
    assert await store.get_all_services() == {}
    assert await store.remove_service("svc") is False
    with pytest.raises(NotFound, match="'svc' does not exist"):
        await store.get_service("svc")

    await store.add_service("svc", SPEC)
    await store.add_service("other", OTHER_SPEC)
    await store.remove_all_services()
    assert await store.get_all_services() == {}


async def test_replacing_a_service_keeps_its_rules_and_instances(hosts: Cluster) -> None:
    store = hosts.store()
    await with_lease(hosts, store)
    await store.add_service("svc", SPEC)
    await store.set_rule("svc", "group", RULE)
    await store.add_instance("svc", "inst", INSTANCE)

    await store.add_service("svc", OTHER_SPEC)

    got = await store.get_service("svc", rules=True, instances=True)
    assert got == info(spec=OTHER_SPEC, rules={"group": RULE}, instances={"inst": INSTANCE})


async def test_rules(store: Store) -> None:
    await store.add_service("svc", SPEC)
    await store.set_rule("svc", "group", RULE)
    assert (await store.get_service("svc", rules=True)).rules == {"group": RULE}
    assert (await store.get_service("svc")).rules == {}, "rules only when asked"
    assert (await store.get_all_services(rules=True))["svc"].rules == {"group": RULE}

    assert await store.remove_rule("svc", "group") is True
    assert (await store.get_service("svc", rules=True)).rules == {}
    assert await store.remove_rule("svc", "group") is False


async def test_a_rule_needs_its_service(hosts: Cluster, store: Store) -> None:
    with pytest.raises(NotFound, match="'nosuch' does not exist"):
        await store.set_rule("nosuch", "group", RULE)
    assert await hosts.keys() == []


async def test_bad_names_are_refused_and_nothing_is_written(
    hosts: Cluster, store: Store
) -> None:
    with pytest.raises(RecordError, match="invalid service name 'a/b'"):
        await store.add_service("a/b", SPEC)
    await store.add_service("svc", SPEC)
    with pytest.raises(RecordError, match="invalid rule name '-x'"):
        await store.set_rule("svc", "-x", RULE)
    with pytest.raises(RecordError, match="invalid instance ID 'a b'"):
        await store.add_instance("svc", "a b", INSTANCE)
    with pytest.raises(RecordError, match="invalid host address 'nohost'"):
        await store.set_prometheus_target("nohost", "1.2.3.4:9000")
    assert await hosts.keys() == ["/weave-flux/service/svc/spec"]


# -- host-owned records and the lease ----------------------------------------------------------


async def test_instances(hosts: Cluster) -> None:
    store = hosts.store()
    await with_lease(hosts, store)
    await store.add_service("svc", SPEC)
    await store.add_instance("svc", "inst", INSTANCE)
    await store.add_instance("svc", CONTAINER_ID, OTHER_INSTANCE)

    expected = {"inst": INSTANCE, CONTAINER_ID: OTHER_INSTANCE}
    assert (await store.get_service("svc", instances=True)).instances == expected
    assert (await store.get_all_services(instances=True))["svc"].instances == expected
    assert (await store.get_service("svc")).instances == {}, "instances only when asked"

    assert await store.remove_instance("svc", "inst")
    assert await store.remove_instance("svc", "inst"), "already gone counts as removed"
    assert await store.remove_instance("nosuch", "inst")
    assert (await store.get_service("svc", instances=True)).instances == {
        CONTAINER_ID: OTHER_INSTANCE
    }

    await store.add_instance("svc", "inst", INSTANCE)
    await store.revoke_lease()
    assert (await store.get_service("svc", instances=True)).instances == {}
    assert (await store.get_all_services(instances=True))["svc"].instances == {}


async def test_records_wait_for_a_lease_and_go_on_it(hosts: Cluster) -> None:
    store = hosts.store()
    assert store.lease_id is None
    await store.add_service("svc", SPEC)
    await store.add_instance("svc", "inst", INSTANCE)
    await store.register_host(Host(address="192.168.3.165"))
    await store.set_prometheus_target("192.168.3.165", "192.168.3.165:9000")
    assert await hosts.keys() == ["/weave-flux/service/svc/spec"], "nothing before a lease"

    lease = await with_lease(hosts, store)

    owned = [
        "/weave-flux/host/192.168.3.165",
        "/weave-flux/prometheus-targets/192.168.3.165",
        "/weave-flux/service/svc/instances/inst",
    ]
    assert await hosts.keys() == [*owned, "/weave-flux/service/svc/spec"]
    for key in owned:
        assert await hosts.lease_of(key) == lease
    assert await hosts.lease_of("/weave-flux/service/svc/spec") == 0, "definitions outlive hosts"


async def test_hosts(hosts: Cluster) -> None:
    store = hosts.store()
    await with_lease(hosts, store)
    host = Host(address="192.168.1.65", version="1.0", started="2024-01-01T00:00:00Z")
    await store.register_host(host)
    assert await store.get_hosts() == {"192.168.1.65": host}

    await store.deregister_host("192.168.1.65")
    assert await store.get_hosts() == {}
    await store.deregister_host("192.168.1.65")  # absent counts as removed

    await store.register_host(host)
    assert len(await store.get_hosts()) == 1
    await store.revoke_lease()
    assert await store.get_hosts() == {}


async def test_prometheus_targets(hosts: Cluster) -> None:
    store = hosts.store()
    await with_lease(hosts, store)
    await store.set_prometheus_target("192.168.1.65", "192.168.1.65:9000")
    assert await store.get_prometheus_targets() == {"192.168.1.65": "192.168.1.65:9000"}
    raw = await hosts.keys("/weave-flux/prometheus-targets/")
    assert raw == ["/weave-flux/prometheus-targets/192.168.1.65"]

    await store.revoke_lease()
    assert await store.get_prometheus_targets() == {}


async def test_one_hosts_revoke_leaves_the_others_records(hosts: Cluster) -> None:
    a, b = hosts.store(), hosts.store()
    await a.add_service("svc", SPEC)
    lease_a = await with_lease(hosts, a)
    lease_b = await with_lease(hosts, b)
    assert lease_a != lease_b
    await a.register_host(Host(address="10.0.0.1"))
    await b.register_host(Host(address="10.0.0.2"))
    await a.add_instance("svc", "a1", INSTANCE)
    await b.add_instance("svc", "b1", OTHER_INSTANCE)

    await a.revoke_lease()

    assert set(await b.get_hosts()) == {"10.0.0.2"}
    assert (await b.get_service("svc", instances=True)).instances == {"b1": OTHER_INSTANCE}
    assert b.lease_id == lease_b


async def test_a_lost_lease_is_replaced_and_every_record_rewritten(hosts: Cluster) -> None:
    store, other = hosts.store(), hosts.store()
    await store.add_service("svc", SPEC)
    await store.add_instance("svc", "inst", INSTANCE)
    await store.register_host(Host(address="10.0.0.1"))
    old = await with_lease(hosts, store, ttl=3)
    watch, first = await open_watch(hosts, other, instances=True)
    assert first.services == {"svc": info(instances={"inst": INSTANCE})}

    await hosts.expire_lease(old)

    # Everyone sees the records go, then come back on a new lease.
    assert (await next_update(watch)).services == {"svc": info()}
    assert (await next_update(watch)).services == {"svc": info(instances={"inst": INSTANCE})}

    async def new_lease() -> bool:
        return store.lease_id not in (None, old)

    await eventually(new_lease)
    assert await hosts.lease_of("/weave-flux/service/svc/instances/inst") == store.lease_id
    assert await hosts.lease_of("/weave-flux/host/10.0.0.1") == store.lease_id
    assert set(await other.get_hosts()) == {"10.0.0.1"}


# -- watches (reference §2.9 item 6 and TestWatchServices, adapted) ---------------------------


async def test_watch_starts_with_a_snapshot_then_yields_only_the_change(
    hosts: Cluster, store: Store
) -> None:
    await store.add_service("foo-svc", SPEC)
    watch, first = await open_watch(hosts, store)
    assert first == ServiceUpdate(services={"foo-svc": info("foo-svc")}, reset=True)

    await store.add_service("bar-svc", OTHER_SPEC)
    update = await next_update(watch)
    assert update == ServiceUpdate(services={"bar-svc": info("bar-svc", OTHER_SPEC)})


async def test_watch_a_new_service(hosts: Cluster, store: Store) -> None:  # a
    watch, first = await open_watch(hosts, store)
    assert first.services == {}
    await store.add_service("svc", SPEC)
    assert await changes_until_sentinel(store, watch) == [{"svc": info()}]


async def test_watch_remove_add_remove(hosts: Cluster, store: Store) -> None:  # b
    await store.add_service("svc", SPEC)
    watch, first = await open_watch(hosts, store)
    assert first.services == {"svc": info()}
    await store.remove_all_services()
    await store.add_service("svc", SPEC)
    await store.remove_service("svc")
    assert await changes_until_sentinel(store, watch) == [
        {"svc": None},
        {"svc": info()},
        {"svc": None},
    ]


async def test_watch_without_instances_ignores_them(hosts: Cluster) -> None:  # c
    store = hosts.store()
    await with_lease(hosts, store)
    await store.add_service("svc", SPEC)
    watch, _ = await open_watch(hosts, store)
    await store.add_instance("svc", "inst", INSTANCE)
    await store.remove_instance("svc", "inst")
    assert await changes_until_sentinel(store, watch) == []


async def test_watch_with_instances(hosts: Cluster) -> None:  # d
    store = hosts.store()
    await with_lease(hosts, store)
    await store.add_service("svc", SPEC)
    await store.set_rule("svc", "group", RULE)
    watch, first = await open_watch(hosts, store, instances=True)
    assert first.services == {"svc": info()}, "no rules unless asked"
    await store.add_instance("svc", "inst", INSTANCE)
    await store.remove_instance("svc", "inst")
    assert await changes_until_sentinel(store, watch) == [
        {"svc": info(instances={"inst": INSTANCE})},
        {"svc": info()},
    ]


async def test_watch_without_rules_ignores_them(hosts: Cluster, store: Store) -> None:  # e
    await store.add_service("svc", SPEC)
    watch, _ = await open_watch(hosts, store)
    await store.set_rule("svc", "group", RULE)
    await store.remove_rule("svc", "group")
    assert await changes_until_sentinel(store, watch) == []


async def test_watch_with_rules(hosts: Cluster) -> None:  # f
    store = hosts.store()
    await with_lease(hosts, store)
    await store.add_service("svc", SPEC)
    await store.add_instance("svc", "inst", INSTANCE)
    watch, first = await open_watch(hosts, store, rules=True)
    assert first.services == {"svc": info()}, "no instances unless asked"
    await store.set_rule("svc", "group", RULE)
    await store.remove_rule("svc", "group")
    assert await changes_until_sentinel(store, watch) == [
        {"svc": info(rules={"group": RULE})},
        {"svc": info()},
    ]


async def test_watch_with_instances_ignores_rules_and_vice_versa(hosts: Cluster) -> None:  # g, h
    store = hosts.store()
    await with_lease(hosts, store)
    await store.add_service("svc", SPEC)
    instances, _ = await open_watch(hosts, store, instances=True)
    rules, _ = await open_watch(hosts, store, rules=True)
    await store.set_rule("svc", "group", RULE)
    await store.add_instance("svc", "inst", INSTANCE)
    assert await changes_until_sentinel(store, instances) == [
        {"svc": info(instances={"inst": INSTANCE})}
    ]
    assert await changes_until_sentinel(store, rules) == [{"svc": info(rules={"group": RULE})}]


async def test_watch_snapshot_carries_what_was_asked(hosts: Cluster) -> None:
    store = hosts.store()
    await with_lease(hosts, store)
    await store.add_service("svc", SPEC)
    await store.set_rule("svc", "group", RULE)
    await store.add_instance("svc", "inst", INSTANCE)
    _, first = await open_watch(hosts, store, rules=True, instances=True)
    assert first.services == {"svc": info(rules={"group": RULE}, instances={"inst": INSTANCE})}


async def test_watchers_see_another_hosts_lease_revoked(hosts: Cluster) -> None:
    store, agent = hosts.store(), hosts.store()
    await store.add_service("svc", SPEC)
    await with_lease(hosts, agent)
    await agent.add_instance("svc", "inst", INSTANCE)
    watch, first = await open_watch(hosts, store, instances=True)
    assert first.services == {"svc": info(instances={"inst": INSTANCE})}

    await agent.revoke_lease()

    assert await changes_until_sentinel(store, watch) == [{"svc": info()}]


async def test_removing_a_service_is_one_update(hosts: Cluster) -> None:
    store = hosts.store()
    await with_lease(hosts, store)
    await store.add_service("svc", SPEC)
    await store.set_rule("svc", "group", RULE)
    await store.add_instance("svc", "inst", INSTANCE)
    watch, _ = await open_watch(hosts, store, rules=True, instances=True)
    await store.remove_service("svc")
    assert await changes_until_sentinel(store, watch) == [{"svc": None}]


# -- invalid records ---------------------------------------------------------------------------

GOOD_INSTANCE = '{"address":"10.0.0.5:80","host":{"address":"10.0.0.5"}}'

BAD_RECORDS = {
    "/weave-flux/service/badjson/spec": "{not json",
    "/weave-flux/service/badspec/spec": '{"protocol":"udp"}',
    "/weave-flux/service/nospec/instances/abc": GOOD_INSTANCE,
    "/weave-flux/service/bad name/spec": "{}",
    "/weave-flux/service/good/rules/badrule": "nope",
    "/weave-flux/service/good/instances/badinst": '{"address":"nonsense"}',
    "/weave-flux/host/not-an-ip": '{"address":"10.0.0.7"}',
    "/weave-flux/host/10.0.0.8": '{"address":"10.0.0.9"}',
    "/weave-flux/prometheus-targets/10.0.0.9": '"garbage"',
}
GOOD_RECORDS = {
    "/weave-flux/service/good/spec": "{}",
    "/weave-flux/service/good/rules/ok": '{"selector":{"image":"nginx"}}',
    "/weave-flux/service/good/instances/fine": GOOD_INSTANCE,
    "/weave-flux/service/good/ingress-instances/1.2.3.4:80": '{"weight":3}',  # unknown: ignored
    "/weave-flux/host/10.0.0.9": '{"address":"10.0.0.9","extra":"tolerated"}',
    "/weave-flux/prometheus-targets/10.0.0.10": '"10.0.0.10:9000"',
}
GOOD = ServiceInfo(
    name="good",
    spec=Service(),
    rules={"ok": Rule(selector={"image": "nginx"})},
    instances={"fine": Instance.model_validate_json(GOOD_INSTANCE)},
)


async def test_invalid_records_are_logged_and_skipped_by_reads(
    hosts: Cluster, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    for key, value in {**BAD_RECORDS, **GOOD_RECORDS}.items():
        await hosts.put_raw(key, value)
    caplog.set_level(logging.WARNING, logger="flux.store")

    assert await store.get_all_services(rules=True, instances=True) == {"good": GOOD}
    assert await store.get_hosts() == {"10.0.0.9": Host(address="10.0.0.9")}
    assert await store.get_prometheus_targets() == {"10.0.0.10": "10.0.0.10:9000"}
    with pytest.raises(NotFound, match=r"'badjson' has an invalid spec: .*not valid JSON"):
        await store.get_service("badjson")
    assert await store.get_service("good", rules=True, instances=True) == GOOD

    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "flux.store")
    for key in BAD_RECORDS:
        if "nospec" in key:
            assert "/weave-flux/service/nospec/ has no spec" in logged
        else:
            assert key in logged, f"{key} not logged"
    for record in caplog.records:
        assert "\n" not in record.getMessage(), "one line per problem"


async def test_invalid_records_do_not_stop_a_watch(
    hosts: Cluster, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flux.store")
    for key, value in {**BAD_RECORDS, **GOOD_RECORDS}.items():
        await hosts.put_raw(key, value)
    await store.add_service("svc", SPEC)
    watch, first = await open_watch(hosts, store, rules=True, instances=True)
    assert first.services == {"good": GOOD, "svc": info()}

    await hosts.put_raw("/weave-flux/service/svc/instances/x", "{broken")  # never valid: silent
    await hosts.put_raw("/weave-flux/service/svc/spec", '{"address":"not an address"}')
    await hosts.put_raw("/weave-flux/service/other/rules/r", '{"selector":{}}')  # no spec: silent
    await hosts.put_raw("/weave-flux/service/new/spec", '{"protocol":"http"}')
    assert await changes_until_sentinel(store, watch) == [
        {"svc": None},
        {"new": info("new", Service(protocol="http"))},
    ]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "/weave-flux/service/svc/instances/x: not valid JSON" in logged
    assert "/weave-flux/service/svc/spec: address" in logged


# -- bad records are named once; huge ones are refused; instances need a registered host -------


def skipped(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The store's "skipping ..." lines so far."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flux.store" and r.getMessage().startswith("skipping ")
    ]


async def test_each_bad_record_is_logged_once_until_it_changes(
    hosts: Cluster, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flux.store")
    for key, value in {**BAD_RECORDS, **GOOD_RECORDS}.items():
        await hosts.put_raw(key, value)
    watch, first = await open_watch(hosts, store, rules=True, instances=True)
    assert first.services == {"good": GOOD}
    # A second snapshot of the same records (another watch, reads, the reconcile's read):
    # nothing new to say.
    await open_watch(hosts, store, rules=True, instances=True)
    assert await store.get_all_services(rules=True, instances=True) == {"good": GOOD}
    await store.get_hosts()
    await store.get_prometheus_targets()
    lines = skipped(caplog)
    assert len(lines) == len(BAD_RECORDS), "\n".join(lines)
    for key in BAD_RECORDS:
        shown = key.rsplit("/", 2)[0] + "/ has no spec" if "nospec" in key else key
        assert sum(shown in line for line in lines) == 1, (key, lines)

    rule = "/weave-flux/service/good/rules/badrule"
    caplog.clear()
    await hosts.put_raw(rule, "nope")  # the same bad value again: silent
    await hosts.put_raw(rule, "[1]")  # another bad value: named again
    await hosts.put_raw(rule, "[1]")
    assert await changes_until_sentinel(store, watch) == []
    assert skipped(caplog) == [f"skipping {rule}: expected a JSON object, got list"]
    caplog.clear()
    await hosts.put_raw(rule, '{"selector":{"a":"b"}}')  # valid for a while ...
    await hosts.put_raw(rule, "[1]")  # ... then bad again: news
    await changes_until_sentinel(store, watch)
    assert skipped(caplog) == [f"skipping {rule}: expected a JSON object, got list"]


async def test_huge_records_are_skipped_naming_their_size(
    hosts: Cluster, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flux.store")
    huge = json.dumps({"address": "10.0.0.1:80", "padding": "x" * (1 << 20)})
    # 100,000 labels in about 1.1 MB (etcd takes requests up to 1.5 MiB).
    many_labels = json.dumps(
        {"address": "10.0.0.5:80", "labels": {f"l{i}": "" for i in range(100_000)}},
        separators=(",", ":"),
    )
    await hosts.put_raw("/weave-flux/service/huge/spec", huge)
    await hosts.put_raw("/weave-flux/service/many/spec", "{}")
    await hosts.put_raw("/weave-flux/service/many/instances/labels", many_labels)
    await hosts.put_raw("/weave-flux/service/many/instances/fine", GOOD_INSTANCE)
    fine = Instance.model_validate_json(GOOD_INSTANCE)
    expected = {"many": ServiceInfo(name="many", spec=Service(), instances={"fine": fine})}
    assert await store.get_all_services(instances=True) == expected
    _, first = await open_watch(hosts, store, instances=True)
    assert first.services == expected
    lines = skipped(caplog)
    assert lines == [
        f"skipping service 'huge': /weave-flux/service/huge/spec: the value is {len(huge)}"
        " bytes, more than the 262144 a record may hold",
        f"skipping /weave-flux/service/many/instances/labels: the value is {len(many_labels)}"
        " bytes, more than the 262144 a record may hold",
    ]


async def test_instances_of_unregistered_hosts_are_held_back(
    hosts: Cluster, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flux.store")
    await store.add_service("svc", SPEC)
    registered = Instance(host=HostRef(address="10.0.0.5"), address="10.0.0.5:80")
    stray = Instance(host=HostRef(address="10.0.0.6"), address="10.0.0.6:80")
    hostless = Instance(address="10.0.0.7:80")
    await hosts.put_raw("/weave-flux/host/10.0.0.5", '{"address":"10.0.0.5"}')
    for name, instance in (("a", registered), ("b", stray), ("c", hostless)):
        await store.add_instance("svc", name, instance)
    await with_lease(hosts, store)

    watch, first = await open_watch(hosts, store, instances=True, known_hosts=True)
    assert first.services == {"svc": info(instances={"a": registered})}
    assert await store.get_all_services(instances=True, known_hosts=True) == first.services
    held = await store.get_service("svc", instances=True, known_hosts=True)
    assert held == first.services["svc"]
    everything = info(instances={"a": registered, "b": stray, "c": hostless})
    assert await store.get_service("svc", instances=True) == everything
    assert skipped(caplog) == [
        "skipping /weave-flux/service/svc/instances/b: its host 10.0.0.6 is not registered"
        " (no /weave-flux/host/10.0.0.6 record)",
        "skipping /weave-flux/service/svc/instances/c: it names no host",
    ]

    # The host registers: its instance is served; it goes away: held back again (and named).
    caplog.clear()
    await hosts.put_raw("/weave-flux/host/10.0.0.6", '{"address":"10.0.0.6"}')
    assert await changes_until_sentinel(store, watch) == [
        {"svc": info(instances={"a": registered, "b": stray})}
    ]
    await hosts.delete_raw("/weave-flux/host/10.0.0.6")
    assert await changes_until_sentinel(store, watch) == [
        {"svc": info(instances={"a": registered})}
    ]
    assert len(skipped(caplog)) == 1 and "instances/b" in skipped(caplog)[0]


async def test_created_orders_services_by_when_their_spec_was_created(
    hosts: Cluster, store: Store
) -> None:
    await store.add_service("first", SPEC)
    await store.add_service("second", SPEC)
    await store.add_service("first", OTHER_SPEC)  # rewritten in place: still the first
    services = await store.get_all_services()
    assert 0 < services["first"].created < services["second"].created
    assert (await store.get_service("first")).created == services["first"].created
    watch, snapshot = await open_watch(hosts, store)
    assert {n: i.created for n, i in snapshot.services.items()} == {
        n: i.created for n, i in services.items()
    }
    await store.remove_service("first")
    await store.add_service("first", SPEC)  # re-created: now the last
    changes = await changes_until_sentinel(store, watch)
    assert changes[0] == {"first": None}
    recreated = changes[1]["first"]
    assert recreated is not None and recreated.created > services["second"].created
