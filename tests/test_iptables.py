"""The iptables adapter against the real iptables (nf_tables backend; we are root).

Every test uses its own chain ``FLUXT<6 hex>`` and removes it, and every jump to it, in the
fixture's teardown whatever happened.  Service addresses are in 127.42.0.0/16 only and the
listener side is 127.0.0.1, so no packet can leave the machine even if a rule were wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
import socketserver
import subprocess
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator

import pytest

from flux.balancer.iptables import IPTables, IPTablesError, cleanup_command, sanitize_output
from flux.balancer.rules import HOOKS, Interception, RuleSet, Snapshot, desired_rules

pytestmark = pytest.mark.iptables

BRIDGE = "127.0.0.1"


def ipt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["iptables", "-w", "5", *args], capture_output=True, text=True, timeout=30, check=check
    )


def lines(table: str, chain: str) -> list[str]:
    return ipt("-t", table, "-S", chain).stdout.splitlines()


def mentions(chain: str) -> list[str]:
    save = subprocess.run(
        ["iptables-save"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return [line for line in save.splitlines() if chain in line.split()]


def remove_everything(chain: str) -> None:
    """Independent of the code under test: delete every rule naming the chain, then it."""
    for _ in range(50):
        found = False
        for table in ("nat", "filter"):
            for line in ipt("-t", table, "-S", check=False).stdout.splitlines():
                words = line.split()
                if line.startswith("-A ") and chain in words and words[1] != chain:
                    ipt("-t", table, "-D", *words[1:], check=False)
                    found = True
        if not found:
            break
    for table in ("nat", "filter"):
        ipt("-t", table, "-F", chain, check=False)
        ipt("-t", table, "-X", chain, check=False)
    assert mentions(chain) == [], f"could not clean up chain {chain}"


@pytest.fixture
def chain() -> Iterator[str]:
    name = f"FLUXT{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        remove_everything(name)


@pytest.fixture
async def started(chain: str) -> AsyncIterator[IPTables]:
    tables = IPTables(chain)
    await tables.start()
    yield tables


def vip() -> str:
    return f"127.42.{random.randrange(1, 255)}.{random.randrange(1, 255)}"


def assert_hooked_once_at_top(chain: str) -> None:
    for table, hooks in HOOKS.items():
        for hook in hooks:
            rules = [line for line in lines(table, hook) if line.startswith("-A ")]
            assert rules[0] == f"-A {hook} -j {chain}", (table, hook, rules)
            assert sum(chain in rule.split() for rule in rules) == 1, (table, hook, rules)


# -- start, sync, stop --------------------------------------------------------------------


async def test_start_creates_both_chains_jumped_to_from_the_top(started: IPTables) -> None:
    chain = started.chain
    assert lines("nat", chain) == [f"-N {chain}"]
    assert lines("filter", chain) == [f"-N {chain}"]
    assert_hooked_once_at_top(chain)
    assert await started.installed() == RuleSet()


async def test_sync_installs_exactly_the_desired_rules(chain: str) -> None:
    observed: list[float] = []
    started = IPTables(chain, on_sync=observed.append)
    await started.start()
    a, b = vip(), vip()
    desired = desired_rules(
        chain,
        BRIDGE,
        [Interception("hello", a, 80, listener_port=40001), Interception("web.b", b, 8080)],
    )
    plan = await started.sync(desired)
    assert plan.changes == 2 and plan.repaired == ()
    assert lines("nat", chain) == [
        f"-N {chain}",
        f"-A {chain} -d {a}/32 -p tcp -m tcp --dport 80 -m comment --comment hello "
        "-j DNAT --to-destination 127.0.0.1:40001",
    ]
    assert lines("filter", chain) == [
        f"-N {chain}",
        f'-A {chain} -d {b}/32 -p tcp -m tcp --dport 8080 -m comment --comment "web.b" '
        "-j REJECT --reject-with icmp-port-unreachable",
    ]
    assert await started.installed() == desired

    # Read back equal: the same desired set again changes nothing.
    again = await started.sync(desired)
    assert again.changes == 0 and again.batch == ""
    assert len(observed) == 2 and all(0 < seconds < 5 for seconds in observed)
    assert started.last_sync_seconds == observed[-1]

    # Switch both services over in one batch.
    swapped = desired_rules(
        chain,
        BRIDGE,
        [Interception("hello", a, 80), Interception("web.b", b, 8080, listener_port=40002)],
    )
    plan = await started.sync(swapped)
    assert plan.changes == 4
    assert await started.installed() == swapped
    assert_hooked_once_at_top(chain)

    assert (await started.sync(RuleSet())).changes == 2
    assert lines("nat", chain) == [f"-N {chain}"] and lines("filter", chain) == [f"-N {chain}"]


async def test_sync_repairs_what_someone_else_removed(started: IPTables) -> None:
    chain = started.chain
    desired = desired_rules(chain, BRIDGE, [Interception("svc", vip(), 80, listener_port=40001)])
    await started.sync(desired)
    ipt("-t", "nat", "-D", "OUTPUT", "-j", chain)
    ipt("-t", "nat", "-F", chain)
    plan = await started.sync(desired)
    assert plan.repaired == ("nat jump from OUTPUT",)
    assert plan.added == desired
    assert await started.installed() == desired
    assert_hooked_once_at_top(chain)


async def test_syncs_without_reading_plan_from_their_own_batches(started: IPTables) -> None:
    chain = started.chain
    dnat = Interception("a", vip(), 80, listener_port=40001)
    one = desired_rules(chain, BRIDGE, [dnat])
    both = desired_rules(chain, BRIDGE, [dnat, Interception("b", vip(), 80)])
    await started.sync(one)
    plan = await started.sync(both, read=False)
    assert plan.added == RuleSet(filter=both.filter) and plan.deleted == RuleSet()
    assert await started.installed() == both
    # What someone removes behind flux's back goes unseen without a read ...
    ipt("-t", "filter", "-F", chain)
    assert (await started.sync(both, read=False)).changes == 0
    # ... so a batch planned on it can fail; the sync after a failure reads again.
    with pytest.raises(IPTablesError):
        await started.sync(one, read=False)
    assert (await started.sync(one, read=False)).changes == 0
    assert await started.installed() == one
    # And a sync that reads repairs it.
    ipt("-t", "nat", "-F", chain)
    assert (await started.sync(one)).added == one


async def test_a_failed_sync_is_reported_and_not_timed(chain: str) -> None:
    synced: list[float] = []
    failures: list[None] = []
    tables = IPTables(chain, on_sync=synced.append, on_sync_failure=lambda: failures.append(None))
    await tables.start()  # the chain fixture removes what is left
    one = desired_rules(chain, BRIDGE, [Interception("a", vip(), 80)])
    await tables.sync(one)
    assert (len(synced), failures) == (1, [])
    # Rules removed behind flux's back make a batch planned without a read fail.
    ipt("-t", "filter", "-F", chain)
    with pytest.raises(IPTablesError):
        await tables.sync(RuleSet(), read=False)
    assert (len(synced), failures) == (1, [None])
    await tables.sync(RuleSet())
    assert (len(synced), failures) == (2, [None])


async def test_foreign_rules_with_awkward_comments_read_back_and_delete(
    started: IPTables,
) -> None:
    chain = started.chain
    comment = 'a "b" \\ c.d\'e'
    ipt(
        "-t",
        "filter",
        "-A",
        chain,
        "-d",
        "127.42.8.8/32",
        "-p",
        "tcp",
        "-m",
        "comment",
        "--comment",
        comment,
        "-j",
        "REJECT",
    )
    (rule,) = (await started.installed()).filter
    assert rule[rule.index("--comment") + 1] == comment
    plan = await started.sync(RuleSet())
    assert plan.deleted.filter == (rule,)
    assert lines("filter", chain) == [f"-N {chain}"]


async def test_concurrent_syncs_do_not_interleave(started: IPTables) -> None:
    chain = started.chain
    sets = [
        desired_rules(chain, BRIDGE, [Interception(f"s{n}", f"127.42.9.{n}", 80)])
        for n in range(1, 6)
    ]
    await asyncio.wait_for(asyncio.gather(*(started.sync(s) for s in sets)), 30)
    # Each sync read the result of the one before: exactly the last set is installed.
    assert await started.installed() == sets[-1]


async def test_a_cancel_that_meets_the_end_of_a_process_is_not_lost(
    chain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fluxd stops the balancer by cancelling it.  A wait_for around the process (3.11) returned
    # its output instead when the cancel came as it ended; the balancer then waited for updates
    # forever and the stop (a test's teardown too) never returned.
    real_communicate = asyncio.subprocess.Process.communicate
    operation: list[asyncio.Task[Snapshot]] = []

    async def communicate(self: asyncio.subprocess.Process, data: bytes | None = None):
        output = await real_communicate(self, data)
        operation[0].cancel()  # the stop arrives just as the process has finished
        return output

    monkeypatch.setattr(asyncio.subprocess.Process, "communicate", communicate)
    operation.append(asyncio.create_task(IPTables(chain).snapshot()))
    await asyncio.wait(operation, timeout=30)
    assert operation[0].cancelled()


async def test_stop_leaves_no_chain_and_no_jump(started: IPTables) -> None:
    chain = started.chain
    await started.sync(
        desired_rules(
            chain,
            BRIDGE,
            [Interception("a", vip(), 80, listener_port=40001), Interception("b", vip(), 81)],
        )
    )
    await started.stop()
    assert mentions(chain) == []
    assert ipt("-t", "nat", "-S", chain, check=False).returncode != 0
    assert ipt("-t", "filter", "-S", chain, check=False).returncode != 0
    # Stopping again (or cleaning up after a stop) is harmless.
    assert await started.cleanup() is False


async def test_start_removes_a_messy_leftover(chain: str) -> None:
    # What a crashed fluxd (or the original, which left the nat OUTPUT jump) could leave.
    for table, hooks in HOOKS.items():
        ipt("-t", table, "-N", chain)
        ipt(
            "-t",
            table,
            "-A",
            chain,
            "-d",
            "127.42.7.7/32",
            "-p",
            "tcp",
            "--dport",
            "1",
            "-j",
            "DNAT" if table == "nat" else "REJECT",
            *(["--to-destination", "127.0.0.1:9"] if table == "nat" else []),
        )
        for hook in hooks:
            ipt("-t", table, "-I", hook, "-j", chain)
            ipt("-t", table, "-I", hook, "-j", chain)
            if hook != "OUTPUT":  # -i is meaningless for locally generated packets
                ipt("-t", table, "-A", hook, "-i", "lo", "-j", chain)  # the legacy form
    tables = IPTables(chain)
    await tables.start()
    assert lines("nat", chain) == [f"-N {chain}"]
    assert lines("filter", chain) == [f"-N {chain}"]
    assert_hooked_once_at_top(chain)
    assert len(mentions(chain)) == 5  # the five jumps, nothing else


async def test_start_rereads_when_the_tables_change_under_it(chain: str) -> None:
    ipt("-t", "nat", "-N", chain)
    ipt("-t", "nat", "-A", "OUTPUT", "-j", chain)
    tables = IPTables(chain)
    real_snapshot = tables._snapshot
    reads = 0

    async def racing_snapshot() -> Snapshot:
        nonlocal reads
        reads += 1
        snapshot = await real_snapshot()
        if reads == 1:
            # Someone removes the leftover jump between our read and our batch: the batch's
            # delete fails for real, and start must read again rather than give up.
            ipt("-t", "nat", "-D", "OUTPUT", "-j", chain)
        return snapshot

    tables._snapshot = racing_snapshot  # type: ignore[method-assign]
    await tables.start()
    assert reads == 2
    assert_hooked_once_at_top(chain)


async def test_cleanup_removes_leftovers_and_reports_them(chain: str) -> None:
    ipt("-t", "nat", "-N", chain)
    ipt("-t", "nat", "-A", "PREROUTING", "-i", "lo", "-j", chain)
    ipt("-t", "nat", "-A", "OUTPUT", "-j", chain)
    ipt("-t", "nat", "-A", "OUTPUT", "-j", chain)
    ipt("-t", "filter", "-N", chain)
    ipt("-t", "filter", "-A", chain, "-d", "127.42.7.8/32", "-p", "tcp", "-j", "REJECT")
    tables = IPTables(chain)
    assert await tables.cleanup() is True
    assert mentions(chain) == []
    assert await tables.cleanup() is False


def test_cleanup_command_for_fluxd(chain: str, caplog: pytest.LogCaptureFixture) -> None:
    ipt("-t", "filter", "-N", chain)
    ipt("-t", "filter", "-I", "INPUT", "-j", chain)
    settings = types.SimpleNamespace(chain=chain)
    caplog.set_level(logging.INFO, logger="flux.balancer.iptables")
    assert cleanup_command(settings) == 0
    assert mentions(chain) == []
    assert f"removed iptables chain {chain}" in caplog.text
    assert cleanup_command(settings) == 0
    assert "nothing to clean up" in caplog.text


# -- real traffic -------------------------------------------------------------------------


class _Banner(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.server.banner)  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            data = self.request.recv(1024)
            self.request.sendall(data)


@contextlib.contextmanager
def banner_server(host: str, banner: bytes) -> Iterator[int]:
    server = socketserver.ThreadingTCPServer((host, 0), _Banner)
    server.daemon_threads = True
    server.banner = banner  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def exchange(host: str, port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    try:
        banner = await asyncio.wait_for(reader.readline(), 2)
        writer.write(b"ping")
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(4), 2)
        assert echoed == b"ping"
        return banner
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_host_clients_are_forwarded_and_rejected(started: IPTables) -> None:
    chain = started.chain
    address = vip()
    # A decoy listens on the VIP itself: without a rule, that is who answers.  With the DNAT
    # rule the real server behind 127.0.0.1 answers; with the REJECT rule nobody does.
    with (
        banner_server(address, b"decoy\n") as port,
        banner_server(BRIDGE, b"instance\n") as listener_port,
    ):
        assert await exchange(address, port) == b"decoy\n"

        forwarding = [Interception("svc", address, port, listener_port=listener_port)]
        await started.sync(desired_rules(chain, BRIDGE, forwarding))
        for _ in range(3):
            assert await exchange(address, port) == b"instance\n"

        await started.sync(desired_rules(chain, BRIDGE, [Interception("svc", address, port)]))
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.wait_for(asyncio.open_connection(address, port), 2)
            assert time.monotonic() - began < 1

        # Other ports of the same address are untouched by the rule.
        with banner_server(address, b"other\n") as other_port:
            assert await exchange(address, other_port) == b"other\n"

        await started.sync(desired_rules(chain, BRIDGE, forwarding))
        assert await exchange(address, port) == b"instance\n"

        await started.stop()
        assert await exchange(address, port) == b"decoy\n"


# -- errors -------------------------------------------------------------------------------


def test_sanitize_output() -> None:
    assert sanitize_output("x\n\ty") == "x  y"
    assert len(sanitize_output("a" * 1000)) == 200
    assert sanitize_output("\nline 3 failed\n") == "line 3 failed"


async def test_a_failed_batch_raises_one_line_naming_the_line(started: IPTables) -> None:
    batch = f"*nat\n-D {started.chain} -d 127.42.250.250/32 -j RETURN\nCOMMIT\n"
    with pytest.raises(IPTablesError) as info:
        await started._apply(batch)
    message = str(info.value)
    assert message.startswith("'iptables-restore' failed: ")
    assert "\n" not in message
    assert f"(line 2: -D {started.chain} -d 127.42.250.250/32 -j RETURN)" in message


async def test_a_missing_binary_is_a_clear_error(chain: str) -> None:
    failures: list[None] = []
    tables = IPTables(
        chain, binary="/nonexistent/iptables", on_sync_failure=lambda: failures.append(None)
    )
    with pytest.raises(IPTablesError, match=r"^'iptables-save' could not be run: "):
        await tables.start()
    assert failures == [None]  # a chain that cannot be set up counts as a failed sync


def test_the_chain_name_is_validated() -> None:
    with pytest.raises(ValueError, match="invalid chain name 'IN PUT'"):
        IPTables("IN PUT")


def test_only_loopback_addresses_are_used_here() -> None:
    # The network-safety rule of the suite, checked rather than trusted.
    for _ in range(100):
        assert socket.inet_aton(vip())[:2] == bytes([127, 42])
