# The engine thread's loop: epoll events in, submissions and commands taken, the ready list
# served, and each batch's results published to the asyncio side (included by _splice.pyx).
#
# Completions reuse the connection record itself: a finished record is queued (mutex-protected)
# for the asyncio side, and the "done" eventfd is written when that queue goes from empty to
# non-empty, so a burst of completions costs one wake-up; drain_all() takes the whole queue at
# once.  Records finished during an epoll batch are published only at the end of the batch,
# because a later event of the same batch may still name them.

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
    if c == NULL and e.ex_local_len == 0 and est == NULL and e.nt_local_len == 0:
        return
    while c != NULL:
        n += 1
        c = c.link
    # Count before publishing so that a drained completion is always reflected in `active`.
    relay_count(e, RC_COMPLETED, n)
    pthread_mutex_lock(&e.lock)
    # Established connections, exchanges and notices first, in the same critical section:
    # none is ever seen after the connection's completion.
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
    if e.nt_local_len:
        wake = notice_publish(e) or wake
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
        if c.self_check and relay_self_connected(c):
            relay_connect_failed(e, c, ECONNREFUSED)
            return
        relay_established(e, c)
    if events & EPOLLERR:
        # Act on a reset at once, even when no direction would touch this socket soon.
        if getsockopt(c.fd[s], SOL_SOCKET, SO_ERROR, &err, &size) == 0 and err != 0:
            http_cut_by(c, s)
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
        if c.preface != NULL:
            # The caller's PROXY protocol header: in flight before the first pump, so it goes
            # ahead of the client's bytes (a connect that failed at once has no use for it).
            if not c.closed and relay_preface(e, c, c.preface, c.preface_len) < 0:
                relay_abort(e, c, ENOMEM)
            free(c.preface)
            c.preface = NULL
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
    relay_pin_self(e)
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
