"""The store on etcd v3, through etcd3-py's asyncio client (etcd's JSON gateway).

Theory of operation
-------------------
**Connection.**  The store is given a list of endpoints.  The client is made on first use: the
first endpoint that answers ``/version`` is used, and whenever a request cannot reach the
endpoint in use (refused, reset, no answer within ``timeout``) the same request is tried on the
next one, once round the list.  When none answers the caller gets :class:`StoreUnavailable`
with one line naming each endpoint and what went wrong; etcd's own refusals become
:class:`StoreError`.  With a user name the client authenticates first, and again when etcd says
the token expired.  Every etcd3-py work-around lives in :mod:`flux.store._etcd3_compat`.

**The lease** (see :mod:`flux.store.base`).  The host-owned records this object has been asked
to keep are its *desired* state, a map from key to value.  Host-owned writes change that map
and, while a lease is held, etcd at once; one lock orders them against the keeper's full
rewrites, so a rewrite never resurrects a record removed meanwhile.  A write that cannot reach
etcd still changes the desired state, marks it *dirty* and raises; the keeper writes the whole
desired state (and retries the deletes that failed) on the next keep-alive.  ``run_lease``
grants a lease, writes everything in transactions, then keeps the lease alive every TTL/3 with
a one-shot keep-alive stream.  A keep-alive that finds the lease gone (TTL 0, "lease not
found") grants a new lease and rewrites; one that cannot reach etcd raises, and the next call
(the supervisor's retry) first tries to keep the old lease alive, so a short outage costs no
rewrite.

**Watches** take a snapshot (one range over ``service/``) and yield it as the reset; when
the consumer asks for more, they open a watch stream from the revision after the snapshot, so
no event falls between the two.  Events are grouped by revision and applied to a
:class:`~flux.store.keys.ServiceWatch`, so each update is the state at one revision, built
without reading etcd again.  A broken stream, or history compacted past the snapshot (a
consumer slow to ask), makes the watch take a new snapshot and yield a new reset.  After a
break it retries with backoff for ``watch_retry`` seconds before raising
:class:`StoreUnavailable`; only a first snapshot that fails raises at once.  A stream silent
for ``watch_idle`` seconds (10 by default) is checked with a ping (and dropped if requests
have moved to another endpoint), because a peer that vanished without closing the connection
would otherwise leave the watch waiting for ever while events are lost.  etcd's own progress
notifications would not do: it sends them every 10 minutes unless its operator says otherwise.
The ping reads one key, so checking often costs etcd little.  Closing the generator, or
cancelling the task iterating it, closes the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from etcd3.errors import ErrInvalidAuthToken, ErrLeaseNotFound, Etcd3Exception, Etcd3StreamError

from flux.model import Host, Rule, Service, ServiceInfo, encode_record
from flux.store._etcd3_compat import AioClient
from flux.store.base import NotFound, ServiceUpdate, StoreError, StoreUnavailable
from flux.store.keys import (
    HOSTS,
    PREFIX,
    PROMETHEUS_TARGETS,
    SERVICES,
    Follow,
    KeyEvent,
    Problems,
    ServiceTree,
    ServiceWatch,
    decode_hosts,
    decode_targets,
    rule_key,
    service_dir,
    spec_key,
)
from flux.store.leased import LeasedStore

__all__ = ["EtcdStore"]

log = logging.getLogger("flux.store")

_T = TypeVar("_T")

# gRPC's "Unavailable": no leader, server stopping, request timed out inside etcd.
_GRPC_UNAVAILABLE = 14

# What a request that never reached a working etcd raises.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    Etcd3StreamError,
    TimeoutError,
    OSError,
)

# What asking an endpoint for its version raises when it is not a working etcd.
_NOT_ETCD: tuple[type[BaseException], ...] = (
    *_CONNECTION_ERRORS,
    aiohttp.ClientResponseError,
    ValueError,
    KeyError,
)

# Pauses between attempts to take a watch up again after a break.
_WATCH_BACKOFF = 0.1
_WATCH_BACKOFF_MAX = 2.0
# A stream that lasted this long (seconds) was healthy: back off from the start after it.
_WATCH_STABLE = 10.0

# etcd allows 128 operations per transaction; stay well below.
_TXN_OPS = 64


@dataclass(frozen=True, slots=True)
class _Endpoint:
    url: str
    protocol: str
    host: str  # as etcd3-py puts it in a URL (IPv6 in brackets)
    port: int


def _parse_endpoint(text: str) -> _Endpoint:
    raw = text.strip()
    full = raw if "://" in raw else f"http://{raw}"
    problem = "expected http://HOST:PORT or https://HOST:PORT"
    try:
        parts = urllib.parse.urlsplit(full)
        port = parts.port or 2379
    except ValueError:
        raise StoreError(f"invalid etcd endpoint {text!r}: {problem}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise StoreError(f"invalid etcd endpoint {text!r}: {problem}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return _Endpoint(f"{parts.scheme}://{host}:{port}", parts.scheme, host, port)


def _ssl_context(
    endpoints: Sequence[_Endpoint], ca_file: str | None, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext | None:
    if not (ca_file or cert_file or any(e.protocol == "https" for e in endpoints)):
        return None
    if key_file and not cert_file:
        raise StoreError("an etcd key file needs a certificate file too")
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"cannot load the etcd TLS files: {exc}") from None
    return context


def _reason(exc: BaseException, timeout: float) -> str:
    """What went wrong with a connection, in a few words."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:.3g} s"  # a TTL/3 limit reads 3.33, not 3.33333
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.strerror:
        return str(exc.os_error.strerror)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, Etcd3StreamError):
        return f"bad stream ({exc.error})"
    if isinstance(exc, Etcd3Exception):
        return str(getattr(exc, "error", "") or type(exc).__name__)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _Resync(Exception):
    """The watch must start again from a new snapshot (the message says why).

    ``lived`` is how long the stream had been open, None if it never opened.
    """

    lived: float | None = None


class _LeaseGone(Exception):
    """etcd no longer knows the lease being written to."""


def _snapshot(response: Any) -> list[KeyEvent]:
    """The key-values of a range response, as put events."""
    return [
        KeyEvent(kv.key.decode("utf-8", "replace"), kv.value or b"", int(kv.create_revision or 0))
        for kv in response.kvs or []
    ]


def _key_events(events: Iterable[Any]) -> list[list[KeyEvent]]:
    """Watch events as key events, in groups of one revision each."""
    groups: list[list[KeyEvent]] = []
    revision = None
    for event in events:
        kv = event.kv
        deleted = getattr(event.type, "value", event.type) == "DELETE"
        key = kv.key.decode("utf-8", "replace")
        item = KeyEvent(key, None if deleted else (kv.value or b""), int(kv.create_revision or 0))
        if kv.mod_revision != revision or not groups:
            groups.append([])
            revision = kv.mod_revision
        groups[-1].append(item)
    return groups


class EtcdStore(LeasedStore):
    """Services, rules, instances and hosts in etcd v3, with this host's lease.

    ``endpoints`` is a list (or a comma-separated string) of ``http(s)://HOST:PORT``.  TLS uses
    ``ca_file`` to check the server and ``cert_file``/``key_file`` to identify this client.
    Every request gives up after ``timeout`` seconds.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        watch_retry: float = 15.0,
        watch_idle: float = 10.0,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [part for part in endpoints.split(",") if part.strip()]
        self._endpoints = [_parse_endpoint(text) for text in endpoints]
        if not self._endpoints:
            raise StoreError("no etcd endpoint given")
        if password is not None and username is None:
            raise StoreError("an etcd password needs a user name too")
        self._ssl = _ssl_context(self._endpoints, ca_file, cert_file, key_file)
        self._username = username
        self._password = password
        self._timeout = timeout
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=None
        )
        self._watch_retry = watch_retry
        self._watch_idle = watch_idle
        self._problems = Problems()
        self._client: AioClient | None = None
        self._reachable = False  # the last request got an answer (see reachable)
        self._current = 0
        self._connect_lock = asyncio.Lock()
        # Host-owned records and the lease; see the module docstring.
        self._desired: dict[str, str] = {}
        self._stale: set[str] = set()
        self._dirty = False
        self._lease: int | None = None
        self._owned_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()

    # -- connection ----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to now."""
        return self._endpoints[self._current].url

    def _why(self, exc: BaseException, index: int, timeout: float | None = None) -> str:
        """Endpoint ``index``, where the failed request went, and what went wrong there.

        The request's own endpoint, not the one in use now: a concurrent request may have
        failed over meanwhile, and the message would blame a member that did nothing.
        ``timeout`` is the request's time limit when it is not the store's.
        """
        limit = self._timeout if timeout is None else timeout
        return f"{self._endpoints[index].url}: {_reason(exc, limit)}"

    def _point(self, client: AioClient, index: int) -> None:
        endpoint = self._endpoints[index]
        self._current = index
        client.protocol = endpoint.protocol
        client.host = endpoint.host
        client.port = endpoint.port
        client.token = None  # simple tokens are per member

    async def _connected(self) -> AioClient:
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is not None:
                return self._client
            client = AioClient(
                host=self._endpoints[0].host,
                port=self._endpoints[0].port,
                protocol=self._endpoints[0].protocol,
                ssl_context=self._ssl,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                username=self._username,
                password=self._password,
            )
            # Closed on every way out but success, cancellation included: the client holds an
            # aiohttp session and its connector, which nothing else would ever close.
            try:
                failures = []
                for step in range(len(self._endpoints)):
                    index = (self._current + step) % len(self._endpoints)
                    self._point(client, index)
                    try:
                        await client.detect_version()
                    except _NOT_ETCD as exc:
                        failures.append(self._why(exc, index))
                        continue
                    except Etcd3Exception as exc:
                        raise StoreError(f"etcd at {self._why(exc, index)}") from None
                    self._client = client
                    return client
                raise StoreUnavailable("etcd is unreachable: " + "; ".join(failures))
            except BaseException:
                await client.close()
                raise

    @property
    def reachable(self) -> bool:
        return self._reachable

    async def _rpc(
        self,
        call: Callable[[AioClient], Awaitable[_T]],
        *,
        passthrough: tuple[type[BaseException], ...] = (),
        timeout: float | None = None,
    ) -> _T:
        """Run one request, failing over to the next endpoint when one cannot be reached.

        ``timeout`` is the time limit ``call`` gives its request when that is not the store's
        (for the error text).  Whether etcd answered (even with a refusal) is remembered for
        :attr:`reachable`.
        """
        try:
            result = await self._request(call, passthrough=passthrough, timeout=timeout)
        except StoreUnavailable:
            self._reachable = False
            raise
        except StoreError:
            self._reachable = True  # etcd answered, with a refusal
            raise
        except passthrough:
            self._reachable = True
            raise
        self._reachable = True
        return result

    async def _request(
        self,
        call: Callable[[AioClient], Awaitable[_T]],
        *,
        passthrough: tuple[type[BaseException], ...],
        timeout: float | None,
    ) -> _T:
        """:meth:`_rpc` without the bookkeeping."""
        client = await self._connected()
        failures = []
        for _ in range(len(self._endpoints)):
            index = self._current
            try:
                if self._username is not None and client.token is None:
                    await client.auth()
                try:
                    return await call(client)
                except ErrInvalidAuthToken:
                    if self._username is None:
                        raise
                    await client.auth()
                    return await call(client)
            except passthrough:
                raise
            except _CONNECTION_ERRORS as exc:
                failures.append(self._why(exc, index, timeout))
            except Etcd3Exception as exc:
                if getattr(exc, "code", None) != _GRPC_UNAVAILABLE:
                    raise StoreError(f"etcd at {self._why(exc, index, timeout)}") from None
                failures.append(self._why(exc, index, timeout))
            if self._current == index:  # a concurrent request may have moved on already
                self._point(client, (index + 1) % len(self._endpoints))
        raise StoreUnavailable("etcd is unreachable: " + "; ".join(failures))

    async def ping(self) -> None:
        await self._rpc(lambda c: c.range(PREFIX, count_only=True))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- definitions -----------------------------------------------------------------------

    async def add_service(self, name: str, spec: Service) -> None:
        key = spec_key(name)
        await self._rpc(lambda c: c.put(key, encode_record(spec)))

    async def remove_service(self, name: str) -> bool:
        prefix = service_dir(name)
        response = await self._rpc(lambda c: c.delete_range(prefix, prefix=True))
        return bool(response.deleted)

    async def remove_all_services(self) -> None:
        await self._rpc(lambda c: c.delete_range(SERVICES, prefix=True))

    async def get_service(
        self, name: str, *, rules: bool = False, instances: bool = False, known_hosts: bool = False
    ) -> ServiceInfo:
        if rules or instances:
            prefix = service_dir(name)
            response = await self._rpc(lambda c: c.range(prefix, prefix=True))
        else:
            key = spec_key(name)
            response = await self._rpc(lambda c: c.range(key))
        follow = Follow.of(rules=rules, instances=instances, known_hosts=known_hosts)
        events = _snapshot(response)
        if follow.hosts:
            # Read after the service: an instance seen there had its host record written no
            # later (the host record comes first on a lease), so this read sees it.
            events += _snapshot(await self._rpc(lambda c: c.range(HOSTS, prefix=True)))
        return ServiceTree.from_events(events, follow, self._problems).require(name)

    async def get_all_services(
        self, *, rules: bool = False, instances: bool = False, known_hosts: bool = False
    ) -> dict[str, ServiceInfo]:
        follow = Follow.of(rules=rules, instances=instances, known_hosts=known_hosts)
        # With hosts, one range over everything: services and hosts at one revision.
        prefix = PREFIX if follow.hosts else SERVICES
        response = await self._rpc(lambda c: c.range(prefix, prefix=True))
        return ServiceTree.from_events(_snapshot(response), follow, self._problems).services()

    async def set_rule(self, service: str, name: str, rule: Rule) -> None:
        spec = spec_key(service)
        key = rule_key(service, name)
        # One transaction, so a concurrent `rm` cannot leave a rule without its service.
        spec_exists = {"key": spec, "target": "CREATE", "result": "GREATER", "create_revision": 0}
        response = await self._rpc(
            lambda c: c.txn([spec_exists], [c.put(key, encode_record(rule), txn_obj=True)], [])
        )
        if not response.succeeded:
            raise NotFound(f"service {service!r} does not exist")

    async def remove_rule(self, service: str, name: str) -> bool:
        key = rule_key(service, name)
        response = await self._rpc(lambda c: c.delete_range(key))
        return bool(response.deleted)

    # -- host-owned records ------------------------------------------------------------------

    async def get_hosts(self) -> dict[str, Host]:
        response = await self._rpc(lambda c: c.range(HOSTS, prefix=True))
        return decode_hosts(
            ((kv.key, kv.value or b"") for kv in response.kvs or []), self._problems
        )

    async def get_prometheus_targets(self) -> dict[str, str]:
        response = await self._rpc(lambda c: c.range(PROMETHEUS_TARGETS, prefix=True))
        return decode_targets(
            ((kv.key, kv.value or b"") for kv in response.kvs or []), self._problems
        )

    async def _keep(self, key: str, value: str) -> None:
        async with self._owned_lock:
            self._desired[key] = value
            self._stale.discard(key)
            lease = self._lease
            if lease is None:
                return  # written when a lease is granted
            try:
                await self._rpc(
                    lambda c: c.put(key, value, lease=lease), passthrough=(ErrLeaseNotFound,)
                )
            except ErrLeaseNotFound:
                self._wake.set()  # the keeper finds the loss, grants a new lease, rewrites
            except StoreUnavailable:
                self._dirty = True
                raise

    async def _forget(self, key: str) -> None:
        async with self._owned_lock:
            self._desired.pop(key, None)
            try:
                await self._rpc(lambda c: c.delete_range(key))
            except StoreUnavailable:
                self._stale.add(key)
                self._dirty = True
                raise
            self._stale.discard(key)

    # -- the lease ----------------------------------------------------------------------------

    async def _keepalive(self, lease: int, timeout: float) -> int:
        """Refresh the lease once; its remaining TTL, 0 if etcd no longer has it."""
        body = b'{"ID":%d}' % lease
        request_timeout = aiohttp.ClientTimeout(total=timeout)

        async def call(client: AioClient) -> int:
            stream = client.call_rpc(
                "/lease/keepalive", data=body, stream=True, timeout=request_timeout
            )
            try:
                async for response in stream:
                    return int(response.TTL or 0)
                return 0
            finally:
                stream.close()

        try:
            ttl = await self._rpc(call, passthrough=(ErrLeaseNotFound,), timeout=timeout)
        except ErrLeaseNotFound:
            return 0
        if ttl > 0 and self._lease == lease:
            self._lease_refreshed()
        return ttl

    async def _write_all(self) -> None:
        """Write the whole desired state on the lease (lock held)."""
        lease = self._lease
        assert lease is not None
        puts = list(self._desired.items())
        deletes = list(self._stale)
        client = await self._connected()
        ops = [client.put(k, v, lease=lease, txn_obj=True) for k, v in puts]
        ops += [client.delete_range(k, txn_obj=True) for k in deletes]
        for start in range(0, len(ops), _TXN_OPS):
            batch = ops[start : start + _TXN_OPS]

            async def commit(c: AioClient, batch: list[Any] = batch) -> Any:
                return await c.txn([], batch, [])

            try:
                await self._rpc(commit, passthrough=(ErrLeaseNotFound,))
            except ErrLeaseNotFound:
                raise _LeaseGone from None
        self._stale.clear()
        self._dirty = False

    async def _establish(self, ttl: int) -> None:
        """Keep the lease held before, or grant one; write what is due (lock held)."""
        if (
            self._lease is not None
            and await self._keepalive(self._lease, min(self._timeout, ttl / 3)) <= 0
        ):
            log.warning("lease %x has expired; granting a new one", self._lease)
            self._drop_lease()
        if self._lease is None:
            response = await self._rpc(lambda c: c.lease_grant(ttl))
            self._lease = int(response.ID)
            self._lease_refreshed()
            self._dirty = True
            log.info("holding lease %x (TTL %d s)", self._lease, int(response.TTL or ttl))
        if self._dirty:
            await self._write_all()
        self._ready.set()

    async def run_lease(self, ttl: int) -> None:
        if ttl < 1:
            raise ValueError(f"invalid lease TTL {ttl!r}: must be at least 1 second")
        interval = ttl / 3
        while True:
            async with self._owned_lock:
                try:
                    await self._establish(ttl)
                except _LeaseGone:
                    self._drop_lease()
                    continue
            while True:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that races the event, and shutdown would wait on this keeper forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
                self._wake.clear()
                lease = self._lease
                if lease is None:
                    break  # revoked: hold a new one
                if await self._keepalive(lease, min(self._timeout, interval)) <= 0:
                    async with self._owned_lock:
                        if self._lease == lease:
                            log.warning(
                                "lease %x has expired; granting a new one and rewriting %d records",
                                lease,
                                len(self._desired),
                            )
                            self._drop_lease()
                    break
                if self._dirty:
                    async with self._owned_lock:
                        try:
                            if self._lease == lease:
                                await self._write_all()
                        except _LeaseGone:
                            self._wake.set()

    async def revoke_lease(self) -> None:
        async with self._owned_lock:
            lease = self._lease
            self._drop_lease()
            self._desired.clear()
            self._stale.clear()
            self._dirty = False
            self._wake.set()
            if lease is None:
                return
            with contextlib.suppress(ErrLeaseNotFound):
                await self._rpc(lambda c: c.lease_revoke(lease), passthrough=(ErrLeaseNotFound,))

    # -- watches ------------------------------------------------------------------------------

    def watch_services(
        self, *, rules: bool = False, instances: bool = False, known_hosts: bool = False
    ) -> AsyncGenerator[ServiceUpdate, None]:
        return self._watch_services(
            Follow.of(rules=rules, instances=instances, known_hosts=known_hosts)
        )

    async def _watch_services(self, follow: Follow) -> AsyncGenerator[ServiceUpdate, None]:
        watch = ServiceWatch(follow, self._problems)
        # Following hosts too means following the whole prefix (the metrics targets that come
        # with it are ignored): one snapshot and one stream, so both are at one revision.
        prefix = PREFIX if follow.hosts else SERVICES
        loop = asyncio.get_running_loop()
        give_up_at: float | None = None  # set while recovering from a break
        backoff = _WATCH_BACKOFF
        while True:
            try:
                response = await self._rpc(lambda c: c.range(prefix, prefix=True))
            except StoreUnavailable:
                if give_up_at is None or loop.time() >= give_up_at:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)
                continue
            revision = int(response.header.revision)
            yield watch.reset(_snapshot(response))
            try:
                # The stream starts after the snapshot's revision, so no event falls between.
                deltas = self._follow(prefix, revision + 1, watch)
                async with contextlib.aclosing(deltas) as updates:
                    async for update in updates:
                        yield update
            except _Resync as exc:
                log.warning("service watch: %s; taking a new snapshot", exc)
                if exc.lived is not None:
                    give_up_at = None  # it worked: a new break, a new window
                    if exc.lived >= _WATCH_STABLE:
                        backoff = _WATCH_BACKOFF
                if give_up_at is None:
                    give_up_at = loop.time() + self._watch_retry
                elif loop.time() >= give_up_at:
                    raise StoreUnavailable(f"service watch: {exc}") from None
                # Even a stream that keeps breaking at once is retried at a calm pace.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)

    async def _follow(
        self, prefix: str, start_revision: int, watch: ServiceWatch
    ) -> AsyncGenerator[ServiceUpdate, None]:
        """Updates from a watch stream starting at ``start_revision``; _Resync when it ends."""
        loop = asyncio.get_running_loop()
        client = await self._connected()
        endpoint = self._current
        stream = client.watch_create(
            prefix, prefix=True, start_revision=start_revision, timeout=self._stream_timeout
        )
        pending: asyncio.Future[Any] | None = None
        opened_at: float | None = None
        try:
            try:
                async with asyncio.timeout(self._timeout):  # not wait_for: see run_lease
                    await stream.__anext__()  # "created"
            except StopAsyncIteration:
                url = self._endpoints[endpoint].url
                raise _Resync(f"etcd at {url} closed a new watch") from None
            except (*_CONNECTION_ERRORS, Etcd3Exception) as exc:
                raise _Resync(f"cannot open a watch: {self._why(exc, endpoint)}") from None
            opened_at = loop.time()
            # The next read runs as a task, so a silent stream can be checked without
            # cancelling the read.
            pending = asyncio.ensure_future(stream.__anext__())
            while True:
                done, _ = await asyncio.wait({pending}, timeout=self._watch_idle)
                if not done:
                    await self._check_stream(endpoint)
                    continue
                try:
                    response = pending.result()
                except StopAsyncIteration:
                    raise _Resync("etcd closed the watch stream") from None
                except Exception as exc:  # whatever the read failed with, the stream is broken
                    raise _Resync(f"the watch stream broke: {self._why(exc, endpoint)}") from None
                pending = asyncio.ensure_future(stream.__anext__())
                if response.compact_revision:
                    raise _Resync(f"revision {response.compact_revision} was compacted")
                if response.canceled:
                    why = response.cancel_reason or "no reason given"
                    raise _Resync(f"etcd cancelled the watch: {why}")
                for events in _key_events(response.events or []):
                    update = watch.apply(events)
                    if update is not None:
                        yield update
        except _Resync as exc:
            exc.lived = None if opened_at is None else loop.time() - opened_at
            raise
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.wait({pending})
                if not pending.cancelled():
                    pending.exception()  # retrieved, so asyncio does not report it
            stream.close()

    async def _check_stream(self, endpoint: int) -> None:
        try:
            await self.ping()
        except StoreUnavailable as exc:
            raise _Resync(str(exc)) from None
        if self._current != endpoint:
            raise _Resync(f"requests moved to {self.endpoint}")

