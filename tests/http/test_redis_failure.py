"""Redis trouble, against a running sidecar and a redis-server of the test's own.

Fail closed: while Redis stalls (SIGSTOP) every call is answered 503 with a JSON body in
the caller's dialect, /readyz fails and /healthz does not; when Redis comes back (SIGCONT,
or a restart on the same port, or a SCRIPT FLUSH) calls are decided again without
restarting the sidecar. Fail open: calls pass and are counted. No timed assertions: a
client timeout of a few seconds only turns a hang into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import PEPPER, start_redis, start_sidecar, stop_process
from live import CHAT, MESSAGES, authz, make, metric_value

from sidecar.control.store import ControlStore
from sidecar.schema.keys import KeyHasher

QUICK = aiohttp.ClientTimeout(total=5)   # a hang fails the test instead of blocking it
BODY = {"model": "gpt-x", "messages": []}


@pytest.fixture
def own_redis(tmp_path):
    server = start_redis(tmp_path / "redis")
    yield server
    stop_process(server.proc)   # sends SIGCONT first


@contextlib.asynccontextmanager
async def control_plane(url: str):
    """The control plane on a Redis of the test's own (not the shared one)."""
    client = aioredis.from_url(url)
    try:
        yield ControlStore(client, KeyHasher(PEPPER))
    finally:
        await client.aclose()


async def new_key(url: str, **settings) -> tuple[str, str]:
    async with control_plane(url) as plane:
        return await make(plane, **settings)


@pytest.fixture
def car_factory(tmp_path):
    cars = []

    def start(redis_url: str, **settings):
        car = start_sidecar(tmp_path / f"car{len(cars)}", redis_url, **settings)
        cars.append(car)
        return car
    yield start
    for car in cars:
        stop_process(car.proc)


def assert_unavailable(answer, anthropic: bool) -> None:
    assert answer.status == 503, (answer.status, answer.raw)
    body = answer.json
    if anthropic:
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
    else:
        assert body["error"]["code"] == "service_unavailable"
    assert orjson.loads(answer.headers["x-auth-error"]) == body


async def admin_status(http, car, path: str) -> int:
    async with http.get(car.admin_url + path, timeout=QUICK) as resp:
        return resp.status


async def test_stalled_redis_fails_closed_then_recovers(own_redis, car_factory, http):
    _, key = await new_key(own_redis.url, unlimited=True)
    car = car_factory(own_redis.url, redis_timeout_ms=150)
    assert (await authz(http, car, key=key, body=BODY, timeout=QUICK)).status == 200

    async def call(i: int):
        path = MESSAGES if i % 2 else CHAT
        return i % 2 == 1, await authz(http, car, path, key=key, body=BODY, timeout=QUICK)

    # Calls on their way when Redis stops: each gets a real answer, decided or 503.
    in_flight = asyncio.gather(*(call(i) for i in range(40)))
    await asyncio.sleep(0)
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        for anthropic, answer in await in_flight:
            if answer.status != 200:
                assert_unavailable(answer, anthropic)
        # Calls made while it is stopped: all 503, on the old connection and on new ones.
        for _ in range(3):
            for anthropic, answer in await asyncio.gather(*(call(i) for i in range(20))):
                assert_unavailable(answer, anthropic)
        assert await admin_status(http, car, "/readyz") == 503
        assert await admin_status(http, car, "/healthz") == 200
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    assert (await authz(http, car, key=key, body=BODY, timeout=QUICK)).status == 200
    assert await admin_status(http, car, "/readyz") == 200
    metrics = await (await http.get(car.admin_url + "/metrics", timeout=QUICK)).text()
    assert metric_value(metrics, "sidecar_decisions_total",
                        {"status": "503", "code": "service_unavailable"}) >= 60
    assert metric_value(metrics, "sidecar_redis_errors_total") >= 1


async def test_redis_restarted_on_the_same_port(own_redis, car_factory, http, tmp_path):
    _, key = await new_key(own_redis.url, unlimited=True)
    car = car_factory(own_redis.url, redis_timeout_ms=150)
    assert (await authz(http, car, key=key, body=BODY, timeout=QUICK)).status == 200
    own_redis.proc.kill()
    own_redis.proc.wait()
    for path, anthropic in ((CHAT, False), (MESSAGES, True)):
        assert_unavailable(await authz(http, car, path, key=key, body=BODY, timeout=QUICK),
                           anthropic)
    assert await admin_status(http, car, "/readyz") == 503

    again = start_redis(tmp_path / "redis-again", port=own_redis.port)
    try:
        # The new server is empty (no persistence here): the old key is simply unknown,
        # which proves the call reached it; a new key is allowed.
        assert (await authz(http, car, key=key, body=BODY, timeout=QUICK)).status == 401
        _, fresh = await new_key(again.url, quota=1)
        assert (await authz(http, car, key=fresh, body=BODY, timeout=QUICK)).status == 200
        assert (await authz(http, car, key=fresh, body=BODY, timeout=QUICK)).status == 402
        assert await admin_status(http, car, "/readyz") == 200
    finally:
        stop_process(again.proc)


async def test_fail_open_allows_and_counts(own_redis, car_factory, http):
    _, key = await new_key(own_redis.url, quota=1)
    car = car_factory(own_redis.url, redis_timeout_ms=150, failure_mode="open")
    assert (await authz(http, car, key=key, body=BODY, timeout=QUICK)).status == 200
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        answers = await asyncio.gather(*(authz(http, car, key=key, body=BODY, timeout=QUICK)
                                         for _ in range(10)))
        # Allowed without a decision: exactly 200, and no identity (none is known).
        assert [a.status for a in answers] == [200] * 10
        assert all("x-key-id" not in a.headers for a in answers)
        # A malformed key is still refused: that needs no Redis.
        assert (await authz(http, car, key="sk-bad", body=BODY, timeout=QUICK)).status == 401
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    metrics = await (await http.get(car.admin_url + "/metrics", timeout=QUICK)).text()
    assert metric_value(metrics, "sidecar_fail_open_total") == 10
    # Back to deciding: the quota of 1 was used by the first call.
    assert (await authz(http, car, key=key, body=BODY, timeout=QUICK)).status == 402


async def test_script_flush_loads_the_script_again(own_redis, car_factory, http):
    key_id, key = await new_key(own_redis.url, quota=10)
    car = car_factory(own_redis.url)
    assert (await authz(http, car, key=key, body=BODY)).status == 200
    client = own_redis.client()
    noscript_before = client.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0)
    client.script_flush()
    answers = await asyncio.gather(*(authz(http, car, key=key, body=BODY) for _ in range(30)))
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * 9 + [402] * 21   # reserved once per call, retry or not
    noscript = client.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0)
    assert noscript > noscript_before           # the NOSCRIPT path really ran
    async with control_plane(own_redis.url) as plane:
        assert (await plane.key(None, key_id))["quota_used"] == 10
