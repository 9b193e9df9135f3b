"""TLS for tests: ClientHellos made by Python's ``ssl`` without a network, self-signed
certificates made by ``openssl`` in a test's directory, and a TLS server naming its own."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path


def client_hello(server_hostname: str | None, *, tls13_only: bool = False) -> bytes:
    """The first flight of a TLS client asking for ``server_hostname`` (None: no SNI)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls13_only:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a TLS client finished its handshake alone")


def refragment(hello: bytes, size: int) -> bytes:
    """``hello`` (one handshake record) as records of at most ``size`` handshake bytes."""
    assert hello[0] == 22
    length = int.from_bytes(hello[3:5], "big")
    message, rest = hello[5 : 5 + length], hello[5 + length :]
    records = b"".join(
        hello[:3] + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (message[at : at + size] for at in range(0, len(message), size))
    )
    return records + rest


def make_certificate(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``common_name`` (its subject's CN and its one DNS name)
    and its key, written in ``directory``: (certificate, key)."""
    cert, key = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "1", "-subj", f"/CN={common_name}"),
            *("-addext", f"subjectAltName=DNS:{common_name}"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def peer_common_name(tls: ssl.SSLSocket) -> str:
    """The subject CN of the (verified) certificate the server showed ``tls``."""
    cert = tls.getpeercert()
    assert cert, "the server's certificate was not verified"
    for rdn in cert["subject"]:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise AssertionError(f"no common name in {cert['subject']}")


class TlsServer:
    """A TLS server on loopback holding one certificate: to every client that completes a
    handshake it sends its ``name`` and closes.  Served on a thread; ``close`` stops it."""

    def __init__(self, name: str, cert: Path, key: Path, host: str = "127.0.0.1") -> None:
        self.name = name
        self._context = server_context(cert, key)
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.2)
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self.handshakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with client:
                client.settimeout(5)
                try:
                    with self._context.wrap_socket(client, server_side=True) as tls:
                        self.handshakes += 1
                        tls.sendall(self.name.encode() + b"\n")
                except (OSError, ssl.SSLError):
                    continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
