"""Embedded behind Tornado's own TLS: the fan-out's direct socket sends must never bypass the SSL
stream (they would put plaintext on an encrypted connection). A wss:// client reads every frame."""
import datetime
import ssl

import pytest
import ujson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from conftest import make_token


@pytest.fixture
def ssl_options(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


@pytest.mark.gen_test
async def test_messages_reach_a_wss_client_intact(server, https_server, https_port):
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    request = HTTPRequest(f"wss://localhost:{https_port}/ws/core/?jwt_token={make_token(1)}",
                          ssl_options=client_context)
    conn = await websocket_connect(request)
    assert ujson.loads(await conn.read_message())["success"] is True
    session = next(iter(server.hub.connections.values()))
    assert session.transport.sock is None  # no direct sends on a TLS stream
    await conn.write_message(ujson.dumps({"page": "table", "table_id": 10}))
    assert ujson.loads(await conn.read_message())["type"] == "page_add"
    sent = [{"type": "rows_created", "table_id": 10, "rows": [{"id": n, "v": "é" * n}], "metadata": {},
             "before_row_id": None} for n in range(0, 3000, 300)]
    for msg in sent:
        server.publish(msg)
    for msg in sent:
        assert ujson.loads(await conn.read_message()) == msg
    conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_publish_after_a_partly_written_pong_over_tls(server, https_server, https_port):
    """The one-writer scenario (tests/test_one_writer.py) over TLS: Tornado holds the rest of a
    pong (plaintext, before encryption) when a message is published: the client reads the pongs
    intact, then the message."""
    from test_one_writer import PONG_PAYLOAD, assert_intact, fill_with_pongs, make_room, rows, server_side
    from raw_client import PONG, TEXT, RawClient

    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    raw = await RawClient.connect(https_port, f"?jwt_token={make_token(1)}", rcvbuf=4096, tls=client_context)
    web_socket_id = (await raw.recv())["web_socket_id"]
    await raw.send({"page": "table", "table_id": 10})
    assert (await raw.recv())["type"] == "page_add"
    protocol, stream = server_side(server, web_socket_id)
    assert server.hub.connections[web_socket_id].transport.sock is None
    import socket
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await fill_with_pongs(raw, protocol, stream)
    make_room(raw, stream.socket)
    server.publish(rows(1))
    frames = []
    while not frames or frames[-1][0] != TEXT:
        frame = await raw.recv_frame()
        assert frame is not None, "connection closed"
        frames.append(frame)
        assert_intact(frames[-1:])
    assert [f[0] for f in frames[:-1]] == [PONG] * (len(frames) - 1)
    assert all(f[1] == PONG_PAYLOAD for f in frames[:-1])
    assert ujson.loads(frames[-1][1]) == rows(1)
    server.publish(rows(2))
    assert await raw.recv() == rows(2)
    raw.close()
