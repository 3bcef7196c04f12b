"""The dashboard's web server: aiohttp on its own thread and event loop, beside the training.

Routes (all GET; the dashboard is read-only):

- ``/``: the page; ``/static/NAME``: its script, style and Chart.js, from a fixed list;
- ``/api/view``: the whole view as JSON (edge_server.dashboard.view);
- ``/events``: server-sent events: ``view`` once on connect, then ``rounds`` (new round rows
  and the last timeline) as rounds finish, ``fleet`` and ``run`` when they change, and a
  comment every 15 s so proxies keep the stream open.

On a loopback address anyone on the machine may look (as with Prometheus' exporters). On any
other address every route but ``/static`` needs the token printed at start, as
``?token=`` (the page passes it on to its requests) or ``Authorization: Bearer``; without it
the answer is 401. Streams are capped; the page's Content-Security-Policy allows nothing from
elsewhere, and the token never leaves in a Referer.

Nobody on the network can hurt the training through it: the server accepts connections
itself, before any byte is read or any token checked, and keeps at most
``MAX_CONNECTIONS`` open (``MAX_PER_ADDRESS`` from one address) -- the rest are closed as
they arrive and counted -- so its file descriptors are bounded whatever a flood does; a
connection that has not sent a whole request within ``HEADER_TIMEOUT_S`` is closed; out of
file descriptors, it waits instead of logging a traceback per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections import Counter

from aiohttp import web

from edge_server.connection_budget import ConnectionBudget
from edge_server.dashboard.assets import page, static_text
from edge_server.dashboard.feed import LiveFeed
from edge_server.dashboard.view import to_json
from toolkit.errors import UserError

log = logging.getLogger(__name__)

STATIC = {  # name -> content type: nothing else is served
    "chart.umd.min.js": "text/javascript",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
MAX_STREAMS = 32
MAX_CONNECTIONS = 64  # open at once, all addresses together: the dashboard's file-descriptor budget
MAX_PER_ADDRESS = 16
HEADER_TIMEOUT_S = 10.0  # a connection that has not sent a whole request by then is closed
IDLE_TIMEOUT_S = 15.0  # keep-alive between requests
ROUNDS_POLL_S = 0.5  # how often a stream looks for finished rounds (a length comparison)
FLEET_POLL_S = 2.0  # how often it rebuilds the fleet table to see whether it changed
KEEPALIVE_S = 15.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardServer:
    def __init__(self, feed: LiveFeed, host: str, port: int, token: str | None = None) -> None:
        self.feed, self.host = feed, host
        self.token = token if token is not None else (None if is_loopback(host) else secrets.token_urlsafe(24))
        self._requested_port = port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._streams: set[web.StreamResponse] = set()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._budget = ConnectionBudget(MAX_CONNECTIONS, MAX_PER_ADDRESS)
        self._answered: set[object] = set()  # transports that sent a whole request
        self.refused: Counter[str] = Counter()  # connections closed unread, by why
        self._page = page(
            "".join(f'<script src="static/{n}"></script>' for n in ("chart.umd.min.js", "dashboard.js")),
            '<link rel="stylesheet" href="static/dashboard.css">',
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen, or one clear error; the server runs on its own thread until :meth:`close`."""
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start())
            except BaseException as exc:  # reported to start(); the thread ends
                failure.append(exc)
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="dashboard", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise UserError(f"--dashboard {self.host}:{self._requested_port}: the web server did not start in 10 s")
        if failure:
            exc = failure[0]
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UserError(f"--dashboard {self.host}:{self._requested_port}: cannot listen ({reason})")

    async def _start(self) -> None:
        self._closing = asyncio.Event()
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/view", self._view)
        app.router.add_get("/events", self._events)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=IDLE_TIMEOUT_S)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self._requested_port), family=family, backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept(listener))

    async def _accept(self, listener: socket.socket) -> None:
        """Accept each connection and decide before reading a byte whether to keep it."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, address = await loop.sock_accept(listener)
            except OSError:  # out of file descriptors (EMFILE) or a connection reset while queued
                self.refused["accept failed"] += 1
                await asyncio.sleep(0.1)
                continue
            peer = str(address[0])
            if not self._budget.admit(peer):
                self.refused["too many connections"] += 1
                connection.close()
                continue
            try:
                transport, _ = await loop.connect_accepted_socket(lambda peer=peer: self._handler(peer), connection)
            except OSError:
                self._budget.release(peer)
                connection.close()
                continue
            loop.call_later(HEADER_TIMEOUT_S, self._expire, transport)

    def _handler(self, peer: str) -> asyncio.Protocol:
        """aiohttp's protocol for one connection, which gives its slot back when it closes."""

        def lost() -> None:
            self._budget.release(peer)
            self._answered.discard(counted.transport)

        counted = _Counted(self._runner.server(), lost)
        return counted

    def _expire(self, transport) -> None:
        if transport not in self._answered and not transport.is_closing():
            self.refused["no request in time"] += 1
            transport.abort()

    def close(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            return

        async def stop() -> None:
            if self._closing is not None:
                self._closing.set()
            if self._accepting is not None:
                self._accepting.cancel()
            if self._listener is not None:
                self._listener.close()
            if self._runner is not None:
                await self._runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        except Exception as exc:  # shutting down regardless
            log.warning("dashboard did not stop cleanly: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # requests ----------------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        self._answered.add(request.transport)  # a whole request came: the header deadline no longer applies
        if self.token and not request.path.startswith("/static/"):
            given = request.query.get("token", "")
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                given = header[len("Bearer ") :]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                raise web.HTTPUnauthorized(text="this dashboard needs the token printed when the server started\n")
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text=self._page, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(text=static_text(name), content_type=STATIC[name])

    async def _view(self, request: web.Request) -> web.Response:
        return web.Response(
            text=to_json(self.feed.view()), content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._streams) >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text=f"at most {MAX_STREAMS} dashboard pages may be open at once\n")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", **SECURITY_HEADERS}
        )
        await response.prepare(request)
        self._streams.add(response)
        try:
            await self._stream(response)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the page went away, or the server is stopping
        finally:
            self._streams.discard(response)
        return response

    async def _stream(self, response: web.StreamResponse) -> None:
        feed, closing = self.feed, self._closing
        view = feed.view()
        await _send(response, "view", view)
        sent_rounds = len(view["rounds"])
        last = {"fleet": to_json(view["fleet"]), "run": to_json(view["run"])}
        fleet_at = quiet_since = time.monotonic()
        while not closing.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(closing.wait(), ROUNDS_POLL_S)
            now, sent = time.monotonic(), False
            rows = feed.rows_since(sent_rounds)
            if rows:
                await _send(response, "rounds", {"rows": rows, "timeline": feed.timeline()})
                sent_rounds += len(rows)
                sent = True
            changed = {"run": to_json(feed.run_info())}
            if rows or now - fleet_at >= FLEET_POLL_S:
                changed["fleet"] = to_json(feed.fleet())
                fleet_at = now
            for event, text in changed.items():
                if text != last[event]:
                    await _send_text(response, event, text)
                    last[event], sent = text, True
            if sent:
                quiet_since = now
            elif now - quiet_since >= KEEPALIVE_S:
                await response.write(b": keepalive\n\n")
                quiet_since = now
        # the server is stopping: the last rounds and how the run ended, so the page need not guess
        rows = feed.rows_since(sent_rounds)
        if rows:
            await _send(response, "rounds", {"rows": rows, "timeline": feed.timeline()})
        await _send(response, "run", feed.run_info())


async def _send(response: web.StreamResponse, event: str, data: object) -> None:
    await _send_text(response, event, to_json(data))


async def _send_text(response: web.StreamResponse, event: str, text: str) -> None:
    await response.write(f"event: {event}\ndata: {text}\n\n".encode())


class _Counted(asyncio.Protocol):
    """aiohttp's request handler for one connection, and a callback when the connection ends."""

    def __init__(self, inner: asyncio.Protocol, on_lost) -> None:
        self.inner, self.on_lost, self.transport = inner, on_lost, None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.on_lost()
