"""The publish side of the Redis broker works per batch (issue 16, item 5c): an HTTP batch is
handed to the broker with ONE future (``RedisBroker.publish_batch``), and the publish script's
arguments are built once per batch for what repeats in it (a deadline's digits, a group's
argument, a message type's routing). Against a real ``redis-server`` and a real listening server:

* One batch mixing every way a publish ends (read back from this process's own inbox, routed to
  nobody, on the control stream, refused by Redis past its deadline, sent without bytes and sent
  again with them because another process registered the page meanwhile): its one future fails
  with the refusal only after every other publish completed, the refused one is never delivered,
  the others are delivered once and in order, the resent one reached the other process's inbox.
* ``publish()`` of one envelope still gets its own future, completed independently of a batch.
* With the reader down, ``publish_batch`` raises ``BrokerUnavailable`` and queues nothing.
* Without sockets: the arguments built per batch are byte for byte what building them one
  envelope at a time gives; a batch's future completes once, after the last of its publishes,
  with the first error; a cancelled batch sends nothing more.

Non-delivery is proved with a marker that must be the next message received.
"""
import asyncio
from types import SimpleNamespace

import pytest

from redis_fixtures import marker_message, redis_server, require_redis_package  # noqa: F401
from test_redis import InProcess
from test_redis_streams import connect, rows_created  # noqa: F401
from tornado_rt import BrokerUnavailable
from tornado_rt.envelope import MESSAGE, Envelope, message_envelope
from tornado_rt.redis_broker import (LEAN_GROUPS, REGISTER_SCRIPT, RedisBroker, _Batch, _bulk, _Pending,
                                     encode_envelope, pack_envelopes, route_of)


# --- without sockets ----------------------------------------------------------------------------------

def _one_at_a_time(batch, offset, registry, hints, origin, lean, key_prefix):
    """The arguments built one envelope at a time, every part formatted, then grouped into the
    script's runs: consecutive envelopes with the same deadline sent the same way (with their
    bytes: three arguments each, count > 0; without: count < 0, the first one's sequence number,
    then one argument each, the group as its summary key's name ``<key_prefix>r:<group>``, as long
    as the sequence numbers are consecutive) after the run's deadline and count."""
    runs, items, groups, omitted = [], [], [], 0  # runs: [deadline ms, bare, [argument bytes], next seq]
    for seq, payload, entry in batch:
        ms = int(entry.deadline * 1000 + offset)
        group, route = route_of(entry.envelope, registry)
        bare = bool(route and lean and group in hints)
        groups.append(group if route else None)
        if bare:
            omitted += 1
            items.append((seq, payload, entry))
            if not runs or runs[-1][0] != ms or not runs[-1][1] or runs[-1][3] != seq:
                runs.append([ms, True, [_bulk(b"%d" % seq)], None])
            runs[-1][2].append(_bulk(f"{key_prefix}r:{group}".encode()))
            runs[-1][3] = seq + 1
            continue
        if payload is None:
            payload = encode_envelope(entry.envelope, origin, seq)
        items.append((seq, payload, entry))
        args = [_bulk(payload), _bulk(group.encode()), _bulk(b"%d" % seq) if route else b"$1\r\n0\r\n"]
        if not runs or runs[-1][0] != ms or runs[-1][1]:
            runs.append([ms, False, [], None])
        runs[-1][2].append(b"".join(args))
    parts, count = [], 0
    for ms, bare, envelopes, _ in runs:
        n = len(envelopes) - 1 if bare else len(envelopes)  # a lean run: the first seq, then n
        parts.append(_bulk(b"%d" % ms))
        parts.append(_bulk(b"%d" % (-n if bare else n)))
        parts += envelopes
        count += 2 + len(envelopes) if bare else 2 + 3 * n
    return b"".join(parts), items, groups, omitted, count


class _Types:
    """A registry's message_type(): plain page types, one with a side effect, unknown ones None."""

    def __init__(self):
        self.asked = []

    def message_type(self, name):
        self.asked.append(name)
        if name == "with_effect":
            return SimpleNamespace(effect=lambda *a: None)
        if name == "plain":
            return SimpleNamespace(effect=None)
        return None


def _page(kind, group, text="{}"):
    return Envelope(MESSAGE, type=kind, data=text, audience=["page", group])


def test_arguments_built_per_batch_are_byte_for_byte_those_built_one_at_a_time():
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        envelopes = [
            _page("plain", "table-1", '{"a":1}'),  # lean group: no bytes
            _page("plain", "table-2", '{"b":"é"}'),  # not lean: bytes
            _page("with_effect", "table-1"),  # a page with a side effect: control stream, its bytes
            Envelope(MESSAGE, type="plain", data="{}", audience=["users", [1, 2]]),  # not a page
            Envelope("disconnect", user_ids=[3]),  # not a message
            _page("unknown", "table-1"),  # a type the registry does not know: plain
            _page("plain", "table-3"),
            _page("plain", "table-1"),
            _page("plain", "table-3"),  # continues the lean run before: consecutive seq
            _page("plain", "table-1"),  # same deadline, a seq that does not follow: a new lean run
            _page("plain", "table-1"),
        ]
        # deadlines: equal runs (one batch), a later one, back to an equal one; a payload already
        # encoded (a resend) is sent as it is
        deadlines = [100.0, 100.0, 100.0004, 100.0004, 101.25, 101.25, 100.0, 7.0, 7.0, 7.0, 7.0]
        # the digits of the sequence numbers change
        seqs = [9, 10, 99, 100, 999, 1000, 99999, 100000, 100001, 100003, 100004]
        batch = []
        for i, (envelope, deadline) in enumerate(zip(envelopes, deadlines)):
            payload = b"already encoded" if i == 6 else None
            batch.append((seqs[i], payload, _Pending(future, deadline, envelope)))
        for registry in (_Types(), None):
            for lean in (True, False):
                for offset in (0.0, 1234567.891, -99.5):
                    hints = {"table-1", "table-3"}
                    bulks = {}
                    parts = [b"head"]
                    items, groups, omitted, count = pack_envelopes(parts, batch, offset, registry, hints,
                                                                   "origin1", lean, bulks, "pfx:")
                    want = _one_at_a_time(batch, offset, registry, hints, "origin1", lean, "pfx:")
                    assert (b"".join(parts), items, groups, omitted, count) == (b"head" + want[0], *want[1:])
                    if registry is not None and lean:
                        assert omitted == 7 and groups[0] == "table-1" and groups[2] is None
                        # lean runs: [9], [1000], [99999], [100000, 100001], [100003, 100004]
                        joined = b"".join(parts)
                        assert _bulk(b"-2") + _bulk(b"100000") + _bulk(b"pfx:r:table-1") + _bulk(b"pfx:r:table-3") in joined
                        assert joined.endswith(_bulk(b"-2") + _bulk(b"100003") + _bulk(b"pfx:r:table-1") * 2)
                    # the group arguments are kept for the next batch, and used from there
                    assert bulks == {g: (_bulk(g.encode()), _bulk(f"pfx:r:{g}".encode()))
                                     for g in ("table-1", "table-2", "table-3")}
                    again = [b"head"]
                    assert pack_envelopes(again, batch, offset, registry, hints, "origin1", lean, bulks,
                                          "pfx:") == (
                        items, groups, omitted, count)
                    assert again == parts
        types = _Types()
        pack_envelopes([], batch, 0.0, types, set(), "o", True, {}, "pfx:")
        assert sorted(types.asked) == ["plain", "unknown", "with_effect"]  # once per type per batch
        # the kept group arguments are bounded
        full = {f"g{i}": (b"x", b"y") for i in range(LEAN_GROUPS)}
        pack_envelopes([], batch[:1], 0.0, _Types(), set(), "o", True, full, "pfx:")
        assert full == {"table-1": (_bulk(b"table-1"), _bulk(b"pfx:r:table-1"))}
    finally:
        loop.close()


def test_a_batch_future_completes_once_after_its_last_publish_with_the_first_error():
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        batch = _Batch(future, 3)
        batch.set_result(None)
        first = BrokerUnavailable("first")
        batch.set_exception(first)
        assert not batch.done() and not future.done()  # one still pending
        batch.set_exception(BrokerUnavailable("second"))
        assert batch.done() and future.exception() is first

        ok = loop.create_future()
        all_ok = _Batch(ok, 2)
        all_ok.set_result(None)
        assert not ok.done()
        all_ok.set_result(None)
        assert ok.done() and ok.result() is None

        cancelled = loop.create_future()
        dropped = _Batch(cancelled, 2)
        cancelled.cancel()
        assert dropped.done()  # the writer sends nothing more of it
        dropped.set_result(None)
        dropped.set_exception(BrokerUnavailable("late"))  # no InvalidStateError
        assert cancelled.cancelled()
    finally:
        loop.close()


def test_a_batch_expires_as_its_publishes_do_accepted_ones_succeed_the_others_fail():
    """_expire at the deadline: a publish Redis accepted succeeded, one it did not answer for
    failed; the batch's future fails once both are done, with nothing left pending."""
    loop = asyncio.new_event_loop()
    try:
        broker = RedisBroker("redis://127.0.0.1:1")  # never connected
        broker._loop = loop
        broker._wake = asyncio.Event()
        broker._subscribed = True
        broker._tasks = [None]
        envelopes = [_page("plain", "table-1"), _page("plain", "table-2")]
        future = broker.publish_batch(envelopes)
        (seq1, first), (seq2, second) = broker._pending.items()
        assert first.future is second.future and first.envelope is envelopes[0]
        assert first.deadline == second.deadline > loop.time()  # one deadline for the batch
        first.accepted = 5  # Redis accepted the first (on the control stream), not the second
        first.deadline = second.deadline = loop.time()  # the deadline has come
        broker._timer.cancel()
        broker._expire()
        assert future.done() and isinstance(future.exception(), BrokerUnavailable)
        assert "will not be applied later" in str(future.exception())
        assert not broker._pending
    finally:
        loop.close()


# --- against Redis ------------------------------------------------------------------------------------

def _ids(message):
    return message["rows"][0]["id"]


@pytest.mark.gen_test(timeout=30)
async def test_one_batch_with_every_outcome_completes_its_future_after_all_of_them(redis_server, connect):  # noqa: F811
    import redis.asyncio as aioredis

    require_redis_package()
    node = InProcess(redis_server.url, channel_prefix="batches-mixed")
    raw = aioredis.from_url(redis_server.url)
    try:
        server = node.server
        await server.start()
        broker = server.broker
        watcher = await connect(node, 1)
        await watcher.subscribe("table", table_id=10)
        registry = server.registry
        # table 11: nobody watches it; its first publish teaches the broker "no bytes needed"
        await server.submit([message_envelope(registry, rows_created(11, 0))])
        await server.submit([message_envelope(registry, rows_created(12, 0))])
        assert "table-12" in broker._lean
        # another process registers table 12 meanwhile: a publish sent without bytes must be
        # sent again, with them, from there on
        await raw.eval(REGISTER_SCRIPT, 0, "batches-mixed:", "elsewhere", "+", "table-12")

        messages = [
            (rows_created(10, 1), None),  # own inbox: read back as a reference
            (rows_created(11, 2), None),  # nobody: no bytes, completed on the reply
            ({"type": "user_data_updated", "user_data": {"n": 3}}, {"user_ids": [1]}),  # control stream
            (rows_created(10, 4), None),  # refused: past its deadline in Redis
            (rows_created(10, 5), None),
            (rows_created(12, 6), None),  # lean, stale: sent again with its bytes with the rest
            (rows_created(10, 7), None),
            (rows_created(11, 8), None),
        ]
        envelopes = [message_envelope(registry, message, to) for message, to in messages]
        resends = broker.resends
        before = list(broker._pending)
        done = server.submit_now(envelopes)
        batch = [broker._pending[seq] for seq in broker._pending if seq not in before]
        assert len(batch) == len(envelopes) and len({id(entry.future) for entry in batch}) == 1
        # The writer has not run yet (same loop turn): make Redis refuse the fourth alone. Its
        # deadline stays ahead in this process's clock (it is sent), but the clock offset given to
        # this one script call puts it 1 s in Redis's past; the others' deadlines are far ahead.
        now = asyncio.get_running_loop().time()
        for i, entry in enumerate(batch):
            entry.deadline = now + (0.5 if i == 3 else 3600.0)
        broker._offset -= 1500.0
        with pytest.raises(BrokerUnavailable) as refused:
            await done
        assert "after its deadline" in str(refused.value)
        assert broker.resends == resends + 1
        assert not [seq for seq in broker._pending if seq not in before]  # every one completed
        # delivered here: 1, 5, 7 on table 10 (never 4), in order, then the marker; and 3
        got = [await watcher.recv() for _ in range(4)]
        assert [m for m in got if m["type"] == "user_data_updated"] == [messages[2][0]]
        assert [_ids(m) for m in got if m["type"] == "rows_created"] == [1, 5, 7]
        marker = marker_message()
        await server.publish_async(marker, {"user_ids": [1]})
        assert await watcher.recv() == marker
        # the resent one reached the other process's inbox with its bytes, once
        inbox = await raw.xrange("batches-mixed:inbox:elsewhere")
        sent = [value for _, fields in inbox for name, value in fields.items() if name.startswith(b"m")
                or name == b"e"]
        assert len(sent) == 1 and b'"id":6' in sent[0]
    finally:
        await raw.aclose()
        await node.stop()


@pytest.mark.gen_test(timeout=30)
async def test_a_single_publish_keeps_its_own_future_beside_a_batch(redis_server, connect):  # noqa: F811
    require_redis_package()
    node = InProcess(redis_server.url, channel_prefix="batches-single")
    try:
        server = node.server
        await server.start()
        broker = server.broker
        watcher = await connect(node, 1)
        await watcher.subscribe("table", table_id=10)
        registry = server.registry
        single = broker.publish(message_envelope(registry, rows_created(10, 1)))
        batch = broker.publish_batch([message_envelope(registry, rows_created(10, i)) for i in (2, 3)])
        assert isinstance(single, asyncio.Future) and single is not batch
        # the single one's entry is completed by its own future, the batch's by the batch
        assert len({id(entry.future) for entry in broker._pending.values()}) == 2
        single.cancel()  # its caller gave up before it was sent: not sent, the batch goes on
        assert await batch is None
        assert _ids(await watcher.recv()) == 2
        assert _ids(await watcher.recv()) == 3
        marker = marker_message()
        await server.publish_async(marker, {"user_ids": [1]})
        assert await watcher.recv() == marker
        assert await broker.publish_batch([]) is None
        assert await server.submit_now([message_envelope(registry, rows_created(10, 4))]) == 1  # one: publish()
        assert _ids(await watcher.recv()) == 4
    finally:
        await node.stop()


@pytest.mark.gen_test(timeout=30)
async def test_a_batch_is_refused_whole_while_the_reader_is_down(redis_server):  # noqa: F811
    require_redis_package()
    node = InProcess(redis_server.url, channel_prefix="batches-down")
    server = node.server
    registry = server.registry
    envelopes = [message_envelope(registry, rows_created(10, i)) for i in range(3)]
    broker = server.broker
    with pytest.raises(BrokerUnavailable) as early:
        broker.publish_batch(envelopes)
    assert "not started" in str(early.value)
    try:
        await server.start()
        published = server.stats()["messages_published"]
        await broker.close()
        with pytest.raises(BrokerUnavailable) as closed:
            server.submit_now(envelopes)
        assert "broker closed" in str(closed.value)
        assert not broker._pending and not broker._outbox
        # counted as publish() of each counts: the first one, refused
        assert server.stats()["messages_published"] == published + 1
    finally:
        await node.stop()
