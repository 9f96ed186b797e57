"""The data-plane HTTP/1.1 server: proxies' calls in, answers out, nothing else.

Why not aiohttp's server here (the admin listener does use aiohttp): measured on the target
machine, aiohttp's per-request machinery (request/response objects, header multidicts, a
handler task, the writer) cost about 4x a bare protocol's 200 answer, more than the whole
authorize decision. This module is that bare protocol: `httptools` (llhttp, the parser
uvicorn uses) parses, a handler turns a `Call` into an `Answer` (http_messages.py), and
the answer goes out as one `write()`.

Handlers are coroutines. Hot-path handlers run *eagerly*: the coroutine is stepped right
here until it waits for Redis (a plain future), and resumed by that future's callback —
no task per request. A denial decided without Redis is written before this call returns.
Other handlers (settlement) run as ordinary tasks.

HTTP/1.1 details kept: keep-alive (and HTTP/1.0 close), pipelined requests answered in
order, chunked and Content-Length bodies (read up to `max_body`, the rest discarded),
`Expect: 100-continue`, an idle timeout, 400/413/414/431 for malformed input, and a drain
on shutdown that lets in-flight calls finish.

Defenses against slow or greedy clients (all settings, config.py): a request must arrive
whole within `request_deadline` of its first byte and may not pause longer than
`request_timeout` (408 and a close: trickling a byte every few seconds holds nothing);
at most `max_headers` headers and `max_header_bytes` of them (431 and a close); at most
`max_connections` open connections (below the open-file limit, fdlimit.py): when full,
the idle keep-alive connections go first, then those whose request began longest ago,
so a fresh request is still answered (shedding.py chooses which).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import httptools

from .http_messages import Answer, Call, Headers, Router, encode, error_answer
from .shedding import pick_victims, shed_count
from .stepping import step

log = logging.getLogger("sidecar.edge")

MAX_URL = 8192
MAX_PIPELINED = 64        # requests queued on one connection before we stop reading it


class EdgeServer:
    """Owns the listening socket(s) and the open connections; drains on close."""

    def __init__(self, router: Router, *, max_body: int, keepalive_timeout: float,
                 request_timeout: float = 10.0, request_deadline: float = 10.0,
                 max_headers: int = 100, max_header_bytes: int = 32768,
                 max_connections: int = 10_000):
        self.router = router
        self.max_body = max_body
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.request_deadline = request_deadline
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.max_connections = max_connections
        self.shed_total = 0
        self._shed_logged = 0.0
        self.connections: set[_Connection] = set()
        self.inflight = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._idle = asyncio.Event()

    async def listen(self, host: str, port: int, *, reuse_port: bool = True) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), host, port,
                                          reuse_port=reuse_port, backlog=2048)
        self._servers.append(server)

    def request_done(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def shed(self) -> None:
        """Over max_connections: close the slowest to make room (shedding.py)."""
        count = shed_count(len(self.connections), self.max_connections)
        victims = pick_victims(self.connections, count)
        for conn in victims:
            conn.shed()
        self.shed_total += len(victims)
        now = time.monotonic()
        if now - self._shed_logged > 10:
            self._shed_logged = now
            log.warning("connections full (%d): shed %d (%d so far)", self.max_connections,
                        len(victims), self.shed_total)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let in-flight calls finish (up to `timeout`), close the rest."""
        for server in self._servers:
            server.close()
        if self.inflight:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("shutdown: %d calls still in flight after %ss", self.inflight,
                            timeout)
        for conn in list(self.connections):
            conn.close_when_idle()
        for server in self._servers:
            await server.wait_closed()


class _Connection(asyncio.Protocol):
    """One client connection: parse, dispatch, answer in order."""

    def __init__(self, server: EdgeServer):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.queue: collections.deque[list] = collections.deque()   # [bytes|None, keep]
        self.closing = False
        self.paused = False
        self.last_active = 0.0
        self.request_start = 0.0   # when the request being received began
        self.in_message = False
        self.timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers = Headers()
        self.header_bytes = 0
        self.header_count = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.truncated = False
        self.too_large: tuple[int, str] | None = None

    # -- connection events -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else ""
        server = self.server
        server.connections.add(self)
        self.last_active = self.loop.time()
        self.timer = self.loop.call_later(server.keepalive_timeout, self._idle_check)
        if len(server.connections) > server.max_connections:
            server.shed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self.timer:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        try:
            self.parser.feed_data(data)
            if self.in_message and self.timer and self.timer.when() > self._due():
                # A request arrived in part: wake up by its (shorter) pause or deadline.
                self.timer.cancel()
                self.timer = self.loop.call_at(self._due(), self._idle_check)
        except httptools.HttpParserUpgrade:
            # The request itself was complete and is answered as any other; we just do
            # not switch protocols: close once its answer is out.
            self.close_when_idle()
        except httptools.HttpParserError as exc:
            status, code, message = 400, "bad_request", f"Malformed HTTP request: {exc}"
            if self.too_large:
                status, message = self.too_large
                code = "request_too_large"
            self._fail(status, code, message)

    def _due(self) -> float:
        """Loop time by which the connection must have moved on: a request begun must
        not pause past request_timeout nor last past request_deadline; between
        requests, keep-alive idles for keepalive_timeout."""
        server = self.server
        if self.in_message:
            return min(self.last_active + server.request_timeout,
                       self.request_start + server.request_deadline)
        return self.last_active + server.keepalive_timeout

    def _idle_check(self) -> None:
        if self.transport is None:
            return
        now, wait = self.loop.time(), 1.0      # answers pending: Redis bounds those
        if not self.queue:
            due = self._due()
            if now >= due:
                if self.in_message:   # too slow or stalled half-way
                    self._fail(408, "request_timeout", "The request did not arrive in time.")
                else:
                    self.transport.close()
                return
            wait = due - now
        self.timer = self.loop.call_later(max(wait, 0.05), self._idle_check)

    def shed(self) -> None:
        """Closed to make room (EdgeServer.shed): a request half-received gets a 503."""
        self.server.connections.discard(self)   # counted out now, not when it is gone
        if self.in_message:
            self._fail(503, "overloaded", "Too many connections; retry.")
        elif self.transport is not None:
            self.closing = True
            self.transport.close()

    # -- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset()
        self.in_message = True
        self.request_start = self.last_active   # the data_received that brought its start

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            self.too_large = (414, "URI too long.")
            raise httptools.HttpParserError("URI too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        self.header_count += 1
        server = self.server
        if self.header_bytes > server.max_header_bytes or \
                self.header_count > server.max_headers:
            self.too_large = (431, "Request headers too large.")
            raise httptools.HttpParserError("headers too large")
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "surrogateescape")
        # dict's own methods: Headers' case-folding overrides are Python calls, and the
        # key is lower-cased already (profile: ~0.4 µs a call).
        prior = dict.get(self.headers, key)
        if prior is not None:
            text = prior + "," + text
        dict.__setitem__(self.headers, key, text)

    def on_headers_complete(self) -> None:
        if dict.get(self.headers, "expect", "").lower() == "100-continue" and self.transport:
            # The client waits for the go-ahead before it sends the body.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        room = self.server.max_body - self.body_size
        if room <= 0:
            self.truncated = True
            return
        if len(body) > room:
            body = body[:room]
            self.truncated = True
        self.body.append(body)
        self.body_size += len(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        target = self.url.decode("utf-8", "surrogateescape")
        path = target.partition("?")[0]
        call = Call(self.parser.get_method().decode("latin-1"), target, path, self.headers,
                    b"".join(self.body), self.peer_ip, self.truncated)
        slot = [None, self.parser.should_keep_alive()]
        self.queue.append(slot)
        if len(self.queue) > MAX_PIPELINED and not self.paused and self.transport:
            self.transport.pause_reading()
            self.paused = True
        route = self.server.router(path)
        if route is None:
            self._finish(slot, error_answer(404, None, "not found"))
            return
        handler, eager = route
        self.server.inflight += 1
        if eager:
            step(handler(call), self._handled, slot)
        else:
            task = self.loop.create_task(handler(call))
            task.add_done_callback(lambda t: self._task_done(t, slot))

    # -- running handlers ----------------------------------------------------------------
    def _task_done(self, task: asyncio.Task, slot: list) -> None:
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("handler failed", exc_info=task.exception())
            self._handled(slot, error_answer(500, "internal_error", "Internal error."))
        else:
            self._handled(slot, task.result())

    def _handled(self, slot: list, answer: Answer) -> None:
        self.server.request_done()
        self._finish(slot, answer)

    def _finish(self, slot: list, answer: Answer) -> None:
        keep = slot[1] and not self.closing
        slot[0] = encode(answer, keep)
        slot[1] = keep
        queue, transport = self.queue, self.transport
        while queue and queue[0][0] is not None:
            data, keep = queue.popleft()
            if transport is None:
                continue
            transport.write(data)
            if not keep:
                transport.close()
                self.transport = transport = None
        if self.paused and len(queue) < MAX_PIPELINED // 4 and transport is not None:
            transport.resume_reading()
            self.paused = False
        if self.closing and not queue and transport is not None:
            transport.close()

    def _fail(self, status: int, code: str, message: str) -> None:
        """A request we cannot parse: answer it (after any queued answers) and close."""
        self.closing = True
        if self.transport is not None:
            self.transport.pause_reading()
        slot = [None, False]
        self.queue.append(slot)
        self._finish(slot, error_answer(status, code, message))

    def close_when_idle(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.pause_reading()
            if not self.queue:
                self.transport.close()
