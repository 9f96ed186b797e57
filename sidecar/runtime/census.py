"""The threshold census (issue 12): how many keys are at or below each of the default
alert thresholds, for the gauge sidecar_keys_below_threshold{kind, threshold}. One task
per `sidecar serve` (the process that runs the admin listener), outside the hot path.

Every tick (TICK_S, or the interval when shorter) each sidecar
- tries to take the deployment's census lock (names.THRESHOLD_CENSUS_LOCK: SET NX PX of
  threshold_census_interval_s, never released, it expires), so whichever sidecar comes
  first after it expires takes the next census: one per interval for the deployment (to
  within a tick), and another sidecar carries on when one stops;
- if it took it: reads the keys through the key index (names.KEY_INDEX, HSCAN, BATCH at a
  time; one hash, so no keyspace SCAN and on Redis Cluster no per-node one), the records'
  HGETALLs per batch in one write (per node on a cluster) through a runner of the data
  plane's kind (redis/runner.py `commands`: packed and parsed in C; redis-py's pipeline
  cost ~25 us of Python per command, most of the census), and the shared quota pools of
  rotated keys the same way; counts them (remaining.Tally, the
  definitions of authorize.lua); writes the result whole (MULTI: DEL, HSET) to
  names.THRESHOLD_CENSUS;
- reads that hash (HGETALL) and sets its gauges from it (metrics.threshold_census): every
  sidecar's /metrics shows the same counts, and a scrape calls no Redis.
Bounded: a census examines at most MAX_KEYS key records and stops once BUSY_SHARE of the
interval has passed (the lock is still held then, so no census overlaps another); it
stores what it counted with complete = 0. Paced: the batches are spread over SPREAD_SHARE
of the interval (at most MAX_PAUSE_S between two), because with one worker the census
shares its event loop with the data plane: a census taken at once (100,000 keys: ~6 s
of CPU) held back every call behind it, batch after batch. Paced, it is a few ms of CPU
between two awaits, then a pause. A Redis error is logged and the next tick tries again:
`serve` never stops for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time

from redis.exceptions import RedisError

from ..redis.pipeline import RedisUnavailable
from ..redis.runner import ScriptRunner
from ..schema import names
from ..schema.keys import shard_of
from ..schema.limits import Calendar
from ..schema.record import KeyRecord, now_ms, text
from ..schema.remaining import Census, Tally, counted, threshold_labels
from . import logs, metrics
from .config import Settings

TICK_S = 5.0             # how often a sidecar tries the lock and reads the result
BATCH = 64               # key index entries per HSCAN, records per pipeline (256: ~20 ms
                         # of the event loop at a time; 64: ~2-3 ms)
MAX_KEYS = 1_000_000     # key records one census examines at most
BUSY_SHARE = 0.8         # ... and the share of the interval it may take
SPREAD_SHARE = 0.5       # the share of the interval its batches are spread over
MAX_PAUSE_S = 0.25       # the longest pause between two batches


async def take_census(redis, records: ScriptRunner, settings: Settings, by: str,
                      budget_s: float | None = None) -> Census:
    """Count every key (up to the caps), paced (pause()): the index through `redis`
    (redis-py), the records through `records`; `budget_s`: the time it may take (default
    BUSY_SHARE of the interval)."""
    thresholds = threshold_labels(settings.default_thresholds())
    started = time.monotonic()
    interval = settings.threshold_census_interval_s
    deadline = started + (BUSY_SHARE * interval if budget_s is None else budget_s)
    gap = pause(await redis.hlen(names.KEY_INDEX), interval)
    now = now_ms()
    day, month = Calendar(settings.budget_timezone).numbers(now)
    tally = Tally(thresholds, settings.expired_reservation == "charge")
    cursor, complete = 0, False
    while True:
        began = time.monotonic()
        cursor, found = await redis.hscan(names.KEY_INDEX, cursor, count=BATCH)
        await _count(records, [text(h) for h in found.values()], tally, now, day, month)
        if int(cursor) == 0:
            complete = True
            break
        if tally.keys >= MAX_KEYS or time.monotonic() >= deadline:
            break
        await asyncio.sleep(max(0.0, gap - (time.monotonic() - began)))
    return Census(now, int((time.monotonic() - started) * 1000), tally.keys, complete, by,
                  tally.counts)


def pause(keys: int, interval_s: float) -> float:
    """Seconds from the start of one batch to the next: `keys` spread over SPREAD_SHARE
    of the interval, at most MAX_PAUSE_S (a census of few keys is not drawn out)."""
    batches = max(1, -(-keys // BATCH))
    return min(MAX_PAUSE_S, SPREAD_SHARE * interval_s / batches)


async def _count(records: ScriptRunner, hashes: list[str], tally: Tally, now: int,
                 day: int, month: int) -> None:
    """One batch: the records in one write, their pools in another."""
    if not hashes:
        return
    names_ = [names.record(h) for h in hashes]
    found = []
    for key_hash, flat in zip(hashes, await records.commands(
            [(name, ("HGETALL", name)) for name in names_]), strict=True):
        if flat:          # else deleted since the index was read
            found.append((key_hash, KeyRecord.from_hash(dict(zip(flat[::2], flat[1::2],
                                                                 strict=True)))))
    pooled = [(h, rec) for h, rec in found if rec.quota_pool and counted(rec, now)]
    pools: dict[str, int] = {}
    if pooled:
        calls = []
        for key_hash, rec in pooled:
            wallet = names.wallet(shard_of(key_hash))
            calls.append((wallet, ("HGET", wallet, names.pool_field(rec.quota_pool))))
        for (key_hash, _), value in zip(pooled, await records.commands(calls), strict=True):
            if value is not None:
                pools[key_hash] = int(value)
    for key_hash, rec in found:
        tally.add(rec, now, day, month, pools.get(key_hash))


async def store(redis, census: Census) -> None:
    """The result, whole: no field of an earlier census (other thresholds) stays."""
    async with redis.pipeline(transaction=True) as tx:
        tx.delete(names.THRESHOLD_CENSUS)
        tx.hset(names.THRESHOLD_CENSUS, mapping=census.to_hash())
        await tx.execute()


async def load(redis) -> Census | None:
    return Census.from_hash(await redis.hgetall(names.THRESHOLD_CENSUS))


async def tick(redis, records: ScriptRunner, settings: Settings, by: str) -> Census | None:
    """Take the census if it is this sidecar's turn, then show the stored one."""
    every_ms = int(settings.threshold_census_interval_s * 1000)
    if await redis.set(names.THRESHOLD_CENSUS_LOCK, by, nx=True, px=every_ms):
        taken = await take_census(redis, records, settings, by)
        await store(redis, taken)
        logs.event("threshold_census", at=taken.at_ms, keys=taken.keys,
                   took_ms=taken.took_ms, complete=taken.complete)
    found = await load(redis)
    if found is not None:
        metrics.threshold_census(found)
    return found


async def run(redis, records: ScriptRunner, settings: Settings, stop: asyncio.Event,
              by: str | None = None) -> None:
    """Ticks until `stop`; none at all when the deployment has no default thresholds."""
    if not threshold_labels(settings.default_thresholds()):
        return
    by = by or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    pause = min(TICK_S, settings.threshold_census_interval_s)
    while not stop.is_set():
        try:
            await tick(redis, records, settings, by)
        except Exception as exc:  # noqa: BLE001 - the census outlives any one pass
            if isinstance(exc, RedisError | RedisUnavailable | OSError):
                logs.event("threshold_census_redis_error", error=str(exc) or
                           type(exc).__name__)
            else:
                logs.event("threshold_census_error", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)


async def run_census(settings: Settings, stop: asyncio.Event) -> None:
    """`serve`'s census task on its own control-plane client, until `stop`."""
    from ..redis.runner import control_client, make_runner
    timeout_s = settings.redis_timeout_ms / 1000 * 8
    client = control_client(settings.redis_url, timeout_s, 4)
    records = make_runner(settings.redis_url, timeout_s)   # its own connection(s)
    try:
        await run(client, records, settings, stop)
    finally:
        await client.aclose()
        await records.close()
