"""A small HTTP/1.1 server for tests: the awkward cases a proxy's HTTP framing must get right.

Raw sockets and one thread per connection, so every byte on the wire is the test's choice:

    /               200, a short body
    /chunked        200, a chunked body (three chunks) with a trailer field
    /empty          204, no body
    /notmodified    304, a Content-Length but no body
    /continue       honours "Expect: 100-continue": 100, then reads the body, then 201
    /upgrade        101 Switching Protocols, then echoes every byte back
    /close          200 with "Connection: close", then closes
    /slow?ms=N      200 after N milliseconds
    /size?n=N       200 with an N-byte body
    /cut?n=N        200 announcing an N-byte body, half of it, then a reset (an instance killed
                    mid-response)
    anything else   404
HEAD answers like GET without the body; a request body (Content-Length) is read and counted.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import urllib.parse

from tests.support.listening import close_listener

__all__ = ["HttpBackend"]


class _Closed(Exception):
    pass


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed
            self.buf += chunk
        head, _, self.buf = self.buf.partition(marker)
        return head

    def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


class HttpBackend:
    """Serve on 127.0.0.1 (an ephemeral port) from a daemon thread until ``close()``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.address = "{}:{}".format(*self.listener.getsockname())
        self.requests = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        close_listener(self.listener, self._thread)
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(sock)
        try:
            while self._exchange(conn):
                pass
        except (_Closed, OSError):
            pass
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def _exchange(self, conn: _Conn) -> bool:
        head = conn.read_until(b"\r\n\r\n").decode("latin-1")
        request_line, *lines = head.split("\r\n")
        method, target, version = request_line.split(" ")
        fields = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        with self._lock:
            self.requests += 1
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(fields.get("content-length", "0"))
        keep = fields.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        send = conn.sock.sendall
        if url.path == "/continue":
            if fields.get("expect", "").lower() == "100-continue":
                send(b"HTTP/1.1 100 Continue\r\n\r\n")
            conn.read_exactly(length)
            send(self._response(201, b"got %d bytes\n" % length, method))
            return keep
        conn.read_exactly(length)
        if url.path == "/upgrade":
            send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\n\r\n")
            if conn.buf:
                send(conn.buf)
            while chunk := conn.sock.recv(65536):
                send(chunk)
            return False
        if url.path == "/chunked":
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (b"one ", b"two ", b"three\n"))
            send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Parts\r\n\r\n"
                 + (b"" if method == "HEAD" else body + b"0\r\nX-Parts: 3\r\n\r\n"))
            return keep
        if url.path == "/empty":
            send(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif url.path == "/notmodified":
            send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n")
        elif url.path == "/close":
            send(self._response(200, b"bye\n", method, b"Connection: close\r\n"))
            return False
        elif url.path == "/slow":
            time.sleep(int(query.get("ms", "0")) / 1000)
            send(self._response(200, b"slow\n", method))
        elif url.path == "/cut":
            n = int(query.get("n", "2"))
            send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + b"x" * (n // 2))
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        elif url.path == "/size":
            send(self._response(200, b"x" * int(query.get("n", "0")), method))
        elif url.path == "/":
            send(self._response(200, b"hello from the backend\n", method))
        else:
            send(self._response(404, b"not found\n", method))
        return keep

    @staticmethod
    def _response(status: int, body: bytes, method: str, extra: bytes = b"") -> bytes:
        reason = {200: b"OK", 201: b"Created", 404: b"Not Found"}[status]
        head = b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n%s\r\n" % (status, reason, len(body),
                                                                   extra)
        return head if method == "HEAD" else head + body
