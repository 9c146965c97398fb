"""The floor of the ``http-single`` scenario: a bare Tornado ``RequestHandler`` for
``POST /api/publish`` that only parses the JSON body (stdlib ``json``, as Tornado's own
``json_decode``) and answers 200 ``{"published": N}``: no API key check, no validation, no
publish. tornado-rt's ``POST /api/publish`` is compared against it (same client, same run)."""
from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from tornado.web import Application, RequestHandler  # noqa: E402


class Publish(RequestHandler):
    def post(self) -> None:
        body = json.loads(self.request.body)
        self.set_header("Content-Type", "application/json")
        self.finish(b'{"published":%d}' % (len(body) if isinstance(body, list) else 1))


async def main() -> None:
    args = common.cli(__doc__)
    common.prepare_process(args.lifetime)
    app = Application([(r"/api/publish", Publish)])
    app.listen(args.port, "127.0.0.1", backlog=1024)
    common.mark_ready(args.ready_file, args.port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
