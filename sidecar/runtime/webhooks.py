"""The webhook delivery worker (issue 12), one per `sidecar serve` (the process that runs
the admin listener), outside the hot path.

Several sidecars on one Redis share the work through the consumer group
names.EVENT_GROUP on every event stream: each entry is handed to one consumer, so on the
happy path each event is sent once. The worker:
- finds the streams to read in names.EVENTS_ACTIVE, and sweeps every tag's stream now
  and then (one sweeper per deployment at a time) for the entries scripts wrote without
  touching that set (Redis Cluster, see names.py);
- reads new entries (XREADGROUP >) and takes over those another consumer left pending
  for longer than the claim time (XAUTOCLAIM: a sidecar that died mid-delivery);
- POSTs each event to every endpoint that wants it (global ones from the settings and the
  organization's), signed (schema/webhooks.py); anything but a 2xx is retried with
  exponential backoff and jitter until the retry window after the event has passed, then
  the delivery goes to the dead-letter stream;
- keeps an entry it is still retrying its own (XCLAIM to itself, which resets the idle
  time) so nobody takes it over, and XACKs + XDELs it when every endpoint is done.
A crash between a delivery and its XACK sends that event again (at least once): the
receiver dedupes on webhook-id, which is the event id on every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import secrets
import socket
import time

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from redis.exceptions import RedisError, ResponseError

from ..control.events import add_dead_letter
from ..control.views import text
from ..control.webhooks import endpoints_of
from ..redis.runner import ScriptRunner, run_script
from ..schema import events, names
from ..schema.contracts import RetireTagArgs
from ..schema.scripts import RETIRE_TAG
from ..schema.webhooks import (
    InvalidEndpoint,
    Networks,
    WebhookEndpoint,
    blocked_address,
    check_reachable,
    headers,
    shown_url,
)
from . import logs, metrics
from .config import Settings

POLL_S = 0.2             # pause between reads when there was nothing to do
ERROR_PAUSE_S = 1.0      # ... and after a failed pass (Redis down: no busy loop)
SWEEP_S = 5.0            # how often some worker of the deployment sweeps every tag
BATCH = 50               # entries read per stream and call
MAX_INFLIGHT = 64        # entries delivered at once by one worker
ORG_CACHE_S = 2.0        # an organization's endpoints are read again after this long
_SWEEP_CHUNK = 512


def backoff_delay(attempt: int, base: float, cap: float, rand: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...): base doubled
    per attempt, capped, with jitter (half to all of it) so retries spread out."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 60))
    return ceiling / 2 + rand.uniform(0, ceiling / 2)


def claim_idle_s(settings: Settings) -> float:
    """How long an entry may sit unacknowledged and untouched before another worker
    takes it over: well past one attempt, and refreshed while retrying."""
    return 4 * settings.webhook_timeout_s + 1.0


class Worker:
    def __init__(self, redis, streams: ScriptRunner, settings: Settings,
                 consumer: str | None = None):
        self.redis = redis
        self.streams = streams   # the sweep's reads: packed in C, not redis-py's
        self.settings = settings
        self.consumer = consumer or (f"{socket.gethostname()}-{os.getpid()}-"
                                     f"{secrets.token_hex(3)}")
        self.rand = random.Random()
        self.http: aiohttp.ClientSession | None = None
        self.http_org: aiohttp.ClientSession | None = None
        self.networks = settings.webhook_networks()
        self._groups: set[str] = set()
        self._inflight: dict[tuple[str, str], asyncio.Task] = {}
        self._orgs: dict[str, tuple[float, list[WebhookEndpoint]]] = {}
        self._next_sweep = 0.0
        self._next_claim = 0.0

    # -- the loop ----------------------------------------------------------------------

    def _session(self, resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=MAX_INFLIGHT, ttl_dns_cache=60,
                                         resolver=resolver)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     headers={"user-agent": "llm-key-sidecar-webhooks/1"})

    async def run(self, stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as sessions:
            # Configured endpoints reach anything; an organization's only what
            # blocked_address allows, whatever its name resolves to.
            self.http = await sessions.enter_async_context(self._session())
            self.http_org = await sessions.enter_async_context(
                self._session(_GuardedResolver(self.networks)))
            logs.event("webhooks_started", consumer=self.consumer,
                       endpoints=[shown_url(e.url) for e in self.settings.webhooks])
            while not stop.is_set():
                pause = POLL_S
                try:
                    busy = await self.tick()
                except Exception as exc:  # noqa: BLE001 - the worker outlives any one pass
                    _failed(exc)
                    busy, pause = False, ERROR_PAUSE_S
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
            tasks = list(self._inflight.values())
            for task in tasks:          # left pending: another worker, or this one after
                task.cancel()           # a restart, takes them over (XAUTOCLAIM)
            await asyncio.gather(*tasks, return_exceptions=True)

    async def tick(self) -> bool:
        """One pass over the active streams; True when it started something."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_S
            await self.sweep()
        claim = now >= self._next_claim
        if claim:
            self._next_claim = now + claim_idle_s(self.settings) / 4
        started = False
        for raw_tag, score in await self.redis.zrange(names.EVENTS_ACTIVE, 0, -1,
                                                      withscores=True):
            tag = text(raw_tag)
            entries = await self._read(tag, claim)
            for entry_id, fields in entries:
                if (tag, entry_id) not in self._inflight:
                    self._start(tag, entry_id, fields)
                    started = True
            idle = not entries and not any(t == tag for t, _ in self._inflight)
            if idle and await self.redis.xlen(names.events(tag)) == 0:
                retire = RetireTagArgs(names.EVENTS_ACTIVE, tag, repr(score))
                await run_script(self.redis, RETIRE_TAG, retire.keys(), retire.argv())
        return started

    async def _read(self, tag: str, claim: bool) -> list[tuple[str, dict[str, str]]]:
        stream = names.events(tag)
        if tag not in self._groups:
            with contextlib.suppress(ResponseError):     # BUSYGROUP: it exists
                await self.redis.xgroup_create(stream, names.EVENT_GROUP, id="0",
                                               mkstream=True)
            self._groups.add(tag)
        out: list[tuple[str, dict[str, str]]] = []
        try:
            if claim:
                out += await self._claim(stream)
            room = MAX_INFLIGHT - len(self._inflight)
            if room > 0:
                for _, found in await self.redis.xreadgroup(
                        names.EVENT_GROUP, self.consumer, {stream: ">"},
                        count=min(BATCH, room)) or []:
                    out += [(text(i), _fields(f)) for i, f in found]
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups.discard(tag)   # the stream was deleted: made again next pass
        return out

    async def _claim(self, stream: str) -> list[tuple[str, dict[str, str]]]:
        """Entries idle in some consumer's pending list for longer than the claim time."""
        reply = await self.redis.xautoclaim(
            stream, names.EVENT_GROUP, self.consumer,
            min_idle_time=int(claim_idle_s(self.settings) * 1000), start_id="0-0",
            count=BATCH)
        claimed, gone = reply[1], reply[2] if len(reply) > 2 else []
        if gone:       # deleted while pending: nothing left to deliver
            await self.redis.xack(stream, names.EVENT_GROUP, *gone)
        return [(text(i), _fields(f)) for i, f in claimed if f]

    async def sweep(self) -> None:
        """Tags whose stream holds entries but is not in the active set (scripts on
        Redis Cluster); one worker of the deployment at a time."""
        if not await self.redis.set(names.EVENTS_SWEEP, self.consumer, nx=True,
                                    px=int(SWEEP_S * 1000)):
            return
        # 4,096 XLENs every SWEEP_S, on the event loop that serves calls: through
        # redis-py's pipeline they took ~75 ms of it at once, through `streams` ~8 ms.
        for i in range(0, len(names.ALL_TAGS), _SWEEP_CHUNK):
            chunk = names.ALL_TAGS[i:i + _SWEEP_CHUNK]
            lengths = await self.streams.commands(
                [(stream, ("XLEN", stream)) for stream in map(names.events, chunk)])
            found = [tag for tag, n in zip(chunk, lengths, strict=True)
                     if isinstance(n, int) and n]
            if found:
                await self.redis.zadd(names.EVENTS_ACTIVE, dict.fromkeys(found, 0), nx=True)

    # -- one entry ---------------------------------------------------------------------

    def _start(self, tag: str, entry_id: str, fields: dict[str, str]) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(tag, entry_id, fields))
        self._inflight[(tag, entry_id)] = task
        task.add_done_callback(lambda _: self._inflight.pop((tag, entry_id), None))

    async def _handle(self, tag: str, entry_id: str, fields: dict[str, str]) -> None:
        stream = names.events(tag)
        keep = asyncio.get_running_loop().create_task(self._keep(stream, entry_id))
        try:
            event = events.from_entry(tag, entry_id, fields)
            if event is not None and not event.target and event.type != "key.disabled":
                # a script's alert, counted as it is taken (a takeover counts it again)
                metrics.threshold_crossing(event.type, fields.get("th"))
            if event is not None:
                deadline = (events.entry_ms(entry_id) / 1000
                            + self.settings.webhook_retry_window_s)
                targets = await self.targets(event)
                if event.target and not targets:
                    logs.event("webhook_replay_dropped", event_id=event.id,
                               endpoint=event.target, reason="no such endpoint now")
                await asyncio.gather(*(self.deliver(event, t, deadline) for t in targets))
            await self.redis.xack(stream, names.EVENT_GROUP, entry_id)
            await self.redis.xdel(stream, entry_id)
        except Exception as exc:  # noqa: BLE001 - left pending: taken over later
            _failed(exc)
        finally:
            keep.cancel()

    async def _keep(self, stream: str, entry_id: str) -> None:
        """While delivering: claim the entry for this worker again now and then, which
        resets its idle time, so no other worker takes it over."""
        every = claim_idle_s(self.settings) / 4
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(RedisError, OSError):
                await self.redis.xclaim(stream, names.EVENT_GROUP, self.consumer, 0,
                                        [entry_id], justid=True)

    async def targets(self, event: events.Event) -> list[WebhookEndpoint]:
        found = list(self.settings.webhooks)
        if event.org:
            found += await self._org_endpoints(event.org)
        if event.target:     # a replay: its one endpoint, whatever it subscribes to now
            return [e for e in found if e.ref == event.target]
        return [e for e in found if e.wants(event.type, event.org)]

    async def _org_endpoints(self, org: str) -> list[WebhookEndpoint]:
        held = self._orgs.get(org)
        if held and held[0] > time.monotonic():
            return held[1]
        raw = await self.redis.hgetall(names.org_webhooks(org))
        found = endpoints_of({text(k): v for k, v in raw.items()})
        self._orgs[org] = (time.monotonic() + ORG_CACHE_S, found)
        return found

    async def deliver(self, event: events.Event, endpoint: WebhookEndpoint,
                      deadline: float) -> None:
        """Until a 2xx, or the retry window is over (then a dead letter)."""
        body = events.body(event)
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            error = await self.attempt(endpoint, event.id, body)
            if error is None:
                metrics.webhook_delivered(time.time() - event.occurred_ms / 1000)
                return
            metrics.webhook_failed()
            delay = backoff_delay(attempt, s.webhook_backoff_s, s.webhook_backoff_max_s,
                                  self.rand)
            if time.time() + delay > deadline:
                break
            logs.event("webhook_retry", url=shown_url(endpoint.url), event_id=event.id,
                       attempt=attempt, error=error, retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)
        await add_dead_letter(self.redis, event, endpoint.ref, shown_url(endpoint.url),
                              attempt, error)
        metrics.webhook_dead_letter()
        logs.event("webhook_dead_letter", url=shown_url(endpoint.url), event_id=event.id,
                   attempts=attempt, error=error)

    async def attempt(self, endpoint: WebhookEndpoint, event_id: str, body: bytes) -> str | None:
        """One POST; None when answered 2xx, else what went wrong (no URL, no secret)."""
        session = self.http if endpoint.org is None else self.http_org
        assert session is not None
        if endpoint.org is not None:
            try:     # an IP or localhost in the URL: no resolver asked, so check here
                check_reachable(endpoint.url, self.networks)
            except InvalidEndpoint:
                return "refused: not a public address (see webhook_allowed_networks)"
        sent = headers(endpoint.secret, event_id, int(time.time()), body)
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
        try:
            async with session.post(endpoint.url, data=body, headers=sent, timeout=timeout,
                                      allow_redirects=False) as reply:
                await reply.content.read(4096)
                return None if 200 <= reply.status < 300 else f"HTTP {reply.status}"
        except TimeoutError:
            return f"no answer within {self.settings.webhook_timeout_s:g} s"
        except aiohttp.ClientConnectorError as exc:
            return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return type(exc).__name__


class _GuardedResolver(AbstractResolver):
    """Resolves as usual, then keeps only the addresses an organization's endpoint may
    reach (checked on the very addresses connected to: no DNS rebinding past it)."""

    def __init__(self, allowed: Networks):
        self._inner = aiohttp.ThreadedResolver()
        self._allowed = allowed

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = [r for r in await self._inner.resolve(host, port, family)
                 if not blocked_address(r["host"], self._allowed)]
        if not found:
            raise OSError(errno.EACCES, "refused: no public address "
                                        "(see webhook_allowed_networks)")
        return found

    async def close(self) -> None:
        await self._inner.close()


def _failed(exc: Exception) -> None:
    """One line; a Redis error's text names no secret, anything else only its type."""
    if isinstance(exc, RedisError | OSError):
        logs.event("webhooks_redis_error", error=str(exc) or type(exc).__name__)
    else:
        logs.event("webhooks_error", error=type(exc).__name__)


def _fields(raw: dict) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


async def run_worker(settings: Settings, stop: asyncio.Event) -> None:
    """`serve`'s delivery worker on its own control-plane client, until `stop`."""
    from ..redis.runner import control_client, make_runner
    timeout_s = settings.redis_timeout_ms / 1000 * 8
    client = control_client(settings.redis_url, timeout_s, settings.redis_pool_size)
    streams = make_runner(settings.redis_url, timeout_s)   # its own connection(s)
    try:
        await Worker(client, streams, settings).run(stop)
    finally:
        await client.aclose()
        await streams.close()
