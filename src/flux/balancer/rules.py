"""The iptables rules flux wants, what is installed, and the batch that turns one into the other.

Theory of operation
-------------------
flux owns one chain, named by ``-chain`` (default ``FLUX``), in two tables:

- ``nat``: one DNAT rule per *forwarding* service, sending ``VIP:port`` to the service's
  listener on the bridge IP.  The chain is jumped to from the top of **PREROUTING**, which sees
  connections from containers (their packets arrive through the bridge, before routing), and of
  **OUTPUT**, which sees connections made by processes on the host itself (locally generated
  packets never traverse PREROUTING).  DNAT only happens on a connection's first packet;
  conntrack rewrites the rest, so changing a rule never disturbs established connections.
- ``filter``: one REJECT rule per *rejecting* service (no live instance), so clients get
  "connection refused" at once instead of waiting for a SYN that nobody answers.  The chain is
  jumped to from the top of **INPUT**, which sees packets to a local destination — a host
  client's VIP in 127.0.0.0/8 or a VIP routed as local — and of **FORWARD**, which sees
  containers' packets to a non-local VIP that the host would otherwise route onwards, and
  (beyond the original) of **OUTPUT**, which sees a host process's packets to a non-local VIP
  before they are routed out of the host: without it such a client's SYN would leave the
  machine instead of being refused.  REJECT
  is only valid in filter, and filter runs after nat, so a forwarding service's packets (already
  rewritten to the listener) never meet a REJECT for their VIP.

Jumps go to the *top* of the hook chains so flux sees its VIPs before Docker's or anyone's
catch-all rules.  Rules match ``-p tcp -d VIP --dport port`` only: flux never touches traffic
to any other destination.

Everything here is pure.  :func:`desired_rules` turns per-service decisions into rules written
exactly as ``iptables-save`` prints them, so the installed rules read back by
:func:`parse_save` compare equal to the desired ones and a sync without changes does nothing.
:func:`plan_sync` diffs the two as multisets (a duplicated leftover rule is deleted once per
copy) and renders an ``iptables-restore --noflush`` batch in which every addition, in both
tables, comes before every deletion: restore commits each table block on its own (with the
nf_tables backend too), so the order of the blocks is what keeps a service from being without a
rule while it switches between DNAT and REJECT.  :func:`plan_setup` and :func:`plan_teardown`
render start-up (remove leftovers, create the chains, jump to them) and shutdown.

Every value rendered into a batch is checked here again, although it comes from validated
models: the chain name against a strict pattern, IPs with :mod:`ipaddress`, ports as ints in
range, comments reduced to a safe alphabet.  Rules read back from the kernel are deleted using
the exact text ``iptables-save`` printed, never re-quoted by us.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import itertools
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "CHAIN_PATTERN",
    "HOOKS",
    "RESERVED_CHAINS",
    "InstalledRule",
    "Interception",
    "Rule",
    "RuleSet",
    "Snapshot",
    "SyncPlan",
    "Table",
    "TableSnapshot",
    "applied",
    "desired_rules",
    "parse_save",
    "plan_setup",
    "plan_sync",
    "plan_teardown",
    "render_batch",
    "sanitize_comment",
    "validate_chain",
]


class Table(enum.StrEnum):
    """The two iptables tables flux uses."""

    NAT = "nat"
    FILTER = "filter"


# Which built-in chains jump to ours, per table (see the module docstring for why these).
HOOKS: dict[Table, tuple[str, ...]] = {
    Table.NAT: ("PREROUTING", "OUTPUT"),
    # OUTPUT too (beyond the original): a host process connecting to a rejecting service whose
    # address is not local would otherwise send its SYN out of the host instead of being refused.
    Table.FILTER: ("FORWARD", "INPUT", "OUTPUT"),
}

# The arguments of one rule after ``-A <chain>``, as iptables-save prints them.
Rule = tuple[str, ...]

# iptables allows 28 characters; the same pattern as the -chain flag (flux.config), so a name
# the configuration accepts is never refused here.
CHAIN_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,27}")
# Names iptables refuses for a new chain ("chain name may not clash with target name") or that
# belong to the kernel, to target extensions or to Docker: setup flushes our chain and cleanup
# deletes it, which would wreck any of these (the -chain flag is checked against the same set).
# fmt: off
RESERVED_CHAINS = frozenset({
    "INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING",
    "ACCEPT", "DROP", "QUEUE", "RETURN", "ERROR", "STANDARD",
    "AUDIT", "CHECKSUM", "CLASSIFY", "CLUSTERIP", "CONNMARK", "CONNSECMARK", "CT", "DNAT",
    "DSCP", "ECN", "HL", "HMARK", "IDLETIMER", "LED", "LOG", "MARK", "MASQUERADE", "NAT",
    "NETMAP", "NFLOG", "NFQUEUE", "NOTRACK", "RATEEST", "REDIRECT", "REJECT", "SECMARK", "SET",
    "SNAT", "SYNPROXY", "TCPMSS", "TCPOPTSTRIP", "TEE", "TOS", "TPROXY", "TRACE", "TTL", "ULOG",
})
# fmt: on
# Tokens we render ourselves must be plain words: nothing iptables-restore would split or
# unquote.
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.:/-]+")
_MAX_COMMENT = 64


def validate_chain(name: str) -> str:
    """Return ``name`` if it can serve as flux's chain, else raise ValueError saying why."""
    if not isinstance(name, str) or CHAIN_PATTERN.fullmatch(name) is None:
        raise ValueError(
            f"invalid chain name {name!r}: use 1-28 letters, digits, '_' or '-', "
            "not starting with '-'"
        )
    if name.upper() in RESERVED_CHAINS or name.upper().startswith("DOCKER"):
        raise ValueError(f"invalid chain name {name!r}: it belongs to iptables or Docker")
    return name


def _ipv4(value: object, what: str) -> str:
    try:
        ip = ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"invalid {what} {value!r}: not an IP address") from None
    if ip.version != 4:
        raise ValueError(f"invalid {what} {value!r}: iptables rules here are IPv4 only")
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"invalid {what} {value!r}: not a unicast address")
    return str(ip)


def _port(value: object, what: str) -> int:
    # bool is an int subclass; True is no port.
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"invalid {what} {value!r}: expected an integer 1-65535")
    return value


def sanitize_comment(text: str) -> str:
    """Reduce ``text`` to a comment iptables-restore and ``iptables -S`` pass through intact."""
    cleaned = re.sub(r"[^A-Za-z0-9_.:-]", "_", text)[:_MAX_COMMENT]
    return cleaned or "_"


@dataclass(frozen=True, slots=True)
class Interception:
    """One service address this host intercepts: DNAT to a listener, or REJECT.

    ``listener_port`` None means the service is rejecting (no live instance).
    """

    service: str
    vip: str
    port: int
    listener_port: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vip", _ipv4(self.vip, f"address of service {self.service!r}"))
        _port(self.port, f"port of service {self.service!r}")
        if self.listener_port is not None:
            _port(self.listener_port, f"listener port of service {self.service!r}")

    @property
    def forwarding(self) -> bool:
        """True for a DNAT rule, False for a REJECT rule."""
        return self.listener_port is not None


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Rules in flux's chain, per table.

    Compared as multisets: a sync appends what is missing and deletes what is extra, so the
    order in the chain is not controlled — which is fine while no two services share an
    address (the balancer's business, see :mod:`flux.balancer.services`).
    """

    nat: tuple[Rule, ...] = ()
    filter: tuple[Rule, ...] = ()

    def table(self, table: Table) -> tuple[Rule, ...]:
        """The rules of ``table``."""
        return self.nat if table is Table.NAT else self.filter


def desired_rules(chain: str, bridge_ip: str, interceptions: Iterable[Interception]) -> RuleSet:
    """The rules flux's chain should hold for ``interceptions``, as iptables-save prints them.

    Identical rules are kept once; the result is sorted so batches are reproducible.
    """
    validate_chain(chain)
    bridge = _ipv4(bridge_ip, "bridge IP")
    nat: set[Rule] = set()
    filter_: set[Rule] = set()
    for item in interceptions:
        rule = _rule_of(bridge, item)
        (nat if item.listener_port is not None else filter_).add(rule)
    return RuleSet(nat=tuple(sorted(nat)), filter=tuple(sorted(filter_)))


# Every sync renders every service's rule; between two syncs almost all of them are the same,
# so each is rendered once (with a thousand services, rendering was most of a sync's own CPU).
@functools.lru_cache(maxsize=1 << 16)
def _rule_of(bridge: str, item: Interception) -> Rule:
    # fmt: off
    match = (
        "-d", f"{item.vip}/32", "-p", "tcp", "-m", "tcp", "--dport", str(item.port),
        "-m", "comment", "--comment", sanitize_comment(item.service),
    )
    # fmt: on
    if item.listener_port is not None:
        return (*match, "-j", "DNAT", "--to-destination", f"{bridge}:{item.listener_port}")
    return (*match, "-j", "REJECT", "--reject-with", "icmp-port-unreachable")


# -- what is installed --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstalledRule:
    """A rule read back from iptables-save: its chain, arguments, and text after the chain."""

    chain: str
    args: Rule
    text: str


@dataclass(frozen=True, slots=True)
class TableSnapshot:
    """One table as far as flux is concerned."""

    chain_exists: bool = False
    rules: tuple[InstalledRule, ...] = ()
    # Rules in any other chain whose target is flux's chain (jumps or gotos).
    jumps: tuple[InstalledRule, ...] = ()

    def jumps_from(self, hook: str) -> tuple[InstalledRule, ...]:
        """The jumps to flux's chain that live in chain ``hook``."""
        return tuple(rule for rule in self.jumps if rule.chain == hook)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """flux's chain and the jumps to it, in both tables, as read from ``iptables-save``."""

    nat: TableSnapshot = field(default_factory=TableSnapshot)
    filter: TableSnapshot = field(default_factory=TableSnapshot)

    def table(self, table: Table) -> TableSnapshot:
        """The snapshot of ``table``."""
        return self.nat if table is Table.NAT else self.filter

    def rules(self) -> RuleSet:
        """The rules in flux's chains, without their text."""
        return RuleSet(
            nat=tuple(rule.args for rule in self.nat.rules),
            filter=tuple(rule.args for rule in self.filter.rules),
        )

    @property
    def empty(self) -> bool:
        """True when neither table holds the chain or a jump to it."""
        return not any(snap.chain_exists or snap.jumps for snap in (self.nat, self.filter))


# iptables-save writes an argument in double quotes when it contains anything unusual (a
# space, a dot in a comment ...), escaping '"' and '\\' with a backslash.
_SAVE_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"(?=\s|$)|(\S+)')
_ESCAPE = re.compile(r"\\(.)")


def _split(text: str) -> Rule:
    # A regex rather than shlex: shlex took 90 ms for a thousand rules, most of a sync.
    if '"' not in text:
        return tuple(text.split())
    return tuple(word or _ESCAPE.sub(r"\1", quoted) for quoted, word in _SAVE_TOKEN.findall(text))


def _targets(args: Rule, chain: str) -> bool:
    return any(
        arg in ("-j", "-g", "--jump", "--goto") and nxt == chain
        for arg, nxt in itertools.pairwise(args)
    )


@dataclass
class _TableParts:
    exists: bool = False
    rules: list[InstalledRule] = field(default_factory=list)
    jumps: list[InstalledRule] = field(default_factory=list)


def parse_save(text: str, chain: str) -> Snapshot:
    """Extract flux's chain and every jump to it from ``iptables-save`` output."""
    validate_chain(chain)
    tables: dict[str, _TableParts] = {}
    current: _TableParts | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], _TableParts())
        elif current is None:
            continue
        elif line.startswith(":"):
            if line[1:].split(" ", 1)[0] == chain:
                current.exists = True
        elif line.startswith("-A "):
            owner, _, rest = line[3:].partition(" ")
            rule = InstalledRule(owner, _split(rest), rest)
            if owner == chain:
                current.rules.append(rule)
            elif _targets(rule.args, chain):
                current.jumps.append(rule)

    def snap(table: Table) -> TableSnapshot:
        parts = tables.get(table.value, _TableParts())
        return TableSnapshot(parts.exists, tuple(parts.rules), tuple(parts.jumps))

    return Snapshot(nat=snap(Table.NAT), filter=snap(Table.FILTER))


# -- batches ------------------------------------------------------------------------------


def _render_rule(rule: Rule) -> str:
    for token in rule:
        if _SAFE_TOKEN.fullmatch(token) is None:
            raise ValueError(f"refusing to render iptables argument {token!r}")
    return " ".join(rule)


def render_batch(blocks: Iterable[tuple[Table, list[str]]]) -> str:
    """Render ``(table, lines)`` blocks as ``iptables-restore`` input; empty blocks are left out.

    A table may appear more than once: each block is committed on its own, in order.
    """
    out: list[str] = []
    for table, lines in blocks:
        if lines:
            out.extend([f"*{table}", *lines, "COMMIT"])
    return "\n".join(out) + "\n" if out else ""


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """What a sync changes, and the batch that does it (empty text: nothing to do)."""

    added: RuleSet
    deleted: RuleSet
    repaired: tuple[str, ...]
    batch: str

    @property
    def changes(self) -> int:
        """How many rules the plan adds and deletes."""
        return sum(
            len(part)
            for part in (self.added.nat, self.added.filter, self.deleted.nat, self.deleted.filter)
        )


def plan_sync(chain: str, snapshot: Snapshot, desired: RuleSet) -> SyncPlan:
    """Turn what ``snapshot`` holds into ``desired``: additions first, then deletions.

    A missing chain or a missing jump (someone flushed the tables behind our back) is
    recreated in the same batch and named in ``repaired``.
    """
    validate_chain(chain)
    adds: dict[Table, list[Rule]] = {}
    deletes: dict[Table, list[InstalledRule]] = {}
    add_blocks: list[tuple[Table, list[str]]] = []
    delete_blocks: list[tuple[Table, list[str]]] = []
    repaired: list[str] = []
    for table in Table:
        snap = snapshot.table(table)
        lines: list[str] = []
        if not snap.chain_exists:
            lines.append(f":{chain} - [0:0]")
            repaired.append(f"{table} chain {chain}")
        for hook in HOOKS[table]:
            if not snap.jumps_from(hook):
                lines.append(f"-I {hook} 1 -j {chain}")
                repaired.append(f"{table} jump from {hook}")
        wanted = Counter(desired.table(table))
        have = Counter(rule.args for rule in snap.rules)
        missing = wanted - have
        adds[table] = sorted(missing.elements())
        lines.extend(f"-A {chain} {_render_rule(rule)}" for rule in adds[table])
        add_blocks.append((table, lines))
        surplus = have - wanted
        deletes[table] = []
        for rule in snap.rules:
            if surplus[rule.args] > 0:
                surplus[rule.args] -= 1
                deletes[table].append(rule)
        delete_blocks.append((table, [f"-D {chain} {rule.text}" for rule in deletes[table]]))
    return SyncPlan(
        added=RuleSet(nat=tuple(adds[Table.NAT]), filter=tuple(adds[Table.FILTER])),
        deleted=RuleSet(
            nat=tuple(r.args for r in deletes[Table.NAT]),
            filter=tuple(r.args for r in deletes[Table.FILTER]),
        ),
        repaired=tuple(repaired),
        batch=render_batch([*add_blocks, *delete_blocks]),
    )


def applied(chain: str, snapshot: Snapshot, plan: SyncPlan) -> Snapshot:
    """What the tables hold once ``plan`` (made from ``snapshot``) has been applied.

    The adapter keeps this instead of reading the tables again before the next sync: with the
    nf_tables backend an ``iptables-save`` costs about as much as the batch (tens of
    milliseconds per thousand rules).  Rules added appear as rendered, which is how
    ``iptables-save`` prints them (see :func:`desired_rules`).
    """
    validate_chain(chain)
    tables: dict[Table, TableSnapshot] = {}
    for table in Table:
        snap = snapshot.table(table)
        gone = Counter(plan.deleted.table(table))
        rules: list[InstalledRule] = []
        for rule in snap.rules:
            if gone[rule.args] > 0:
                gone[rule.args] -= 1
            else:
                rules.append(rule)
        rules.extend(
            InstalledRule(chain, rule, _render_rule(rule)) for rule in plan.added.table(table)
        )
        jumps = list(snap.jumps)
        for hook in HOOKS[table]:
            if not snap.jumps_from(hook):
                jumps.insert(0, InstalledRule(hook, ("-j", chain), f"-j {chain}"))
        tables[table] = TableSnapshot(True, tuple(rules), tuple(jumps))
    return Snapshot(nat=tables[Table.NAT], filter=tables[Table.FILTER])


def plan_setup(chain: str, snapshot: Snapshot) -> str:
    """The batch that starts flux afresh: empty chains, each jumped to once from its hooks.

    Declaring the chain (``:CHAIN - [0:0]``) under ``--noflush`` creates it, or flushes a
    leftover of a previous run; every leftover jump to it is deleted — whatever its matches,
    which covers the legacy ``-i <bridge> -j CHAIN`` form and duplicates — and fresh jumps
    are inserted at the top.  Each table is one block, so it changes atomically.
    """
    validate_chain(chain)
    blocks: list[tuple[Table, list[str]]] = []
    for table in Table:
        snap = snapshot.table(table)
        lines = [f":{chain} - [0:0]"]
        lines.extend(f"-D {jump.chain} {jump.text}" for jump in snap.jumps)
        lines.extend(f"-I {hook} 1 -j {chain}" for hook in HOOKS[table])
        blocks.append((table, lines))
    return render_batch(blocks)


def plan_teardown(chain: str, snapshot: Snapshot) -> str:
    """The batch that removes flux's chains and every jump to them (empty: nothing to do)."""
    validate_chain(chain)
    blocks: list[tuple[Table, list[str]]] = []
    for table in Table:
        snap = snapshot.table(table)
        lines = [f"-D {jump.chain} {jump.text}" for jump in snap.jumps]
        if snap.chain_exists:
            # Flush first: a chain can only be deleted when empty and unreferenced.
            lines = [f"-F {chain}", *lines, f"-X {chain}"]
        blocks.append((table, lines))
    return render_batch(blocks)
