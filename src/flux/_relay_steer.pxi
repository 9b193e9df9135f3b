# Steering new connections by CPU (included by _splice.pyx).
#
# With SO_REUSEPORT alone the kernel picks a shard's listening socket by hashing each new
# connection's addresses, whatever CPU the connection arrived on, so a shard often works on
# connections whose packets another CPU handled.  Steering gives each shard (engine thread) its
# own CPUs: the thread is pinned to them (set before it starts, relay_pin_self), and a classic
# BPF program on the port's reuseport group (steer_by_cpu) picks, for each new connection, the
# shard that owns the CPU its SYN was processed on.  For a local client that is the client's own
# CPU; for a container, the CPU its veth delivered on; from a NIC, the CPU of its receive queue.
# The connection is then accepted, connected and relayed where its packets already are, and the
# shard's wake-up does not cross CPUs.  A CPU the program does not name (one outside fluxd's
# affinity) falls back to the hash.  The program's answer is an index into the group, which the
# kernel keeps in the order the sockets started listening: shard_sockets makes them in shard
# order, and the tests hold the mapping to that (a client pinned to a CPU reaches its shard).

cdef extern from *:
    """
    #include <sched.h>
    #include <linux/filter.h>
    #include <sys/syscall.h>
    #ifndef SO_ATTACH_REUSEPORT_CBPF
    #define SO_ATTACH_REUSEPORT_CBPF 51
    #endif
    #ifndef SO_DETACH_REUSEPORT_BPF
    #define SO_DETACH_REUSEPORT_BPF 68
    #endif
    static int32_t flux_gettid(void) {
        return (int32_t)syscall(SYS_gettid);
    }
    static int flux_pin_thread(const uint64_t *mask, int words) {
        cpu_set_t set;
        int i;
        CPU_ZERO(&set);
        for (i = 0; i < words * 64 && i < CPU_SETSIZE; i++)
            if ((mask[i / 64] >> (i % 64)) & 1u)
                CPU_SET(i, &set);
        return sched_setaffinity(0, sizeof(set), &set);
    }
    /* ld cpu; then for each CPU: jeq #cpu, ret #its shard; last: an index no group has. */
    static int flux_steer_by_cpu(int fd, const unsigned int *cpus, const unsigned int *shards,
                                 int n) {
        struct sock_filter *code = calloc(2 * n + 2, sizeof(struct sock_filter));
        struct sock_fprog prog;
        int i, rc;
        if (code == NULL)
            return -1;
        code[0] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_CPU);
        for (i = 0; i < n; i++) {
            code[1 + 2 * i] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
                                                           cpus[i], 0, 1);
            code[2 + 2 * i] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, shards[i]);
        }
        code[1 + 2 * n] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, 0xFFFFFFFFu);
        prog.len = (unsigned short)(2 * n + 2);
        prog.filter = code;
        rc = setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog));
        free(code);
        return rc;
    }
    /* Take the program off the group; a kernel without SO_DETACH_REUSEPORT_BPF (before 5.8)
       gets one that names no socket, which leaves every connection to the hash. */
    static int flux_unsteer(int fd) {
        int zero = 0;
        struct sock_filter hash = BPF_STMT(BPF_RET | BPF_K, 0xFFFFFFFFu);
        struct sock_fprog prog = {1, &hash};
        if (setsockopt(fd, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, &zero, sizeof(zero)) == 0)
            return 0;
        if (errno != ENOPROTOOPT)
            return -1;
        return setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog));
    }
    """
    int flux_pin_thread(const uint64_t *mask, int words) nogil
    int flux_steer_by_cpu(int fd, const uint32_t *cpus, const uint32_t *shards, int n) nogil
    int flux_unsteer(int fd) nogil
    int32_t flux_gettid() nogil


cdef void relay_pin_self(RelayEngine *e) noexcept nogil:
    """Pin the engine thread to its CPUs (SpliceEngine's cpus), if it was given any; a refusal
    (a CPU taken away meanwhile) leaves it where the scheduler puts it, counted.  The thread
    says its id first (SpliceEngine.thread_id), so that fluxd can unpin it later."""
    flux_relay_store(&e.tid, flux_gettid())
    if e.pinned and flux_pin_thread(e.cpu_mask, RELAY_CPU_WORDS) < 0:
        relay_count(e, RC_PIN_FAILURES, 1)


def steer_by_cpu(int fd, list shard_of_cpu not None):
    """Attach to the reuseport group of listening socket ``fd`` the program that sends a new
    connection to the shard owning the CPU it arrived on: ``shard_of_cpu`` lists (cpu, shard
    index) pairs, the index being the socket's place in the group (the order the shards'
    sockets started listening).  Raises OSError if the kernel refuses it."""
    cdef Py_ssize_t n = len(shard_of_cpu)
    cdef uint32_t *cpus
    cdef uint32_t *shards
    cdef Py_ssize_t i
    cdef int rc
    if n < 1 or n > 2000:
        raise ValueError(f"steer_by_cpu takes 1..2000 CPUs, got {n}")
    cpus = <uint32_t *>malloc(n * sizeof(uint32_t))
    shards = <uint32_t *>malloc(n * sizeof(uint32_t))
    if cpus == NULL or shards == NULL:
        free(cpus)
        free(shards)
        raise MemoryError()
    try:
        for i in range(n):
            cpu, shard = shard_of_cpu[i]
            cpus[i] = <uint32_t>cpu
            shards[i] = <uint32_t>shard
        rc = flux_steer_by_cpu(fd, cpus, shards, <int>n)
        if rc < 0:
            raise OSError(errno, f"relay engine: SO_ATTACH_REUSEPORT_CBPF failed: "
                                 f"{_os.strerror(errno)}")
    finally:
        free(cpus)
        free(shards)


def unsteer(int fd):
    """Take the steering program off the reuseport group of listening socket ``fd``: from now
    on the kernel's hash picks each new connection's socket.  Raises OSError if it cannot."""
    if flux_unsteer(fd) < 0:
        raise OSError(errno, f"relay engine: SO_DETACH_REUSEPORT_BPF failed: "
                             f"{_os.strerror(errno)}")
