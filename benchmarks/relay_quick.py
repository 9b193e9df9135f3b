"""Quick relay measurement: splice engine vs the Python fallback, on loopback.

Not a test and not the benchmark suite: a throwaway probe of the data path alone.  This process
hosts a minimal listener (accept, connect to the backend, hand both sockets to the relay);
iperf3 (bulk, one stream) and wrk + nginx (small keep-alive responses) run as child processes.
The relay's CPU is this process's rusage (all threads, so the engine thread is included; the
children are not), reported per GB moved and per 1,000 requests.

    .venv/bin/python benchmarks/relay_quick.py [--relay splice python] [--gbytes 4] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import socket
import tempfile
import time
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import uvloop

from flux.relay import Relay, SpliceRelay, make_relay

LOOPBACK = "127.0.0.1"
STATS = False
OPTIONS: dict[str, dict[str, int]] = {}
BODY = "x" * 90  # with the status line and headers, a response of about 250 bytes


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def relayed(kind: str | None, backend_port: int) -> Any:
    """A front port relaying to the backend (kind None: the backend itself, for a baseline)."""
    if kind is None:
        yield backend_port, None
        return
    loop = asyncio.get_running_loop()
    relay: Relay = make_relay(kind, **OPTIONS.get(kind, {}))  # type: ignore[arg-type]
    await relay.start()
    listener = socket.create_server((LOOPBACK, 0), backlog=1024)
    listener.setblocking(False)

    async def accept_loop() -> None:
        while True:
            client, _ = await loop.sock_accept(listener)
            upstream = socket.socket()
            upstream.setblocking(False)
            await loop.sock_connect(upstream, (LOOPBACK, backend_port))
            relay.submit(client, upstream)

    task = asyncio.create_task(accept_loop())
    try:
        yield listener.getsockname()[1], relay
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        listener.close()
        await relay.close(grace=2.0)
        if STATS and isinstance(relay, SpliceRelay):
            print(f"        engine counters: {relay.engine.stats()}", flush=True)


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        tail = (out + err).decode()[-500:]
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {tail}")
    return out.decode()


async def bulk(kind: str | None, gbytes: float) -> dict[str, float]:
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        "iperf3", "-s", "-1", "-B", LOOPBACK, "-p", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(0.3)
    try:
        async with relayed(kind, port) as (front, _relay):
            cpu0, t0 = cpu_seconds(), time.monotonic()
            report = json.loads(await run(
                "iperf3", "-c", LOOPBACK, "-p", str(front), "-n", f"{int(gbytes * 1e9)}", "-J"
            ))
            wall, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
    finally:
        with suppress(ProcessLookupError):
            server.kill()
        await server.wait()
    moved = report["end"]["sum_received"]["bytes"]
    return {
        "gbit_s": report["end"]["sum_received"]["bits_per_second"] / 1e9,
        "cpu_s_per_gb": cpu / (moved / 1e9),
        "wall_s": wall,
    }


NGINX_CONF = """
worker_processes 1;
daemon off;
error_log stderr error;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port};
        location / {{ return 200 "{body}"; }}
    }}
}}
"""


async def small(kind: str | None, seconds: int, connections: int) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, host=LOOPBACK, port=port, body=BODY))
        server = await asyncio.create_subprocess_exec(
            "nginx", "-p", tmp, "-c", str(conf),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(0.3)
        try:
            async with relayed(kind, port) as (front, _relay):
                cpu0 = cpu_seconds()
                out = await run(
                    "wrk", "-t2", f"-c{connections}", f"-d{seconds}s",
                    f"http://{LOOPBACK}:{front}/",
                )
                cpu = cpu_seconds() - cpu0
        finally:
            with suppress(ProcessLookupError):
                server.terminate()
            await server.wait()
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"no Requests/sec in wrk output: {out}")
    rate = float(match.group(1))
    return {"req_s": rate, "cpu_ms_per_1k_req": 1e6 * cpu / (rate * seconds)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relay", nargs="+", default=["direct", "splice", "python"])
    parser.add_argument("--gbytes", type=float, default=4.0)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--skip", nargs="*", default=[], choices=["bulk", "small"])
    parser.add_argument("--stats", action="store_true", help="print the engine's counters")
    parser.add_argument("--pipe-size", type=int, default=1 << 20, help="splice engine pipes")
    args = parser.parse_args()
    global STATS
    STATS = args.stats
    OPTIONS["splice"] = {"pipe_size": args.pipe_size}
    for tool in ("iperf3", "wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"relay_quick: {tool} is not installed (make system installs it)")
    for name in args.relay:
        kind = None if name == "direct" else name
        line = [f"{name:>7}"]
        if "bulk" not in args.skip:
            b = await bulk(kind, args.gbytes)
            line.append(f"bulk {b['gbit_s']:6.2f} Gbit/s  relay CPU {b['cpu_s_per_gb']:.3f} s/GB")
        if "small" not in args.skip:
            s = await small(kind, args.seconds, args.connections)
            line.append(f"small {s['req_s']:9.0f} req/s  relay CPU "
                        f"{s['cpu_ms_per_1k_req']:.2f} ms/1k req")
        print("  |  ".join(line), flush=True)


if __name__ == "__main__":
    uvloop.run(main())
