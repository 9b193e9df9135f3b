# A connection's life in the engine: registering its sockets, ending it cleanly or with a reset,
# and retiring its record for publication (included by _splice.pyx).
#
# Half-close: EOF on a source, once its bytes are written, becomes shutdown(SHUT_WR) on the
# destination (_relay_moves.pxi); the other direction carries on.  When both directions have
# ended both sockets are closed (relay_finish).  An error on either side (reset, EPIPE,
# SO_ERROR) closes both with SO_LINGER {1, 0} so each peer sees a reset as well (relay_abort).
#
# Preface: a service whose instances read a PROXY protocol header first gets it as bytes already
# in flight in the client's direction (relay_preface): the data path sends what is in flight
# before it reads anything new, and nothing moves before the upstream is connected, so the
# header goes first, alone, with no path of its own (counted as bytes to the instance).

cdef void relay_release_dirs(RelayEngine *e, RelayConn *c) noexcept nogil:
    cdef int d
    for d in range(2):
        relay_drop_pipe(e, &c.dir[d])
        if c.dir[d].length:
            relay_count(e, RC_INFLIGHT, -<int64_t>c.dir[d].length)
            c.dir[d].length = 0
        relay_return_buf(e, &c.dir[d])


cdef void relay_retire(RelayEngine *e, RelayConn *c, int err) noexcept nogil:
    """Unlink a closed connection; it is published as a completion at the end of the batch."""
    c.closed = 1
    c.err = err
    c.duration_ns = relay_now_ns() - c.started_ns
    if c.connecting:
        c.connecting = 0
        e.connecting -= 1
    if c.http != NULL:
        http_release(e, c)
    if c.prev != NULL:
        c.prev.next = c.next
    elif e.live == c:
        e.live = c.next
    if c.next != NULL:
        c.next.prev = c.prev
    c.prev = NULL
    c.next = NULL
    c.link = NULL
    if c.token == 0 and accept_retire(e, c):
        return
    if e.finished_tail != NULL:
        e.finished_tail.link = c
    else:
        e.finished_head = c
    e.finished_tail = c


cdef void relay_close_socket(RelayEngine *e, RelayConn *c, int s) noexcept nogil:
    # Deregister explicitly: close() alone leaves the registration alive while another process
    # holds the socket (a child between fork and exec, e.g. iptables-restore being spawned), and
    # its events would then carry a pointer to a freed connection.
    if c.registered[s]:
        epoll_ctl(e.epfd, EPOLL_CTL_DEL, c.fd[s], NULL)
        c.registered[s] = 0
    close(c.fd[s])
    relay_count(e, RC_SOCKETS_CLOSED, 1)


cdef void relay_finish(RelayEngine *e, RelayConn *c) noexcept nogil:
    """Both directions ended cleanly: close both sockets."""
    relay_release_dirs(e, c)
    relay_close_socket(e, c, 0)
    relay_close_socket(e, c, 1)
    relay_retire(e, c, 0)


cdef void relay_abort(RelayEngine *e, RelayConn *c, int err) noexcept nogil:
    """Close both sockets with a reset (SO_LINGER {1, 0}) so each peer learns of the failure."""
    cdef linger lg
    cdef int s
    lg.l_onoff = 1
    lg.l_linger = 0
    relay_release_dirs(e, c)
    for s in range(2):
        setsockopt(c.fd[s], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
        relay_close_socket(e, c, s)
    relay_retire(e, c, err)


cdef int relay_preface(RelayEngine *e, RelayConn *c, const char *data, size_t n) noexcept nogil:
    """Put ``n`` (<= RELAY_PREFACE_MAX) bytes in the client direction's buffer, in flight, for
    the instance to get before anything of the client's.  Only before the connection's first
    pump.  Returns 0, or -1 when no buffer can be had (the caller ends the connection)."""
    cdef RelayDir *p = &c.dir[0]
    if relay_borrow_buf(e, p) == NULL:
        return -1
    memcpy(p.buf, data, n)
    p.off = 0
    p.length = <uint32_t>n
    relay_count(e, RC_INFLIGHT, <int64_t>n)
    return 0


cdef void relay_register(RelayEngine *e, RelayConn *c) noexcept nogil:
    cdef epoll_event ev
    cdef int one = 1
    cdef int s
    for s in range(2):
        # The caller may hand over blocking sockets; the engine must never block.  (A socket the
        # engine made itself is non-blocking from the start.)
        # Clients the engine accepted itself are non-blocking already.
        if ((s == 0 and c.token != 0) or (s == 1 and c.addr_len == 0)) and ioctl(
                c.fd[s], FIONBIO, &one) < 0:
            relay_abort(e, c, errno)
            return
        # Not TCP (e.g. a Unix socket in a test) is fine: the option just does not apply.  A
        # client accepted from a listening socket that had it has it already (inherited).
        if s == 1 or not c.client_nodelay:
            setsockopt(c.fd[s], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    c.next = e.live
    c.prev = NULL
    if e.live != NULL:
        e.live.prev = c
    e.live = c
    for s in range(2):
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = <uint64_t><uintptr_t>c | <uint64_t>s
        if epoll_ctl(e.epfd, EPOLL_CTL_ADD, c.fd[s], &ev) < 0:
            relay_abort(e, c, errno)
            return
        c.registered[s] = 1
