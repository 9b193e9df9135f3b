# Notices: what an HTTP connection's data path did on its own, queued for a log line (included
# by _splice.pyx).
#
# Theory of operation
# -------------------
# The engine answers malformed requests, enforces the HTTP timeouts, gives up framing, switches
# protocols and counts exchanges cut short; each is counted (RC_*), and each is worth a line in
# fluxd's log naming the service, the client and the reason.  The engine never formats text:
# the hook where it happens (relay_notice, one call) writes a small fixed-size record
# (RelayNotice: kind, reason, status, the connection's token or service and instance, the
# client's IPv4 address and port, the byte counts and age for -debug) into the shard's local
# buffer, and relay_publish moves the batch to the shared queue under the same lock and in the
# same critical section as exchanges and completions (notice_publish), so a connection's
# notices are always drained before its completion.  drain_all() hands them over as Notice
# tuples, kind and reason by name (NOTICE_KINDS, NOTICE_REASONS); flux.relay.notices turns them
# into lines and rate-limits them per service.
#
# The queue is bounded: at most NOTICES_MAX records wait at each end (the batch's, the
# published ones).  A flood beyond that (a million bad requests between two drains) loses the
# records, not the counts: each lost record is counted in notices_dropped, and the events
# themselves in their own counters.  A notice costs nothing until something unusual happens,
# and then a few dozen bytes.
#
# Kinds and reasons are tables: a new kind is a NOTICE_* value, its name in NOTICE_KINDS and
# its row in flux.relay.notices (the line it makes); its reasons NR_* values with their names.

# The names drain_all() gives kinds and reasons (NOTICE_* and HF_ERR_* / NR_* in _splice.pxd).
NOTICE_KINDS = ("rejected", "header-timeout", "idle-closed", "opaque", "switched", "cut",
                "h2-gave-up")
NOTICE_REASONS = _HF_REASONS + ("",) * (NR_NOTHING_SENT - len(_HF_REASONS)) + (
    "nothing-sent", "head-incomplete", "responses-owed", "idle", "upgrade", "connect",
    "client", "instance", "fluxd",
) + _H2_REASONS[1:]

Notice = _namedtuple(
    "Notice",
    "kind reason status exchanges token service instance client_ip client_port bytes_up "
    "bytes_down age_ns",
)
Notice.__doc__ = """Something an HTTP connection's data path did on its own (see
_relay_notice.pxi): kind and reason by name, the status answered or switched to (0: none),
exchanges (cut short), the connection's token (0: one the engine accepted, named by
service and instance), the client's IPv4 address (network-order integer) and port, bytes
delivered to the instance and to the client so far, and the connection's age in ns."""
Notice.__module__ = __name__


cdef RelayNotice *notice_slot(RelayEngine *e) noexcept nogil:
    """A free record in the batch's buffer, or NULL (counted as dropped): NOTICES_MAX wait
    already, or no memory."""
    cdef size_t cap
    cdef RelayNotice *grown
    if e.nt_local_len == e.nt_local_cap:
        if e.nt_local_cap == NOTICES_MAX:
            relay_count(e, RC_NOTICES_DROPPED, 1)
            return NULL
        cap = 16 if e.nt_local_cap == 0 else min(2 * e.nt_local_cap, <size_t>NOTICES_MAX)
        grown = <RelayNotice *>realloc(e.nt_local, cap * sizeof(RelayNotice))
        if grown == NULL:
            relay_count(e, RC_NOTICES_DROPPED, 1)
            return NULL
        e.nt_local = grown
        e.nt_local_cap = cap
    e.nt_local_len += 1
    return &e.nt_local[e.nt_local_len - 1]


cdef void relay_notice(RelayEngine *e, RelayConn *c, uint8_t kind, uint8_t reason,
                       uint16_t status, uint32_t count) noexcept nogil:
    """Queue a notice of `kind` (NOTICE_*) about connection c, with its reason (HF_ERR_* or
    NR_*), status and count as RelayNotice says; published at the end of the batch."""
    cdef RelayNotice *n = notice_slot(e)
    if n == NULL:
        return
    n.token = c.token
    n.bytes_up = c.dir[0].bytes
    n.bytes_down = c.dir[1].bytes
    n.age_ns = relay_now_ns() - c.started_ns
    n.service = c.svc.id if c.svc != NULL else 0
    n.inst = c.inst
    n.client_ip = c.client_ip
    n.client_port = c.client_port
    n.count = count
    n.status = status
    n.kind = kind
    n.reason = reason


cdef void notice_answered(RelayEngine *e, RelayConn *c) noexcept nogil:
    """The engine answers the client itself (http_answer): 408 is the header timeout's
    answer, anything else (400, 431, 0: closed unanswered) a malformed request's."""
    cdef RelayHttp *h = c.http
    if h.reject_status == 408:
        relay_notice(e, c, NOTICE_HEADER_TIMEOUT, NR_HEAD_INCOMPLETE, 408, 0)
    else:
        relay_notice(e, c, NOTICE_REJECTED, h.f.reject_reason, h.reject_status, 0)


cdef bint notice_publish(RelayEngine *e) noexcept nogil:
    """Move the batch's notices to the shared queue (the caller holds the lock).

    Returns whether the asyncio side should be woken: the queue was empty (a wake-up per
    burst, as for completions; a notice is rare, and its line should not wait for a flush).
    """
    cdef size_t n = e.nt_local_len
    cdef size_t before = e.nt_shared_len
    cdef RelayNotice *grown
    if before + n > NOTICES_MAX:
        relay_count(e, RC_NOTICES_DROPPED, <int64_t>(before + n - NOTICES_MAX))
        n = NOTICES_MAX - before
    if before == 0:
        # drain_all took the last queue (and its buffer): hand this one over whole.
        free(e.nt_shared)
        e.nt_shared = e.nt_local
        e.nt_shared_cap = e.nt_local_cap
        e.nt_shared_len = n
        e.nt_local = NULL
        e.nt_local_cap = 0
    elif n:
        if before + n > e.nt_shared_cap:
            grown = <RelayNotice *>realloc(e.nt_shared, NOTICES_MAX * sizeof(RelayNotice))
            if grown == NULL:
                relay_count(e, RC_NOTICES_DROPPED, <int64_t>n)
                n = 0
            else:
                e.nt_shared = grown
                e.nt_shared_cap = NOTICES_MAX
        if n:
            memcpy(&e.nt_shared[before], e.nt_local, n * sizeof(RelayNotice))
            e.nt_shared_len = before + n
    e.nt_local_len = 0
    return before == 0 and e.nt_shared_len != 0


cdef list notice_records(RelayNotice *records, size_t count):
    """drain_all's Notice tuples for `count` records taken from the shared queue; frees them."""
    cdef list out = []
    cdef size_t i
    cdef RelayNotice *r
    for i in range(count):
        r = &records[i]
        out.append(Notice(NOTICE_KINDS[r.kind], NOTICE_REASONS[r.reason], r.status, r.count,
                          r.token, r.service, r.inst, r.client_ip, r.client_port, r.bytes_up,
                          r.bytes_down, r.age_ns))
    free(records)
    return out
