"""Trusted proxies (``--trusted-proxy CIDR``): X-Forwarded-For/-Proto/-Host are used from those
peers only — over real sockets against ``tornado-rt serve`` subprocesses — and the address walk
itself without sockets."""
import ipaddress
import re

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from tornado.websocket import websocket_connect

from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, make_token, run_cli
from tornado_rt import Settings
from tornado_rt.proxy import apply_forwarded, client_address, parse_networks

BASE = ["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY, "--log-level", "info"]
FORWARDED = {"Origin": "https://app.example.com", "X-Forwarded-Host": "app.example.com",
             "X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.1, 203.0.113.7"}


async def handshake(ws_url, headers):
    """The HTTP status of a WebSocket handshake (101 when it connected and authenticated)."""
    request = HTTPRequest(f"{ws_url}?jwt_token={make_token(1)}", headers=headers, request_timeout=15)
    try:
        conn = await websocket_connect(request)
    except HTTPClientError as exc:
        return exc.code
    client = WsClient(conn, "proxied")
    auth = await client.recv()
    assert auth["type"] == "authentication" and auth["success"] is True, auth
    client.close()
    return 101


def access_lines(proc, status):
    return [line for line in proc.stderr().splitlines() if f"tornado.access: {status} " in line]


@pytest.mark.gen_test(timeout=40)
async def test_a_trusted_proxy_forwards_the_client_address_and_host():
    proc = ServeProcess(BASE + ["--trusted-proxy", "127.0.0.0/8", "--trusted-proxy", "::1"])
    try:
        # Same-host check against the forwarded Host: the Origin of the proxied app passes.
        assert await handshake(proc.ws_url, FORWARDED) == 101
        # ... and still only that host: another Origin through the same proxy is refused.
        assert await handshake(proc.ws_url, {**FORWARDED, "Origin": "https://evil.example"}) == 403
        status, _, _ = await Api(proc.base).call("GET", "/api/stats", headers={"X-Forwarded-For": "203.0.113.9"})
        assert status == 200
        status, metrics, _ = await Api(proc.base).call("GET", "/metrics", key=None)
        assert 'tornado_rt_refusals_total{kind="origin",reason="not_same_host"} 1.0' in metrics
    finally:
        assert await proc.stopped() == 0, proc.output()
    upgraded = access_lines(proc, 101)
    assert len(upgraded) == 1 and "(203.0.113.7)" in upgraded[0], proc.output()
    assert "198.51.100.1" not in proc.stderr()  # left of the first untrusted hop: not believed
    assert any("GET /api/stats (203.0.113.9)" in line for line in access_lines(proc, 200)), proc.output()
    refused = [line for line in proc.stderr().splitlines() if "refused origin:" in line]
    assert len(refused) == 1, proc.output()
    assert " INFO " in refused[0]
    assert "reason=not_same_host origin='https://evil.example' host='app.example.com'" in refused[0]
    assert "client='203.0.113.7'" in refused[0]
    assert make_token(1).split(".")[1] not in proc.stderr()


@pytest.mark.gen_test(timeout=40)
async def test_forwarded_headers_from_an_untrusted_peer_are_ignored():
    # Loopback is not in the trusted range, and a server without --trusted-proxy trusts no one.
    others = ServeProcess(BASE + ["--trusted-proxy", "10.0.0.0/8"])
    nobody = ServeProcess(BASE)
    try:
        for proc in (others, nobody):
            assert await handshake(proc.ws_url, FORWARDED) == 403
            own_host = {**FORWARDED, "Origin": f"http://127.0.0.1:{proc.port}"}
            assert await handshake(proc.ws_url, own_host) == 101
            status, _, _ = await Api(proc.base).call("GET", "/api/stats", headers={"X-Forwarded-For": "203.0.113.9"})
            assert status == 200
    finally:
        for proc in (others, nobody):
            assert await proc.stopped() == 0, proc.output()
    for proc in (others, nobody):
        log = proc.stderr()
        assert "203.0.113" not in log, proc.output()
        refused = [line for line in log.splitlines() if "refused origin:" in line]
        assert len(refused) == 1, proc.output()
        assert (f"reason=not_same_host origin='https://app.example.com' host='127.0.0.1:{proc.port}'"
                in refused[0]), proc.output()
        assert "client='127.0.0.1'" in refused[0]
        assert [line for line in access_lines(proc, 101) if "(127.0.0.1)" in line], proc.output()


def test_a_bad_trusted_proxy_is_refused_naming_the_option():
    result = run_cli(BASE + ["--trusted-proxy", "10.0.0.0/33"])
    assert result.returncode == 2
    assert result.stderr.startswith("tornado-rt: error: --trusted-proxy: ") and "10.0.0.0/33" in result.stderr
    with pytest.raises(ValueError, match="trusted_proxies"):
        Settings(trusted_proxies=["proxy.example"])


# --- the rules without sockets ----------------------------------------------------------------------

NETS = parse_networks(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize("peer, forwarded_for, expected", [
    ("127.0.0.1", "203.0.113.7", "203.0.113.7"),
    ("127.0.0.1", "198.51.100.1, 203.0.113.7", "203.0.113.7"),  # the client may prepend anything
    ("127.0.0.1", "203.0.113.7, 10.1.2.3", "203.0.113.7"),  # through two trusted proxies
    ("127.0.0.1", "10.1.2.3, 10.4.5.6", "10.1.2.3"),  # all trusted: the leftmost
    ("127.0.0.1", None, "127.0.0.1"),
    ("127.0.0.1", "not-an-ip", "127.0.0.1"),
    ("127.0.0.1", "203.0.113.7, garbage, 10.1.2.3", "10.1.2.3"),  # the walk stops at garbage
    ("127.0.0.1", "[2001:db8::1]:4711", "2001:db8::1"),
    ("127.0.0.1", "203.0.113.7:4711", "203.0.113.7"),
    ("::ffff:127.0.0.1", "203.0.113.7", "203.0.113.7"),  # IPv4-mapped peer
    ("fd00::5", "2001:db8::1", "2001:db8::1"),
    ("203.0.113.50", "198.51.100.1", "203.0.113.50"),  # untrusted peer: header ignored
    ("127.0.0.2", "198.51.100.1", "127.0.0.2"),  # a /32 is exactly one address
])
def test_client_address(peer, forwarded_for, expected):
    assert client_address(peer, forwarded_for, NETS) == expected


def request_from(peer, **headers):
    headers = {"Host": "127.0.0.1:8000", **headers}
    request = HTTPServerRequest(start_line=RequestStartLine("GET", "/ws/core/", "HTTP/1.1"), headers=HTTPHeaders(headers))
    request.remote_ip = peer
    return request


def test_apply_forwarded_only_from_trusted_peers():
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https",
               "X-Forwarded-Host": "app.example.com:8443", "Host": "127.0.0.1:8000"}
    trusted = request_from("10.9.9.9", **headers)
    apply_forwarded(trusted, ["10.0.0.0/8"])
    assert (trusted.remote_ip, trusted.protocol, trusted.host, trusted.host_name) == \
        ("203.0.113.7", "https", "app.example.com:8443", "app.example.com")
    assert trusted.headers["Host"] == "app.example.com:8443"
    for cidrs in (["10.0.0.0/8"], []):
        untrusted = request_from("203.0.113.50", **headers)
        apply_forwarded(untrusted, cidrs)
        assert (untrusted.remote_ip, untrusted.protocol, untrusted.host) == ("203.0.113.50", "http", "127.0.0.1:8000")
        assert untrusted.headers["Host"] == "127.0.0.1:8000"


@pytest.mark.parametrize("proto, host", [("gopher", "a b"), ("javascript", "evil.example/path"),
                                         ("", "evil.example\r\nX: y")])
def test_unusable_forwarded_values_are_ignored(proto, host):
    request = request_from("10.0.0.1", **{"X-Forwarded-Proto": proto, "X-Forwarded-Host": host})
    apply_forwarded(request, ["10.0.0.0/8"])
    assert (request.protocol, request.host) == ("http", "127.0.0.1:8000")


def test_networks_accept_addresses_and_cidrs():
    assert parse_networks(["127.0.0.1", "10.0.0.0/8", "::1"]) == (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/33'")):
        parse_networks(["10.0.0.0/33"])


def test_a_trusted_proxy_is_not_held_to_the_per_address_cap():
    """Every client behind the proxy shares its address: the cap on unauthenticated connections
    (enforced at accept, before any header) would throttle all of them. Trusted peers are exempt;
    test_listener.py shows the same cap closing the second connection of an untrusted peer."""
    from test_listener import call, connect

    proc = ServeProcess(BASE + ["--header-timeout", "600", "--max-unauthenticated-per-address", "1",
                                "--trusted-proxy", "127.0.0.1"])
    held = []
    try:
        held = [connect(proc.port) for _ in range(3)]
        for sock in held:  # unauthenticated (/healthz needs no key) and all served
            assert call(sock, "GET", "/healthz")[0] == 200
        assert proc.stop() == 0, proc.output()
    finally:
        for sock in held:
            sock.close()
        proc.kill()
    assert "max_unauthenticated_per_address" not in proc.stderr(), proc.output()
