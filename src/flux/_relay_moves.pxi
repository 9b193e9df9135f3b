# The data path: moving a direction's bytes (included by _splice.pyx).
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


cdef int relay_pump_dir(RelayEngine *e, RelayConn *c, int d) noexcept nogil:
    """Move one direction's bytes as far as readiness allows.

    Returns 0 when waiting for readiness, -1 when the syscall budget ran out with work left,
    or an errno on failure.
    """
    cdef RelayDir *p = &c.dir[d]
    cdef int src = c.fd[d]
    cdef int dst = c.fd[1 - d]
    cdef int budget = e.budget
    cdef ssize_t n
    cdef size_t limit
    cdef uint64_t body
    if p.done:
        return 0
    if c.http != NULL and c.http.lingering and d == 0:
        return http_linger(e, c, budget)
    while True:
        budget -= 1
        if budget < 0:
            return -1
        if p.length:
            if not c.writable[1 - d]:
                return 0
            n = send(dst, p.buf + p.off, p.length, MSG_NOSIGNAL | MSG_DONTWAIT)
            relay_count(e, RC_CALLS_SEND, 1)
            if n < 0:
                if errno == EAGAIN:
                    c.writable[1 - d] = 0
                    return 0
                if errno == EINTR:
                    continue
                return errno
            p.off += <uint32_t>n
            p.length -= <uint32_t>n
            p.bytes += <uint64_t>n
            if c.svc != NULL:
                flux_relay_bump(&c.svc.bytes[d], n)
            relay_count(e, RC_INFLIGHT, -n)
            relay_count(e, RC_BYTES_COPIED, n)
            if d == 1 and c.http != NULL and c.http.npending:
                http_written(e, c)
            continue
        if p.in_pipe:
            if not c.writable[1 - d]:
                return 0
            n = splice(p.pipe_r, NULL, dst, NULL, p.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            relay_count(e, RC_CALLS_SPLICE, 1)
            if n < 0:
                if errno == EAGAIN:
                    c.writable[1 - d] = 0
                    return 0
                if errno == EINTR:
                    continue
                return errno
            p.in_pipe -= <size_t>n
            p.bytes += <uint64_t>n
            if c.svc != NULL:
                flux_relay_bump(&c.svc.bytes[d], n)
            relay_count(e, RC_INFLIGHT, -n)
            relay_count(e, RC_BYTES_SPLICED, n)
            if d == 1 and c.http != NULL and c.http.npending:
                http_written(e, c)
            continue
        # Nothing of this direction is in flight from here on.
        if c.http != NULL and c.http.halted[d]:
            # HTTP: the framer stopped this source (a malformed request, or the engine's own
            # answer is due once the responses before it are out).
            relay_rest(e, p)
            if d == 1 and c.http.rejecting:
                return http_answer(e, c)
            return 0
        if p.eof:
            relay_rest(e, p)
            p.done = 1
            if c.dir[1 - d].done:
                # Both directions have ended: the close that follows sends the FIN (one
                # syscall fewer per connection than shutting down first).
                return 0
            if shutdown(dst, SHUT_WR) < 0:
                return errno
            return 0
        if not c.readable[d]:
            relay_rest(e, p)
            return 0
        if p.bulk:
            limit = e.pipe_size
            if c.http != NULL:
                # Only bytes the framer need not see (a body of known length, the rest of a
                # chunk, an opaque stream) may bypass it.
                body = hf_body_remaining(&c.http.f, d)
                if body == 0:
                    p.bulk = 0
                    continue
                if body < limit:
                    limit = <size_t>body
            relay_return_buf(e, p)
            if p.pipe_r < 0 and relay_borrow_pipe(e, p) < 0:
                p.bulk = 0
                continue
            n = splice(src, NULL, p.pipe_w, NULL, limit, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            relay_count(e, RC_CALLS_SPLICE, 1)
            if n > 0:
                p.in_pipe = <size_t>n
                p.burst += <size_t>n
                relay_count(e, RC_INFLIGHT, n)
                if c.http != NULL:
                    http_skipped(e, c, d, <uint64_t>n)
                continue
            if n == 0:
                p.eof = 1
                if c.http != NULL:
                    http_source_eof(e, c, d)
                continue
            if errno == EAGAIN:
                # The pipe is empty here, so EAGAIN means the socket is.
                c.readable[d] = 0
                if p.burst < e.small_buffer:
                    p.bulk = 0
                p.burst = 0
                relay_return_pipe(e, p)
                return 0
            if errno == EINTR:
                continue
            return errno
        if relay_borrow_buf(e, p) == NULL:
            return ENOMEM
        n = recv(src, p.buf, e.small_buffer, MSG_DONTWAIT)
        relay_count(e, RC_CALLS_RECV, 1)
        if n > 0:
            if <size_t>n < e.small_buffer and not c.rdhup[d]:
                c.readable[d] = 0
            elif <size_t>n == e.small_buffer and (
                    c.http == NULL or hf_body_remaining(&c.http.f, d) >= e.small_buffer):
                p.bulk = 1
                p.burst = 0
                relay_count(e, RC_BULK_SWITCHES, 1)
            if c.http != NULL:
                # Shown before forwarding: a response can never be seen before its request.
                n = <ssize_t>http_observe(e, c, d, p.buf, <size_t>n)
            p.off = 0
            p.length = <uint32_t>n
            relay_count(e, RC_INFLIGHT, n)
            continue
        if n == 0:
            p.eof = 1
            if c.http != NULL:
                http_source_eof(e, c, d)
            continue
        if errno == EAGAIN:
            c.readable[d] = 0
            relay_rest(e, p)
            return 0
        if errno == EINTR:
            continue
        return errno


cdef void relay_pump(RelayEngine *e, RelayConn *c) noexcept nogil:
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
    if c.dir[0].done and c.dir[1].done:
        relay_finish(e, c)
        return
    if (a < 0 or b < 0) and not c.queued:
        c.queued = 1
        c.ready_next = e.ready
        e.ready = c
