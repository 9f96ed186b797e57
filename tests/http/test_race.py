"""The exact-quota race: hundreds of concurrent authorize calls over several sidecar
processes on one Redis hit one key; exactly the quota (or the rpm limit) is allowed, and
each allowed call records one reservation. Racing duplicate usage reports of the same
reservations, sent to both processes, settle each reservation exactly once.

Each process batches the calls of one event-loop tick into one pipelined write, and the
scripts reserve and settle atomically: if either were wrong, more (or fewer) calls than
the limit would pass here, or a reservation would be refunded twice.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import orjson
import pytest
from conftest import start_sidecar, stop_process
from live import CLIENT_TIMEOUT, hash_of, make, start_workers

from sidecar.schema import names

CALLS = 400
PER_SIDECAR_CONNECTIONS = 100
TOKEN = "race-settle-token-0123456789"


@pytest.fixture(scope="module")
def two_sidecars(tmp_path_factory, redis_server):
    """Two separately started processes against the same Redis."""
    cars = [start_sidecar(tmp_path_factory.mktemp(f"race{i}"), redis_server.url,
                          settlement_token=TOKEN, model_costs="gpt-x=10")
            for i in range(2)]
    yield cars
    for car in cars:
        stop_process(car.proc)


async def spread(cars, requests: list[tuple[str, dict, bytes]]) -> list[tuple[int, dict]]:
    """POST every (path, headers, body) at once, round-robin over the sidecars' ports:
    [(status, response headers)] in order."""
    sessions = [aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=PER_SIDECAR_CONNECTIONS), timeout=CLIENT_TIMEOUT)
        for _ in cars]

    async def one(i: int, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
        car, session = cars[i % len(cars)], sessions[i % len(cars)]
        async with session.post(car.url + path, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status, dict(resp.headers)
    try:
        return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))
    finally:
        for session in sessions:
            await session.close()


async def storm(cars, key: str, calls: int = CALLS) -> collections.Counter:
    """`calls` authorize calls at once, spread round-robin over the sidecars' ports."""
    body = b'{"model": "gpt-x", "messages": []}'
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    answers = await spread(cars, [("/authz/v1/chat/completions", headers, body)] * calls)
    return collections.Counter(status for status, _ in answers)


async def test_exact_quota_over_two_processes(two_sidecars, plane, aredis):
    key_id, key = await make(plane, quota=370)       # 37 calls of gpt-x (10)
    statuses = await storm(two_sidecars, key)
    assert statuses == {200: 37, 402: CALLS - 37}
    after = await plane.key(None, key_id)
    assert (after["quota_used"], after["quota_remaining"]) == (370, 0)
    assert after["request_count"] == 37
    # One reservation per allowed call, none for a refused one.
    held = [k async for k in aredis.scan_iter(names.reservation(hash_of(key), "*"))]
    assert len(held) == 37


async def test_duplicate_reports_over_two_processes_settle_once(two_sidecars, plane):
    """Each of 20 reservations reported 10 times at once, the copies spread over both
    processes: 20 settle, 180 are refused as already settled, and the quota gets back
    exactly what the 20 calls reserved (10 each), no more."""
    key_id, key = await make(plane, quota=1000)
    body = b'{"model": "gpt-x", "messages": []}'
    calls = await spread(two_sidecars, [("/authz/v1/chat/completions",
                                         {"Authorization": f"Bearer {key}"}, body)] * 20)
    assert [status for status, _ in calls] == [200] * 20
    rids = [headers["x-reservation-id"] for _, headers in calls]
    assert len(set(rids)) == 20
    assert (await plane.key(None, key_id))["quota_remaining"] == 800
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    reports = [("/settle", auth, orjson.dumps({"reservation_id": rid, "key_id": key_id,
                                                "cost": 0}))
               for rid in rids for _ in range(10)]     # copies alternate processes
    statuses = collections.Counter(status for status, _ in await spread(two_sidecars,
                                                                          reports))
    assert statuses == {200: 20, 409: 180}
    after = await plane.key(None, key_id)
    assert (after["quota_remaining"], after["quota_used"]) == (1000, 0)


async def test_exact_rpm_over_two_processes(two_sidecars, plane):
    """rpm 8 (GCRA: a burst of 8, then one call per 7.5 s): 400 calls at once over two
    processes get exactly 8 through, whatever minute boundary they straddle."""
    key_id, key = await make(plane, unlimited=True, rpm=8)
    statuses = await storm(two_sidecars, key)
    assert statuses == {200: 8, 429: CALLS - 8}
    after = await plane.key(None, key_id)
    assert after["request_count"] == 8 and after["quota_remaining"] is None


async def test_exact_quota_with_two_workers_of_one_command(tmp_path, redis_url, plane):
    car = start_workers(tmp_path, redis_url, 2)
    try:
        key_id, key = await make(plane, quota=37)
        statuses = await storm([car], key)
        assert statuses == {200: 37, 402: CALLS - 37}
        after = await plane.key(None, key_id)
        assert (after["quota_used"], after["quota_remaining"]) == (37, 0)
    finally:
        stop_process(car.proc)
