"""The whole cluster in one answer: ``/status?scope=cluster`` and ``/status/history?scope=cluster``.

Theory of operation
-------------------
Each fluxd advertises its metrics endpoint in etcd (``prometheus-targets/<host IP>``, on its
lease, so a host that died drops out when its lease does).  The fluxd asked for the cluster
reads those records, asks every *other* host for the same document with ``scope`` left out
(so a host never fans out again) over plain HTTP GET, all at once, each with a short timeout
(:data:`TIMEOUT`, 1 s), and merges the answers with its own document, taken from memory.

:func:`merge` is pure: it lists every host once, sorted by address, the serving host
included, each either ``reachable`` with its document or ``reachable: false`` with one line
saying what went wrong (refused, timed out, an HTTP error, not JSON).  A host that does not
answer is therefore shown, never silently missing.  Each host's figures stay inside its own
document: a host's rates are what *that* fluxd relayed, and nothing is summed here.

:func:`ask_hosts` is the thin I/O around it (aiohttp).  A target the records cannot give
(etcd unreachable) leaves only the serving host, which :func:`merge` still lists.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = ["TIMEOUT", "HostAnswer", "ask_hosts", "merge", "one_line"]

TIMEOUT = 1.0
# A document bigger than this is refused rather than held (1,000 services are about 2 MB).
MAX_BODY = 64 << 20


@dataclass(frozen=True, slots=True)
class HostAnswer:
    """What one host gave: its document, or why there is none."""

    endpoint: str
    document: Mapping[str, Any] | None = None
    error: str | None = None


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line of at most ``limit`` characters (for an error shown per host)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _host_order(host: str) -> tuple[int, int, str]:
    """Sort hosts by address (IPv4 before IPv6, numerically), anything else after."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (2, 0, host)
    return (0 if ip.version == 4 else 1, int(ip), host)


def merge(now: float, answers: Mapping[str, HostAnswer]) -> dict[str, Any]:
    """``{"now": now, "hosts": [...]}``: every host of ``answers`` (by host address) once,
    sorted by address, reachable with its document or not with its error."""
    hosts = []
    for host in sorted(answers, key=_host_order):
        answer = answers[host]
        if answer.document is not None:
            hosts.append(
                {
                    "host": host,
                    "endpoint": answer.endpoint,
                    "reachable": True,
                    "status": answer.document,
                }
            )
        else:
            hosts.append(
                {
                    "host": host,
                    "endpoint": answer.endpoint,
                    "reachable": False,
                    "error": one_line(answer.error or "no answer"),
                }
            )
    return {"now": now, "hosts": hosts}


def _why(exc: BaseException, timeout: float) -> str:
    """One line for a failed request."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return f"cannot connect: {reason}"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"the answer is not JSON: {exc}"
    if isinstance(exc, ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _ask(
    session: aiohttp.ClientSession,
    endpoint: str,
    path: str,
    params: Sequence[tuple[str, str]],
    timeout: float,
) -> HostAnswer:
    url = f"http://{endpoint}{path}"
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url, params=params, allow_redirects=False) as response:
                response.raise_for_status()
                body = await response.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise ValueError(f"the answer is bigger than {MAX_BODY >> 20} MB")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("the answer is not a JSON object")
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, UnicodeDecodeError) as exc:
        return HostAnswer(endpoint, error=_why(exc, timeout))
    return HostAnswer(endpoint, document=document)


async def ask_hosts(
    targets: Mapping[str, str],
    path: str,
    params: Sequence[tuple[str, str]],
    *,
    timeout: float = TIMEOUT,
) -> dict[str, HostAnswer]:
    """GET ``path`` with ``params`` from every ``targets`` endpoint (host -> ``IP:port``) at
    once; each answers within ``timeout`` seconds or is counted as not answering."""
    if not targets:
        return {}
    hosts = sorted(targets)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout), headers={"Accept": "application/json"}
    ) as session:
        answers = await asyncio.gather(
            *(_ask(session, targets[host], path, params, timeout) for host in hosts)
        )
    return dict(zip(hosts, answers, strict=True))
