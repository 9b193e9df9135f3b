"""How long an iptables sync takes for 10, 100 and 1,000 services.

For each size, on a scratch chain ``FLUXB<hex>``: install every rule into the empty chain (one
batch), then change one service (forwarding -> rejecting: one DNAT out, one REJECT in), then a
sync with nothing to change (the read alone).  Each figure is the median of a few rounds.
Service addresses are in 127.42.0.0/16, DNAT targets 127.0.0.1: nothing leaves the machine.
The chain and its jumps are removed at the end, also on failure or Ctrl-C.

Run as root: ``.venv/bin/python benchmarks/iptables_sync.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import time

from flux.balancer.iptables import IPTables
from flux.balancer.rules import Interception, desired_rules

SIZES = (10, 100, 1000)
BRIDGE = "127.0.0.1"


def services(count: int, *, flipped: int | None = None) -> list[Interception]:
    """``count`` services, three in four forwarding; ``flipped`` names one to switch over."""
    result = []
    for n in range(count):
        forwarding = n % 4 != 3
        if n == flipped:
            forwarding = not forwarding
        result.append(
            Interception(
                f"svc{n}",
                f"127.42.{n // 250}.{n % 250 + 1}",
                80,
                listener_port=40000 + n if forwarding else None,
            )
        )
    return result


async def measure(chain: str, count: int) -> tuple[float, float, float]:
    tables = IPTables(chain)
    await tables.start()
    desired = desired_rules(chain, BRIDGE, services(count))
    changed = desired_rules(chain, BRIDGE, services(count, flipped=0))

    started = time.perf_counter()
    plan = await tables.sync(desired)
    install = time.perf_counter() - started
    assert plan.changes == count, plan.changes

    started = time.perf_counter()
    plan = await tables.sync(changed)
    change = time.perf_counter() - started
    assert plan.changes == 2, plan.changes

    started = time.perf_counter()
    plan = await tables.sync(changed)
    noop = time.perf_counter() - started
    assert plan.changes == 0, plan.changes

    await tables.stop()
    return install, change, noop


async def run(rounds: int) -> list[tuple[int, float, float, float]]:
    chain = f"FLUXB{secrets.token_hex(3)}"
    rows = []
    try:
        for count in SIZES:
            samples = [await measure(chain, count) for _ in range(rounds)]
            install, change, noop = (statistics.median(s[i] for s in samples) for i in range(3))
            rows.append((count, install, change, noop))
    finally:
        await IPTables(chain).cleanup()
    return rows


def describe_iptables() -> str:
    result = subprocess.run(["iptables", "--version"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (median)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    rows = asyncio.run(run(args.rounds))
    print(f"iptables sync time ({describe_iptables()}; median of {args.rounds} rounds)\n")
    print("| services | install from empty (ms) | one service switched (ms) | no change (ms) |")
    print("|---:|---:|---:|---:|")
    for count, install, change, noop in rows:
        print(f"| {count:,} | {install * 1000:.1f} | {change * 1000:.1f} | {noop * 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
