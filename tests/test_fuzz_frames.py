"""Fuzzing the frame layer of a live server with hypothesis (issue 10 §5): random opcodes, FIN
and RSV bits, masked or not, declared lengths in every encoding (minimal or not, truncated
frames), arbitrary payloads, close frames with any code and reason bytes, and fragmented
sequences with control frames in between, sent as raw bytes over a real socket. Whatever
arrives, nothing is logged at ERROR, no record carries a traceback, and a bystander keeps
receiving what is published, in order.

Like tests/test_fuzz.py, the server runs on its own thread (:class:`live_server.ServerThread`);
each example upgrades a fresh socket by hand, sends its frames, half-closes the socket and reads
to the end, so the server has handled every byte before the checks run. Every record from
every logger is collected at DEBUG level for the duration of the module.
"""
import logging
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import make_token
from live_server import logged_errors
from test_fuzz import Live

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Everything(logging.Handler):
    """Every record, from any logger and thread."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def live():
    handler = Everything()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        live = Live()
        live.records = handler.records
        yield live
        live.exits.close()
        live.thread.stop(live.server)
        live.thread.close()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    check_log(handler.records)


def check_log(records):
    errors = [r for r in records if r.levelno >= logging.ERROR and r.name != "tornado.access"]
    assert not errors and not logged_errors(records), errors[0].getMessage()
    for record in records:
        text = record.getMessage()
        assert record.exc_info is None and "Traceback" not in text, text


def upgrade(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sock.sendall((f"GET /ws/core/?jwt_token={make_token(1)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "no upgrade answer"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:100]
    rest = head.split(b"\r\n\r\n", 1)[1]
    while b"web_socket_id" not in rest:  # the authentication message
        rest += sock.recv(4096)
    return sock


def mask(payload, key):
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


close_codes = st.one_of(st.sampled_from([0, 999, 1000, 1001, 1002, 1004, 1005, 1006, 1007, 1012, 1015, 1016,
                                         2999, 3000, 4999, 5000, 65535]), st.integers(0, 65535))
close_payloads = st.one_of(
    st.binary(max_size=3),
    st.tuples(close_codes, st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode)))
    .map(lambda t: struct.pack("!H", t[0]) + t[1]),
)


@st.composite
def frames(draw):
    """One raw client frame, mostly well-formed enough to reach the checks behind the header."""
    opcode = draw(st.one_of(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x8, 0x9, 0xA]), st.integers(0, 15)))
    payload = draw(close_payloads) if opcode == 0x8 and draw(st.integers(0, 3)) else draw(st.one_of(
        st.binary(max_size=200), st.just(b'{"page":"table","table_id":10}'), st.binary(min_size=126, max_size=300)))
    fin = draw(st.booleans()) if opcode in (0, 1, 2) else draw(st.sampled_from([True, True, True, False]))
    rsv = draw(st.sampled_from([0, 0, 0, 0, 1, 2, 4, 7]))
    masked = draw(st.sampled_from([True, True, True, True, False]))
    encoding = draw(st.sampled_from(["minimal", "minimal", "16", "64"]))
    n = len(payload)
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    bit = 0x80 if masked else 0
    if encoding == "64" or n >= 65536:
        header = struct.pack("!BBQ", first, bit | 127, n)
    elif encoding == "16" or n >= 126:
        header = struct.pack("!BBH", first, bit | 126, n)
    else:
        header = struct.pack("!BB", first, bit | n)
    if masked:
        key = os.urandom(4)
        frame = header + key + mask(payload, key)
    else:
        frame = header + payload
    if draw(st.integers(0, 9)) == 0:  # now and then a truncated frame (the peer stops mid-frame)
        frame = frame[:draw(st.integers(0, len(frame)))]
    return frame


@st.composite
def fragmented(draw):
    """A fragmented message, perhaps broken, with control frames between its fragments."""
    opcode = draw(st.sampled_from([0x1, 0x2]))
    parts = draw(st.lists(st.binary(max_size=30), min_size=1, max_size=6))
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        op = opcode if i == 0 else 0
        first = (0x80 if last else 0) | op
        key = os.urandom(4)
        out.append(struct.pack("!BB", first, 0x80 | len(part)) + key + mask(part, key))
        if draw(st.booleans()):
            out.append(draw(frames()))
    return b"".join(out)


def send_and_drain(live, data):
    sock = upgrade(live.port)
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed first (it refused an earlier frame): fine
        try:
            while sock.recv(65536):  # until the server ends the connection
                pass
        except OSError:
            pass
    finally:
        sock.close()


def check(live):
    check_log(live.records)
    live.bystander_still_served()


@pytest.fixture(autouse=True)
def port(live):
    live.port = int(live.url.split(":")[2].split("/")[0])


def masked_close(payload):
    key = b"\x01\x02\x03\x04"
    return struct.pack("!BB", 0x88, 0x80 | len(payload)) + key + mask(payload, key)


@FUZZ
@example(sequence=[masked_close(b"\x03\xe8\xff\xfe")])  # issue 10 §5: a traceback per connection
@given(sequence=st.lists(st.one_of(frames(), fragmented()), min_size=1, max_size=8))
def test_raw_frames_never_log_an_error_and_the_bystander_is_served(live, sequence):
    send_and_drain(live, b"".join(sequence))
    check(live)
