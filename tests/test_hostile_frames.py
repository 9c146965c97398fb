"""Hostile frames (issue 10 §4, §5, §11): every incoming frame counts against the incoming rate,
so floods of pings or of empty continuation frames are closed with 4008; frames that break
RFC 6455 are answered with 1002 (unmasked, reserved bits, bad opcodes, malformed or invalid close
frames) or 1007 (a close reason or text message that is not UTF-8) and never acted on; none of it
logs an ERROR or a traceback, and a bystander keeps receiving (barrier)."""
import logging
import struct

import pytest

from conftest import make_token
from live_server import logged_errors
from raw_client import BINARY, CLOSE, PING, PONG, TEXT, RawClient, client_frame

FLOOD = 2000  # frames; the default burst is 200


async def raw_user(http_port, user_id=1):
    raw = await RawClient.connect(http_port, f"?jwt_token={make_token(user_id)}")
    assert (await raw.recv())["success"] is True
    return raw


async def first_non_pong(raw):
    """The next frame that is not a pong (the flooder's pings are answered until the close)."""
    while True:
        frame = await raw.recv_frame()
        assert frame is not None, "the connection ended without a close frame"
        if frame[0] != PONG:
            return frame


def close_code_of(frame):
    assert frame[0] == CLOSE, f"expected a close frame, got {frame}"
    return struct.unpack("!H", frame[1][:2])[0]


def no_trouble_logged(records):
    assert not logged_errors(records), [r.getMessage() for r in logged_errors(records)]
    for record in records:
        assert record.exc_info is None and "Traceback" not in record.getMessage(), record.getMessage()


PROBE = b'{"remove_page":"dashboard","dashboard_id":"probe"}'


@pytest.mark.parametrize("flood", ["pings", "empty continuation frames", "pongs"])
@pytest.mark.gen_test(timeout=30)
async def test_frame_flood_is_closed_with_4008(flood, server, connect, barrier, http_port, caplog):
    caplog.set_level(logging.DEBUG)
    bystander = await connect(user_id=2)
    await bystander.subscribe("table", table_id=10)
    raw = await raw_user(http_port)
    if flood == "pings":
        frames = client_frame(b"x", PING) * FLOOD
    elif flood == "pongs":
        frames = client_frame(b"", PONG) * FLOOD
    else:
        frames = client_frame(b"", TEXT, fin=False) + client_frame(b"", 0, fin=False) * FLOOD
    # the probe answers page_discard if the flood went uncounted
    await raw.send_raw(frames + client_frame(PROBE))
    assert close_code_of(await first_non_pong(raw)) == 4008
    raw.close()
    server.publish({"type": "rows_created", "table_id": 10, "rows": [{"id": 1}], "metadata": {},
                    "before_row_id": None})
    assert (await bystander.recv())["rows"] == [{"id": 1}]
    await barrier(bystander)
    assert server.counters.closed["policy_violation"] == 1
    no_trouble_logged(caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_a_fragmented_message_within_the_rate_is_received_whole(server, http_server, http_port):
    raw = await raw_user(http_port)
    text = b'{"page":"table","table_id":10}'
    await raw.send_raw(client_frame(text[:5], TEXT, fin=False) + client_frame(b"", 0, fin=False)
                       + client_frame(text[5:12], 0, fin=False) + client_frame(b"x", PING)
                       + client_frame(text[12:], 0))
    assert await raw.recv_frame() == (PONG, b"x")  # a ping between fragments is answered at once
    assert (await raw.recv())["type"] == "page_add"
    raw.close()


CLOSE_CASES = [
    # (payload of the client's close frame, the server's answer, the close reason counted)
    (struct.pack("!H", 1000) + b"\xff\xfe bad", 1007, "invalid_payload"),
    (struct.pack("!H", 4000) + "caf\u00e9".encode("latin-1"), 1007, "invalid_payload"),
    (b"\x03", 1002, "protocol_error"),
    *[(struct.pack("!H", code), 1002, "protocol_error") for code in (0, 999, 1004, 1005, 1006, 1015, 1016,
                                                                      2999, 5000, 65535)],
]


@pytest.mark.parametrize("payload,answer,reason", CLOSE_CASES)
@pytest.mark.gen_test(timeout=30)
async def test_malformed_close_frames_are_answered_per_rfc_6455(payload, answer, reason, server, connect,
                                                                barrier, http_port, caplog):
    caplog.set_level(logging.DEBUG)
    bystander = await connect(user_id=2)
    raw = await raw_user(http_port)
    await raw.send_raw(client_frame(payload, CLOSE))
    assert await raw.close_code() == answer
    raw.close()
    await barrier(bystander)
    assert server.counters.closed[reason] == 1
    no_trouble_logged(caplog.records)
    assert any(r.levelno == logging.DEBUG and str(answer) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 1014, 3000, 4999])
@pytest.mark.gen_test(timeout=30)
async def test_valid_close_codes_are_echoed(code, server, http_server, http_port):
    raw = await raw_user(http_port)
    await raw.send_raw(client_frame(struct.pack("!H", code) + "bye \u00e9".encode(), CLOSE))
    assert await raw.close_code() == code
    raw.close()


BAD_FRAMES = {
    "unmasked text frame": client_frame(b'{"page":"table","table_id":10}', masked=False),
    "unmasked ping": client_frame(b"x", PING, masked=False),
    "reserved bit": client_frame(b'{"page":"table","table_id":10}', rsv=4),
    "reserved opcode 3": client_frame(b'{"page":"table","table_id":10}', 3),
    "reserved opcode 11": client_frame(b"", 11),
    "fragmented ping": client_frame(b"x", PING, fin=False),
    "continuation without a message": client_frame(b'{"page":"table","table_id":10}', 0),
    "new message inside a fragmented one": client_frame(b"{", TEXT, fin=False) + client_frame(b"{", BINARY),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
@pytest.mark.gen_test(timeout=30)
async def test_frames_breaking_rfc_6455_are_refused_with_1002_not_acted_on(name, server, connect, barrier,
                                                                           http_port, caplog):
    caplog.set_level(logging.DEBUG)
    bystander = await connect(user_id=2)
    raw = await raw_user(http_port)
    await raw.send_raw(BAD_FRAMES[name] + client_frame(PROBE))
    frame = await raw.recv_frame()  # not a page_add, a pong or the probe's answer: the close
    assert close_code_of(frame) == 1002
    assert not server.hub.groups  # the unmasked subscription was not acted on
    raw.close()
    await barrier(bystander)
    assert server.counters.closed["protocol_error"] == 1
    no_trouble_logged(caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_text_message_not_utf8_is_answered_with_1007(server, connect, barrier, http_port, caplog):
    caplog.set_level(logging.DEBUG)
    bystander = await connect(user_id=2)
    raw = await raw_user(http_port)
    await raw.send_raw(client_frame(b'{"page":"\xff"}'))
    assert await raw.close_code() == 1007
    raw.close()
    await barrier(bystander)
    assert server.counters.closed["invalid_payload"] == 1
    no_trouble_logged(caplog.records)
