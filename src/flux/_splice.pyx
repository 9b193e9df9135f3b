# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""flux's relay engine: a native thread relaying socket pairs with epoll and splice(2).

The module's face.  Every type, and every function one room calls in another, is declared in
_splice.pxd (cimported automatically); the rooms below hold the code, one concern each, and
may be read in any order:

- ``_http_framer.pxi``: the HTTP/1.x framer, a pure observer of relayed bytes that finds
  message boundaries, methods, statuses and timings (and its test probe, HttpFramerProbe).
- ``_h2_observer.pxi``: the HTTP/2 observer, likewise for connections that open with the
  HTTP/2 preface: frame headers, header blocks through libnghttp2's HPACK decoder, one
  exchange per stream (and its probe, H2ObserverProbe).
- ``_relay_pipes.pxi``: the pipe pool and the copy buffers lent to a direction in flight.
- ``_relay_conn.pxi``: a connection's life: registering, finishing, aborting, retiring.
- ``_relay_connect.pxi``: the engine connecting the upstream itself, and its timeouts.
- ``_relay_moves.pxi``: the data path: the four moves (send, splice out of the pipe, splice
  into it, recv) and the copy/splice policy above them.
- ``_relay_steer.pxi``: steering new connections by CPU: pinning a shard's thread and the
  reuseport group's BPF program that picks the shard of the CPU a connection arrived on.
- ``_relay_loop.pxi``: the engine thread's epoll loop and the publication of its results.
- ``_relay_accept.pxi``: the engine accepting a service's clients itself: picking from the
  pool's snapshot, connecting, counting, handing the unusual back to the asyncio side.
- ``_relay_http.pxi``: what the engine does for HTTP services: shows relayed bytes to the
  framer, times exchanges, answers malformed requests and enforces the HTTP timeouts.
- ``_relay_forwarded.pxi``: a --forwarded service's request heads rewritten on their way
  out (X-Forwarded-For, -Proto, -Host).
- ``_relay_notice.pxi``: what an HTTP connection's data path did on its own (an answer, a
  timeout, a switch, exchanges cut short), queued as small records for fluxd's log lines.
- ``_relay_api.pxi``: the Python face, SpliceEngine, and the records it returns.

The latency histogram the metrics record into is its own module, flux._histogram: the engine
only hands exchange timings to Python, which records them.
"""

# Theory of operation
# -------------------
# The asyncio side accepts, then hands the client to the engine with the upstream's address
# (connect(): the engine makes the upstream socket and connects it; see _relay_connect.pxi), or
# both sockets already connected (add()), or hands the engine a listening socket to accept on
# itself (listen(); see _relay_accept.pxi).  A hand-over only allocates the connection's C
# record and pushes it onto a mutex-protected submission list; an eventfd ("wake") registered
# in the engine's epoll tells the engine thread to take the list.  From then on the engine
# thread alone owns the record and the descriptors (who writes which field: _splice.pxd),
# until the record comes back as a completion through drain_all().  Each room's header says
# the rest for its part.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport abort, calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove

from flux._sys cimport *

include "_http_framer.pxi"
include "_h2_observer.pxi"
include "_relay_pipes.pxi"
include "_relay_conn.pxi"
include "_relay_connect.pxi"
include "_relay_moves.pxi"
include "_relay_steer.pxi"
include "_relay_loop.pxi"
include "_relay_accept.pxi"
include "_relay_http.pxi"
include "_relay_forwarded.pxi"
include "_relay_notice.pxi"
include "_relay_api.pxi"
