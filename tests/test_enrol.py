"""Enrolment, the pure core of the agent: tables from the original's tests, then properties."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux.agent.enrol import (
    Container,
    ContainerEvent,
    ContainerUpdate,
    Enroller,
    InstanceKey,
    InstanceUpdate,
    PortBinding,
    apply_event,
    enrol,
    enrol_all,
    instance_address,
    instance_state,
)
from flux.model import HostRef, Instance, InstanceState, Rule, Service, ServiceInfo
from flux.selector import container_labels, matches
from flux.store.base import ServiceUpdate

HOST = "10.98.99.100"


def svc(
    name: str,
    rules: Mapping[str, Mapping[str, str]] | None = None,
    *,
    instance_port: int = 0,
    rule_ports: Mapping[str, int] | None = None,
    address: str | None = None,
) -> ServiceInfo:
    rule_ports = rule_ports or {}
    return ServiceInfo(
        name=name,
        spec=Service(address=address, instancePort=instance_port),
        rules={
            rule: Rule(selector=dict(selector), instancePort=rule_ports.get(rule, 0))
            for rule, selector in (rules or {}).items()
        },
    )


def ctr(cid: str, image: str = "foo-image:version", **fields: Any) -> Container:
    return Container(id=cid, image=image, **fields)


def services_reset(*infos: ServiceInfo) -> ServiceUpdate:
    return ServiceUpdate({info.name: info for info in infos}, reset=True)


def services_delta(**infos: ServiceInfo | None) -> ServiceUpdate:
    return ServiceUpdate(dict(infos))


def containers_reset(*containers: Container) -> ContainerUpdate:
    return ContainerUpdate({c.id: c for c in containers}, reset=True)


def containers_delta(**containers: Container | None) -> ContainerUpdate:
    return ContainerUpdate(dict(containers))


def addresses(update: InstanceUpdate | None) -> dict[InstanceKey, str | None]:
    assert update is not None
    return {key: (i.address if i else "gone") for key, i in update.instances.items()}


# -- the original's sync_instances tests (reference §3.9) ------------------------------------------


def test_reconcile_global_mode_selects_by_image_tag_label_and_env() -> None:
    # TestSyncInstancesReconcile: three services, two containers, only one of them selected.
    selected = ctr(
        "selected",
        image="foo-image:bobbins",
        labels={"flux/foo-label": "blorp"},
        env=("SERVICE_NAME=boo",),
        networks={"bridge": "192.168.45.67"},
    )
    other = ctr(
        "other",
        image="foo-image:not-bobbins",
        labels={"flux/foo-label": "something-else"},
        env=("SERVICE_NAME=literally-anything",),
        networks={"bridge": "192.168.45.68"},
    )
    enroller = Enroller(HOST, "global")
    assert enroller.update_containers(containers_reset(selected, other)) is None
    update = enroller.update_services(
        services_reset(
            svc("foo-svc", {"r": {"image": "foo-image", "tag": "bobbins"}}, instance_port=80),
            svc("bar-svc", {"r": {"flux/foo-label": "blorp"}}, instance_port=80),
            svc("boo-svc", {"r": {"env.SERVICE_NAME": "boo"}}, instance_port=80),
        )
    )
    assert update is not None and update.reset
    assert addresses(update) == {
        ("foo-svc", "selected"): "192.168.45.67:80",
        ("bar-svc", "selected"): "192.168.45.67:80",
        ("boo-svc", "selected"): "192.168.45.67:80",
    }


def test_events_local_mode() -> None:
    # TestSyncInstancesEvents, step by step.
    foo = ctr("foo", ports={"80/tcp": (PortBinding("", "3456"),)})
    enroller = Enroller(HOST, "local")
    assert enroller.update_containers(containers_reset(foo)) is None
    first = enroller.update_services(services_reset())
    assert first is not None and first.reset and dict(first.instances) == {}

    matching = svc("foo-svc", {"default": {"image": "foo-image"}}, instance_port=80)
    assert addresses(enroller.update_services(services_delta(**{"foo-svc": matching}))) == {
        ("foo-svc", "foo"): f"{HOST}:3456"
    }

    narrowed = svc("foo-svc", {"default": {"image": "not-foo-image"}}, instance_port=80)
    update = enroller.update_services(services_delta(**{"foo-svc": narrowed}))
    assert update is not None and not update.reset
    assert dict(update.instances) == {("foo-svc", "foo"): None}

    bar = ctr("bar", image="not-foo-image", ports={"80/tcp": (PortBinding("", "3457"),)})
    baz = ctr("baz", image="not-foo-image", ports={"80/tcp": (PortBinding("", "3458"),)})
    assert addresses(enroller.update_containers(containers_delta(bar=bar, baz=baz))) == {
        ("foo-svc", "bar"): f"{HOST}:3457",
        ("foo-svc", "baz"): f"{HOST}:3458",
    }
    update = enroller.update_containers(containers_delta(baz=None))
    assert update is not None and dict(update.instances) == {("foo-svc", "baz"): None}

    update = enroller.update_services(services_delta(**{"foo-svc": None}))
    assert update is not None and dict(update.instances) == {("foo-svc", "bar"): None}
    assert dict(enroller.instances) == {}


@pytest.mark.parametrize(
    ("case", "mode", "service", "container", "expected"),
    [
        # TestServiceMappedPort: the service's instance port, published on the host.
        (
            "service port",
            "local",
            svc("s", {"r": {"image": "foo-image"}}, instance_port=8080),
            ctr("c", ports={"8080/tcp": (PortBinding("0.0.0.0", "3456"),)}),
            f"{HOST}:3456",
        ),
        # TestRuleMappedPort: the rule's instance port wins over the service's.
        (
            "rule port",
            "local",
            svc("s", {"r": {"image": "foo-image"}}, instance_port=80, rule_ports={"r": 8080}),
            ctr(
                "c",
                ports={
                    "80/tcp": (PortBinding("0.0.0.0", "1111"),),
                    "8080/tcp": (PortBinding("0.0.0.0", "3456"),),
                },
            ),
            f"{HOST}:3456",
        ),
        # TestMultihostNetworking: global mode ignores the mapping.
        (
            "global",
            "global",
            svc("s", {"r": {"image": "foo-image"}}, instance_port=8080),
            ctr(
                "c",
                networks={"bridge": "192.168.0.101"},
                ports={"8080/tcp": (PortBinding("0.0.0.0", "3456"),)},
            ),
            "192.168.0.101:8080",
        ),
        # TestNoAddress: local mode, nothing published.
        (
            "no address",
            "local",
            svc("s", {"r": {"image": "foo-image"}}, instance_port=8080),
            ctr("c", networks={"bridge": "192.168.0.101"}),
            None,
        ),
        # TestHostNetworking: host IP and the instance port, in either mode.
        (
            "host network (local)",
            "local",
            svc("s", {"r": {"image": "foo-image"}}, instance_port=8080),
            ctr("c", network_mode="host"),
            f"{HOST}:8080",
        ),
        (
            "host network (global)",
            "global",
            svc("s", {"r": {"image": "foo-image"}}, instance_port=8080),
            ctr("c", network_mode="host"),
            f"{HOST}:8080",
        ),
        (
            "no port at all",
            "global",
            svc("s", {"r": {"image": "foo-image"}}),
            ctr("c", networks={"bridge": "192.168.0.101"}),
            None,
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_address_cases(
    case: str, mode: str, service: ServiceInfo, container: Container, expected: str | None
) -> None:
    enroller = Enroller(HOST, mode)
    enroller.update_services(services_reset(service))
    update = enroller.update_containers(containers_reset(container))
    assert update is not None and update.reset
    instance = update.instances[("s", "c")]
    assert instance is not None
    assert instance.address == expected
    assert instance.state == (InstanceState.LIVE if expected else InstanceState.NO_ADDRESS)
    assert instance.host == HostRef(address=HOST)
    assert instance.container_rule == "r"


def test_resets() -> None:
    # TestSyncInstancesResets: nothing before both snapshots, then a reset per snapshot.
    service = svc("s", {"r": {"image": "foo-image"}}, instance_port=80)
    foo = ctr("foo", networks={"bridge": "172.17.0.2"})
    enroller = Enroller(HOST, "global")
    assert enroller.update_containers(containers_delta(foo=foo)) is None
    assert enroller.update_services(services_delta(s=service)) is None
    assert not enroller.ready
    assert enroller.update_containers(containers_reset(foo)) is None
    assert enroller.update_containers(containers_delta(bar=ctr("bar"))) is None  # no services yet
    update = enroller.update_services(services_reset(service))
    assert update is not None and update.reset and len(update.instances) == 2
    # Docker restarted: a new container snapshot is a reset.
    update = enroller.update_containers(containers_reset(foo))
    assert update is not None and update.reset and list(update.instances) == [("s", "foo")]
    # etcd restarted: a new service snapshot is a reset.
    update = enroller.update_services(services_reset(service))
    assert update is not None and update.reset and list(update.instances) == [("s", "foo")]
    # Forgetting goes back to "unknown": the next pair of snapshots gives one reset.
    enroller.forget()
    assert enroller.update_services(services_reset(service)) is None
    update = enroller.update_containers(containers_reset(foo))
    assert update is not None and update.reset and len(update.instances) == 1


# -- rules, labels and addresses -------------------------------------------------------------------


def test_first_matching_rule_in_sorted_order_is_recorded() -> None:
    service = svc(
        "s",
        {"zeta": {"image": "foo-image"}, "alpha": {"tag": "version"}, "beta": {"image": "no"}},
        instance_port=80,
        rule_ports={"zeta": 9999},
    )
    got = enrol(ctr("c", network_mode="host"), {"s": service}, host_ip=HOST, network_mode="local")
    assert got["s"].container_rule == "alpha"
    assert got["s"].address == f"{HOST}:80"  # alpha has no port of its own


def test_any_rule_enrols_and_all_entries_of_a_rule_must_match() -> None:
    service = svc("s", {"both": {"image": "foo-image", "tier": "web"}, "env": {"env.A": "1"}})
    containers = [
        ctr("image-only"),
        ctr("both", labels={"tier": "web"}),
        ctr("env", image="other", env=("A=1",)),
        ctr("none", image="other", env=("A=2",)),
    ]
    got = enrol_all(containers, {"s": service}, host_ip=HOST, network_mode="local")
    assert sorted(cid for _, cid in got) == ["both", "env"]


def test_instance_records_labels_image_tag_and_env() -> None:
    container = ctr(
        "c",
        image="localhost:5000/foo:1.2",
        labels={"app": "web"},
        env=("URL=a=b", "PATH=/bin"),
    )
    got = enrol(container, {"s": svc("s", {"r": {"image": "localhost:5000/foo"}})},
                host_ip=HOST, network_mode="local")
    assert got["s"].labels == {
        "image": "localhost:5000/foo",
        "tag": "1.2",
        "app": "web",
        "env.URL": "a=b",
        "env.PATH": "/bin",
    }
    assert got["s"].labels == container_labels(container.image, container.labels, container.env)


def test_no_rules_no_instances() -> None:
    assert enrol(ctr("c"), {"s": svc("s")}, host_ip=HOST, network_mode="local") == {}


@pytest.mark.parametrize(
    ("bindings", "host_ip", "expected"),
    [
        ((PortBinding("", "3456"),), HOST, f"{HOST}:3456"),
        ((PortBinding("0.0.0.0", "3456"),), HOST, f"{HOST}:3456"),
        ((PortBinding("::", "3456"),), HOST, f"{HOST}:3456"),
        ((PortBinding(HOST, "3456"),), HOST, f"{HOST}:3456"),
        ((PortBinding("127.0.0.1", "3456"),), "127.0.0.1", "127.0.0.1:3456"),
        # Published on another interface only: clients on other hosts cannot reach it here.
        ((PortBinding("127.0.0.1", "3456"),), HOST, None),
        ((PortBinding("127.0.0.1", "1111"), PortBinding("0.0.0.0", "2222")), HOST, f"{HOST}:2222"),
        ((PortBinding("0.0.0.0", "1111"), PortBinding("::", "2222")), HOST, f"{HOST}:1111"),
        ((PortBinding("0.0.0.0", "not-a-port"),), HOST, None),
        ((), HOST, None),
        ((PortBinding("", "3456"),), "fd00::1", "[fd00::1]:3456"),
    ],
)
def test_local_mode_bindings(
    bindings: tuple[PortBinding, ...], host_ip: str, expected: str | None
) -> None:
    container = ctr("c", ports={"80/tcp": bindings, "80/udp": (PortBinding("", "9"),)})
    assert instance_address(container, 80, host_ip=host_ip, network_mode="local") == expected


def test_local_mode_ignores_udp_bindings() -> None:
    container = ctr("c", ports={"80/udp": (PortBinding("", "3456"),)})
    assert instance_address(container, 80, host_ip=HOST, network_mode="local") is None


@pytest.mark.parametrize(
    ("networks", "top_level", "expected"),
    [
        ({"bridge": "172.17.0.2"}, "172.17.0.2", "172.17.0.2:80"),
        ({"zeta": "10.0.2.2", "alpha": "10.0.1.2"}, "", "10.0.1.2:80"),
        ({"alpha": "", "zeta": "10.0.2.2"}, "", "10.0.2.2:80"),  # alpha has no IPv4 address
        ({"alpha": "fd00::2", "zeta": "10.0.2.2"}, "", "10.0.2.2:80"),
        ({}, "172.17.0.9", "172.17.0.9:80"),  # engines without per-network addresses
        ({"none": ""}, "", None),
    ],
)
def test_global_mode_networks(
    networks: dict[str, str], top_level: str, expected: str | None
) -> None:
    container = ctr("c", networks=networks, ip_address=top_level)
    assert instance_address(container, 80, host_ip=HOST, network_mode="global") == expected


def test_bad_network_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid network mode 'bridge'"):
        Enroller(HOST, "bridge")


# -- lifecycle -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "address", "expected"),
    [
        ({}, "1.2.3.4:80", InstanceState.LIVE),
        ({}, None, InstanceState.NO_ADDRESS),
        ({"paused": True}, "1.2.3.4:80", InstanceState.PAUSED),
        ({"health": "unhealthy"}, "1.2.3.4:80", InstanceState.UNHEALTHY),
        ({"health": "starting"}, "1.2.3.4:80", InstanceState.LIVE),
        ({"health": "healthy"}, "1.2.3.4:80", InstanceState.LIVE),
        ({"stopping": True}, "1.2.3.4:80", InstanceState.DRAINING),
        # Precedence: draining > paused > unhealthy > no address.
        ({"stopping": True, "paused": True, "health": "unhealthy"}, None, InstanceState.DRAINING),
        ({"paused": True, "health": "unhealthy"}, None, InstanceState.PAUSED),
        ({"health": "unhealthy"}, None, InstanceState.UNHEALTHY),
    ],
)
def test_instance_state(
    flags: dict[str, Any], address: str | None, expected: InstanceState
) -> None:
    assert instance_state(ctr("c", **flags), address) is expected


@pytest.mark.parametrize(
    ("before", "event", "after"),
    [
        ({}, ContainerEvent("pause", "c"), {"paused": True}),
        ({"paused": True}, ContainerEvent("unpause", "c"), {}),
        ({}, ContainerEvent("health_status", "c", health="unhealthy"), {"health": "unhealthy"}),
        ({"health": "unhealthy"}, ContainerEvent("health_status", "c", health="healthy"),
         {"health": "healthy"}),
        ({}, ContainerEvent("kill", "c", signal="15"), {"stopping": True}),
        ({}, ContainerEvent("kill", "c", signal="9"), {"stopping": True}),
        ({}, ContainerEvent("kill", "c", signal="SIGINT"), {"stopping": True}),
        ({}, ContainerEvent("kill", "c"), {"stopping": True}),  # old engines: no signal given
        # A reload signal does not drain...
        ({}, ContainerEvent("kill", "c", signal="1"), {}),
        ({}, ContainerEvent("kill", "c", signal="28"), {}),
        # ...unless it is the container's own stop signal (httpd stops on SIGWINCH).
        ({"stop_signal": "SIGWINCH"}, ContainerEvent("kill", "c", signal="28"),
         {"stop_signal": "SIGWINCH", "stopping": True}),
        ({"stop_signal": "WINCH"}, ContainerEvent("kill", "c", signal="28"),
         {"stop_signal": "WINCH", "stopping": True}),
        ({}, ContainerEvent("stop", "c"), {"stopping": True}),
        # Not lifecycle transitions: the adapter re-inspects for these.
        ({"paused": True}, ContainerEvent("start", "c"), {"paused": True}),
        ({}, ContainerEvent("network", "c"), {}),
    ],
)
def test_lifecycle_transitions(
    before: dict[str, Any], event: ContainerEvent, after: dict[str, Any]
) -> None:
    assert apply_event(ctr("c", **before), event) == ctr("c", **after)


def test_die_ends_a_container() -> None:
    assert apply_event(ctr("c", paused=True), ContainerEvent("die", "c")) is None


def test_state_changes_flow_to_instances() -> None:
    enroller = Enroller(HOST, "local")
    enroller.update_services(services_reset(svc("s", {"r": {"image": "foo-image"}},
                                                 instance_port=80)))
    live = ctr("c", network_mode="host")
    enroller.update_containers(containers_reset(live))
    states = []
    for event in (
        ContainerEvent("pause", "c"),
        ContainerEvent("unpause", "c"),
        ContainerEvent("health_status", "c", health="unhealthy"),
        ContainerEvent("health_status", "c", health="healthy"),
        ContainerEvent("kill", "c", signal="15"),
    ):
        current = enroller.containers[live.id]  # type: ignore[index]
        changed = apply_event(current, event)
        update = enroller.update_containers(containers_delta(c=changed))
        assert update is not None and not update.reset
        instance = update.instances[("s", "c")]
        assert instance is not None
        states.append(str(instance.state))
    assert states == ["paused", "live", "unhealthy", "live", "draining"]
    update = enroller.update_containers(containers_delta(c=None))
    assert update is not None and dict(update.instances) == {("s", "c"): None}


def test_unchanged_delta_publishes_nothing() -> None:
    enroller = Enroller(HOST, "local")
    service = svc("s", {"r": {"image": "foo-image"}}, instance_port=80)
    enroller.update_services(services_reset(service))
    enroller.update_containers(containers_reset(ctr("c")))
    assert enroller.update_containers(containers_delta(c=ctr("c"))) is None
    assert enroller.update_services(services_delta(s=service)) is None
    # A container that matches nothing changes nothing either.
    assert enroller.update_containers(containers_delta(x=ctr("x", image="other"))) is None
    assert enroller.update_containers(containers_delta(x=None)) is None


def test_rule_widened_and_service_removed() -> None:
    enroller = Enroller(HOST, "local")
    enroller.update_containers(
        containers_reset(ctr("a", labels={"app": "a"}), ctr("b", labels={"app": "b"}))
    )
    enroller.update_services(services_reset(svc("s", {"r": {"app": "a"}})))
    assert set(enroller.instances) == {("s", "a")}
    widened = svc("s", {"r": {"app": "a"}, "r2": {"app": "b"}})
    update = enroller.update_services(services_delta(s=widened))
    assert update is not None and set(update.instances) == {("s", "b")}
    update = enroller.update_services(services_delta(s=None))
    assert update is not None and dict(update.instances) == {("s", "a"): None, ("s", "b"): None}


# -- parsing docker inspect ------------------------------------------------------------------------

INSPECT: dict[str, Any] = {
    "Id": "144cc899bf6e" + "0" * 52,
    "State": {"Status": "running", "Running": True, "Paused": False},
    "HostConfig": {"NetworkMode": "default"},
    "Config": {
        "Image": "flux-test/busybox:latest",
        "Env": ["PATH=/usr/bin", "EMPTY"],
        "Labels": {"flux-test": "x"},
        "ExposedPorts": {"80/tcp": {}},
    },
    "NetworkSettings": {
        "Ports": {
            "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32768"}],
            "81/tcp": None,
        },
        "IPAddress": "172.17.0.2",
        "Networks": {"bridge": {"IPAddress": "172.17.0.2", "Gateway": "172.17.0.1"}},
    },
}


def test_from_inspect() -> None:
    container = Container.from_inspect(INSPECT)
    assert container == Container(
        id=INSPECT["Id"],
        image="flux-test/busybox:latest",
        labels={"flux-test": "x"},
        env=("PATH=/usr/bin", "EMPTY"),
        network_mode="default",
        ip_address="172.17.0.2",
        networks={"bridge": "172.17.0.2"},
        ports={"80/tcp": (PortBinding("127.0.0.1", "32768"),), "81/tcp": ()},
    )


def test_from_inspect_tolerates_nulls_and_reads_state() -> None:
    data = {
        "Id": "x",
        "State": {"Running": True, "Paused": True, "Health": {"Status": "unhealthy"}},
        "Config": {"Image": "foo", "Env": None, "Labels": None, "StopSignal": "SIGQUIT"},
        "HostConfig": {"NetworkMode": "host"},
        "NetworkSettings": {"Ports": None, "Networks": None, "IPAddress": ""},
    }
    container = Container.from_inspect(data, stopping=True)
    assert container == Container(
        id="x", image="foo", network_mode="host", paused=True, health="unhealthy",
        stop_signal="SIGQUIT", stopping=True,
    )
    assert Container.from_inspect({"Id": "y"}) == Container(id="y")


# -- properties ------------------------------------------------------------------------------------

IDS = [f"c{i}" for i in range(5)]
SERVICE_NAMES = ["s0", "s1", "s2"]
LABEL_VALUES = {"app": ["web", "db"], "tier": ["a", "b"]}

selectors = st.dictionaries(
    st.sampled_from(["image", "tag", "app", "tier", "env.MODE", "digest"]),
    st.sampled_from(["foo", "bar", "1", "latest", "web", "db", "a", "b", "x=y", ""]),
    max_size=2,
)
service_infos = st.builds(
    lambda name, port, rules: ServiceInfo(
        name=name, spec=Service(instancePort=port), rules=rules
    ),
    st.sampled_from(SERVICE_NAMES),
    st.sampled_from([0, 80]),
    st.dictionaries(
        st.sampled_from(["a", "b", "default"]),
        st.builds(
            lambda selector, port: Rule(selector=selector, instancePort=port),
            selectors,
            st.sampled_from([0, 8080]),
        ),
        max_size=3,
    ),
)
containers = st.builds(
    Container,
    id=st.sampled_from(IDS),
    image=st.sampled_from(["foo", "foo:1", "bar:latest", "localhost:5000/foo:1", "foo@sha256:ab"]),
    labels=st.fixed_dictionaries(
        {}, optional={key: st.sampled_from(values) for key, values in LABEL_VALUES.items()}
    ),
    env=st.lists(st.sampled_from(["MODE=x=y", "MODE=1", "OTHER=2", "BARE"]), max_size=2).map(
        tuple
    ),
    network_mode=st.sampled_from(["default", "host"]),
    networks=st.dictionaries(
        st.sampled_from(["bridge", "alpha"]), st.sampled_from(["", "10.0.0.2", "fd00::2"]),
        max_size=2,
    ),
    ports=st.dictionaries(
        st.sampled_from(["80/tcp", "8080/tcp", "80/udp"]),
        st.lists(
            st.builds(PortBinding, st.sampled_from(["", "0.0.0.0", "127.0.0.1", HOST]),
                      st.sampled_from(["32768", "32769", "x"])),
            max_size=2,
        ).map(tuple),
        max_size=2,
    ),
    paused=st.booleans(),
    health=st.sampled_from(["", "healthy", "unhealthy"]),
    stopping=st.booleans(),
)
container_sets = st.lists(containers, max_size=5, unique_by=lambda c: c.id)
service_sets = st.lists(service_infos, max_size=3, unique_by=lambda s: s.name)
modes = st.sampled_from(["local", "global"])


def replay(updates: list[InstanceUpdate | None]) -> dict[InstanceKey, Instance]:
    """What a consumer of the updates ends up with."""
    view: dict[InstanceKey, Instance] = {}
    for update in updates:
        if update is None:
            continue
        if update.reset:
            view = {}
        for key, instance in update.instances.items():
            if instance is None:
                view.pop(key, None)
            else:
                view[key] = instance
    return view


@settings(max_examples=150, deadline=None)
@given(container_sets, service_sets, modes, st.randoms(use_true_random=False), st.booleans())
def test_enrolment_does_not_depend_on_event_order(
    cs: list[Container], ss: list[ServiceInfo], mode: str, rng: Any, services_first: bool
) -> None:
    expected = enrol_all(cs, {s.name: s for s in ss}, host_ip=HOST, network_mode=mode)
    # Empty snapshots in either order, then every container and service as a delta, shuffled.
    enroller = Enroller(HOST, mode)
    updates: list[InstanceUpdate | None] = []
    first = [enroller.update_services, enroller.update_containers]
    empty = [services_reset(), ContainerUpdate({}, reset=True)]
    if not services_first:
        first.reverse()
        empty.reverse()
    for feed, snapshot in zip(first, empty, strict=True):
        updates.append(feed(snapshot))  # type: ignore[operator]
    deltas: list[ContainerUpdate | ServiceUpdate] = [ContainerUpdate({c.id: c}) for c in cs]
    deltas += [ServiceUpdate({s.name: s}) for s in ss]
    rng.shuffle(deltas)
    for delta in deltas:
        if isinstance(delta, ContainerUpdate):
            updates.append(enroller.update_containers(delta))
        else:
            updates.append(enroller.update_services(delta))
    assert dict(enroller.instances) == expected
    assert replay(updates) == expected
    # And the same state given as two snapshots, in either order, is one reset with it all.
    other = Enroller(HOST, mode)
    if services_first:
        other.update_services(services_reset(*ss))
        final = other.update_containers(containers_reset(*cs))
    else:
        other.update_containers(containers_reset(*cs))
        final = other.update_services(services_reset(*ss))
    assert final is not None and final.reset and dict(final.instances) == expected


operations = st.lists(
    st.one_of(
        st.tuples(st.just("containers-reset"), container_sets),
        st.tuples(st.just("services-reset"), service_sets),
        st.tuples(st.just("container"), st.sampled_from(IDS), st.none() | containers),
        st.tuples(st.just("service"), st.sampled_from(SERVICE_NAMES), st.none() | service_infos),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(operations, modes)
def test_output_only_for_matching_containers_and_always_consistent(
    ops: list[tuple[Any, ...]], mode: str
) -> None:
    enroller = Enroller(HOST, mode)
    updates: list[InstanceUpdate | None] = []
    for op in ops:
        if op[0] == "containers-reset":
            updates.append(enroller.update_containers(containers_reset(*op[1])))
        elif op[0] == "services-reset":
            updates.append(enroller.update_services(services_reset(*op[1])))
        elif op[0] == "container":
            container = None if op[2] is None else dataclasses.replace(op[2], id=op[1])
            updates.append(enroller.update_containers(ContainerUpdate({op[1]: container})))
        else:
            info = None if op[2] is None else op[2].model_copy(update={"name": op[1]})
            updates.append(enroller.update_services(ServiceUpdate({op[1]: info})))
        for update in updates[-1:]:
            if update is not None:
                assert enroller.ready  # nothing is published before both snapshots
                assert update.reset or update.instances  # no empty deltas
    if not enroller.ready:
        assert all(update is None for update in updates)
        return
    known_containers = dict(enroller.containers or {})
    known_services = dict(enroller.services or {})
    assert replay(updates) == dict(enroller.instances)
    for (service, cid), instance in enroller.instances.items():
        container = known_containers[cid]
        labels = container.selector_labels
        rules = known_services[service].rules
        matching = sorted(name for name, rule in rules.items() if matches(rule.selector, labels))
        assert matching, "an instance for a container that matches no rule"
        assert instance.container_rule == matching[0]
        assert instance.labels == labels
    # Completeness: every matching pair is an instance.
    assert dict(enroller.instances) == enrol_all(
        known_containers.values(), known_services, host_ip=HOST, network_mode=mode
    )
