"""flux.balancer.entrypoints: which service each published port serves (pure)."""

from __future__ import annotations

from flux.balancer.entrypoints import EntryPoint, PortConflict, PublishClaim, resolve_entry_points
from flux.model import HostRef, Instance, InstanceState, Service, ServiceInfo


def test_a_claim_holds_the_published_port_and_the_live_instances_only() -> None:
    live = Instance(host=HostRef(address="10.0.0.2"), address="10.0.0.2:80", state="live")
    info = ServiceInfo(
        name="web",
        spec=Service(publish=8080, protocol="http"),
        created=7,
        instances={
            "a": live,
            "b": live.model_copy(update={"state": InstanceState.DRAINING}),
            "c": Instance(host=HostRef(address="10.0.0.2")),
        },
    )
    claim = PublishClaim.from_info(info)
    assert claim == PublishClaim(8080, "http", {"a": "10.0.0.2:80"}, 7)
    unpublished = ServiceInfo(name="vip", spec=Service(address="10.1.0.1:80"))
    assert PublishClaim.from_info(unpublished) is None


def test_the_first_created_service_holds_a_port_and_the_others_are_in_conflict() -> None:
    claims = {
        "late": PublishClaim(80, "http", created=30),
        "early": PublishClaim(80, "tcp", created=10),
        "same-revision-b": PublishClaim(443, "tcp", created=5),
        "same-revision-a": PublishClaim(443, "tcp", created=5),
        "alone": PublishClaim(8080, "http", created=99),
    }
    entries, conflicts = resolve_entry_points(claims)
    assert entries == {
        80: EntryPoint(80, "early", "tcp"),
        443: EntryPoint(443, "same-revision-a", "tcp"),
        8080: EntryPoint(8080, "alone", "http"),
    }
    assert conflicts == {
        "late": PortConflict("late", 80, "early"),
        "same-revision-b": PortConflict("same-revision-b", 443, "same-revision-a"),
    }
    assert str(conflicts["late"]) == "port 80 is also published by service early"
    # The holder goes: the next claimant takes the port.
    del claims["early"]
    entries, conflicts = resolve_entry_points(claims)
    assert entries[80] == EntryPoint(80, "late", "http") and "late" not in conflicts
