# Accepting in the engine: a service's clients accepted, routed and counted (included by
# _splice.pyx).
#
# Theory of operation
# -------------------
# A service's listening socket can be handed to the engine (listen()): it is registered in the
# engine's epoll (edge-triggered, tagged svc|2), and the engine thread accepts, picks an
# instance and connects on its own, so a new connection costs no Python at all.  Each shard (one
# SpliceEngine, one thread) has its own listening socket per service, bound to the same port
# with SO_REUSEPORT, so the kernel spreads new connections over the shards.
#
# What the engine picks from is a *snapshot* the asyncio side pushes whenever the service's pool
# changes (set_pool()): the instances that are ready and healthy, each with its address and an
# id, and a time from which the snapshot is stale (the pool's next retry is due: only the pool
# can move that instance back).  The engine picks uniformly, or with p2c the less loaded of two
# by its own count of the connections it has up to each instance.  Everything unusual goes back
# to the asyncio side, which goes on exactly as if it had accepted the client itself (the
# listener's Python path, the behaviour oracle):
#
# - no snapshot, an empty one (nothing ready, or an instance on probation: its one probe must be
#   chosen by the pool), or a stale one: the client is handed over unread;
# - a failed or timed-out connect: the client is handed back unread with the errno and the
#   instance tried (the same hand-back as connect(), see _relay_connect.pxi);
# - the descriptor budget spent, or accept4() failing for want of descriptors or memory: the
#   service stops accepting (its clients wait in the kernel's backlog) and the asyncio side is
#   told, once; it logs, retries and resumes the service (pause()/resume()).
# Hand-overs travel as connection records on the completion queue (handed_back set), so they
# cost nothing new on the engine side and arrive in order with everything else.
#
# Counting: an engine-accepted connection is counted once it is up, in its service's tally
# (connections per instance and client IP, an open-addressing table; the service names at most
# max_clients client IPs there, the first ones seen, and tallies every other client as
# ACCEPT_OTHER_CLIENT, so clients from everywhere cannot grow it without bound) and in the
# service's active gauge and per-instance active counts; bytes of every connection that names a
# service (engine-accepted or handed over by the asyncio side with a service) are added to the
# service's two byte counters as they are delivered, so a long-lived connection shows before it
# ends.  The asyncio side reads all of it at scrape time; nothing per connection crosses over.
# The descriptor budget is shared by the shards (RelayShared): held counts the connections the
# engines have accepted and not yet closed or handed back.
#
# A service whose instances read a PROXY protocol header first (listen()'s proxy_protocol,
# fluxctl --proxy-protocol) gets one on each connection the engine accepts, made here from the
# client's address and the one it reached (getsockname), the same bytes as the asyncio side's
# flux.relay.proxy_protocol makes for the clients it connects itself; it is put in flight in the
# client's direction before the first pump (relay_preface), so it goes ahead of the client's
# bytes, and a failed connect hands the client back with nothing read or sent.
#
# A --forwarded http service's connections carry the client's address as text from here on
# (http_forward_attach: formatted from the accepted peer, no syscall for an IPv4 one), for the
# X-Forwarded-For their request heads get (_relay_forwarded.pxi).
#
# A published port shared by host name can be accepted here too: its service is a *router*
# (route() gave it a table of host names, RelayRoutes), whose clients belong to no service until
# their first request's Host is read.  The port's listening sockets defer accepts
# (TCP_DEFER_ACCEPT, set by the caller), so a client usually reaches accept4() with its first
# head already in; accept_by_host peeks at it (MSG_PEEK: the bytes stay for the relay to read),
# and when it is a complete HTTP/1.x head of at most ROUTE_PEEK bytes with exactly one plain
# Host naming a service of the table (exact name, then "*." and the parent, then the default),
# the client goes on exactly as if that service had accepted it (accept_route), with its host
# pinned (hf_pin_host: a later request naming another host is answered 421).  Everything else
# (nothing read yet, a head in pieces, a larger one, HTTP/2's preface, no Host or several, a
# name outside ASCII or in brackets, a host no service has) is handed over unread to the
# router's handler, flux.balancer.hostrouter, which reads, routes or answers it in Python, the
# behaviour oracle.  So the engine only ever takes the common case, and decides it as the
# oracle would (request_host, HostRoutes.pick); tests hold both to the same answers.
# A tcp port shared by TLS server name is routed the same way (RelayRoutes.tls): the name comes
# from the server_name extension of a ClientHello that fits its first TLS record
# (route_server_name; a ClientHello over several records, or without a name, is handed over),
# and the client goes to its service untouched, as TLS passthrough wants.
#
# Services are never freed while the engine lives (a listener that closes leaves its counters
# behind, as Prometheus counters must stay); their commands (listen, unlisten, new snapshot,
# pause, resume) go through the same lock and wake-up as submissions.

cdef inline uint64_t accept_random(RelayEngine *e) noexcept nogil:
    # xorshift64*: the pick needs speed and spread, not secrecy.
    cdef uint64_t x = e.rng
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    e.rng = x
    return x * <uint64_t>2685821657736338717


cdef inline uint32_t accept_below(RelayEngine *e, uint32_t n) noexcept nogil:
    return <uint32_t>(((accept_random(e) >> 32) * <uint64_t>n) >> 32)


cdef inline int64_t accept_active_of(RelaySvc *s, uint32_t inst) noexcept nogil:
    return s.inst_active[inst] if inst < s.inst_cap else 0


cdef RelayTarget *accept_pick(RelayEngine *e, RelaySvc *s, RelaySnap *snap) noexcept nogil:
    cdef uint32_t n = <uint32_t>snap.n
    cdef uint32_t i, j
    if n == 1:
        return &snap.targets[0]
    i = accept_below(e, n)
    if not snap.p2c:
        return &snap.targets[i]
    j = accept_below(e, n - 1)
    if j >= i:
        j += 1
    # Ties go to the first, itself a uniform choice (as in the pool).
    if accept_active_of(s, snap.targets[j].id) < accept_active_of(s, snap.targets[i].id):
        return &snap.targets[j]
    return &snap.targets[i]


# ---- counting -----------------------------------------------------------------------------------

# The client IP the tally counts unnamed clients under: 255.255.255.255, never a TCP peer.
cdef uint32_t ACCEPT_OTHER_CLIENT = 0xFFFFFFFF


cdef inline size_t accept_client_slot(uint32_t ip, size_t cap) noexcept nogil:
    return <size_t>((ip * <uint64_t>11400714819323198485) >> 32) & (cap - 1)


cdef int accept_clients_grow(RelaySvc *s) noexcept nogil:
    cdef size_t cap = 64 if s.clients_cap == 0 else 2 * s.clients_cap
    cdef uint32_t *t = <uint32_t *>calloc(cap, sizeof(uint32_t))
    cdef size_t i, h
    if t == NULL:
        return -1
    for i in range(s.clients_cap):
        if s.clients[i]:
            h = accept_client_slot(s.clients[i], cap)
            while t[h]:
                h = (h + 1) & (cap - 1)
            t[h] = s.clients[i]
    free(s.clients)
    s.clients = t
    s.clients_cap = cap
    return 0


cdef uint32_t accept_client_label(RelayEngine *e, RelaySvc *s, uint32_t ip) noexcept nogil:
    """The client IP a connection from ``ip`` is tallied under: ``ip`` if the service names it
    or names fewer than max_clients (it is named from now on), else ACCEPT_OTHER_CLIENT (the
    caller holds stats_lock).  0 (not IPv4) is its own label, as before."""
    cdef size_t h
    if ip == 0:
        return 0
    if s.clients_cap:
        h = accept_client_slot(ip, s.clients_cap)
        while s.clients[h]:
            if s.clients[h] == ip:
                return ip
            h = (h + 1) & (s.clients_cap - 1)
    if s.clients_len >= e.max_clients or ip == ACCEPT_OTHER_CLIENT:
        return ACCEPT_OTHER_CLIENT
    if 2 * (s.clients_len + 1) > s.clients_cap and accept_clients_grow(s) < 0:
        return ACCEPT_OTHER_CLIENT
    h = accept_client_slot(ip, s.clients_cap)
    while s.clients[h]:
        h = (h + 1) & (s.clients_cap - 1)
    s.clients[h] = ip
    s.clients_len += 1
    return ip


cdef int accept_tally_grow(RelaySvc *s) noexcept nogil:
    cdef size_t cap = 64 if s.tally_cap == 0 else 2 * s.tally_cap
    cdef RelayTally *t = <RelayTally *>calloc(cap, sizeof(RelayTally))
    cdef size_t i, h
    if t == NULL:
        return -1
    for i in range(s.tally_cap):
        if s.tally[i].key:
            h = <size_t>((s.tally[i].key * <uint64_t>11400714819323198485) >> 32) & (cap - 1)
            while t[h].key:
                h = (h + 1) & (cap - 1)
            t[h] = s.tally[i]
    free(s.tally)
    s.tally = t
    s.tally_cap = cap
    return 0


cdef void accept_tally(RelaySvc *s, uint64_t key) noexcept nogil:
    """Count one connection for ``key`` (the caller holds stats_lock)."""
    cdef size_t h
    if 2 * (s.tally_len + 1) > s.tally_cap and accept_tally_grow(s) < 0:
        return
    h = <size_t>((key * <uint64_t>11400714819323198485) >> 32) & (s.tally_cap - 1)
    while s.tally[h].key and s.tally[h].key != key:
        h = (h + 1) & (s.tally_cap - 1)
    if not s.tally[h].key:
        s.tally[h].key = key
        s.tally_len += 1
    s.tally[h].count += 1


cdef int accept_inst_grow(RelaySvc *s, uint32_t inst) noexcept nogil:
    cdef uint32_t cap = s.inst_cap if s.inst_cap else 16
    cdef int64_t *grown
    while cap <= inst:
        cap *= 2
    grown = <int64_t *>calloc(cap, sizeof(int64_t))
    if grown == NULL:
        return -1
    if s.inst_cap:
        memcpy(grown, s.inst_active, s.inst_cap * sizeof(int64_t))
    free(s.inst_active)
    s.inst_active = grown
    s.inst_cap = cap
    return 0


cdef void accept_count_up(RelayEngine *e, RelayConn *c) noexcept nogil:
    """An engine-accepted connection is up: count it (undone by accept_retire)."""
    cdef RelaySvc *s = c.svc
    pthread_mutex_lock(&e.stats_lock)
    if c.inst >= s.inst_cap:
        accept_inst_grow(s, c.inst)
    if c.inst < s.inst_cap:
        s.inst_active[c.inst] += 1
    accept_tally(s, (<uint64_t>c.inst << 32) | accept_client_label(e, s, c.client_ip))
    pthread_mutex_unlock(&e.stats_lock)
    flux_relay_bump(&s.active, 1)
    c.counted = 1


cdef bint accept_retire(RelayEngine *e, RelayConn *c) noexcept nogil:
    """An engine-accepted connection ended.  Returns whether the record is the engine's to free
    (at the end of the batch); a record handed back goes on to the completion queue."""
    cdef RelaySvc *s = c.svc
    cdef int answer
    flux_relay_add(&e.shared.held, -1)
    if c.counted:
        c.counted = 0
        flux_relay_bump(&s.active, -1)
        if c.inst < s.inst_cap:
            # Written by this thread only; read by the asyncio side under the lock, so a plain
            # store is enough for a value it only shows.
            s.inst_active[c.inst] -= 1
        answer = http_answer_index(c.answered)
        if answer >= 0:
            flux_relay_bump(&s.rejected[answer], 1)
    if c.handed_back:
        return False
    c.link = e.reap
    e.reap = c
    return True


cdef void accept_reap(RelayEngine *e) noexcept nogil:
    cdef RelayConn *c = e.reap
    cdef RelayConn *nxt
    cdef int64_t n = 0
    e.reap = NULL
    while c != NULL:
        nxt = c.link
        free(c)
        n += 1
        c = nxt
    relay_count(e, RC_COMPLETED, n)


# ---- the PROXY protocol header -----------------------------------------------------------------

cdef size_t accept_put_decimal(char *out, uint32_t value) noexcept nogil:
    cdef char digits[10]
    cdef size_t n = 0
    cdef size_t i
    while True:
        digits[n] = <char>(48 + value % 10)
        n += 1
        value //= 10
        if value == 0:
            break
    for i in range(n):
        out[i] = digits[n - 1 - i]
    return n


cdef size_t accept_put_ipv4(char *out, uint32_t ip) noexcept nogil:
    """``ip`` (network order) as dotted decimal text; returns its length."""
    cdef const uint8_t *octet = <const uint8_t *>&ip
    cdef size_t n = 0
    cdef int i
    for i in range(4):
        if i:
            out[n] = 46     # '.'
            n += 1
        n += accept_put_decimal(out + n, octet[i])
    return n


cdef size_t accept_proxy_header(char *out, uint8_t version, uint32_t src, uint16_t sport,
                                uint32_t dst, uint16_t dport) noexcept nogil:
    """The PROXY protocol header of ``version`` for a TCP4 connection (addresses in network
    order, ports in host order) into ``out`` (RELAY_PREFACE_MAX bytes); returns its length.
    src 0 (a client that is not IPv4): v1's UNKNOWN line, v2's LOCAL command (no address)."""
    cdef size_t n
    if version == 1:
        if src == 0:
            memcpy(out, b"PROXY UNKNOWN\r\n", 15)
            return 15
        memcpy(out, b"PROXY TCP4 ", 11)
        n = 11
        n += accept_put_ipv4(out + n, src)
        out[n] = 32     # ' '
        n += 1
        n += accept_put_ipv4(out + n, dst)
        out[n] = 32
        n += 1
        n += accept_put_decimal(out + n, sport)
        out[n] = 32
        n += 1
        n += accept_put_decimal(out + n, dport)
        out[n] = 13     # CR LF
        out[n + 1] = 10
        return n + 2
    memcpy(out, b"\r\n\r\n\x00\r\nQUIT\n", 12)
    out[14] = 0         # the length of what follows the 16-byte header, in network order
    if src == 0:
        out[12] = <char>0x20    # version 2, LOCAL
        out[13] = 0
        out[15] = 0
        return 16
    out[12] = <char>0x21        # version 2, PROXY
    out[13] = <char>0x11        # TCP over IPv4
    out[15] = 12
    memcpy(out + 16, &src, 4)
    memcpy(out + 20, &dst, 4)
    out[24] = <char>(sport >> 8)
    out[25] = <char>(sport & 0xFF)
    out[26] = <char>(dport >> 8)
    out[27] = <char>(dport & 0xFF)
    return 28


cdef int accept_proxy_preface(RelayEngine *e, RelayConn *c, uint8_t version) noexcept nogil:
    """Put the PROXY protocol header naming ``c``'s client and the address it reached in
    flight ahead of the client's bytes (relay_preface, whose result it returns)."""
    cdef sockaddr_in local
    cdef socklen_t size = sizeof(local)
    cdef char out[RELAY_PREFACE_MAX]
    cdef size_t n
    if c.client_ip == 0 or getsockname(c.fd[0], <sockaddr *>&local, &size) < 0 or (
            local.sin_family != AF_INET):
        n = accept_proxy_header(out, version, 0, 0, 0, 0)
    else:
        n = accept_proxy_header(out, version, c.client_ip, c.client_port,
                                local.sin_addr.s_addr, ntohs(local.sin_port))
    return relay_preface(e, c, out, n)


# ---- accepting ----------------------------------------------------------------------------------

cdef void accept_queue(RelayEngine *e, RelaySvc *s) noexcept nogil:
    # First in, first out: services resumed after a shortage are served in the order they
    # were resumed (the order they paused in), so the first to wait is the first to accept.
    if not s.queued:
        s.queued = 1
        s.accept_next = NULL
        if e.accept_tail != NULL:
            e.accept_tail.accept_next = s
        else:
            e.accept_ready = s
        e.accept_tail = s


cdef void accept_hand_over(RelayEngine *e, RelaySvc *s, int fd, uint32_t ip,
                           int err) noexcept nogil:
    """Give the asyncio side a client to pick for (fd >= 0), or news of a shortage (fd -1)."""
    cdef RelayConn *c = <RelayConn *>calloc(1, sizeof(RelayConn))
    if c == NULL:
        if fd >= 0:
            close(fd)
            flux_relay_add(&e.shared.held, -1)
        return
    c.fd[0] = fd
    c.fd[1] = -1
    c.dir[0].pipe_r = c.dir[0].pipe_w = -1
    c.dir[1].pipe_r = c.dir[1].pipe_w = -1
    c.svc = s
    c.client_ip = ip
    c.err = err
    c.handed_back = 1
    c.closed = 1
    relay_count(e, RC_ACCEPTED, 1)
    relay_count(e, RC_SOCKETS_CLOSED, 2)    # the client is the caller's; no upstream was made
    if fd >= 0:
        relay_count(e, RC_TO_PYTHON, 1)
        flux_relay_add(&e.shared.held, -1)
    if e.finished_tail != NULL:
        e.finished_tail.link = c
    else:
        e.finished_head = c
    e.finished_tail = c


cdef void accept_pause(RelayEngine *e, RelaySvc *s, int err) noexcept nogil:
    """Stop accepting for ``s`` and tell the asyncio side (which resumes it)."""
    if s.paused:
        return
    s.paused = 1
    accept_hand_over(e, s, -1, 0, err)


cdef void accept_route(RelayEngine *e, RelaySvc *s, int fd, uint32_t ip,
                       uint16_t port, bint nodelay, bint pinned=False) noexcept nogil:
    """A new client: connect it to a picked instance, or hand it to the asyncio side.
    ``nodelay``: the client has TCP_NODELAY already (its listening socket's, see
    RelaySvc.nodelay); ``pinned``: a router picked ``s`` by the client's Host (hf_pin_host)."""
    cdef RelaySnap *snap = s.snap
    cdef RelayTarget *t
    cdef RelayConn *c
    if snap == NULL or snap.n == 0 or (
            snap.python_at_ns and relay_now_ns() >= snap.python_at_ns):
        accept_hand_over(e, s, fd, ip, 0)
        return
    t = accept_pick(e, s, snap)
    c = <RelayConn *>calloc(1, sizeof(RelayConn))
    if c == NULL:
        accept_hand_over(e, s, fd, ip, 0)
        return
    relay_count(e, RC_ACCEPTED, 1)
    c.fd[0] = fd
    c.fd[1] = -1
    c.dir[0].pipe_r = c.dir[0].pipe_w = -1
    c.dir[1].pipe_r = c.dir[1].pipe_w = -1
    c.svc = s
    c.inst = t.id
    c.client_ip = ip
    c.client_port = port
    c.started_ns = relay_now_ns()
    memcpy(c.addr, t.addr, t.addr_len)
    c.addr_len = t.addr_len
    c.self_check = t.self_check
    c.client_nodelay = nodelay
    c.connect_deadline_ns = c.started_ns + s.connect_timeout_ns
    if s.http:
        if http_attach(c, s.observe) < 0 or (
                s.forwarded and http_forward_attach(c, fd) < 0):
            free(c.http)
            free(c)
            relay_count(e, RC_ACCEPTED, -1)
            accept_hand_over(e, s, fd, ip, 0)
            return
        e.http_live += 1
        if pinned:
            hf_pin_host(&c.http.f)
    relay_start_connect(e, c)
    if s.proxy_protocol and not c.closed and accept_proxy_preface(e, c, s.proxy_protocol) < 0:
        relay_abort(e, c, ENOMEM)


# ---- routing by Host -----------------------------------------------------------------------------

cdef inline uint8_t route_lower(uint8_t ch) noexcept nogil:
    return ch + 32 if 65 <= ch <= 90 else ch


cdef inline bint route_blank(uint8_t ch) noexcept nogil:
    return ch == 32 or ch == 9 or ch == 13


cdef Py_ssize_t route_head_end(const uint8_t *b, Py_ssize_t start, Py_ssize_t n) noexcept nogil:
    """Where the head starting at ``start`` ends: just past its first empty line (LF, an
    optional CR, LF: the oracle's end, which also takes bare LFs), or -1."""
    cdef Py_ssize_t i
    for i in range(start, n - 1):
        if b[i] == 10:
            if b[i + 1] == 10:
                return i + 2
            if b[i + 1] == 13 and i + 2 < n and b[i + 2] == 10:
                return i + 3
    return -1


cdef int route_host(const uint8_t *b, Py_ssize_t start, Py_ssize_t end,
                    char *out) noexcept nogil:
    """The one Host field of the head b[start:end] as routes compare it (lower case, no port,
    no trailing dot) into ``out`` (ROUTE_NAME_MAX bytes); returns its length, or -1 for
    anything the engine leaves to the asyncio side: no Host or several, an empty one, a
    name in brackets (IPv6), a byte outside printable ASCII, one too long."""
    cdef Py_ssize_t line = start, nl, colon, i, a, z, found_a = 0, found_z = 0
    cdef int count = 0
    cdef int n
    # Skip the request line.
    while line < end and b[line] != 10:
        line += 1
    line += 1
    while line < end:
        nl = line
        while nl < end and b[nl] != 10:
            nl += 1
        colon = line
        while colon < nl and b[colon] != 58:     # ':'
            colon += 1
        if colon < nl:
            a = line
            z = colon
            while a < z and route_blank(b[a]):
                a += 1
            while z > a and route_blank(b[z - 1]):
                z -= 1
            if (z - a == 4 and route_lower(b[a]) == 104 and route_lower(b[a + 1]) == 111
                    and route_lower(b[a + 2]) == 115 and route_lower(b[a + 3]) == 116):
                count += 1
                found_a = colon + 1
                found_z = nl
        line = nl + 1
    if count != 1:
        return -1
    a = found_a
    z = found_z
    while a < z and route_blank(b[a]):
        a += 1
    while z > a and route_blank(b[z - 1]):
        z -= 1
    if a == z or b[a] == 91:                     # '['
        return -1
    for i in range(a, z):
        if b[i] <= 32 or b[i] >= 127:
            return -1
    # Without the port: what follows the last ':'.
    i = z
    while i > a and b[i - 1] != 58:
        i -= 1
    if i > a:
        z = i - 1
    if z > a and b[z - 1] == 46:                 # a trailing '.'
        z -= 1
    n = <int>(z - a)
    if n <= 0 or n >= ROUTE_NAME_MAX:
        return -1
    for i in range(n):
        out[i] = <char>route_lower(b[a + i])
    out[n] = 0
    return n


cdef inline int route_u16(const uint8_t *b) noexcept nogil:
    return (<int>b[0] << 8) | b[1]


cdef int route_server_name(const uint8_t *b, Py_ssize_t n, char *out) noexcept nogil:
    """The server name of the TLS ClientHello at the start of b[:n] as routes compare it
    (lower case, no trailing dot) into ``out`` (ROUTE_NAME_MAX bytes); returns its length, or
    -1 for anything the engine leaves to the asyncio side (clienthello.read_server_name, the
    oracle): not a handshake record, a ClientHello not whole in the first record (or not in
    yet), a malformed one, none or an empty name, a byte outside printable ASCII."""
    cdef Py_ssize_t record, end, at, ext_end, kind, size, names_end, name_len, i
    cdef int length
    if n < 9 or b[0] != 22 or b[1] != 3 or b[2] > 4:
        return -1
    record = route_u16(b + 3)
    if record == 0 or 5 + record > n or b[5] != 1:
        return -1
    length = (<int>b[6] << 16) | (<int>b[7] << 8) | b[8]
    if 4 + length > record:
        return -1
    end = 9 + length
    # legacy_version and random, then the session id, cipher suites and compression vectors.
    at = 9 + 34
    if at + 1 > end:
        return -1
    at += 1 + b[at]
    if at + 2 > end:
        return -1
    at += 2 + route_u16(b + at)
    if at + 1 > end:
        return -1
    at += 1 + b[at]
    if at + 2 > end:
        return -1
    ext_end = at + 2 + route_u16(b + at)
    at += 2
    if ext_end > end:
        return -1
    while at + 4 <= ext_end:
        kind = route_u16(b + at)
        size = route_u16(b + at + 2)
        at += 4
        if at + size > ext_end:
            return -1
        if kind != 0:
            at += size
            continue
        if size < 2:
            return -1
        names_end = at + 2 + route_u16(b + at)
        if names_end > at + size:
            return -1
        at += 2
        # The list's first host_name entry (type 0) is the name.
        while at + 3 <= names_end:
            name_len = route_u16(b + at + 1)
            if at + 3 + name_len > names_end:
                return -1
            if b[at] == 0:
                at += 3
                if name_len > 0 and b[at + name_len - 1] == 46:     # a trailing '.'
                    name_len -= 1
                if name_len <= 0 or name_len >= ROUTE_NAME_MAX:
                    return -1
                for i in range(name_len):
                    if b[at + i] <= 32 or b[at + i] >= 127:
                        return -1
                    out[i] = <char>route_lower(b[at + i])
                out[name_len] = 0
                return <int>name_len
            at += 3 + name_len
        return -1
    return -1


cdef RelaySvc *route_pick(const RelayRoutes *r, const char *name, int n) noexcept nogil:
    """The service for host ``name``: its exact entry, else "*." and its parent, else the
    default (HostRoutes.pick); NULL: none, or one the engine was not given (the asyncio side
    answers 404, or serves it)."""
    cdef size_t i
    cdef int dot = 0
    cdef const RelayRoute *x
    for i in range(r.n):
        x = &r.routes[i]
        if not x.wildcard and x.len == n and memcmp(x.name, name, n) == 0:
            return x.target
    while dot < n and name[dot] != 46:
        dot += 1
    if dot < n - 1:
        for i in range(r.n):
            x = &r.routes[i]
            if x.wildcard and x.len == n - dot and memcmp(x.name, name + dot, n - dot) == 0:
                return x.target
    return r.fallback


cdef void accept_by_host(RelayEngine *e, RelaySvc *s, int fd, uint32_t ip,
                         uint16_t port) noexcept nogil:
    """A router's new client: to the service its first request's Host names, if the head is
    in and plain, else handed over unread (see the comment at the top)."""
    cdef uint8_t buf[ROUTE_PEEK]
    cdef char name[ROUTE_NAME_MAX]
    cdef Py_ssize_t n, start = 0, end
    cdef int size
    cdef RelaySvc *target
    n = recv(fd, buf, ROUTE_PEEK, MSG_PEEK)
    if n > 0 and s.routes.tls:
        size = route_server_name(buf, n, name)
        if size > 0:
            target = route_pick(s.routes, name, size)
            if target != NULL:
                relay_count(e, RC_ROUTED, 1)
                accept_route(e, target, fd, ip, port, s.nodelay)
                return
    elif n > 0:
        # Empty lines before a request line are ignored (RFC 9112), as the oracle does.
        while start < n and (buf[start] == 13 or buf[start] == 10):
            start += 1
        end = route_head_end(buf, start, n)
        # HTTP/2's preface ("PRI * HTTP/2.0") has no Host: the oracle sends it on.
        if end > 0 and not (end - start >= 4 and memcmp(buf + start, b"PRI ", 4) == 0):
            size = route_host(buf, start, end, name)
            if size > 0:
                target = route_pick(s.routes, name, size)
                if target != NULL:
                    relay_count(e, RC_ROUTED, 1)
                    accept_route(e, target, fd, ip, port, s.nodelay, True)
                    return
    accept_hand_over(e, s, fd, ip, 0)


cdef void accept_service(RelayEngine *e, RelaySvc *s) noexcept nogil:
    """Accept up to a batch of ``s``'s pending clients."""
    cdef sockaddr_in peer
    cdef socklen_t size
    cdef int fd, i
    cdef RelayShared *sh = e.shared
    for i in range(RELAY_ACCEPT_BATCH):
        if s.fd < 0 or s.paused:
            return
        # Take the client's place in the budget before accepting it: with a check first and
        # a count after, two shards could both take the last place.
        if (flux_relay_add_fetch(&sh.held, 1) + flux_relay_load(&sh.python_held)
                > flux_relay_load(&sh.limit)):
            flux_relay_add(&sh.held, -1)
            accept_pause(e, s, 0)
            return
        size = sizeof(peer)
        fd = accept4(s.fd, <sockaddr *>&peer, &size, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            flux_relay_add(&sh.held, -1)
            if errno == EAGAIN:
                return
            if errno == EINTR or errno == ECONNABORTED or errno == EPROTO or errno == EPERM:
                continue
            relay_count(e, RC_ACCEPT_FAILURES, 1)
            accept_pause(e, s, errno)
            return
        if s.routes != NULL:
            if peer.sin_family == AF_INET:
                accept_by_host(e, s, fd, peer.sin_addr.s_addr, ntohs(peer.sin_port))
            else:
                accept_by_host(e, s, fd, 0, 0)
        elif peer.sin_family == AF_INET:
            accept_route(e, s, fd, peer.sin_addr.s_addr, ntohs(peer.sin_port), s.nodelay)
        else:
            accept_route(e, s, fd, 0, 0, s.nodelay)
    accept_queue(e, s)      # more may be waiting: after the other services' events


cdef void accept_on_event(RelayEngine *e, RelaySvc *s) noexcept nogil:
    if not s.queued:
        accept_service(e, s)


cdef void accept_run_ready(RelayEngine *e) noexcept nogil:
    cdef RelaySvc *s = e.accept_ready
    cdef RelaySvc *nxt
    e.accept_ready = NULL
    e.accept_tail = NULL
    while s != NULL:
        nxt = s.accept_next
        s.accept_next = NULL
        s.queued = 0
        accept_service(e, s)
        s = nxt


# ---- commands -----------------------------------------------------------------------------------

cdef void route_free(RelayRoutes *r) noexcept nogil:
    if r != NULL:
        free(r.routes)
        free(r)


cdef void accept_unregister(RelayEngine *e, RelaySvc *s) noexcept nogil:
    if s.fd >= 0:
        epoll_ctl(e.epfd, EPOLL_CTL_DEL, s.fd, NULL)
        close(s.fd)
        s.fd = -1


cdef void accept_run_commands(RelayEngine *e, RelayCtl *ctl) noexcept nogil:
    cdef RelayCtl *nxt
    cdef RelaySvc *s
    cdef epoll_event ev
    cdef int one = 1
    while ctl != NULL:
        nxt = ctl.next
        s = ctl.svc
        if ctl.kind == RELAY_CTL_LISTEN:
            accept_unregister(e, s)
            s.fd = ctl.fd
            s.paused = 0
            # The engine thread must never block in accept4().
            ioctl(s.fd, FIONBIO, &one)
            ev.events = EPOLLIN | EPOLLET
            ev.data.u64 = <uint64_t><uintptr_t>s | <uint64_t>RELAY_LISTEN_TAG
            if epoll_ctl(e.epfd, EPOLL_CTL_ADD, s.fd, &ev) < 0:
                relay_count(e, RC_ACCEPT_FAILURES, 1)
                accept_pause(e, s, errno)
            else:
                accept_queue(e, s)  # clients may be waiting already
        elif ctl.kind == RELAY_CTL_UNLISTEN:
            accept_unregister(e, s)
        elif ctl.kind == RELAY_CTL_SNAP:
            if s.snap != NULL:
                free(s.snap)
            s.snap = ctl.snap
        elif ctl.kind == RELAY_CTL_ROUTES:
            route_free(s.routes)
            s.routes = ctl.routes
        elif ctl.kind == RELAY_CTL_PAUSE:
            s.paused = 1
        elif ctl.kind == RELAY_CTL_RESUME:
            s.paused = 0
            accept_queue(e, s)
        free(ctl)
        ctl = nxt


cdef void accept_free_services(RelayEngine *e) noexcept nogil:
    """At teardown (the thread has ended): close listening sockets, free every service."""
    cdef uint32_t i
    cdef RelaySvc *s
    cdef RelayCtl *ctl = e.ctl_head
    cdef RelayCtl *nxt
    while ctl != NULL:
        nxt = ctl.next
        if ctl.kind == RELAY_CTL_LISTEN and ctl.fd >= 0:
            close(ctl.fd)
        if ctl.kind == RELAY_CTL_SNAP:
            free(ctl.snap)
        if ctl.kind == RELAY_CTL_ROUTES:
            route_free(ctl.routes)
        free(ctl)
        ctl = nxt
    e.ctl_head = NULL
    e.ctl_tail = NULL
    for i in range(e.svcs_len):
        s = e.svcs[i]
        if s == NULL:
            continue
        if s.fd >= 0:
            close(s.fd)
        free(s.snap)
        route_free(s.routes)
        free(s.tally)
        free(s.clients)
        free(s.inst_active)
        free(s)
    free(e.svcs)
    e.svcs = NULL
    e.svcs_len = 0
    e.svcs_cap = 0
