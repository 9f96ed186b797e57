"""Script tier (issue 12): threshold crossings and usage history in authorize.lua and
settle.lua on a real redis-server.

Keys, projects and organizations are made, given quotas, budgets and thresholds through
the control plane; calls go through the runner with the KEYS and ARGV the data plane
builds (test_authorize_lua's helpers), each with its own `now`, so buckets and periods
are exact. Events are read back from the tag's stream as the webhook worker reads them.
"""

from __future__ import annotations

import pytest
from test_authorize_lua import authorize, settle_call

from sidecar.dataplane.decision import Code
from sidecar.schema import events, names
from sidecar.schema.keys import new_reservation_id, shard_of
from sidecar.schema.money import MICRO

DAY, HOUR = 86_400_000, 3_600_000
T0 = 20_000 * DAY + 23 * HOUR + 59 * 60_000      # 23:59 of day 20000 (UTC)


@pytest.fixture
async def org(plane):
    org = (await plane.create_org("acme"))["id"]
    project = (await plane.create_project(org, "web"))["id"]
    return org, project


async def project_key(plane, org, **req) -> tuple[str, str]:
    view, key = await plane.create_key(org[0], {"owner": "project", "project_id": org[1],
                                                **req})
    return view["id"], key


async def stream(plane, key: str) -> list[dict]:
    """The events on the key's tag stream, as the worker reads them."""
    tag = shard_of(plane.keystore.hasher(key))
    out = []
    for entry_id, raw in await plane.redis.xrange(names.events(tag)):
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        out.append(events.payload(events.from_entry(tag, entry_id.decode(), fields)))
    return out


def summary(found: list[dict]) -> list[tuple]:
    return [(e["type"], e["data"]["level"], e["data"]["threshold"], e["data"]["remaining"])
            for e in found]


async def calls(runner, plane, key: str, n: int, now: int = T0, **kw) -> list[int]:
    return [(await authorize(runner, plane.keystore, key, now=now + i, day=now // DAY,
                             **kw))[0] for i in range(n)]


async def test_quota_crossings_fire_once_each_and_rearm_when_raised(plane, runner, org):
    key_id, key = await project_key(plane, org, quota=100)
    assert await calls(runner, plane, key, 7, cost=10) == [Code.allow] * 7   # 30 left
    assert await stream(plane, key) == []
    assert await calls(runner, plane, key, 1, cost=10) == [Code.allow]       # 20: 0.2
    assert await calls(runner, plane, key, 1, cost=10) == [Code.allow]       # 10
    # 0: 0.05 and 0 crossed by one call: one event, the lowest threshold
    assert await calls(runner, plane, key, 1, cost=10) == [Code.allow]
    assert await calls(runner, plane, key, 3, cost=10) == [Code.quota_exhausted] * 3
    found = await stream(plane, key)
    assert summary(found) == [("quota.low", "key", 0.2, 20), ("quota.exhausted", "key", 0, 0)]
    assert {e["data"]["key_id"] for e in found} == {key_id}
    assert {e["data"]["organization_id"] for e in found} == {org[0]}
    assert found[0]["data"]["limit"] == 100
    # Raised: 100 more (100 left of 200 used + left); the alerts re-arm.
    await plane.set_key_quota(org[0], key_id, add=100)
    assert await calls(runner, plane, key, 5, cost=10) == [Code.allow] * 5   # 50 of 200
    assert len(await stream(plane, key)) == 2
    assert await calls(runner, plane, key, 1, cost=10) == [Code.allow]       # 40: 0.2
    assert summary(await stream(plane, key))[2:] == [("quota.low", "key", 0.2, 40)]


async def test_no_event_without_a_crossing_nor_with_no_thresholds(plane, runner, org):
    _, roomy = await project_key(plane, org, quota=1000)
    assert await calls(runner, plane, roomy, 10) == [Code.allow] * 10
    quiet_id, quiet = await project_key(plane, org, quota=3)
    await plane.set_key_thresholds(org[0], quiet_id, {"thresholds": []})
    assert await calls(runner, plane, quiet, 3) == [Code.allow] * 3          # down to 0
    assert await stream(plane, roomy) == [] and await stream(plane, quiet) == []


async def test_own_thresholds_and_the_deployment_default(plane, runner, org):
    key_id, key = await project_key(plane, org, quota=10)
    view = await plane.set_key_thresholds(org[0], key_id, {"thresholds": "0.5,0"})
    assert view == {"thresholds": [0.5, 0.0], "default": False}
    assert await calls(runner, plane, key, 5) == [Code.allow] * 5
    assert summary(await stream(plane, key)) == [("quota.low", "key", 0.5, 5)]
    # ARGV thresholds (alert_thresholds) apply where the key names none
    other_id, other = await project_key(plane, org, quota=10)
    assert await calls(runner, plane, other, 3, thresholds="0.75") == [Code.allow] * 3
    found = await stream(plane, other)            # the same tag's stream: both keys'
    assert summary(found)[1:] == [("quota.low", "key", 0.75, 7)]
    assert found[1]["data"]["key_id"] == other_id
    assert (await plane.thresholds_of_key(org[0], other_id))["default"] is True


async def test_budget_crossings_per_level_once_and_rearmed_by_the_new_day(plane, runner,
                                                                          org):
    org_id, project = org
    await plane.set_org_limits(org_id, {"budget": "10.00", "budget_period": "day"})
    await plane.set_thresholds(org_id, "project", project, {"thresholds": [0.5]})
    await plane.set_project_limits(org_id, project, {"budget": "4.00"})
    _, key = await project_key(plane, org, unlimited=True)
    day = T0 // DAY

    async def call(now: int) -> int:
        return (await authorize(runner, plane.keystore, key, now=now, day=now // DAY,
                                money=MICRO))[0]

    assert [await call(T0 - 10 * 60_000 + i) for i in range(2)] == [Code.allow] * 2
    # the project (4.00, own threshold 0.5) crosses at 2.00 left
    assert summary(await stream(plane, key)) == [("budget.low", "project", 0.5, "2.00")]
    await plane.set_project_limits(org_id, project, {"budget": "0"})     # no project cap
    assert [await call(T0 - 60_000 + i) for i in range(6)] == [Code.allow] * 6
    # the organization (10.00 a day, default thresholds) crosses 0.2 at 2.00 left
    found = summary(await stream(plane, key))
    assert found[1:] == [("budget.low", "organization", 0.2, "2.00")]
    assert await call(T0) == Code.allow and await call(T0 + 1) == Code.allow   # 0 left
    assert summary(await stream(plane, key))[2:] == [
        ("budget.exhausted", "organization", 0, "0.00")]
    assert await call(T0 + 2) == Code.budget_exhausted
    # The next day rolls the window over: the alerts fire again, once.
    tomorrow = (day + 1) * DAY + 60_000
    assert [await call(tomorrow + i) for i in range(8)] == [Code.allow] * 8
    assert summary(await stream(plane, key))[3:] == [
        ("budget.low", "organization", 0.2, "2.00")]


async def test_an_extra_charge_at_settle_crosses_once(plane, runner, org):
    _, key = await project_key(plane, org, quota=100)
    key_hash = plane.keystore.hasher(key)
    rid = new_reservation_id()
    assert (await authorize(runner, plane.keystore, key, now=T0, cost=10,
                            reservation=rid))[0] == Code.allow
    assert await stream(plane, key) == []
    assert (await settle_call(runner, key_hash, rid, now=T0 + 1, actual=85))[0] == 0
    assert summary(await stream(plane, key)) == [("quota.low", "key", 0.2, 15)]


async def test_usage_buckets_count_exactly_across_a_day_boundary(plane, runner, org):
    org_id, project = org
    key_id, key = await project_key(plane, org, quota=1000)
    key_hash = plane.keystore.hasher(key)
    tag = shard_of(key_hash)
    day = T0 // DAY

    async def call(now: int, tokens: int, money: int) -> None:
        rid = new_reservation_id()
        reply = await authorize(runner, plane.keystore, key, now=now, day=now // DAY,
                                reservation=rid, usage_days=30)
        assert reply[0] == Code.allow
        assert (await settle_call(runner, key_hash, rid, now=now + 5, day=now // DAY,
                                  tokens=tokens, money=money, usage_days=30))[0] == 0

    for i in range(3):                              # day 20000, 23:59
        await call(T0 + i * 1000, 100, 2 * MICRO)
    for i in range(2):                              # day 20001, 00:01
        await call(T0 + 2 * 60_000 + i * 1000, 7, 250_000)
    # a call without history (usage_days 0) counts nowhere
    assert (await authorize(runner, plane.keystore, key, now=T0 + 3 * 60_000,
                            day=day + 1))[0] == Code.allow

    now = T0 + 10 * 60_000
    history = plane.limits.usage.history
    for who in (key_id, names.level_field("project", project),
                names.level_field("organization", org_id)):
        got = await history(plane.keystore.hasher.org_tag(org_id) if who != key_id
                            else tag, who, None, now=now)
        assert got["daily"] == [
            {"date": "2024-10-04", "requests": 3, "tokens": 300, "spend": "6.00"},
            {"date": "2024-10-05", "requests": 2, "tokens": 14, "spend": "0.50"}], who
        assert got["hourly"] == [
            {"hour": "2024-10-04T23:00:00Z", "requests": 3, "tokens": 300, "spend": "6.00"},
            {"hour": "2024-10-05T00:00:00Z", "requests": 2, "tokens": 14, "spend": "0.50"}]
        assert got["total"] == {"requests": 5, "tokens": 314, "spend": "6.50"}
    since = await history(tag, key_id, "2024-10-05", now=now)
    assert since["total"] == {"requests": 2, "tokens": 14, "spend": "0.50"}
    # Kept for the retention (and a day), hourly buckets for 49 h.
    assert 30 * 86_400 < await plane.redis.ttl(names.usage_day(tag, day)) <= 31 * 86_400
    assert 48 * 3600 < await plane.redis.ttl(names.usage_hour(tag, T0 // HOUR)) <= 49 * 3600
