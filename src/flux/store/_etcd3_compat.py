"""Everything etcd3-py needs to work here, in one place.

etcd3-py 0.1.6 (its last release) talks to etcd's JSON gateway over aiohttp.  Its asyncio
client has four problems on current aiohttp and etcd 3.4; each is fixed here, and
``tests/test_store_etcd.py`` checks every fix (against a real etcd where one is involved):

1. **Streaming calls fail.**  ``ModelizedStreamResponse.__anext__`` (watch, lease keep-alive)
   asks ``isinstance(resp, aiohttp.client._RequestContextManager)``, and aiohttp now defines
   that name as a parameterised generic (``_BaseRequestContextManager[ClientResponse]``),
   which ``isinstance`` rejects with a ``TypeError``.  Pointing etcd3-py's name at the
   unparameterised class restores the check (the one-line assignment below, applied on import).
2. **Streams drop messages.**  The same ``__anext__`` builds a new ``ResponseIter`` for every
   message, so when one read returns several messages (a burst of watch responses) all but the
   first are lost: 300 quick puts gave 17 watch events.  :class:`StreamResponse` keeps one
   framer per stream that carries the unread rest over to the next message.  The framer also
   raises errors sent in a stream (``{"error": ...}``, e.g. "transport is closing" when etcd
   stops) itself: etcd3-py looks for their code under the wrong name and fails with a
   ``KeyError`` instead.
3. **Decoding is slow.**  Every response is decoded through the swagger schema, whose nodes
   memoise attribute lookups with a helper that calls ``inspect.getfullargspec`` on every
   call, and build a new model class for every object: decoding a range of 2,000 keys took
   1-1.7 s of CPU, all of it blocking the event loop.  Caching both per schema node (their
   results never change) brings that under 0.1 s.
4. **The constructor blocks.**  ``AioClient.__init__`` asks the server for its version with a
   synchronous ``requests`` call (and warns when that fails), and it cannot do TLS with a CA
   file but no client certificate.  :class:`AioClient` below takes an SSL context, starts with
   a default version, and :meth:`AioClient.detect_version` asks with aiohttp.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import aiohttp.client
import etcd3
import etcd3.aio_client
import semantic_version
from etcd3.baseclient import BaseClient
from etcd3.errors import Etcd3StreamError, get_client_error
from etcd3.errors.go_grpc_codes import codeText
from etcd3.swagger_helper import SwaggerNode, SwaggerSpec
from etcd3.swaggerdefs import get_spec

__all__ = ["AioClient", "StreamResponse"]

# Fix 1: see the module docstring.
etcd3.aio_client._RequestContextManager = aiohttp.client._BaseRequestContextManager

# Fix 3: see the module docstring.  Both results depend only on the (interned) schema node.
_slow_node_attribute = getattr(SwaggerNode.__getattr__, "__wrapped__", SwaggerNode.__getattr__)
_slow_node_model = SwaggerNode.getModel


def _node_attribute(node: SwaggerNode, name: str) -> Any:
    cache = node.__dict__.setdefault("_flux_attributes", {})
    try:
        return cache[name]
    except KeyError:
        value = cache[name] = _slow_node_attribute(node, name)
        return value


def _node_model(node: SwaggerNode) -> Any:
    model = node.__dict__.get("_flux_model")
    if model is None:
        model = node.__dict__["_flux_model"] = _slow_node_model(node)
    return model


SwaggerNode.__getattr__ = _node_attribute
SwaggerNode.getModel = _node_model

# etcd's JSON gateway serves /v3 from 3.4 on (/v3beta before); 3.4 is what we support.
_DEFAULT_VERSION = "3.4.0"

# Characters that matter when finding where a JSON object ends.
_JSON_STRUCTURE = re.compile(rb'[{}"\\]')
_OPEN, _QUOTE, _BACKSLASH = ord("{"), ord('"'), ord("\\")


class _JsonFramer:
    """Cuts a stream of concatenated JSON objects into one object per call.

    The gateway ends each message with a newline, older ones with nothing; counting braces
    outside strings handles both.  What is left after an object stays for the next call, and
    the scan state survives between reads, so a large message is scanned once.
    """

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._buffer = bytearray()
        self._scanned = 0  # where scanning resumes
        self._depth = 0
        self._in_string = False

    def _end_of_message(self) -> int | None:
        skip_to = self._scanned
        for match in _JSON_STRUCTURE.finditer(self._buffer, self._scanned):
            position = match.start()
            if position < skip_to:
                continue  # the character after a backslash
            char = self._buffer[position]
            if self._in_string:
                if char == _BACKSLASH:
                    skip_to = position + 2
                elif char == _QUOTE:
                    self._in_string = False
            elif char == _QUOTE:
                self._in_string = True
            elif char == _OPEN:
                self._depth += 1
            else:  # closing brace
                self._depth -= 1
                if self._depth < 0:
                    raise Etcd3StreamError("unbalanced braces in stream", self._buffer, self._resp)
                if self._depth == 0:
                    return position + 1
        self._scanned = max(len(self._buffer), skip_to)
        return None

    async def next(self) -> bytes:
        """The next JSON object; StopAsyncIteration when the stream ends between objects."""
        while True:
            end = self._end_of_message()
            if end is not None:
                # Cut only after the scan: the regex holds a view of the buffer while it runs.
                message = bytes(self._buffer[:end]).strip()
                del self._buffer[:end]
                self._scanned = 0
                if message.startswith(b'{"error"'):
                    raise _stream_error(message, self._resp)
                return message
            chunk = await self._resp.content.readany()
            if not chunk:
                if bytes(self._buffer).strip():
                    raise Etcd3StreamError("stream ended mid-message", self._buffer, self._resp)
                raise StopAsyncIteration
            self._buffer += chunk


def _stream_error(message: bytes, resp: aiohttp.ClientResponse) -> Exception:
    """The exception for an error sent in a stream (fix 2)."""
    try:
        error = json.loads(message).get("error")
    except ValueError:
        error = None
    exc: Exception
    if not isinstance(error, dict):
        exc = Etcd3StreamError("undecodable error in stream", message, resp)
        return exc
    # Stream errors name their code "grpc_code", which etcd3-py reads as "code".
    code = error.get("grpc_code", error.get("code"))
    exc = get_client_error(
        str(error.get("message") or "error in stream"),
        code if isinstance(code, int) and code in codeText else 2,
        error.get("http_code"),
        resp,
    )
    return exc


class StreamResponse(etcd3.aio_client.ModelizedStreamResponse):  # type: ignore[misc]
    """etcd3-py's stream response with one framer per stream (fix 2)."""

    @property
    def resp_iter(self) -> _JsonFramer:
        framer: _JsonFramer | None = self.__dict__.get("_flux_framer")
        if framer is None:
            # Only reached after __anext__ has awaited the request, so resp is the response.
            framer = self.__dict__["_flux_framer"] = _JsonFramer(self.resp)
        return framer


class AioClient(etcd3.AioClient):  # type: ignore[misc]
    """etcd3-py's asyncio client without blocking calls, with any SSL context (fix 4)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        protocol: str,
        ssl_context: Any,
        timeout: aiohttp.ClientTimeout,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        # Skips AioClient.__init__ on purpose: it would build its own SSL context (client
        # certificates only) and its session.  BaseClient.__init__ calls _retrieve_version,
        # which is overridden below to do no I/O.
        BaseClient.__init__(
            self,
            host=host,
            port=port,
            protocol=protocol,
            timeout=timeout,
            username=username,
            password=password,
            server_version=_DEFAULT_VERSION,
            cluster_version=_DEFAULT_VERSION,
        )
        self.protocol = protocol
        self.ssl_context = ssl_context
        connector = aiohttp.TCPConnector(limit=30, ssl=ssl_context if ssl_context else True)
        self.session = aiohttp.ClientSession(connector=connector)

    def _retrieve_version(self) -> None:
        self.server_version_sem = semantic_version.Version(self.server_version)
        self.cluster_version_sem = semantic_version.Version(self.cluster_version)

    async def detect_version(self) -> str:
        """Ask the server for its version and use the matching API prefix and schema."""
        # The client's timeout, as every other request has (call_rpc sets it): the session's
        # own default is 5 minutes, so a member that accepts connections but never answers
        # (hung, stopped) would hold up the failover to the next endpoint that long.
        url = self._url("/version", prefix=False)
        async with self.session.get(url, timeout=self.timeout) as resp:
            resp.raise_for_status()
            data = await resp.json(content_type=None)
        version = str(data["etcdserver"])
        self.server_version = version
        self.cluster_version = str(data.get("etcdcluster") or version)
        self._retrieve_version()
        self._verify_version()
        self._get_prefix()
        self.api_spec = SwaggerSpec(get_spec(self.server_version))
        return version

    def _modelizeStreamResponse(  # etcd3-py's name
        self, method: str, resp: Any, decode: bool = True
    ) -> StreamResponse:
        return StreamResponse(self, method, resp, decode)
