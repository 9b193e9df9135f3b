# X-Forwarded-For in the relay engine: request heads rewritten on their way to the instance
# (included by _splice.pyx).
#
# Theory of operation
# -------------------
# A connection of an http service with `forwarded` (fluxctl --forwarded; listen()'s, add()'s
# and connect()'s `forwarded`) carries a RelayForward (http_forward_attach): the client's
# address as text, made once when the connection is taken (inet_ntop of the accepted or
# handed-over socket's peer), and the spans of the request heads the framer reported complete
# (hf_report_heads: a HEAD event per accepted head; no other connection's framer emits any).
# What a head becomes is flux.relay.forwarded's to say (its docstring: X-Forwarded-For
# appended to, X-Forwarded-Proto and X-Forwarded-Host replaced); forwarded_head below is the
# same rewrite in C, checked against it byte for byte (tests/test_forwarded.py).
#
# The framer sees the client's bytes as they were read; only what goes out differs.  A request
# head is held until it is complete (_relay_http.pxi), so every head the framer reports lies
# whole in the bytes http_observe just returned as forwardable (the client's direction's
# buffer, from dir[0].off: what goes now, then p.held bytes of a head not complete yet, then
# h.unshown bytes not shown yet).  http_forward_heads rewrites those heads there before they
# are counted in flight: the forwardable bytes are built again in the engine's scratch buffer
# (the bytes between heads copied, each head rewritten), then copied back in front of the held
# and unshown bytes, which move to make room (to a larger buffer of the connection's own when
# the direction's is too small, as a long held head does).  The data path then sends the
# rewritten bytes as any others: a head that arrived in one read still goes out in one send(),
# with whatever followed it in that read -- no syscall is added.  Bodies pass untouched (they
# are never in a head's span; a spliced body is never in the buffer at all).  Services without
# `forwarded` pay one test of a NULL pointer per read of the client (relay_hold_buf).
#
# Limits: the framer's HF_MAX_HEAD (431 past it) applies to the head the client sent; the
# rewritten one may be longer (by the Host value copied and FWD_GROWTH_MAX) and goes anyway,
# for the instance's own limit to judge.  An HTTP/2 connection (the preface) is never framed
# as HTTP/1.x, so nothing of it is rewritten.  A rewrite that finds no memory fails the
# connection (ENOMEM) rather than let a head through unrewritten.

cdef extern from "<string.h>" nogil:
    size_t strlen(const char *s)


cdef const char *FWD_UNKNOWN = b"unknown"


cdef int http_forward_attach(RelayConn *c, int fd) noexcept nogil:
    """Make ``c`` (an HTTP connection, c.http set; c.client_ip set when its client is IPv4)
    rewrite its request heads for X-Forwarded-For, naming the client of socket ``fd``.
    Returns 0, or -1 when no memory can be had (nothing changed)."""
    cdef RelayForward *f = <RelayForward *>calloc(1, sizeof(RelayForward))
    cdef sockaddr_in6 peer
    cdef socklen_t size = sizeof(peer)
    cdef const char *named = NULL
    if f == NULL:
        return -1
    if c.client_ip != 0:
        named = inet_ntop(AF_INET, &c.client_ip, f.ip, FWD_IP_MAX)
    elif getpeername(fd, <sockaddr *>&peer, &size) == 0 and peer.sin6_family == AF_INET6:
        named = inet_ntop(AF_INET6, &peer.sin6_addr, f.ip, FWD_IP_MAX)
    if named == NULL:
        # Gone already (its request will not be read either), or not an IP socket: RFC 7239's
        # word for an address not known.
        memcpy(f.ip, FWD_UNKNOWN, strlen(FWD_UNKNOWN) + 1)
    f.ip_len = <uint8_t>strlen(f.ip)
    hf_report_heads(&c.http.f)
    c.http.fwd = f
    return 0


# ---- one head -----------------------------------------------------------------------------------

cdef inline size_t fwd_find(const char *h, size_t i, size_t n, char ch) noexcept nogil:
    """The index of the first ``ch`` in h[i:n] (n if none)."""
    while i < n and h[i] != ch:
        i += 1
    return i


cdef inline bint fwd_name_is(const char *h, size_t start, size_t colon, size_t lf,
                             const char *lower, size_t m) noexcept nogil:
    """Whether the line h[start:lf] is a field (``colon`` < lf) named ``lower`` (m octets,
    lower case), in any case."""
    cdef size_t k
    if colon >= lf or colon - start != m:
        return False
    for k in range(m):
        if hf_lower(<uint8_t>h[start + k]) != <uint8_t>lower[k]:
            return False
    return True


cdef inline size_t fwd_content_end(const char *h, size_t start, size_t lf) noexcept nogil:
    """Where the line h[start:lf + 1] ends without its CRLF or LF."""
    if lf > start and h[lf - 1] == b'\r':
        return lf - 1
    return lf


cdef inline bint fwd_ows(char ch) noexcept nogil:
    return ch == b' ' or ch == b'\t'


cdef inline size_t fwd_put(char *out, size_t at, const char *data, size_t n) noexcept nogil:
    memcpy(out + at, data, n)
    return at + n


cdef size_t fwd_rewrite_head(const char *h, size_t n, const char *ip, size_t ip_len,
                             char *out) noexcept nogil:
    """Write the head h[0:n] (complete and accepted by the framer: a request line, field
    lines, the empty line; CRLF or LF line ends) into ``out`` as a --forwarded service's
    instance gets it (flux.relay.forwarded.forwarded_head, the same bytes); ``out`` has room
    for 2 * n + FWD_GROWTH_MAX.  Returns how many bytes were written."""
    cdef size_t first = fwd_find(h, 0, n, b'\n') + 1
    cdef size_t last_xff = n      # the last X-Forwarded-For line's start (n: none)
    cdef size_t host_s = 0, host_e = 0
    cdef size_t j = first, lf, colon, ce, ve, vs, end_line
    cdef size_t at = 0
    # Pass 1: the last X-Forwarded-For line and the Host value.
    while True:
        lf = fwd_find(h, j, n, b'\n')
        if fwd_content_end(h, j, lf) == j:
            break           # the empty line that ends the head
        colon = fwd_find(h, j, lf, b':')
        if fwd_name_is(h, j, colon, lf, b"host", 4):
            host_s = colon + 1
            host_e = fwd_content_end(h, j, lf)
            while host_s < host_e and fwd_ows(h[host_s]):
                host_s += 1
            while host_e > host_s and fwd_ows(h[host_e - 1]):
                host_e -= 1
        elif fwd_name_is(h, j, colon, lf, b"x-forwarded-for", 15):
            last_xff = j
        j = lf + 1
    end_line = j
    # Pass 2: the request line, the fields but the replaced ones, the last X-Forwarded-For
    # extended, the new lines, the empty line.
    at = fwd_put(out, at, h, first)
    j = first
    while j < end_line:
        lf = fwd_find(h, j, n, b'\n')
        colon = fwd_find(h, j, lf, b':')
        if (fwd_name_is(h, j, colon, lf, b"x-forwarded-proto", 17)
                or fwd_name_is(h, j, colon, lf, b"x-forwarded-host", 16)):
            pass
        elif j == last_xff:
            ce = fwd_content_end(h, j, lf)
            ve = ce
            while ve > colon + 1 and fwd_ows(h[ve - 1]):
                ve -= 1
            vs = colon + 1
            while vs < ve and fwd_ows(h[vs]):
                vs += 1
            if vs < ve:
                at = fwd_put(out, at, h + j, ve - j)
                at = fwd_put(out, at, b", ", 2)
            else:
                at = fwd_put(out, at, h + j, colon + 1 - j)
                at = fwd_put(out, at, b" ", 1)
            at = fwd_put(out, at, ip, ip_len)
            at = fwd_put(out, at, h + ce, lf + 1 - ce)
        else:
            at = fwd_put(out, at, h + j, lf + 1 - j)
        j = lf + 1
    if last_xff == n:
        at = fwd_put(out, at, b"X-Forwarded-For: ", 17)
        at = fwd_put(out, at, ip, ip_len)
        at = fwd_put(out, at, b"\r\n", 2)
    at = fwd_put(out, at, b"X-Forwarded-Proto: http\r\n", 25)
    if host_e > host_s:
        at = fwd_put(out, at, b"X-Forwarded-Host: ", 18)
        at = fwd_put(out, at, h + host_s, host_e - host_s)
        at = fwd_put(out, at, b"\r\n", 2)
    return fwd_put(out, at, h + end_line, n - end_line)


# ---- the heads of one read ----------------------------------------------------------------------

cdef int http_forward_heads(RelayEngine *e, RelayConn *c, size_t *n) noexcept nogil:
    """The *n bytes at dir[0].buf + dir[0].off that http_observe returned as forwardable
    (followed by p.held held and h.unshown unshown bytes) hold c.http.fwd.nheads complete
    heads: rewrite them there (the direction's buffer may move to a larger one of its own,
    p.off then 0; the held and unshown bytes follow the rewritten ones as before) and set *n
    to the rewritten count.  Returns 0, or ENOMEM (nothing changed: the caller fails the
    connection, as no head may go unrewritten)."""
    cdef RelayDir *p = &c.dir[0]
    cdef RelayForward *f = c.http.fwd
    cdef size_t tail = <size_t>p.held + c.http.unshown
    cdef size_t bound = n[0]
    cdef size_t out = 0, at = 0, s, t, i
    cdef char *region = p.buf + p.off
    cdef char *grown = NULL
    cdef uint32_t held
    for i in range(f.nheads):
        bound += <size_t>(f.head_end[i] - f.head_start[i]) + FWD_GROWTH_MAX
    if bound > e.fwd_scratch_cap:
        grown = <char *>realloc(e.fwd_scratch, bound)
        if grown == NULL:
            return ENOMEM
        e.fwd_scratch = grown
        e.fwd_scratch_cap = bound
        grown = NULL
    for i in range(f.nheads):
        s = <size_t>(f.head_start[i] - f.base)
        t = <size_t>(f.head_end[i] - f.base)
        out = fwd_put(e.fwd_scratch, out, region + at, s - at)
        out += fwd_rewrite_head(region + s, t - s, f.ip, f.ip_len, e.fwd_scratch + out)
        at = t
    out = fwd_put(e.fwd_scratch, out, region + at, n[0] - at)
    if out + tail > p.size:
        # Too large for the buffer: a larger one, of this direction's own (freed, not pooled,
        # when given back), as a long held head gets.
        grown = <char *>malloc(out + tail)
        if grown == NULL:
            return ENOMEM
    f.nheads = 0
    if grown != NULL:
        memcpy(grown + out, region + n[0], tail)
        held = p.held
        relay_return_buf(e, p)
        p.buf = grown
        p.size = <uint32_t>(out + tail)
        p.held = held
        p.off = 0
        relay_count(e, RC_BUFFERS_LENT, 1)
    elif p.off + out + tail > p.size:
        memmove(p.buf + out, region + n[0], tail)
        p.off = 0
    else:
        memmove(p.buf + p.off + out, region + n[0], tail)
    memcpy(p.buf + p.off, e.fwd_scratch, out)
    n[0] = out
    return 0


def forwarded_head(const unsigned char[::1] head not None, str client_ip not None):
    """The engine's rewrite of one complete request head for X-Forwarded-For (the twin of
    flux.relay.forwarded.forwarded_head, for the tests)."""
    cdef bytes ip = client_ip.encode("ascii")
    cdef size_t n = head.shape[0]
    cdef char *out
    cdef size_t written
    if len(ip) >= FWD_IP_MAX:
        raise ValueError(f"client_ip must be shorter than {FWD_IP_MAX} characters")
    if n == 0 or head[n - 1] != b'\n':
        raise ValueError("head must be a complete request head, ending with its empty line")
    out = <char *>malloc(2 * n + FWD_GROWTH_MAX)
    if out == NULL:
        raise MemoryError()
    try:
        written = fwd_rewrite_head(<const char *>&head[0], n, ip, len(ip), out)
        return out[:written]
    finally:
        free(out)
