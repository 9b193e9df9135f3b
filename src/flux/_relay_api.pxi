# The engine's Python face: SpliceEngine, and the records it hands back (included by
# _splice.pyx).  Everything here runs on the caller's thread, with the GIL.

import errno as _errno
import os as _os
import socket as _socket
import sys as _sys
import time as _time
from collections import namedtuple as _namedtuple

# The engine's counters by name (RC_* in _splice.pxd, same order): what stats() returns and
# fluxd exports (flux_engine_events_total, flux_engine_levels; see flux.relay.engine).
RELAY_COUNTERS = (
    "submitted", "completed", "sockets_closed", "pipes_created", "pipes_closed", "pipes_lent",
    "pipes_idle", "pipe_failures", "pipe_size_refused", "inflight_bytes", "bytes_spliced",
    "bytes_copied", "calls_splice", "calls_recv", "calls_send", "epoll_waits", "bulk_switches",
    "http_exchanges", "http_answered", "http_header_timeouts", "http_idle_closed", "http_opaque",
    "http_h2", "http_h2_gave_up", "http_h2_untracked", "exchanges_dropped", "buffers_lent",
    "buffers_idle", "connects", "connect_failures", "accepted", "to_python", "accept_failures",
    "http_switched", "notices_dropped", "routed", "pin_failures",
)

# The counters above that are levels (they go down as well as up: what is held now).  Every
# other one only counts up, so a counter added to the table is exported as an event unless it
# is named here too.
RELAY_LEVELS = frozenset(("pipes_lent", "pipes_idle", "inflight_bytes", "buffers_lent",
                          "buffers_idle"))

# ---- the records drain_all() and service_counts() return ---------------------------------------
# Named tuples: read them by attribute; they still unpack like the plain tuples they replace.

Completion = _namedtuple(
    "Completion", "token bytes_up bytes_down errno duration_ns answered client_fd"
)
Completion.__doc__ = """A relayed connection ended: bytes client -> upstream and upstream ->
client, errno (0: a clean end), duration in ns, the HTTP status the engine answered itself (0:
none), and client_fd: -1, or the client handed back open and unread after a connect() failed."""

ExchangeGroup = _namedtuple(
    "ExchangeGroup",
    "token method status roundtrips_us totals_us service instance client_ip grpc_path grpc_code",
)
ExchangeGroup.__doc__ = """The exchanges of one label set: method indexes HTTP_METHODS; the
roundtrip and total times in µs, one per exchange.  token 0: a connection the engine accepted
itself, labelled by service, instance and client_ip (IPv4, network-order integer); 0s
otherwise.  grpc_path: None, or the :path of the gRPC calls these HTTP/2 exchanges were ("":
one of too many, or too long), with grpc_code their grpc-status (-1: none)."""

HandOver = _namedtuple("HandOver", "service client_fd client_ip instance errno")
HandOver.__doc__ = """From a service the engine accepts for: a client for the caller to pick for
(instance 0, errno 0), a client whose connect to instance failed with errno, or (client_fd -1)
news that the service stopped accepting (errno 0: the descriptor budget is spent, else
accept4()'s errno)."""

Drained = _namedtuple("Drained", "exchanges completions established handed notices")
Drained.__doc__ = """Everything drain_all() took: ExchangeGroups, Completions, the tokens of
connections established by connect(), HandOvers, Notices (_relay_notice.pxi)."""

AnsweredCounts = _namedtuple("AnsweredCounts", "bad_request too_large timeout misdirected")
AnsweredCounts.__doc__ = """Requests the engine answered itself: 400, 431, 408 and 421."""

TallyEntry = _namedtuple("TallyEntry", "instance client_ip connections")
TallyEntry.__doc__ = """Connections the engine accepted and connected to instance for client_ip
(TALLY_OTHER_CLIENT: for clients beyond the max_clients the service names)."""

# The client_ip of a TallyEntry counting the clients a service does not name.
TALLY_OTHER_CLIENT = ACCEPT_OTHER_CLIENT

ServiceCounts = _namedtuple(
    "ServiceCounts", "to_instances to_clients active answered tally"
)
ServiceCounts.__doc__ = """What the engine counted for one service: bytes delivered to its
instances and to its clients (every connection naming it), and for the connections the engine
accepted: active now, AnsweredCounts, TallyEntries."""

# namedtuple takes its module from the caller's frame, which a compiled module has not.
for _record in (Completion, ExchangeGroup, HandOver, Drained, AnsweredCounts, TallyEntry,
                ServiceCounts):
    _record.__module__ = __name__


# ---- where a connect could meet itself ---------------------------------------------------------

_IP_BIND_ADDRESS_NO_PORT = 24   # <linux/in.h>: bind() checks the address, takes no port
_PORT_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
# What _may_meet_itself found, by packed address, and until when it holds (the port range and the
# host's addresses can change; snapshots are pushed to every shard, so each answer is reused).
_SELF_CHECK_TTL = 10.0
_SELF_CHECK_MAX = 4096
_self_check_seen = {}


def _ephemeral_ports():
    """The kernel's ephemeral port range (it picks connect()'s source ports from it); the
    whole port space if it cannot be read, so every target is checked."""
    try:
        with open(_PORT_RANGE_FILE) as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 1, 65535


def _is_local_address(str ip):
    """Whether ``ip`` is an address of this host (bind() takes it without IP_FREEBIND).
    Unsure (any other error) counts as local, so the check is kept."""
    probe = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        probe.setsockopt(_socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        probe.bind((ip, 0))
    except OSError as error:
        return error.errno != _errno.EADDRNOTAVAIL
    finally:
        probe.close()
    return True


def _may_meet_itself(bytes address not None):
    """Whether a connect to the packed sockaddr ``address`` could come out connected to itself
    (relay_self_connected): only to an IPv4 address of this host, on a port the kernel could
    also pick as the source port.  Instances in containers, or on other hosts, never can, so
    their connections skip the getsockname() the check costs.  Answers are kept for
    _SELF_CHECK_TTL seconds."""
    now = _time.monotonic()
    seen = _self_check_seen.get(address)
    if seen is not None and seen[1] > now:
        return seen[0]
    if len(address) < 8 or int.from_bytes(address[:2], _sys.byteorder) != _socket.AF_INET:
        answer = False  # relay_self_connected only looks at IPv4
    else:
        port = int.from_bytes(address[2:4], "big")
        low, high = _ephemeral_ports()
        answer = low <= port <= high and _is_local_address(_socket.inet_ntoa(address[4:8]))
    if len(_self_check_seen) >= _SELF_CHECK_MAX:
        _self_check_seen.clear()
    _self_check_seen[address] = (answer, now + _SELF_CHECK_TTL)
    return answer


cdef int _raise_errno(str what) except -1:
    """The one errno -> exception helper: OSError with the errno and the failed call named."""
    cdef int err = errno
    raise OSError(err, f"relay engine: {what} failed: {_os.strerror(err)}")


cdef class SpliceEngine:
    """The native relay: one thread relaying many socket pairs with epoll and splice(2).

    ``add()`` hands over two connected sockets (by descriptor; the engine owns and closes them).
    When a relayed connection ends, a completion is queued and :attr:`eventfd` becomes readable;
    ``drain_all()`` returns the queued completions (:class:`Completion`) with everything else
    queued (:class:`Drained`).

    A connection added with ``http=True`` is observed by the HTTP/1.x framer: its exchanges
    (with ``observe=True``) are queued for ``drain_exchanges()`` / ``drain_all()``, which
    hand them over grouped by connection and label set; a malformed request is answered
    with 400 (431 for an oversized head) and the connection closed; ``header_timeout`` and
    ``idle_timeout`` (seconds, 0 for none) bound a request head's arrival (the first one's
    from the connection's opening) and an idle keep-alive connection.  A connection that
    opens with the HTTP/2 preface is observed as HTTP/2 (_h2_observer.pxi): each stream is an
    exchange, and gRPC calls carry their path and grpc-status.

    ``max_clients``: how many client IPs each service's tally (``service_counts``) names; the
    connections of any other client are tallied under TALLY_OTHER_CLIENT.
    """

    cdef RelayEngine *e
    cdef pthread_t thread
    cdef bint _running
    cdef bint _stopped
    cdef object _group      # the first shard, whose RelayShared this one uses
    cdef list _names        # the engine's gRPC paths (RelayEngine.names) drained so far

    def __cinit__(self):
        self.e = NULL
        self._running = False
        self._stopped = False
        self._names = []

    def __init__(self, size_t pipe_size=1 << 20, int max_idle_pipes=64,
                 size_t small_buffer=16384, int budget=32, double header_timeout=0.0,
                 double idle_timeout=0.0, SpliceEngine shard_of=None,
                 uint32_t max_clients=100, cpus=None):
        cdef RelayEngine *e
        cdef list pinned = sorted(set(cpus)) if cpus is not None else []
        if cpus is not None and (not pinned or pinned[0] < 0
                                 or pinned[len(pinned) - 1] >= RELAY_CPU_WORDS * 64):
            raise ValueError(f"cpus must name CPUs 0..{RELAY_CPU_WORDS * 64 - 1}, got {cpus!r}")
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
        e.max_clients = max_clients
        for cpu in pinned:
            e.cpu_mask[cpu // 64] |= (<uint64_t>1) << (cpu % 64)
        e.pinned = bool(pinned)
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
            bint observe=True, int service=-1, bint pin_host=False, bint forwarded=False):
        """Relay between two connected sockets; the engine now owns (and will close) both.

        ``token`` (> 0) comes back in the completion (and in exchange records).  ``http``:
        follow HTTP/1.x framing (answer malformed requests, enforce the HTTP timeouts, and with
        ``observe`` queue one record per exchange).  ``service`` (>= 0): add the bytes relayed
        to that service's live byte counters (``service_counts``).  ``pin_host`` (HTTP): the
        client was routed by its first request's Host, so a later request naming another host
        is answered 421 (hf_pin_host).  ``forwarded`` (HTTP): every request head goes to the
        instance rewritten for X-Forwarded-For (_relay_forwarded.pxi).  Thread-safe; never
        blocks on the engine.
        """
        cdef RelayConn *c
        if upstream_fd < 0 or client_fd == upstream_fd:
            raise ValueError(
                f"need two distinct open descriptors, got {client_fd} and {upstream_fd}"
            )
        c = self._new_conn(client_fd, upstream_fd, token, http, observe, pin_host, forwarded)
        if service >= 0:
            c.svc = self._service(<uint32_t>service)
        self._submit(c)

    def connect(self, int client_fd, bytes address not None, uint64_t token, double timeout,
                bint http=False, bint observe=True, int service=-1, bint pin_host=False,
                bytes preface=None, bint forwarded=False):
        """Connect to ``address`` (a packed ``struct sockaddr_in`` or ``sockaddr_in6``) and
        relay between it and ``client_fd``, which the engine now owns.

        Nothing is read from the client before the upstream is connected.  Once it is, the
        token is published on the established queue (``drain_all().established``).  If it fails
        or is still pending after ``timeout`` seconds, the completion carries the errno
        (ETIMEDOUT for the timeout) and, as its last field, the client descriptor: open,
        unread and the caller's again.  ``pin_host`` and ``forwarded`` as for add().
        ``preface`` (up to 108
        bytes: a PROXY protocol header): what the instance gets before the client's bytes.
        Thread-safe; never blocks on the engine.
        """
        cdef RelayConn *c
        cdef Py_ssize_t n = len(address)
        cdef Py_ssize_t m = 0 if preface is None else len(preface)
        cdef char *ahead = NULL
        if n < 16 or n > RELAY_ADDR_MAX:
            raise ValueError(f"address must be a packed sockaddr of 16..28 bytes, got {n}")
        if not 0.0 < timeout <= 86400.0:
            raise ValueError(f"timeout must be 0..86400 seconds, got {timeout}")
        if m > RELAY_PREFACE_MAX:
            raise ValueError(f"preface must be at most {RELAY_PREFACE_MAX} bytes, got {m}")
        if m:
            ahead = <char *>malloc(m)
            if ahead == NULL:
                raise MemoryError()
            memcpy(ahead, <const char *>preface, m)
        try:
            c = self._new_conn(client_fd, -1, token, http, observe, pin_host, forwarded)
            if service >= 0:
                c.svc = self._service(<uint32_t>service)
        except BaseException:
            free(ahead)
            raise
        c.preface = ahead
        c.preface_len = <uint8_t>m
        memcpy(c.addr, <const char *>address, n)
        c.addr_len = <uint8_t>n
        c.self_check = 1
        c.connect_deadline_ns = c.started_ns + <int64_t>(timeout * 1e9)
        self._submit(c)

    cdef RelayConn *_new_conn(self, int client_fd, int upstream_fd, uint64_t token, bint http,
                              bint observe, bint pin_host, bint forwarded) except NULL:
        cdef RelayConn *c
        cdef sockaddr_in peer
        cdef socklen_t size
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
        if http:
            if http_attach(c, observe) < 0:
                free(c)
                raise MemoryError()
            if pin_host:
                hf_pin_host(&c.http.f)
            # What its notices name (_relay_notice.pxi); a client that is already gone, or
            # not IPv4, is named 0.0.0.0:0.
            size = sizeof(peer)
            if getpeername(client_fd, <sockaddr *>&peer, &size) == 0 and (
                    peer.sin_family == AF_INET):
                c.client_ip = peer.sin_addr.s_addr
                c.client_port = ntohs(peer.sin_port)
            if forwarded and http_forward_attach(c, client_fd) < 0:
                free(c.http)
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

    cdef int _control(self, int kind, RelaySvc *s, int fd, RelaySnap *snap,
                      RelayRoutes *routes=NULL) except -1:
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
        ctl.routes = routes
        pthread_mutex_lock(&e.lock)
        if e.ctl_tail != NULL:
            e.ctl_tail.next = ctl
        else:
            e.ctl_head = ctl
        e.ctl_tail = ctl
        pthread_mutex_unlock(&e.lock)
        write(e.wake_fd, &one, sizeof(one))
        return 0

    def serve(self, uint32_t service, bint http=False, bint observe=True,
              double connect_timeout=3.0, int proxy_protocol=0, bint forwarded=False):
        """Make ``service`` ready to take the clients a router sends it (``route``) without a
        listening socket of its own: what ``listen`` sets, without the socket."""
        cdef RelaySvc *s
        if not 0 <= proxy_protocol <= 2:
            raise ValueError(f"proxy_protocol must be 0, 1 or 2, got {proxy_protocol}")
        if not 0.0 < connect_timeout <= 86400.0:
            raise ValueError(
                f"connect_timeout must be 0..86400 seconds, got {connect_timeout}"
            )
        s = self._service(service)
        # Read by the engine thread only once a ROUTES command names the service (the lock
        # orders them).
        s.http = http
        s.observe = observe
        s.connect_timeout_ns = <int64_t>(connect_timeout * 1e9)
        s.proxy_protocol = <uint8_t>proxy_protocol
        s.forwarded = http and forwarded

    def route(self, uint32_t service, list names not None, int fallback=-1, bint tls=False):
        """Make ``service`` (listening, see ``listen``) a router: each client goes to the
        service its first request's Host names, by ``names``, a list of ``(host name, service
        id)`` (a name as routes compare it, or ``*.suffix``; an id of -1: handed over), else to
        ``fallback`` (-1: none), each made ready by ``serve``; anything else is handed over
        (accept_by_host).  ``tls``: by the server name of the client's TLS ClientHello
        instead (a tcp port, passthrough).
        Thread-safe; never blocks on the engine."""
        cdef Py_ssize_t n = len(names)
        cdef RelayRoutes *r
        cdef RelayRoute *x
        cdef bytes name
        cdef Py_ssize_t i, size
        cdef RelaySvc *s = self._service(service)
        r = <RelayRoutes *>calloc(1, sizeof(RelayRoutes))
        if r == NULL:
            raise MemoryError()
        r.routes = <RelayRoute *>calloc(max(n, 1), sizeof(RelayRoute))
        if r.routes == NULL:
            free(r)
            raise MemoryError()
        try:
            for i in range(n):
                text, target = names[i]
                x = &r.routes[i]
                name = text.encode("ascii")
                if name.startswith(b"*."):
                    x.wildcard = 1
                    name = name[1:]
                size = len(name)
                if not 0 < size < ROUTE_NAME_MAX:
                    raise ValueError(f"host names are 1..{ROUTE_NAME_MAX - 1} bytes: {text!r}")
                memcpy(x.name, <const char *>name, size)
                x.len = <uint16_t>size
                # -1: a name whose service the engine has not got (handed over, as is).
                x.target = self._service(<uint32_t>target) if target >= 0 else NULL
            r.n = <size_t>n
            r.tls = tls
            if fallback >= 0:
                r.fallback = self._service(<uint32_t>fallback)
            self._control(RELAY_CTL_ROUTES, s, -1, NULL, r)
        except BaseException:
            route_free(r)
            raise

    def listen(self, uint32_t service, int fd, bint http=False, bint observe=True,
               double connect_timeout=3.0, int proxy_protocol=0, bint forwarded=False):
        """Accept ``service``'s clients on the listening socket ``fd`` (the engine owns it
        from now on and closes it on ``unlisten``), pick an instance from the last
        ``set_pool`` snapshot and connect within ``connect_timeout`` seconds.  ``http`` and
        ``observe`` as for ``add``; ``proxy_protocol`` (1 or 2; 0: none): send each instance
        that version's PROXY protocol header before the client's bytes; ``forwarded`` (HTTP):
        rewrite each client's request heads for X-Forwarded-For.  Until a snapshot
        arrives every client is handed over.  Thread-safe; never blocks on the engine."""
        cdef RelaySvc *s
        cdef int nodelay = 0
        cdef socklen_t size = sizeof(nodelay)
        if fd < 0:
            raise ValueError(f"need an open listening descriptor, got {fd}")
        if not 0 <= proxy_protocol <= 2:
            raise ValueError(f"proxy_protocol must be 0, 1 or 2, got {proxy_protocol}")
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
        s.proxy_protocol = <uint8_t>proxy_protocol
        s.forwarded = http and forwarded
        # Clients inherit TCP_NODELAY from the listening socket, but only those accepted by
        # the kernel after it was set: so the option counts only if the caller set it before
        # listen() (shard_sockets does), and then no client costs a setsockopt() of its own.
        s.nodelay = getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, &size) == 0 and nodelay
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
                t.self_check = _may_meet_itself(address)
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
        """What the engine counted for ``service`` (:class:`ServiceCounts`): bytes of every
        connection naming it, the rest for the connections the engine accepted."""
        cdef RelaySvc *s = self._known(service)
        cdef size_t i
        if s == NULL:
            return ServiceCounts(0, 0, 0, AnsweredCounts(0, 0, 0), [])
        tally = []
        pthread_mutex_lock(&self.e.stats_lock)
        for i in range(s.tally_cap):
            if s.tally[i].key:
                tally.append(TallyEntry(s.tally[i].key >> 32, s.tally[i].key & 0xFFFFFFFF,
                                        s.tally[i].count))
        pthread_mutex_unlock(&self.e.stats_lock)
        return ServiceCounts(
            flux_relay_load(&s.bytes[0]), flux_relay_load(&s.bytes[1]),
            flux_relay_load(&s.active),
            AnsweredCounts(flux_relay_load(&s.rejected[0]), flux_relay_load(&s.rejected[1]),
                           flux_relay_load(&s.rejected[2]), flux_relay_load(&s.rejected[3])),
            tally,
        )

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
        """Take every queued completion (a list of :class:`Completion`); whatever else was
        queued is dropped (drain_all() takes everything)."""
        return self.drain_all().completions

    def drain_exchanges(self):
        """Take every queued exchange, grouped by label set (a list of
        :class:`ExchangeGroup`); whatever else was queued is dropped.

        Grouping lets the metrics record a batch per label set (one call, not one per
        exchange): under keep-alive load that was most of the cost of HTTP metrics."""
        return self.drain_all().exchanges

    def drain_all(self):
        """Take every queued exchange, completion, established connection, hand-over and
        notice at once: a :class:`Drained` of lists of :class:`ExchangeGroup`,
        :class:`Completion`, tokens, :class:`HandOver` (see _relay_accept.pxi) and
        :class:`Notice` (see _relay_notice.pxi).

        A connection's exchanges, notices and establishment are always queued before its
        completion, so handling those first never meets a connection that is already gone."""
        cdef RelayEngine *e = self.e
        cdef RelayConn *c
        cdef RelayConn *nxt
        cdef RelayExchange *x
        cdef RelayConn *est
        cdef RelayNotice *nt
        cdef size_t count, i, nt_count
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
        names = self._names
        for i in range(len(names), e.names.len):
            names.append(e.names.names[i][:e.names.lens[i]].decode("utf-8", "replace"))
        nt = e.nt_shared
        nt_count = e.nt_shared_len
        e.nt_shared = NULL
        e.nt_shared_len = 0
        e.nt_shared_cap = 0
        pthread_mutex_unlock(&e.lock)
        notices = notice_records(nt, nt_count)
        groups = {}
        for i in range(count):
            # An int key, not a tuple: ints are not tracked by the garbage collector, and a
            # tuple per exchange made it run every few hundred exchanges.
            key = (x[i].token << 24) | (<uint64_t>x[i].method << 16) | x[i].status
            if x[i].name:
                key |= ((<object>x[i].name << 16) | <uint16_t>x[i].grpc_status) << 88
            if x[i].token == 0:
                key |= ((((<object>x[i].service << 32) | x[i].inst) << 32 | x[i].client_ip)
                        << 136)
            group = groups.get(key)
            if group is None:
                if x[i].name == 0:
                    path = None
                elif x[i].name == H2_NAME_OTHER:
                    path = ""
                else:
                    path = names[x[i].name - 1]
                group = groups[key] = ExchangeGroup(x[i].token, x[i].method, x[i].status, [],
                                                    [], x[i].service, x[i].inst, x[i].client_ip,
                                                    path, x[i].grpc_status)
            group.roundtrips_us.append(x[i].roundtrip_ns // 1000)
            group.totals_us.append(x[i].total_ns // 1000)
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
                handed.append(HandOver(c.svc.id, c.fd[0], c.client_ip, c.inst, c.err))
            else:
                out.append(Completion(c.token, c.dir[0].bytes, c.dir[1].bytes, c.err,
                                      c.duration_ns, c.answered,
                                      c.fd[0] if c.handed_back else -1))
            free(c)
            c = nxt
        return Drained(exchanges, out, established, handed, notices)

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
    def thread_id(self) -> int:
        """The engine thread's id (a Linux TID, for sched_setaffinity), 0 until it runs."""
        return flux_relay_load(&self.e.tid) if self.e != NULL else 0

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
               for i, name in enumerate(RELAY_COUNTERS)}
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
        free(e.fwd_scratch)
        h2_names_free(&e.names)
        free(e.nt_local)
        free(e.nt_shared)
        free(e.buffers)
        free(e.pool)
        free(e)
        self.e = NULL


def route_probe(bytes data not None, list names not None, int fallback=-1, bint tls=False):
    """What a router in the engine does with a client whose first bytes are ``data``
    (accept_by_host, without sockets): the id of the service it would send the client to, from
    ``names`` (``(host name or *.suffix, id)``) and ``fallback`` (-1: none), or -1 when it
    would hand the client over; ``tls``: by the server name of a TLS ClientHello.  For tests
    against the Python oracle."""
    cdef Py_ssize_t n = min(len(data), <Py_ssize_t>ROUTE_PEEK)
    cdef Py_ssize_t count = len(names)
    cdef RelaySvc *svcs = <RelaySvc *>calloc(count + 1, sizeof(RelaySvc))
    cdef RelayRoutes r
    cdef RelaySvc *picked
    cdef const uint8_t *b = <const uint8_t *>(<const char *>data)
    cdef char name[ROUTE_NAME_MAX]
    cdef Py_ssize_t start = 0, end, i
    cdef int size
    cdef bytes text
    if svcs == NULL:
        raise MemoryError()
    r.routes = <RelayRoute *>calloc(max(count, 1), sizeof(RelayRoute))
    if r.routes == NULL:
        free(svcs)
        raise MemoryError()
    try:
        for i in range(count):
            host, target = names[i]
            text = host.encode("ascii")
            if text.startswith(b"*."):
                r.routes[i].wildcard = 1
                text = text[1:]
            memcpy(r.routes[i].name, <const char *>text, len(text))
            r.routes[i].len = <uint16_t>len(text)
            if target >= 0:
                svcs[i].id = <uint32_t>target
                r.routes[i].target = &svcs[i]
        r.n = <size_t>count
        svcs[count].id = <uint32_t>fallback
        r.fallback = &svcs[count] if fallback >= 0 else NULL
        if tls:
            size = route_server_name(b, n, name)
            if size <= 0:
                return -1
            picked = route_pick(&r, name, size)
            return -1 if picked == NULL else <int>picked.id
        while start < n and (b[start] == 13 or b[start] == 10):
            start += 1
        end = route_head_end(b, start, n)
        if end <= 0 or (end - start >= 4 and memcmp(b + start, b"PRI ", 4) == 0):
            return -1
        size = route_host(b, start, end, name)
        if size <= 0:
            return -1
        picked = route_pick(&r, name, size)
        return -1 if picked == NULL else <int>picked.id
    finally:
        free(r.routes)
        free(svcs)
