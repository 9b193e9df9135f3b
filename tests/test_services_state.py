"""The per-service state machine: every transition and the order of its actions."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux.balancer.services import (
    TRANSITIONS,
    Action,
    ActionKind,
    Conflict,
    Endpoint,
    Phase,
    ServiceState,
    ServiceView,
    State,
    in_phase_order,
    reset,
    resolve_conflicts,
    step,
    transition,
    why_ignored,
)
from flux.model import HostRef, Instance, InstanceState, Service, ServiceInfo

A = ActionKind
VIP = "127.42.0.1:8888"
TCP = Endpoint(VIP, "tcp")
HTTP = Endpoint(VIP, "http")
MOVED = Endpoint("127.42.0.2:8888", "tcp")
ONE = {"i1": "127.0.0.1:10000"}
TWO = {"i1": "127.0.0.1:10000", "i2": "127.0.0.1:10001"}

ABSENT = ServiceState()


def rejecting(endpoint: Endpoint = TCP) -> ServiceState:
    return ServiceState(State.REJECTING, endpoint)


def forwarding(endpoint: Endpoint = TCP, instances: dict[str, str] = ONE) -> ServiceState:
    return ServiceState(State.FORWARDING, endpoint, instances)


def view(endpoint: Endpoint = TCP, instances: dict[str, str] | None = None) -> ServiceView:
    return ServiceView(endpoint, instances or {})


def steps(actions: tuple[Action, ...]) -> list[tuple[str, Endpoint]]:
    return [(action.kind.value, action.endpoint) for action in actions]


# A table reads best as one: keep the formatter off it.
# fmt: off
CASES = [
    # (description, current, view, new state, [(action, endpoint), ...])
    ("unknown and gone stays absent", ABSENT, None, State.ABSENT, []),
    ("new without instances rejects", ABSENT, view(), State.REJECTING, [("install_reject", TCP)]),
    (
        "new with an instance forwards: listener and pool before the DNAT rule",
        ABSENT, view(TCP, ONE), State.FORWARDING,
        [("open_listener", TCP), ("update_pool", TCP), ("install_dnat", TCP)],
    ),
    ("rejecting stays rejecting", rejecting(), view(), State.REJECTING, []),
    (
        "rejecting ignores a protocol change (the REJECT rule does not depend on it)",
        rejecting(TCP), view(HTTP), State.REJECTING, [],
    ),
    (
        "rejecting with a new address: new REJECT first",
        rejecting(TCP), view(MOVED), State.REJECTING,
        [("install_reject", MOVED), ("remove_rule", TCP)],
    ),
    (
        "rejecting to forwarding: DNAT installed before the REJECT goes",
        rejecting(), view(TCP, ONE), State.FORWARDING,
        [("open_listener", TCP), ("update_pool", TCP), ("install_dnat", TCP), ("remove_rule", TCP)],
    ),
    (
        "rejecting to forwarding at a new address",
        rejecting(TCP), view(MOVED, ONE), State.FORWARDING,
        [
            ("open_listener", MOVED), ("update_pool", MOVED), ("install_dnat", MOVED),
            ("remove_rule", TCP),
        ],
    ),
    ("rejecting service deleted", rejecting(), None, State.ABSENT, [("remove_rule", TCP)]),
    ("forwarding, nothing changed", forwarding(), view(TCP, ONE), State.FORWARDING, []),
    (
        "forwarding, instance set changed: pool updated in place",
        forwarding(), view(TCP, TWO), State.FORWARDING, [("update_pool", TCP)],
    ),
    (
        "forwarding, an instance's address changed: pool updated in place",
        forwarding(), view(TCP, {"i1": "127.0.0.1:10005"}), State.FORWARDING,
        [("update_pool", TCP)],
    ),
    (
        "forwarding to rejecting: REJECT before the DNAT goes, listener closed last",
        forwarding(), view(), State.REJECTING,
        [("install_reject", TCP), ("remove_rule", TCP), ("close_listener", TCP)],
    ),
    (
        "forwarding to rejecting at a new address",
        forwarding(TCP), view(MOVED), State.REJECTING,
        [("install_reject", MOVED), ("remove_rule", TCP), ("close_listener", TCP)],
    ),
    (
        "forwarding, address changed: listener replaced",
        forwarding(TCP), view(MOVED, ONE), State.FORWARDING,
        [
            ("replace_listener", MOVED), ("update_pool", MOVED), ("install_dnat", MOVED),
            ("remove_rule", TCP), ("close_listener", TCP),
        ],
    ),
    (
        "forwarding, protocol changed: listener replaced",
        forwarding(TCP), view(HTTP, ONE), State.FORWARDING,
        [
            ("replace_listener", HTTP), ("update_pool", HTTP), ("install_dnat", HTTP),
            ("remove_rule", TCP), ("close_listener", TCP),
        ],
    ),
    (
        "forwarding service deleted: rule removed, then listener closed",
        forwarding(), None, State.ABSENT, [("remove_rule", TCP), ("close_listener", TCP)],
    ),
]
# fmt: on


@pytest.mark.parametrize(
    ("current", "new_view", "state", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_transitions(
    current: ServiceState,
    new_view: ServiceView | None,
    state: State,
    expected: list[tuple[str, Endpoint]],
) -> None:
    result = transition("svc", current, new_view)
    assert result.state.state is state
    assert steps(result.actions) == expected
    assert all(action.service == "svc" for action in result.actions)
    if new_view is not None and result.actions:
        assert result.state.endpoint == new_view.endpoint


def test_rejecting_remembers_the_endpoint_its_rule_was_installed_for() -> None:
    state = transition("svc", rejecting(TCP), view(HTTP)).state
    assert state.endpoint == TCP
    removal = transition("svc", state, None).actions
    assert steps(removal) == [("remove_rule", TCP)]
    # Going forwarding, the listener gets the protocol asked for now.
    assert steps(transition("svc", state, view(HTTP, ONE)).actions)[0] == ("open_listener", HTTP)


def test_action_arguments() -> None:
    result = transition("svc", forwarding(TCP), view(HTTP, TWO))
    replace, pool, _, remove, _ = result.actions
    assert replace.previous == TCP
    assert dict(pool.instances or {}) == TWO
    assert remove.rule == "dnat"
    assert transition("svc", rejecting(), None).actions[0].rule == "reject"
    assert result.state == ServiceState(State.FORWARDING, HTTP, TWO)
    assert transition("svc", forwarding(), view()).state.instances == {}


def test_a_new_proxy_protocol_is_a_new_listener() -> None:
    """The listener sends the header, so turning it on, off or to another version replaces the
    listener (its pool kept) as a new protocol does; a REJECT rule does not care."""
    proxied = Endpoint(VIP, "tcp", "v2")
    assert ServiceView.from_info(info(Service(address=VIP, proxyProtocol="v2"))) == ServiceView(
        proxied, {}
    )
    for old, new in [(TCP, proxied), (proxied, Endpoint(VIP, "tcp", "v1")), (proxied, TCP)]:
        result = transition("svc", forwarding(old), view(new, ONE))
        assert steps(result.actions)[0] == ("replace_listener", new)
        assert result.state == ServiceState(State.FORWARDING, new, ONE)
    assert transition("svc", rejecting(TCP), view(proxied)).actions == ()


def test_forwarded_turned_on_or_off_is_a_new_listener() -> None:
    """The relay rewrites the heads for the listener's connections, so X-Forwarded-For turned
    on or off replaces the listener (its pool kept); a REJECT rule does not care."""
    forwarded = Endpoint(VIP, "http", forwarded=True)
    spec = Service(address=VIP, protocol="http", forwarded=True)
    assert ServiceView.from_info(info(spec)) == ServiceView(forwarded, {})
    for old, new in [(HTTP, forwarded), (forwarded, HTTP)]:
        result = transition("svc", forwarding(old), view(new, ONE))
        assert steps(result.actions)[0] == ("replace_listener", new)
        assert result.state == ServiceState(State.FORWARDING, new, ONE)
    assert transition("svc", rejecting(HTTP), view(forwarded)).actions == ()


def test_the_original_services_scenario() -> None:
    """Reference TestServices: add, change address, drain, refill, delete, delete again."""
    state = ABSENT
    history = []
    for new_view in [
        view(TCP, {"i1": "127.0.0.1:10000"}),
        view(TCP, {"i1": "127.0.0.1:10001"}),
        view(TCP, {}),
        view(TCP, {"i1": "127.0.0.1:10000"}),
        None,
        None,
    ]:
        result = transition("svc", state, new_view)
        state = result.state
        history.append((state.state, [a.kind.value for a in result.actions]))
    assert history == [
        (State.FORWARDING, ["open_listener", "update_pool", "install_dnat"]),
        (State.FORWARDING, ["update_pool"]),
        (State.REJECTING, ["install_reject", "remove_rule", "close_listener"]),
        (State.FORWARDING, ["open_listener", "update_pool", "install_dnat", "remove_rule"]),
        (State.ABSENT, ["remove_rule", "close_listener"]),
        (State.ABSENT, []),
    ]


def test_table_is_complete_and_every_row_is_in_phase_order() -> None:
    for old, new in itertools.product(State, State):
        changes = [False] if State.ABSENT in (old, new) else [False, True]
        if (old, new) == (State.REJECTING, State.REJECTING) or (old, new) == (
            State.FORWARDING,
            State.FORWARDING,
        ):
            changes = [False, True]
        for changed in changes:
            row = TRANSITIONS[(old, new, changed)]
            phases = [kind.phase for kind, _ in row]
            assert phases == sorted(phases), (old, new, changed)


def test_rule_installs_precede_removals_and_listeners_precede_their_rules() -> None:
    for key, row in TRANSITIONS.items():
        kinds = [kind for kind, _ in row]
        if A.REMOVE_RULE in kinds and (A.INSTALL_DNAT in kinds or A.INSTALL_REJECT in kinds):
            installs = [i for i, k in enumerate(kinds) if k in (A.INSTALL_DNAT, A.INSTALL_REJECT)]
            assert max(installs) < kinds.index(A.REMOVE_RULE), key
        if A.INSTALL_DNAT in kinds:
            opens = [i for i, k in enumerate(kinds) if k in (A.OPEN_LISTENER, A.REPLACE_LISTENER)]
            assert opens and max(opens) < kinds.index(A.INSTALL_DNAT), key
        if A.CLOSE_LISTENER in kinds:
            assert kinds[-1] is A.CLOSE_LISTENER, key


# -- reset snapshots ----------------------------------------------------------------------


def test_reset_closes_services_absent_from_the_snapshot() -> None:
    current = {
        "kept": forwarding(TCP, ONE),
        "gone": forwarding(MOVED, ONE),
        "stale": rejecting(Endpoint("127.42.0.3:80", "tcp")),
    }
    snapshot: dict[str, ServiceView | None] = {
        "kept": view(TCP, ONE),
        "new": view(Endpoint("127.42.0.4:80", "http"), TWO),
        "ignored": None,
    }
    states, actions = reset(current, snapshot)
    assert set(states) == {"kept", "new"}
    assert [(a.service, a.kind.value) for a in actions] == [
        ("gone", "remove_rule"),
        ("gone", "close_listener"),
        ("new", "open_listener"),
        ("new", "update_pool"),
        ("new", "install_dnat"),
        ("stale", "remove_rule"),
    ]


def test_phase_order_batches_many_services_and_keeps_each_ones_order() -> None:
    current = {"a": forwarding(TCP), "b": rejecting(MOVED)}
    snapshot: dict[str, ServiceView | None] = {"a": view(HTTP, ONE), "b": view(MOVED, ONE)}
    _, actions = reset(current, snapshot)
    ordered = in_phase_order(actions)
    assert [a.kind.phase for a in ordered] == sorted(a.kind.phase for a in actions)
    for name in ("a", "b"):
        own = [a for a in actions if a.service == name]
        assert [a for a in ordered if a.service == name] == own
    assert ordered[-1].kind is A.CLOSE_LISTENER and ordered[0].kind.phase is Phase.PREPARE


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.tuples(
                st.sampled_from([TCP, HTTP, MOVED]),
                st.dictionaries(st.sampled_from(["i1", "i2"]), st.sampled_from(["a:1", "b:2"])),
            ),
        ),
        max_size=12,
    )
)
def test_any_sequence_keeps_listeners_and_rules_consistent(
    views: list[tuple[Endpoint, dict[str, str]] | None],
) -> None:
    """Replaying actions on a model: at most one live rule per state, listeners match."""
    state = ABSENT
    listeners: set[Endpoint] = set()
    rules: set[tuple[str, Endpoint]] = set()
    for item in views:
        new_view = None if item is None else view(item[0], item[1])
        result = transition("svc", state, new_view)
        for action in result.actions:
            if action.kind in (A.OPEN_LISTENER, A.REPLACE_LISTENER):
                assert action.endpoint not in listeners or action.previous == action.endpoint
                listeners.add(action.endpoint)
            elif action.kind is A.CLOSE_LISTENER:
                assert not any(k == "dnat" and e == action.endpoint for k, e in rules)
                listeners.discard(action.endpoint)
            elif action.kind is A.INSTALL_DNAT:
                assert action.endpoint in listeners
                rules.add(("dnat", action.endpoint))
            elif action.kind is A.INSTALL_REJECT:
                rules.add(("reject", action.endpoint))
            elif action.kind is A.REMOVE_RULE:
                assert action.rule is not None
                if result.state.state is not State.ABSENT:
                    kind = "dnat" if result.state.state is State.FORWARDING else "reject"
                    assert (kind, result.state.endpoint) in rules, "replacement first"
                rules.discard((action.rule, action.endpoint))
            elif action.kind is A.UPDATE_POOL:
                assert action.endpoint in listeners
        state = result.state
        if state.state is State.ABSENT:
            assert not rules and not listeners
        elif state.state is State.REJECTING:
            assert rules == {("reject", state.endpoint)} and not listeners
        else:
            assert rules == {("dnat", state.endpoint)} and listeners == {state.endpoint}


# -- from store records -------------------------------------------------------------------


def info(spec: Service, **instances: Instance) -> ServiceInfo:
    return ServiceInfo(name="svc", spec=spec, instances=instances)


def live(address: str | None, state: InstanceState | None = None) -> Instance:
    return Instance(host=HostRef(address="192.0.2.1"), address=address, state=state)


def test_view_from_store_records_keeps_live_instances_with_an_address() -> None:
    record = info(
        Service(address=VIP, protocol="http"),
        a=live("127.0.0.1:1"),
        b=live(None),
        c=live("127.0.0.1:3", InstanceState.DRAINING),
        d=live("127.0.0.1:4", InstanceState.PAUSED),
        e=live("127.0.0.1:5", InstanceState.LIVE),
    )
    result = ServiceView.from_info(record)
    assert result == ServiceView(HTTP, {"a": "127.0.0.1:1", "e": "127.0.0.1:5"})


def test_services_without_an_address_are_ignored() -> None:
    record = info(Service(instancePort=80), a=live("127.0.0.1:1"))
    assert ServiceView.from_info(record) is None
    assert why_ignored(record) == "service 'svc' has no address"
    assert transition("svc", ABSENT, ServiceView.from_info(record)).actions == ()
    # A service that loses its address is taken down like a deleted one.
    assert steps(transition("svc", forwarding(), ServiceView.from_info(record)).actions) == [
        ("remove_rule", TCP),
        ("close_listener", TCP),
    ]


def test_ipv6_services_are_ignored_with_a_reason() -> None:
    record = info(Service(address="[fd00::1]:80"), a=live("127.0.0.1:1"))
    assert ServiceView.from_info(record) is None
    reason = why_ignored(record)
    assert reason is not None and "IPv6" in reason and "[fd00::1]:80" in reason
    assert ServiceView.from_info(info(Service(address=VIP))) == ServiceView(TCP, {})


# -- two services, one address ----------------------------------------------------------------

OTHER_VIP = "127.42.0.2:8888"

# (views as {name: (address, created)}, the services served, the conflicts as {name: holder})
CONFLICT_CASES = [
    ({"a": (VIP, 5)}, {"a"}, {}),
    ({"a": (VIP, 5), "b": (OTHER_VIP, 6)}, {"a", "b"}, {}),
    # The first spec created keeps the address, whatever the names.
    ({"a": (VIP, 9), "b": (VIP, 6)}, {"b"}, {"a": "b"}),
    ({"a": (VIP, 5), "b": (VIP, 6), "c": (VIP, 7)}, {"a"}, {"b": "a", "c": "a"}),
    # Same revision (a store that cannot tell): the name decides.
    ({"b": (VIP, 0), "a": (VIP, 0)}, {"a"}, {"b": "a"}),
    # Another port on the same IP is another address.
    ({"a": (VIP, 5), "b": ("127.42.0.1:8889", 4)}, {"a", "b"}, {}),
]  # fmt: skip


@pytest.mark.parametrize(("claims", "served", "refused"), CONFLICT_CASES)
def test_resolve_conflicts(
    claims: dict[str, tuple[str, int]], served: set[str], refused: dict[str, str]
) -> None:
    views = {name: ServiceView(Endpoint(a, "tcp"), {}, c) for name, (a, c) in claims.items()}
    kept, conflicts = resolve_conflicts(views)
    assert set(kept) == served and all(kept[name] is views[name] for name in kept)
    assert conflicts == {
        name: Conflict(name, claims[name][0], holder) for name, holder in refused.items()
    }
    assert str(Conflict("b", VIP, "a")) == f"address {VIP} is also used by service a"


def test_the_next_claimant_takes_over_when_the_holder_goes_or_moves() -> None:
    a = ServiceView(TCP, ONE, created=1)
    b = ServiceView(Endpoint(VIP, "http"), {}, created=2)
    states, actions, conflicts = step({}, {}, {"a": a, "b": b}, None)
    assert set(states) == {"a"} and conflicts == {"b": Conflict("b", VIP, "a")}
    # a moves away: b is not in the update, but takes the address in the same step.
    moved = ServiceView(MOVED, ONE, created=1)
    states, actions, conflicts = step(states, conflicts, {"a": moved, "b": b}, ["a"])
    assert conflicts == {}
    assert states["b"] == rejecting(Endpoint(VIP, "http")) and states["a"].endpoint == MOVED
    kinds = [(action.service, action.kind) for action in in_phase_order(actions)]
    assert ("b", A.INSTALL_REJECT) in kinds and ("a", A.REMOVE_RULE) in kinds
    # a comes back to the address: its spec is older, so it wins the address back.
    states, actions, conflicts = step(states, conflicts, {"a": a, "b": b}, ["a"])
    assert set(states) == {"a"} and conflicts == {"b": Conflict("b", VIP, "a")}
    # a is removed: b takes over.
    states, actions, conflicts = step(states, conflicts, {"b": b}, ["a"])
    assert set(states) == {"b"} and conflicts == {}


_ADDRESSES = [VIP, OTHER_VIP, "127.42.0.3:80"]
_NAMES = ["a", "b", "c", "d"]

# One update: a service gets a view (address, protocol, has instances, created) or goes away.
_updates = st.lists(
    st.tuples(
        st.sampled_from(_NAMES),
        st.none()
        | st.tuples(
            st.sampled_from(_ADDRESSES),
            st.sampled_from(["tcp", "http"]),
            st.booleans(),
            st.integers(1, 6),
        ),
    ),
    min_size=1,
    max_size=25,
)


@given(_updates)
def test_no_two_services_ever_share_an_address_and_deltas_converge_on_a_reset(
    updates: list[tuple[str, tuple[str, str, bool, int] | None]],
) -> None:
    states: dict[str, ServiceState] = {}
    conflicts: dict[str, Conflict] = {}
    wanted: dict[str, ServiceView] = {}
    for name, change in updates:
        if change is None:
            wanted.pop(name, None)
        else:
            address, protocol, live, created = change
            instances = {f"{name}-1": "127.0.0.1:10000"} if live else {}
            wanted[name] = ServiceView(Endpoint(address, protocol), instances, created)  # type: ignore[arg-type]
        states, _, conflicts = step(states, conflicts, wanted, [name])
        addresses = [state.endpoint.address for state in states.values() if state.endpoint]
        assert len(addresses) == len(set(addresses)), states
        assert set(states) | set(conflicts) == set(wanted)
        # Whatever the path, the state is what a fresh snapshot of the same views gives (but
        # for the protocol of a rejecting service, which keeps the one its rule was made for).
        fresh, _, fresh_conflicts = step({}, {}, wanted, None)
        assert _served(states) == _served(fresh) and conflicts == fresh_conflicts


def _served(states: dict[str, ServiceState]) -> dict[str, tuple[State, str, dict[str, str]]]:
    return {
        name: (state.state, state.endpoint.address if state.endpoint else "", dict(state.instances))
        for name, state in states.items()
    }
