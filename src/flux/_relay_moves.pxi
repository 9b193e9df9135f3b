# The data path: the four moves a direction makes and the policy that picks among them
# (included by _splice.pyx).
#
# Each connection has two directions (client -> upstream, upstream -> client).  A direction
# starts in *copy* mode: recv() into a small buffer lent from a pool while it holds bytes, send()
# to the other side.  Small keep-alive messages are bound by syscalls and wake-ups, and splicing
# them through a pipe costs two extra syscalls per message (it cost HAProxy 16% here), so they are
# copied.  When a recv() fills the whole buffer the flow is bulk and the direction switches to
# *splice* mode: socket -> pipe -> socket with splice(2), moving page references instead of bytes.
# A spliced direction goes back to copy mode when a whole readable burst brought less than one
# small buffer's worth (the flow went quiet: the next message is probably small again).
#
# Readiness is edge-triggered: every socket is registered once (IN|OUT|RDHUP|ET) and never
# modified, so back-pressure costs no epoll_ctl.  The engine remembers per socket whether it may
# be readable / writable; an edge sets the flag, EAGAIN clears it.  A direction moves bytes only
# while its destination is writable, and reads only when nothing of it is in flight, so at most
# one pipe (or one small buffer) per direction is buffered: a slow reader stalls its writer.
# A short recv() means the socket was drained (any later arrival raises a new edge), unless a
# FIN was already reported (RDHUP), in which case the engine reads on until recv() returns 0.
# A splice() into a pipe can stop short because the pipe ran out of slots, so splice mode only
# trusts EAGAIN on an empty pipe.  Each direction gets a budget of syscalls per turn; a
# connection that used it up goes on a ready list served after the next non-blocking epoll poll,
# so one bulk flow cannot starve the others.
#
# Layers (as HAProxy's raw_sock.c: one function per move, the policy one layer up):
#   relay_send_from_buf     buffer -> destination socket    send()
#   relay_splice_from_pipe  pipe -> destination socket      splice()
#   relay_splice_into_pipe  source socket -> pipe           splice()
#   relay_recv_into_buf     source socket -> buffer         recv()
#   relay_pump_dir          the policy: what is in flight goes out first; then end of stream,
#                           readiness, and copy or splice for what comes in
#   relay_pump              both directions of a connection, and what their results mean
# A move returns RELAY_AGAIN (it made progress, or was interrupted: the policy goes round again
# within its budget), RELAY_WAIT (it needs readiness it does not have; the flag is cleared) or an
# errno (the connection fails).  HTTP connections only add hook calls (_relay_http.pxi), one
# pause -- the client's direction reads nothing while the framer's ring of pipelined requests
# is full, and relay_pump resumes it when the response direction freed a slot -- and one hold:
# the client's bytes of a request head not complete at the end of a read stay in its buffer
# (p.held, after what goes now), the next read appends to them, and they go once the head is
# complete (or never, if it is refused).


cdef inline void relay_delivered(RelayEngine *e, RelayConn *c, int d, ssize_t n) noexcept nogil:
    """n bytes of direction d reached its destination: count them, and let the HTTP hooks end
    the exchanges they complete."""
    c.dir[d].bytes += <uint64_t>n
    if c.svc != NULL:
        flux_relay_bump(&c.svc.bytes[d], n)
    relay_count(e, RC_INFLIGHT, -n)
    if d == 1 and c.http != NULL and c.http.npending:
        http_written(e, c)


cdef inline int relay_send_from_buf(RelayEngine *e, RelayConn *c, int d) noexcept nogil:
    """Send the direction's buffered bytes (p.length > 0) to its destination.

    Returns RELAY_AGAIN after sending some (p.off and p.length advanced, the bytes counted as
    delivered) or on EINTR; RELAY_WAIT when the destination is not writable (the flag cleared
    on EAGAIN); else the errno.  The buffer stays lent: the caller rests the direction once
    it is empty and nothing more is readable.
    """
    cdef RelayDir *p = &c.dir[d]
    cdef ssize_t n
    if not c.writable[1 - d]:
        return RELAY_WAIT
    n = send(c.fd[1 - d], p.buf + p.off, p.length, MSG_NOSIGNAL | MSG_DONTWAIT)
    relay_count(e, RC_CALLS_SEND, 1)
    if n < 0:
        if errno == EAGAIN:
            c.writable[1 - d] = 0
            return RELAY_WAIT
        if errno == EINTR:
            return RELAY_AGAIN
        http_cut_by(c, 1 - d)
        return errno
    p.off += <uint32_t>n
    p.length -= <uint32_t>n
    relay_count(e, RC_BYTES_COPIED, n)
    relay_delivered(e, c, d, n)
    return RELAY_AGAIN


cdef inline int relay_splice_from_pipe(RelayEngine *e, RelayConn *c, int d) noexcept nogil:
    """Splice the bytes in the direction's pipe (p.in_pipe > 0) to its destination.

    Returns RELAY_AGAIN after moving some (p.in_pipe lowered, the bytes counted as delivered)
    or on EINTR; RELAY_WAIT when the destination is not writable (the flag cleared on EAGAIN);
    else the errno.  The pipe stays lent: the caller returns it once it is empty.
    """
    cdef RelayDir *p = &c.dir[d]
    cdef ssize_t n
    if not c.writable[1 - d]:
        return RELAY_WAIT
    n = splice(p.pipe_r, NULL, c.fd[1 - d], NULL, p.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
    relay_count(e, RC_CALLS_SPLICE, 1)
    if n < 0:
        if errno == EAGAIN:
            c.writable[1 - d] = 0
            return RELAY_WAIT
        if errno == EINTR:
            return RELAY_AGAIN
        http_cut_by(c, 1 - d)
        return errno
    p.in_pipe -= <size_t>n
    relay_count(e, RC_BYTES_SPLICED, n)
    relay_delivered(e, c, d, n)
    return RELAY_AGAIN


cdef inline int relay_splice_into_pipe(RelayEngine *e, RelayConn *c, int d,
                                       size_t limit) noexcept nogil:
    """Splice up to `limit` bytes from the direction's source into its lent pipe, which must
    be empty (so that EAGAIN can only mean the socket is drained).

    Returns RELAY_AGAIN after bytes entered the pipe (p.in_pipe, p.burst and the in-flight
    count raised, the HTTP framer told they went past it), at EOF (p.eof set, the framer
    told) or on EINTR; RELAY_WAIT when the source is drained (the readable flag cleared; the
    pipe, still empty and lent, is the caller's to return); else the errno.
    """
    cdef RelayDir *p = &c.dir[d]
    cdef ssize_t n = splice(c.fd[d], NULL, p.pipe_w, NULL, limit,
                            SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
    relay_count(e, RC_CALLS_SPLICE, 1)
    if n > 0:
        p.in_pipe = <size_t>n
        p.burst += <size_t>n
        relay_count(e, RC_INFLIGHT, n)
        if c.http != NULL:
            http_skipped(e, c, d, <uint64_t>n)
        return RELAY_AGAIN
    if n == 0:
        p.eof = 1
        if c.http != NULL:
            http_source_eof(e, c, d)
        return RELAY_AGAIN
    if errno == EAGAIN:
        c.readable[d] = 0
        return RELAY_WAIT
    if errno == EINTR:
        return RELAY_AGAIN
    http_cut_by(c, d)
    return errno


cdef inline int relay_recv_into_buf(RelayEngine *e, RelayConn *c, int d,
                                    size_t *got) noexcept nogil:
    """Receive into the direction's buffer (borrowed here if it holds none; it must have no
    bytes to send), after its held bytes if it keeps a request head (moved to the front of the
    buffer first, and to a larger buffer when they fill it).

    Returns RELAY_AGAIN with *got > 0 bytes now at p.buf[p.held:p.held + *got], neither shown
    to the HTTP framer nor counted in flight yet (the caller owes relay_hold_buf), and the
    readable flag cleared after a short read that drained the socket; RELAY_AGAIN with
    *got == 0 at EOF (p.eof set, the framer told) or on EINTR; RELAY_WAIT when the source is
    drained (the flag cleared, the direction rested); ENOMEM when no buffer can be had; else
    the errno.
    """
    cdef RelayDir *p = &c.dir[d]
    cdef ssize_t n
    cdef size_t room
    got[0] = 0
    if relay_borrow_buf(e, p) == NULL:
        return ENOMEM
    if p.held:
        if p.off:
            memmove(p.buf, p.buf + p.off, p.held)
            p.off = 0
        # A head is at most HF_MAX_HEAD bytes (the framer answers 431 past that), so growing
        # by doubling up to that plus a read's worth always leaves room for a whole read.
        if p.held == p.size and relay_grow_buf(
                e, p, min(2 * <size_t>p.size, HF_MAX_HEAD + e.small_buffer)) == NULL:
            return ENOMEM
    room = p.size - p.held
    n = recv(c.fd[d], p.buf + p.held, room, MSG_DONTWAIT)
    relay_count(e, RC_CALLS_RECV, 1)
    if n > 0:
        if <size_t>n < room and not c.rdhup[d]:
            c.readable[d] = 0
        got[0] = <size_t>n
        return RELAY_AGAIN
    if n == 0:
        p.eof = 1
        if c.http != NULL:
            http_source_eof(e, c, d)
        return RELAY_AGAIN
    if errno == EAGAIN:
        c.readable[d] = 0
        relay_rest(e, p)
        return RELAY_WAIT
    if errno == EINTR:
        return RELAY_AGAIN
    http_cut_by(c, d)
    return errno


cdef inline int relay_hold_buf(RelayEngine *e, RelayConn *c, int d, size_t n) noexcept nogil:
    """The n bytes relay_recv_into_buf just received become the direction's buffered bytes:
    shown to the HTTP framer first (so a response is never seen before its request), which
    may keep back what follows a malformed request, and hold a request head not complete
    yet (with the held bytes before them, which then go too if it is); the complete heads
    among them rewritten for a --forwarded service (X-Forwarded-For: _relay_forwarded.pxi).
    Returns RELAY_AGAIN, or ENOMEM when a rewrite found no memory (the connection fails)."""
    cdef RelayDir *p = &c.dir[d]
    p.off = 0
    if c.http != NULL:
        n = http_observe(e, c, d, p.buf + p.held, n)
        if c.http.fwd != NULL and c.http.fwd.nheads and http_forward_heads(e, c, &n) != 0:
            return ENOMEM
    p.length = <uint32_t>n
    relay_count(e, RC_INFLIGHT, <int64_t>n)
    return RELAY_AGAIN


cdef inline int relay_end_dir(RelayEngine *e, RelayConn *c, int d) noexcept nogil:
    """The source reached EOF and all its bytes are written: end the direction (p.done) and
    pass the EOF on with shutdown(SHUT_WR), unless the other direction has ended too (then the
    close that follows sends the FIN: one syscall fewer per connection).  Returns RELAY_WAIT,
    or the errno of a failed shutdown."""
    cdef RelayDir *p = &c.dir[d]
    relay_rest(e, p)
    p.done = 1
    if c.dir[1 - d].done:
        return RELAY_WAIT
    if shutdown(c.fd[1 - d], SHUT_WR) < 0:
        http_cut_by(c, 1 - d)
        return errno
    return RELAY_WAIT


cdef inline size_t relay_splice_limit(RelayEngine *e, RelayConn *c, int d) noexcept nogil:
    """How much one splice into the pipe may take: a pipe's worth, and on an HTTP connection
    only bytes the framer need not see (a body of known length, the rest of a chunk, an opaque
    stream).  0: nothing may bypass the framer now, the direction must copy."""
    cdef uint64_t body
    if c.http == NULL:
        return e.pipe_size
    body = http_may_skip(c.http, d)
    if body < e.pipe_size:
        return <size_t>body
    return e.pipe_size


cdef int relay_pump_dir(RelayEngine *e, RelayConn *c, int d) noexcept nogil:
    """Move one direction's bytes as far as readiness and the budget allow (the policy).

    Returns RELAY_WAIT (0) when waiting for readiness, RELAY_BUDGET (-1) when the syscall
    budget ran out with work left (the caller queues the connection on the ready list), or an
    errno on failure (the caller aborts the connection).
    """
    cdef RelayDir *p = &c.dir[d]
    cdef int budget = e.budget
    cdef int rc
    cdef size_t limit, got
    if p.done:
        return RELAY_WAIT
    if c.http != NULL and c.http.lingering and d == 0:
        return http_linger(e, c, budget)
    while True:
        budget -= 1
        if budget < 0:
            return RELAY_BUDGET
        # What is in flight goes out first: nothing new is read until it is written.
        if p.length:
            rc = relay_send_from_buf(e, c, d)
        elif p.in_pipe:
            rc = relay_splice_from_pipe(e, c, d)
        elif c.http != NULL and c.http.halted[d]:
            # HTTP: the framer stopped this source (a malformed request, or the engine's own
            # answer is due once the responses before it are out); a held head never goes.
            p.held = 0
            relay_rest(e, p)
            if d == 1 and c.http.rejecting:
                return http_answer(e, c)
            return RELAY_WAIT
        elif d == 0 and c.http != NULL and (c.http.unshown or hf_request_blocked(&c.http.f)):
            # HTTP: HF_RING requests await their responses (back-pressure, see Pipelining in
            # _http_framer.pxi): read nothing more until a response frees a slot (relay_pump
            # comes back then), then show what was kept of the last read.
            if hf_request_blocked(&c.http.f):
                c.http.ring_wait = 1
                if not c.http.unshown:
                    relay_rest(e, p)
                return RELAY_WAIT
            rc = http_show_kept(e, c)
        elif p.held and not http_holding(c.http):
            # HTTP: the held bytes are no longer a head to judge (the instance's response
            # switched protocols or was given up on, or the client ended its stream): they go.
            p.length = p.held
            p.held = 0
            relay_count(e, RC_INFLIGHT, <int64_t>p.length)
            rc = RELAY_AGAIN
        elif p.eof:
            return relay_end_dir(e, c, d)
        elif not c.readable[d]:
            relay_rest(e, p)
            return RELAY_WAIT
        elif p.bulk:
            limit = relay_splice_limit(e, c, d)
            if limit == 0:
                p.bulk = 0
                continue
            relay_return_buf(e, p)
            if p.pipe_r < 0 and relay_borrow_pipe(e, p) < 0:
                p.bulk = 0      # no pipe to be had: copy
                continue
            rc = relay_splice_into_pipe(e, c, d, limit)
            if rc == RELAY_WAIT:
                if p.burst < e.small_buffer:
                    p.bulk = 0  # the burst was small: the flow went quiet, copy again
                p.burst = 0
                relay_return_pipe(e, p)
        else:
            rc = relay_recv_into_buf(e, c, d, &got)
            if got:
                if got == e.small_buffer and (
                        c.http == NULL or http_may_skip(c.http, d) >= e.small_buffer):
                    # A full buffer: the flow is bulk, splice from now on.
                    p.bulk = 1
                    p.burst = 0
                    relay_count(e, RC_BULK_SWITCHES, 1)
                rc = relay_hold_buf(e, c, d, got)
        if rc != RELAY_AGAIN:
            return rc


cdef void relay_pump(RelayEngine *e, RelayConn *c) noexcept nogil:
    """Pump both directions; abort the connection on an error, finish it when both ended, and
    queue it on the ready list when a direction's budget ran out."""
    cdef int a
    cdef int b
    if c.connecting:
        return
    a = relay_pump_dir(e, c, 0)
    if a > 0:
        relay_abort(e, c, a)
        return
    b = relay_pump_dir(e, c, 1)
    if b > 0:
        relay_abort(e, c, b)
        return
    if c.http != NULL and ((c.http.ring_wait and not hf_request_blocked(&c.http.f))
                           or (c.dir[0].held and not http_holding(c.http))):
        # A response ended and freed a slot of the framer's ring, or made the held head no
        # head (a switch, a give-up, the instance's end): the client's bytes move on.
        c.http.ring_wait = 0
        a = relay_pump_dir(e, c, 0)
        if a > 0:
            relay_abort(e, c, a)
            return
    if c.dir[0].done and c.dir[1].done:
        relay_finish(e, c)
        return
    if (a < 0 or b < 0) and not c.queued:
        c.queued = 1
        c.ready_next = e.ready
        e.ready = c
