"""Auto-pipelined script calls: every call made in one event-loop tick goes out in one write.

Why not redis-py on the hot path: measured on the target machine, its per-call client work
(~100 us) dominated Redis's own ~10 us per script. Here a call costs one RESP encode (C,
`hiredis.pack_command`), a share of one `write()` and a share of one `hiredis.Reader`
parse. Replies come back in order on one connection, so a batch is a FIFO entry.

Failure policy lives with the caller (`authorize.py`): every call either returns the
script's reply or raises `RedisUnavailable` within `timeout` seconds. On a timeout the
connection is dropped (its replies could no longer be matched to calls) and the next
batch reconnects; Redis restarts and failovers heal the same way.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from ..runtime import metrics


class RedisUnavailable(Exception):
    """Redis did not answer in time, refused the connection, or answered with an error."""


@dataclass(frozen=True)
class RedisEndpoint:
    host: str | None = None
    port: int = 6379
    path: str | None = None          # unix socket
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> RedisEndpoint:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        db = int(query.get("db", [parts.path.lstrip("/") or 0])[0]) if parts.scheme != "unix" \
            else int(query.get("db", [0])[0])
        return cls(
            host=parts.hostname if parts.scheme != "unix" else None,
            port=parts.port or 6379,
            path=parts.path if parts.scheme == "unix" else None,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            db=db,
            tls=parts.scheme.startswith("rediss"),
        )


class _Batch:
    """One pipelined write: `size` replies to collect, one future for all of them."""

    __slots__ = ("future", "replies", "size", "timer", "sent_at")

    def __init__(self, future: asyncio.Future, size: int):
        self.future = future
        self.replies: list = []
        self.size = size
        self.timer: asyncio.TimerHandle | None = None
        self.sent_at = time.perf_counter()


class _RespProtocol(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[_RespProtocol, Exception | None], None]):
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[_Batch] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            batch = waiting[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.size:
                waiting.popleft()
                if batch.timer:
                    batch.timer.cancel()
                metrics.redis_round_trip(time.perf_counter() - batch.sent_at)
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        err = RedisUnavailable(f"connection lost: {exc}" if exc else "connection closed")
        while self.waiting:
            batch = self.waiting.popleft()
            if batch.timer:
                batch.timer.cancel()
            if not batch.future.done():
                batch.future.set_exception(err)
        self._on_lost(self, exc)


class Pipeline:
    """One Redis connection; commands queued in a tick are written together.

    `submit(cmd)` returns (future, index): the future resolves to the list of replies of
    its batch, the caller takes its own by index. One future per batch of up to
    `max_batch` calls, not per call: small batches let the first answers go out while
    Redis still runs the later scripts of the same write (measured: better than one big
    batch per tick, whose callers all waited for its last script). 16, not 8: half the
    writes to Redis and per-batch work (timer, future, metrics) for the same overlap;
    measured -7% sidecar CPU per call at c64, p99 unchanged (OPTIMIZATIONS.md).
    """

    def __init__(self, endpoint: RedisEndpoint | Callable[[], Awaitable[RedisEndpoint]],
                 timeout: float, on_connect: list[tuple] | None = None, max_batch: int = 16):
        # A fixed endpoint, or a coroutine that finds one (Sentinel: the current master).
        self.endpoint = endpoint
        self.timeout = timeout
        self.max_batch = max_batch
        self._on_connect = on_connect or []   # commands sent first on every new connection
        self._proto: _RespProtocol | None = None
        self._connecting: asyncio.Task | None = None
        # This tick's calls: batches of at most `max_batch` commands, one future each.
        self._pending: list[tuple[list[bytes], asyncio.Future]] = []
        self._scheduled = False
        self._loop = asyncio.get_event_loop()
        self.closed = False

    # -- the hot path ------------------------------------------------------------------
    def submit(self, command: bytes) -> tuple[asyncio.Future, int]:
        pending = self._pending
        if not pending or len(pending[-1][0]) >= self.max_batch:
            pending.append(([], self._loop.create_future()))
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._flush_tick)
        commands, future = pending[-1]
        commands.append(command)
        if len(commands) >= self.max_batch:
            # A full batch leaves now, not at the end of the tick: Redis runs its scripts
            # while we parse the next calls, instead of the two taking turns.
            self._flush()
        return future, len(commands) - 1

    def _flush_tick(self) -> None:
        self._scheduled = False
        if self._pending:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        proto = self._proto
        if proto is None or proto.transport is None:
            self._loop.create_task(self._connect_then_send(pending))
            return
        self._send(proto, pending)

    def _send(self, proto: _RespProtocol,
              pending: list[tuple[list[bytes], asyncio.Future]]) -> None:
        """The batches given (one full batch, or the rest of a tick) in one write. Replies
        stream back in order and each
        batch resumes its callers as soon as its own replies are in: the sidecar answers
        the first calls while Redis still runs the scripts of the last ones."""
        batch = None
        for commands, future in pending:
            batch = _Batch(future, len(commands))
            proto.waiting.append(batch)
        # Replies come in order: if the last batch is in time, all are; one timer will do.
        batch.timer = self._loop.call_later(self.timeout, self._expire, proto, batch)
        proto.transport.write(b"".join(c for commands, _ in pending for c in commands))
        metrics.redis_batch(sum(len(commands) for commands, _ in pending))

    def _expire(self, proto: _RespProtocol, batch: _Batch) -> None:
        if not batch.future.done():
            metrics.redis_error("timeout")
            batch.future.set_exception(RedisUnavailable("timed out"))
        # Replies after this one can no longer be matched: start over on a new connection.
        if proto.transport is not None:
            proto.transport.abort()

    async def _connect_then_send(self, pending: list[tuple[list[bytes], asyncio.Future]]
                                 ) -> None:
        try:
            proto = await asyncio.wait_for(self._connected(), self.timeout)
        except (TimeoutError, OSError, RedisUnavailable) as exc:
            metrics.redis_error("connect")
            for _, future in pending:
                if not future.done():
                    future.set_exception(RedisUnavailable(f"cannot connect: {exc}"))
            return
        self._send(proto, pending)

    async def _connected(self) -> _RespProtocol:
        if self._proto is not None and self._proto.transport is not None:
            return self._proto
        if self._connecting is None or self._connecting.done():
            self._connecting = self._loop.create_task(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _RespProtocol:
        if self.closed:
            raise RedisUnavailable("pipeline closed")
        ep = self.endpoint if isinstance(self.endpoint, RedisEndpoint) else await self.endpoint()
        factory = lambda: _RespProtocol(self._lost)  # noqa: E731
        if ep.path:
            _, proto = await self._loop.create_unix_connection(factory, ep.path)
        else:
            ctx = ssl.create_default_context() if ep.tls else None
            _, proto = await self._loop.create_connection(factory, ep.host, ep.port, ssl=ctx)
        setup: list[tuple] = []
        if ep.password:
            setup.append(("AUTH", ep.username, ep.password) if ep.username
                         else ("AUTH", ep.password))
        if ep.db:
            setup.append(("SELECT", ep.db))
        setup.extend(self._on_connect)
        if setup:
            fut = self._loop.create_future()
            self._send(proto, [([hiredis.pack_command(c) for c in setup], fut)])
            for reply in await fut:
                if isinstance(reply, hiredis.ReplyError):
                    proto.transport.close()
                    raise RedisUnavailable(f"connection setup refused: {reply}")
        self._proto = proto
        metrics.redis_up(True)
        return proto

    def _lost(self, proto: _RespProtocol, exc: Exception | None) -> None:
        if self._proto is proto:
            self._proto = None
            if not self.closed:
                metrics.redis_up(False)

    async def call(self, *args) -> object:
        """One command outside the hot path (health checks, script loading)."""
        return (await self.calls([args]))[0]

    async def calls(self, commands: list[tuple]) -> list:
        """Commands outside the hot path, all in this tick's batches (the census's reads);
        their replies in order, or RedisUnavailable for an error reply."""
        sent = [self.submit(hiredis.pack_command(args)) for args in commands]
        batches: dict[int, list] = {}
        replies = []
        for future, index in sent:
            batch = batches.get(id(future))
            if batch is None:
                batch = batches[id(future)] = await future
            reply = batch[index]
            if isinstance(reply, hiredis.ReplyError):
                raise RedisUnavailable(str(reply))
            replies.append(reply)
        return replies

    async def close(self) -> None:
        self.closed = True
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

