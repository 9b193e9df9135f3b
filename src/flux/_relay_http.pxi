# HTTP services in the relay engine: the hooks the data path calls (included by _splice.pyx).
#
# Theory of operation
# -------------------
# A connection added with http=True carries a RelayHttp: the framer of _http_framer.pxi plus
# what the engine needs around it.  The data path of _relay_moves.pxi stays the same (copy small
# reads, splice bulk ones); these hooks only watch it:
#
# - Every byte read into a copy buffer is shown to the framer (http_observe) *before* it is
#   forwarded, so a response is never seen before the request head it answers.  A spliced
#   direction may only splice what the framer says it need not see (hf_body_remaining: a body of
#   known length, the rest of a chunk, or everything once the connection is opaque), and the
#   spliced count is reported with hf_skip (http_skipped).  Bodies of known length therefore
#   still go through pipes; heads and chunk-size lines are copied.
# - An EXCHANGE event (a response ended, in the response stream) is held in a small FIFO until
#   the bytes up to its end have been *written to the client* (http_written): that instant ends
#   the "total" time.  Roundtrip is request head read -> response head read, both from the
#   framer's timestamps (the `now` of the read that completed each head).  The finished record
#   goes into the engine's local exchange buffer, which relay_publish() moves to the shared one
#   under the same lock as completions (a connection's exchanges always precede its completion).
# - A request head is held until it is complete.  The client's bytes from the first octet of
#   a head the framer has not finished (hf_open_head; the HTTP/2 preface counts while the
#   stream still matches it) are not forwarded at the end of a read: they stay in dir[0]'s
#   buffer after what goes now (p.held; shown already, never shown twice), the next read
#   appends to them, and they go with the read that completes the head -- or never, when it
#   is malformed (400), passes HF_MAX_HEAD (431) or the header timeout answers it (408): so
#   nothing of a request the engine answers itself reaches the instance.  Heads almost always
#   arrive in one read, which forwards them at once as before, so holding adds no syscall (a
#   keep-alive loop makes one recv() and one send() per message each way, before and after;
#   tests/test_relay_http.py counts them).  A held head that fills its buffer moves to a
#   larger one of its own (doubled, up to HF_MAX_HEAD plus a small_buffer: 80 KiB by
#   default), freed once the head is out: a connection in the middle of a split head holds
#   that much at most, for the header timeout at most.  Held bytes that stop being a head
#   without more client bytes go at once: the instance's response switched protocols or was
#   given up on (after a CONNECT or an Upgrade the next bytes are read as HTTP until the
#   answer, so a partial head among them waits for it; one found malformed meanwhile goes, as
#   it may be the new protocol's), or the client ended its stream (a head it leaves unfinished
#   goes as it came: the engine judged nothing, the instance does).
# - A MALFORMED request stops the client's stream where that request began: the requests
#   before it are still forwarded (pipelining), nothing after it is, and nothing of it when
#   its head is what is wrong (held until judged, above); a chunked body found malformed
#   follows a head already forwarded, so the instance sees that request cut short.  The
#   framer's REJECT says when the responses owed before the error have ended; the response
#   direction then stops at that offset, and once everything before it is written the engine
#   writes its own answer (400, 431 for an oversized head, 421 for a host other than the
#   pinned one), half-closes the client and the
#   instance, and *lingers*: it reads and discards what the client still sends until EOF or
#   for at most HTTP_LINGER_NS, so that the client reads the answer instead of a reset caused
#   by unread data.
# - A pipeline deeper than the framer's ring (HF_RING requests awaiting their responses) is
#   slowed, not given up: the framer takes no byte of the next request, the client's direction
#   keeps what it read but could not show (h.unshown, after its buffered bytes) and reads no
#   more (h.ring_wait); relay_pump shows the kept bytes once a response has freed a slot.
# - Timeouts are enforced by a sweep of the live list every sweep_ns (an eighth of the shorter
#   timeout, 10 ms..500 ms), so no timer structure is kept per connection:
#     opening         the client sent nothing since the connection opened, for the header
#                     timeout (or the idle timeout, if it is shorter or the header timeout is
#                     off): close both sides quietly, nothing was asked;
#     header timeout  the client started a request head and has not finished it (the first
#                     request's head is timed from the connection's opening): answer 408
#                     when nothing else is owed on the response stream, else reset;
#     idle timeout    nothing pending in either direction (between requests, responses all
#                     written) since the last activity: close both sides quietly;
#     linger          the answer was written and the client has not closed: close.
# - Once the framer gives up (OPAQUE: a protocol switch, an unparseable response) it takes
#   every byte without looking and body_remaining is unlimited: the connection is plain TCP,
#   counted in http_opaque.
# - A client that opened with the HTTP/2 preface (the framer's OPAQUE with reason H2_PREFACE)
#   is HTTP/2 from the next byte on: an H2Observer (_h2_observer.pxi) is shown every byte in
#   the framer's place, and its body_remaining (the rest of a DATA payload) is what may be
#   spliced.  Each of its streams is an exchange, ended and timed as an HTTP/1.x response is
#   (through the same pending FIFO, at the END_STREAM frame's last byte); a stream reset
#   (RST_STREAM) is recorded at once as cut by the side that reset it; the streams under way
#   when the connection ends are cut as HTTP/1.x exchanges are.  gRPC paths are interned in
#   RelayEngine.names and records carry their id.  No HTTP timeout applies to an HTTP/2
#   connection.  Counted: http_h2, http_h2_gave_up, http_h2_untracked.
# - An exchange that does not complete is counted when its connection ends (http_release):
#   every request whose response has not ended (hf_unanswered) and every ended response not
#   yet fully written to the client, with the time so far as its total (and as its roundtrip
#   when no response head came), and in place of its status who cut it (HTTP_CUT_*): the side
#   that first failed (a reset, EPIPE: http_cut_by from the moves), or closed while an
#   exchange was unfinished (http_source_eof; a client that closes its sending side with a
#   response owed counts, as nginx's 499 does), the client when the header timeout cuts a
#   connection with responses pending, else fluxd (stopping).

cdef int64_t HTTP_LINGER_NS = 2000000000
cdef int64_t HTTP_SWEEP_MIN_NS = 10000000
cdef int64_t HTTP_SWEEP_MAX_NS = 500000000


# The engine's own answers (HTTP_ERROR_RESPONSES is their one source, also for tests); the
# engine thread sends copies made at import.
HTTP_ERROR_RESPONSES = {
    400: (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
          b"Connection: close\r\n\r\nBad Request\n"),
    431: (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
          b"Content-Length: 32\r\nConnection: close\r\n\r\n"
          b"Request Header Fields Too Large\n"),
    408: (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 16\r\n"
          b"Connection: close\r\n\r\nRequest Timeout\n"),
    # A later request naming another host than the first on a connection routed by host name
    # (the framer's pinned host).
    421: (b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: text/plain\r\n"
          b"Content-Length: 20\r\nConnection: close\r\n\r\nMisdirected Request\n"),
}

cdef char *http_answer_text[HTTP_ANSWERS]
cdef size_t http_answer_len[HTTP_ANSWERS]


cdef void _http_load_answers() except *:
    cdef int i
    cdef bytes text
    for status in (400, 431, 408, 421):
        i = http_answer_index(status)
        text = HTTP_ERROR_RESPONSES[status]
        http_answer_text[i] = <char *>malloc(len(text))
        if http_answer_text[i] == NULL:
            raise MemoryError()
        memcpy(http_answer_text[i], <const char *>text, len(text))
        http_answer_len[i] = len(text)


_http_load_answers()


# ---- set-up and tear-down -----------------------------------------------------------------------

cdef void http_configure(RelayEngine *e, double header_timeout, double idle_timeout) noexcept:
    cdef int64_t shortest
    e.header_timeout_ns = <int64_t>(header_timeout * 1e9)
    e.idle_timeout_ns = <int64_t>(idle_timeout * 1e9)
    # The shorter of the timeouts set.  A client that sends nothing is closed after it: held
    # for the idle timeout before the header timeout ran from the opening, it is never held
    # longer than that now.
    e.opening_timeout_ns = e.header_timeout_ns
    if 0 < e.idle_timeout_ns and (e.opening_timeout_ns == 0
                                  or e.idle_timeout_ns < e.opening_timeout_ns):
        e.opening_timeout_ns = e.idle_timeout_ns
    # The sweep runs eight times as often, and even when both timeouts are off (lingering
    # connections need it).
    shortest = e.opening_timeout_ns if e.opening_timeout_ns > 0 else HTTP_SWEEP_MAX_NS * 8
    e.sweep_ns = min(max(shortest // 8, HTTP_SWEEP_MIN_NS), HTTP_SWEEP_MAX_NS)


cdef int http_attach(RelayConn *c, bint observe) noexcept nogil:
    cdef RelayHttp *h = <RelayHttp *>calloc(1, sizeof(RelayHttp))
    if h == NULL:
        return -1
    hf_init(&h.f, <uint64_t>c.started_ns)
    h.stop_pos[0] = UINT64_MAX
    h.stop_pos[1] = UINT64_MAX
    h.last_active_ns = c.started_ns
    h.observe = observe
    c.http = h
    return 0


cdef void http_release(RelayEngine *e, RelayConn *c) noexcept nogil:
    http_count_cut(e, c)
    h2_free(c.http.h2)
    free(c.http.fwd)
    free(c.http)
    c.http = NULL
    e.http_live -= 1


# ---- exchanges ----------------------------------------------------------------------------------

cdef void http_record(RelayEngine *e, RelayConn *c, const HttpPending *x,
                      uint64_t end) noexcept nogil:
    cdef RelayExchange *r
    cdef size_t cap
    relay_count(e, RC_HTTP_EXCHANGES, 1)
    if not c.http.observe:
        return
    if e.ex_local_len == e.ex_local_cap:
        cap = 256 if e.ex_local_cap == 0 else 2 * e.ex_local_cap
        r = <RelayExchange *>realloc(e.ex_local, cap * sizeof(RelayExchange))
        if r == NULL:
            relay_count(e, RC_EXCHANGES_DROPPED, 1)
            return
        e.ex_local = r
        e.ex_local_cap = cap
    r = &e.ex_local[e.ex_local_len]
    e.ex_local_len += 1
    r.token = c.token
    if c.token == 0:
        r.service = c.svc.id
        r.inst = c.inst
        r.client_ip = c.client_ip
    else:
        r.service = r.inst = r.client_ip = 0
    r.method = x.method
    r.status = x.status
    r.name = x.name
    r.grpc_status = x.grpc_status
    r.roundtrip_ns = (x.t_response_head - x.t_request_head
                      if x.t_response_head > x.t_request_head else 0)
    r.total_ns = end - x.t_request_head if end > x.t_request_head else 0


cdef inline bint http_unfinished(RelayHttp *h) noexcept nogil:
    """An exchange is under way: a request awaits its response, or a response its last
    written byte."""
    return (h.npending != 0 or hf_unanswered(&h.f) != 0
            or (h.h2 != NULL and h.h2.nstreams != 0))


cdef void http_cut_by(RelayConn *c, int d) noexcept nogil:
    """Side d (0: the client, 1: the instance) failed: it cuts whatever is under way, unless
    a side already did."""
    if c.http != NULL and c.http.cut_side == 0:
        c.http.cut_side = <uint8_t>(HTTP_CUT_CLIENT + d)


cdef void http_count_cut(RelayEngine *e, RelayConn *c) noexcept nogil:
    """The connection ends: record the exchanges it cut short, each with the time so far and
    who cut it in place of its status."""
    cdef RelayHttp *h = c.http
    cdef uint64_t now
    cdef uint64_t i, n = hf_unanswered(&h.f)
    cdef uint8_t side = h.cut_side if h.cut_side else HTTP_CUT_FLUXD
    cdef HttpPending x
    cdef HfExchange *r
    cdef H2Stream *st
    cdef uint32_t streams = h.h2.nstreams if h.h2 != NULL else 0
    if h.npending == 0 and n == 0 and streams == 0:
        return
    relay_notice(e, c, NOTICE_CUT, NR_CUT_CLIENT - 1 + side, 0,
                 <uint32_t>(h.npending + n + streams))
    now = <uint64_t>relay_now_ns()
    if streams:
        for i in range(streams):
            st = &h.h2.streams[i]
            x.method = st.method
            x.status = side
            x.name = st.name
            x.grpc_status = st.grpc_status
            x.t_request_head = st.t_request_head
            x.t_response_head = st.t_response_head if st.t_response_head else now
            http_record(e, c, &x, now)
        h.h2.nstreams = 0
    while h.npending:
        x = h.pending[h.pending_head]
        x.status = side
        http_record(e, c, &x, now)
        h.pending_head = (h.pending_head + 1) % HTTP_PENDING
        h.npending -= 1
    x.name = 0
    x.grpc_status = -1
    for i in range(n):
        r = &h.f.ring[(h.f.n_answered + i) % HF_RING]
        x.method = r.method
        x.status = side
        x.t_request_head = r.t_request_head
        x.t_response_head = h.f.t_response_head if i == 0 and h.f.t_response_head else now
        http_record(e, c, &x, now)


cdef bint http_publish_exchanges(RelayEngine *e) noexcept nogil:
    """Move the local records to the shared queue (the caller holds the lock).

    Returns whether the asyncio side should be woken: the queue grew past the wake mark.
    """
    cdef size_t n = e.ex_local_len
    cdef size_t before = e.ex_shared_len
    cdef size_t cap
    cdef RelayExchange *grown
    if before + n > HTTP_EXCHANGES_MAX:
        relay_count(e, RC_EXCHANGES_DROPPED, <int64_t>(before + n - HTTP_EXCHANGES_MAX))
        n = HTTP_EXCHANGES_MAX - before
    if before == 0:
        # The usual case (the asyncio side took the last queue): hand the buffer over whole.
        free(e.ex_shared)
        e.ex_shared = e.ex_local
        e.ex_shared_cap = e.ex_local_cap
        e.ex_shared_len = n
        e.ex_local = NULL
        e.ex_local_cap = 0
    elif n:
        if before + n > e.ex_shared_cap:
            cap = 2 * (before + n)
            grown = <RelayExchange *>realloc(e.ex_shared, cap * sizeof(RelayExchange))
            if grown == NULL:
                relay_count(e, RC_EXCHANGES_DROPPED, <int64_t>n)
                n = 0
            else:
                e.ex_shared = grown
                e.ex_shared_cap = cap
        if n:
            memcpy(&e.ex_shared[before], e.ex_local, n * sizeof(RelayExchange))
            e.ex_shared_len = before + n
    e.ex_local_len = 0
    return before < HTTP_EXCHANGES_WAKE <= e.ex_shared_len


cdef void http_written(RelayEngine *e, RelayConn *c) noexcept nogil:
    """Response bytes reached the client: finish the exchanges they complete."""
    cdef RelayHttp *h = c.http
    cdef uint64_t delivered = c.dir[1].bytes
    cdef uint64_t now
    if h.npending == 0 or delivered < h.pending[h.pending_head].end_pos:
        return
    now = <uint64_t>relay_now_ns()
    h.last_active_ns = <int64_t>now
    while h.npending and delivered >= h.pending[h.pending_head].end_pos:
        http_record(e, c, &h.pending[h.pending_head], now)
        h.pending_head = (h.pending_head + 1) % HTTP_PENDING
        h.npending -= 1


cdef void http_pend(RelayEngine *e, RelayConn *c, const HttpPending *ended,
                    uint64_t t_end) noexcept nogil:
    """A response ended at `ended.end_pos` of the response stream, read at `t_end`: the
    exchange completes once that byte is written to the client."""
    cdef RelayHttp *h = c.http
    if h.npending == HTTP_PENDING:
        # More finished responses in flight than slots (tiny pipelined responses, many
        # streams): end this one when it was read rather than when it was written.
        http_record(e, c, ended, t_end)
        return
    h.pending[(h.pending_head + h.npending) % HTTP_PENDING] = ended[0]
    h.npending += 1


cdef void http_start_h2(RelayEngine *e, RelayConn *c) noexcept nogil:
    """The client opened with the HTTP/2 preface: observe the connection as HTTP/2."""
    cdef RelayHttp *h = c.http
    relay_count(e, RC_HTTP_H2, 1)
    h.h2 = h2_new(&e.names)
    if h.h2 == NULL:
        relay_count(e, RC_HTTP_H2_GAVE_UP, 1)
        relay_notice(e, c, NOTICE_H2_GAVE_UP, NR_H2_MEMORY, 0, 0)
        return
    h.h2.names_lock = &e.lock
    h.h2.side[0].pos = h.f.side[HF_REQUEST].pos
    h.h2.side[1].pos = h.f.side[HF_RESPONSE].pos
    if h.f.side[HF_RESPONSE].pos:
        # The instance's bytes were shown to the framer before the client's preface (more
        # than HTTP_EARLY_MAX of them): its frames cannot be followed.
        h2_give_up(h.h2, H2_ERR_RESPONSE_FIRST, &e.h2ev)
        http_h2_events(e, c)


cdef bint http_not_h2(const HttpFramer *f, const char *buf, size_t n) noexcept nogil:
    """Whether these first client bytes already differ from the HTTP/2 preface."""
    cdef uint8_t matched = f.side[HF_REQUEST].idx
    cdef size_t k = 0
    while k < n and matched + k < HF_H2_PREFACE_LEN:
        if buf[k] != HF_H2_PREFACE[matched + k]:
            return True
        k += 1
    return False


cdef void http_show_early(RelayEngine *e, RelayConn *c) noexcept nogil:
    """The client's first bytes decided the protocol: show the instance's bytes kept from
    before (already forwarded) to whichever observes the connection now."""
    cdef RelayHttp *h = c.http
    cdef size_t n = h.early_len
    cdef size_t off = 0
    cdef uint64_t now = <uint64_t>relay_now_ns()
    h.early_len = 0
    while off < n:
        if h.h2 != NULL:
            off += h2_feed(h.h2, HF_RESPONSE, h.early + off, n - off, now, &e.h2ev)
            http_h2_events(e, c)
        else:
            off += hf_feed(&h.f, HF_RESPONSE, h.early + off, n - off, now, &e.ev)
            http_events(e, c)


cdef void http_h2_events(RelayEngine *e, RelayConn *c) noexcept nogil:
    """Act on what the HTTP/2 observer reported, then clear its event buffer."""
    cdef H2Event *ev
    cdef HttpPending x
    cdef int i
    cdef uint64_t now
    for i in range(e.h2ev.count):
        ev = &e.h2ev.ev[i]
        if ev.kind == H2_EV_EXCHANGE or ev.kind == H2_EV_CUT:
            x.end_pos = ev.pos
            x.method = ev.method
            x.status = ev.status
            x.name = ev.name
            x.grpc_status = ev.grpc_status
            x.t_request_head = ev.t_request_head
            now = <uint64_t>relay_now_ns()
            x.t_response_head = ev.t_response_head if ev.t_response_head else now
            if ev.kind == H2_EV_EXCHANGE:
                http_pend(e, c, &x, now)
            else:
                relay_notice(e, c, NOTICE_CUT, NR_CUT_CLIENT - 1 + ev.status, 0, 1)
                http_record(e, c, &x, now)
        elif ev.kind == H2_EV_GAVE_UP:
            relay_count(e, RC_HTTP_H2_GAVE_UP, 1)
            relay_notice(e, c, NOTICE_H2_GAVE_UP, NR_H2_HPACK - 1 + ev.reason, 0, 0)
        elif ev.kind == H2_EV_UNTRACKED:
            relay_count(e, RC_HTTP_H2_UNTRACKED, 1)
    e.h2ev.count = 0


cdef void http_events(RelayEngine *e, RelayConn *c) noexcept nogil:
    """Act on what the framer reported, then clear its event buffer."""
    cdef RelayHttp *h = c.http
    cdef HfEvent *ev
    cdef HttpPending x
    cdef int i
    for i in range(e.ev.count):
        ev = &e.ev.ev[i]
        if ev.kind == HF_EV_EXCHANGE:
            if ev.flags & HFE_SWITCHED:
                relay_count(e, RC_HTTP_SWITCHED, 1)
                relay_notice(e, c, NOTICE_SWITCHED,
                             NR_UPGRADE if ev.status == 101 else NR_CONNECT, ev.status, 0)
            x.end_pos = ev.pos
            x.method = ev.method
            x.status = ev.status
            x.name = 0
            x.grpc_status = -1
            x.t_request_head = ev.t_request_head
            x.t_response_head = ev.t_response_head
            http_pend(e, c, &x, ev.t_response_end)
        elif ev.kind == HF_EV_MALFORMED:
            # Forward nothing more of the malformed request (nothing of it, if its head is
            # what is wrong: that was held until now).
            h.stop_pos[0] = h.f.side[HF_REQUEST].msg_start
            h.halted[0] = 1
        elif ev.kind == HF_EV_REJECT:
            h.stop_pos[1] = ev.pos
            h.halted[0] = 1
            h.halted[1] = 1
            h.rejecting = 1
            h.reject_status = ev.status
        elif ev.kind == HF_EV_OPAQUE:
            if ev.reason == HF_ERR_H2_PREFACE:
                http_start_h2(e, c)
            else:
                relay_count(e, RC_HTTP_OPAQUE, 1)
                relay_notice(e, c, NOTICE_OPAQUE, ev.reason, 0, 0)
        elif ev.kind == HF_EV_HEAD:
            # A --forwarded connection (no other framer reports heads): the head is rewritten
            # once http_observe has said what goes (http_forward_heads).  At most HF_RING
            # complete in one read (the ring's back-pressure), and each read's are rewritten
            # before the next read is shown.
            h.fwd.head_start[h.fwd.nheads] = ev.start
            h.fwd.head_end[h.fwd.nheads] = ev.pos
            h.fwd.nheads += 1
    e.ev.count = 0


cdef bint http_holding(const RelayHttp *h) noexcept nogil:
    """The client's stream is inside a request head not judged yet: its bytes are held."""
    return h.h2 == NULL and hf_open_head(&h.f) != UINT64_MAX


cdef size_t http_observe(RelayEngine *e, RelayConn *c, int d, const char *buf,
                         size_t n) noexcept nogil:
    """Show n bytes just read from side d, which follow the direction's held bytes in its
    buffer (c.dir[d].held of them, already shown; only the client's side holds any).  Returns
    how many bytes, counted from the first held one, may be forwarded, and sets c.dir[d].held
    to how many shown ones after those stay (a request head not complete yet; none once the
    side is halted: they are dropped).  Client bytes the framer cannot take yet
    (hf_request_blocked) stay in the buffer after those: h.unshown of them, shown by
    http_show_kept once a response frees a slot."""
    cdef RelayHttp *h = c.http
    cdef RelayDir *p = &c.dir[d]
    cdef uint64_t base = h.f.side[d].pos
    cdef uint64_t start = base - p.held
    cdef uint64_t limit, head
    cdef uint64_t now = <uint64_t>relay_now_ns()
    cdef size_t off = 0
    h.last_active_ns = <int64_t>now
    if d == HF_RESPONSE and h.f.side[HF_REQUEST].state == HS_PREFACE and h.h2 == NULL:
        # The client has not decided between HTTP/1.x and HTTP/2 yet: keep these for then.
        if h.early_len + n <= HTTP_EARLY_MAX:
            memcpy(h.early + h.early_len, buf, n)
            h.early_len += <uint16_t>n
            return n
        http_show_early(e, c)
    elif d == HF_REQUEST and h.early_len and http_not_h2(&h.f, buf, n):
        # HTTP/1.x: the framer sees the instance's early bytes before any request, as they
        # came (a response nobody asked for: the connection becomes opaque).
        http_show_early(e, c)
    while off < n:
        if h.h2 != NULL:
            off += h2_feed(h.h2, d, buf + off, n - off, now, &e.h2ev)
            http_h2_events(e, c)
            continue
        if d == HF_REQUEST and hf_request_blocked(&h.f):
            break
        off += hf_feed(&h.f, d, buf + off, n - off, now, &e.ev)
        http_events(e, c)
        if h.early_len and h.f.side[HF_REQUEST].state != HS_PREFACE:
            http_show_early(e, c)
    limit = base + off
    if d == HF_REQUEST:
        h.unshown = <uint32_t>(n - off)
        if h.fwd != NULL:
            h.fwd.base = start
        head = hf_open_head(&h.f) if h.h2 == NULL else UINT64_MAX
        if head < limit:
            limit = head
    if h.stop_pos[d] < limit:
        limit = h.stop_pos[d]
    if limit < start:
        limit = start
    p.held = 0 if h.halted[d] else <uint32_t>(base + off - limit)
    return <size_t>(limit - start)


cdef int http_show_kept(RelayEngine *e, RelayConn *c) noexcept nogil:
    """The ring has a free slot again: show the client bytes kept back (dir[0] has none
    buffered or held before them: the framer waited between requests); what may be forwarded
    becomes its buffered bytes (its heads rewritten, for a --forwarded service).  Returns
    RELAY_AGAIN, or ENOMEM (the connection fails)."""
    cdef RelayDir *p = &c.dir[0]
    cdef size_t n = c.http.unshown
    c.http.unshown = 0
    c.http.ring_wait = 0
    n = http_observe(e, c, HF_REQUEST, p.buf + p.off, n)
    if c.http.fwd != NULL and c.http.fwd.nheads and http_forward_heads(e, c, &n) != 0:
        return ENOMEM
    p.length = <uint32_t>n
    relay_count(e, RC_INFLIGHT, <int64_t>n)
    return RELAY_AGAIN


cdef uint64_t http_may_skip(const RelayHttp *h, int d) noexcept nogil:
    """Bytes of side d that may pass without being shown (spliced): the framer's
    body_remaining, or the HTTP/2 observer's once there is one."""
    if h.h2 != NULL:
        return h2_body_remaining(h.h2, d)
    return hf_body_remaining(&h.f, d)


cdef void http_skipped(RelayEngine *e, RelayConn *c, int d, uint64_t n) noexcept nogil:
    """n bytes of side d were spliced past the framer (n <= http_may_skip)."""
    cdef uint64_t now = <uint64_t>relay_now_ns()
    c.http.last_active_ns = <int64_t>now
    if c.http.h2 != NULL:
        h2_skip(c.http.h2, d, n, now, &e.h2ev)
        http_h2_events(e, c)
        return
    hf_skip(&c.http.f, d, n, now, &e.ev)
    http_events(e, c)


cdef void http_source_eof(RelayEngine *e, RelayConn *c, int d) noexcept nogil:
    hf_eof(&c.http.f, d, <uint64_t>relay_now_ns(), &e.ev)
    http_events(e, c)
    if d == 1:
        # A close-delimited response ends here, and all of it was already written.
        http_written(e, c)
    if http_unfinished(c.http):
        http_cut_by(c, d)


# ---- the engine's own answers -------------------------------------------------------------------

cdef int http_answer(RelayEngine *e, RelayConn *c) noexcept nogil:
    """Every response owed before the error is written: answer, then close (lingering).

    Returns as relay_pump_dir does (RELAY_WAIT, RELAY_BUDGET); both directions of the record
    end here, the client's one carrying on as a discarding reader until the client closes.
    """
    cdef RelayHttp *h = c.http
    cdef RelayDir *up = &c.dir[0]
    cdef int i
    h.rejecting = 0
    notice_answered(e, c)
    c.dir[1].done = 1
    # Nothing more goes to the instance: drop what is still buffered for it.
    relay_drop_pipe(e, up)
    if up.length:
        relay_count(e, RC_INFLIGHT, -<int64_t>up.length)
        up.length = 0
    relay_return_buf(e, up)
    shutdown(c.fd[1], SHUT_WR)
    if h.reject_status == 0:
        up.done = 1
        shutdown(c.fd[0], SHUT_WR)
        return RELAY_WAIT
    i = http_answer_index(h.reject_status)
    if i >= 0:
        # A few hundred bytes into a socket whose responses were all written: the send
        # buffer has room; if it does not, the client was not reading anyway.
        send(c.fd[0], http_answer_text[i], http_answer_len[i], MSG_NOSIGNAL | MSG_DONTWAIT)
    c.answered = h.reject_status
    relay_count(e, RC_HTTP_ANSWERED, 1)
    shutdown(c.fd[0], SHUT_WR)
    h.lingering = 1
    h.linger_until_ns = relay_now_ns() + HTTP_LINGER_NS
    c.readable[0] = 1
    return http_linger(e, c, e.budget)


cdef int http_linger(RelayEngine *e, RelayConn *c, int budget) noexcept nogil:
    """Read and discard the client's bytes until it closes (the answer is already written).

    Returns RELAY_WAIT (the client is drained, or done: p.done set), or RELAY_BUDGET when
    `budget` recv() calls did not drain it."""
    cdef RelayDir *p = &c.dir[0]
    cdef ssize_t n
    if relay_borrow_buf(e, p) == NULL:
        p.done = 1
        return RELAY_WAIT
    while budget > 0:
        budget -= 1
        if not c.readable[0]:
            relay_return_buf(e, p)
            return RELAY_WAIT
        n = recv(c.fd[0], p.buf, e.small_buffer, MSG_DONTWAIT)
        relay_count(e, RC_CALLS_RECV, 1)
        if n > 0:
            continue
        if n < 0 and errno == EAGAIN:
            c.readable[0] = 0
            relay_return_buf(e, p)
            return RELAY_WAIT
        if n < 0 and errno == EINTR:
            continue
        # EOF, or the client reset: either way it is done with us.
        relay_return_buf(e, p)
        p.done = 1
        return RELAY_WAIT
    return RELAY_BUDGET


cdef void http_start_answer(RelayEngine *e, RelayConn *c, uint16_t status) noexcept nogil:
    """Answer `status` now (the response stream is at a message boundary)."""
    cdef RelayHttp *h = c.http
    h.halted[0] = 1
    h.halted[1] = 1
    h.rejecting = 1
    h.reject_status = status
    h.stop_pos[1] = c.dir[1].bytes
    relay_pump(e, c)


# ---- timeouts -----------------------------------------------------------------------------------

cdef int http_sweep_wait_ms(RelayEngine *e) noexcept nogil:
    return relay_wait_ms(e.next_sweep_ns)


cdef inline bint http_quiet(RelayConn *c) noexcept nogil:
    """Nothing of either direction is buffered and every finished response is written."""
    return (c.dir[0].length == 0 and c.dir[0].in_pipe == 0 and c.dir[1].length == 0
            and c.dir[1].in_pipe == 0 and c.http.npending == 0)


cdef void http_sweep(RelayEngine *e) noexcept nogil:
    cdef int64_t now = relay_now_ns()
    cdef RelayConn *c
    cdef RelayConn *nxt
    cdef RelayHttp *h
    cdef int phase
    if now < e.next_sweep_ns:
        return
    e.next_sweep_ns = now + e.sweep_ns
    c = e.live
    while c != NULL:
        nxt = c.next
        h = c.http
        if h == NULL or c.closed or c.connecting:
            c = nxt
            continue
        if h.lingering:
            if now >= h.linger_until_ns:
                relay_finish(e, c)
            c = nxt
            continue
        if h.halted[0] or h.halted[1]:
            c = nxt
            continue
        phase = hf_request_phase(&h.f)
        if phase == HF_PHASE_OPENING and e.opening_timeout_ns > 0 and (
                now - <int64_t>h.f.side[HF_REQUEST].t_head_start >= e.opening_timeout_ns):
            # Nothing was asked, so nothing is answered.
            if e.opening_timeout_ns == e.header_timeout_ns:
                relay_count(e, RC_HTTP_HEADER_TIMEOUTS, 1)
                relay_notice(e, c, NOTICE_HEADER_TIMEOUT, NR_NOTHING_SENT, 0, 0)
            else:
                relay_count(e, RC_HTTP_IDLE_CLOSED, 1)
                relay_notice(e, c, NOTICE_IDLE_CLOSED, NR_NOTHING_SENT, 0, 0)
            relay_finish(e, c)
        elif phase == HF_PHASE_HEAD and e.header_timeout_ns > 0 and (
                now - <int64_t>h.f.side[HF_REQUEST].t_head_start >= e.header_timeout_ns):
            relay_count(e, RC_HTTP_HEADER_TIMEOUTS, 1)
            if h.f.n_requests == h.f.n_answered and http_quiet(c):
                http_start_answer(e, c, 408)
            else:
                relay_notice(e, c, NOTICE_HEADER_TIMEOUT, NR_RESPONSES_OWED, 0, 0)
                http_cut_by(c, 0)   # the client was too slow: what is under way is its cut
                relay_abort(e, c, ETIMEDOUT)
        elif phase == HF_PHASE_IDLE and e.idle_timeout_ns > 0 and http_quiet(c) and (
                now - h.last_active_ns >= e.idle_timeout_ns):
            relay_count(e, RC_HTTP_IDLE_CLOSED, 1)
            relay_notice(e, c, NOTICE_IDLE_CLOSED, NR_IDLE, 0, 0)
            relay_finish(e, c)
        c = nxt
