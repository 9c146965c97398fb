"""The read side of the Redis broker hands whole replies over (issue 16, item 5c): the references
of one inbox entry (this process's own page messages) and the envelopes of one XREAD reply reach
the router in publish order, complete, interleaved with the control stream exactly where they
were published; against a real ``redis-server`` and real ``tornado-rt serve`` subprocesses, plus
the parsing of references and the bookkeeping of failed publishes without sockets.

* One batch through A: page messages (A's own inbox, as references) between user messages and a
  message with a side effect (control stream): A's client and B's get them in publish order.
* Many subscribers on many pages of one process, batches through A and through B (references,
  and a field per envelope): every client gets exactly its pages' messages, in order.
* A stalled (SIGSTOP) while B publishes batches to A's pages and to A's user: once it runs again
  A merges what it reads into publish order, then its own publishes follow.

Non-delivery is always proved with a marker that must be the next message received.
"""
import asyncio
import gc
import logging

import pytest

from redis_fixtures import require_redis_package
from test_redis_streams import cluster, connect, marker_to_all, metrics, rows_created, stopped  # noqa: F401
from tornado_rt.redis_broker import parse_refs

TABLES = list(range(100, 160))
DIRECTORY = {"workspaces": {"1": [1, 2, 3]}, "tables": {str(t): 1 for t in [10, 11, 12, *TABLES]},
             "public_views": {}}


def user_message(i):
    return {"type": "notifications_fetch_required", "n": i}


def row_id(message):
    return message["rows"][0]["id"]


# --- without sockets ----------------------------------------------------------------------------------

def test_references_are_parsed_in_one_step_without_positions_and_one_by_one_with_them():
    assert parse_refs(b"") == ([], None)
    assert parse_refs(b"7,,;8,,;12,,;") == ([7, 8, 12], None)
    # text after the last ";" is not a reference (as the reader always treated it)
    assert parse_refs(b"7,,;8,,;junk") == ([7, 8], None)
    # with a history position on some: each reference's own position, None for the others
    assert parse_refs(b"7,ep,4;8,,;9,ep,5;") == ([7, 8, 9], [("ep", 4), None, ("ep", 5)])
    # ranges of consecutive references (what the publish script writes for a run without
    # positions), alone or among single ones
    assert parse_refs(b"7:9;") == ([7, 8, 9], None)
    assert parse_refs(b"7:7;9:10;12:12;") == ([7, 9, 10, 12], None)
    assert parse_refs(b"3,,;7:8;junk") == ([3, 7, 8], None)
    assert parse_refs(b"5:6;7,ep,4;8:9;10,,;") == ([5, 6, 7, 8, 9, 10], [None, None, ("ep", 4), None, None, None])
    # malformed anywhere: None (the caller delivers those before it one by one, and logs the rest)
    for blob in (b"7,,;x,,;9,,;", b"7,,,;", b"7,ep,4;8,ep;", b"7,ep,x;", b"7,,;8,,;9,x;", b"7:;", b"9:7;",
                 b"7;", b"0:2;", b"7:8:9;", b"1:2;x:3;", b"1,,;4:x;", b"1,e,2;5:4;"):
        assert parse_refs(blob) is None, blob


def test_a_malformed_reference_stops_the_entry_after_the_good_ones_and_duplicates_are_dropped(caplog):
    from tornado_rt.envelope import message_envelope
    from tornado_rt.redis_broker import RedisBroker, _Pending
    from tornado_rt.registry import Registry
    from tornado_rt.server import builtin_plugins

    registry = Registry(builtin_plugins())
    loop = asyncio.new_event_loop()
    try:
        broker = RedisBroker("redis://127.0.0.1:1")  # never connected
        broker._loop = loop
        delivered = []
        broker.attach(delivered.append)
        envelopes = {seq: message_envelope(registry, rows_created(10, seq), id=f"id-{1 if seq == 5 else seq}")
                     for seq in range(1, 7)}
        for seq, envelope in envelopes.items():
            broker._pending[seq] = _Pending(loop.create_future(), loop.time() + 100, envelope)
        futures = {seq: entry.future for seq, entry in broker._pending.items()}
        with caplog.at_level(logging.ERROR, "tornado_rt.redis"):
            broker._on_inbox([(b"5-1", [b"t", b"1000", b"c", b"1", b"R", b"1,,;2,,;bad,,;3,,;"])])
        assert [row_id(_rows(env)) for env in delivered] == [1, 2]
        assert futures[1].done() and futures[2].done() and not futures[3].done()
        assert "ignored the rest of a malformed entry" in caplog.text
        caplog.clear()
        # a malformed range: nothing of it or after it (the script writes ranges "<first>:<last>")
        with caplog.at_level(logging.ERROR, "tornado_rt.redis"):
            broker._on_inbox([(b"5-2", [b"t", b"1000", b"c", b"2", b"R", b"4:x;3:3;"])])
        assert [row_id(_rows(env)) for env in delivered] == [1, 2]
        assert "ignored the rest of a malformed entry" in caplog.text
        # 5 has the id of 1 (id-1): dropped as a duplicate, its publish still completes
        broker._on_inbox([(b"6-1", [b"t", b"1000", b"c", b"3", b"R", b"3:6;"])])
        assert [row_id(_rows(env)) for env in delivered] == [1, 2, 3, 4, 6]
        assert broker.duplicates == 1 and all(f.done() for f in futures.values())
        assert broker.inbox_envelopes == 2 + 4 and broker._pending == {}
    finally:
        loop.close()


def test_a_failed_publish_raises_when_awaited_and_is_never_reported_unretrieved_when_dropped():
    """Without a done callback per publish, _fail marks the exception retrieved: a caller that
    dropped the future gets no "exception was never retrieved" report, one that awaits it gets
    the error. (The control: an exception nobody retrieved is reported in this very loop.)"""
    from tornado_rt.broker import BrokerUnavailable
    from tornado_rt.envelope import message_envelope
    from tornado_rt.redis_broker import RedisBroker, _Pending
    from tornado_rt.registry import Registry
    from tornado_rt.server import builtin_plugins

    registry = Registry(builtin_plugins())
    loop = asyncio.new_event_loop()
    reported = []
    loop.set_exception_handler(lambda loop, context: reported.append(context.get("message")))
    try:
        broker = RedisBroker("redis://127.0.0.1:1")  # never connected
        broker._loop = loop
        for seq in (1, 2):
            broker._pending[seq] = _Pending(loop.create_future(), loop.time() + 100,
                                            message_envelope(registry, rows_created(10, seq)))
        awaited = broker._pending[1].future
        broker._fail(1, BrokerUnavailable("down"))
        broker._fail(2, BrokerUnavailable("down"))  # its future is dropped below
        with pytest.raises(BrokerUnavailable, match="down"):
            loop.run_until_complete(awaited)
        del awaited
        gc.collect()
        assert reported == []
        control = loop.create_future()
        control.set_exception(BrokerUnavailable("nobody looked"))
        del control
        gc.collect()
        assert reported == ["Future exception was never retrieved"]
    finally:
        loop.close()


def _rows(envelope):
    import ujson
    return ujson.loads(envelope.data)


# --- real processes -----------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_one_batch_of_page_messages_keeps_its_place_between_control_envelopes(connect):  # noqa: F811
    """One POST through A: runs of page messages (A's own inbox: references) between user
    messages and a table_deleted with its side effect (control stream). A's client (on the three
    pages and user 1) gets every one in publish order, the page_discard right after the
    table_deleted; B's client (on two of the pages) gets its part in the same order."""
    require_redis_package()
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a = await connect(a, 1)
        on_b = await connect(b, 2)
        for table in (10, 11, 12):
            await on_a.subscribe("table", table_id=table)
        for table in (10, 11):
            await on_b.subscribe("table", table_id=table)
        items, n = [], 0
        for run, table in enumerate((10, 11, 10, 11, 10)):
            for _ in range(40):
                items.append({"message": rows_created(table, n)})
                n += 1
            if run == 2:
                items.append({"message": {"type": "table_deleted", "database_id": 1, "table_id": 12},
                              "to": {"page": "table", "table_id": 12}})
            else:
                items.append({"message": user_message(run), "to": {"user_ids": [1]}})
        answer = await a.publish(items)
        assert answer["published"] == len(items)
        expected_a = []
        for item in items:
            expected_a.append(item["message"])
            if item["message"]["type"] == "table_deleted":
                expected_a.append({"type": "page_discard", "page": "table", "parameters": {"table_id": 12}})
        assert [await on_a.recv() for _ in expected_a] == expected_a
        expected_b = [item["message"] for item in items if item["message"]["type"] == "rows_created"]
        assert [await on_b.recv() for _ in expected_b] == expected_b
        await marker_to_all(b, on_a, on_b)
        seen = await metrics(a)
        assert seen["tornado_rt_redis_gaps_total"] == 0


@pytest.mark.gen_test(timeout=90)
async def test_many_subscribers_on_many_pages_of_one_process_get_exactly_their_pages_in_order(connect):  # noqa: F811
    """30 clients on A, three pages each (90 pages), batches interleaving every page: through A
    (references in A's inbox) and through B (A's inbox holds the envelopes). Each client gets its
    pages' messages in publish order and nothing else (the marker comes next)."""
    require_redis_package()
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        pages = {}
        clients = []
        for i in range(30):
            client = await connect(a, 1 + i % 3)
            mine = [TABLES[3 * i % len(TABLES)], TABLES[(3 * i + 1) % len(TABLES)],
                    TABLES[(3 * i + 2) % len(TABLES)]]
            for table in mine:
                await client.subscribe("table", table_id=table)
            pages[client] = set(mine)
            clients.append(client)
        watched = sorted({t for mine in pages.values() for t in mine})
        sent = []
        for via in (a, b, a):
            items = [{"message": rows_created(table, len(sent) + k)} for k, table in enumerate(watched * 2)]
            sent += [item["message"] for item in items]
            await via.publish(items)
        for client in clients:
            expected = [m for m in sent if m["table_id"] in pages[client]]
            assert [await client.recv() for _ in expected] == expected
        await marker_to_all(b, *clients)
        seen = await metrics(a)
        assert seen["tornado_rt_redis_gaps_total"] == 0


@pytest.mark.gen_test(timeout=90)
async def test_a_stall_in_the_middle_of_batches_is_read_back_in_publish_order(connect):  # noqa: F811
    """A batch through A, then A stopped (SIGSTOP) while B publishes batches mixing A's pages
    (A's inbox) and A's user (control stream), then a batch through A again: A's client gets
    them all in publish order, once, with no gap."""
    require_redis_package()
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a = await connect(a, 1)
        for table in (10, 11):
            await on_a.subscribe("table", table_id=table)
        sent = []

        def batch(size):
            items = []
            for k in range(size):
                n = len(sent)
                if k % 25 == 24:
                    message, to = user_message(n), {"user_ids": [1]}
                else:
                    message, to = rows_created(10 + k % 2, n), None
                sent.append(message)
                items.append({"message": message, **({"to": to} if to else {})})
            return items

        await a.publish(batch(100))
        with stopped(a.proc):
            for _ in range(5):
                await b.publish(batch(100))
        await a.publish(batch(100))
        assert [await on_a.recv() for _ in sent] == sent
        await marker_to_all(b, on_a)
        seen = await metrics(a)
        assert seen["tornado_rt_redis_gaps_total"] == 0
