"""Helpers of the hardening tests: a tornado-rt server on its own thread and IOLoop, the
process's resident memory, and the check that no unhandled exception was logged.

:class:`ServerThread` exists for the tests driven by ``hypothesis`` (fuzzing, the model-based
delivery test): hypothesis runs its examples synchronously and cannot run inside
pytest-tornado's ``gen_test`` loop, so the server lives on a dedicated thread with its own
asyncio/Tornado loop and the test talks to it over real sockets with a synchronous client
(``websockets.sync.client``), calling into the server's loop with :meth:`ServerThread.call`.
"""
import asyncio
import logging
import threading
from typing import Any, Callable, List, Tuple

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tornado_rt import RealtimeServer


def rss_kib() -> int:
    """Resident set size of this process (VmRSS of /proc/self/status), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


def logged_errors(records) -> List[logging.LogRecord]:
    """The records at ERROR or above that come from tornado-rt, Tornado or asyncio (an
    unhandled exception in a callback, a task or a handler is logged by one of them). Tornado's
    access log is left out: it logs every 5xx answer at ERROR, deliberate 503 refusals included."""
    return [r for r in records if r.levelno >= logging.ERROR and r.name != "tornado.access"
            and r.name.split(".")[0] in ("tornado_rt", "tornado", "asyncio")]


class ErrorLog(logging.Handler):
    """Collects every record at ERROR or above from any thread (attach to the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "ErrorLog":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().removeHandler(self)

    def errors(self) -> List[logging.LogRecord]:
        return logged_errors(self.records)


class ServerThread:
    """An asyncio/Tornado loop on a daemon thread, able to host tornado-rt servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tornado-rt-test-loop", daemon=True)
        self._thread.start()
        self._http = {}  # id(server) -> its HTTPServer

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
        """Run ``fn(*args)`` on the loop thread (awaiting it if it returns an awaitable) and
        return its result; exceptions are re-raised here."""
        async def run() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def serve(self, make_server: Callable[[], RealtimeServer]) -> Tuple[RealtimeServer, int]:
        """Build a server on the loop thread, start it and listen on a free port."""
        async def start() -> Tuple[RealtimeServer, int]:
            server = make_server()
            await server.start()
            sockets = bind_sockets(0, "127.0.0.1")
            http = HTTPServer(server.make_app())
            http.add_sockets(sockets)
            self._http[id(server)] = http
            return server, sockets[0].getsockname()[1]
        return self.call(start)

    def stop(self, server: RealtimeServer) -> None:
        """Close the server's connections and stop listening."""
        async def stop() -> None:
            await server.shutdown(timeout=2)
            http = self._http.pop(id(server))
            http.stop()
            await http.close_all_connections()
        self.call(stop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
