# What a direction borrows while bytes are in flight: pipes for splicing and small buffers for
# copying (included by _splice.pyx).
#
# Pipes are lent from a pool only while bytes sit in them: a direction borrows a pipe just before
# splicing in and returns it as soon as the pipe is empty again, so idle connections hold no pipe
# (5,000 idle connections would otherwise pin 20,000 descriptors).  Pipes are created with
# pipe2(O_NONBLOCK|O_CLOEXEC) and grown to 1 MiB with F_SETPIPE_SZ: with the default 64 KiB pipes
# a minimal epoll+splice relay spent twice the CPU per byte on this machine.  If no pipe can be
# created (descriptors exhausted) the direction simply keeps copying.

cdef void relay_close_pipe(RelayEngine *e, int r, int w) noexcept nogil:
    close(r)
    close(w)
    relay_count(e, RC_PIPES_CLOSED, 1)


cdef int relay_borrow_pipe(RelayEngine *e, RelayDir *p) noexcept nogil:
    cdef int fds[2]
    if e.pool_len > 0:
        e.pool_len -= 1
        p.pipe_r = e.pool[2 * e.pool_len]
        p.pipe_w = e.pool[2 * e.pool_len + 1]
        relay_count(e, RC_PIPES_IDLE, -1)
    else:
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            # EMFILE/ENFILE: the caller keeps copying through its small buffer instead.
            relay_count(e, RC_PIPE_FAILURES, 1)
            return -1
        # Best effort: a refused size leaves the default 64 KiB pipe, slower but correct.
        if fcntl(fds[1], F_SETPIPE_SZ, <int>e.pipe_size) < 0:
            relay_count(e, RC_PIPE_SIZE_REFUSED, 1)
        relay_count(e, RC_PIPES_CREATED, 1)
        p.pipe_r = fds[0]
        p.pipe_w = fds[1]
    relay_count(e, RC_PIPES_LENT, 1)
    return 0


cdef void relay_return_pipe(RelayEngine *e, RelayDir *p) noexcept nogil:
    """Give an empty pipe back to the pool (or close it when the pool is full)."""
    cdef int queued = 0
    if p.pipe_r < 0:
        return
    if FLUX_RELAY_DEBUG:
        # A pipe lent out again with stale bytes in it would splice them into another stream.
        if ioctl(p.pipe_r, FIONREAD, &queued) < 0 or queued != 0 or p.in_pipe != 0:
            abort()
    if e.pool_len < e.pool_cap:
        e.pool[2 * e.pool_len] = p.pipe_r
        e.pool[2 * e.pool_len + 1] = p.pipe_w
        e.pool_len += 1
        relay_count(e, RC_PIPES_IDLE, 1)
    else:
        relay_close_pipe(e, p.pipe_r, p.pipe_w)
    relay_count(e, RC_PIPES_LENT, -1)
    p.pipe_r = -1
    p.pipe_w = -1


cdef void relay_drop_pipe(RelayEngine *e, RelayDir *p) noexcept nogil:
    """Release a direction's pipe at teardown: bytes still in it die with it."""
    if p.pipe_r < 0:
        return
    if p.in_pipe:
        relay_count(e, RC_INFLIGHT, -<int64_t>p.in_pipe)
        p.in_pipe = 0
        relay_close_pipe(e, p.pipe_r, p.pipe_w)
        relay_count(e, RC_PIPES_LENT, -1)
        p.pipe_r = -1
        p.pipe_w = -1
    else:
        relay_return_pipe(e, p)


# ---- copy buffers -------------------------------------------------------------------------------
# Like pipes, copy buffers are lent only while bytes sit in them: a direction borrows one just
# before recv() and gives it back as soon as it is empty and the source has nothing more now, so
# an idle connection holds none (16 KiB per direction otherwise: 9.4 KiB of RSS per connection
# after one request, measured, against 1.1 KiB for one never used).  A request head held until
# it is complete (_relay_http.pxi) may outgrow its buffer: it moves to a larger one of its own
# (relay_grow_buf), freed rather than pooled when the direction gives it back.

cdef char *relay_borrow_buf(RelayEngine *e, RelayDir *p) noexcept nogil:
    if p.buf != NULL:
        return p.buf
    if e.buffers_len > 0:
        e.buffers_len -= 1
        p.buf = e.buffers[e.buffers_len]
        relay_count(e, RC_BUFFERS_IDLE, -1)
    else:
        p.buf = <char *>malloc(e.small_buffer)
        if p.buf == NULL:
            return NULL
    p.size = <uint32_t>e.small_buffer
    relay_count(e, RC_BUFFERS_LENT, 1)
    return p.buf


cdef char *relay_grow_buf(RelayEngine *e, RelayDir *p, size_t size) noexcept nogil:
    """Move the direction's held bytes (p.held of them, at p.buf) to a buffer of `size` bytes
    of its own, and give the old one back.  Returns the new buffer, or NULL (nothing changed)
    when none can be had."""
    cdef char *grown = <char *>malloc(size)
    cdef uint32_t held = p.held
    if grown == NULL:
        return NULL
    memcpy(grown, p.buf, held)
    relay_return_buf(e, p)
    p.buf = grown
    p.size = <uint32_t>size
    p.held = held
    relay_count(e, RC_BUFFERS_LENT, 1)
    return grown


cdef void relay_return_buf(RelayEngine *e, RelayDir *p) noexcept nogil:
    """Give the direction's buffer back (its bytes, if any, are dropped, held ones too:
    callers make sure there are none unless the connection is being torn down or the engine
    answers the client itself)."""
    if p.buf == NULL:
        return
    if p.size == e.small_buffer and e.buffers_len < e.buffers_cap:
        e.buffers[e.buffers_len] = p.buf
        e.buffers_len += 1
        relay_count(e, RC_BUFFERS_IDLE, 1)
    else:
        free(p.buf)
    relay_count(e, RC_BUFFERS_LENT, -1)
    p.buf = NULL
    p.held = 0


cdef inline void relay_rest(RelayEngine *e, RelayDir *p) noexcept nogil:
    """The direction waits with nothing in flight: hold no pipe, and no buffer unless it keeps
    a request head that is not complete yet."""
    relay_return_pipe(e, p)
    if p.length == 0 and p.held == 0:
        relay_return_buf(e, p)
