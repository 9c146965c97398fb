"""One declaration of every setting: ``Settings(...)``, ``tornado-rt serve`` (options, environment,
TOML), ``--help`` and the README table all come from it and agree; the Python API and the command
line refuse the same values; settings that were Python-only are reachable (and enforced) from the
command line."""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tornado.websocket import websocket_connect

from redis_fixtures import redis_server, require_redis_package  # noqa: F401,F811 - a fixture
from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, clean_env, make_token, run_cli
from tornado_rt import FieldError, Settings, cli
from tornado_rt.settings import OPTIONS, SERVER_OPTIONS, SettingError, markdown_table, readme_block

README = Path(__file__).resolve().parent.parent / "README.md"
BASE = ["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY]


def squeeze(text):
    """``text`` without any whitespace (argparse wraps and hyphen-breaks help lines)."""
    return "".join(text.split())


# --- one table, derived everywhere ----------------------------------------------------------------

def test_readme_settings_table_is_generated_from_the_declaration():
    block = readme_block(README.read_text(encoding="utf-8"))
    assert block == markdown_table(), (
        "README.md's settings table differs from tornado_rt/settings.py: run "
        "'tornado-rt settings --write-readme README.md'")
    for option in OPTIONS:  # and every row is there, as the user types it
        assert f"`{option.flag}" in block, option.flag
        if option.env_var:
            assert f"`{option.env_var}`" in block, option.env_var


def test_serve_help_agrees_with_the_settings_table():
    script = Path(sys.executable).with_name("tornado-rt")
    command = [str(script)] if script.exists() else [shutil.which("tornado-rt")]
    result = subprocess.run([*command, "serve", "--help"], capture_output=True, text=True, timeout=30,
                            env=clean_env())
    assert result.returncode == 0, result.stderr
    text = result.stdout
    flat = squeeze(text)
    usage = text[:text.index("\noptions:")]
    offered = {word.strip("[]") for word in usage.split() if word.startswith("[--")}
    assert offered == {o.flag for o in OPTIONS}, offered ^ {o.flag for o in OPTIONS}
    for option in OPTIONS:
        assert squeeze(option.help) in flat, option.name
        if option.env_var:
            assert squeeze(f"env: {option.env_var}") in flat, option.env_var
        if option.default_text():
            assert squeeze(f"default: {option.default_text()}") in flat, option.name
    for key in cli.CONFIG_KEYS:  # the epilog lists every TOML key
        assert key in text.split("The names:", 1)[1], key


def test_settings_command_prints_the_table_and_rewrites_a_stale_readme(tmp_path):
    printed = run_cli(["settings", "--markdown"])
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == markdown_table()
    readme = tmp_path / "README.md"
    begin = README.read_text(encoding="utf-8").split("\n")
    marker_begin = next(line for line in begin if line.startswith("<!-- settings-table:begin"))
    readme.write_text(f"# Title\n\nbefore\n\n{marker_begin}\n| stale | row |\n<!-- settings-table:end -->\n\nafter\n")
    rewritten = run_cli(["settings", "--write-readme", str(readme)])
    assert rewritten.returncode == 0, rewritten.stderr
    text = readme.read_text(encoding="utf-8")
    assert "stale" not in text and text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert readme_block(text) == markdown_table()


def test_settings_keyword_api_and_defaults_are_unchanged():
    """The embedding API: keyword arguments, the documented defaults (written out here, not read
    from the declaration), ``replace``; list settings keep working as tuples."""
    assert dataclasses.asdict(Settings()) == {
        "jwt_secret": None, "jwt_public_key": None, "jwt_algorithms": ("HS256",), "jwt_user_claim": "user_id",
        "jwt_leeway": 0.0, "jwt_audience": None, "jwt_issuer": None, "allow_anonymous": True,
        "max_token_length": 8192, "path_prefix": "/ws/core/", "allowed_origins": None, "error_frames": False,
        "trusted_proxies": (),
        "max_message_size": 65536, "max_subscriptions": 1000, "max_incoming_rate": 50.0,
        "max_incoming_burst": 200, "max_connections": 0, "max_connections_per_user": 0,
        "max_outgoing_buffer": 8 * 1024 * 1024, "max_total_outgoing_buffer": None, "ping_interval": 25.0, "ping_timeout": 20.0,
        "history_size": 100, "history_ttl": 300.0, "presence_ttl": 30.0,
        "header_timeout": 10.0, "idle_timeout": 60.0, "body_timeout": 60.0, "max_unauthenticated_per_address": 0,
        "dedup_window": 300.0, "dedup_max_ids": 100_000,
    }
    s = Settings("secret", jwt_algorithms=["HS512", "hs256"], allowed_origins=["https://a.example"],
                 ping_interval=10, ping_timeout=5)
    assert s.jwt_secret == "secret" and s.jwt_algorithms == ("HS512", "HS256")
    assert s.allowed_origins == ["https://a.example"] and s.ping_interval == 10.0
    assert s.replace(max_subscriptions=5).max_subscriptions == 5 and s.max_subscriptions == 1000
    assert Settings(jwt_secret=" spaces are part of a secret ").jwt_secret == " spaces are part of a secret "
    assert [o.name for o in SERVER_OPTIONS] == [f.name for f in dataclasses.fields(Settings)]


# (setting, a value Python refuses, the same value on the command line)
SAME_REFUSALS = [
    ("max_message_size", 0, ["--max-message-size", "0"]),
    ("max_token_length", 0, ["--max-token-length", "0"]),
    ("max_incoming_burst", 0, ["--max-incoming-burst", "0"]),
    ("max_connections", -1, ["--max-connections=-1"]),
    ("max_incoming_rate", -1.0, ["--max-incoming-rate=-1"]),
    ("jwt_leeway", float("inf"), ["--jwt-leeway", "inf"]),
    ("path_prefix", "ws", ["--path-prefix", "ws"]),
    ("jwt_algorithms", ("none",), ["--jwt-algorithm", "none"]),
    ("allowed_origins", ["app.example.com"], ["--allowed-origin", "app.example.com"]),
    ("allow_anonymous", "no", None),  # a string is not a boolean in Python (the CLI flag takes none)
]


@pytest.mark.parametrize("name,value,argv", SAME_REFUSALS, ids=[c[0] for c in SAME_REFUSALS])
def test_python_and_command_line_refuse_the_same_values(name, value, argv):
    with pytest.raises(SettingError) as refused:
        Settings(**{name: value})
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, FieldError)
    assert refused.value.field == name and str(refused.value).startswith(name)
    if argv is None:
        return
    with pytest.raises(cli.ConfigError) as cli_refused:
        cli.resolve(cli.build_parser().parse_args(["serve", "--jwt-secret", "s", "--api-key", "k", *argv]), {})
    option = next(o for o in OPTIONS if o.name == name)
    assert cli_refused.value.field == option.flag and str(cli_refused.value).startswith(option.flag)
    assert isinstance(cli_refused.value, FieldError)


def test_cross_setting_check_is_refused_alike():
    with pytest.raises(SettingError) as refused:
        Settings(ping_interval=5, ping_timeout=6)
    assert refused.value.field == "ping_timeout"
    with pytest.raises(cli.ConfigError) as cli_refused:
        cli.resolve(cli.build_parser().parse_args(["serve", "--jwt-secret", "s", "--api-key", "k"]),
                    {"TORNADO_RT_PING_INTERVAL": "5", "TORNADO_RT_PING_TIMEOUT": "6"})
    assert str(cli_refused.value).startswith("TORNADO_RT_PING_TIMEOUT (--ping-timeout): ping_timeout cannot")


def test_python_only_settings_are_reachable_from_flag_env_and_toml(tmp_path):
    def resolve(argv, env=None):
        return cli.resolve(cli.build_parser().parse_args(["serve", "--jwt-secret", "s", "--api-key", "k", *argv]),
                           env or {})

    toml = tmp_path / "rt.toml"
    toml.write_text('max_token_length = 300\nredis_channel_prefix = "from-file"\n')
    from_file = resolve(["--config", str(toml)])
    assert cli.settings(from_file).max_token_length == 300 and from_file.redis_channel_prefix == "from-file"
    from_env = resolve(["--config", str(toml)], {"TORNADO_RT_MAX_TOKEN_LENGTH": "400",
                                                 "TORNADO_RT_REDIS_CHANNEL_PREFIX": "from-env"})
    assert cli.settings(from_env).max_token_length == 400 and from_env.redis_channel_prefix == "from-env"
    from_flag = resolve(["--config", str(toml), "--max-token-length", "500", "--redis-channel-prefix", "flag"],
                        {"TORNADO_RT_MAX_TOKEN_LENGTH": "400"})
    assert cli.settings(from_flag).max_token_length == 500 and from_flag.redis_channel_prefix == "flag"
    assert from_flag.sources["max_token_length"] == "--max-token-length"
    # and the default one, as before
    assert resolve([]).redis_channel_prefix == "tornado-rt"


# --- on a running server --------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_max_token_length_from_the_command_line_is_enforced():
    token = make_token(1)
    short = ServeProcess(BASE + ["--max-token-length", str(len(token) - 1)])
    enough = ServeProcess(BASE, env=clean_env(TORNADO_RT_MAX_TOKEN_LENGTH=str(len(token))))
    try:
        refused = await websocket_connect(f"{short.ws_url}?jwt_token={token}")
        assert json.loads(await refused.read_message())["success"] is False
        assert await refused.read_message() is None and refused.close_code == 4001
        accepted = await WsClient.connect(enough.ws_url, token=token)  # asserts success
        accepted.conn.close()
    finally:
        assert await short.stopped() == 0, short.output()
        assert await enough.stopped() == 0, enough.output()


@pytest.mark.gen_test(timeout=90)
async def test_redis_channel_prefix_option_decides_which_servers_share_events(redis_server):  # noqa: F811
    """Two processes with the prefix ``blue`` form one server; a ``green`` one on the same Redis
    is another server: a publish to blue reaches blue's clients and not green's (the marker
    published through green itself comes first)."""
    require_redis_package()
    broker = ["--broker", redis_server.url]
    blue_a = ServeProcess(BASE + broker + ["--redis-channel-prefix", "blue"])
    blue_b = ServeProcess(BASE + broker, env=clean_env(TORNADO_RT_REDIS_CHANNEL_PREFIX="blue"))
    green = ServeProcess(BASE + broker + ["--redis-channel-prefix", "green"])
    try:
        on_blue = await WsClient.connect(blue_b.ws_url, name="client of blue b")
        on_green = await WsClient.connect(green.ws_url, name="client of green")
        message = {"type": "user_data_updated", "user_data": {"colour": "blue"}}
        # delivered: blue a's own connections only (none); blue b's client gets it through Redis
        assert await Api(blue_a.base).publish({"message": message, "to": {"all_users": True}}) == {"published": 1,
                                                                                                    "delivered": 0}
        assert await on_blue.recv() == message
        await Api(green.base).barrier(on_green)
        on_blue.conn.close()
        on_green.conn.close()
    finally:
        for proc in (blue_a, blue_b, green):
            assert await proc.stopped() == 0, proc.output()
