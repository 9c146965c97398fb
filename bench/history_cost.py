"""The CPU cost of the recovery extension's history, per published page message, in one process.

    python bench/history_cost.py [--messages 20000] [--subscribers 100] [--repeat 5]

It drives the real publish path of one process without sockets: ``message_envelope`` (validate +
serialize once) and ``Router.dispatch`` (history, framing, fan-out to every subscriber's queue)
for a ``rows_updated`` message to a table page with ``--subscribers`` subscribed sessions, and
reports the process CPU time per published message (best of ``--repeat`` runs) for:

* ``off``: ``history_size=0`` (the extension off);
* ``on, nobody opted in``: the default ``history_size=100``; no connection asked for positions, so
  the page keeps no history (the cost is one lookup);
* ``on, 1 positioned subscriber``: one of the subscribers connected with ``positions=1``: the
  message is recorded in the page's history and framed a second time with its position.

The writes to the sockets are not part of it (they are the same in every case: one frame per
subscriber); see ``bench/run.py --scenarios fanout`` for the end-to-end fan-out figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jwt  # noqa: E402

from tornado_rt import RealtimeServer, Settings  # noqa: E402
from tornado_rt.envelope import message_envelope  # noqa: E402
from tornado_rt.session import TEXT, Session  # noqa: E402

SECRET = "bench-secret-that-is-long-enough-for-hs256"


class Wire:
    """A transport that writes nothing (the queues are cleared by the benchmark)."""

    def flush(self) -> int:
        return 0

    def gone(self) -> bool:
        return False


def build(history_size: int, subscribers: int, positioned: int):
    server = RealtimeServer(Settings(jwt_secret=SECRET, history_size=history_size), load_entry_points=False)
    server.directory.set_workspace(1, range(1, subscribers + 1))
    server.directory.set_table(1, 1)
    server._loop = object()  # type: ignore[assignment]  # no IOLoop: nothing is scheduled
    server.hub.bind(lambda fn: None)
    sessions = []
    for user_id in range(1, subscribers + 1):
        session = Session(server.sessions, Wire())
        session.positions = user_id <= positioned
        token = jwt.encode({"user_id": user_id, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
        session.authenticate(token)
        session.receive_frame(TEXT, '{"page":"table","table_id":1}')
        sessions.append(session)
    return server, sessions


def message(seq: int) -> dict:
    return {"type": "rows_updated", "table_id": 1,
            "rows_before_update": [{"id": seq, "order": "1.00000000000000000000", "field_1": "before"}],
            "rows": [{"id": seq, "order": "1.00000000000000000000", "field_1": f"value {seq}"}],
            "metadata": {}, "updated_field_ids": [1]}


def run(history_size: int, subscribers: int, positioned: int, messages: int) -> float:
    server, sessions = build(history_size, subscribers, positioned)
    registry, dispatch = server.registry, server.router.dispatch
    for session in sessions:
        session.out.clear()
    server.hub._dirty.clear()
    started = time.process_time()
    for seq in range(messages):
        dispatch(message_envelope(registry, message(seq)))
        if seq % 64 == 63:  # what the flush does to the queues, cheaply
            for session in sessions:
                session.out.clear()
            server.hub._dirty.clear()
    return (time.process_time() - started) / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cases = [("off (history_size=0)", 0, 0), ("on, nobody opted in", 100, 0),
             ("on, 1 positioned subscriber", 100, 1)]
    print(f"CPU per published page message, {args.subscribers} subscribers, {args.messages} messages, "
          f"best of {args.repeat}")
    base = None
    for name, size, positioned in cases:
        best = min(run(size, args.subscribers, positioned, args.messages) for _ in range(args.repeat))
        base = best if base is None else base
        print(f"  {name:<32} {best * 1e6:8.2f} us   ({(best - base) * 1e6:+.2f} us vs off)")


if __name__ == "__main__":
    main()
