"""HTTP/1.x byte streams the framer's tests and its fuzz target share.

Valid streams (a request, the sample client and instance streams with every framing rule in
them), the HTTP/2 preface (which is none of them), malformed request heads and chunked bodies,
each with the reason the framer must give and whether h11 rejects it too, and the snippets
mutations insert.  tests/test_http_framer.py runs its tables and checks over them;
fuzz/fuzz_http_framer.py starts its inputs from them.  The relay suites (test_relay_http.py,
test_relay_notices.py) build their messages with request() and response().
"""

from __future__ import annotations

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
# Not HTTP/1.x: how an HTTP/2 client with prior knowledge opens (RFC 9113 section 3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

HOST = b"Host: a\r\n"
MALFORMED_REQUESTS = [
    # (id, bytes, reason, h11 rejects it too)
    ("lowercase-version", b"GET / http/1.1\r\n" + HOST + b"\r\n", "start-line", True),
    ("no-target", b"GET  HTTP/1.1\r\n" + HOST + b"\r\n", "start-line", True),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + HOST + b"\r\n", "start-line", True),
    ("no-version", b"GET /\r\n" + HOST + b"\r\n", "start-line", True),
    ("bad-version", b"GET / HTTP/1.x\r\n" + HOST + b"\r\n", "start-line", True),
    ("trailing-space", b"GET / HTTP/1.1 \r\n" + HOST + b"\r\n", "start-line", True),
    ("separator-in-method", b"GE/T / HTTP/1.1\r\n" + HOST + b"\r\n", "start-line", True),
    ("tab-separator", b"GET\t/ HTTP/1.1\r\n" + HOST + b"\r\n", "start-line", True),
    ("nul-first", b"\x00GET / HTTP/1.1\r\n" + HOST + b"\r\n", "start-line", True),
    ("tls-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "start-line", True),
    ("cr-cr-lf", b"GET / HTTP/1.1\r\r\n" + HOST + b"\r\n", "start-line", True),
    ("obs-text-target", b"GET /\xe9 HTTP/1.1\r\n" + HOST + b"\r\n", "start-line", True),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "field", True),
    ("no-colon", b"GET / HTTP/1.1\r\n" + HOST + b"Foo\r\n\r\n", "field", True),
    ("empty-name", b"GET / HTTP/1.1\r\n" + HOST + b": x\r\n\r\n", "field", True),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + HOST + b"X: a\x00b\r\n\r\n", "field", True),
    ("cr-in-value", b"GET / HTTP/1.1\r\n" + HOST + b"X: a\rb\r\n\r\n", "field", True),
    ("vt-in-value", b"GET / HTTP/1.1\r\n" + HOST + b"X: a\x0bb\r\n\r\n", "field", True),
    ("fold-first", b"GET / HTTP/1.1\r\n folded\r\n" + HOST + b"\r\n", "field", True),
    ("end-cr-cr", b"GET / HTTP/1.1\r\n" + HOST + b"\r\r\n\r\n", "field", True),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + HOST + b"X: a\r\n b\r\n\r\n", "obs-fold", False),
    ("no-host", b"GET / HTTP/1.1\r\nX: a\r\n\r\n", "host", True),
    ("two-hosts", b"GET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n", "host", True),
    ("two-hosts-10", b"GET / HTTP/1.0\r\n" + HOST + HOST + b"\r\n", "host", True),
    *[
        (f"content-length-{i}", b"POST / HTTP/1.1\r\n" + HOST + cl + b"\r\n",
         "content-length", True)
        for i, cl in enumerate([
            b"Content-Length: abc\r\n", b"Content-Length: +5\r\n", b"Content-Length: -1\r\n",
            b"Content-Length:\r\n", b"Content-Length: 1 2\r\n", b"Content-Length: 5, 6\r\n",
            b"Content-Length: 5\r\nContent-Length: 6\r\n", b"Content-Length: 5,\r\n",
            b"Content-Length: 0x5\r\n", b"Content-Length: " + b"1" * 21 + b"\r\n",
            b"Content-Length: 5\r\nContent-Length: 05\r\n",
        ])
    ],
    *[
        (f"transfer-encoding-{i}", b"POST / HTTP/1.1\r\n" + HOST + te + b"\r\n",
         "transfer-encoding", True)
        for i, te in enumerate([
            b"Transfer-Encoding: gzip\r\n", b"Transfer-Encoding: chunked, gzip\r\n",
            b"Transfer-Encoding: chunked, chunked\r\n", b"Transfer-Encoding:\r\n",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: chun ked\r\n", b"Transfer-Encoding: \"chunked\"\r\n",
            b"Transfer-Encoding: ;q=1, chunked\r\n",
        ])
    ],
    ("te-with-cl", b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", "te-with-content-length", False),
    *[
        (f"content-length-list-{i}", b"POST / HTTP/1.1\r\n" + HOST + cl + b"\r\n",
         "content-length-list", False)
        for i, cl in enumerate([
            b"Content-Length: 5, 5\r\n", b"Content-Length: 5,5\r\n",
            b"Content-Length: 5\r\nContent-Length: 5\r\n",
        ])
    ],
    ("te-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "te-http10", False),
]
CHUNKED_HEAD = b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
MALFORMED_CHUNKS = [
    ("not-hex", b"zz\r\n", "chunk", True),
    ("no-size", b"\r\n", "chunk", True),
    ("size-too-long", b"0" * 21 + b"1\r\nx\r\n0\r\n\r\n", "chunk", True),
    ("data-overrun", b"5\r\nhelloX\r\n0\r\n\r\n", "chunk", True),
    ("lf-after-size", b"5\nhello\r\n0\r\n\r\n", "chunk", True),
    ("lf-in-ext", b"5;a\nb\r\nhello\r\n0\r\n\r\n", "chunk", True),
    ("space-before-ext", b"5 ;a\r\nhello\r\n0\r\n\r\n", "chunk", True),
    ("cr-in-ext", b"5;a\rb\r\nhello\r\n0\r\n\r\n", "chunk-ext-cr", False),
    ("bad-trailer", b"0\r\nnot a field\r\n\r\n", "field", True),
    ("folded-trailer", b"0\r\nX: a\r\n b\r\n\r\n", "obs-fold", False),
]

SAMPLE_REQUESTS = (
    b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n"
    b"POST /upload HTTP/1.1\nhost:x\nContent-Length:  7 \nExpect: 100-continue\n\nabc\r\nde"
    b"PUT /c HTTP/1.1\r\nHOST: x\r\nTransfer-Encoding: Chunked\r\n\r\n"
    b"0a;ext=1\r\n0123456789\r\n3 \r\nabc\r\n0;last\r\nDigest: x\r\nOther: y z\r\n\r\n"
    b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"
)
SAMPLE_RESPONSES = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n"
    b"5;a=b\r\nhello\r\n0\r\nT: 1\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
    b"HTTP/1.1 426 Upgrade Required\nContent-Length: 2\n\nno"
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
)

SNIPPETS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b"\x00", b":", b",", b";", b"0", b"f", b"\x7f",
            b"\x80", b"\x0b", b'"', b"\r\n\r\n", b"Content-Length: 3\r\n",
            b"Transfer-Encoding: chunked\r\n", b"Host: x\r\n", b"Connection: close\r\n",
            b"0\r\n\r\n", b"HTTP/1.1", b" HTTP/1.0", b"Upgrade: x\r\n", b"CONNECT ",
            b"Transfer-Encoding: gzip, chunked\r\n", b"Content-Length: 1, 1\r\n"]


def response(status: int = 200, body: bytes = b"hello", extra: bytes = b"") -> bytes:
    reason = {200: b"OK", 201: b"Created", 204: b"No Content", 404: b"Not Found"}[status]
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    if status == 204:
        return head + extra + b"\r\n"
    return head + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


def request(method: bytes = b"GET", path: bytes = b"/", body: bytes = b"",
            extra: bytes = b"") -> bytes:
    head = b"%s %s HTTP/1.1\r\nHost: svc\r\n" % (method, path)
    if body:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + extra + b"\r\n" + body
