"""The one redaction helper (tornado_rt.redaction): what it hides, and that a running server's
logs never hold a token however the client spells the argument name."""
import json

import pytest

from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, clean_env, make_token
from tornado_rt.redaction import redact_secret, redact_uri, redact_url


@pytest.mark.parametrize("uri,expected", [
    ("/ws/core/?jwt_token=abc.def.ghi", "/ws/core/?jwt_token=[redacted]"),
    ("/ws/core/?a=1&jwt_token=abc&b=2", "/ws/core/?a=1&jwt_token=[redacted]&b=2"),
    ("/ws/core/?jwt%5Ftoken=abc", "/ws/core/?jwt%5Ftoken=[redacted]"),  # Tornado decodes the name
    ("/ws/core/?JWT_TOKEN=abc", "/ws/core/?JWT_TOKEN=[redacted]"),
    ("/ws/core/?jwt_token=abc;rest-of-it#frag", "/ws/core/?jwt_token=[redacted]"),  # one value for Tornado
    ("/api/x?a=1;token=abc&b=2", "/api/x?a=1;token=[redacted]&b=2"),  # ';' as a proxy may split it
    ("/api/x?api_key=k&key=k2&access_token=t&password=p&tokens=keep",
     "/api/x?api_key=[redacted]&key=[redacted]&access_token=[redacted]&password=[redacted]&tokens=keep"),
    ("jwt_token=abc&page=1", "jwt_token=[redacted]&page=1"),  # a bare query string
    ("/ws/core/", "/ws/core/"),
    ("/ws/core/?jwt_token", "/ws/core/?jwt_token"),  # no value, nothing to hide
    ("", ""),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_url_and_secret():
    assert redact_url("redis://:hunter2@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("rediss://app:hunter2@cache.internal:6380/2") == "rediss://app:***@cache.internal:6380/2"
    assert redact_url("unix:///run/redis.sock?db=1&password=hunter2") == "unix:///run/redis.sock?db=1&password=***"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://[::1") == "<unparsable URL>"
    assert redact_secret("Traceback: bad token abc (abc)", "abc") == "Traceback: bad token [redacted] ([redacted])"
    assert redact_secret("nothing to hide", None) == "nothing to hide"


@pytest.mark.gen_test(timeout=30)
async def test_a_percent_encoded_token_argument_never_reaches_the_logs():
    """``jwt%5Ftoken`` is ``jwt_token`` for the server (it authenticates with it), so the logs
    must hide it too."""
    proc = ServeProcess(["serve", "--port", "0", "--log-level", "debug"],
                        env=clean_env(TORNADO_RT_JWT_SECRET=SECRET, TORNADO_RT_API_KEYS=API_KEY))
    token = make_token(7)
    try:
        from tornado.websocket import websocket_connect
        conn = await websocket_connect(f"{proc.ws_url}?jwt%5Ftoken={token}")
        assert json.loads(await conn.read_message())["success"] is True  # the server read the token
        client = WsClient(conn, "user 7")
        await Api(proc.base).call("GET", f"/api/nope?api%5Fkey={API_KEY}&jwt%5Ftoken={token}")
        await Api(proc.base).barrier(client)
        conn.close()
    finally:
        assert await proc.stopped() == 0, proc.output()
    logs = proc.stderr() + proc.stdout()
    assert "jwt%5Ftoken=[redacted]" in logs and "/api/nope?api%5Fkey=[redacted]" in logs, logs
    for secret in (token, API_KEY, SECRET):
        assert secret not in logs
