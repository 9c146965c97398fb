"""The publish script's arguments in runs and the registrations' summary keys (issue 16, item 5:
Redis CPU per publish). Against a real ``redis-server``, the scripts called as the servers call
them:

* Several runs in one call: lean pairs and full triples, a run past its deadline between live
  ones, a stale hint that stops the call; each envelope gets its code, the inboxes and the
  control stream hold exactly what was applied, in order.
* Registrations of an older version (the hash ``g:<group>`` only, no summary key ``r:<group>``)
  mixed with this version's: while such a process is alive every group is read from its hash
  (its inbox gets what it registered for, whether the group's summary key is missing or lacks
  it); once it left, the summary keys alone route.
* Registration, unregistration and the sweep keep each summary key in step with its hash.
"""
import time

import pytest
import redis as redis_sync

from redis_fixtures import redis_server, require_redis_package  # noqa: F401
from tornado_rt.redis_broker import (HELLO_SCRIPT, PUBLISH_SCRIPT, REGISTER_SCRIPT, REPLY_ELSEWHERE,
                                     REPLY_NOT_TRIED, REPLY_NOWHERE_LEAN, REPLY_OWN_LEAN, REPLY_REFUSED,
                                     REPLY_RESEND, SWEEP_SCRIPT, parse_refs, read_codes)

# The registration scripts of the version before the summary keys, verbatim: what a process that
# was not upgraded yet runs against the same Redis.
OLD_HELLO_SCRIPT = """
local prefix = ARGV[1]
local me = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local intact = redis.call('EXISTS', prefix .. 'alive:' .. me)
redis.call('SET', prefix .. 'alive:' .. me, now, 'PX', ARGV[3])
redis.call('SADD', prefix .. 'procs', me)
local since = redis.call('GET', prefix .. 'routing')
local created = 0
if not since then
  since = now + tonumber(ARGV[4])
  redis.call('SET', prefix .. 'routing', string.format('%.0f', since))
  created = 1
end
return {intact > 0 and 1 or 0, now, tonumber(since), created, redis.call('EXISTS', prefix .. 'inbox:' .. me)}
"""
OLD_REGISTER_SCRIPT = """
local prefix = ARGV[1]
local me = ARGV[2]
local groups = prefix .. 'groups:' .. me
for i = 3, #ARGV, 2 do
  local g = ARGV[i + 1]
  if ARGV[i] == '+' then
    redis.call('HSET', prefix .. 'g:' .. g, me, 1)
    redis.call('SADD', groups, g)
  else
    redis.call('HDEL', prefix .. 'g:' .. g, me)
    redis.call('SREM', groups, g)
  end
end
local since = redis.call('GET', prefix .. 'routing')
if not since then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(since) <= now then
  return 1
end
return 0
"""
OLD_SWEEP_SCRIPT = """
local prefix = ARGV[1]
local procs
if ARGV[2] ~= '' then
  procs = {ARGV[2]}
else
  procs = redis.call('SMEMBERS', prefix .. 'procs')
end
local removed = 0
for _, p in ipairs(procs) do
  if ARGV[2] ~= '' or redis.call('EXISTS', prefix .. 'alive:' .. p) == 0 then
    for _, g in ipairs(redis.call('SMEMBERS', prefix .. 'groups:' .. p)) do
      redis.call('HDEL', prefix .. 'g:' .. g, p)
    end
    redis.call('DEL', prefix .. 'groups:' .. p, prefix .. 'inbox:' .. p, prefix .. 'alive:' .. p)
    redis.call('HDEL', prefix .. 'itops', p)  -- the mirror of its inbox's last entry
    redis.call('SREM', prefix .. 'procs', p)
    removed = removed + 1
  end
end
return removed
"""

TTL_MS = 60_000


@pytest.fixture
def raw(redis_server):  # noqa: F811
    require_redis_package()
    client = redis_sync.Redis.from_url(redis_server.url)
    # an inbox entry repeats its field names (one "m" per envelope): keep XRANGE's flat pairs
    client.set_response_callback("XRANGE", lambda response, **options: [
        (entry_id, list(zip(fields[::2], fields[1::2]))) for entry_id, fields in response])
    yield client
    client.close()


def _redis_ms(raw):
    seconds, micros = raw.time()
    return seconds * 1000 + micros // 1000


def _publish_raw(raw, prefix, me, runs, history_size=0):
    """One call of the publish script: ``runs`` is a list of (deadline ms, lean, envelopes), an
    envelope (group, route) when lean, else (bytes, group, route), sent as the writer sends them
    (pack_envelopes: a lean run's routes are consecutive, sent as the first one, and its groups
    as their summary keys' names). Returns the reply as it is."""
    args = [1000, "0-0", history_size, TTL_MS, prefix, me]
    for deadline, lean, envelopes in runs:
        args += [deadline, -len(envelopes) if lean else len(envelopes)]
        if lean:
            first = int(envelopes[0][1])
            assert [int(route) for _, route in envelopes] == list(range(first, first + len(envelopes)))
            args += [first] + [f"{prefix}r:{group}" for group, _ in envelopes]
        else:
            for envelope in envelopes:
                args += list(envelope)
    return raw.eval(PUBLISH_SCRIPT, 1, prefix + "stream", *args)


def _publish(raw, prefix, me, runs):
    """:func:`_publish_raw`, its codes read (``read_codes``): [Redis time, last id, code, ...]."""
    reply = _publish_raw(raw, prefix, me, runs)
    return reply[:2] + read_codes(reply[2:])[0]


def _routing_on(raw, prefix):
    """Wait until the routing key's time (set by the first HELLO, grace 0) is not ahead of Redis."""
    deadline = time.monotonic() + 5
    while int(raw.get(prefix + "routing")) > _redis_ms(raw):
        assert time.monotonic() < deadline
        time.sleep(0.001)  # barrier-ok: bounded wait for Redis's clock to pass a millisecond


def _inbox_payloads(raw, prefix, proc):
    """What a process's inbox holds, in order: ("ref", <route>) or ("bytes", <envelope>)."""
    out = []
    for _, fields in raw.xrange(f"{prefix}inbox:{proc}"):
        for name, value in fields:
            if name == b"R":
                out += [("ref", b"%d" % seq) for seq in parse_refs(value)[0]]
            elif name == b"e" or name.startswith(b"m"):
                out.append(("bytes", value))
    return out


def test_several_runs_in_one_call_each_envelope_gets_its_code_and_only_what_was_applied_is_written(raw):
    prefix = "runs-one-call:"
    for proc in ("pubA", "pubB"):
        raw.eval(HELLO_SCRIPT, 0, prefix, proc, TTL_MS, 0)
    raw.eval(REGISTER_SCRIPT, 0, prefix, "pubA", "+", "table-1")
    raw.eval(REGISTER_SCRIPT, 0, prefix, "pubB", "+", "table-2")
    _routing_on(raw, prefix)
    live, past = _redis_ms(raw) + 60_000, 1
    # the control stream's first entry (a new stream's first envelope goes there whatever its route)
    assert _publish(raw, prefix, "pubA", [(live, False, [(b"e0", "", "0")])])[2] > 0
    reply = _publish(raw, prefix, "pubA", [
        (live, True, [("table-1", "11"), ("table-1", "12")]),  # own inbox only: references, no bytes
        (past, False, [(b"e13", "table-1", "13"), (b"e14", "table-2", "14")]),  # refused: deadline passed
        (live, False, [(b"e15", "", "0"),  # the control stream
                       (b"e16", "table-2", "16"),  # another process's inbox: its bytes
                       (b"e17", "table-1", "17")]),  # own inbox, sent with bytes it did not need
        (live, True, [("table-3", "18")]),  # nobody registered table 3: nothing written
        (live, True, [("table-2", "19"), ("table-1", "20")]),  # stale hint: pubB needs the bytes
        (live, False, [(b"e21", "table-1", "21")]),  # after the stop: not attempted
    ])
    n = reply[2 + 4]
    assert n > 0
    assert reply[2:] == [REPLY_OWN_LEAN, REPLY_OWN_LEAN, REPLY_REFUSED, REPLY_REFUSED, n, REPLY_ELSEWHERE,
                         REPLY_OWN_LEAN, REPLY_NOWHERE_LEAN, REPLY_RESEND, REPLY_NOT_TRIED, REPLY_NOT_TRIED]
    assert [dict(fields)[b"e"] for _, fields in raw.xrange(prefix + "stream")] == [b"e0", b"e15"]
    assert _inbox_payloads(raw, prefix, "pubA") == [("ref", b"11"), ("ref", b"12"), ("ref", b"17")]
    assert _inbox_payloads(raw, prefix, "pubB") == [("bytes", b"e16")]
    # the merged order: pubA's first entry (11, 12) before the control entry, 17 after it
    ids = [entry_id for entry_id, _ in raw.xrange(f"{prefix}inbox:pubA")]
    assert [int(i.split(b"-")[0]) for i in ids] == [n - 1, n]
    assert not raw.exists(f"{prefix}inbox:table-3")
    # sent again with its bytes, as the writer does: applied from there on, in order
    reply = _publish(raw, prefix, "pubA", [(live, False, [(b"e19", "table-2", "19"), (b"e20", "table-1", "20"),
                                                           (b"e21", "table-1", "21")])])
    assert reply[2:] == [REPLY_ELSEWHERE, REPLY_OWN_LEAN, REPLY_OWN_LEAN]
    assert _inbox_payloads(raw, prefix, "pubB") == [("bytes", b"e16"), ("bytes", b"e19")]
    assert _inbox_payloads(raw, prefix, "pubA")[3:] == [("ref", b"20"), ("ref", b"21")]


def test_the_reply_is_one_string_and_the_own_inbox_holds_runs_of_references_as_ranges(raw):
    prefix = "compact:"
    raw.eval(HELLO_SCRIPT, 0, prefix, "pubA", TTL_MS, 0)
    raw.eval(REGISTER_SCRIPT, 0, prefix, "pubA", "+", "table-1", "+", "table-5")
    _routing_on(raw, prefix)
    # table 5 keeps a history (as redis_history sets it up): its messages need their bytes
    raw.hset(prefix + "pos:table-5", mapping={"e": "ep", "o": 0})
    raw.set(prefix + "hists", 1)
    live, past = _redis_ms(raw) + 60_000, 1
    first = _publish_raw(raw, prefix, "pubA", [(live, False, [(b"e0", "", "0")])], history_size=10)
    assert first[3] == b"+" and int(first[2]) + 1 == int(first[1].split(b"-")[0])
    reply = _publish_raw(raw, prefix, "pubA", [
        (live, True, [("table-1", "20"), ("table-1", "21"), ("table-1", "22")]),
        (live, True, [("table-1", "25"), ("table-3", "26")]),  # same deadline, refs not following: a new run
        (live, False, [(b"e27", "table-1", "27")]),  # with its bytes (not needed): 26 was nobody's, a new range
        (live, True, [("table-1", "28"), ("table-1", "29")]),
        (past, True, [("table-1", "30")]),  # refused: no reference
        (live, False, [(b"c31", "", "0"),  # the control stream: the inbox entry before it ends
                       (b"e32", "table-5", "32"),  # a history position: its own token
                       (b"e33", "table-1", "33")]),
        (live, True, [("table-1", "34")]),
    ], history_size=10)
    n0 = int(reply[2])
    assert n0 == int(first[2]) + 1  # the control stream's last n before the call
    assert reply[3] == b"333343330+133"
    assert read_codes(reply[2:]) == ([-3, -3, -3, -3, -4, -3, -3, -3, 0, n0 + 1, -1, -3, -3], None)
    before, after = [dict(fields) for _, fields in raw.xrange(prefix + "inbox:pubA")]
    assert before[b"R"] == b"20:22;25:25;27:29;"
    assert after[b"R"] == b"32,ep,1;33:34;"
    assert parse_refs(before[b"R"]) == ([20, 21, 22, 25, 27, 28, 29], None)
    assert parse_refs(after[b"R"]) == ([32, 33, 34], [("ep", 1), None, None])
    # the entry counter c and the merged order: the first entry before the control entry, the
    # second after it
    assert (before[b"c"], after[b"c"]) == (b"1", b"2")
    ids = [entry_id for entry_id, _ in raw.xrange(prefix + "inbox:pubA")]
    assert [int(i.split(b"-")[0]) for i in ids] == [n0, n0 + 1]
    assert [dict(fields)[b"e"] for _, fields in raw.xrange(prefix + "stream")] == [b"e0", b"c31"]
    assert [(dict(fields)[b"q"], dict(fields)[b"e"]) for _, fields in raw.xrange(prefix + "hist:table-5")] == [
        (b"1", b"e32")]


def test_registrations_of_an_older_version_are_read_from_the_hash_while_it_is_alive(raw):
    prefix = "mixed-versions:"
    raw.eval(HELLO_SCRIPT, 0, prefix, "new1", TTL_MS, 0)
    raw.eval(OLD_HELLO_SCRIPT, 0, prefix, "old1", TTL_MS, 0)
    raw.eval(REGISTER_SCRIPT, 0, prefix, "new1", "+", "table-1")
    # the old process registers table 1 after the new one (its summary key lacks old1) and table 2
    # alone (no summary key at all)
    raw.eval(OLD_REGISTER_SCRIPT, 0, prefix, "old1", "+", "table-1", "+", "table-2")
    assert raw.get(prefix + "r:table-1") == b"new1" and not raw.exists(prefix + "r:table-2")
    _routing_on(raw, prefix)
    live = _redis_ms(raw) + 60_000
    assert _publish(raw, prefix, "", [(live, False, [(b"c0", "", "0")])])[2] > 0  # the control stream's first entry
    reply = _publish(raw, prefix, "", [(live, False, [(b"a1", "table-1", "1"), (b"a2", "table-2", "1"),
                                                       (b"a3", "table-3", "1")])])
    assert reply[2:] == [REPLY_ELSEWHERE, REPLY_ELSEWHERE, REPLY_NOWHERE_LEAN]
    assert _inbox_payloads(raw, prefix, "old1") == [("bytes", b"a1"), ("bytes", b"a2")]
    assert _inbox_payloads(raw, prefix, "new1") == [("bytes", b"a1")]

    # page messages sent without their bytes (their groups as summary keys' names) are read from
    # the hashes too: table 4, registered by new1 alone, gets a reference; table 2 (old1's) stops
    # the call for its bytes
    raw.eval(REGISTER_SCRIPT, 0, prefix, "new1", "+", "table-4")
    reply = _publish(raw, prefix, "new1", [(live, True, [("table-4", "7"), ("table-2", "8"), ("table-4", "9")])])
    assert reply[2:] == [REPLY_OWN_LEAN, REPLY_RESEND, REPLY_NOT_TRIED]
    assert _inbox_payloads(raw, prefix, "new1") == [("bytes", b"a1"), ("ref", b"7")]
    raw.eval(REGISTER_SCRIPT, 0, prefix, "new1", "-", "table-4")

    # a registration of this version rewrites a group's summary key from its hash, old1 included
    raw.eval(REGISTER_SCRIPT, 0, prefix, "new1", "+", "table-2")
    assert sorted(raw.get(prefix + "r:table-2").split()) == [b"new1", b"old1"]

    # old1 stops as its version does (its own sweep: the hashes and procs, not the summary keys)
    assert raw.eval(OLD_SWEEP_SCRIPT, 0, prefix, "old1") == 1
    assert raw.get(prefix + "r:table-1") == b"new1"
    reply = _publish(raw, prefix, "", [(live, False, [(b"b1", "table-1", "1"), (b"b2", "table-3", "1")])])
    assert reply[2:] == [REPLY_ELSEWHERE, REPLY_NOWHERE_LEAN]
    assert _inbox_payloads(raw, prefix, "new1") == [("bytes", b"a1"), ("ref", b"7"), ("bytes", b"b1")]
    assert not raw.exists(f"{prefix}inbox:old1")  # deleted by its sweep, nothing routed there since

    # with no older process alive, the summary keys alone route: a field written behind their back
    # (what only an older version does) is not read
    raw.hset(prefix + "g:table-3", "stray", 1)
    reply = _publish(raw, prefix, "new1", [(live, True, [("table-1", "5"), ("table-3", "6")])])
    assert reply[2:] == [REPLY_OWN_LEAN, REPLY_NOWHERE_LEAN]
    assert not raw.exists(f"{prefix}inbox:stray")


def test_register_unregister_and_sweep_keep_each_summary_key_in_step_with_its_hash(raw):
    prefix = "summary-keys:"

    def summary(group):
        value = raw.get(f"{prefix}r:{group}")
        hash_fields = sorted(raw.hkeys(f"{prefix}g:{group}"))
        assert (sorted(value.split()) if value is not None else []) == hash_fields
        return hash_fields

    raw.eval(HELLO_SCRIPT, 0, prefix, "p1", TTL_MS, 0)
    raw.eval(HELLO_SCRIPT, 0, prefix, "p2", 200, 0)  # p2's alive key expires soon
    raw.eval(REGISTER_SCRIPT, 0, prefix, "p1", "+", "table-1", "+", "table-2")
    raw.eval(REGISTER_SCRIPT, 0, prefix, "p2", "+", "table-1", "+", "table-3")
    assert summary("table-1") == [b"p1", b"p2"] and summary("table-2") == [b"p1"] and summary("table-3") == [b"p2"]
    raw.eval(REGISTER_SCRIPT, 0, prefix, "p1", "-", "table-2", "+", "table-4")
    assert summary("table-2") == [] and not raw.exists(f"{prefix}r:table-2") and summary("table-4") == [b"p1"]
    deadline = time.monotonic() + 10
    while raw.exists(f"{prefix}alive:p2"):  # poll for the expiry (the sweep removes expired processes)
        assert time.monotonic() < deadline
        time.sleep(0.02)  # barrier-ok: bounded poll for a key's TTL, nothing asserted on time
    assert raw.eval(SWEEP_SCRIPT, 0, prefix, "") == 1
    assert summary("table-1") == [b"p1"] and summary("table-3") == [] and not raw.exists(f"{prefix}r:table-3")
    assert not raw.sismember(prefix + "rprocs", "p2") and raw.sismember(prefix + "rprocs", "p1")
    assert raw.eval(SWEEP_SCRIPT, 0, prefix, "p1") == 1  # p1 stops
    assert [summary(g) for g in ("table-1", "table-4")] == [[], []]
    assert not raw.keys(f"{prefix}r:*")
