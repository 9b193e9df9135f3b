"""flux.balancer.clienthello: the server name of real ClientHellos made by Python's ``ssl``
(a client handshake on memory buffers: no network), split, refragmented and garbled."""

from __future__ import annotations

import random

import pytest

from flux.balancer.clienthello import HELLO_MAX, read_server_name
from tests.support.tls import client_hello, refragment


@pytest.mark.parametrize("tls13_only", [False, True])
def test_the_server_name_of_a_real_client_hello(tls13_only: bool) -> None:
    hello = client_hello("WWW.Example.test", tls13_only=tls13_only)
    assert read_server_name(hello) == (True, "www.example.test")
    assert read_server_name(client_hello("a.b.example.test.")) == (True, "a.b.example.test")


def test_a_client_hello_without_a_server_name() -> None:
    assert read_server_name(client_hello(None)) == (True, None)
    assert read_server_name(client_hello("127.0.0.1")) == (True, None)  # no SNI for an IP


def test_every_prefix_of_a_client_hello_asks_for_more() -> None:
    hello = client_hello("www.example.test")
    for end in range(len(hello)):
        assert read_server_name(hello[:end]) == (False, None), end


@pytest.mark.parametrize("size", [1, 3, 7, 100])
def test_a_client_hello_over_several_records_is_joined(size: int) -> None:
    records = refragment(client_hello("split.example.test"), size)
    assert read_server_name(records) == (True, "split.example.test")
    # The records arrive a piece at a time: more is asked for until the last one.
    rng = random.Random(size)
    cut = sorted(rng.sample(range(1, len(records)), 20))
    for end in cut:
        assert read_server_name(records[:end]) == (False, None)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x00",
        b"\x16\x02\x01\x00\x10",  # not TLS 1.x
        b"\x16\x03\x09\x00\x10",
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x17\x03\x03\x00\x05hello",  # application data first
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        # A ClientHello whose fields announce more than it holds.
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\xff\xff",
        # The record is larger than a router reads.
        b"\x16\x03\x01\x40\x00" + b"\x01",
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a handshake over the limit
    ],
)
def test_garbage_has_no_server_name(data: bytes) -> None:
    assert read_server_name(data) == (True, None)


def test_a_garbled_client_hello_has_no_server_name() -> None:
    hello = bytearray(client_hello("www.example.test"))
    rng = random.Random(7)
    for _ in range(300):
        garbled = bytearray(hello)
        for _ in range(rng.randint(1, 8)):
            garbled[rng.randrange(9, len(garbled))] = rng.randrange(256)
        done, name = read_server_name(bytes(garbled))
        assert done or len(garbled) < HELLO_MAX
        assert name is None or isinstance(name, str)
    # Random bytes after a handshake record header.
    for _ in range(300):
        noise = bytes(rng.randrange(256) for _ in range(rng.randint(0, 600)))
        done, name = read_server_name(b"\x16\x03\x01" + len(noise).to_bytes(2, "big") + noise)
        assert name is None or isinstance(name, str)
