"""The iptables adapter: reads what is installed, applies batches from :mod:`flux.balancer.rules`.

Theory of operation
-------------------
Every change is one ``iptables-restore --noflush --wait=N`` process fed a batch on stdin (one
process per batch, never one per rule: with a thousand services that is the difference between
milliseconds and minutes).  ``--noflush`` leaves every other chain alone; ``--wait`` queues
behind Docker or anyone else holding the xtables lock instead of failing.  What is installed is
read with one ``iptables-save`` (both tables, the chain *and* the jumps to it), so a sync
repairs rules or jumps that someone removed behind flux's back, and the next sync after a
failed one starts from the truth rather than from what flux believes it installed.  A caller
that has just read (a sync with ``read=True``, the default) may ask the following syncs to plan
from what that read plus flux's own batches left (``read=False``): with the nf_tables backend
the read costs as much as the batch, tens of milliseconds per thousand rules, which is most of
a one-service change.  Any failure, start, stop and cleanup forget that view, so the next sync
reads again.

Arguments are lists handed to ``exec`` (no shell); rule text comes from
:mod:`flux.balancer.rules`, which validates every value it renders.  Operations are serialised
by a lock: each is read-plan-apply, which must not interleave with another.

Failures raise :class:`IPTablesError` with one line: ``'<command>' failed: <stderr>``, control
characters replaced by spaces and cut to 200 characters, plus the batch line iptables-restore
complained about.  Sync durations go to the ``on_sync`` callable (the metrics code feeds
``flux_iptables_sync_seconds``) and to :attr:`IPTables.last_sync_seconds`; a sync or a
start (the chains' setup) that raises calls ``on_sync_failure``
(``flux_iptables_sync_failures_total``) before the error goes up, so rules that cannot be
brought in line (the balancer is restarted with backoff and tries again) show as a rising
counter, not only as log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import PurePath
from typing import Protocol

from flux.balancer.rules import (
    RuleSet,
    Snapshot,
    SyncPlan,
    applied,
    parse_save,
    plan_setup,
    plan_sync,
    plan_teardown,
    validate_chain,
)

__all__ = ["IPTables", "IPTablesError", "cleanup_command", "sanitize_output"]

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FAILED_LINE = re.compile(r"line (\d+) failed")
# Setup and teardown re-read and retry when something changed the tables in between.
_ATTEMPTS = 3


class IPTablesError(RuntimeError):
    """An iptables command failed; the message is one line for people."""


def sanitize_output(text: str, limit: int = 200) -> str:
    """Make command output fit on one log line: control characters become spaces, cut."""
    return _CONTROL.sub(" ", text.strip())[:limit]


class IPTables:
    """flux's chain in the nat and filter tables.  See the module docstring."""

    def __init__(
        self,
        chain: str,
        *,
        binary: str = "iptables",
        on_sync: Callable[[float], None] | None = None,
        on_sync_failure: Callable[[], None] | None = None,
        lock_wait: int = 10,
        timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chain = validate_chain(chain)
        self._save = binary + "-save"
        self._restore = binary + "-restore"
        self._on_sync = on_sync
        self._on_sync_failure = on_sync_failure
        self._lock_wait = lock_wait
        self._timeout = timeout
        self._clock = clock
        self._lock = asyncio.Lock()
        self.last_sync_seconds: float | None = None
        self.last_plan: SyncPlan | None = None
        # What the last read plus our own batches since left in the tables (None: read first).
        self._known: Snapshot | None = None

    # -- operations ------------------------------------------------------------------------

    async def start(self) -> None:
        """Remove whatever a previous run left, then create both chains with their jumps."""
        async with self._lock:
            self._known = None
            try:
                await self._set_up()
            except IPTablesError:
                if self._on_sync_failure is not None:
                    self._on_sync_failure()
                raise

    async def _set_up(self) -> None:
        for attempt in range(1, _ATTEMPTS + 1):
            snapshot = await self._snapshot()
            # One block per table: the leftover chain is flushed, old jumps go, new jumps are
            # inserted at the top — no moment with half a setup in a table.
            try:
                await self._apply(plan_setup(self.chain, snapshot))
                return
            except IPTablesError:
                # Someone changed a hook chain between our read and our batch (a jump we meant
                # to delete was gone): read again.  The last error is the answer.
                if attempt == _ATTEMPTS:
                    raise

    async def sync(self, desired: RuleSet, *, read: bool = True) -> SyncPlan:
        """Make the chains hold exactly ``desired``, in one batch; return what was done.

        ``read=False`` plans from what the previous read and the batches since left, if that
        is known (see the module docstring); otherwise, and by default, the tables are read.
        """
        async with self._lock:
            started = self._clock()
            snapshot = self._known if not read and self._known is not None else None
            self._known = None  # until this batch is known to have gone through
            try:
                if snapshot is None:
                    snapshot = await self._snapshot()
                plan = plan_sync(self.chain, snapshot, desired)
                if plan.batch:
                    await self._apply(plan.batch)
            except IPTablesError:
                if self._on_sync_failure is not None:
                    self._on_sync_failure()
                raise
            self._known = applied(self.chain, snapshot, plan) if plan.batch else snapshot
            elapsed = self._clock() - started
            self.last_sync_seconds = elapsed
            self.last_plan = plan
            if self._on_sync is not None:
                self._on_sync(elapsed)
            return plan

    async def stop(self) -> None:
        """Flush and delete both chains and every jump to them."""
        await self.cleanup()

    async def cleanup(self) -> bool:
        """Remove both chains and every jump to them, if present; True if anything was there.

        Used at shutdown and by ``fluxd cleanup`` after a crash.  Jumps are found by reading
        the tables (any rule whose target is the chain, in any chain, with any matches), so
        duplicates and legacy forms go too; if something changes the tables meanwhile, the
        read and the batch are repeated (bounded).
        """
        async with self._lock:
            self._known = None
            found = False
            for attempt in range(1, _ATTEMPTS + 1):
                snapshot = await self._snapshot()
                if snapshot.empty:
                    return found
                found = True
                try:
                    await self._apply(plan_teardown(self.chain, snapshot))
                except IPTablesError:
                    if attempt == _ATTEMPTS:
                        raise
            if not (await self._snapshot()).empty:
                raise IPTablesError(f"chain {self.chain} is still referenced after cleanup")
            return found

    async def installed(self) -> RuleSet:
        """The rules now in flux's chains, as read back from iptables."""
        return (await self.snapshot()).rules()

    async def snapshot(self) -> Snapshot:
        """flux's chains and the jumps to them, as read back from iptables."""
        async with self._lock:
            return await self._snapshot()

    # -- processes -------------------------------------------------------------------------

    async def _snapshot(self) -> Snapshot:
        return parse_save(await self._run(self._save, []), self.chain)

    async def _apply(self, batch: str) -> None:
        if batch:
            await self._run(self._restore, ["--noflush", f"--wait={self._lock_wait}"], stdin=batch)

    async def _run(self, binary: str, args: list[str], stdin: str | None = None) -> str:
        name = PurePath(binary).name
        # A stable language: error text is parsed (the failing line number) and logged.
        env = {**os.environ, "LC_ALL": "C"}
        try:
            process = await asyncio.create_subprocess_exec(
                binary,
                *args,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            raise IPTablesError(f"'{name}' could not be run: {exc.strerror or exc}") from None
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that arrives
            # as the process ends, and a balancer that fluxd stops would wait for updates forever.
            async with asyncio.timeout(self._timeout):
                out, err = await process.communicate(stdin.encode() if stdin is not None else None)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise IPTablesError(f"'{name}' failed: no answer within {self._timeout:g} s") from None
        except BaseException:
            # Cancelled mid-batch: reap the child so it is not left behind; the batch it was
            # given is applied or not as a whole per table.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            message = sanitize_output(err.decode(errors="replace") or f"exit {process.returncode}")
            found = _FAILED_LINE.search(message)
            if found is not None and stdin is not None:
                lines = stdin.splitlines()
                number = int(found.group(1))
                if 1 <= number <= len(lines):
                    message += f" (line {number}: {sanitize_output(lines[number - 1])})"
            raise IPTablesError(f"'{name}' failed: {message}")
        return out.decode(errors="replace")


class _HasChain(Protocol):
    @property
    def chain(self) -> str: ...


def cleanup_command(settings: _HasChain) -> int:
    """``fluxd cleanup``: remove the chain and jumps a crashed fluxd left; the exit status."""

    async def run() -> bool:
        return await IPTables(settings.chain).cleanup()

    try:
        removed = asyncio.run(run())
    except IPTablesError as exc:
        log.error("cleanup of iptables chain %s failed: %s", settings.chain, exc)
        return 1
    if removed:
        log.info("removed iptables chain %s and every jump to it", settings.chain)
    else:
        log.info("nothing to clean up: no iptables chain %s and no jump to it", settings.chain)
    return 0
