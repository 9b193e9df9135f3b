# cython: language_level=3
"""The relay engine's declarations (flux._splice): every type, and every function one room of
the engine calls in another.

Cython cimports this file into _splice.pyx before any of the bodies it includes, so no body
depends on the order of the includes (STYLE.md 15): a room may call a function of a later room
because the function is declared here.  The few ``cdef inline`` helpers below are the
primitives every room uses; functions private to a room are declared where they are defined.

Who writes what.  Each struct says which thread writes each field:
  engine   the engine's native thread, after the record was handed to it;
  caller   the thread calling SpliceEngine's methods (the asyncio side), before handing over;
  lock     under RelayEngine.lock (submission, completion, command and exchange queues);
  stats    under RelayEngine.stats_lock (the services' growing tallies);
  atomic   relaxed atomics (flux_relay_*): written by one side, read by the other.
Fields not marked are the engine thread's.  The framer's structs are pure data of one
connection: whoever holds the connection (the engine thread, or a test's probe) writes them.
"""

from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from flux._sys cimport pthread_mutex_t, clock_gettime, CLOCK_MONOTONIC, timespec


# ==== primitives ==============================================================================

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
    static inline int64_t flux_relay_add_fetch(int64_t *p, int64_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_RELAXED);
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
    int64_t flux_relay_add_fetch(int64_t *p, int64_t v) nogil
    void flux_relay_store(int64_t *p, int64_t v) nogil
    int FLUX_RELAY_DEBUG


cdef inline int64_t relay_now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void relay_count(RelayEngine *e, int which, int64_t v) noexcept nogil:
    flux_relay_bump(&e.counters[which], v)


# ==== the HTTP/1.x framer's types (_http_framer.pxi) ==========================================

cdef enum:
    HF_REQUEST = 0
    HF_RESPONSE = 1
    HF_RING = 32                # pipelined requests awaiting their response
    HF_MAX_HEAD = 65536         # bytes in a head, a trailer section or a chunk-size line
    HF_EVENTS_MAX = 16
    HF_EVENTS_RESERVE = 4       # one byte emits at most 3 events
    HF_WORD = 20                # field names and list elements kept for matching
    HF_H2_PREFACE_LEN = 24      # the HTTP/2 connection preface (HF_H2_PREFACE)

    # character classes (hf_class)
    HC_TCHAR = 1                # token: methods, field names, transfer codings
    HC_VCHAR = 2                # visible ASCII: request targets
    HC_FIELD = 4                # field-vchar: any octet but NUL, SP, HT, CR, LF, VT, FF
    HC_DIGIT = 8
    HC_HEX = 16
    HC_WS = 32                  # SP, HT

    # events
    HF_EV_REQUEST = 1
    HF_EV_EXCHANGE = 2
    HF_EV_MALFORMED = 3
    HF_EV_REJECT = 4
    HF_EV_OPAQUE = 5
    HF_EV_HEAD = 6              # a request head complete and accepted (hf_report_heads only)

    # event flags
    HFE_CLOSE = 1
    HFE_SWITCHED = 2
    HFE_SPECULATIVE = 4

    # methods (label values; anything else is HF_M_OTHER)
    HF_M_OTHER = 0
    HF_M_GET
    HF_M_HEAD
    HF_M_POST
    HF_M_PUT
    HF_M_DELETE
    HF_M_CONNECT
    HF_M_OPTIONS
    HF_M_TRACE
    HF_M_PATCH

    # reasons (MALFORMED, OPAQUE)
    HF_ERR_NONE = 0
    HF_ERR_START_LINE           # request line or status line
    HF_ERR_FIELD                # field line syntax
    HF_ERR_OBS_FOLD
    HF_ERR_HEAD_TOO_LARGE
    HF_ERR_HOST                 # missing (HTTP/1.1) or repeated Host
    HF_ERR_CONTENT_LENGTH
    HF_ERR_TRANSFER_ENCODING
    HF_ERR_TE_WITH_CL
    HF_ERR_TE_HTTP10
    HF_ERR_CHUNK                # chunk-size line or the CRLF after chunk data
    HF_ERR_CHUNK_EXT_CR
    HF_ERR_UNSOLICITED          # a response with no request pending
    HF_ERR_UNEXPECTED_101
    HF_ERR_SKIP                 # hf_skip beyond hf_body_remaining
    HF_ERR_CONTENT_LENGTH_LIST  # a request's Content-Length repeated or a list (values agree)
    HF_ERR_H2_PREFACE           # the connection opened with the HTTP/2 preface (OPAQUE)
    HF_ERR_MISDIRECTED          # a later request's Host differs from the first's (pinned)

    # request phases (timeouts)
    HF_PHASE_IDLE = 0           # between requests, nothing pending: idle timeout
    HF_PHASE_HEAD = 1           # inside a request head: header-read timeout from t_head_start
    HF_PHASE_BUSY = 2           # a body is arriving or a response is awaited
    HF_PHASE_OPAQUE = 3         # not observed (switched, opaque, malformed, closed)
    HF_PHASE_OPENING = 4        # no byte yet: header-read timeout from t_head_start (the
    #                             connection's opening), then close without an answer

    # `lenient` bits: where the framer accepted what h11 rejects
    HFL_EMPTY_LINE = 1          # empty line(s) before a start line
    HFL_TE_LIST = 2             # Transfer-Encoding other than exactly one "chunked" field
    HFL_TRAILER_FRAMING = 4     # Content-Length / Transfer-Encoding inside trailers
    HFL_TE_FRAMING = 8          # response: Transfer-Encoding not ending in chunked, or 1.0
    HFL_UNUSED_FRAMING = 16     # response: invalid framing fields where no body can follow

# Byte-level states.  Each reader's group is contiguous (hf_step dispatches on ranges: before
# a start line; start line from METHOD; field lines from FIELD_START; chunk lines from
# CHUNK_SIZE), and the skippable ones come last (hf_feed takes them in bulk).  PREFACE, where
# a request stream starts, has a reader of its own (hf_read_preface, called by hf_feed).
cdef enum:
    HS_LINE_START = 0
    HS_LINE_START_CR
    HS_PREFACE
    HS_METHOD
    HS_TARGET
    HS_VERSION
    HS_STATUS_VERSION
    HS_STATUS
    HS_STATUS_END
    HS_REASON
    HS_START_END
    HS_START_CR
    HS_FIELD_START
    HS_FIELD_END_CR
    HS_FIELD_NAME
    HS_FIELD_OWS
    HS_FIELD_VALUE
    HS_FIELD_CR
    HS_FOLD
    HS_CHUNK_SIZE
    HS_CHUNK_EXT
    HS_CHUNK_WS
    HS_CHUNK_SIZE_LF
    HS_CHUNK_DATA_CR
    HS_CHUNK_DATA_LF
    HS_BODY_LENGTH              # skippable from here on
    HS_CHUNK_DATA
    HS_UNTIL_CLOSE
    HS_OPAQUE
    HS_DEAD
    HS_CLOSED

# Fields the framer reads (0: no field yet in this section).
cdef enum:
    HF_F_NONE = 0
    HF_F_OTHER
    HF_F_CONTENT_LENGTH
    HF_F_TRANSFER_ENCODING
    HF_F_CONNECTION
    HF_F_HOST
    HF_F_UPGRADE

# Facts gathered from one head (HfSide.facts).
cdef enum:
    HFF_CL = 1 << 0             # a valid Content-Length
    HFF_CL_BAD = 1 << 1         # an invalid or conflicting one
    HFF_TE = 1 << 2
    HFF_TE_BAD = 1 << 3
    HFF_TE_CHUNKED_LAST = 1 << 4
    HFF_TE_CHUNKED_SEEN = 1 << 5
    HFF_TE_CHUNKED_TWICE = 1 << 6
    HFF_CLOSE = 1 << 7
    HFF_KEEP_ALIVE = 1 << 8
    HFF_UPGRADE = 1 << 9
    HFF_HOST = 1 << 10
    HFF_HOST_TWICE = 1 << 11
    HFF_CL_LIST = 1 << 12       # more than one Content-Length value (repeated, or a list)

# The Host key's scanner flags (HfSide.host_flags; see hf_host_octet).
cdef enum:
    HFH_DOT = 1                 # the last octet taken was "."
    HFH_PORT = 2                # past the ":" before a port: the rest is not the name
    HFH_BRACKET = 4             # inside an IPv6 literal's "[...]"
    HFH_STARTED = 8

# HttpFramer.pin_host: whether later requests must name the first request's host.
cdef enum:
    HF_PIN_OFF = 0
    HF_PIN_FIRST = 1            # the next request head sets the connection's host
    HF_PIN_SET = 2              # pinned_host holds it: a head with another gets 421

# List-element scanner flags (HfSide.el_flags).
cdef enum:
    HFE_L_WS = 1                # whitespace after the element's first octets
    HFE_L_BAD = 2               # inner whitespace, or a non-token octet in a coding
    HFE_L_PARAMS = 4            # after ";" in a transfer coding
    HFE_L_NONDIGIT = 8
    HFE_L_COMMA = 16            # the field value held a comma

# Exchange flags (HfExchange.flags).
cdef enum:
    HFX_CLOSE = 1               # the request asked to close after the response
    HFX_UPGRADE = 2             # the request proposed an Upgrade
    HFX_CONNECT = 4

cdef enum:
    HF_MODE_OBSERVING = 0
    HF_MODE_OPAQUE = 1          # switched protocols or gave up
    HF_MODE_DONE = 2            # REJECT sent


cdef struct HfSide:
    uint64_t pos                # stream offset: bytes shown or skipped
    uint64_t msg_start          # request side: offset where the current message began
    uint64_t head_pos           # offset of the current head's first octet (its start line's)
    uint64_t remaining          # body bytes left (Content-Length body, current chunk)
    uint64_t length             # the Content-Length of the current head
    uint64_t t_head_start       # `now` when the current head's first byte was shown (the
    #                             first request's: the connection's opening, t_open)
    uint32_t head_bytes
    uint32_t facts
    uint16_t status
    uint8_t state
    uint8_t idx                 # position in a literal, digits of a status or chunk size
    uint8_t field
    uint8_t prev_field
    uint8_t trailer             # the field section being read is a trailer section
    uint8_t version             # 10 * major + minor
    uint8_t method
    uint8_t word_len            # bytes of a name / element seen (saturates at 255)
    uint8_t el_flags
    uint8_t cl_len
    uint8_t lenient
    uint8_t host_flags          # HFH_*: where the Host value's scan is
    uint64_t host_key           # FNV-1a of the Host value as routes compare it (hf_host_octet)
    uint64_t host_key_dot       # ... before its last ".", for a trailing dot
    char word[HF_WORD]
    char cl[HF_WORD]


cdef struct HfExchange:
    uint64_t t_request_head
    uint8_t method
    uint8_t flags


cdef struct HttpFramer:
    HfSide side[2]
    HfExchange ring[HF_RING]
    uint64_t n_requests         # request heads queued
    uint64_t n_decided          # exchanges whose final response head was seen
    uint64_t n_answered         # exchanges whose response ended
    uint64_t spec_until         # request side speculative while n_decided < spec_until
    uint64_t t_response_head    # of the exchange being answered
    uint64_t deferred_pos
    uint64_t t_open             # `now` given to hf_init: the first request's head is timed
    #                             from it
    uint16_t status             # final status of the exchange being answered
    uint16_t reject_status
    uint8_t reject_reason       # the HF_ERR_* that made it (what a notice names)
    uint8_t response_close
    uint8_t mode
    uint8_t reject              # REJECT owed once the ring is empty
    uint8_t deferred_reason     # an error found while speculating
    uint8_t pin_host            # HF_PIN_*: a connection routed by its first request's Host
    uint64_t pinned_host        # that host's key (0: the first request had no Host)
    uint8_t report_heads        # emit HEAD events (hf_report_heads)


cdef struct HfEvent:
    uint64_t t_request_head
    uint64_t t_response_head
    uint64_t t_response_end
    uint64_t pos
    uint64_t start              # HEAD: the request-stream offset of the head's first octet
    uint16_t status
    uint8_t kind
    uint8_t method
    uint8_t flags
    uint8_t reason


cdef struct HfEvents:
    int count
    HfEvent ev[HF_EVENTS_MAX]


# ==== the HTTP/2 observer's types (_h2_observer.pxi) ==========================================

cdef extern from "<nghttp2/nghttp2.h>" nogil:
    # libnghttp2's HPACK decoder (Debian: libnghttp2-14, headers in libnghttp2-dev): the kept
    # library the observer decodes header blocks with; see _h2_observer.pxi.
    ctypedef struct nghttp2_hd_inflater:
        pass
    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags
    enum:
        NGHTTP2_HD_INFLATE_NONE
        NGHTTP2_HD_INFLATE_FINAL
        NGHTTP2_HD_INFLATE_EMIT
    int nghttp2_hd_inflate_new(nghttp2_hd_inflater **inflater_ptr)
    void nghttp2_hd_inflate_del(nghttp2_hd_inflater *inflater)
    int nghttp2_hd_inflate_change_table_size(nghttp2_hd_inflater *inflater,
                                             size_t settings_max_dynamic_table_size)
    ssize_t nghttp2_hd_inflate_hd2(nghttp2_hd_inflater *inflater, nghttp2_nv *nv_out,
                                   int *inflate_flags, const uint8_t *input, size_t inlen,
                                   int in_final)
    int nghttp2_hd_inflate_end_headers(nghttp2_hd_inflater *inflater)

cdef enum:
    H2_HEAD_LEN = 9             # a frame header
    H2_STREAMS_MAX = 256        # streams followed at once per connection
    H2_TABLE_DEFAULT = 4096     # SETTINGS_HEADER_TABLE_SIZE's initial value
    H2_TABLE_MAX = 65536        # the largest dynamic table followed (above: give up)
    H2_FIELD_MAX = 65536        # the largest field (name and value) followed (above: give up)
    H2_PATH_MAX = 256           # a gRPC :path kept (longer ones fold into "other")
    H2_NAMES_MAX = 4096         # distinct gRPC paths per engine (H2Names)
    H2_NAME_SLOTS = 8192        # H2Names' hash slots (a power of two, > 2 * H2_NAMES_MAX)
    H2_NAME_OTHER = 0xFFFFFFFF  # the name of a path too long, or past H2_NAMES_MAX
    H2_EVENTS_MAX = 16
    H2_EVENTS_RESERVE = 3       # one step emits at most 2 events

    # frame types and flags (RFC 9113 section 6)
    H2_DATA = 0
    H2_HEADERS = 1
    H2_RST_STREAM = 3
    H2_SETTINGS = 4
    H2_PUSH_PROMISE = 5
    H2_CONTINUATION = 9
    H2F_END_STREAM = 0x1
    H2F_ACK = 0x1
    H2F_END_HEADERS = 0x4
    H2F_PADDED = 0x8
    H2F_PRIORITY = 0x20
    H2_SETTINGS_HEADER_TABLE_SIZE = 1

    # H2Side.state
    H2S_HEAD = 0                # reading a frame header
    H2S_PREFIX                  # pad length, priority, promised stream id
    H2S_BLOCK                   # a header block fragment, to the HPACK decoder
    H2S_SETTINGS                # SETTINGS parameters
    H2S_SKIP                    # payload not read: DATA (may be spliced), padding, the rest

    # H2Side.seen
    H2_SEEN_METHOD = 1
    H2_SEEN_PATH = 2
    H2_SEEN_STATUS = 4
    H2_SEEN_CONTENT_TYPE = 8

    # H2Side.blk_kind: what the header block in progress is
    H2B_NONE = 0                # no block in progress
    H2B_HEADERS
    H2B_PUSH                    # a PUSH_PROMISE's: decoded for the HPACK state only

    # events
    H2_EV_EXCHANGE = 1          # a stream's response ended (pos: where, in the response stream)
    H2_EV_CUT = 2               # a stream under way was reset (status: HTTP_CUT_* of who)
    H2_EV_GAVE_UP = 3           # observation ended (reason)
    H2_EV_UNTRACKED = 4         # a stream past H2_STREAMS_MAX was not followed

    # reasons (GAVE_UP)
    H2_ERR_NONE = 0
    H2_ERR_HPACK                # the HPACK decoder failed, or a field over H2_FIELD_MAX
    H2_ERR_SEQUENCE             # a header block not continued by CONTINUATION on its stream
    H2_ERR_PADDING              # padding longer than the frame
    H2_ERR_TABLE_SIZE           # SETTINGS_HEADER_TABLE_SIZE over H2_TABLE_MAX
    H2_ERR_MEMORY
    H2_ERR_RESPONSE_FIRST       # the instance spoke before the client's preface


cdef struct H2Names:
    # gRPC paths by id (1..H2_NAMES_MAX): names[id - 1].  In an engine, the
    # engine thread appends under RelayEngine.lock and the caller reads under it (drain_all).
    char **names
    uint16_t *lens              # names[i] is lens[i] octets (a path may hold NUL)
    uint32_t len
    uint32_t cap
    uint32_t *slots             # H2_NAME_SLOTS ids by hash (0: empty); engine thread only


cdef struct H2Fields:
    # Where a probe collects every decoded field: (u32 name length, name, u32 value length,
    # value) after one another.  The engine passes none.
    char *buf
    size_t len
    size_t cap
    uint32_t count


cdef struct H2Stream:
    uint64_t t_request_head
    uint64_t t_response_head
    uint32_t id
    uint32_t name               # the gRPC path's H2Names id (0: not gRPC)
    int16_t grpc_status         # -1: none yet
    uint16_t status             # the response head's (0: none yet)
    uint8_t method


cdef struct H2Side:
    uint64_t pos                # stream offset: bytes shown or skipped
    uint64_t frame_end          # stream offset where the current frame ends
    uint32_t remaining          # payload bytes of the current frame not taken yet
    uint32_t frag_left          # header block fragment bytes of it not taken yet
    uint32_t stream             # the current frame's stream
    uint32_t blk_stream         # the stream of the header block in progress
    uint32_t table_max          # the HPACK decoder's table limit now
    uint32_t table_want         # a raise to apply when no block is in progress
    int32_t grpc_status         # of the block in progress (-1: none)
    uint16_t status             # :status of the block in progress (0: none)
    uint16_t path_len           # > H2_PATH_MAX: too long
    uint8_t hdr[H2_HEAD_LEN]
    uint8_t hdr_len
    uint8_t type
    uint8_t flags
    uint8_t state
    uint8_t prefix_left
    uint8_t need_pad            # the next prefix octet is the pad length
    uint8_t pad
    uint8_t blk_kind
    uint8_t blk_end_stream      # the block's HEADERS frame carried END_STREAM
    uint8_t method
    uint8_t grpc                # content-type application/grpc...
    uint8_t seen                # H2_SEEN_*: the fields of the block in progress seen once
    uint8_t setting_len
    uint8_t setting[6]
    char path[H2_PATH_MAX]
    nghttp2_hd_inflater *inflater


cdef struct H2Observer:
    # One HTTP/2 connection's observer: pure data, as the HTTP/1.x framer (whoever holds the
    # connection writes it).  The bytes it keeps are bounded: see _h2_observer.pxi.
    H2Side side[2]              # 0: the client's frames, 1: the instance's
    H2Stream *streams           # the streams followed (dense; order is not kept)
    uint32_t nstreams
    uint32_t cap
    uint32_t client_high        # the highest stream id the client opened
    H2Names *names              # where gRPC paths are interned
    pthread_mutex_t *names_lock  # held while `names` grows (NULL: nobody else reads it)
    H2Fields *collect           # a probe's field log (NULL in the engine)
    uint8_t dead                # gave up: every byte passes unseen


cdef struct H2Event:
    uint64_t t_request_head
    uint64_t t_response_head
    uint64_t pos
    uint32_t stream
    uint32_t name
    int16_t grpc_status
    uint16_t status
    uint8_t kind
    uint8_t method
    uint8_t reason


cdef struct H2Events:
    int count
    H2Event ev[H2_EVENTS_MAX]


# ==== the relay engine's types ================================================================

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
    RC_HTTP_H2              # connections observed as HTTP/2 (they opened with the preface)
    RC_HTTP_H2_GAVE_UP      # ... of them, connections whose HTTP/2 observation was given up
    RC_HTTP_H2_UNTRACKED    # HTTP/2 streams not followed (H2_STREAMS_MAX already were)
    RC_EXCHANGES_DROPPED    # exchange records lost because nobody drained them
    RC_BUFFERS_LENT         # copy buffers held by a direction with bytes in flight
    RC_BUFFERS_IDLE         # copy buffers pooled for reuse
    RC_CONNECTS             # upstream connections the engine started itself (connect())
    RC_CONNECT_FAILURES     # ... that failed or timed out (the client went back to the caller)
    RC_ACCEPTED             # clients the engine accepted on a service's listening socket
    RC_TO_PYTHON            # ... handed to the asyncio side to pick for (see _relay_accept.pxi)
    RC_ACCEPT_FAILURES      # accept4() errors other than EAGAIN (each pauses the service)
    RC_HTTP_SWITCHED        # HTTP connections switched to plain relaying (Upgrade, CONNECT)
    RC_NOTICES_DROPPED      # notice records lost because the queue was full (_relay_notice.pxi)
    RC_ROUTED               # clients a router sent to a service by their Host (accept_by_host)
    RC_PIN_FAILURES         # the thread could not be pinned to its CPUs (_relay_steer.pxi)
    RC_COUNT

cdef enum:
    RELAY_CPU_WORDS = 16    # cpu_mask's 64-bit words: CPUs 0..1023, as glibc's cpu_set_t

cdef enum:
    RELAY_CMD_CUT = 1       # reset every connection, keep running
    RELAY_CMD_STOP = 2      # reset every connection and end the thread
    RELAY_MAX_EVENTS = 256
    RELAY_WAKE_TAG = 0      # epoll tag of the wake eventfd; connections are tagged ptr|side
    RELAY_LISTEN_TAG = 2    # ... and a service's listening socket ptr|2
    RELAY_ADDR_MAX = 28     # sizeof(struct sockaddr_in6), the largest address connect() takes
    # The longest bytes sent ahead of a client's (RelayConn.preface): a PROXY protocol header,
    # at most 107 bytes (version 1 over IPv6, with its CRLF).
    RELAY_PREFACE_MAX = 108
    # Connect timeouts are found by a sweep of the live list this often while any is pending.
    RELAY_CONNECT_SWEEP_NS = 20000000
    # What a move on the data path returns (_relay_moves.pxi); errno values are positive.
    RELAY_WAIT = 0          # waiting for readiness
    RELAY_BUDGET = -1       # the syscall budget ran out with work left
    RELAY_AGAIN = -2        # progress (or EINTR): the direction's pump goes round again


cdef struct RelayDir:
    # One direction of a connection: dir[d] reads fd[d] and writes fd[1 - d].  Engine thread.
    char *buf               # copy-mode buffer, lent from the pool while bytes are in it
    uint32_t size           # buf's size: the pool's small_buffer, or more for a long held head
    uint32_t off
    uint32_t length         # bytes in buf not yet sent
    uint32_t held           # HTTP, client side: the bytes after those (at buf + off + length)
    #                         of a request head not complete yet, shown to the framer and kept
    #                         until it is judged (see _relay_http.pxi)
    int pipe_r              # lent pipe, -1 when none
    int pipe_w
    size_t in_pipe          # bytes in the lent pipe not yet sent
    size_t burst            # bytes spliced in since the source last became readable
    uint64_t bytes          # bytes delivered to the destination (drain_all reads it at the end)
    uint8_t bulk            # splice mode
    uint8_t eof             # source reported EOF
    uint8_t done            # EOF propagated with shutdown(SHUT_WR)


cdef struct RelayShared:
    # Shared by the shards of one engine: the connections they hold against the process's
    # descriptor budget, and the budget.  See _relay_accept.pxi.
    int64_t held            # atomic: accepted by a shard and not yet closed or handed back
    int64_t python_held     # atomic, caller: held by the asyncio side
    int64_t limit           # atomic, caller
    int refs                # caller: shards using it (the last one frees it)


cdef struct RelayTarget:
    # caller: written once into a snapshot before it is handed over, read-only afterwards.
    uint32_t id             # the asyncio side's instance id (> 0)
    uint8_t self_check      # a connect here could meet itself (see relay_self_connected)
    uint8_t addr_len
    char addr[RELAY_ADDR_MAX]


cdef struct RelaySnap:
    # The ready instances of a service as the asyncio side last pushed them (set_pool): built
    # by the caller, then the engine thread's (RelaySvc.snap) until the next one replaces it.
    int n
    uint8_t p2c
    int64_t python_at_ns    # from then on hand every client to the asyncio side (0: never)
    RelayTarget *targets


cdef struct RelayTally:
    uint64_t key            # instance id << 32 | client IPv4 (network order); 0: empty slot
    int64_t count


cdef enum:
    ROUTE_NAME_MAX = 254        # a host name's bytes (253) and a NUL
    ROUTE_PEEK = 4096           # the most of a first head a router peeks at (a larger one is
    #                             handed over, as is anything unusual: accept_by_host)


cdef struct RelaySvc         # declared below; a route points to its target


cdef struct RelayRoute:
    # One host name of a port shared by host name (RelayRoutes): the name as routes compare it
    # (lower case, no port, no trailing dot; a wildcard "*.suffix" is kept as ".suffix"), and
    # the service its clients go to.
    RelaySvc *target
    uint16_t len
    uint8_t wildcard
    char name[ROUTE_NAME_MAX]


cdef struct RelayRoutes:
    # The host names of a router service (route()): built by the caller, then the engine
    # thread's (RelaySvc.routes) until the next one replaces it.
    size_t n
    RelaySvc *fallback      # the default service (no host name), or NULL: hand the client over
    uint8_t tls             # by the server name of a TLS ClientHello (tcp), not an HTTP Host
    RelayRoute *routes


cdef struct RelaySvc:
    # A service the engine counts for, and accepts for once listen() gave it a socket.  Never
    # freed while the engine lives (its counters must stay).
    uint32_t id             # caller, at creation
    int fd                  # engine (set by the LISTEN command): the listening socket, or -1
    uint8_t http            # caller, before the LISTEN command (the lock orders them)
    uint8_t observe         # caller, likewise
    uint8_t paused          # engine: accepts are paused (descriptor shortage, or pause())
    uint8_t queued          # engine: on the accept-ready list
    int64_t connect_timeout_ns  # caller, before the LISTEN command
    uint8_t proxy_protocol  # caller, likewise: 0, or the PROXY protocol version (1, 2) whose
    #                         header each instance gets first (accept_proxy_preface)
    uint8_t forwarded       # caller, likewise: HTTP request heads rewritten for X-Forwarded-For
    uint8_t nodelay         # caller, likewise: the listening socket had TCP_NODELAY when handed
    #                         over, so its clients have it (accept_route; relay_register)
    RelaySnap *snap         # engine (set by the SNAP command)
    # engine (set by the ROUTES command): a router's host names; non-NULL makes this service a
    # router, whose clients go to the service their first request's Host names (accept_by_host)
    RelayRoutes *routes
    RelaySvc *accept_next   # engine: accept-ready list
    # Written by the engine thread, read by the asyncio side (service_counts, instance_active).
    int64_t bytes[2]        # atomic: delivered to the instance (0) and to the client (1), live
    int64_t active          # atomic: connections the engine picked for that are up now
    int64_t rejected[4]     # atomic: requests the engine answered itself, by
    #                         http_answer_index (HTTP_ANSWERS of them): 400, 431, 408, 421
    int64_t *inst_active    # stats: by instance id (p2c), engine-picked connections up now
    uint32_t inst_cap       # stats
    RelayTally *tally       # stats: connections counted per (instance, client IP)
    size_t tally_cap        # stats
    size_t tally_len        # stats
    # stats: the client IPs the tally names (at most RelayEngine.max_clients; the others are
    # tallied as ACCEPT_OTHER_CLIENT), an open-addressing set, 0: empty slot.
    uint32_t *clients
    size_t clients_cap      # stats
    size_t clients_len      # stats


cdef struct RelayCtl:
    # A command from the caller for one service (RELAY_CTL_*), queued under lock; the engine
    # thread runs and frees it (accept_run_commands).
    int kind
    RelaySvc *svc
    int fd
    RelaySnap *snap
    RelayRoutes *routes
    RelayCtl *next


cdef struct RelayConn:
    # One relayed connection.  The caller fills fd, token, started_ns, addr (connect()), svc
    # and http before handing it over (or the engine thread does, for clients it accepted);
    # from then on the engine thread alone writes it, until it is published as a completion:
    # then drain_all reads and frees it.
    int fd[2]               # 0: client, 1: upstream (-1 until the engine connects it)
    uint8_t readable[2]     # the socket may be readable: set by an edge, cleared by EAGAIN
    uint8_t writable[2]
    uint8_t rdhup[2]        # the peer's FIN was reported: a short read is not a drained socket
    uint8_t registered[2]   # in the engine's epoll set
    uint8_t closed
    uint8_t queued          # on the ready list
    uint8_t connecting      # the engine is connecting fd[1]: nothing moves until it is up
    uint8_t client_nodelay  # fd[0] has TCP_NODELAY already (from its listening socket)
    uint8_t self_check      # once connected, ask whether fd[1] met itself (see
    #                         relay_self_connected): only where the kernel could pick that port
    uint8_t handed_back     # fd[0] goes back to the caller, still open (a failed connect,
    #                         or a client the engine accepted and hands over)
    uint8_t addr_len
    char addr[RELAY_ADDR_MAX]   # where connect() goes
    int64_t connect_deadline_ns
    RelayDir dir[2]         # dir[d] reads fd[d] and writes fd[1 - d]
    uint64_t token          # the caller's (> 0); 0 for a connection the engine accepted
    int64_t started_ns
    int64_t duration_ns
    int err
    RelayHttp *http         # NULL unless the connection belongs to an HTTP service
    uint16_t answered       # status the engine answered itself (HTTP), 0 when none
    RelayConn *prev         # live list
    RelayConn *next
    RelayConn *link         # submission, finished or completion queue (under lock while queued)
    RelayConn *ready_next
    RelayConn *est_next     # established queue (connect()); independent of the other links
    RelaySvc *svc           # the service whose bytes this connection counts (NULL: none)
    uint32_t inst           # the instance the engine picked (engine-accepted connections)
    uint32_t client_ip      # the client's IPv4 address, network order (engine-accepted, or
    #                         an HTTP connection handed over: what notices name)
    uint16_t client_port    # ... and its port, host order
    uint8_t counted         # counted as up in svc (engine-accepted; undone at retire)
    char *preface           # caller (connect()): bytes the instance gets before the client's
    #                         (a PROXY protocol header), malloc'd; the engine thread moves them
    #                         into dir[0]'s buffer when it takes the connection, and frees them
    uint8_t preface_len


cdef struct RelayEngine:
    # One shard: one thread, one epoll set.  The caller sets the configuration and the
    # descriptors (__init__, start()) before the thread starts, and frees everything after it
    # ended (_close_fds, __dealloc__).
    int epfd                # caller, in start()
    int wake_fd             # caller, in start(): the caller writes it, the engine reads it
    int done_fd             # caller, in start(): the engine writes it, the caller reads it
    pthread_mutex_t lock
    RelayConn *submit_head  # lock
    RelayConn *submit_tail  # lock
    RelayConn *done_head    # lock: completions and hand-overs for drain_all
    RelayConn *done_tail    # lock
    int commands            # lock: RELAY_CMD_* bits
    RelayConn *live         # engine: every registered connection
    RelayConn *ready        # engine: connections whose budget ran out, served next turn
    RelayConn *finished_head    # engine: retired this batch, published at its end
    RelayConn *finished_tail
    int *pool               # engine: idle pipes as (read, write) pairs
    int pool_len
    int pool_cap            # caller, at creation
    char **buffers          # engine: idle copy buffers
    int buffers_len
    int buffers_cap         # caller, at creation
    size_t pipe_size        # caller, at creation (as are small_buffer and budget)
    size_t small_buffer
    int budget              # syscalls per direction per turn
    # HTTP (see _relay_http.pxi).
    RelayExchange *ex_local     # engine: exchanges finished this batch
    size_t ex_local_len
    size_t ex_local_cap
    RelayExchange *ex_shared    # lock: published, not yet drained
    size_t ex_shared_len
    size_t ex_shared_cap
    int64_t header_timeout_ns   # caller, at creation; 0: none
    int64_t idle_timeout_ns     # caller, at creation; 0: none
    int64_t opening_timeout_ns  # caller, at creation: for a client that sent nothing yet
    int64_t sweep_ns            # caller, at creation
    int64_t next_sweep_ns       # engine
    int http_live               # engine: HTTP connections alive
    int connecting              # engine: connections whose upstream connect is in progress
    int64_t next_connect_sweep_ns
    RelayConn *est_local        # engine: connected since the last publish
    RelayConn *est_shared       # lock: published, not yet drained
    HfEvents ev                 # engine: the framer's event scratch
    H2Events h2ev               # engine: the HTTP/2 observer's
    H2Names names               # the gRPC paths HTTP/2 exchanges named (see H2Names)
    # Accepting (see _relay_accept.pxi).
    RelayShared *shared         # caller, at creation (shared with the other shards)
    pthread_mutex_t stats_lock  # the services' tallies and inst_active arrays
    RelaySvc **svcs             # caller only: every service registered, by id
    uint32_t svcs_len
    uint32_t svcs_cap
    RelayCtl *ctl_head          # lock
    RelayCtl *ctl_tail
    RelaySvc *accept_ready      # engine: services with clients left to accept
    RelaySvc *accept_tail
    RelayConn *reap             # engine: engine-accepted connections ended this batch
    uint32_t max_clients        # caller, at creation: client IPs each service's tally names
    uint64_t rng                # engine (seeded by the caller)
    # Notices (see _relay_notice.pxi).
    RelayNotice *nt_local       # engine: noticed this batch
    size_t nt_local_len
    size_t nt_local_cap
    RelayNotice *nt_shared      # lock: published, not yet drained
    size_t nt_shared_len
    size_t nt_shared_cap
    # X-Forwarded-For (see _relay_forwarded.pxi): where rewritten heads are built.
    char *fwd_scratch           # engine
    size_t fwd_scratch_cap
    # Steering (see _relay_steer.pxi): the CPUs the thread pins itself to as it starts.
    uint8_t pinned              # caller, at creation: cpu_mask is set
    uint64_t cpu_mask[RELAY_CPU_WORDS]  # caller, at creation: one bit per CPU
    int64_t tid                 # atomic: the engine thread's id, set as it starts (0 before)
    int64_t counters[RC_COUNT]  # atomic: RC_SUBMITTED by the caller, the others by the engine


# ---- accepting (_relay_accept.pxi) ------------------------------------------------------------

cdef enum:
    # RelayCtl.kind
    RELAY_CTL_LISTEN = 1
    RELAY_CTL_UNLISTEN = 2
    RELAY_CTL_SNAP = 3
    RELAY_CTL_PAUSE = 4
    RELAY_CTL_RESUME = 5
    RELAY_CTL_ROUTES = 6
    RELAY_ACCEPT_BATCH = 64     # clients accepted per service per turn


# ---- HTTP services (_relay_http.pxi) ----------------------------------------------------------

cdef enum:
    HTTP_PENDING = 8                    # exchanges waiting for their last byte to be written
    HTTP_EXCHANGES_MAX = 1 << 18        # records queued for the asyncio side before dropping
    HTTP_EXCHANGES_WAKE = 2048          # wake the asyncio side when this many are queued
    HTTP_ANSWERS = 4                    # the engine's own answers: 400, 431, 408, 421
    HTTP_EARLY_MAX = 256                # instance bytes kept before the client's first ones
    # An exchange cut short is recorded with who cut it in place of its status (real ones are
    # 100..999): flux.relay.HTTP_CUT_SIDES[status - 1] names them.
    HTTP_CUT_CLIENT = 1                 # = 1 + the client's side index
    HTTP_CUT_INSTANCE = 2               # = 1 + the instance's
    HTTP_CUT_FLUXD = 3                  # fluxd ended it (stopping) before either side did


cdef inline int http_answer_index(uint16_t status) noexcept nogil:
    """Index of an answered status in HTTP_ERROR_RESPONSES' order and RelaySvc.rejected."""
    if status == 400:
        return 0
    if status == 431:
        return 1
    if status == 408:
        return 2
    if status == 421:
        return 3
    return -1


cdef struct RelayExchange:
    # One timed exchange: written by the engine thread into ex_local, moved to ex_shared under
    # lock, read and freed by drain_all.
    uint64_t token
    uint64_t roundtrip_ns
    uint64_t total_ns
    uint32_t service        # token 0 (an engine-accepted connection): its label set
    uint32_t inst
    uint32_t client_ip
    uint32_t name           # HTTP/2: the gRPC path's id in RelayEngine.names (0: not gRPC)
    int16_t grpc_status     # its grpc-status (-1: none)
    uint16_t status
    uint8_t method


cdef struct HttpPending:
    # A response the framer saw end, waiting for its last byte to be written (engine thread).
    uint64_t end_pos                    # response-stream offset just after the response
    uint64_t t_request_head
    uint64_t t_response_head
    uint32_t name                       # as RelayExchange's
    int16_t grpc_status
    uint16_t status
    uint8_t method


cdef enum:
    FWD_IP_MAX = 48             # INET6_ADDRSTRLEN (46), rounded up
    # What a head's rewrite adds beyond a copy of its Host value (flux.relay.forwarded's
    # FORWARDED_GROWTH_MAX): the X-Forwarded-* lines with an IPv6 address at most.
    FWD_GROWTH_MAX = 128


cdef struct RelayForward:
    # Engine thread (the caller fills ip before handing the connection over).
    char ip[FWD_IP_MAX]         # the client's address as X-Forwarded-For names it
    uint8_t ip_len
    uint32_t nheads             # complete request heads shown and not yet rewritten ...
    uint64_t head_start[HF_RING]    # ... their request-stream spans (at most HF_RING can
    uint64_t head_end[HF_RING]      # complete in one read: the ring's back-pressure)
    uint64_t base               # the request-stream offset of the first byte http_observe
    #                             last returned as forwardable (where the spans are counted
    #                             from in the buffer)


cdef struct RelayHttp:
    # What an HTTP connection carries besides its RelayDir pair.  Allocated by whoever makes
    # the RelayConn (http_attach), then the engine thread's.
    HttpFramer f
    HttpPending pending[HTTP_PENDING]   # a ring: pending_head, npending
    uint64_t stop_pos[2]                # forward side d's stream only below this offset
    int64_t last_active_ns
    int64_t linger_until_ns
    uint16_t reject_status              # what to answer (0: close without answering)
    uint8_t npending
    uint8_t pending_head
    uint8_t halted[2]                   # stop reading side d
    uint8_t rejecting                   # an answer is due once side 1 is written up to stop_pos
    uint8_t lingering                   # answered: discarding the client's bytes
    uint8_t observe                     # queue exchange records
    # Client bytes read but not shown to the framer yet (hf_request_blocked): in dir[0]'s
    # buffer, after its p.length bytes.
    uint32_t unshown
    uint8_t ring_wait                   # dir[0] waits for a response to free a ring slot
    # HTTP_CUT_*: the side that ended first with an exchange unfinished (0: none yet).
    uint8_t cut_side
    # The HTTP/2 observer, once the client opened with the preface (NULL until then).
    H2Observer *h2
    # The instance's first bytes, when they came before the client's first ones decided
    # between HTTP/1.x and HTTP/2 (an HTTP/2 server may send its SETTINGS at once): forwarded,
    # but shown (to the framer or the HTTP/2 observer) only once that is decided.
    uint16_t early_len
    char early[HTTP_EARLY_MAX]
    # A --forwarded service's connection: what rewriting its request heads needs (NULL for
    # every other connection; _relay_forwarded.pxi).
    RelayForward *fwd


# ---- notices (_relay_notice.pxi) --------------------------------------------------------------

cdef enum:
    NOTICES_MAX = 4096          # records held for the asyncio side at each end before dropping
    # What happened (RelayNotice.kind); NOTICE_KINDS names them in this order.
    NOTICE_REJECTED = 0         # a malformed request: answered 400 / 431 (status), or closed
    #                             unanswered (status 0); reason: the framer's HF_ERR_*
    NOTICE_HEADER_TIMEOUT       # NR_HEAD_INCOMPLETE (answered 408), NR_NOTHING_SENT (closed
    #                             quietly) or NR_RESPONSES_OWED (reset)
    NOTICE_IDLE_CLOSED          # NR_IDLE, or NR_NOTHING_SENT (the idle timeout is the shorter)
    NOTICE_OPAQUE               # the framer gave up: its HF_ERR_*
    NOTICE_SWITCHED             # switched protocols (status): NR_UPGRADE, NR_CONNECT
    NOTICE_CUT                  # `count` exchanges cut short: NR_CUT_CLIENT - 1 + HTTP_CUT_*
    NOTICE_H2_GAVE_UP           # the HTTP/2 observer gave up on the connection: NR_H2_*
    # Reasons beyond the framer's HF_ERR_* (NOTICE_REASONS names them all).
    NR_NOTHING_SENT = 32
    NR_HEAD_INCOMPLETE
    NR_RESPONSES_OWED
    NR_IDLE
    NR_UPGRADE
    NR_CONNECT
    NR_CUT_CLIENT
    NR_CUT_INSTANCE
    NR_CUT_FLUXD
    NR_H2_HPACK                 # NR_H2_HPACK - 1 + H2_ERR_*: the HTTP/2 observer's reasons,
    NR_H2_SEQUENCE              # in H2_ERR_* order
    NR_H2_PADDING
    NR_H2_TABLE_SIZE
    NR_H2_MEMORY
    NR_H2_RESPONSE_FIRST


cdef struct RelayNotice:
    # Something an HTTP connection's data path did on its own, for one log line: written by
    # the engine thread into nt_local, moved to nt_shared under lock, read and freed by
    # drain_all.
    uint64_t token
    uint64_t bytes_up       # the connection's bytes delivered to the instance, to the client
    uint64_t bytes_down
    int64_t age_ns          # since the connection was handed over or accepted
    uint32_t service        # the service it counts for (0: none)
    uint32_t inst           # the instance the engine picked (0: a caller's connection)
    uint32_t client_ip      # network order
    uint32_t count          # NOTICE_CUT: exchanges cut short
    uint16_t client_port
    uint16_t status
    uint8_t kind
    uint8_t reason


# ==== functions one room calls in another ===================================================
# Defined in the room named above each group; the signatures must match the definitions.

# the framer's calling protocol (_http_framer.pxi)
cdef void hf_init(HttpFramer *f, uint64_t now) noexcept nogil
cdef size_t hf_feed(HttpFramer *f, int side, const char *data, size_t n, uint64_t now,
                    HfEvents *out) noexcept nogil
cdef uint64_t hf_body_remaining(const HttpFramer *f, int side) noexcept nogil
cdef bint hf_request_blocked(const HttpFramer *f) noexcept nogil
cdef void hf_skip(HttpFramer *f, int side, uint64_t n, uint64_t now, HfEvents *out) noexcept nogil
cdef void hf_eof(HttpFramer *f, int side, uint64_t now, HfEvents *out) noexcept nogil
cdef int hf_request_phase(const HttpFramer *f) noexcept nogil
cdef uint64_t hf_unanswered(const HttpFramer *f) noexcept nogil
cdef uint64_t hf_open_head(const HttpFramer *f) noexcept nogil
cdef void hf_pin_host(HttpFramer *f) noexcept nogil
cdef void hf_report_heads(HttpFramer *f) noexcept nogil

# the HTTP/2 observer's calling protocol (_h2_observer.pxi)
cdef H2Observer *h2_new(H2Names *names) noexcept nogil
cdef void h2_free(H2Observer *o) noexcept nogil
cdef size_t h2_feed(H2Observer *o, int side, const char *data, size_t n, uint64_t now,
                    H2Events *out) noexcept nogil
cdef uint64_t h2_body_remaining(const H2Observer *o, int side) noexcept nogil
cdef void h2_skip(H2Observer *o, int side, uint64_t n, uint64_t now,
                  H2Events *out) noexcept nogil
cdef void h2_give_up(H2Observer *o, uint8_t reason, H2Events *out) noexcept nogil
cdef void h2_names_free(H2Names *names) noexcept nogil

# pipes and copy buffers (_relay_pipes.pxi)
cdef void relay_close_pipe(RelayEngine *e, int r, int w) noexcept nogil
cdef int relay_borrow_pipe(RelayEngine *e, RelayDir *p) noexcept nogil
cdef void relay_return_pipe(RelayEngine *e, RelayDir *p) noexcept nogil
cdef void relay_drop_pipe(RelayEngine *e, RelayDir *p) noexcept nogil
cdef char *relay_borrow_buf(RelayEngine *e, RelayDir *p) noexcept nogil
cdef char *relay_grow_buf(RelayEngine *e, RelayDir *p, size_t size) noexcept nogil
cdef void relay_return_buf(RelayEngine *e, RelayDir *p) noexcept nogil

# a connection's life (_relay_conn.pxi)
cdef void relay_release_dirs(RelayEngine *e, RelayConn *c) noexcept nogil
cdef void relay_retire(RelayEngine *e, RelayConn *c, int err) noexcept nogil
cdef void relay_close_socket(RelayEngine *e, RelayConn *c, int s) noexcept nogil
cdef void relay_finish(RelayEngine *e, RelayConn *c) noexcept nogil
cdef void relay_abort(RelayEngine *e, RelayConn *c, int err) noexcept nogil
cdef void relay_register(RelayEngine *e, RelayConn *c) noexcept nogil
cdef int relay_preface(RelayEngine *e, RelayConn *c, const char *data, size_t n) noexcept nogil

# connecting (_relay_connect.pxi)
cdef void relay_start_connect(RelayEngine *e, RelayConn *c) noexcept nogil
cdef bint relay_self_connected(RelayConn *c) noexcept nogil
cdef void relay_established(RelayEngine *e, RelayConn *c) noexcept nogil
cdef void relay_connect_failed(RelayEngine *e, RelayConn *c, int err) noexcept nogil
cdef void relay_sweep_connects(RelayEngine *e) noexcept nogil

# the data path (_relay_moves.pxi)
cdef void relay_pump(RelayEngine *e, RelayConn *c) noexcept nogil

# the loop (_relay_loop.pxi)
cdef int relay_wait_ms(int64_t until_ns) noexcept nogil
cdef void relay_publish(RelayEngine *e) noexcept nogil

# accepting (_relay_accept.pxi)
cdef void accept_count_up(RelayEngine *e, RelayConn *c) noexcept nogil
cdef bint accept_retire(RelayEngine *e, RelayConn *c) noexcept nogil
cdef void accept_reap(RelayEngine *e) noexcept nogil
cdef void accept_on_event(RelayEngine *e, RelaySvc *s) noexcept nogil
cdef void accept_run_ready(RelayEngine *e) noexcept nogil
cdef void accept_run_commands(RelayEngine *e, RelayCtl *ctl) noexcept nogil
cdef void accept_free_services(RelayEngine *e) noexcept nogil

# the HTTP hooks (_relay_http.pxi)
cdef void http_configure(RelayEngine *e, double header_timeout, double idle_timeout) noexcept
cdef int http_attach(RelayConn *c, bint observe) noexcept nogil
cdef void http_release(RelayEngine *e, RelayConn *c) noexcept nogil
cdef bint http_publish_exchanges(RelayEngine *e) noexcept nogil
cdef void http_written(RelayEngine *e, RelayConn *c) noexcept nogil
cdef size_t http_observe(RelayEngine *e, RelayConn *c, int d, const char *buf,
                         size_t n) noexcept nogil
cdef int http_show_kept(RelayEngine *e, RelayConn *c) noexcept nogil
cdef bint http_holding(const RelayHttp *h) noexcept nogil
cdef uint64_t http_may_skip(const RelayHttp *h, int d) noexcept nogil
cdef void http_skipped(RelayEngine *e, RelayConn *c, int d, uint64_t n) noexcept nogil
cdef void http_cut_by(RelayConn *c, int d) noexcept nogil
cdef void http_source_eof(RelayEngine *e, RelayConn *c, int d) noexcept nogil
cdef int http_answer(RelayEngine *e, RelayConn *c) noexcept nogil
cdef int http_linger(RelayEngine *e, RelayConn *c, int budget) noexcept nogil
cdef int http_sweep_wait_ms(RelayEngine *e) noexcept nogil
cdef void http_sweep(RelayEngine *e) noexcept nogil

# X-Forwarded-For (_relay_forwarded.pxi)
cdef int http_forward_attach(RelayConn *c, int fd) noexcept nogil
cdef int http_forward_heads(RelayEngine *e, RelayConn *c, size_t *n) noexcept nogil

# notices (_relay_notice.pxi)
cdef void relay_notice(RelayEngine *e, RelayConn *c, uint8_t kind, uint8_t reason,
                       uint16_t status, uint32_t count) noexcept nogil
cdef void notice_answered(RelayEngine *e, RelayConn *c) noexcept nogil
cdef bint notice_publish(RelayEngine *e) noexcept nogil
cdef list notice_records(RelayNotice *records, size_t count)
