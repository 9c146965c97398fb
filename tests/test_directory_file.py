"""``--directory FILE``: the directory survives a SIGKILL, every change is written back
atomically, SIGHUP reloads it, and a bad file is refused at start (exit 2, with the position of
the error) without being touched. Real ``tornado-rt serve`` subprocesses."""
import asyncio
import json
import os
import signal
import time

import pytest

from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, run_cli
from tornado_rt.directory_store import DirectoryStoreError, FileDirectoryStore
from tornado_rt.policy import Directory

BASE = ["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY]
ROWS = {"type": "rows_created", "table_id": 10, "rows": [{"id": 1}], "metadata": {}, "before_row_id": None}


def read(path):
    with open(path) as fh:
        return json.load(fh)


def write_atomically(path, text):
    tmp = f"{path}.test-tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


async def wait_for(check, what, timeout=10.0):
    """Poll ``check()`` (async) until it is truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # barrier-ok: bounded polling for a signal handled by another process


@pytest.mark.gen_test(timeout=60)
async def test_the_directory_survives_sigkill_and_a_subscription_needs_no_new_put(tmp_path):
    path = tmp_path / "directory.json"
    snapshot = {"workspaces": {"1": [1, 2]}, "tables": {"10": 1},
                "public_views": {"pub": {"table_id": 10, "token": None}}}
    proc = ServeProcess(BASE + ["--directory", str(path)])
    try:
        assert read(path) == {"workspaces": {}, "tables": {}, "public_views": {}}  # created at start
        api = Api(proc.base)
        await api.ok("PUT", "/api/directory", snapshot)
        assert read(path) == snapshot  # written before the answer
        # Incremental changes and directory events are written back as well.
        await api.ok("PUT", "/api/directory/workspaces/1/members/3")
        await api.ok("PUT", "/api/directory/tables/11", {"workspace_id": 1})
        await api.publish({"message": {"type": "group_user_added", "id": 1, "workspace_id": 1,
                                       "workspace_user": {"user_id": 4}}})
        await api.ok("DELETE", "/api/directory/public_views/pub")
        expected = {"workspaces": {"1": [1, 2, 3, 4]}, "tables": {"10": 1, "11": 1}, "public_views": {}}
        assert await api.ok("GET", "/api/directory") == expected
        assert read(path) == expected
        assert [p.name for p in tmp_path.iterdir()] == ["directory.json"]  # no temporary file left
    finally:
        proc.kill()  # SIGKILL: no chance to save anything on the way out
    assert proc.proc.returncode == -signal.SIGKILL

    again = ServeProcess(BASE + ["--directory", str(path)])
    try:
        api = Api(again.base)
        assert await api.ok("GET", "/api/directory") == expected
        user4 = await WsClient.connect(again.ws_url, user_id=4)
        stranger = await WsClient.connect(again.ws_url, user_id=9)
        await user4.subscribe("table", table_id=10)  # accepted without any new PUT
        await stranger.send({"page": "table", "table_id": 10})  # not a member: refused
        await api.publish({"message": ROWS})
        assert await user4.recv() == ROWS
        await api.barrier(user4, stranger)
        user4.close()
        stranger.close()
    finally:
        assert await again.stopped() == 0, again.output()
    assert "directory loaded from" in again.stderr() and "1 workspaces, 2 tables, 0 public views" in again.stderr()


@pytest.mark.gen_test(timeout=60)
async def test_sighup_reloads_the_file_and_keeps_the_directory_when_the_file_is_bad(tmp_path):
    path = tmp_path / "directory.json"
    path.write_text(json.dumps({"workspaces": {"1": [1]}, "tables": {"10": 1}}))
    proc = ServeProcess(BASE + ["--directory", str(path)])
    try:
        api = Api(proc.base)
        changed = {"workspaces": {"2": [5]}, "tables": {"20": 2}, "public_views": {}}
        write_atomically(path, json.dumps(changed))
        proc.proc.send_signal(signal.SIGHUP)

        async def reloaded():
            return await api.ok("GET", "/api/directory") == changed
        await wait_for(reloaded, "the directory to be reloaded")
        client = await WsClient.connect(proc.ws_url, user_id=5)
        await client.subscribe("table", table_id=20)

        write_atomically(path, '{"workspaces": {"3": [6]},\n "tables": {"30": 3,}}')
        proc.proc.send_signal(signal.SIGHUP)

        async def refused():
            return "directory NOT reloaded" in proc.stderr()
        await wait_for(refused, "the reload to be refused")
        assert f"directory NOT reloaded, the current one is kept: {path}: line 2 column 21" in proc.stderr()
        assert await api.ok("GET", "/api/directory") == changed  # nothing half-loaded
        client.close()
    finally:
        assert await proc.stopped() == 0, proc.output()


CORRUPT = [
    ("truncated-json", '{"workspaces": {"1": [1, 2]},\n  "tables": {"10": 1', "line 2 column 21"),
    ("not-an-object", "[1, 2]", "line 1 column 1"),
    ("bad-member", '{"workspaces": {"1": [1, true]}}', "workspaces.1"),
    ("unknown-key", '{"workspaces": {}, "tabels": {}}', "tabels"),
    ("not-utf8", b'{"workspaces": {"\xff": []}}', "not UTF-8"),
]


@pytest.mark.parametrize("case", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_a_bad_directory_file_is_refused_at_start_and_left_untouched(tmp_path, case):
    _, content, position = case
    path = tmp_path / "directory.json"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    before = path.read_bytes()
    result = run_cli(BASE + ["--directory", str(path)])
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"tornado-rt: error: --directory: {path}: "), lines[0]
    assert position in lines[0], lines[0]
    assert "tornado-rt listening" not in result.stdout
    assert path.read_bytes() == before


def test_an_unwritable_directory_file_is_refused_at_start(tmp_path):
    path = tmp_path / "no-such-folder" / "directory.json"
    result = run_cli(BASE + ["--directory", str(path)])
    assert result.returncode == 2, result
    assert result.stderr.strip().startswith(f"tornado-rt: error: --directory: cannot write {path}: "), result.stderr


# --- the Python API (no sockets) -------------------------------------------------------------------------

def test_directory_saves_once_per_change_and_reload_does_not_save(tmp_path):
    store = FileDirectoryStore(str(tmp_path / "d.json"))
    directory = Directory(store=store)
    assert store.saves == 1 and read(store.path) == {"workspaces": {}, "tables": {}, "public_views": {}}
    directory.set_workspace(1, [10, 11, 12])  # calls add_member three times: one save
    directory.remove_workspace(1)  # removes members and tables: one save
    directory.load({"workspaces": {"2": [20]}, "tables": {"7": 2}})
    assert store.saves == 4
    assert read(store.path) == {"workspaces": {"2": [20]}, "tables": {"7": 2}, "public_views": {}}
    with pytest.raises(ValueError):
        directory.load({"workspaces": {"3": "nope"}})
    assert read(store.path) == {"workspaces": {"2": [20]}, "tables": {"7": 2}, "public_views": {}}

    other = Directory(store=FileDirectoryStore(store.path))  # a second process, say
    assert other.snapshot() == directory.snapshot()
    other.set_table(8, 2)
    saves = store.saves
    directory.reload()
    assert store.saves == saves
    assert directory.table_workspace(8) == 2

    (tmp_path / "bad.json").write_text('{"workspaces": nope}')
    with pytest.raises(DirectoryStoreError, match="line 1 column 16"):
        Directory(store=FileDirectoryStore(str(tmp_path / "bad.json")))


def test_a_failed_save_is_counted_and_the_directory_stays_current(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    store = FileDirectoryStore(str(folder / "d.json"))
    directory = Directory(store=store)
    (folder / "d.json").unlink()
    folder.rmdir()  # the next save cannot create its temporary file
    directory.add_member(1, 10)
    assert directory.workspace_members(1) == {10}
    assert directory.save_failures == 1 and "No such file or directory" in directory.last_save_error
    folder.mkdir()
    directory.add_member(1, 11)
    assert directory.save_failures == 1 and directory.last_save_error is None
    assert read(store.path)["workspaces"] == {"1": [10, 11]}
