"""``tornado-rt token | publish | listen`` end to end, as subprocesses against a real
``tornado-rt serve`` (same configuration sources as serve: flags, environment, config file)."""
import json
import os
import queue
import signal
import subprocess
import threading
import time

import jwt
import pytest

from standalone import API_KEY, SECRET, ServeProcess, WsClient, clean_env, command, run_cli
from tornado_rt import cli

SERVE = ["serve", "--dev", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY]
ROWS = {"type": "rows_created", "table_id": 1, "rows": [{"id": 1}], "metadata": {}, "before_row_id": None}


@pytest.fixture(scope="module")
def rt():
    proc = ServeProcess(SERVE)
    yield proc
    assert proc.stop() == 0, proc.output()


def env_for(proc, **extra):
    """The client tools find the server and the keys the way serve is configured: environment."""
    values = dict(TORNADO_RT_PORT=str(proc.port), TORNADO_RT_JWT_SECRET=SECRET, TORNADO_RT_API_KEYS=API_KEY)
    return clean_env(**{**values, **extra})


class Lines:
    """A subprocess's stream read line by line in a thread (so a test can wait for one)."""

    def __init__(self, stream):
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"ended before {text!r}: {''.join(self.seen)}"
            self.seen.append(line)
            if text in line:
                return line


# --- token --------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_token_from_a_config_file_is_accepted_by_the_server(rt, tmp_path):
    config = tmp_path / "rt.toml"
    config.write_text(f'jwt_secret = "{SECRET}"\n')
    result = run_cli(["token", "--user", "7", "--ttl", "15m", "--claim", "role=admin", "--claim", "n=3",
                      "--config", str(config)])
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["user_id"] == 7 and claims["role"] == "admin" and claims["n"] == 3
    assert claims["exp"] - claims["iat"] == 900 and claims["token_type"] == "access"
    client = await WsClient.connect(rt.ws_url, token=token, user_id=7)  # asserts success
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_token_signed_with_a_private_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "private.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = tmp_path / "public.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    proc = ServeProcess(["serve", "--port", "0", "--jwt-public-key", str(public), "--jwt-algorithm", "RS256",
                         "--api-key", API_KEY, "--jwt-audience", "rt"])
    try:
        env = clean_env(TORNADO_RT_JWT_ALGORITHMS="RS256", TORNADO_RT_JWT_AUDIENCE="rt")
        result = run_cli(["token", "--user", "3", "--jwt-private-key", str(private)], env=env)
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip()
        assert jwt.get_unverified_header(token)["alg"] == "RS256"
        client = await WsClient.connect(proc.ws_url, token=token, user_id=3)
        client.close()

        only_public = run_cli(["token", "--user", "3", "--jwt-public-key", str(public)], env=env)
        assert only_public.returncode == 2 and not only_public.stdout
        assert only_public.stderr.startswith("tornado-rt: error: --jwt-private-key: only a public key")
    finally:
        assert await proc.stopped() == 0


@pytest.mark.parametrize("args, option", [
    (["token", "--user", "7"], "--jwt-secret"),
    (["token", "--user", "7", "--jwt-secret", SECRET, "--ttl", "soon"], "--ttl"),
    (["token", "--user", "7", "--jwt-secret", SECRET, "--claim", "nokey"], "--claim"),
    (["token", "--jwt-secret", SECRET], "--user"),
    (["publish", '{"type": ', "--api-key", API_KEY], "MESSAGE"),
    (["publish", "{}", "--api-key", API_KEY, "--to", "[1"], "--to"),
    (["publish", '{"type": "x"}'], "--api-key"),
    (["listen", "--page", "table:table_id=1"], "--user"),
    (["listen", "--user", "1", "--jwt-secret", SECRET, "--page", ":x=1"], "--page"),
    (["listen", "--token", "t", "--count", "0"], "--count"),
])
def test_bad_usage_exits_2_naming_the_option(args, option, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("TORNADO_RT_")]:
        monkeypatch.delenv(name)
    try:  # in process: the same entry point as the console script, faster
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("tornado-rt: error: ") and option in err, err
    assert "Traceback" not in err and err.count("\n") == 1


# --- publish and listen -----------------------------------------------------------------------------------

def test_listen_prints_what_publish_sends(rt):
    env = env_for(rt)
    listen = subprocess.Popen(command("listen", "--user", "1", "--page", "table:table_id=1", "--count", "2"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)
    try:
        Lines(listen.stderr).wait_for('subscribed to table {"table_id": 1}')
        first = run_cli(["publish", json.dumps(ROWS)], env=env)
        assert first.returncode == 0, first.stderr
        answer = json.loads(first.stdout)
        assert answer["published"] == 1 and isinstance(answer["delivered"], int) and set(answer) == {"published", "delivered"}
        direct = {"type": "user_data_updated", "user_data": {"n": 2}}
        second = subprocess.run(command("publish", "--to", '{"user_ids": [1]}'), env=env, capture_output=True,
                                text=True, timeout=30, input=json.dumps(direct) + "\n")
        assert second.returncode == 0, second.stderr
        out, _ = listen.communicate(timeout=30)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
    assert listen.returncode == 0
    assert [json.loads(line) for line in out.splitlines()] == [ROWS, direct]


def test_publish_reports_a_refusal_with_the_field_and_exit_1(rt):
    result = run_cli(["publish", '{"type": "rows_created", "rows": []}'], env=env_for(rt))
    assert result.returncode == 1 and not result.stdout
    assert "HTTP 400" in result.stderr and "message.table_id" in result.stderr
    batch = run_cli(["publish", json.dumps([ROWS, {"type": "nope"}])], env=env_for(rt))
    assert batch.returncode == 1 and "[1].message.type" in batch.stderr, batch.stderr
    wrong_key = run_cli(["publish", json.dumps(ROWS)], env=env_for(rt, TORNADO_RT_API_KEYS="wrong"))
    assert wrong_key.returncode == 1 and "HTTP 401" in wrong_key.stderr


def test_listen_with_a_refused_token_exits_1_without_reconnecting(rt):
    result = run_cli(["listen", "--token", "not-a-jwt", "--page", "table:table_id=1"], env=env_for(rt))
    assert result.returncode == 1 and not result.stdout
    assert "refused the token" in result.stderr and "retrying" not in result.stderr


def test_listen_runs_until_interrupted_and_exits_0(rt):
    listen = subprocess.Popen(command("listen", "--user", "1", "--page", "table:table_id=1"), env=env_for(rt),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        Lines(listen.stderr).wait_for("subscribed to table")
        listen.send_signal(signal.SIGINT)
        out, _ = listen.communicate(timeout=30)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
    assert listen.returncode == 0 and out == ""


def test_listen_reconnects_after_a_server_restart():
    server = ServeProcess(SERVE)
    port = server.port
    env = env_for(server)
    listen = subprocess.Popen(command("listen", "--user", "1", "--page", "table:table_id=1", "--count", "2"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)
    try:
        notes = Lines(listen.stderr)
        notes.wait_for("subscribed to table")
        assert run_cli(["publish", json.dumps(ROWS)], env=env).returncode == 0
        assert server.stop() == 0
        server = ServeProcess(SERVE[:3] + [str(port)] + SERVE[4:])
        notes.wait_for("subscribed again to 1 page(s)")
        again = dict(ROWS, rows=[{"id": 2}])
        assert run_cli(["publish", json.dumps(again)], env=env).returncode == 0
        out, _ = listen.communicate(timeout=30)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
        assert server.stop() == 0
    assert listen.returncode == 0
    assert [json.loads(line) for line in out.splitlines()] == [ROWS, again]
