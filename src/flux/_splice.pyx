# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""flux's compiled data path.

One extension module so the relay engine can record into histograms without crossing a
module boundary.  The parts live in include files, each owning one concern:

- ``_histogram.pxi``: the HDR-style log-linear latency histogram (fixed memory, O(1) record
  without the GIL) that the metrics collectors turn into Prometheus summaries.
- ``_http.pxi``: the HTTP/1.x framer that observes relayed bytes to time each exchange.
- ``_relay.pxi``: the relay engine (native thread, epoll, splice(2) through pooled pipes).
- ``_relay_accept.pxi``: the engine accepting a service's clients itself: picking from the
  pool's snapshot, connecting, counting, handing the unusual back to the asyncio side.
- ``_relay_http.pxi``: what the engine does for HTTP services: shows relayed bytes to the
  framer, times exchanges, answers malformed requests and enforces the HTTP timeouts.
"""

include "_histogram.pxi"
include "_http.pxi"
include "_relay.pxi"
include "_relay_accept.pxi"
include "_relay_http.pxi"
