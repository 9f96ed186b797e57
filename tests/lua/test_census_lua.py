"""The threshold census agrees with authorize.lua (issue 12), on a real redis-server.

A key is made through the control plane and spent one call at a time by authorize.lua
(test_authorize_lua's helper, the data plane's KEYS and ARGV); after every call the
census (runtime/census.take_census, on the same Redis) must count the key under exactly
the thresholds the script has fired for it so far: the record's `qf` for its quota, its
budget state's `fired` for its own budget (the top n of 0.2, 0.05, 0). So the two agree
at every boundary: 4 of 20 left is at 0.2, 1 of 20 at 0.05, 0 at 0.
"""

from __future__ import annotations

import time

import pytest
from live import make, raw_record
from test_authorize_lua import authorize

from sidecar.runtime.census import load, store, take_census
from sidecar.runtime.config import Settings
from sidecar.schema import names
from sidecar.schema.limits import Calendar, Limits
from sidecar.schema.remaining import BUDGET, QUOTA

THRESHOLDS = ("0.2", "0.05", "0")
SETTINGS = Settings()        # alert_thresholds 0.2, 0.05, 0; budget_timezone UTC
RECORDS: dict = {}           # the census reads records through a data-plane runner


@pytest.fixture(autouse=True)
def _records(runner):
    """Each test's runner (on the test Redis) for the census's record reads."""
    RECORDS["runner"] = runner
    yield
    RECORDS.clear()


def census_of(aredis, by: str, **kw):
    return take_census(aredis, RECORDS["runner"], SETTINGS, by, **kw)


async def counted_under(aredis, kind: str) -> list[str]:
    """The thresholds the census counts one key under (and never more than one key)."""
    census = await census_of(aredis, "test")
    assert census.complete
    counts = [census.counts[kind, t] for t in THRESHOLDS]
    assert set(counts) <= {0, 1}, census.counts
    return [t for t, n in zip(THRESHOLDS, counts, strict=True) if n]


def spend(runner, plane, key: str, **kw):
    async def one() -> int:
        now = int(time.time() * 1000)
        day, month = Calendar("UTC").numbers(now)
        return (await authorize(runner, plane.keystore, key, now=now, day=day,
                                month=month, **kw))[0]
    return one


async def fired_quota(aredis, key: str) -> list[str]:
    return list(THRESHOLDS[:int((await raw_record(aredis, key)).get("qf", 0))])


@pytest.mark.parametrize("typ", ["standard", "subscription"])
async def test_a_quota_is_counted_where_the_script_fires(aredis, runner, plane, typ):
    _, key = await make(plane, typ, quota=20)
    call = spend(runner, plane, key)
    assert await counted_under(aredis, QUOTA) == []
    for _ in range(20):
        assert await call() == 0
        assert await counted_under(aredis, QUOTA) == await fired_quota(aredis, key)
    assert await counted_under(aredis, QUOTA) == list(THRESHOLDS)
    assert await call() != 0                          # refused: nothing left


async def test_a_rotated_keys_pool_is_counted_once_for_its_successor(aredis, runner,
                                                                     plane):
    old_id, old = await make(plane, quota=10)
    for _ in range(5):
        assert await spend(runner, plane, old)() == 0
    new = (await plane.rotate_key(None, old_id, grace_s=600))["key"]
    call = spend(runner, plane, new)
    for _ in range(5):        # the successor draws on the pool (5 left of 5 for it)
        assert await call() == 0
        assert await counted_under(aredis, QUOTA) == await fired_quota(aredis, new)
    assert await counted_under(aredis, QUOTA) == list(THRESHOLDS)
    assert await spend(runner, plane, old)() != 0     # the old key in grace: none left


async def test_a_keys_own_budget_is_counted_where_the_script_fires(aredis, runner, plane):
    key_id, key = await make(plane, unlimited=True)
    await plane.set_key_limits(None, key_id, {"budget": "1.00"})
    call = spend(runner, plane, key, money=100_000)          # 0.10 a call, 10 calls
    for _ in range(10):
        assert await call() == 0
        state = Limits.unpack((await raw_record(aredis, key))["lim"])
        assert await counted_under(aredis, BUDGET) == list(THRESHOLDS[:state.fired])
    assert await counted_under(aredis, BUDGET) == list(THRESHOLDS)
    assert await counted_under(aredis, QUOTA) == []           # unlimited: no quota


async def test_the_census_is_stored_whole_and_read_back(aredis, plane):
    for quota in (0, 10):
        await make(plane, quota=quota)
    taken = await census_of(aredis, "me")
    assert (taken.keys, taken.complete, taken.by) == (2, True, "me")
    await aredis.hset(names.THRESHOLD_CENSUS, "quota:0.5", "7")   # an older census's
    await store(aredis, taken)
    assert await load(aredis) == taken
    assert b"quota:0.5" not in await aredis.hkeys(names.THRESHOLD_CENSUS)


@pytest.fixture
async def large_hashes(aredis):
    """The key index as a real hash table, as in a deployment with many keys (a small
    one is a listpack, which HSCAN returns whole)."""
    name = "hash-max-listpack-entries"
    before = (await aredis.config_get(name))[name]
    await aredis.config_set(name, 1)
    yield
    await aredis.config_set(name, before)


@pytest.mark.parametrize("cap", ["time", "keys"])
async def test_a_census_stops_at_its_caps(aredis, plane, monkeypatch, large_hashes, cap):
    from sidecar.runtime import census
    monkeypatch.setattr(census, "BATCH", 2)
    for _ in range(12):
        await make(plane, quota=1)
    if cap == "keys":
        monkeypatch.setattr(census, "MAX_KEYS", 3)
    partial = await census_of(aredis, "me", budget_s=0 if cap == "time" else 60)
    assert not partial.complete and 1 <= partial.keys < 12
    monkeypatch.setattr(census, "MAX_KEYS", 1000)
    whole = await census_of(aredis, "me")
    assert whole.complete and whole.keys == 12
