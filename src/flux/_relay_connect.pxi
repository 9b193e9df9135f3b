# The engine connecting the upstream itself (included by _splice.pyx).
#
# With connect() the caller hands over only the client and the upstream's address: the engine
# makes the socket, connects it without blocking and registers both sides at once.  Nothing is
# read from the client until the upstream is connected, so a failed connect has consumed
# nothing: the client descriptor goes back to the caller untouched (deregistered, still open)
# with the errno, and the caller may try another instance.  A connect still pending at its
# deadline fails with ETIMEDOUT.  A connection that came up is published once (its token, on
# the established queue) so the caller can count it.

cdef void relay_start_connect(RelayEngine *e, RelayConn *c) noexcept nogil:
    cdef int fd
    cdef int family = (<uint16_t *>c.addr)[0]
    relay_count(e, RC_CONNECTS, 1)
    fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        relay_connect_failed(e, c, errno)
        return
    c.fd[1] = fd
    if connect(fd, <sockaddr *>c.addr, c.addr_len) < 0:
        if errno != EINPROGRESS:
            relay_connect_failed(e, c, errno)
            return
        c.connecting = 1
        if e.connecting == 0:
            e.next_connect_sweep_ns = relay_now_ns() + RELAY_CONNECT_SWEEP_NS
        e.connecting += 1
    elif c.self_check and relay_self_connected(c):
        relay_connect_failed(e, c, ECONNREFUSED)
        return
    else:
        relay_established(e, c)
    relay_register(e, c)


cdef bint relay_self_connected(RelayConn *c) noexcept nogil:
    """The upstream socket is connected to itself: a connect to a local port nobody listens
    on can pick that very port as its source (TCP simultaneous open), and then every byte
    sent comes back.  Needs a port where nothing listens and an ephemeral range pressed
    hard enough to offer that port (the namespace test makes one).  So the check (a
    getsockname() per connection) runs only where it can: c.self_check, set for a target
    on an address of this host with its port in the ephemeral range (set_pool works that out
    once per snapshot) and for every connection the caller submits."""
    cdef sockaddr_in local
    cdef sockaddr_in *target = <sockaddr_in *>c.addr
    cdef socklen_t size = sizeof(local)
    if target.sin_family != AF_INET:
        return False
    if getsockname(c.fd[1], <sockaddr *>&local, &size) < 0:
        return False
    return local.sin_port == target.sin_port and local.sin_addr.s_addr == target.sin_addr.s_addr


cdef void relay_established(RelayEngine *e, RelayConn *c) noexcept nogil:
    if c.connecting:
        c.connecting = 0
        e.connecting -= 1
    if c.token == 0:
        accept_count_up(e, c)   # the engine's own: counted here, nothing to publish
        return
    c.est_next = e.est_local
    e.est_local = c


cdef void relay_connect_failed(RelayEngine *e, RelayConn *c, int err) noexcept nogil:
    """Close the upstream socket and give the client back, open and unread."""
    if c.fd[1] >= 0:
        relay_close_socket(e, c, 1)
    else:
        relay_count(e, RC_SOCKETS_CLOSED, 1)    # never made, but counted as owned
    if c.registered[0]:
        epoll_ctl(e.epfd, EPOLL_CTL_DEL, c.fd[0], NULL)
        c.registered[0] = 0
    relay_count(e, RC_SOCKETS_CLOSED, 1)        # the client is the caller's again
    relay_count(e, RC_CONNECT_FAILURES, 1)
    c.handed_back = 1
    relay_release_dirs(e, c)
    relay_retire(e, c, err)


cdef void relay_sweep_connects(RelayEngine *e) noexcept nogil:
    cdef int64_t now = relay_now_ns()
    cdef RelayConn *c
    cdef RelayConn *nxt
    if now < e.next_connect_sweep_ns:
        return
    e.next_connect_sweep_ns = now + RELAY_CONNECT_SWEEP_NS
    c = e.live
    while c != NULL:
        nxt = c.next
        if c.connecting and now >= c.connect_deadline_ns:
            relay_connect_failed(e, c, ETIMEDOUT)
        c = nxt
