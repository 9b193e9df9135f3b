# The HTTP/2 observer: a pure observer of relayed HTTP/2 bytes, as the HTTP/1.x framer is of
# HTTP/1.x ones (included by _splice.pyx).
#
# Theory of operation
# -------------------
# A connection of an HTTP service whose client opened with the HTTP/2 preface (the framer
# recognises it: _http_framer.pxi) is shown to an H2Observer from the byte after the preface
# on, both directions, with the framer's calling protocol: h2_feed shows bytes and returns how
# many it took (fewer only when its event buffer is nearly full), h2_body_remaining says how
# many bytes may pass unseen (the rest of a DATA payload: those may be spliced), h2_skip
# accounts for them.  It never changes a byte and never asks for a connection to be cut.
#
# - Every frame header (9 octets) is read.  Header blocks (HEADERS or PUSH_PROMISE, then
#   CONTINUATION up to END_HEADERS) go, fragment by fragment and in order, to the direction's
#   HPACK decoder: libnghttp2's inflater (nghttp2_hd_inflate_*), a kept library that Debian
#   packages (libnghttp2-14), the same one nghttpd and curl use.  HPACK is stateful, so every
#   block is decoded, pushed or not, whatever stream it is on.  Padding, the priority fields
#   and the promised stream id are passed over.
# - SETTINGS_HEADER_TABLE_SIZE sent by one side bounds the other side's encoder: the decoder of
#   the other direction is raised to it at once (never lowered: an encoder only shrinks its
#   table by announcing it in a block, which the decoder follows by itself).  Above
#   H2_TABLE_MAX the connection is given up.
# - A client HEADERS block on a stream not followed yet opens an exchange (method, time; the
#   :path too when content-type says gRPC, interned in H2Names so that records carry an id).
#   The instance's first non-1xx block is the response head (status, time); grpc-status from
#   any of its blocks is the call's code.  The instance's END_STREAM (HEADERS or DATA) ends the
#   exchange: an EXCHANGE event whose pos is the end of that frame in the response stream (the
#   relay ends the exchange once that byte is written to the client, as for HTTP/1.x).
#   RST_STREAM from either side cuts the stream's exchange once the frame is read (a CUT event
#   naming that side).
# - What cannot be followed ends observation of the connection (GAVE_UP, with the reason):
#   an HPACK error, a block not continued by CONTINUATION on its stream, padding longer than
#   its frame, a table size over H2_TABLE_MAX, memory.  The exchanges under way are forgotten;
#   every later byte passes unseen.
#
# Memory per connection is bounded: the H2Observer (about 700 bytes), at most H2_STREAMS_MAX
# streams of 40 bytes, and per direction an inflater whose dynamic table holds at most
# H2_TABLE_MAX bytes of fields plus one field being decoded (libnghttp2 refuses a field over
# 64 KiB): under 300 KiB at worst; 5.5 KiB measured after ten typical requests (4 KiB tables).

from libc.string cimport memmove


# ---- gRPC path names ------------------------------------------------------------------------

cdef inline uint32_t h2_hash(const char *p, size_t n) noexcept nogil:
    # FNV-1a
    cdef uint32_t h = 2166136261u
    cdef size_t i
    for i in range(n):
        h = (h ^ <uint8_t>p[i]) * 16777619u
    return h


cdef uint32_t h2_intern(H2Names *names, const char *p, size_t n,
                        pthread_mutex_t *lock) noexcept nogil:
    """The id of path p[0:n] (1..H2_NAMES_MAX), made on first sight; H2_NAME_OTHER when the
    table is full or memory is short.  `lock` (may be NULL) is held while the names grow."""
    cdef uint32_t slot, id
    cdef char *copy
    cdef char **grown
    cdef uint16_t *grown_lens
    cdef uint32_t cap
    if names.slots == NULL:
        names.slots = <uint32_t *>calloc(H2_NAME_SLOTS, sizeof(uint32_t))
        if names.slots == NULL:
            return H2_NAME_OTHER
    slot = h2_hash(p, n) & (H2_NAME_SLOTS - 1)
    while names.slots[slot]:
        id = names.slots[slot]
        if names.lens[id - 1] == n and memcmp(names.names[id - 1], p, n) == 0:
            return id
        slot = (slot + 1) & (H2_NAME_SLOTS - 1)
    if names.len >= H2_NAMES_MAX:
        return H2_NAME_OTHER
    copy = <char *>malloc(n + 1)
    if copy == NULL:
        return H2_NAME_OTHER
    memcpy(copy, p, n)
    if lock != NULL:
        pthread_mutex_lock(lock)
    if names.len == names.cap:
        cap = 64 if names.cap == 0 else 2 * names.cap
        grown = <char **>realloc(names.names, cap * sizeof(char *))
        if grown != NULL:
            names.names = grown
            grown_lens = <uint16_t *>realloc(names.lens, cap * sizeof(uint16_t))
            if grown_lens != NULL:
                names.lens = grown_lens
                names.cap = cap
        if names.len == names.cap:
            if lock != NULL:
                pthread_mutex_unlock(lock)
            free(copy)
            return H2_NAME_OTHER
    names.names[names.len] = copy
    names.lens[names.len] = <uint16_t>n
    names.len += 1
    id = names.len
    if lock != NULL:
        pthread_mutex_unlock(lock)
    names.slots[slot] = id
    return id


cdef void h2_names_free(H2Names *names) noexcept nogil:
    cdef uint32_t i
    for i in range(names.len):
        free(names.names[i])
    free(names.names)
    free(names.lens)
    free(names.slots)
    names.lens = NULL
    names.names = NULL
    names.slots = NULL
    names.len = names.cap = 0


# ---- set-up -----------------------------------------------------------------------------------

cdef H2Observer *h2_new(H2Names *names) noexcept nogil:
    """A new observer (NULL when memory is short); gRPC paths are interned in `names`."""
    cdef H2Observer *o = <H2Observer *>calloc(1, sizeof(H2Observer))
    cdef int d
    if o == NULL:
        return NULL
    o.names = names
    for d in range(2):
        o.side[d].table_max = H2_TABLE_DEFAULT
        if nghttp2_hd_inflate_new(&o.side[d].inflater) != 0:
            o.side[d].inflater = NULL
            h2_free(o)
            return NULL
    return o


cdef void h2_release(H2Observer *o) noexcept nogil:
    """Free what observing holds (decoders, streams); the record stays."""
    cdef int d
    for d in range(2):
        if o.side[d].inflater != NULL:
            nghttp2_hd_inflate_del(o.side[d].inflater)
            o.side[d].inflater = NULL
    free(o.streams)
    o.streams = NULL
    o.nstreams = o.cap = 0


cdef void h2_free(H2Observer *o) noexcept nogil:
    if o != NULL:
        h2_release(o)
        free(o)


# ---- events and streams -----------------------------------------------------------------------

cdef inline H2Event *h2_event(H2Events *out, uint8_t kind) noexcept nogil:
    cdef H2Event *ev = &out.ev[out.count]
    out.count += 1
    memset(ev, 0, sizeof(H2Event))
    ev.kind = kind
    return ev


cdef void h2_give_up(H2Observer *o, uint8_t reason, H2Events *out) noexcept nogil:
    """End observation: the streams under way are forgotten, every later byte passes."""
    if o.dead:
        return
    o.dead = 1
    h2_release(o)
    h2_event(out, H2_EV_GAVE_UP).reason = reason


cdef H2Stream *h2_stream(H2Observer *o, uint32_t id) noexcept nogil:
    cdef uint32_t i
    for i in range(o.nstreams):
        if o.streams[i].id == id:
            return &o.streams[i]
    return NULL


cdef void h2_drop_stream(H2Observer *o, H2Stream *st) noexcept nogil:
    """Forget a stream; the others keep their order (the order they opened in, which is the
    order the streams cut at the connection's end are reported in)."""
    cdef size_t after = <size_t>(o.nstreams - 1 - (st - o.streams))
    memmove(st, st + 1, after * sizeof(H2Stream))
    o.nstreams -= 1


cdef void h2_stream_event(H2Stream *st, uint8_t kind, uint16_t status, uint64_t pos,
                          H2Events *out) noexcept nogil:
    cdef H2Event *ev = h2_event(out, kind)
    ev.t_request_head = st.t_request_head
    ev.t_response_head = st.t_response_head
    ev.pos = pos
    ev.stream = st.id
    ev.name = st.name
    ev.grpc_status = st.grpc_status
    ev.status = status
    ev.method = st.method


cdef void h2_stream_ends(H2Observer *o, H2Stream *st, uint64_t pos,
                         H2Events *out) noexcept nogil:
    """The instance ended the stream at response-stream offset `pos`: its exchange ends.  A
    stream ended without a response head was cut by the instance (it answered nothing)."""
    if st.status:
        h2_stream_event(st, H2_EV_EXCHANGE, st.status, pos, out)
    else:
        h2_stream_event(st, H2_EV_CUT, HTTP_CUT_INSTANCE, pos, out)
    h2_drop_stream(o, st)


# ---- header blocks ----------------------------------------------------------------------------

cdef inline bint h2_named(const nghttp2_nv *nv, const char *lit, size_t m) noexcept nogil:
    return nv.namelen == m and memcmp(nv.name, lit, m) == 0


cdef int32_t h2_decimal(const uint8_t *p, size_t n, size_t digits) noexcept nogil:
    """p[0:n] as a decimal of 1..`digits` digits; -1 if it is not one."""
    cdef int32_t v = 0
    cdef size_t i
    if n == 0 or n > digits:
        return -1
    for i in range(n):
        if not 0x30 <= p[i] <= 0x39:
            return -1
        v = v * 10 + (p[i] - 0x30)
    return v


cdef int h2_field(H2Observer *o, H2Side *s, const nghttp2_nv *nv) noexcept nogil:
    """One decoded field of the block in progress: keep what the exchange needs.  -1: the
    field is over H2_FIELD_MAX octets (name and value), which the observer does not follow."""
    cdef int32_t v
    cdef H2Fields *log = o.collect
    cdef char *grown
    cdef uint32_t n32
    if log != NULL:
        if log.len + nv.namelen + nv.valuelen + 8 > log.cap:
            grown = <char *>realloc(log.buf, 2 * (log.cap + nv.namelen + nv.valuelen + 8))
            if grown != NULL:
                log.buf = grown
                log.cap = 2 * (log.cap + nv.namelen + nv.valuelen + 8)
        if log.len + nv.namelen + nv.valuelen + 8 <= log.cap:
            n32 = <uint32_t>nv.namelen
            memcpy(log.buf + log.len, &n32, 4)
            memcpy(log.buf + log.len + 4, nv.name, nv.namelen)
            log.len += 4 + nv.namelen
            n32 = <uint32_t>nv.valuelen
            memcpy(log.buf + log.len, &n32, 4)
            memcpy(log.buf + log.len + 4, nv.value, nv.valuelen)
            log.len += 4 + nv.valuelen
            log.count += 1
    if nv.namelen + nv.valuelen > H2_FIELD_MAX:
        return -1
    if s.blk_kind != H2B_HEADERS or nv.namelen == 0:
        return 0
    # The first of each field counts (a repeated one is malformed: the instance decides),
    # but grpc-status's last (an invalid last one: none).
    if h2_named(nv, b":method", 7):
        if not s.seen & H2_SEEN_METHOD:
            s.seen |= H2_SEEN_METHOD
            if nv.valuelen <= 16:
                s.method = hf_method_id(<const char *>nv.value, <uint8_t>nv.valuelen)
    elif h2_named(nv, b":path", 5):
        if not s.seen & H2_SEEN_PATH:
            s.seen |= H2_SEEN_PATH
            if nv.valuelen <= H2_PATH_MAX:
                memcpy(s.path, nv.value, nv.valuelen)
                s.path_len = <uint16_t>nv.valuelen
            else:
                s.path_len = H2_PATH_MAX + 1
    elif h2_named(nv, b":status", 7):
        if not s.seen & H2_SEEN_STATUS:
            s.seen |= H2_SEEN_STATUS
            v = h2_decimal(nv.value, nv.valuelen, 3)
            if v >= 100 and nv.valuelen == 3:
                s.status = <uint16_t>v
    elif h2_named(nv, b"content-type", 12):
        if not s.seen & H2_SEEN_CONTENT_TYPE:
            s.seen |= H2_SEEN_CONTENT_TYPE
            s.grpc = nv.valuelen >= 16 and memcmp(nv.value, b"application/grpc", 16) == 0
    elif h2_named(nv, b"grpc-status", 11):
        s.grpc_status = h2_decimal(nv.value, nv.valuelen, 4)
    return 0


cdef int h2_inflate(H2Observer *o, H2Side *s, const uint8_t *p, size_t n,
                    bint final) noexcept nogil:
    """Decode n octets of the block in progress (`final`: its last ones); -1 on an HPACK
    error.  libnghttp2 keeps a field cut between fragments itself."""
    cdef nghttp2_nv nv
    cdef int flags
    cdef ssize_t rv
    while True:
        flags = NGHTTP2_HD_INFLATE_NONE
        rv = nghttp2_hd_inflate_hd2(s.inflater, &nv, &flags, p, n, final)
        if rv < 0:
            return -1
        p += rv
        n -= <size_t>rv
        if flags & NGHTTP2_HD_INFLATE_EMIT and h2_field(o, s, &nv) < 0:
            return -1
        if flags & NGHTTP2_HD_INFLATE_FINAL:
            nghttp2_hd_inflate_end_headers(s.inflater)
            return 0
        if not (flags & NGHTTP2_HD_INFLATE_EMIT) and n == 0:
            return 0


cdef void h2_table_raise(H2Observer *o, H2Side *s, uint32_t size, H2Events *out) noexcept nogil:
    """The peer of s's encoder allowed it a table of `size` octets."""
    if size > H2_TABLE_MAX:
        h2_give_up(o, H2_ERR_TABLE_SIZE, out)
        return
    if size > s.table_want:
        s.table_want = size
    if s.blk_kind == H2B_NONE and s.table_want > s.table_max:
        if nghttp2_hd_inflate_change_table_size(s.inflater, s.table_want) != 0:
            h2_give_up(o, H2_ERR_HPACK, out)
            return
        s.table_max = s.table_want


cdef void h2_block_begin(H2Observer *o, H2Side *s, uint8_t kind, H2Events *out) noexcept nogil:
    s.blk_kind = kind
    s.blk_stream = s.stream
    s.blk_end_stream = (s.flags & H2F_END_STREAM) != 0 and kind == H2B_HEADERS
    s.method = HF_M_OTHER
    s.status = 0
    s.grpc = 0
    s.grpc_status = -1
    s.path_len = 0
    s.seen = 0


cdef void h2_block_done(H2Observer *o, int side, H2Side *s, uint64_t now,
                        H2Events *out) noexcept nogil:
    """The block in progress is decoded: act on it."""
    cdef H2Stream *st
    cdef H2Stream *grown
    cdef uint32_t cap
    cdef uint8_t kind = s.blk_kind
    cdef uint32_t id = s.blk_stream
    s.blk_kind = H2B_NONE
    s.blk_stream = 0
    if s.table_want > s.table_max:
        h2_table_raise(o, s, s.table_want, out)
    if kind != H2B_HEADERS or id == 0:
        return
    st = h2_stream(o, id)
    if side == 0:
        if st != NULL or not (id & 1) or id <= o.client_high:
            # Request trailers, not a client-initiated stream, or one the client cannot open
            # any more (stream ids only grow): nothing new.
            return
        o.client_high = id
        if o.nstreams == H2_STREAMS_MAX:
            h2_event(out, H2_EV_UNTRACKED).stream = id
            return
        if o.nstreams == o.cap:
            cap = 8 if o.cap == 0 else 2 * o.cap
            grown = <H2Stream *>realloc(o.streams, cap * sizeof(H2Stream))
            if grown == NULL:
                h2_give_up(o, H2_ERR_MEMORY, out)
                return
            o.streams = grown
            o.cap = cap
        st = &o.streams[o.nstreams]
        o.nstreams += 1
        memset(st, 0, sizeof(H2Stream))
        st.id = id
        st.method = s.method
        st.t_request_head = now
        st.grpc_status = -1
        if s.grpc:
            if s.path_len <= H2_PATH_MAX:
                st.name = h2_intern(o.names, s.path, s.path_len, o.names_lock)
            else:
                st.name = H2_NAME_OTHER
        return
    if st == NULL:
        return
    if s.status >= 200 and st.status == 0:
        st.status = s.status
        st.t_response_head = now
    if s.grpc_status >= 0:
        st.grpc_status = <int16_t>s.grpc_status
    if s.blk_end_stream:
        h2_stream_ends(o, st, s.frame_end, out)


# ---- frames -----------------------------------------------------------------------------------

cdef void h2_frame_done(H2Observer *o, int side, H2Side *s, H2Events *out) noexcept nogil:
    """The current frame's last payload octet was taken."""
    cdef H2Stream *st
    s.state = H2S_HEAD
    if s.type == H2_DATA and side == 1 and s.flags & H2F_END_STREAM:
        st = h2_stream(o, s.stream)
        if st != NULL:
            h2_stream_ends(o, st, s.frame_end, out)
    elif s.type == H2_RST_STREAM:
        st = h2_stream(o, s.stream)
        if st != NULL:
            h2_stream_event(st, H2_EV_CUT, <uint16_t>(HTTP_CUT_CLIENT + side), s.frame_end, out)
            h2_drop_stream(o, st)


cdef void h2_fragment_begin(H2Observer *o, int side, H2Side *s, uint64_t now,
                            H2Events *out) noexcept nogil:
    """The prefix (if any) is read: the fragment follows, then the padding."""
    if s.pad > s.remaining:
        h2_give_up(o, H2_ERR_PADDING, out)
        return
    s.frag_left = s.remaining - s.pad
    s.state = H2S_BLOCK
    if s.frag_left == 0:
        h2_fragment_done(o, side, s, now, out)


cdef void h2_fragment_done(H2Observer *o, int side, H2Side *s, uint64_t now,
                           H2Events *out) noexcept nogil:
    if s.flags & H2F_END_HEADERS:
        if h2_inflate(o, s, NULL, 0, 1) < 0:
            h2_give_up(o, H2_ERR_HPACK, out)
            return
        h2_block_done(o, side, s, now, out)
        if o.dead:
            return
    if s.remaining:
        s.state = H2S_SKIP
    else:
        h2_frame_done(o, side, s, out)


cdef void h2_frame_begin(H2Observer *o, int side, H2Side *s, uint64_t now,
                         H2Events *out) noexcept nogil:
    """A frame header was read (s.hdr): set the state its payload is read in."""
    cdef uint32_t length = (<uint32_t>s.hdr[0] << 16) | (<uint32_t>s.hdr[1] << 8) | s.hdr[2]
    s.type = s.hdr[3]
    s.flags = s.hdr[4]
    s.stream = ((<uint32_t>s.hdr[5] & 0x7F) << 24) | (<uint32_t>s.hdr[6] << 16) | (
        <uint32_t>s.hdr[7] << 8) | s.hdr[8]
    s.remaining = length
    s.frame_end = s.pos + length
    s.pad = 0
    s.need_pad = 0
    s.prefix_left = 0
    if s.blk_kind != H2B_NONE and (s.type != H2_CONTINUATION or s.stream != s.blk_stream):
        h2_give_up(o, H2_ERR_SEQUENCE, out)
        return
    if s.type == H2_HEADERS or s.type == H2_PUSH_PROMISE:
        h2_block_begin(o, s, H2B_HEADERS if s.type == H2_HEADERS else H2B_PUSH, out)
        if s.flags & H2F_PADDED:
            s.need_pad = 1
            s.prefix_left = 1
        if s.type == H2_PUSH_PROMISE:
            s.prefix_left += 4
        elif s.flags & H2F_PRIORITY:
            s.prefix_left += 5
        if s.prefix_left > s.remaining:
            h2_give_up(o, H2_ERR_PADDING, out)
        elif s.prefix_left:
            s.state = H2S_PREFIX
        else:
            h2_fragment_begin(o, side, s, now, out)
        return
    if s.type == H2_CONTINUATION:
        if s.blk_kind == H2B_NONE:
            h2_give_up(o, H2_ERR_SEQUENCE, out)
        else:
            h2_fragment_begin(o, side, s, now, out)
        return
    if s.type == H2_SETTINGS and not (s.flags & H2F_ACK) and length:
        s.state = H2S_SETTINGS
        s.setting_len = 0
        return
    if length:
        s.state = H2S_SKIP
    else:
        h2_frame_done(o, side, s, out)


cdef void h2_setting_octet(H2Observer *o, int side, H2Side *s, uint8_t c,
                           H2Events *out) noexcept nogil:
    cdef uint32_t value
    s.setting[s.setting_len] = c
    s.setting_len += 1
    if s.setting_len == 6:
        s.setting_len = 0
        if s.setting[0] == 0 and s.setting[1] == H2_SETTINGS_HEADER_TABLE_SIZE:
            value = ((<uint32_t>s.setting[2] << 24) | (<uint32_t>s.setting[3] << 16)
                     | (<uint32_t>s.setting[4] << 8) | s.setting[5])
            # This side's decoder limit bounds the other side's encoder.
            h2_table_raise(o, &o.side[1 - side], value, out)


# ---- the calling protocol ---------------------------------------------------------------------

cdef size_t h2_feed(H2Observer *o, int side, const char *data, size_t n, uint64_t now,
                    H2Events *out) noexcept nogil:
    """Show n bytes of `side` (0: the client's, 1: the instance's); returns how many were
    taken: all of them, unless the event buffer filled up (drain it and call again)."""
    cdef H2Side *s = &o.side[side]
    cdef size_t i = 0
    cdef size_t take
    cdef uint8_t c
    while i < n:
        if o.dead:
            s.pos += n - i
            return n
        if out.count > H2_EVENTS_MAX - H2_EVENTS_RESERVE:
            return i
        if s.state == H2S_HEAD:
            take = min(<size_t>(H2_HEAD_LEN - s.hdr_len), n - i)
            memcpy(&s.hdr[s.hdr_len], data + i, take)
            s.hdr_len += <uint8_t>take
            s.pos += take
            i += take
            if s.hdr_len == H2_HEAD_LEN:
                s.hdr_len = 0
                h2_frame_begin(o, side, s, now, out)
        elif s.state == H2S_BLOCK:
            take = min(<size_t>s.frag_left, n - i)
            if h2_inflate(o, s, <const uint8_t *>data + i, take, 0) < 0:
                h2_give_up(o, H2_ERR_HPACK, out)
                continue
            s.pos += take
            s.remaining -= <uint32_t>take
            s.frag_left -= <uint32_t>take
            i += take
            if s.frag_left == 0:
                h2_fragment_done(o, side, s, now, out)
        elif s.state == H2S_SKIP:
            take = min(<size_t>s.remaining, n - i)
            s.pos += take
            s.remaining -= <uint32_t>take
            i += take
            if s.remaining == 0:
                h2_frame_done(o, side, s, out)
        else:
            c = <uint8_t>data[i]
            s.pos += 1
            s.remaining -= 1
            i += 1
            if s.state == H2S_SETTINGS:
                h2_setting_octet(o, side, s, c, out)
                if s.remaining == 0 and s.state == H2S_SETTINGS:
                    h2_frame_done(o, side, s, out)
            else:   # H2S_PREFIX
                if s.need_pad:
                    s.need_pad = 0
                    s.pad = c
                s.prefix_left -= 1
                if s.prefix_left == 0:
                    h2_fragment_begin(o, side, s, now, out)
    return i


cdef uint64_t h2_body_remaining(const H2Observer *o, int side) noexcept nogil:
    """Bytes of `side` that may pass without being shown: the rest of a DATA payload, or
    everything once observation ended."""
    cdef const H2Side *s = &o.side[side]
    if o.dead:
        return UINT64_MAX
    if s.state == H2S_SKIP and s.type == H2_DATA:
        return s.remaining
    return 0


cdef void h2_skip(H2Observer *o, int side, uint64_t n, uint64_t now,
                  H2Events *out) noexcept nogil:
    """n bytes of `side` passed unseen (n <= h2_body_remaining)."""
    cdef H2Side *s = &o.side[side]
    s.pos += n
    if o.dead or n == 0:
        return
    if s.state != H2S_SKIP or n > s.remaining:
        h2_give_up(o, H2_ERR_SEQUENCE, out)
        return
    s.remaining -= <uint32_t>n
    if s.remaining == 0:
        h2_frame_done(o, side, s, out)


# ---- Python surface: a probe for tests and fuzzing --------------------------------------------

_H2_EVENT_KINDS = (None, "exchange", "cut", "gave-up", "untracked")
_H2_REASONS = ("", "hpack", "sequence", "padding", "table-size", "memory", "response-first")

H2ObserverEvent = _namedtuple(
    "H2ObserverEvent",
    "kind stream method status grpc_path grpc_status t_request_head t_response_head pos reason",
)
H2ObserverEvent.__doc__ = """One event of the HTTP/2 observer (see H2ObserverProbe): grpc_path
is the gRPC call's :path (None: not gRPC; "" past the name table's capacity), grpc_status -1:
none."""
H2ObserverEvent.__module__ = __name__


cdef class H2ObserverProbe:
    """The relay engine's HTTP/2 observer, driven from Python (tests, fuzzing).

    Shows bytes of the client's stream ("request", from the byte after the preface) or the
    instance's ("response") and returns the observer's events as H2Event tuples.
    ``collect=True`` also logs every decoded field (``fields()``), to check the HPACK
    decoding against an oracle.
    """

    cdef H2Observer *o
    cdef H2Names names
    cdef H2Events ev
    cdef H2Fields log

    def __cinit__(self, bint collect=False):
        memset(&self.names, 0, sizeof(H2Names))
        memset(&self.log, 0, sizeof(H2Fields))
        self.ev.count = 0
        self.o = h2_new(&self.names)
        if self.o == NULL:
            raise MemoryError()
        if collect:
            self.o.collect = &self.log

    def __dealloc__(self):
        h2_free(self.o)
        h2_names_free(&self.names)
        free(self.log.buf)

    cdef list _events(self):
        cdef list result = []
        cdef int i
        cdef H2Event *e
        for i in range(self.ev.count):
            e = &self.ev.ev[i]
            if e.name == 0:
                path = None
            elif e.name == H2_NAME_OTHER:
                path = ""
            else:
                path = self.names.names[e.name - 1][:self.names.lens[e.name - 1]].decode(
                    "utf-8", "replace")
            result.append(H2ObserverEvent(
                _H2_EVENT_KINDS[e.kind], e.stream, HTTP_METHODS[e.method], e.status, path,
                e.grpc_status, e.t_request_head, e.t_response_head, e.pos,
                _H2_REASONS[e.reason],
            ))
        self.ev.count = 0
        return result

    def feed(self, str side, const unsigned char[::1] data, uint64_t now=0):
        """Show `data` (all of it); returns the events, in order."""
        cdef int sd = _hf_side(side)
        cdef size_t off = 0
        cdef size_t n = data.shape[0]
        cdef list result = []
        while off < n:
            self.ev.count = 0
            off += h2_feed(self.o, sd, <const char *>&data[off], n - off, now, &self.ev)
            result.extend(self._events())
        return result

    def skip(self, str side, uint64_t n, uint64_t now=0):
        """Account for n bytes passed unseen (spliced); returns the events."""
        self.ev.count = 0
        h2_skip(self.o, _hf_side(side), n, now, &self.ev)
        return self._events()

    def body_remaining(self, str side):
        """Bytes that may pass unseen (2**64 - 1: everything)."""
        return h2_body_remaining(self.o, _hf_side(side))

    def position(self, str side):
        return self.o.side[_hf_side(side)].pos

    def fields(self):
        """Every field decoded since the last call, in order: (name, value) byte pairs."""
        cdef size_t off = 0
        cdef uint32_t n
        out = []
        while off < self.log.len:
            memcpy(&n, self.log.buf + off, 4)
            name = self.log.buf[off + 4:off + 4 + n]
            off += 4 + n
            memcpy(&n, self.log.buf + off, 4)
            value = self.log.buf[off + 4:off + 4 + n]
            off += 4 + n
            out.append((name, value))
        self.log.len = 0
        self.log.count = 0
        return out

    @property
    def open_streams(self):
        """The ids of the streams followed now, ascending."""
        return sorted(self.o.streams[i].id for i in range(self.o.nstreams))

    @property
    def observing(self):
        """False once observation was given up."""
        return not self.o.dead

    def table_limit(self, str side):
        """The HPACK decoder's table limit for `side`'s blocks now."""
        return self.o.side[_hf_side(side)].table_max
