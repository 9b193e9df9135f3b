# The relay engine: one native thread, one epoll loop, no GIL and no Python object on the data path.
#
# Theory of operation
# -------------------
# The asyncio side accepts, then hands the client to the engine with the upstream's address
# (connect(): the engine makes the upstream socket and connects it; see "connecting" below), or
# both sockets already connected (add()).  Either only allocates the connection's C record and
# pushes it onto a mutex-protected submission list; an eventfd ("wake") registered in the
# engine's epoll tells the engine thread to take the list.  From then on the engine thread alone
# owns the record and the descriptors.
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
# Pipes are lent from a pool only while bytes sit in them: a direction borrows a pipe just before
# splicing in and returns it as soon as the pipe is empty again, so idle connections hold no pipe
# (5,000 idle connections would otherwise pin 20,000 descriptors).  Pipes are created with
# pipe2(O_NONBLOCK|O_CLOEXEC) and grown to 1 MiB with F_SETPIPE_SZ: with the default 64 KiB pipes
# a minimal epoll+splice relay spent twice the CPU per byte on this machine.  If no pipe can be
# created (descriptors exhausted) the direction simply keeps copying.
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
# Half-close: EOF on a source, once its bytes are written, becomes shutdown(SHUT_WR) on the
# destination; the other direction carries on.  When both directions have ended both sockets are
# closed.  An error on either side (reset, EPIPE, SO_ERROR) closes both with SO_LINGER {1, 0} so
# each peer sees a reset as well.
#
# Completions reuse the connection record itself: a finished record is queued (mutex-protected)
# for the asyncio side, and the "done" eventfd is written when that queue goes from empty to
# non-empty, so a burst of completions costs one wake-up; drain() takes the whole queue at once.
# Records finished during an epoll batch are published only at the end of the batch, because a
# later event of the same batch may still name them.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport abort, calloc, free, malloc, realloc
from libc.string cimport memcpy

from flux._sys cimport *

import os as _os


cdef extern from *:
    """
    /* Counters are written by one thread and read by another: relaxed atomics keep the reads
       tear-free without making the engine pay for locked instructions. */
    static inline int64_t flux_relay_load(const int64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void flux_relay_bump(int64_t *p, int64_t v) {
        __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
    }
    /* Written by several threads (the shards' shared budget count): a real atomic add. */
    static inline void flux_relay_add(int64_t *p, int64_t v) {
        __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    }
    static inline void flux_relay_store(int64_t *p, int64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    #ifdef FLUX_DEBUG_COUNTERS
    #define FLUX_RELAY_DEBUG 1
    #else
    #define FLUX_RELAY_DEBUG 0
    #endif
    """
    int64_t flux_relay_load(const int64_t *p) nogil
    void flux_relay_bump(int64_t *p, int64_t v) nogil
    void flux_relay_add(int64_t *p, int64_t v) nogil
    void flux_relay_store(int64_t *p, int64_t v) nogil
    int FLUX_RELAY_DEBUG


cdef enum:
    # Counters.  RC_SUBMITTED is written by the caller's thread, every other one by the engine.
    RC_SUBMITTED
    RC_COMPLETED
    RC_SOCKETS_CLOSED
    RC_PIPES_CREATED
    RC_PIPES_CLOSED
    RC_PIPES_LENT
    RC_PIPES_IDLE
    RC_PIPE_FAILURES
    RC_PIPE_SIZE_REFUSED
    RC_INFLIGHT
    RC_BYTES_SPLICED
    RC_BYTES_COPIED
    RC_CALLS_SPLICE
    RC_CALLS_RECV
    RC_CALLS_SEND
    RC_WAITS
    RC_BULK_SWITCHES
    RC_HTTP_EXCHANGES       # exchanges timed (published or dropped)
    RC_HTTP_ANSWERED        # requests the engine answered itself (400, 431, 408)
    RC_HTTP_HEADER_TIMEOUTS
    RC_HTTP_IDLE_CLOSED
    RC_HTTP_OPAQUE          # connections whose framing was given up (bytes still relayed)
    RC_EXCHANGES_DROPPED    # exchange records lost because nobody drained them
    RC_BUFFERS_LENT         # copy buffers held by a direction with bytes in flight
    RC_BUFFERS_IDLE         # copy buffers pooled for reuse
    RC_CONNECTS             # upstream connections the engine started itself (connect())
    RC_CONNECT_FAILURES     # ... that failed or timed out (the client went back to the caller)
    RC_ACCEPTED             # clients the engine accepted on a service's listening socket
    RC_TO_PYTHON            # ... handed to the asyncio side to pick for (see _relay_accept.pxi)
    RC_ACCEPT_FAILURES      # accept4() errors other than EAGAIN (each pauses the service)
    RC_COUNT

_RELAY_COUNTER_NAMES = (
    "submitted", "completed", "sockets_closed", "pipes_created", "pipes_closed", "pipes_lent",
    "pipes_idle", "pipe_failures", "pipe_size_refused", "inflight_bytes", "bytes_spliced",
    "bytes_copied", "calls_splice", "calls_recv", "calls_send", "epoll_waits", "bulk_switches",
    "http_exchanges", "http_answered", "http_header_timeouts", "http_idle_closed", "http_opaque",
    "exchanges_dropped", "buffers_lent", "buffers_idle", "connects", "connect_failures",
    "accepted", "to_python", "accept_failures",
)

cdef enum:
    RELAY_CMD_CUT = 1       # reset every connection, keep running
    RELAY_CMD_STOP = 2      # reset every connection and end the thread
    RELAY_MAX_EVENTS = 256
    RELAY_WAKE_TAG = 0      # epoll tag of the wake eventfd; connections are tagged ptr|side
    RELAY_LISTEN_TAG = 2    # ... and a service's listening socket ptr|2
    RELAY_ADDR_MAX = 28     # sizeof(struct sockaddr_in6), the largest address connect() takes
    # Connect timeouts are found by a sweep of the live list this often while any is pending.
    RELAY_CONNECT_SWEEP_NS = 20000000


cdef struct RelayDir:
    char *buf               # copy-mode buffer, lent from the pool while bytes are in it
    uint32_t off
    uint32_t length         # bytes in buf not yet sent
    int pipe_r              # lent pipe, -1 when none
    int pipe_w
    size_t in_pipe          # bytes in the lent pipe not yet sent
    size_t burst            # bytes spliced in since the source last became readable
    uint64_t bytes          # bytes delivered to the destination
    uint8_t bulk            # splice mode
    uint8_t eof             # source reported EOF
    uint8_t done            # EOF propagated with shutdown(SHUT_WR)


cdef struct RelayShared:
    # Shared by the shards of one engine (relaxed atomics): the connections they hold against
    # the process's descriptor budget, and the budget.  See _relay_accept.pxi.
    int64_t held            # accepted by a shard and not yet closed or handed back
    int64_t python_held     # held by the asyncio side (written by it)
    int64_t limit           # written by the asyncio side
    int refs


cdef struct RelayTarget:
    uint32_t id             # the asyncio side's instance id (> 0)
    uint8_t addr_len
    char addr[RELAY_ADDR_MAX]


cdef struct RelaySnap:
    # The ready instances of a service as the asyncio side last pushed them.
    int n
    uint8_t p2c
    int64_t python_at_ns    # from then on hand every client to the asyncio side (0: never)
    RelayTarget *targets


cdef struct RelayTally:
    uint64_t key            # instance id << 32 | client IPv4 (network order); 0: empty slot
    int64_t count


cdef struct RelaySvc:
    uint32_t id
    int fd                  # the listening socket, -1 when none (engine thread)
    uint8_t http
    uint8_t observe
    uint8_t paused          # accepts are paused (descriptor shortage)
    uint8_t queued          # on the accept-ready list
    int64_t connect_timeout_ns
    RelaySnap *snap         # engine thread only
    RelaySvc *accept_next
    # Written by the engine thread, read by the asyncio side.  bytes and active with relaxed
    # atomics; the tally and inst_active under the engine's stats_lock (they grow).
    int64_t bytes[2]        # delivered to the instance (0) and to the client (1), live
    int64_t active          # connections the engine picked for that are up now
    int64_t rejected[3]     # requests the engine answered itself: 400, 431, 408
    int64_t *inst_active    # by instance id (p2c), engine-picked connections up now
    uint32_t inst_cap
    RelayTally *tally       # connections counted per (instance, client IP)
    size_t tally_cap
    size_t tally_len


cdef struct RelayCtl:
    # A command from the asyncio side for one service (guarded by the engine's lock).
    int kind
    RelaySvc *svc
    int fd
    RelaySnap *snap
    RelayCtl *next


cdef struct RelayConn:
    int fd[2]               # 0: client, 1: upstream
    uint8_t readable[2]
    uint8_t writable[2]
    uint8_t rdhup[2]        # the peer's FIN was reported: a short read is not a drained socket
    uint8_t registered[2]   # in the engine's epoll set
    uint8_t closed
    uint8_t queued          # on the ready list
    uint8_t connecting      # the engine is connecting fd[1]: nothing moves until it is up
    uint8_t handed_back     # the connect failed and fd[0] goes back to the caller, still open
    uint8_t addr_len
    char addr[RELAY_ADDR_MAX]   # where connect() goes
    int64_t connect_deadline_ns
    RelayDir dir[2]         # dir[d] reads fd[d] and writes fd[1 - d]
    uint64_t token
    int64_t started_ns
    int64_t duration_ns
    int err
    RelayHttp *http         # NULL unless the connection belongs to an HTTP service
    uint16_t answered       # status the engine answered itself (HTTP), 0 when none
    RelayConn *prev         # live list
    RelayConn *next
    RelayConn *link         # submission, finished or completion queue
    RelayConn *ready_next
    RelayConn *est_next     # established queue (connect()); independent of the other links
    RelaySvc *svc           # the service whose bytes this connection counts (NULL: none)
    uint32_t inst           # the instance the engine picked (engine-accepted connections)
    uint32_t client_ip      # the client's IPv4 address, network order (engine-accepted)
    uint8_t counted         # counted as up in svc (engine-accepted; undone at retire)


cdef struct RelayEngine:
    int epfd
    int wake_fd
    int done_fd
    pthread_mutex_t lock
    RelayConn *submit_head  # guarded by lock
    RelayConn *submit_tail
    RelayConn *done_head    # guarded by lock
    RelayConn *done_tail
    int commands            # guarded by lock
    RelayConn *live         # engine thread only from here on
    RelayConn *ready
    RelayConn *finished_head
    RelayConn *finished_tail
    int *pool               # idle pipes as (read, write) pairs
    int pool_len
    int pool_cap
    char **buffers          # idle copy buffers
    int buffers_len
    int buffers_cap
    size_t pipe_size
    size_t small_buffer
    int budget
    # HTTP (see _relay_http.pxi).  ex_local is the engine thread's; ex_shared is guarded by lock.
    RelayExchange *ex_local
    size_t ex_local_len
    size_t ex_local_cap
    RelayExchange *ex_shared
    size_t ex_shared_len
    size_t ex_shared_cap
    int64_t header_timeout_ns   # 0: none
    int64_t idle_timeout_ns     # 0: none
    int64_t sweep_ns
    int64_t next_sweep_ns
    int http_live
    int connecting              # connections whose upstream connect is in progress
    int64_t next_connect_sweep_ns
    RelayConn *est_local        # connected since the last publish (engine thread)
    RelayConn *est_shared       # published, not yet drained; guarded by lock
    HfEvents ev                 # the framer's event scratch (engine thread only)
    # Accepting (see _relay_accept.pxi).
    RelayShared *shared
    pthread_mutex_t stats_lock  # the services' tallies and inst_active arrays
    RelaySvc **svcs             # every service registered (asyncio side, under stats_lock)
    uint32_t svcs_len
    uint32_t svcs_cap
    RelayCtl *ctl_head          # guarded by lock
    RelayCtl *ctl_tail
    RelaySvc *accept_ready      # services with clients left to accept (engine thread)
    RelaySvc *accept_tail
    RelayConn *reap             # engine-accepted connections ended this batch (engine thread)
    uint64_t rng
    int64_t counters[RC_COUNT]


cdef inline int64_t relay_now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void relay_count(RelayEngine *e, int which, int64_t v) noexcept nogil:
    flux_relay_bump(&e.counters[which], v)


# ---- pipe pool ----------------------------------------------------------------------------------

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
# after one request, measured, against 1.1 KiB for one never used).

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
    relay_count(e, RC_BUFFERS_LENT, 1)
    return p.buf


cdef void relay_return_buf(RelayEngine *e, RelayDir *p) noexcept nogil:
    """Give the direction's buffer back (its bytes, if any, are dropped: callers make sure
    there are none unless the connection is being torn down)."""
    if p.buf == NULL:
        return
    if e.buffers_len < e.buffers_cap:
        e.buffers[e.buffers_len] = p.buf
        e.buffers_len += 1
        relay_count(e, RC_BUFFERS_IDLE, 1)
    else:
        free(p.buf)
    relay_count(e, RC_BUFFERS_LENT, -1)
    p.buf = NULL


cdef inline void relay_rest(RelayEngine *e, RelayDir *p) noexcept nogil:
    """The direction waits with nothing in flight: hold no pipe and no buffer."""
    relay_return_pipe(e, p)
    if p.length == 0:
        relay_return_buf(e, p)


# ---- connection lifecycle -----------------------------------------------------------------------

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
        # Not TCP (e.g. a Unix socket in a test) is fine: the option just does not apply.
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


# ---- connecting ---------------------------------------------------------------------------------
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
    elif relay_self_connected(c):
        relay_connect_failed(e, c, ECONNREFUSED)
        return
    else:
        relay_established(e, c)
    relay_register(e, c)


cdef bint relay_self_connected(RelayConn *c) noexcept nogil:
    """The upstream socket is connected to itself: a connect to a local port nobody listens
    on can pick that very port as its source (TCP simultaneous open), and then every byte
    sent comes back.  Needs a port where nothing listens and an ephemeral range pressed
    hard enough to offer that port (the namespace test makes one)."""
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


cdef int relay_wait_ms(int64_t until_ns) noexcept nogil:
    cdef int64_t left = until_ns - relay_now_ns()
    if left <= 0:
        return 0
    return <int>((left + 999999) // 1000000)


cdef void relay_publish(RelayEngine *e) noexcept nogil:
    """Hand the batch's finished connections to the asyncio side; wake it once per burst."""
    cdef RelayConn *c = e.finished_head
    cdef int64_t n = 0
    cdef bint wake = False
    cdef uint64_t one = 1
    cdef RelayConn *est = e.est_local
    cdef RelayConn *last
    cdef bint idle
    if e.reap != NULL:
        accept_reap(e)
    if c == NULL and e.ex_local_len == 0 and est == NULL:
        return
    while c != NULL:
        n += 1
        c = c.link
    # Count before publishing so that a drained completion is always reflected in `active`.
    relay_count(e, RC_COMPLETED, n)
    pthread_mutex_lock(&e.lock)
    # Established connections and exchanges first, in the same critical section: neither is
    # ever seen after the connection's completion.
    # Completions and established connections wake the asyncio side when both queues were
    # empty (otherwise a wake-up is already on its way); exchanges by their own mark.
    idle = e.est_shared == NULL and e.done_head == NULL
    if est != NULL:
        wake = idle
        last = est
        while last.est_next != NULL:
            last = last.est_next
        last.est_next = e.est_shared
        e.est_shared = est
        e.est_local = NULL
    if e.ex_local_len:
        wake = http_publish_exchanges(e) or wake
    if e.finished_head != NULL:
        wake = wake or idle
        if e.done_tail != NULL:
            e.done_tail.link = e.finished_head
        else:
            e.done_head = e.finished_head
        e.done_tail = e.finished_tail
    pthread_mutex_unlock(&e.lock)
    e.finished_head = NULL
    e.finished_tail = NULL
    if wake:
        write(e.done_fd, &one, sizeof(one))


# ---- data path ----------------------------------------------------------------------------------

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


cdef void relay_on_event(RelayEngine *e, RelayConn *c, int s, uint32_t events) noexcept nogil:
    cdef int err = 0
    cdef socklen_t size = sizeof(err)
    if c.connecting and s == 1 and events & (EPOLLOUT | EPOLLERR | EPOLLHUP):
        # Writable without an error or hang-up is a connect that succeeded: no need to ask
        # SO_ERROR (one syscall fewer per connection); a failure always raises ERR or HUP.
        if events & (EPOLLERR | EPOLLHUP):
            if getsockopt(c.fd[1], SOL_SOCKET, SO_ERROR, &err, &size) < 0:
                err = errno
            elif err == 0:
                err = ECONNREFUSED
            relay_connect_failed(e, c, err)
            return
        if relay_self_connected(c):
            relay_connect_failed(e, c, ECONNREFUSED)
            return
        relay_established(e, c)
    if events & EPOLLERR:
        # Act on a reset at once, even when no direction would touch this socket soon.
        if getsockopt(c.fd[s], SOL_SOCKET, SO_ERROR, &err, &size) == 0 and err != 0:
            relay_abort(e, c, err)
            return
    if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        c.readable[s] = 1
    if events & (EPOLLRDHUP | EPOLLHUP):
        c.rdhup[s] = 1
    if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        c.writable[s] = 1
    relay_pump(e, c)


cdef void relay_run_ready(RelayEngine *e) noexcept nogil:
    cdef RelayConn *c = e.ready
    cdef RelayConn *nxt
    e.ready = NULL
    while c != NULL:
        nxt = c.ready_next
        c.ready_next = NULL
        c.queued = 0
        if not c.closed:
            relay_pump(e, c)
        c = nxt


cdef void relay_cut_all(RelayEngine *e) noexcept nogil:
    while e.live != NULL:
        relay_abort(e, e.live, ECANCELED)


cdef int relay_take_submissions(RelayEngine *e) noexcept nogil:
    cdef uint64_t value
    cdef RelayConn *c
    cdef RelayConn *nxt
    cdef RelayCtl *ctl
    cdef int commands
    # Clear the wake counter before taking the list: a submission that lands after the take
    # finds the list empty and writes the eventfd again, so none is ever stranded.
    read(e.wake_fd, &value, sizeof(value))
    pthread_mutex_lock(&e.lock)
    c = e.submit_head
    e.submit_head = NULL
    e.submit_tail = NULL
    commands = e.commands
    e.commands = 0
    ctl = e.ctl_head
    e.ctl_head = NULL
    e.ctl_tail = NULL
    pthread_mutex_unlock(&e.lock)
    if ctl != NULL:
        accept_run_commands(e, ctl)
    while c != NULL:
        nxt = c.link
        c.link = NULL
        if c.http != NULL:
            e.http_live += 1
        if c.fd[1] < 0:
            relay_start_connect(e, c)
        else:
            relay_register(e, c)
        c = nxt
    if commands & (RELAY_CMD_CUT | RELAY_CMD_STOP):
        relay_cut_all(e)
    return commands & RELAY_CMD_STOP


cdef void *relay_main(void *arg) noexcept nogil:
    cdef RelayEngine *e = <RelayEngine *>arg
    cdef epoll_event events[RELAY_MAX_EVENTS]
    cdef int n, i
    cdef int stop = 0
    cdef int timeout
    cdef int wait
    cdef uint64_t tag
    cdef RelayConn *c
    while not stop:
        if e.ready != NULL or e.accept_ready != NULL:
            timeout = 0
        elif e.http_live > 0 and e.sweep_ns > 0:
            timeout = http_sweep_wait_ms(e)
        else:
            timeout = -1
        if e.connecting > 0 and timeout != 0:
            wait = relay_wait_ms(e.next_connect_sweep_ns)
            if timeout < 0 or wait < timeout:
                timeout = wait
        n = epoll_wait(e.epfd, events, RELAY_MAX_EVENTS, timeout)
        relay_count(e, RC_WAITS, 1)
        if n < 0:
            n = 0   # EINTR; nothing else can fail on a valid epoll fd with a valid buffer
        for i in range(n):
            tag = events[i].data.u64
            if tag == RELAY_WAKE_TAG:
                stop = relay_take_submissions(e)
                continue
            if tag & RELAY_LISTEN_TAG:
                accept_on_event(e, <RelaySvc *><uintptr_t>(tag & ~(<uint64_t>3)))
                continue
            c = <RelayConn *><uintptr_t>(tag & ~(<uint64_t>1))
            if not c.closed:
                relay_on_event(e, c, <int>(tag & 1), events[i].events)
        relay_run_ready(e)
        if e.accept_ready != NULL:
            accept_run_ready(e)
        if e.connecting > 0:
            relay_sweep_connects(e)
        if e.http_live > 0 and e.sweep_ns > 0:
            http_sweep(e)
        relay_publish(e)
    return NULL


# ---- Python-facing API ---------------------------------------------------------------------------

cdef int _raise_errno(str what) except -1:
    """The one errno -> exception helper: OSError with the errno and the failed call named."""
    cdef int err = errno
    raise OSError(err, f"relay engine: {what} failed: {_os.strerror(err)}")


cdef class SpliceEngine:
    """The native relay: one thread relaying many socket pairs with epoll and splice(2).

    ``add()`` hands over two connected sockets (by descriptor; the engine owns and closes them).
    When a relayed connection ends, a completion is queued and :attr:`eventfd` becomes readable;
    ``drain()`` returns the queued completions as
    ``(token, bytes client->upstream, bytes upstream->client, errno or 0, duration ns,
    HTTP status the engine answered itself or 0)``.

    A connection added with ``http=True`` is observed by the HTTP/1.x framer: its exchanges
    (with ``observe=True``) are queued for ``drain_exchanges()`` / ``drain_all()``, which
    hand them over grouped by connection and label set; a malformed request is answered
    with 400 (431 for an oversized head) and the connection closed; ``header_timeout`` and
    ``idle_timeout`` (seconds, 0 for none) bound a request head's arrival and an idle
    keep-alive connection.
    """

    cdef RelayEngine *e
    cdef pthread_t thread
    cdef bint _running
    cdef bint _stopped
    cdef object _group      # the first shard, whose RelayShared this one uses

    def __cinit__(self):
        self.e = NULL
        self._running = False
        self._stopped = False

    def __init__(self, size_t pipe_size=1 << 20, int max_idle_pipes=64,
                 size_t small_buffer=16384, int budget=32, double header_timeout=0.0,
                 double idle_timeout=0.0, SpliceEngine shard_of=None):
        cdef RelayEngine *e
        if pipe_size < 4096 or pipe_size > (1 << 30):
            raise ValueError(f"pipe_size must be 4096..1073741824 bytes, got {pipe_size}")
        if small_buffer < 512 or small_buffer > (1 << 24):
            raise ValueError(f"small_buffer must be 512..16777216 bytes, got {small_buffer}")
        if max_idle_pipes < 0:
            raise ValueError(f"max_idle_pipes must be >= 0, got {max_idle_pipes}")
        if budget < 4:
            raise ValueError(f"budget must be >= 4 syscalls, got {budget}")
        if not 0.0 <= header_timeout <= 86400.0:
            raise ValueError(f"header_timeout must be 0..86400 seconds, got {header_timeout}")
        if not 0.0 <= idle_timeout <= 86400.0:
            raise ValueError(f"idle_timeout must be 0..86400 seconds, got {idle_timeout}")
        if self.e != NULL:
            raise RuntimeError("SpliceEngine is already initialised")
        e = <RelayEngine *>calloc(1, sizeof(RelayEngine))
        if e == NULL:
            raise MemoryError()
        e.pool = <int *>malloc(sizeof(int) * 2 * (max_idle_pipes + 1))
        if e.pool == NULL:
            free(e)
            raise MemoryError()
        e.epfd = -1
        e.wake_fd = -1
        e.done_fd = -1
        e.pool_cap = max_idle_pipes
        e.buffers_cap = max_idle_pipes * 4
        e.buffers = <char **>malloc(sizeof(char *) * (e.buffers_cap + 1))
        if e.buffers == NULL:
            free(e.pool)
            free(e)
            raise MemoryError()
        e.pipe_size = pipe_size
        e.small_buffer = small_buffer
        e.budget = budget
        if shard_of is not None:
            if shard_of.e == NULL:
                raise ValueError("shard_of must be an initialised SpliceEngine")
            e.shared = shard_of.e.shared
            self._group = shard_of
        else:
            e.shared = <RelayShared *>calloc(1, sizeof(RelayShared))
            if e.shared == NULL:
                free(e.buffers)
                free(e.pool)
                free(e)
                raise MemoryError()
            e.shared.limit = <int64_t>1 << 62
        e.shared.refs += 1
        e.rng = (<uint64_t>relay_now_ns() ^ <uint64_t><uintptr_t>e) | 1
        http_configure(e, header_timeout, idle_timeout)
        pthread_mutex_init(&e.lock, NULL)
        pthread_mutex_init(&e.stats_lock, NULL)
        self.e = e

    def start(self):
        """Create the epoll loop and its eventfds and start the engine thread."""
        cdef RelayEngine *e = self.e
        cdef epoll_event ev
        cdef int err
        if self._running or self._stopped:
            raise RuntimeError("SpliceEngine can be started once")
        try:
            e.epfd = epoll_create1(EPOLL_CLOEXEC)
            if e.epfd < 0:
                _raise_errno("epoll_create1")
            e.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if e.wake_fd < 0:
                _raise_errno("eventfd")
            e.done_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if e.done_fd < 0:
                _raise_errno("eventfd")
            ev.events = EPOLLIN
            ev.data.u64 = RELAY_WAKE_TAG
            if epoll_ctl(e.epfd, EPOLL_CTL_ADD, e.wake_fd, &ev) < 0:
                _raise_errno("epoll_ctl")
            err = pthread_create(&self.thread, NULL, relay_main, e)
            if err != 0:
                raise OSError(err, f"relay engine: pthread_create failed: {_os.strerror(err)}")
        except BaseException:
            self._close_fds()
            raise
        self._running = True

    cdef void _close_fds(self) noexcept:
        cdef RelayEngine *e = self.e
        cdef int i
        cdef uint32_t k
        for i in range(e.pool_len):
            relay_close_pipe(e, e.pool[2 * i], e.pool[2 * i + 1])
        relay_count(e, RC_PIPES_IDLE, -e.pool_len)
        e.pool_len = 0
        for i in range(e.buffers_len):
            free(e.buffers[i])
        relay_count(e, RC_BUFFERS_IDLE, -e.buffers_len)
        e.buffers_len = 0
        if e.epfd >= 0:
            close(e.epfd)
            e.epfd = -1
        if e.wake_fd >= 0:
            close(e.wake_fd)
            e.wake_fd = -1
        if e.done_fd >= 0:
            close(e.done_fd)
            e.done_fd = -1
        # Listening sockets go with the thread; the services' counters stay readable.
        for k in range(e.svcs_len):
            if e.svcs[k] != NULL and e.svcs[k].fd >= 0:
                close(e.svcs[k].fd)
                e.svcs[k].fd = -1

    cdef void _command(self, int command) noexcept:
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.e.lock)
        self.e.commands |= command
        pthread_mutex_unlock(&self.e.lock)
        write(self.e.wake_fd, &one, sizeof(one))

    def add(self, int client_fd, int upstream_fd, uint64_t token, bint http=False,
            bint observe=True, int service=-1):
        """Relay between two connected sockets; the engine now owns (and will close) both.

        ``token`` (> 0) comes back in the completion (and in exchange records).  ``http``:
        follow HTTP/1.x framing (answer malformed requests, enforce the HTTP timeouts, and with
        ``observe`` queue one record per exchange).  ``service`` (>= 0): add the bytes relayed
        to that service's live byte counters (``service_counts``).  Thread-safe; never blocks
        on the engine.
        """
        cdef RelayConn *c
        if upstream_fd < 0 or client_fd == upstream_fd:
            raise ValueError(
                f"need two distinct open descriptors, got {client_fd} and {upstream_fd}"
            )
        c = self._new_conn(client_fd, upstream_fd, token, http, observe)
        if service >= 0:
            c.svc = self._service(<uint32_t>service)
        self._submit(c)

    def connect(self, int client_fd, bytes address not None, uint64_t token, double timeout,
                bint http=False, bint observe=True, int service=-1):
        """Connect to ``address`` (a packed ``struct sockaddr_in`` or ``sockaddr_in6``) and
        relay between it and ``client_fd``, which the engine now owns.

        Nothing is read from the client before the upstream is connected.  Once it is, the
        token is published on the established queue (``drain_all()[2]``).  If the connect fails
        or is still pending after ``timeout`` seconds, the completion carries the errno
        (ETIMEDOUT for the timeout) and, as its last field, the client descriptor: open,
        unread and the caller's again.  Thread-safe; never blocks on the engine.
        """
        cdef RelayConn *c
        cdef Py_ssize_t n = len(address)
        if n < 16 or n > RELAY_ADDR_MAX:
            raise ValueError(f"address must be a packed sockaddr of 16..28 bytes, got {n}")
        if not 0.0 < timeout <= 86400.0:
            raise ValueError(f"timeout must be 0..86400 seconds, got {timeout}")
        c = self._new_conn(client_fd, -1, token, http, observe)
        if service >= 0:
            c.svc = self._service(<uint32_t>service)
        memcpy(c.addr, <const char *>address, n)
        c.addr_len = <uint8_t>n
        c.connect_deadline_ns = c.started_ns + <int64_t>(timeout * 1e9)
        self._submit(c)

    cdef RelayConn *_new_conn(self, int client_fd, int upstream_fd, uint64_t token, bint http,
                              bint observe) except NULL:
        cdef RelayConn *c
        if not self._running:
            raise RuntimeError("the relay engine is not running")
        if client_fd < 0:
            raise ValueError(f"need an open client descriptor, got {client_fd}")
        if token == 0:
            raise ValueError("token 0 is the engine's own (connections it accepted)")
        c = <RelayConn *>calloc(1, sizeof(RelayConn))
        if c == NULL:
            raise MemoryError()
        c.fd[0] = client_fd
        c.fd[1] = upstream_fd
        c.dir[0].pipe_r = c.dir[0].pipe_w = -1
        c.dir[1].pipe_r = c.dir[1].pipe_w = -1
        c.token = token
        c.started_ns = relay_now_ns()
        if http and http_attach(c, observe) < 0:
            free(c)
            raise MemoryError()
        return c

    cdef void _submit(self, RelayConn *c) noexcept:
        cdef RelayEngine *e = self.e
        cdef bint was_empty
        cdef uint64_t one = 1
        relay_count(e, RC_SUBMITTED, 1)
        pthread_mutex_lock(&e.lock)
        was_empty = e.submit_head == NULL
        if e.submit_tail != NULL:
            e.submit_tail.link = c
        else:
            e.submit_head = c
        e.submit_tail = c
        pthread_mutex_unlock(&e.lock)
        if was_empty:
            write(e.wake_fd, &one, sizeof(one))

    # -- accepting (see _relay_accept.pxi) -------------------------------------------------

    cdef RelaySvc *_service(self, uint32_t service) except NULL:
        """Service ``service``'s record, made on first use (the caller's thread only)."""
        cdef RelayEngine *e = self.e
        cdef RelaySvc **grown
        cdef RelaySvc *s
        cdef uint32_t cap, i
        if service < e.svcs_len and e.svcs[service] != NULL:
            return e.svcs[service]
        if service >= (1 << 24):
            raise ValueError(f"service ids go up to {(1 << 24) - 1}, got {service}")
        s = <RelaySvc *>calloc(1, sizeof(RelaySvc))
        if s == NULL:
            raise MemoryError()
        s.id = service
        s.fd = -1
        if service >= e.svcs_cap:
            cap = e.svcs_cap if e.svcs_cap else 16
            while cap <= service:
                cap *= 2
            grown = <RelaySvc **>realloc(e.svcs, cap * sizeof(RelaySvc *))
            if grown == NULL:
                free(s)
                raise MemoryError()
            for i in range(e.svcs_cap, cap):
                grown[i] = NULL
            e.svcs = grown
            e.svcs_cap = cap
        e.svcs[service] = s
        if service >= e.svcs_len:
            e.svcs_len = service + 1
        return s

    cdef RelaySvc *_known(self, uint32_t service):
        if service < self.e.svcs_len:
            return self.e.svcs[service]
        return NULL

    cdef int _control(self, int kind, RelaySvc *s, int fd, RelaySnap *snap) except -1:
        cdef RelayEngine *e = self.e
        cdef RelayCtl *ctl
        cdef uint64_t one = 1
        if not self._running:
            raise RuntimeError("the relay engine is not running")
        ctl = <RelayCtl *>calloc(1, sizeof(RelayCtl))
        if ctl == NULL:
            raise MemoryError()
        ctl.kind = kind
        ctl.svc = s
        ctl.fd = fd
        ctl.snap = snap
        pthread_mutex_lock(&e.lock)
        if e.ctl_tail != NULL:
            e.ctl_tail.next = ctl
        else:
            e.ctl_head = ctl
        e.ctl_tail = ctl
        pthread_mutex_unlock(&e.lock)
        write(e.wake_fd, &one, sizeof(one))
        return 0

    def listen(self, uint32_t service, int fd, bint http=False, bint observe=True,
               double connect_timeout=3.0):
        """Accept ``service``'s clients on the listening socket ``fd`` (the engine owns it
        from now on and closes it on ``unlisten``), pick an instance from the last
        ``set_pool`` snapshot and connect within ``connect_timeout`` seconds.  ``http`` and
        ``observe`` as for ``add``.  Until a snapshot arrives every client is handed over.
        Thread-safe; never blocks on the engine."""
        cdef RelaySvc *s
        if fd < 0:
            raise ValueError(f"need an open listening descriptor, got {fd}")
        if not 0.0 < connect_timeout <= 86400.0:
            raise ValueError(
                f"connect_timeout must be 0..86400 seconds, got {connect_timeout}"
            )
        if not self._running:
            raise RuntimeError("the relay engine is not running")
        s = self._service(service)
        # Read by the engine thread only after the command below (the lock orders them).
        s.http = http
        s.observe = observe
        s.connect_timeout_ns = <int64_t>(connect_timeout * 1e9)
        self._control(RELAY_CTL_LISTEN, s, fd, NULL)

    def unlisten(self, uint32_t service):
        """Stop accepting for ``service`` and close its listening socket; connections already
        relayed carry on."""
        cdef RelaySvc *s = self._known(service)
        if s != NULL and self._running:
            self._control(RELAY_CTL_UNLISTEN, s, -1, NULL)

    def set_pool(self, uint32_t service, list targets not None, bint p2c=False,
                 int64_t python_at_ns=0):
        """What ``service``'s new clients may go to: ``targets`` is a list of ``(instance id
        > 0, packed sockaddr)``; an empty list hands every client over.  From
        ``python_at_ns`` (CLOCK_MONOTONIC, 0 for never) on, every client is handed over
        until the next snapshot."""
        cdef Py_ssize_t n = len(targets)
        cdef RelaySnap *snap
        cdef RelayTarget *t
        cdef Py_ssize_t i, size
        cdef bytes address
        cdef RelaySvc *s = self._service(service)
        snap = <RelaySnap *>calloc(1, sizeof(RelaySnap) + n * sizeof(RelayTarget))
        if snap == NULL:
            raise MemoryError()
        snap.targets = <RelayTarget *>(<char *>snap + sizeof(RelaySnap))
        try:
            for i in range(n):
                instance, address = targets[i]
                size = len(address)
                if size < 16 or size > RELAY_ADDR_MAX:
                    raise ValueError(
                        f"address must be a packed sockaddr of 16..28 bytes, got {size}"
                    )
                if not 0 < instance < (1 << 32):
                    raise ValueError(f"instance ids are 1..{(1 << 32) - 1}, got {instance}")
                t = &snap.targets[i]
                t.id = <uint32_t>instance
                t.addr_len = <uint8_t>size
                memcpy(t.addr, <const char *>address, size)
            snap.n = <int>n
            snap.p2c = p2c
            snap.python_at_ns = python_at_ns
            self._control(RELAY_CTL_SNAP, s, -1, snap)
        except BaseException:
            free(snap)
            raise

    def pause(self, uint32_t service):
        """Stop accepting for ``service`` (its clients wait in the backlog)."""
        cdef RelaySvc *s = self._known(service)
        if s != NULL and self._running:
            self._control(RELAY_CTL_PAUSE, s, -1, NULL)

    def resume(self, uint32_t service):
        """Accept again for ``service`` (after ``pause`` or a pause the engine reported)."""
        cdef RelaySvc *s = self._known(service)
        if s != NULL and self._running:
            self._control(RELAY_CTL_RESUME, s, -1, NULL)

    def service_counts(self, uint32_t service):
        """``(bytes to instances, bytes to clients, active, (answered 400, 431, 408),
        [(instance, client_ip, connections), ...])`` for ``service``: bytes of every
        connection naming it, the rest for the connections the engine accepted."""
        cdef RelaySvc *s = self._known(service)
        cdef size_t i
        if s == NULL:
            return 0, 0, 0, (0, 0, 0), []
        tally = []
        pthread_mutex_lock(&self.e.stats_lock)
        for i in range(s.tally_cap):
            if s.tally[i].key:
                tally.append((s.tally[i].key >> 32, s.tally[i].key & 0xFFFFFFFF,
                              s.tally[i].count))
        pthread_mutex_unlock(&self.e.stats_lock)
        return (flux_relay_load(&s.bytes[0]), flux_relay_load(&s.bytes[1]),
                flux_relay_load(&s.active),
                (flux_relay_load(&s.rejected[0]), flux_relay_load(&s.rejected[1]),
                 flux_relay_load(&s.rejected[2])), tally)

    def instance_active(self, uint32_t service, uint32_t instance) -> int:
        """Connections to ``instance`` the engine picked for ``service`` and has up now."""
        cdef RelaySvc *s = self._known(service)
        cdef int64_t n = 0
        if s == NULL:
            return 0
        pthread_mutex_lock(&self.e.stats_lock)
        if instance < s.inst_cap:
            n = s.inst_active[instance]
        pthread_mutex_unlock(&self.e.stats_lock)
        return n

    def set_budget(self, int64_t limit, int64_t python_held):
        """The descriptor budget shared by this engine's shards: accept only while the
        connections they hold plus ``python_held`` (the caller's own) are below ``limit``."""
        flux_relay_store(&self.e.shared.limit, limit)
        flux_relay_store(&self.e.shared.python_held, python_held)

    @property
    def held(self) -> int:
        """Connections this engine's shards accepted and still hold (the budget's count)."""
        return flux_relay_load(&self.e.shared.held)

    def drain(self):
        """Take every queued completion: a list of
        (token, up, down, errno, duration_ns, answered)."""
        return self.drain_all()[1]

    def drain_exchanges(self):
        """Take every queued exchange, grouped: a list of (token, method, status,
        [roundtrip µs, ...], [total µs, ...]); ``method`` indexes ``HTTP_METHODS``.

        Grouping lets the metrics record a batch per label set (one call, not one per
        exchange): under keep-alive load that was most of the cost of HTTP metrics."""
        return self.drain_all()[0]

    def drain_all(self):
        """Take every queued exchange, completion, established connection and hand-over at
        once: ``(exchanges, completions, established tokens, hand-overs)``.

        A connection's exchanges and its establishment are always queued before its
        completion, so handling those first never meets a connection that is already gone.
        A completion is ``(token, up, down, errno, duration_ns, answered, client_fd)`` where
        ``client_fd`` is -1 unless a ``connect()`` failed and the client came back.

        An exchange is ``(token, method, status, roundtrips, totals, service, instance,
        client_ip)``: token 0 for a connection the engine accepted itself, whose label set is
        the last three (client_ip an IPv4 address as a network-order integer); 0s otherwise.

        A hand-over is ``(service, client_fd, client_ip, instance, errno)`` from a service the
        engine accepts for (see _relay_accept.pxi): a client for the caller to pick for
        (instance 0, errno 0), a client whose connect to ``instance`` failed with ``errno``, or
        (client_fd -1) news that the service stopped accepting: errno 0 when the descriptor
        budget is spent, else accept4()'s errno."""
        cdef RelayEngine *e = self.e
        cdef RelayConn *c
        cdef RelayConn *nxt
        cdef RelayExchange *x
        cdef RelayConn *est
        cdef size_t count, i
        cdef uint64_t value
        if e.done_fd >= 0:
            read(e.done_fd, &value, sizeof(value))
        pthread_mutex_lock(&e.lock)
        c = e.done_head
        e.done_head = NULL
        e.done_tail = NULL
        est = e.est_shared
        e.est_shared = NULL
        x = e.ex_shared
        count = e.ex_shared_len
        e.ex_shared = NULL
        e.ex_shared_len = 0
        e.ex_shared_cap = 0
        pthread_mutex_unlock(&e.lock)
        groups = {}
        for i in range(count):
            # An int key, not a tuple: ints are not tracked by the garbage collector, and a
            # tuple per exchange made it run every few hundred exchanges.
            key = (x[i].token << 24) | (<uint64_t>x[i].method << 16) | x[i].status
            if x[i].token == 0:
                key |= ((((<object>x[i].service << 32) | x[i].inst) << 32 | x[i].client_ip)
                        << 64)
            group = groups.get(key)
            if group is None:
                group = groups[key] = (x[i].token, x[i].method, x[i].status, [], [],
                                       x[i].service, x[i].inst, x[i].client_ip)
            group[3].append(x[i].roundtrip_ns // 1000)
            group[4].append(x[i].total_ns // 1000)
        free(x)
        exchanges = list(groups.values())
        established = []
        # Read before any completion is freed: a connection may be in both.
        while est != NULL:
            established.append(est.token)
            est = est.est_next
        out = []
        handed = []
        while c != NULL:
            nxt = c.link
            if c.token == 0:
                handed.append((c.svc.id, c.fd[0], c.client_ip, c.inst, c.err))
            else:
                out.append((c.token, c.dir[0].bytes, c.dir[1].bytes, c.err, c.duration_ns,
                            c.answered, c.fd[0] if c.handed_back else -1))
            free(c)
            c = nxt
        return exchanges, out, established, handed

    def close_all(self):
        """Reset every relayed connection now (completions carry ECANCELED); keep running."""
        if self._running:
            self._command(RELAY_CMD_CUT)

    def stop(self):
        """Reset what is still relayed, end the thread and release pipes and eventfds.

        Completions of the cut connections stay available to ``drain()``.  Idempotent.
        """
        if not self._running:
            if not self._stopped:
                self._stopped = True
                self._close_fds()
            return
        self._running = False
        self._stopped = True
        self._command(RELAY_CMD_STOP)
        with nogil:
            pthread_join(self.thread, NULL)
        self._close_fds()

    @property
    def eventfd(self) -> int:
        """A descriptor that becomes readable when completions are queued (-1 when stopped)."""
        return self.e.done_fd

    @property
    def running(self) -> bool:
        return self._running

    @property
    def pipe_size(self) -> int:
        return self.e.pipe_size

    @property
    def active(self) -> int:
        """Connections handed over or accepted and not yet completed."""
        return (flux_relay_load(&self.e.counters[RC_SUBMITTED])
                + flux_relay_load(&self.e.counters[RC_ACCEPTED])
                - flux_relay_load(&self.e.counters[RC_COMPLETED]))

    @property
    def pipes_idle(self) -> int:
        """Pipes pooled for reuse."""
        return flux_relay_load(&self.e.counters[RC_PIPES_IDLE])

    @property
    def pipes_lent(self) -> int:
        """Pipes currently lent to a direction with bytes in flight."""
        return flux_relay_load(&self.e.counters[RC_PIPES_LENT])

    @property
    def inflight_bytes(self) -> int:
        """Bytes read from one side and not yet written to the other."""
        return flux_relay_load(&self.e.counters[RC_INFLIGHT])

    def stats(self) -> dict:
        """Every counter by name, plus ``active`` and the open pipes and sockets owned."""
        cdef int i
        out = {name: flux_relay_load(&self.e.counters[i])
               for i, name in enumerate(_RELAY_COUNTER_NAMES)}
        out["active"] = out["submitted"] + out["accepted"] - out["completed"]
        out["pipes_open"] = out["pipes_created"] - out["pipes_closed"]
        out["sockets_owned"] = 2 * (out["submitted"] + out["accepted"]) - out["sockets_closed"]
        out["debug_build"] = bool(FLUX_RELAY_DEBUG)
        return out

    def __dealloc__(self):
        cdef RelayEngine *e = self.e
        cdef RelayConn *c
        cdef RelayConn *nxt
        if e == NULL:
            return
        if self._running:
            self._running = False
            self._command(RELAY_CMD_STOP)
            with nogil:
                pthread_join(self.thread, NULL)
        self._close_fds()
        c = e.done_head
        while c != NULL:
            nxt = c.link
            if c.handed_back and c.fd[0] >= 0:
                close(c.fd[0])
            free(c)
            c = nxt
        c = e.reap
        while c != NULL:
            nxt = c.link
            free(c)
            c = nxt
        accept_free_services(e)
        e.shared.refs -= 1
        if e.shared.refs == 0:
            free(e.shared)
        pthread_mutex_destroy(&e.lock)
        pthread_mutex_destroy(&e.stats_lock)
        free(e.ex_local)
        free(e.ex_shared)
        free(e.buffers)
        free(e.pool)
        free(e)
        self.e = NULL
