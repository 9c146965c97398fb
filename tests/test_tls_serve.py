"""``tornado-rt serve --tls-cert --tls-key``: wss:// and https:// without a proxy, TLS 1.2+, exit 2
naming the option for unusable files, and SIGHUP loading a renewed certificate — against real
subprocesses, with certificates made by the ``cryptography`` package."""
import datetime
import ipaddress
import os
import signal
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from standalone import API_KEY, SECRET, ServeProcess, WsClient, clean_env, make_token, run_cli
from tornado_rt import cli

BASE = ["serve", "--dev", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY]


def make_pair(directory, name, common_name="localhost"):
    """A self-signed certificate for localhost/127.0.0.1 and its key; returns (cert, key, pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, pem


def client_context(*pems):
    """A verifying client context that trusts exactly these certificates."""
    context = ssl.create_default_context(cadata="".join(p.decode() for p in pems))
    return context


def served_certificate(port):
    der = ssl_socket_certificate(port)
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def ssl_socket_certificate(port):
    import socket
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


async def wss_client(proc, context, user_id=1):
    request = HTTPRequest(f"{proc.ws_url}?jwt_token={make_token(user_id)}", ssl_options=context,
                          request_timeout=15)
    client = WsClient(await websocket_connect(request), f"user {user_id}")
    auth = await client.recv()
    assert auth["type"] == "authentication" and auth["success"] is True, auth
    return client


async def https_publish(proc, context, table_id, row_id):
    import json
    body = {"message": {"type": "rows_created", "table_id": table_id, "rows": [{"id": row_id}],
                        "metadata": {}, "before_row_id": None}}
    response = await AsyncHTTPClient().fetch(HTTPRequest(
        proc.http_url + "publish", method="POST", body=json.dumps(body), ssl_options=context,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}), raise_error=False)
    assert response.code == 200, response.body
    return body["message"]


def wait_for_log(proc, text, timeout=15.0):
    """Wait until the server's stderr holds ``text`` (it logs once the signal was handled)."""
    deadline = time.monotonic() + timeout
    while text not in proc.stderr():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{proc.output()}"
        time.sleep(0.05)  # barrier-ok: bounded polling for a log line, never proof of absence


@pytest.mark.gen_test(timeout=60)
async def test_wss_and_https_served_directly_and_sighup_reloads_the_certificate(tmp_path):
    cert_a, key_a, pem_a = make_pair(tmp_path, "a")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(cert_a.read_bytes())
    live_key.write_bytes(key_a.read_bytes())
    proc = ServeProcess(BASE + ["--tls-cert", str(live_cert), "--tls-key", str(live_key)])
    try:
        assert proc.ws_url.startswith("wss://127.0.0.1:") and proc.http_url.startswith("https://127.0.0.1:")
        trust_a = client_context(pem_a)
        old = await wss_client(proc, trust_a)
        await old.subscribe("table", table_id=1)
        sent = await https_publish(proc, trust_a, 1, 1)
        assert await old.recv() == sent
        assert served_certificate(proc.port) == pem_a

        # Renewal: new files in place, SIGHUP; new handshakes get B, the open connection goes on.
        cert_b, key_b, pem_b = make_pair(tmp_path, "b")
        os.replace(cert_b, live_cert)
        os.replace(key_b, live_key)
        proc.proc.send_signal(signal.SIGHUP)
        wait_for_log(proc, "TLS certificate reloaded")
        assert served_certificate(proc.port) == pem_b
        new = await wss_client(proc, client_context(pem_b), user_id=1)
        await new.subscribe("table", table_id=1)
        sent = await https_publish(proc, client_context(pem_b), 1, 2)
        assert await old.recv() == sent
        assert await new.recv() == sent

        # A broken renewal (key of another certificate) is refused and the live pair stays.
        _, key_c, _ = make_pair(tmp_path, "c")
        os.replace(key_c, live_key)
        proc.proc.send_signal(signal.SIGHUP)
        wait_for_log(proc, "TLS reload refused")
        assert served_certificate(proc.port) == pem_b
        sent = await https_publish(proc, client_context(pem_b), 1, 3)
        assert await old.recv() == sent and await new.recv() == sent
        old.close()
        new.close()
    finally:
        assert await proc.stopped() == 0, proc.output()
    assert "--tls-key: " in proc.stderr() and "does not match the certificate" in proc.stderr()


def test_context_is_tls_1_2_or_newer(tmp_path):
    cert, key, _ = make_pair(tmp_path, "a")
    parser = cli.build_parser()
    config = cli.resolve(parser.parse_args(BASE + ["--tls-cert", str(cert), "--tls-key", str(key)]), {})
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.fixture
def refusals(tmp_path):
    cert_a, key_a, _ = make_pair(tmp_path, "a")
    _, key_b, _ = make_pair(tmp_path, "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    unreadable = tmp_path / "a-directory.key"  # unreadable as a file, even for root
    unreadable.mkdir()
    missing = str(tmp_path / "missing.pem")
    return {
        "missing cert": (["--tls-cert", missing, "--tls-key", str(key_a)], "--tls-cert", "cannot read"),
        "missing key": (["--tls-cert", str(cert_a), "--tls-key", missing], "--tls-key", "cannot read"),
        "mismatch": (["--tls-cert", str(cert_a), "--tls-key", str(key_b)], "--tls-key",
                     "does not match the certificate"),
        "garbage cert": (["--tls-cert", str(garbage), "--tls-key", str(key_a)], "--tls-cert",
                         "is not a PEM certificate"),
        "garbage key": (["--tls-cert", str(cert_a), "--tls-key", str(garbage)], "--tls-key",
                        "is not a PEM private key"),
        "key is a cert": (["--tls-cert", str(cert_a), "--tls-key", str(cert_a)], "--tls-key",
                          "is not a PEM private key"),
        "cert only": (["--tls-cert", str(cert_a)], "--tls-key", "required with --tls-cert"),
        "key only": (["--tls-key", str(key_a)], "--tls-cert", "required with --tls-key"),
        "unreadable key": (["--tls-cert", str(cert_a), "--tls-key", str(unreadable)], "--tls-key",
                           "cannot read"),
    }


@pytest.mark.parametrize("case", ["missing cert", "missing key", "mismatch", "garbage cert", "garbage key",
                                  "key is a cert", "cert only", "key only", "unreadable key"])
def test_unusable_tls_files_exit_2_naming_the_option(refusals, case):
    args, option, why = refusals[case]
    result = run_cli(BASE + args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tornado-rt: error: {option}: "), result.stderr
    assert why in lines[0], result.stderr


def test_tls_files_from_the_environment_are_named_with_their_variable(tmp_path):
    cert, _, _ = make_pair(tmp_path, "a")
    result = run_cli(BASE, env=clean_env(TORNADO_RT_TLS_CERT=str(cert), TORNADO_RT_TLS_KEY=str(tmp_path / "nope")))
    assert result.returncode == 2
    assert result.stderr.startswith("tornado-rt: error: TORNADO_RT_TLS_KEY (--tls-key): cannot read"), result.stderr


@pytest.mark.gen_test(timeout=30)
async def test_sighup_without_tls_does_not_stop_the_server():
    """`systemctl reload` sends SIGHUP whatever the options; its default action would end the process."""
    proc = ServeProcess(BASE)
    try:
        proc.proc.send_signal(signal.SIGHUP)
        wait_for_log(proc, "received SIGHUP: no --directory file to reload; ignored")
        client = await WsClient.connect(proc.ws_url, make_token(1))
        client.close()
        assert proc.proc.poll() is None
    finally:
        assert await proc.stopped() == 0, proc.output()
