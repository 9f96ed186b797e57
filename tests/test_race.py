"""The exact-quota race: hundreds of concurrent authorize calls over several sidecar
processes on one Redis hit one key; exactly the quota (or the rpm limit) is allowed.

Each process batches the calls of one event-loop tick into one pipelined write, and the
script reserves atomically: if either were wrong, more (or fewer) calls than the limit
would pass here.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import pytest
from conftest import start_sidecar, stop_process
from live import CLIENT_TIMEOUT, avoid_minute_edge, start_workers

from sidecar.store.keystore import KeySpec

CALLS = 400
PER_SIDECAR_CONNECTIONS = 100


@pytest.fixture(scope="module")
def two_sidecars(tmp_path_factory, redis_server):
    """Two separately started processes against the same Redis."""
    cars = [start_sidecar(tmp_path_factory.mktemp(f"race{i}"), redis_server.url)
            for i in range(2)]
    yield cars
    for car in cars:
        stop_process(car.proc)


async def storm(cars, key: str, calls: int = CALLS) -> collections.Counter:
    """`calls` authorize calls at once, spread round-robin over the sidecars' ports."""
    sessions = [aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=PER_SIDECAR_CONNECTIONS), timeout=CLIENT_TIMEOUT)
        for _ in cars]
    body = b'{"model": "gpt-x", "messages": []}'
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def one(i: int) -> int:
        car, session = cars[i % len(cars)], sessions[i % len(cars)]
        async with session.post(car.url + "/authz/v1/chat/completions", data=body,
                                headers=headers) as resp:
            await resp.read()
            return resp.status
    try:
        return collections.Counter(await asyncio.gather(*(one(i) for i in range(calls))))
    finally:
        for session in sessions:
            await session.close()


async def test_exact_quota_over_two_processes(two_sidecars, store):
    view, key = await store.create(KeySpec(quota=37))
    statuses = await storm(two_sidecars, key)
    assert statuses == {200: 37, 402: CALLS - 37}
    after = await store.get(view["id"])
    assert (after["quota_used"], after["quota_remaining"]) == (37, 0)
    assert after["request_count"] == 37


async def test_exact_rpm_over_two_processes(two_sidecars, store):
    avoid_minute_edge(margin_s=5)   # the burst must fall in one rate window
    view, key = await store.create(KeySpec(unlimited=True, rpm=25))
    statuses = await storm(two_sidecars, key)
    assert statuses == {200: 25, 429: CALLS - 25}
    after = await store.get(view["id"])
    assert after["request_count"] == 25 and after["quota_remaining"] is None


async def test_exact_quota_with_two_workers_of_one_command(tmp_path, redis_url, store):
    car = start_workers(tmp_path, redis_url, 2)
    try:
        view, key = await store.create(KeySpec(quota=37))
        statuses = await storm([car], key)
        assert statuses == {200: 37, 402: CALLS - 37}
        after = await store.get(view["id"])
        assert (after["quota_used"], after["quota_remaining"]) == (37, 0)
    finally:
        stop_process(car.proc)
