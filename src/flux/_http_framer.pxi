# HTTP/1.x framing for the relay engine (included by _splice.pyx; its types are in _splice.pxd).
#
# Theory of operation
# ===================
#
# What it is.  A sans-I/O observer of one proxied HTTP/1.x connection.  The relay engine forwards
# the bytes itself, verbatim; it shows the framer what it forwards, in each direction, and the
# framer finds message boundaries and the facts the metrics need (method, status, when a request
# head and a response head completed, when a response ended).  A framing mistake can therefore
# cost a metric, never payload.  Everything here is pure: bytes and a caller-supplied monotonic
# "now" go in, events come out; no allocation, no system call, no GIL (`noexcept nogil`).
#
# Calling protocol (the engine's side).
#   hf_init(f, now)                     once per connection (f is fixed-size: no allocation);
#                                       `now`: when it opened (the first head is timed from it)
#   k = hf_feed(f, side, p, n, now, ev) show bytes; returns how many were taken (< n only when
#                                       `ev` is nearly full: drain it and call again with the
#                                       rest; or, on the request side, when hf_request_blocked)
#   hf_request_blocked(f)               HF_RING requests await their responses and the next
#                                       request would begin: show no request byte until a
#                                       response ends (keep the rest; see Pipelining)
#   hf_body_remaining(f, side)          bytes that may be forwarded *without* showing them (a
#                                       Content-Length body, the rest of a chunk, or everything
#                                       once the connection is opaque): the engine may splice them
#   hf_skip(f, side, n, now, ev)        account for n <= hf_body_remaining() spliced bytes
#   hf_eof(f, side, now, ev)            the source reached EOF (ends a close-delimited response;
#                                       on the response side, with requests unanswered, stops
#                                       following the request side: DEAD)
#   hf_request_phase(f), f.side[HF_REQUEST].t_head_start
#                                       what the idle / header-read timeouts need (below)
#   hf_unanswered(f), f.ring[(f.n_answered + i) % HF_RING], f.t_response_head
#                                       the exchanges a connection ending now cuts short: the
#                                       requests whose response has not ended (method, when
#                                       the head was read; the oldest one's response head was
#                                       read at f.t_response_head, 0 if not yet)
#   hf_open_head(f)                     where the request head being read began (UINT64_MAX:
#                                       not inside one): the engine forwards no byte of a head
#                                       before it is complete and judged
#   hf_pin_host(f)                      before any byte: the connection was routed by its
#                                       first request's Host (a published port shared by host
#                                       name), so a later request naming another host is
#                                       MALFORMED with status 421 (see Pinned host)
#   hf_report_heads(f)                  before any byte: emit a HEAD event for each request
#                                       head accepted (the engine rewrites them for
#                                       X-Forwarded-For: _relay_forwarded.pxi)
# `side` is HF_REQUEST (client -> instance bytes) or HF_RESPONSE (instance -> client).  Request
# bytes must be shown before they are forwarded, so that a response can never be seen before
# the request head it answers.  hf_skip and hf_eof need HF_EVENTS_RESERVE free event slots.
#
# Events (HfEvent, appended to HfEvents):
#   REQUEST    a request message ended (pos = request-stream offset just after it); informative
#   EXCHANGE   a response ended: method, status, t_request_head, t_response_head, t_response_end
#              (the `now` of the call that showed its last byte), pos = response-stream offset
#              just after it (the engine knows the response is fully written to the client once
#              it has written that many bytes), CLOSE (the connection is expected to close
#              after it), SWITCHED (101 to an Upgrade, or 2xx to CONNECT: both directions are
#              opaque from here on, the engine may relay blindly)
#   MALFORMED  the client sent a malformed request (pos = offset of the offending byte; status
#              = the error to answer: 400, 431 for a head over HF_MAX_HEAD, or 421 for a
#              host other than the pinned one).  Stop forwarding
#              client bytes from side[HF_REQUEST].msg_start on (where that request began).
#   REJECT     now write the error response (status) to the client and close; status 0 means
#              close without writing (the response stream cannot take it: close-delimited or
#              unobserved).  Comes once the responses to the requests before the malformed one
#              have ended (pos = response-stream offset after which the answer goes).
#   OPAQUE     observation stopped (reason): bytes keep flowing, metrics for the rest of the
#              connection are lost.  Malformed responses, responses nobody asked for, a broken
#              hf_skip contract, a connection that opened with the HTTP/2 preface (H2_PREFACE).
#   HEAD       (hf_report_heads only) a request head was read whole and accepted: start = the
#              request-stream offset of its first octet (the method's), pos = the offset just
#              after its empty line.  Comes before that request's REQUEST event, if both.
#
# Layers.  Two byte-level lexers (one per direction) share the field-line and chunked-body
# states; decisions about messages (which body, when an exchange completes, when to switch
# protocols) live in the *_done functions, which are the message-level state machine.
#
# HTTP/2 with prior knowledge (RFC 9113 section 3.3).  Such a client opens with the 24-octet
# preface "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" and at once its SETTINGS frame.  Read as HTTP/1.x
# the preface is a PRI request followed by a malformed one ("SM"), so the request stream
# starts in PREFACE instead, where octets are only compared with the preface: all 24 make the
# connection OPAQUE (reason H2_PREFACE) before any of them was judged; at the first octet that
# differs, the octets matched so far -- the preface's own, so nothing had to be kept -- are
# replayed through the HTTP/1.x readers, and then that octet.  The engine forwards what it
# shows, so an HTTP/2 connection is relayed untouched (frames are not followed: no metrics).
# An instance that speaks first (an HTTP/2 server sends its SETTINGS on accept) still makes
# the connection OPAQUE as "unsolicited" when its bytes are read before the client's.  Octets
# that match the preface are judged only once one differs: an HTTP/1.x request that is a
# prefix of it ("PRI * HTTP/2.0" and an empty line) is seen when the next octet comes.
#
# Byte-level states (a head is parsed as it streams, so nothing is buffered: the few facts
# needed are kept in fixed fields -- the first 8 bytes of the method, a 20-byte field name or
# list element, the 20 digits of the first Content-Length):
#
#   state         byte                 next / action
#   PREFACE       the preface's next   PREFACE; the 24th -> OPAQUE (where a request stream starts)
#                 any other            replay what matched from LINE_START, then this byte
#   LINE_START    CR | LF              LINE_START(_CR)   empty lines before a start line ignored
#                 other                request: METHOD; response: STATUS_VERSION (needs a
#                                      pending request, else OPAQUE "unsolicited")
#   METHOD        tchar / SP           METHOD / TARGET
#   TARGET        VCHAR / SP           TARGET / VERSION
#   VERSION       "HTTP/" DIGIT "." DIGIT              START_END
#   STATUS_VERSION "HTTP/" DIGIT "." DIGIT SP         STATUS
#   STATUS        3 DIGIT              STATUS_END (status >= 100)
#   STATUS_END    SP / CR / LF         REASON / START_CR / FIELD_START
#   REASON        SP HT field-vchar    REASON; CR / LF -> START_CR / FIELD_START
#   START_END     CR / LF              START_CR / FIELD_START
#   FIELD_START   CR / LF              FIELD_END_CR / section done
#                 SP HT (obs-fold)     request: malformed; response: FOLD unless the field
#                                      folded is one the framer reads (then OPAQUE)
#                 tchar                FIELD_NAME
#   FIELD_NAME    tchar / ":"          FIELD_NAME / FIELD_OWS (field identified)
#   FIELD_OWS     SP HT / field-vchar  FIELD_OWS / FIELD_VALUE
#   FIELD_VALUE   SP HT field-vchar    FIELD_VALUE (list elements of read fields scanned)
#   (any of them) CR -> FIELD_CR (LF must follow), LF -> field done, FIELD_START
#   CHUNK_SIZE    HEXDIG (1..20)       CHUNK_SIZE; ";" -> CHUNK_EXT; SP HT -> CHUNK_WS; CR
#   CHUNK_EXT     not CR, not LF       CHUNK_EXT; CR -> CHUNK_SIZE_LF
#   CHUNK_SIZE_LF LF                   CHUNK_DATA, or (size 0) the trailer section: FIELD_START
#   CHUNK_DATA    (skippable)          CHUNK_DATA_CR "\r" CHUNK_DATA_LF "\n" CHUNK_SIZE
#   BODY_LENGTH   (skippable)          message done when the Content-Length is used up
#   UNTIL_CLOSE   (skippable)          response body delimited by EOF
#   OPAQUE, DEAD, CLOSED               everything taken, nothing observed
# Any other byte is an error: malformed request, or OPAQUE on the response side.  A head
# (start line through the empty line), a trailer section and a chunk-size line may each be
# at most HF_MAX_HEAD bytes.
#
# Message-level decisions (RFC 9112 sections 6 and 9, RFC 9110 section 7.8):
#
#   request head done    Host: exactly one for HTTP/1.1, at most one otherwise
#                        Content-Length: digits (<= 20), exactly one value: a repeat or a list
#                        is refused even when the values agree (RFC 9110 section 8.6 lets a
#                        recipient refuse it or replace it by one value, and a byte-exact
#                        relay cannot replace it, so an instance would read what we did not)
#                        Transfer-Encoding: codings ending in a single "chunked"; not with
#                        Content-Length (smuggling), not in HTTP/1.0
#                        -> chunked | Content-Length | no body; the exchange is queued in a
#                        ring of HF_RING (never full here: see Pipelining)
#   response head done   1xx: 101 after an Upgrade request -> EXCHANGE + SWITCHED;
#                        101 otherwise -> OPAQUE; other 1xx are interim (100 Continue too)
#                        final: CONNECT + 2xx -> EXCHANGE + SWITCHED
#                        HEAD request, 204, 304 -> no body
#                        Transfer-Encoding ending in chunked (HTTP/1.1) -> chunked;
#                        other Transfer-Encoding -> until close
#                        Content-Length -> that many; repeats and lists must agree (as
#                        h11's), else OPAQUE as any other invalid value; none -> until close
#   keep-alive           HTTP/1.1 persists unless "Connection: close"; HTTP/1.0 closes unless
#                        "Connection: keep-alive"; either message closing closes (EXCHANGE CLOSE)
# A response's repeated or list Content-Length is followed, not refused: a response is the
# instance's, already on its way to the client as it is read (nothing can be answered in its
# place: malformed response framing makes the connection OPAQUE, never cuts it), and a client
# that accepts agreeing values reads the one length the framer follows; refusing would only
# cost the metrics of the rest of the connection.
# "Expect: 100-continue" needs nothing of its own: the 100 is an interim response like any 1xx
# (the exchange's roundtrip ends at the final head), and the request body keeps its framing
# whatever the server answers first -- a server that answers early reads the body or closes.
#
# Pipelining and protocol switches.  Request heads push onto the ring, responses pop from it
# in order; a response with nothing pending is unsolicited (OPAQUE).  After a request that may
# switch protocols (CONNECT, Upgrade), the bytes that follow are either the new protocol or the
# next request, and only the response tells which.  The request side parses on
# *speculatively* instead of buffering: a switch makes both sides opaque (the speculation is
# dropped), a refusal confirms it.  An error found while speculating is held back until the
# refusal confirms it, so new-protocol bytes never earn a 400.
#
# Deep pipelines: back-pressure, not overflow.  The ring holds what a response needs of its
# request (method: HEAD has no body; CONNECT and Upgrade: a switch; Connection: close), so a
# request that finds it full could only be given up on (the connection OPAQUE, every metric of
# it lost: 100 pipelined GETs counted 0) or guessed at.  Instead the framer does not take the
# first byte of a request while HF_RING are pending (hf_request_blocked): hf_feed returns
# short, the engine keeps the bytes it read but could not show and stops reading the client
# (the socket is edge-triggered and stays "readable" in the engine's flags, so nothing is
# lost), and resumes when a response ends and frees a slot.  Every exchange is then counted
# with its method and status.  Nothing is buffered beyond one read the engine already holds.
# It cannot deadlock where a direct connection would not: the instance answers pipelined
# requests one at a time (as HAProxy and nginx read them), so at any moment it needs only the
# request it works on, and the relay has forwarded up to HF_RING of them; a client that writes
# every request before it reads one response stalls the instance's writes, and then its own,
# exactly as it would against the instance directly (the socket buffers in between only grow).
#
# Timeouts (hf_request_phase; the engine and the Python relay enforce them).  OPENING: not one
# byte came since hf_init; the header-read timeout runs from t_head_start, the connection's
# opening, and ends it without an answer (a client that asked nothing is owed none: nginx
# closes such a connection silently, HAProxy does with "option http-ignore-probes", for the
# browsers' speculative pre-connects).  HEAD: inside a request head, or before the first
# request's start line (empty lines only); t_head_start is when the head's first byte came,
# but for the first request of a connection it stays its opening, as HAProxy's
# "timeout http-request" does; the answer is 408.  IDLE: between requests, nothing pending
# (the relay's idle timeout).  BUSY (a body arriving, a response awaited) and OPAQUE: none.
#
# Pinned host (hf_pin_host).  On a published port shared by host name, fluxd picks the service
# from the first request's Host before the connection reaches the relay; a later request on
# the same connection may name another host, which this connection's service may not serve.
# The framer keeps a 64-bit key of each request's Host value as the router compares it (FNV-1a
# of the octets in lower case, without OWS, without the ":port" -- an IPv6 literal keeps its
# "[...]" -- and without one trailing "."; no Host: key 0): the first head's key is pinned, and
# a later head with another key is MALFORMED (HF_ERR_MISDIRECTED) and answered 421 Misdirected
# Request like a 400 (RFC 9110 section 15.5.20: the client may retry on a new connection, where
# routing starts afresh).  Any other host is refused, even one the same service has: the
# framer knows the key, not the routes, and one connection per origin is what HTTP/1.1
# clients keep anyway.  A key collision would let a request through to the service the first
# one chose, never elsewhere.
#
# Deliberate differences from h11 (which the tests use as the oracle): empty lines before a
# start line are ignored (RFC 9112 section 2.2; h11 rejects them); obs-fold in a request is
# rejected (RFC 9112 section 5.2 allows either; h11 unfolds); Transfer-Encoding with Content-
# Length or in HTTP/1.0 is rejected (h11 lets Transfer-Encoding win); codings before a final
# "chunked" and Transfer-Encoding split over several lines are accepted (h11 only takes exactly
# "chunked"); a CR inside a chunk extension is rejected (h11 takes it); a request's repeated
# or list Content-Length is rejected even when the values agree (h11 takes it); trailer
# fields, and the framing fields of responses that cannot have a body, are not judged.
# `lenient` records which of the h11-stricter cases a side met, so that the differential tests
# can tell a deliberate difference from a bug.

from libc.stdint cimport UINT64_MAX, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from collections import namedtuple as _namedtuple

cdef extern from "<string.h>" nogil:
    const char *strchr(const char *s, int c)


# ---- character classes ---------------------------------------------------------------------

cdef uint8_t hf_class[256]
cdef const char *HF_HTTP_NAME = b"HTTP/"
# The HTTP/2 connection preface (RFC 9113 section 3.4), HF_H2_PREFACE_LEN octets.
cdef const char *HF_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


cdef uint8_t hf_class_of(int c) noexcept:
    cdef uint8_t k = 0
    cdef bint digit = 0x30 <= c <= 0x39
    cdef bint alpha = (0x41 <= c <= 0x5a) or (0x61 <= c <= 0x7a)
    if 0x21 <= c <= 0x7e:
        k |= HC_VCHAR
    if c != 0 and c != 9 and c != 10 and c != 11 and c != 12 and c != 13 and c != 32:
        k |= HC_FIELD
    if digit or alpha or (c != 0 and c < 128 and strchr(b"!#$%&'*+-.^_`|~", c) != NULL):
        k |= HC_TCHAR
    if digit:
        k |= HC_DIGIT
    if digit or (0x41 <= c <= 0x46) or (0x61 <= c <= 0x66):
        k |= HC_HEX
    if c == 0x20 or c == 0x09:
        k |= HC_WS
    return k


cdef int _hf_c
for _hf_c in range(256):
    hf_class[_hf_c] = hf_class_of(_hf_c)


cdef inline uint8_t hf_lower(uint8_t c) noexcept nogil:
    if 0x41 <= c <= 0x5a:
        return c + 32
    return c


cdef inline uint64_t hf_mul_add(uint64_t v, uint64_t base, uint64_t d) noexcept nogil:
    # Saturating: a length past 2**64 - 1 can never be used up anyway.
    if v > (UINT64_MAX - d) // base:
        return UINT64_MAX
    return v * base + d


cdef inline bint hf_is(const char *w, uint8_t n, const char *lit, uint8_t m) noexcept nogil:
    return n == m and memcmp(w, lit, m) == 0


cdef uint8_t hf_method_id(const char *w, uint8_t n) noexcept nogil:
    if hf_is(w, n, b"GET", 3):
        return HF_M_GET
    if hf_is(w, n, b"HEAD", 4):
        return HF_M_HEAD
    if hf_is(w, n, b"POST", 4):
        return HF_M_POST
    if hf_is(w, n, b"PUT", 3):
        return HF_M_PUT
    if hf_is(w, n, b"DELETE", 6):
        return HF_M_DELETE
    if hf_is(w, n, b"CONNECT", 7):
        return HF_M_CONNECT
    if hf_is(w, n, b"OPTIONS", 7):
        return HF_M_OPTIONS
    if hf_is(w, n, b"TRACE", 5):
        return HF_M_TRACE
    if hf_is(w, n, b"PATCH", 5):
        return HF_M_PATCH
    return HF_M_OTHER


# ---- events --------------------------------------------------------------------------------

cdef inline HfEvent *hf_event(HfEvents *out, uint8_t kind) noexcept nogil:
    cdef HfEvent *e = &out.ev[out.count]
    out.count += 1
    memset(e, 0, sizeof(HfEvent))
    e.kind = kind
    return e


cdef uint64_t HF_FNV_BASIS = 14695981039346656037ULL
cdef uint64_t HF_FNV_PRIME = 1099511628211ULL


cdef inline void hf_begin_message(HfSide *s) noexcept nogil:
    s.host_flags = 0
    s.host_key = HF_FNV_BASIS
    s.host_key_dot = HF_FNV_BASIS
    s.remaining = 0
    s.length = 0
    s.t_head_start = 0
    s.head_bytes = 0
    s.facts = 0
    s.status = 0
    s.idx = 0
    s.field = HF_F_NONE
    s.prev_field = HF_F_NONE
    s.trailer = 0
    s.version = 0
    s.method = HF_M_OTHER
    s.word_len = 0
    s.el_flags = 0
    s.cl_len = 0


cdef void hf_pin_host(HttpFramer *f) noexcept nogil:
    """Pin the connection to its first request's host (see Pinned host)."""
    f.pin_host = HF_PIN_FIRST


cdef void hf_report_heads(HttpFramer *f) noexcept nogil:
    """Report each request head accepted with a HEAD event (see Events)."""
    f.report_heads = 1


cdef void hf_init(HttpFramer *f, uint64_t now) noexcept nogil:
    """Start observing a new connection, opened at `now`."""
    memset(f, 0, sizeof(HttpFramer))
    hf_begin_message(&f.side[HF_REQUEST])
    hf_begin_message(&f.side[HF_RESPONSE])
    f.t_open = now
    f.side[HF_REQUEST].t_head_start = now
    f.side[HF_REQUEST].state = HS_PREFACE


cdef void hf_reject(HttpFramer *f, uint16_t status, HfEvents *out) noexcept nogil:
    cdef HfEvent *e = hf_event(out, HF_EV_REJECT)
    e.status = status
    e.pos = f.side[HF_RESPONSE].pos
    f.reject = 0
    f.mode = HF_MODE_DONE
    f.side[HF_REQUEST].state = HS_DEAD
    f.side[HF_RESPONSE].state = HS_DEAD


cdef void hf_opaque(HttpFramer *f, uint8_t reason, HfEvents *out) noexcept nogil:
    cdef HfEvent *e = hf_event(out, HF_EV_OPAQUE)
    e.reason = reason
    e.pos = f.side[HF_RESPONSE].pos
    f.mode = HF_MODE_OPAQUE
    f.side[HF_REQUEST].state = HS_OPAQUE
    f.side[HF_RESPONSE].state = HS_OPAQUE
    if f.reject:
        # The malformed request is still owed an answer, but the response stream can no
        # longer be followed: the engine closes instead.
        hf_reject(f, 0, out)
        f.mode = HF_MODE_OPAQUE


cdef void hf_malformed(HttpFramer *f, uint8_t reason, uint64_t pos, HfEvents *out) noexcept nogil:
    cdef HfEvent *e = hf_event(out, HF_EV_MALFORMED)
    e.reason = reason
    e.pos = pos
    e.status = (431 if reason == HF_ERR_HEAD_TOO_LARGE
                else 421 if reason == HF_ERR_MISDIRECTED else 400)
    f.side[HF_REQUEST].state = HS_DEAD
    f.reject = 1
    f.reject_status = e.status
    f.reject_reason = reason
    if f.n_answered == f.n_requests:
        hf_reject(f, f.reject_status, out)


cdef void hf_fail(HttpFramer *f, int side, uint8_t reason, HfEvents *out) noexcept nogil:
    """The byte just shown on `side` breaks the grammar (or a head breaks a rule)."""
    cdef HfSide *s = &f.side[side]
    if side == HF_RESPONSE:
        hf_opaque(f, reason, out)
    elif f.n_decided < f.spec_until:
        # Speculating past a CONNECT / Upgrade: these may be the new protocol's bytes.
        s.state = HS_DEAD
        if f.deferred_reason == HF_ERR_NONE:
            f.deferred_reason = reason
            f.deferred_pos = s.pos - 1
    else:
        hf_malformed(f, reason, s.pos - 1, out)


# ---- message-level decisions ---------------------------------------------------------------

cdef void hf_request_done(HttpFramer *f, HfEvents *out) noexcept nogil:
    """The request message ended (head, body and trailers)."""
    cdef HfSide *s = &f.side[HF_REQUEST]
    cdef uint64_t seq = f.n_requests - 1
    cdef HfExchange *x = &f.ring[seq % HF_RING]
    cdef HfEvent *e = hf_event(out, HF_EV_REQUEST)
    e.method = x.method
    e.pos = s.pos
    e.t_request_head = x.t_request_head
    if f.n_decided < f.spec_until:
        e.flags |= HFE_SPECULATIVE
    if (x.flags & (HFX_UPGRADE | HFX_CONNECT)) and seq >= f.n_decided:
        f.spec_until = seq + 1
    hf_begin_message(s)
    s.msg_start = s.pos
    s.state = HS_LINE_START


cdef bint hf_misdirected(HttpFramer *f, const HfSide *s) noexcept nogil:
    """The request head just read names another host than the connection's first (the first
    pins it).  See Pinned host."""
    cdef uint64_t key = 0
    if s.facts & HFF_HOST and s.host_flags & HFH_STARTED:
        key = s.host_key_dot if s.host_flags & HFH_DOT else s.host_key
    if f.pin_host == HF_PIN_FIRST:
        f.pinned_host = key
        f.pin_host = HF_PIN_SET
        return False
    return key != f.pinned_host


cdef void hf_request_head_done(HttpFramer *f, uint64_t now, HfEvents *out) noexcept nogil:
    cdef HfSide *s = &f.side[HF_REQUEST]
    cdef uint32_t facts = s.facts
    cdef HfExchange *x
    cdef HfEvent *e
    cdef uint8_t flags = 0
    if facts & HFF_CL_BAD:
        hf_fail(f, HF_REQUEST, HF_ERR_CONTENT_LENGTH, out)
        return
    if facts & HFF_CL_LIST:
        hf_fail(f, HF_REQUEST, HF_ERR_CONTENT_LENGTH_LIST, out)
        return
    if facts & HFF_HOST_TWICE or (s.version == 11 and not facts & HFF_HOST):
        hf_fail(f, HF_REQUEST, HF_ERR_HOST, out)
        return
    if f.pin_host != HF_PIN_OFF and hf_misdirected(f, s):
        hf_fail(f, HF_REQUEST, HF_ERR_MISDIRECTED, out)
        return
    if facts & HFF_TE:
        if (facts & HFF_TE_BAD or facts & HFF_TE_CHUNKED_TWICE
                or not facts & HFF_TE_CHUNKED_LAST):
            hf_fail(f, HF_REQUEST, HF_ERR_TRANSFER_ENCODING, out)
            return
        if facts & HFF_CL:
            hf_fail(f, HF_REQUEST, HF_ERR_TE_WITH_CL, out)
            return
        if s.version < 11:
            hf_fail(f, HF_REQUEST, HF_ERR_TE_HTTP10, out)
            return
    if facts & HFF_CLOSE or (s.version < 11 and not facts & HFF_KEEP_ALIVE):
        flags |= HFX_CLOSE
    if facts & HFF_UPGRADE:
        flags |= HFX_UPGRADE
    if s.method == HF_M_CONNECT:
        flags |= HFX_CONNECT
    x = &f.ring[f.n_requests % HF_RING]
    x.t_request_head = now
    x.method = s.method
    x.flags = flags
    f.n_requests += 1
    if f.report_heads:
        e = hf_event(out, HF_EV_HEAD)
        e.start = s.head_pos
        e.pos = s.pos
        e.method = s.method
    if facts & HFF_TE:
        s.state = HS_CHUNK_SIZE
        s.head_bytes = 0
        s.idx = 0
        s.remaining = 0
    elif facts & HFF_CL and s.length > 0:
        s.remaining = s.length
        s.state = HS_BODY_LENGTH
    else:
        hf_request_done(f, out)


cdef void hf_exchange_done(HttpFramer *f, uint64_t now, uint8_t flags,
                           HfEvents *out) noexcept nogil:
    """The response to the oldest pending request ended."""
    cdef HfSide *s = &f.side[HF_RESPONSE]
    cdef HfExchange *x = &f.ring[f.n_answered % HF_RING]
    cdef HfEvent *e = hf_event(out, HF_EV_EXCHANGE)
    e.method = x.method
    e.status = f.status
    e.t_request_head = x.t_request_head
    e.t_response_head = f.t_response_head
    e.t_response_end = now
    e.pos = s.pos
    if f.response_close or x.flags & HFX_CLOSE:
        flags |= HFE_CLOSE
    e.flags = flags
    f.n_answered += 1
    f.t_response_head = 0       # the next exchange's response head is not read yet
    hf_begin_message(s)
    s.state = HS_LINE_START
    if flags & HFE_SWITCHED:
        f.mode = HF_MODE_OPAQUE
        f.side[HF_REQUEST].state = HS_OPAQUE
        s.state = HS_OPAQUE
        if f.reject:
            hf_reject(f, 0, out)    # a request body broke before the switch: just close
            f.mode = HF_MODE_OPAQUE
    elif f.reject and f.n_answered == f.n_requests:
        hf_reject(f, f.reject_status, out)


cdef void hf_response_head_done(HttpFramer *f, uint64_t now, HfEvents *out) noexcept nogil:
    cdef HfSide *s = &f.side[HF_RESPONSE]
    cdef uint32_t facts = s.facts
    cdef HfExchange *x = &f.ring[f.n_answered % HF_RING]
    cdef uint16_t status = s.status
    cdef bint no_body = (status < 200 or status == 204 or status == 304
                         or x.method == HF_M_HEAD or (x.flags & HFX_CONNECT and status < 300))
    if no_body and (facts & (HFF_CL_BAD | HFF_TE_BAD | HFF_TE_CHUNKED_TWICE)
                    or (facts & HFF_TE and not facts & HFF_TE_CHUNKED_LAST)):
        s.lenient |= HFL_UNUSED_FRAMING     # framing fields that frame nothing are not judged
    if status < 200:
        if status != 101:
            # Interim (100 Continue, 103 Early Hints...): the final response follows.
            hf_begin_message(s)
            s.state = HS_LINE_START
            return
        if not x.flags & HFX_UPGRADE:
            hf_opaque(f, HF_ERR_UNEXPECTED_101, out)
            return
        f.n_decided += 1
        f.status = status
        f.t_response_head = now
        f.response_close = 0
        hf_exchange_done(f, now, HFE_SWITCHED, out)
        return
    f.n_decided += 1
    f.status = status
    f.t_response_head = now
    f.response_close = (facts & HFF_CLOSE or (s.version < 11 and not facts & HFF_KEEP_ALIVE))
    if x.flags & HFX_CONNECT and status < 300:
        hf_exchange_done(f, now, HFE_SWITCHED, out)
        return
    if f.deferred_reason != HF_ERR_NONE and f.n_decided >= f.spec_until:
        # The switch was refused: what the client sent after it was HTTP after all.
        hf_malformed(f, f.deferred_reason, f.deferred_pos, out)
        f.deferred_reason = HF_ERR_NONE
    if no_body:
        hf_exchange_done(f, now, 0, out)
    elif facts & HFF_TE:
        if facts & HFF_CL_BAD:
            s.lenient |= HFL_UNUSED_FRAMING     # Transfer-Encoding overrides Content-Length
        if (s.version >= 11 and facts & HFF_TE_CHUNKED_LAST and not facts & HFF_TE_BAD
                and not facts & HFF_TE_CHUNKED_TWICE):
            s.state = HS_CHUNK_SIZE
            s.head_bytes = 0
            s.idx = 0
            s.remaining = 0
        else:
            # RFC 9112 section 6.3: without a final chunked the body runs until close.
            s.lenient |= HFL_TE_FRAMING
            f.response_close = 1
            s.state = HS_UNTIL_CLOSE
    elif facts & HFF_CL_BAD:
        hf_opaque(f, HF_ERR_CONTENT_LENGTH, out)
    elif facts & HFF_CL:
        if s.length == 0:
            hf_exchange_done(f, now, 0, out)
        else:
            s.remaining = s.length
            s.state = HS_BODY_LENGTH
    else:
        f.response_close = 1
        s.state = HS_UNTIL_CLOSE


cdef void hf_body_done(HttpFramer *f, int side, uint64_t now, HfEvents *out) noexcept nogil:
    if side == HF_REQUEST:
        hf_request_done(f, out)
    else:
        hf_exchange_done(f, now, 0, out)


cdef void hf_section_done(HttpFramer *f, int side, uint64_t now, HfEvents *out) noexcept nogil:
    """The empty line ending a head or a trailer section."""
    cdef HfSide *s = &f.side[side]
    if s.trailer:
        hf_body_done(f, side, now, out)
    elif side == HF_REQUEST:
        hf_request_head_done(f, now, out)
    else:
        hf_response_head_done(f, now, out)


# ---- field values --------------------------------------------------------------------------

cdef void hf_element_done(HfSide *s) noexcept nogil:
    """One element of a comma-separated list in a field the framer reads."""
    cdef uint8_t n = s.word_len
    cdef uint8_t i
    cdef uint64_t v = 0
    if s.field == HF_F_CONTENT_LENGTH:
        if n == 0 or n > HF_WORD or s.el_flags & (HFE_L_BAD | HFE_L_NONDIGIT):
            s.facts |= HFF_CL_BAD
        elif s.facts & HFF_CL:
            s.facts |= HFF_CL_LIST
            if not hf_is(s.word, n, s.cl, s.cl_len):
                s.facts |= HFF_CL_BAD
        else:
            memcpy(s.cl, s.word, n)
            s.cl_len = n
            for i in range(n):
                v = hf_mul_add(v, 10, <uint8_t>s.word[i] - 0x30)
            s.length = v
            s.facts |= HFF_CL
    elif s.field == HF_F_TRANSFER_ENCODING:
        if n == 0 and not s.el_flags & HFE_L_PARAMS:
            return                  # empty list element
        if n == 0 or s.el_flags & HFE_L_BAD:
            s.facts |= HFF_TE_BAD
        elif hf_is(s.word, n, b"chunked", 7):
            if s.facts & HFF_TE_CHUNKED_SEEN:
                s.facts |= HFF_TE_CHUNKED_TWICE
            s.facts |= HFF_TE_CHUNKED_SEEN | HFF_TE_CHUNKED_LAST
        else:
            s.facts &= ~HFF_TE_CHUNKED_LAST
            s.lenient |= HFL_TE_LIST
        if s.el_flags & HFE_L_PARAMS:
            s.lenient |= HFL_TE_LIST
    elif s.field == HF_F_CONNECTION:
        if s.el_flags & HFE_L_BAD:
            return
        if hf_is(s.word, n, b"close", 5):
            s.facts |= HFF_CLOSE
        elif hf_is(s.word, n, b"keep-alive", 10):
            s.facts |= HFF_KEEP_ALIVE
    elif s.field == HF_F_UPGRADE:
        if n > 0:
            s.facts |= HFF_UPGRADE


cdef inline void hf_element_reset(HfSide *s) noexcept nogil:
    s.word_len = 0
    s.el_flags &= HFE_L_COMMA


cdef void hf_host_octet(HfSide *s, uint8_t c) noexcept nogil:
    """An octet of the Host value: into the key, as the router reads the host (see Pinned
    host; flux.balancer.entrypoints.normalise_request_host)."""
    if c == 0x20 or c == 0x09 or s.host_flags & HFH_PORT:
        return
    if c == 0x3a and not s.host_flags & HFH_BRACKET:    # ":" before the port
        s.host_flags |= HFH_PORT
        return
    if c == 0x5b and not s.host_flags & HFH_STARTED:    # "[": an IPv6 literal
        s.host_flags |= HFH_BRACKET
    elif c == 0x5d:
        s.host_flags &= ~HFH_BRACKET
    s.host_flags |= HFH_STARTED
    if c == 0x2e:
        s.host_key_dot = s.host_key
        s.host_flags |= HFH_DOT
    else:
        s.host_flags &= ~HFH_DOT
    s.host_key = (s.host_key ^ hf_lower(c)) * HF_FNV_PRIME


cdef void hf_value_octet(HfSide *s, uint8_t c) noexcept nogil:
    """An octet of a read field's value (leading whitespace already skipped)."""
    if s.field == HF_F_HOST:
        hf_host_octet(s, c)
        return
    if c == 0x2c:                   # ","
        hf_element_done(s)
        hf_element_reset(s)
        s.el_flags |= HFE_L_COMMA
    elif c == 0x20 or c == 0x09:
        if s.word_len > 0:
            s.el_flags |= HFE_L_WS
    elif s.field == HF_F_TRANSFER_ENCODING and (c == 0x3b or s.el_flags & HFE_L_PARAMS):
        s.el_flags |= HFE_L_PARAMS  # transfer-parameters are not needed
    else:
        if s.el_flags & HFE_L_WS:
            s.el_flags |= HFE_L_BAD
        if not hf_class[c] & HC_DIGIT:
            s.el_flags |= HFE_L_NONDIGIT
        if s.field == HF_F_TRANSFER_ENCODING and not hf_class[c] & HC_TCHAR:
            s.el_flags |= HFE_L_BAD
        if s.word_len < HF_WORD:
            s.word[s.word_len] = <char>hf_lower(c)
        if s.word_len < 255:
            s.word_len += 1


cdef void hf_field_start(HfSide *s, int side) noexcept nogil:
    """The field name ended (at ":"): decide whether its value matters."""
    cdef uint8_t n = s.word_len
    cdef uint8_t field = HF_F_OTHER
    if hf_is(s.word, n, b"content-length", 14):
        field = HF_F_CONTENT_LENGTH
    elif hf_is(s.word, n, b"transfer-encoding", 17):
        field = HF_F_TRANSFER_ENCODING
    elif hf_is(s.word, n, b"connection", 10):
        field = HF_F_CONNECTION
    elif side == HF_REQUEST:
        if hf_is(s.word, n, b"host", 4):
            field = HF_F_HOST
        elif hf_is(s.word, n, b"upgrade", 7):
            field = HF_F_UPGRADE
    if s.trailer:
        if field == HF_F_CONTENT_LENGTH or field == HF_F_TRANSFER_ENCODING:
            s.lenient |= HFL_TRAILER_FRAMING
        field = HF_F_OTHER
    elif field == HF_F_TRANSFER_ENCODING:
        if s.facts & HFF_TE:
            s.lenient |= HFL_TE_LIST
        s.facts |= HFF_TE
    s.field = field
    s.word_len = 0
    s.el_flags = 0


cdef void hf_field_done(HfSide *s) noexcept nogil:
    if s.field >= HF_F_CONTENT_LENGTH:
        hf_element_done(s)
        if s.field == HF_F_TRANSFER_ENCODING and s.el_flags & HFE_L_COMMA:
            s.lenient |= HFL_TE_LIST
        elif s.field == HF_F_HOST:
            if s.facts & HFF_HOST:
                s.facts |= HFF_HOST_TWICE
            s.facts |= HFF_HOST
    s.prev_field = s.field
    s.field = HF_F_NONE
    s.state = HS_FIELD_START


# ---- the byte-level lexer: one reader per state group ------------------------------------------
#
# hf_step hands each octet of a head, a chunk-size line or a trailer section to the reader of
# the group its state is in (the state enum in _splice.pxd keeps each group contiguous):
#
#   states                         reader               errors it names
#   PREFACE (hf_feed calls it)     hf_read_preface      none: H2_PREFACE is no error
#   LINE_START, LINE_START_CR      hf_read_line_start   START_LINE, UNSOLICITED
#   METHOD .. START_CR             hf_read_start_line   START_LINE
#   FIELD_START .. FOLD            hf_read_field_line   FIELD, OBS_FOLD
#   CHUNK_SIZE .. CHUNK_DATA_LF    hf_read_chunk_line   CHUNK, CHUNK_EXT_CR
#
# A reader returns HF_ERR_NONE when the octet fits (it has acted on it), else the error the
# octet makes, which hf_step reports with hf_fail (a malformed request, or an opaque response
# stream).  Every octet of a head also counts against HF_MAX_HEAD (HEAD_TOO_LARGE) before its
# reader sees it; octets before a start line do not.

cdef inline uint8_t hf_read_line_start(HttpFramer *f, int side, HfSide *s, uint8_t c,
                                       uint64_t now) noexcept nogil:
    """Octets before a start line: empty lines are skipped; any other octet begins a message
    (the state moves to METHOD or STATUS_VERSION, and the caller hands the same octet to the
    start-line reader).  The state is unchanged only when the octet was taken here."""
    if c == 0x0a:
        s.state = HS_LINE_START
        s.lenient |= HFL_EMPTY_LINE
        return HF_ERR_NONE
    if s.state == HS_LINE_START and c == 0x0d:
        s.state = HS_LINE_START_CR
        s.lenient |= HFL_EMPTY_LINE
        return HF_ERR_NONE
    if s.state == HS_LINE_START_CR:
        return HF_ERR_START_LINE
    hf_begin_message(s)
    s.head_pos = s.pos - 1
    # The first request's head is timed from the connection's opening (see Timeouts).
    s.t_head_start = f.t_open if side == HF_REQUEST and f.n_requests == 0 else now
    if side == HF_REQUEST:
        s.state = HS_METHOD
    else:
        if f.n_requests == f.n_answered:
            return HF_ERR_UNSOLICITED
        s.state = HS_STATUS_VERSION
    return HF_ERR_NONE


cdef inline uint8_t hf_read_start_line(HfSide *s, uint8_t c) noexcept nogil:
    """The request line (method, target, version) or the status line (version, status,
    reason), up to the line's end."""
    cdef uint8_t st = s.state
    cdef uint8_t k = hf_class[c]
    if st == HS_METHOD:
        if k & HC_TCHAR:
            if s.word_len < 8:
                s.word[s.word_len] = <char>c
            if s.word_len < 255:
                s.word_len += 1
            return HF_ERR_NONE
        if c == 0x20 and s.word_len > 0:
            s.method = hf_method_id(s.word, s.word_len)
            s.word_len = 0
            s.state = HS_TARGET
            return HF_ERR_NONE
    elif st == HS_TARGET:
        if k & HC_VCHAR:
            s.idx = 1
            return HF_ERR_NONE
        if c == 0x20 and s.idx:
            s.idx = 0
            s.state = HS_VERSION
            return HF_ERR_NONE
    elif st == HS_VERSION or st == HS_STATUS_VERSION:
        if s.idx < 5:
            if c == <uint8_t>HF_HTTP_NAME[s.idx]:
                s.idx += 1
                return HF_ERR_NONE
        elif s.idx == 5 or s.idx == 7:
            if k & HC_DIGIT:
                s.version = s.version * 10 + (c - 0x30)
                s.idx += 1
                if s.idx == 8 and st == HS_VERSION:
                    s.state = HS_START_END
                return HF_ERR_NONE
        elif s.idx == 6:
            if c == 0x2e:
                s.idx += 1
                return HF_ERR_NONE
        elif c == 0x20:
            s.idx = 0
            s.state = HS_STATUS
            return HF_ERR_NONE
    elif st == HS_STATUS:
        if k & HC_DIGIT:
            s.status = s.status * 10 + (c - 0x30)
            s.idx += 1
            if s.idx == 3:
                if s.status < 100:
                    return HF_ERR_START_LINE
                s.state = HS_STATUS_END
            return HF_ERR_NONE
    elif st == HS_STATUS_END or st == HS_REASON or st == HS_START_END:
        if c == 0x0d:
            s.state = HS_START_CR
            return HF_ERR_NONE
        if c == 0x0a:
            s.state = HS_FIELD_START
            return HF_ERR_NONE
        if st == HS_STATUS_END and c == 0x20:
            s.state = HS_REASON
            return HF_ERR_NONE
        if st == HS_REASON and (k & HC_FIELD or c == 0x20 or c == 0x09):
            return HF_ERR_NONE
    elif st == HS_START_CR:
        if c == 0x0a:
            s.state = HS_FIELD_START
            return HF_ERR_NONE
    return HF_ERR_START_LINE


cdef inline uint8_t hf_read_field_line(HttpFramer *f, int side, HfSide *s, uint8_t c,
                                       uint64_t now, HfEvents *out) noexcept nogil:
    """Field lines of a head or a trailer section, and the empty line that ends the section
    (hf_section_done: the message-level decisions)."""
    cdef uint8_t st = s.state
    cdef uint8_t k = hf_class[c]
    if st == HS_FIELD_START:
        if c == 0x0d:
            s.state = HS_FIELD_END_CR
            return HF_ERR_NONE
        if c == 0x0a:
            hf_section_done(f, side, now, out)
            return HF_ERR_NONE
        if k & HC_TCHAR:
            s.word[0] = <char>hf_lower(c)
            s.word_len = 1
            s.state = HS_FIELD_NAME
            return HF_ERR_NONE
        if (c == 0x20 or c == 0x09) and s.prev_field != HF_F_NONE:
            # obs-fold: a continuation of the previous field line.
            if side == HF_RESPONSE and s.prev_field == HF_F_OTHER:
                s.field = HF_F_OTHER
                s.state = HS_FOLD
                return HF_ERR_NONE
            return HF_ERR_OBS_FOLD
    elif st == HS_FIELD_END_CR:
        if c == 0x0a:
            hf_section_done(f, side, now, out)
            return HF_ERR_NONE
    elif st == HS_FIELD_NAME:
        if k & HC_TCHAR:
            if s.word_len < HF_WORD:
                s.word[s.word_len] = <char>hf_lower(c)
            if s.word_len < 255:
                s.word_len += 1
            return HF_ERR_NONE
        if c == 0x3a:
            hf_field_start(s, side)
            s.state = HS_FIELD_OWS
            return HF_ERR_NONE
    elif st == HS_FIELD_OWS or st == HS_FIELD_VALUE or st == HS_FOLD:
        if c == 0x0d:
            s.state = HS_FIELD_CR
            return HF_ERR_NONE
        if c == 0x0a:
            hf_field_done(s)
            return HF_ERR_NONE
        if c == 0x20 or c == 0x09:
            if st == HS_FIELD_VALUE and s.field >= HF_F_CONTENT_LENGTH:
                hf_value_octet(s, c)
            return HF_ERR_NONE
        if k & HC_FIELD:
            if st == HS_FIELD_OWS:
                s.state = HS_FIELD_VALUE
            if s.field >= HF_F_CONTENT_LENGTH:
                hf_value_octet(s, c)
            return HF_ERR_NONE
    elif st == HS_FIELD_CR:
        if c == 0x0a:
            hf_field_done(s)
            return HF_ERR_NONE
    return HF_ERR_FIELD


cdef inline uint8_t hf_read_chunk_line(HfSide *s, uint8_t c) noexcept nogil:
    """A chunk-size line (size, extensions, line end) and the CRLF after a chunk's data."""
    cdef uint8_t st = s.state
    cdef uint8_t k = hf_class[c]
    if st == HS_CHUNK_SIZE:
        if k & HC_HEX and s.idx < 20:
            s.idx += 1
            s.remaining = hf_mul_add(s.remaining, 16,
                                     (c - 0x30) if k & HC_DIGIT else (hf_lower(c) - 0x57))
            return HF_ERR_NONE
        if s.idx > 0:
            if c == 0x3b:
                s.state = HS_CHUNK_EXT
                return HF_ERR_NONE
            if c == 0x20 or c == 0x09:
                s.state = HS_CHUNK_WS
                return HF_ERR_NONE
            if c == 0x0d:
                s.idx = 0
                s.state = HS_CHUNK_SIZE_LF
                return HF_ERR_NONE
    elif st == HS_CHUNK_EXT:
        if c == 0x0d:
            s.idx = 1       # remembered: a CR inside an extension, if no LF follows
            s.state = HS_CHUNK_SIZE_LF
            return HF_ERR_NONE
        if c != 0x0a:
            return HF_ERR_NONE
    elif st == HS_CHUNK_WS:
        if c == 0x20 or c == 0x09:
            return HF_ERR_NONE
        if c == 0x0d:
            s.idx = 0
            s.state = HS_CHUNK_SIZE_LF
            return HF_ERR_NONE
    elif st == HS_CHUNK_SIZE_LF:
        if c == 0x0a:
            s.head_bytes = 0
            if s.remaining == 0:
                s.trailer = 1
                s.prev_field = HF_F_NONE
                s.state = HS_FIELD_START
            else:
                s.state = HS_CHUNK_DATA
            return HF_ERR_NONE
        if s.idx:
            return HF_ERR_CHUNK_EXT_CR
    elif st == HS_CHUNK_DATA_CR:
        if c == 0x0d:
            s.state = HS_CHUNK_DATA_LF
            return HF_ERR_NONE
    elif st == HS_CHUNK_DATA_LF:
        if c == 0x0a:
            s.state = HS_CHUNK_SIZE
            s.head_bytes = 0
            s.idx = 0
            return HF_ERR_NONE
    return HF_ERR_CHUNK


cdef void hf_step(HttpFramer *f, int side, uint8_t c, uint64_t now,
                  HfEvents *out) noexcept nogil:
    """Take one octet of a head, a chunk-size line or a trailer section: hand it to the reader
    of its state's group and report the error that reader names, if any."""
    cdef HfSide *s = &f.side[side]
    cdef uint8_t err
    if s.state <= HS_LINE_START_CR:
        err = hf_read_line_start(f, side, s, c, now)
        if err != HF_ERR_NONE:
            hf_fail(f, side, err, out)
            return
        if s.state <= HS_LINE_START_CR:
            return
    s.head_bytes += 1
    if s.head_bytes > HF_MAX_HEAD:
        err = HF_ERR_HEAD_TOO_LARGE
    elif s.state < HS_FIELD_START:
        err = hf_read_start_line(s, c)
    elif s.state < HS_CHUNK_SIZE:
        err = hf_read_field_line(f, side, s, c, now, out)
    else:
        err = hf_read_chunk_line(s, c)
    if err != HF_ERR_NONE:
        hf_fail(f, side, err, out)


cdef void hf_read_preface(HttpFramer *f, HfSide *s, uint8_t c, uint64_t now,
                          HfEvents *out) noexcept nogil:
    """An octet at the start of the request stream, while the HTTP/2 preface still matches (s.idx
    octets so far; s.pos counts this one).  The preface's last octet makes the connection
    OPAQUE (one event).  Any other octet ends PREFACE: the matched octets, then this one, go
    through hf_step from LINE_START as hf_feed would have shown them, until one stops the
    stream (a malformed request: DEAD takes the rest unseen; no prefix of the preface can
    start a body).  At most two events come of it (a PRI request, then a malformed one, with
    no REJECT while the PRI request is owed its response), so hf_feed's reserve holds."""
    cdef uint8_t matched = s.idx
    cdef uint8_t i
    if c == <uint8_t>HF_H2_PREFACE[matched]:
        s.idx = matched + 1
        if s.idx == HF_H2_PREFACE_LEN:
            hf_opaque(f, HF_ERR_H2_PREFACE, out)
        return
    s.state = HS_LINE_START
    s.idx = 0
    s.pos -= matched + 1
    for i in range(matched + 1):
        s.pos += 1
        if s.state < HS_BODY_LENGTH:
            hf_step(f, HF_REQUEST, <uint8_t>HF_H2_PREFACE[i] if i < matched else c, now, out)


cdef inline void hf_account_body(HttpFramer *f, int side, uint64_t n, uint64_t now,
                                 HfEvents *out) noexcept nogil:
    """n body octets (n <= remaining) went by, shown or skipped."""
    cdef HfSide *s = &f.side[side]
    s.remaining -= n
    if s.remaining == 0:
        if s.state == HS_CHUNK_DATA:
            s.state = HS_CHUNK_DATA_CR
        else:
            hf_body_done(f, side, now, out)


cdef bint hf_request_blocked(const HttpFramer *f) noexcept nogil:
    """The next request would begin while HF_RING requests await their responses: the request
    side takes nothing until a response ends (see Pipelining)."""
    return (f.side[HF_REQUEST].state == HS_LINE_START
            and f.n_requests - f.n_answered >= HF_RING)


cdef size_t hf_feed(HttpFramer *f, int side, const char *data, size_t n, uint64_t now,
                    HfEvents *out) noexcept nogil:
    """Show n bytes of `side`'s stream; returns how many were taken (all, unless `out` filled
    or the request side is blocked: hf_request_blocked)."""
    cdef HfSide *s = &f.side[side]
    cdef size_t i = 0
    cdef size_t j, end
    cdef uint64_t k
    cdef uint8_t st, mask
    while i < n:
        if out.count > HF_EVENTS_MAX - HF_EVENTS_RESERVE:
            break
        st = s.state
        if st == HS_LINE_START and side == HF_REQUEST and f.n_requests - f.n_answered >= HF_RING:
            break
        if st >= HS_BODY_LENGTH:
            if st == HS_BODY_LENGTH or st == HS_CHUNK_DATA:
                k = n - i
                if k > s.remaining:
                    k = s.remaining
                i += k
                s.pos += k
                hf_account_body(f, side, k, now, out)
            else:
                s.pos += n - i
                i = n
            continue
        if st == HS_FIELD_NAME:
            # A field name: token octets kept (lower-cased) only as far as the word holds.
            end = n if n - i <= HF_MAX_HEAD - s.head_bytes else i + HF_MAX_HEAD - s.head_bytes
            j = i
            while j < end and hf_class[<uint8_t>data[j]] & HC_TCHAR:
                if s.word_len < HF_WORD:
                    s.word[s.word_len] = <char>hf_lower(<uint8_t>data[j])
                if s.word_len < 255:
                    s.word_len += 1
                j += 1
            if j > i:
                s.head_bytes += <uint32_t>(j - i)
                s.pos += j - i
                i = j
                if i == n:
                    break
        elif (st == HS_TARGET or st == HS_REASON or st == HS_FOLD
                or (st == HS_FIELD_VALUE and s.field == HF_F_OTHER)):
            # Most of a head: octets that change nothing but the head's size, taken in a
            # tight loop up to the first one that matters (or the size limit).
            mask = HC_VCHAR if st == HS_TARGET else HC_FIELD | HC_WS
            end = n if n - i <= HF_MAX_HEAD - s.head_bytes else i + HF_MAX_HEAD - s.head_bytes
            j = i
            while j < end and hf_class[<uint8_t>data[j]] & mask:
                j += 1
            if j > i:
                if st == HS_TARGET:
                    s.idx = 1
                s.head_bytes += <uint32_t>(j - i)
                s.pos += j - i
                i = j
                if i == n:
                    break
        s.pos += 1
        if st == HS_PREFACE:
            hf_read_preface(f, s, <uint8_t>data[i], now, out)
            if s.state == HS_OPAQUE:
                # The preface's last octet: what follows is HTTP/2, for the caller to show
                # to the HTTP/2 observer (_h2_observer.pxi).
                return i + 1
        else:
            hf_step(f, side, <uint8_t>data[i], now, out)
        i += 1
    return i


cdef uint64_t hf_body_remaining(const HttpFramer *f, int side) noexcept nogil:
    """Bytes of `side` that may be forwarded without showing them to hf_feed."""
    cdef const HfSide *s = &f.side[side]
    if s.state == HS_BODY_LENGTH or s.state == HS_CHUNK_DATA:
        return s.remaining
    if s.state > HS_CHUNK_DATA:
        return UINT64_MAX
    return 0


cdef void hf_skip(HttpFramer *f, int side, uint64_t n, uint64_t now,
                  HfEvents *out) noexcept nogil:
    """n bytes of `side` were forwarded unseen (n <= hf_body_remaining)."""
    cdef HfSide *s = &f.side[side]
    if n == 0:
        return
    s.pos += n
    if s.state > HS_CHUNK_DATA:
        return
    if (s.state != HS_BODY_LENGTH and s.state != HS_CHUNK_DATA) or n > s.remaining:
        hf_opaque(f, HF_ERR_SKIP, out)
        return
    hf_account_body(f, side, n, now, out)


cdef void hf_eof(HttpFramer *f, int side, uint64_t now, HfEvents *out) noexcept nogil:
    """`side`'s source reached end of file."""
    cdef HfSide *s = &f.side[side]
    if side == HF_RESPONSE and f.mode == HF_MODE_OBSERVING:
        if s.state == HS_UNTIL_CLOSE:
            # Nothing can follow a close-delimited body: a REJECT owed becomes a plain close.
            f.reject_status = 0
            hf_exchange_done(f, now, 0, out)
        if f.reject:
            hf_reject(f, 0, out)
        elif f.n_requests != f.n_answered:
            # What is unanswered never will be (the connection's end counts it cut short):
            # stop following the client, which also ends a wait for a slot of the ring.
            f.side[HF_REQUEST].state = HS_DEAD
    if s.state != HS_OPAQUE and s.state != HS_DEAD:
        s.state = HS_CLOSED


cdef uint64_t hf_unanswered(const HttpFramer *f) noexcept nogil:
    """How many requests await a response that has not ended (the ring's entries from
    n_answered on): what a connection ending now cuts short.  None once the framer stopped
    following the connection (OPAQUE: a switch or a give-up), and none of the requests read
    while speculating past an unanswered CONNECT or Upgrade (they may be the new protocol's
    bytes)."""
    cdef uint64_t last = f.n_requests
    if f.mode == HF_MODE_OPAQUE:
        return 0
    if f.n_decided < f.spec_until < last:
        last = f.spec_until
    return last - f.n_answered


cdef uint64_t hf_open_head(const HttpFramer *f) noexcept nogil:
    """Where the request head being read began (a request-stream offset: 0 while the stream
    still matches the HTTP/2 preface), or UINT64_MAX when the request side is not inside a
    head.  The bytes from there on are a request not judged yet: the engine holds them."""
    cdef const HfSide *s = &f.side[HF_REQUEST]
    if s.state == HS_PREFACE:
        return 0
    if HS_METHOD <= s.state <= HS_FOLD and not s.trailer:
        return s.head_pos
    return UINT64_MAX


cdef int hf_request_phase(const HttpFramer *f) noexcept nogil:
    """Which timeout applies to the client now (HF_PHASE_*)."""
    cdef uint8_t st = f.side[HF_REQUEST].state
    if f.mode != HF_MODE_OBSERVING or st >= HS_OPAQUE:
        return HF_PHASE_OPAQUE
    if f.side[HF_REQUEST].pos == 0:
        return HF_PHASE_OPENING
    if st == HS_LINE_START or st == HS_LINE_START_CR:
        if f.n_requests == 0:
            return HF_PHASE_HEAD        # empty lines before the first request: timed from t_open
        if f.n_requests == f.n_answered:
            return HF_PHASE_IDLE
        return HF_PHASE_BUSY
    if st < HS_FIELD_START or (st <= HS_FOLD and not f.side[HF_REQUEST].trailer):
        return HF_PHASE_HEAD
    return HF_PHASE_BUSY


# ---- Python surface: names and a probe for tests -------------------------------------------

HTTP_METHODS = ("OTHER", "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                "PATCH")

_HF_EVENT_KINDS = (None, "request", "exchange", "malformed", "reject", "opaque", "head")
_HF_REASONS = (
    "", "start-line", "field", "obs-fold", "head-too-large", "host", "content-length",
    "transfer-encoding", "te-with-content-length", "te-http10", "chunk", "chunk-ext-cr",
    "unsolicited", "unexpected-101", "skip", "content-length-list",
    "h2-preface", "misdirected",
)
_HF_PHASES = ("idle", "head", "busy", "opaque", "opening")
_HF_LENIENT = ((HFL_EMPTY_LINE, "empty-line"), (HFL_TE_LIST, "te-list"),
               (HFL_TRAILER_FRAMING, "trailer-framing"), (HFL_TE_FRAMING, "te-framing"),
               (HFL_UNUSED_FRAMING, "unused-framing"))

HttpEvent = _namedtuple(
    "HttpEvent",
    "kind method status t_request_head t_response_head t_response_end pos close switched "
    "speculative reason start",
    defaults=(0,),
)
HttpEvent.__doc__ = "One event of the HTTP framer (see HttpFramerProbe)."


cdef int _hf_side(str side) except -1:
    if side == "request":
        return HF_REQUEST
    if side == "response":
        return HF_RESPONSE
    raise ValueError(f"side must be 'request' or 'response', not {side!r}")


cdef class HttpFramerProbe:
    """The relay engine's HTTP/1.x framer, driven from Python (tests, fuzzing, the Python relay).

    Shows bytes of the client's stream ("request") or the instance's ("response") to the
    framer and returns its events as HttpEvent tuples.  ``now``: when the connection opened,
    on the clock the calls' ``now`` use (the first request's head is timed from it).
    """

    cdef HttpFramer f
    cdef HfEvents ev

    def __cinit__(self, uint64_t now=0):
        hf_init(&self.f, now)
        self.ev.count = 0

    def pin_host(self):
        """Answer 421 to a request naming another host than the first (hf_pin_host)."""
        hf_pin_host(&self.f)

    def report_heads(self):
        """Report each request head accepted as a "head" event (hf_report_heads)."""
        hf_report_heads(&self.f)

    cdef list _events(self):
        cdef list result = []
        cdef int i
        cdef HfEvent *e
        for i in range(self.ev.count):
            e = &self.ev.ev[i]
            result.append(HttpEvent(
                _HF_EVENT_KINDS[e.kind], HTTP_METHODS[e.method], e.status, e.t_request_head,
                e.t_response_head, e.t_response_end, e.pos, bool(e.flags & HFE_CLOSE),
                bool(e.flags & HFE_SWITCHED), bool(e.flags & HFE_SPECULATIVE),
                _HF_REASONS[e.reason], e.start,
            ))
        self.ev.count = 0
        return result

    def feed_once(self, str side, const unsigned char[::1] data, uint64_t now=0):
        """One hf_feed call: (bytes taken, events).  Fewer than len(data) only when the event
        buffer filled up."""
        cdef int sd = _hf_side(side)
        cdef size_t taken = 0
        self.ev.count = 0
        if data.shape[0] > 0:
            taken = hf_feed(&self.f, sd, <const char *>&data[0], data.shape[0], now, &self.ev)
        return taken, self._events()

    def feed(self, str side, const unsigned char[::1] data, uint64_t now=0):
        """Show `data`; returns the events, in order.  All of it is taken unless the request
        side is blocked (see `blocked`; `position` tells how far it got)."""
        cdef int sd = _hf_side(side)
        cdef size_t off = 0
        cdef size_t n = data.shape[0]
        cdef list result = []
        while off < n:
            if sd == HF_REQUEST and hf_request_blocked(&self.f):
                break
            self.ev.count = 0
            off += hf_feed(&self.f, sd, <const char *>&data[off], n - off, now, &self.ev)
            result.extend(self._events())
        return result

    def skip(self, str side, uint64_t n, uint64_t now=0):
        """Account for n bytes forwarded unseen (spliced); returns the events."""
        cdef int sd = _hf_side(side)
        self.ev.count = 0
        hf_skip(&self.f, sd, n, now, &self.ev)
        return self._events()

    def eof(self, str side, uint64_t now=0):
        """End of `side`'s stream; returns the events."""
        cdef int sd = _hf_side(side)
        self.ev.count = 0
        hf_eof(&self.f, sd, now, &self.ev)
        return self._events()

    def body_remaining(self, str side):
        """Bytes that may be forwarded without showing them (2**64 - 1: everything)."""
        return hf_body_remaining(&self.f, _hf_side(side))

    def position(self, str side):
        """Bytes of `side`'s stream shown or skipped so far."""
        return self.f.side[_hf_side(side)].pos

    @property
    def request_start(self):
        """Request-stream offset where the current (or malformed) request began."""
        return self.f.side[HF_REQUEST].msg_start

    @property
    def open_head(self):
        """Request-stream offset where the request head being read began (0 while the
        stream still matches the HTTP/2 preface); None outside a head."""
        cdef uint64_t pos = hf_open_head(&self.f)
        return None if pos == UINT64_MAX else pos

    def lenient(self, str side):
        """Where `side` accepted what h11 would reject: a frozenset of names."""
        cdef uint8_t bits = self.f.side[_hf_side(side)].lenient
        return frozenset(name for bit, name in _HF_LENIENT if bits & bit)

    @property
    def phase(self):
        """'opening' (no byte yet) or 'head' (header-read timeout from head_started), 'idle'
        (idle timeout), 'busy' or 'opaque'."""
        return _HF_PHASES[hf_request_phase(&self.f)]

    @property
    def head_started(self):
        """`now` when the request head being read began: for the connection's first request,
        when the connection opened (0 outside a head)."""
        return self.f.side[HF_REQUEST].t_head_start

    def unanswered(self):
        """The exchanges a connection ending now cuts short, oldest first: (method,
        t_request_head, t_response_head) per request whose response has not ended
        (t_response_head 0 while its response head is not read)."""
        cdef uint64_t i
        cdef HfExchange *x
        out = []
        for i in range(hf_unanswered(&self.f)):
            x = &self.f.ring[(self.f.n_answered + i) % HF_RING]
            out.append((HTTP_METHODS[x.method], x.t_request_head,
                        self.f.t_response_head if i == 0 else 0))
        return out

    @property
    def blocked(self):
        """True while the request side takes no byte: HF_RING requests await their responses
        and the next would begin (show the rest once a response ends)."""
        return bool(hf_request_blocked(&self.f))

    @property
    def pending(self):
        """Requests whose response has not ended."""
        return self.f.n_requests - self.f.n_answered

    @property
    def observing(self):
        """False once the connection is opaque (switched, given up) or rejected."""
        return self.f.mode == HF_MODE_OBSERVING
