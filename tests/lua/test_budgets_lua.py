"""Script tier: budgets in money and concurrency limits at every level (limits.lua inside
authorize.lua and settle.lua) on a real redis-server.

Keys, projects, members and organizations are made and given limits through the control
plane (ControlStore); calls go through the runner with the KEYS and ARGV that
dataplane/authorize.py and settle.py build (the helpers of test_authorize_lua). Every
call passes its own `now`, day and month, so periods and expiry are driven exactly.
"""

from __future__ import annotations

import pytest
from test_authorize_lua import authorize, mid_window, settle_call

from sidecar.dataplane.decision import Code
from sidecar.schema import names
from sidecar.schema.keys import new_reservation_id, shard_of
from sidecar.schema.limits import PACKED_MARK, Limits
from sidecar.schema.money import MICRO, format_amount

USD = MICRO      # one currency unit in micro-units


@pytest.fixture
async def org(plane):
    org = (await plane.create_org("acme"))["id"]
    project = (await plane.create_project(org, "web"))["id"]
    member = (await plane.add_member(org, "ann@example.com", "member"))["id"]
    return org, project, member


class Caller:
    """One key's calls: authorize with a reservation, settle it, at chosen times."""

    def __init__(self, runner, plane, key: str):
        self.runner, self.plane, self.key = runner, plane, key
        self.hash = plane.keystore.hasher(key)

    async def authorize(self, money: int, now: int, day: int = 20_000, month: int = 24_300,
                        ttl_ms: int = 60_000, expiry: str = "c") -> tuple[list, str]:
        rid = new_reservation_id()
        reply = await authorize(self.runner, self.plane.keystore, self.key, now=now,
                                reservation=rid, reservation_ms=ttl_ms, money=money,
                                day=day, month=month, expiry=expiry)
        return reply, rid

    async def settle(self, rid: str, money, now: int, day: int = 20_000,
                     month: int = 24_300, expiry: str = "c") -> list:
        return await settle_call(self.runner, self.hash, rid, now=now, money=money,
                                 day=day, month=month, expiry=expiry)


async def project_key(plane, runner, org, **req) -> tuple[str, Caller]:
    org_id, project, _ = org
    view, key = await plane.create_key(org_id, {"owner": "project", "project_id": project,
                                                "unlimited": True, **req})
    return view["id"], Caller(runner, plane, key)


async def user_key(plane, runner, org, **req) -> tuple[str, Caller]:
    org_id, project, member = org
    view, key = await plane.create_key(org_id, {"owner": "user", "project_id": project,
                                                "member_id": member, "unlimited": True,
                                                **req})
    return view["id"], Caller(runner, plane, key)


def expires_at(now: int, ttl_ms: int) -> int:
    """The documented rule (limits.lua hold_end): a reservation made at `now` expires
    with its hold, at now + ttl rounded up to a grid of a quarter of the ttl (>= 1 s)."""
    grid = max(-(-ttl_ms // 4), 1000)
    return -(-(now + ttl_ms) // grid) * grid


async def stored_state(plane, org_id: str, field: str) -> Limits:
    tag = plane.keystore.hasher.org_tag(org_id)
    return Limits.unpack(await plane.redis.hget(names.budgets(tag), field))


def code(reply: list) -> int:
    return reply[0]


def level(reply: list) -> str:
    return names.level_of(reply[12].decode() if isinstance(reply[12], bytes) else reply[12])


async def test_keys_of_an_org_share_its_slot(plane, runner, org):
    """Every key of the organization sits on the organization's tag: its budgets hash is
    in the same Redis Cluster slot as each key's record."""
    org_id = org[0]
    tags = set()
    for _ in range(3):
        _, caller = await project_key(plane, runner, org)
        tags.add(shard_of(caller.hash))
    assert tags == {plane.keystore.hasher.org_tag(org_id)}


@pytest.mark.parametrize("where", ["key", "project", "organization", "member"])
async def test_each_level_running_out_first_refuses_and_names_itself(plane, runner, org,
                                                                      where):
    """A budget of 1.00 at one level (the others roomy): two calls of 0.40 fit, the third
    is refused by that level with nothing reserved anywhere."""
    org_id, project, member = org
    roomy = {"budget": "100.00"}
    tight = {"budget": "1.00"}
    key_id, caller = await user_key(plane, runner, org,
                                    **(tight if where == "key" else roomy))
    await plane.set_project_limits(org_id, project, tight if where == "project" else roomy)
    await plane.set_org_limits(org_id, tight if where == "organization" else roomy)
    await plane.set_member_limits(org_id, member, tight if where == "member" else roomy)
    now = mid_window()
    for _ in range(2):
        assert code((await caller.authorize(40 * USD // 100, now))[0]) == Code.allow
    before = {"key": await plane.key_limits(org_id, key_id),
              "project": await plane.project_limits(org_id, project),
              "organization": await plane.org_limits(org_id),
              "member": await plane.member_limits(org_id, member)}
    denied, _ = await caller.authorize(40 * USD // 100, now)
    assert code(denied) == Code.budget_exhausted
    assert level(denied) == where
    after = {"key": await plane.key_limits(org_id, key_id),
             "project": await plane.project_limits(org_id, project),
             "organization": await plane.org_limits(org_id),
             "member": await plane.member_limits(org_id, member)}
    assert after == before                                    # nothing reserved anywhere
    assert before[where]["reserved"] == "0.80"
    assert before[where]["remaining"] == "0.20"


async def test_settle_charges_the_actual_price_and_releases_the_rest(plane, runner, org):
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "1.00"})
    _, caller = await project_key(plane, runner, org)
    now = mid_window()
    reply, rid = await caller.authorize(90 * USD // 100, now)
    assert code(reply) == Code.allow
    assert code((await caller.authorize(20 * USD // 100, now))[0]) == Code.budget_exhausted
    settled = await caller.settle(rid, 15 * USD // 100, now + 1000)
    assert settled[0] == 0 and settled[4:6] == [90 * USD // 100, 15 * USD // 100]
    shown = await plane.project_limits(org_id, project)
    assert (shown["spent"], shown["reserved"], shown["remaining"]) == ("0.15", "0.00", "0.85")
    # Settled once: a second report changes nothing.
    assert (await caller.settle(rid, 10 * USD // 100, now + 2000))[0] == 2
    assert (await plane.project_limits(org_id, project))["spent"] == "0.15"
    assert code((await caller.authorize(80 * USD // 100, now + 3000))[0]) == Code.allow


async def test_a_settlement_over_the_reservation_is_charged_in_full(plane, runner, org):
    """The upstream used more than the worst case (a wrong estimate): all of it is spent,
    the budget goes past its limit and the next call is refused."""
    org_id, _, _ = org
    await plane.set_org_limits(org_id, {"budget": "1.00"})
    _, caller = await project_key(plane, runner, org)
    now = mid_window()
    reply, rid = await caller.authorize(50 * USD // 100, now)
    assert code(reply) == Code.allow
    assert (await caller.settle(rid, 130 * USD // 100, now))[0] == 0
    shown = await plane.org_limits(org_id)
    assert (shown["spent"], shown["remaining"]) == ("1.30", "0.00")
    denied, _ = await caller.authorize(1, now)
    assert code(denied) == Code.budget_exhausted and level(denied) == "organization"


@pytest.mark.parametrize("period, roll", [("day", {"day": 20_001}),
                                          ("month", {"month": 24_301})])
async def test_periods_roll_over(plane, runner, org, period, roll):
    """A day or month budget starts from nothing in the next period; a total one never."""
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "1.00",
                                                     "budget_period": period})
    await plane.set_org_limits(org_id, {"budget": "1.00"})          # total
    _, caller = await project_key(plane, runner, org)
    now = mid_window()
    reply, rid = await caller.authorize(60 * USD // 100, now)
    assert (await caller.settle(rid, 60 * USD // 100, now))[0] == 0
    denied, _ = await caller.authorize(60 * USD // 100, now)
    assert code(denied) == Code.budget_exhausted and level(denied) == "project"
    # Next period: the project's budget is whole again, the organization's total is not.
    denied, _ = await caller.authorize(60 * USD // 100, now, **roll)
    assert code(denied) == Code.budget_exhausted and level(denied) == "organization"
    reply, rid = await caller.authorize(30 * USD // 100, now, **roll)
    assert code(reply) == Code.allow


@pytest.mark.parametrize("policy, spent", [("c", "0.70"), ("r", "0.00")])
async def test_an_unsettled_reservation_expires_by_the_policy(plane, runner, org, policy,
                                                               spent):
    """Past its ttl a reservation is charged what it reserved (policy charge) or
    released; its report then gets 'no such reservation' and its slot is free again."""
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "1.00",
                                                     "max_concurrency": 1})
    _, caller = await project_key(plane, runner, org)
    now = mid_window()
    now += 1_234                      # off the grid: the hold ends later than the ttl
    ends = expires_at(now, 10_000)
    assert now + 10_000 < ends <= now + 12_500
    reply, rid = await caller.authorize(70 * USD // 100, now, ttl_ms=10_000, expiry=policy)
    assert code(reply) == Code.allow
    denied, _ = await caller.authorize(1, ends - 1, expiry=policy)
    assert code(denied) == Code.concurrency_limited and level(denied) == "project"
    # From its hold's end on, the next call finds the reservation ended by the policy.
    reply, rid2 = await caller.authorize(10 * USD // 100, ends, ttl_ms=10_000, expiry=policy)
    assert code(reply) == Code.allow
    # (as a call at `ends` sees it: the view's own clock is the machine's, not the test's)
    seen = (await stored_state(plane, org_id, names.level_field("project", project))).now(
        20_000, 24_300, ends, charge=policy == "c")
    assert (format_amount(seen.spent), seen.reserved, seen.in_flight) == (spent, USD // 10, 1)
    assert (await caller.settle(rid, 0, ends + 1, expiry=policy))[0] == 3
    assert (await caller.settle(rid2, 10 * USD // 100, ends + 2))[0] == 0
    assert (await plane.project_limits(org_id, project))["in_flight"] == 0


async def test_a_report_is_taken_until_the_hold_ends_and_never_after(plane, runner, org):
    """A report just before its hold ends settles at the reported price; one at the end
    gets 'no such reservation' and changes nothing: the hold's end charges what was
    reserved (the policy), for whoever reads the level next."""
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "1.00"})
    field = names.level_field("project", project)
    _, caller = await project_key(plane, runner, org)
    now = mid_window() + 777
    ends = expires_at(now, 10_000)
    _, on_time = await caller.authorize(40 * USD // 100, now, ttl_ms=10_000)
    _, late = await caller.authorize(30 * USD // 100, now, ttl_ms=10_000)
    assert (await caller.settle(on_time, 5 * USD // 100, ends - 1))[0] == 0
    before = await stored_state(plane, org_id, field)
    assert (await caller.settle(late, 1, ends))[0] == 3
    assert await stored_state(plane, org_id, field) == before     # nothing written
    assert (before.spent, before.reserved, before.holds) == (5 * USD // 100, 30 * USD // 100,
                                                             ((ends, 30 * USD // 100, 0),))
    seen = before.now(20_000, 24_300, ends)                        # as the next call sees it
    assert (seen.spent, seen.reserved, seen.holds) == (35 * USD // 100, 0, ())
    reply, _ = await caller.authorize(10 * USD // 100, ends + 5, ttl_ms=10_000)
    assert code(reply) == Code.allow
    after = await stored_state(plane, org_id, field)
    assert (after.spent, after.reserved) == (35 * USD // 100, 10 * USD // 100)


async def test_a_level_holds_a_few_holds_whatever_the_traffic(plane, runner, org):
    """Reservations made every 100 ms for a minute share at most five holds (the TTL
    over a quarter-TTL grid, plus the one running): the state stays small, expiry costs
    no command and no index of its own."""
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "1000.00",
                                                     "max_concurrency": 100_000})
    field = names.level_field("project", project)
    _, caller = await project_key(plane, runner, org)
    now, sizes = mid_window(), []
    for step in range(600):
        reply, _ = await caller.authorize(USD // 100, now + step * 100, ttl_ms=20_000)
        assert code(reply) == Code.allow
        sizes.append(len((await stored_state(plane, org_id, field)).holds))
    assert max(sizes) <= 5
    state = (await stored_state(plane, org_id, field)).now(20_000, 24_300, now + 59_900)
    # The calls of the last 20 s (200) are held, and at most a quarter more (the grid);
    # the ones before were charged at expiry.
    assert 200 <= state.in_flight <= 250 and state.spent + state.reserved == 600 * USD // 100


async def test_a_reservation_in_the_older_order_still_settles(plane, runner, org):
    """authorize.lua writes '<units> <source> <money> <hold end> <levels>'; a reservation
    made by an older version, with the hold's end last, settles the same way before its
    hold ends and is refused at its end."""
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "1.00"})
    _, caller = await project_key(plane, runner, org, budget="1.00")
    now = mid_window() + 777           # up to 30 s before the clock, which the view uses:
    ends = expires_at(now, 120_000)    # a hold that outlasts the test in real time
    rids = []
    for _ in range(2):
        _, rid = await caller.authorize(40 * USD // 100, now, ttl_ms=120_000)
        name = names.reservation(caller.hash, rid)
        units, source, money, hold, *levels = (await plane.redis.get(name)).decode().split()
        assert int(hold) == ends and sorted(levels) == sorted(
            ["b:k", "b:" + names.level_field("project", project)])
        ttl = await plane.redis.pttl(name)
        await plane.redis.set(name, " ".join([units, source, money, *levels, hold]), px=ttl)
        rids.append(rid)
    settled = await caller.settle(rids[0], 5 * USD // 100, ends - 1)
    assert settled[0] == 0 and settled[4:6] == [40 * USD // 100, 5 * USD // 100]
    shown = await plane.project_limits(org_id, project)
    assert (shown["spent"], shown["reserved"]) == ("0.05", "0.40")
    assert (await caller.settle(rids[1], 1, ends))[0] == 3


async def test_levels_are_packed_in_the_budgets_hash_and_older_text_still_reads(
        plane, runner, org):
    """A call writes every level packed (limits.lua lim_pack), the key's own state in its
    record and the levels above it in the budgets hash; a state an older version stored
    as text, in either place, is read as it was and packed by the next call, nothing
    lost."""
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "10.00"})
    _, caller = await project_key(plane, runner, org, budget="5.00")
    field = names.level_field("project", project)
    tag = plane.keystore.hasher.org_tag(org_id)
    older = f"{10 * USD} {USD} 0 0 t 0 0 - - 0 -"    # the text form: 10.00, 1.00 spent
    await plane.redis.hset(names.budgets(tag), field, older)
    await plane.redis.hset(names.record(caller.hash), "lim",
                           f"{5 * USD} {USD // 2} 0 0 t 0 0 - - 0 -")   # 5.00, 0.50 spent
    now = mid_window()
    reply, _ = await caller.authorize(USD // 10, now)
    assert code(reply) == Code.allow
    raw = await plane.redis.hget(names.budgets(tag), field)
    assert raw[:1] == PACKED_MARK
    after = Limits.unpack(raw)
    assert (after.spent, after.reserved, after.in_flight) == (USD, USD // 10, 0)
    own = await plane.redis.hget(names.record(caller.hash), "lim")
    assert own[:1] == PACKED_MARK
    assert (Limits.unpack(own).spent, Limits.unpack(own).reserved) == (USD // 2, USD // 10)
    shown = await plane.project_limits(org_id, project)
    assert (shown["spent"], shown["reserved"]) == ("1.00", "0.10")
    # The control plane's write (set_limits.lua) of a text state: packed, counters kept.
    await plane.redis.hset(names.budgets(tag), field, older)
    await plane.set_project_limits(org_id, project, {"budget": "20.00"})
    raw = await plane.redis.hget(names.budgets(tag), field)
    assert raw[:1] == PACKED_MARK
    assert (Limits.unpack(raw).budget, Limits.unpack(raw).spent) == (20 * USD, USD)


async def test_a_cut_packed_level_reads_as_none_as_unreadable_text_does(plane, runner,
                                                                        org):
    """A level whose stored value is cut short (or padded) is read as no limits by the
    scripts and by the control plane, as a text state that does not parse is: the call
    is answered, not failed with a script error."""
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "0.01"})
    _, caller = await project_key(plane, runner, org)
    field = names.level_field("project", project)
    tag = plane.keystore.hasher.org_tag(org_id)
    whole = await plane.redis.hget(names.budgets(tag), field)
    now = mid_window()
    assert code((await caller.authorize(USD, now))[0]) == Code.budget_exhausted
    for broken in (whole[:-1], whole + b"\0"):
        await plane.redis.hset(names.budgets(tag), field, broken)
        assert code((await caller.authorize(USD, now))[0]) == Code.allow
        assert Limits.unpack(broken) is None


async def test_concurrency_counts_in_flight_calls_and_settle_frees_them(plane, runner, org):
    _, caller = await project_key(plane, runner, org, max_concurrency=2)
    now = mid_window()
    (first, r1), (second, r2) = [await caller.authorize(0, now) for _ in range(2)]
    assert code(first) == code(second) == Code.allow
    denied, _ = await caller.authorize(0, now)
    assert code(denied) == Code.concurrency_limited and level(denied) == "key"
    assert (await caller.settle(r1, "", now))[0] == 0
    assert code((await caller.authorize(0, now))[0]) == Code.allow


async def test_an_unpriced_model_is_refused_only_where_a_budget_applies(plane, runner, org):
    _, plain = await project_key(plane, runner, org)
    _, budgeted = await project_key(plane, runner, org, budget="5.00")
    now = mid_window()
    assert code((await plain.authorize(-1, now))[0]) == Code.allow
    denied, _ = await budgeted.authorize(-1, now)
    assert code(denied) == Code.model_not_priced


async def test_observe_only_budget_counts_but_never_refuses(plane, runner, org):
    """An observe-only budget: the call that would cross it goes through, the denial it
    would have made is reported (authorize.lua's observed), and it is still counted."""
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "1.00", "observe": ["budget"]})
    _, caller = await project_key(plane, runner, org)
    now = mid_window()
    assert code((await caller.authorize(80 * USD // 100, now))[0]) == Code.allow
    reply, _ = await caller.authorize(80 * USD // 100, now)
    assert code(reply) == Code.allow
    assert reply[13] in (b",11", ",11")
    assert (await plane.project_limits(org_id, project))["reserved"] == "1.60"


async def test_a_budget_without_settlement_is_charged_at_once(plane, runner, org):
    """Without /settle (no reservation key) the worst case is spent at authorize time and
    no slot is taken (nothing would end it)."""
    org_id, project, _ = org
    await plane.set_project_limits(org_id, project, {"budget": "1.00", "max_concurrency": 1})
    _, caller = await project_key(plane, runner, org)
    now = mid_window()
    for _ in range(2):
        reply = await authorize(runner, plane.keystore, caller.key, now=now, money=USD // 2)
        assert code(reply) == Code.allow
    shown = await plane.project_limits(org_id, project)
    assert (shown["spent"], shown["reserved"], shown["in_flight"]) == ("1.00", "0.00", 0)
    reply = await authorize(runner, plane.keystore, caller.key, now=now, money=1)
    assert code(reply) == Code.budget_exhausted


async def test_per_day_limits_and_the_tightest_shown(plane, runner, org):
    """rpd beside rpm: the requests limit shown is the one with less left; the fourth
    call of an rpd=3 key is refused per day (code 14), with the wait of a day's step."""
    _, caller = await project_key(plane, runner, org, rpm=100, rpd=3)
    now = mid_window()
    first = await authorize(runner, plane.keystore, caller.key, now=now)
    assert first[0] == Code.allow and first[5:7] == [3, 2]        # rpd shown, not rpm
    for i in range(2):
        assert (await authorize(runner, plane.keystore, caller.key, now=now + i))[0] == 0
    denied = await authorize(runner, plane.keystore, caller.key, now=now + 2)
    assert denied[0] == Code.rate_limited_day
    assert 86_400_000 / 3 - 10 <= denied[11] <= 86_400_000 / 3    # one step of a day
    # A key whose per-minute limit is tighter shows that one.
    _, minute = await project_key(plane, runner, org, rpm=2, rpd=1000)
    assert (await authorize(runner, plane.keystore, minute.key, now=now))[5:7] == [2, 1]


async def test_reported_tokens_count_per_day(plane, runner, org):
    _, caller = await project_key(plane, runner, org, tpd=100)
    now = mid_window()
    reply, rid = await caller.authorize(0, now)
    assert reply[0] == Code.allow
    settled = await settle_call(runner, caller.hash, rid, now=now, tokens=150)
    assert settled[0] == 0
    denied = await authorize(runner, plane.keystore, caller.key, now=now + 1000)
    assert denied[0] == Code.rate_limited_tokens_day


async def test_observe_only_key_limits_count_but_never_refuse(plane, runner, org):
    """--observe requests,quota: the second call of an rpm=1, quota-1 key goes through;
    the script reports both denials it would have made (9 requests, 8 quota)."""
    org_id, project, _ = org
    view, key = await plane.create_key(org_id, {"owner": "project", "project_id": project,
                                                "quota": 1, "rpm": 1,
                                                "observe": ["requests", "quota"]})
    caller = Caller(runner, plane, key)
    now = mid_window()
    assert (await authorize(runner, plane.keystore, key, now=now))[0] == Code.allow
    again = await authorize(runner, plane.keystore, key, now=now + 1)
    assert again[0] == Code.allow
    assert again[13] in (b",8,9", ",8,9")
    # Counted as usual: the observed call is one unit over the quota, owed.
    assert (await plane.key(org_id, view["id"]))["quota_remaining"] == -1
    # Enforced again: the third call is refused by the quota.
    await plane.set_key_limits(org_id, view["id"], {"observe": []})
    assert (await authorize(runner, plane.keystore, caller.key, now=now + 2))[0] == \
        Code.quota_exhausted
