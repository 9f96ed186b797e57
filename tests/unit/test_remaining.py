"""What is left of a key's quota and budget, and the census tally of keys at or below each
threshold (schema/remaining.py, issue 12). Pure; tests/lua/test_census_lua.py holds the
same definitions equal to authorize.lua's on a real redis-server."""

from __future__ import annotations

import pytest

from sidecar.schema.keys import KeyType
from sidecar.schema.limits import Limits
from sidecar.schema.record import KeyRecord
from sidecar.schema.remaining import (
    BUDGET,
    QUOTA,
    Census,
    Left,
    Tally,
    budget_left,
    counted,
    quota_left,
    threshold_labels,
)

NOW = 1_800_000_000_000
DAY, MONTH = 20_833, 684
THRESHOLDS = ("0.2", "0.05", "0")


def key(**attrs) -> KeyRecord:
    return KeyRecord(**{"type": KeyType.standard, "active": True, "expires_ms": 0, **attrs})


def test_a_keys_own_quota_is_qr_of_qr_plus_qu():
    left = quota_left(key(quota_remaining=2, quota_used=8), NOW)
    assert left == Left(2, 10) and left.fraction == 0.2
    assert left.at_most(0.2) and not left.at_most(0.05) and not left.at_most(0)
    assert quota_left(key(quota_remaining=0, quota_used=7), NOW).at_most(0)
    assert quota_left(key(quota_remaining=9, quota_used=0), NOW).fraction == 1


@pytest.mark.parametrize("rec", [key(unlimited=True, quota_remaining=0, quota_used=5),
                                 key(quota_remaining=0, quota_used=0), key(),
                                 key(type=KeyType.subscription, cycle_quota=0)])
def test_no_quota_to_run_low(rec):
    assert quota_left(rec, NOW) is None


def test_a_rotated_keys_pool_holds_what_is_left():
    pooled = key(quota_pool="key_old", quota_remaining=50, quota_used=1)
    assert quota_left(pooled, NOW, pooled=3) == Left(3, 4)
    # the pool field absent: its own qr, as authorize.lua falls back
    assert quota_left(pooled, NOW, pooled=None) == Left(50, 51)
    # a pool value means nothing for a key that names no pool
    assert quota_left(key(quota_remaining=5, quota_used=5), NOW, pooled=0) == Left(5, 10)


def test_a_subscription_cycle_and_its_renewal():
    sub = dict(type=KeyType.subscription, cycle_quota=10, cycle_used=9, cycle_ms=1000)
    assert quota_left(key(**sub, cycle_end_ms=NOW + 1), NOW) == Left(1, 10)
    assert quota_left(key(**sub, cycle_end_ms=NOW), NOW) == Left(10, 10)   # renewed
    no_period = {**sub, "cycle_ms": 0}
    assert quota_left(key(**no_period, cycle_end_ms=NOW - 5), NOW) == Left(1, 10)
    assert quota_left(key(**sub, cycle_end_ms=NOW + 1, unlimited=True), NOW) is None


def test_the_budget_left_counts_what_is_reserved_and_rolls_over():
    total = Limits(budget=1_000_000, spent=700_000, reserved=200_000).pack()
    assert budget_left(key(limits=total), DAY, MONTH) == Left(100_000, 1_000_000)
    old_day = Limits(budget=1_000_000, spent=999_000, reserved=50_000, period="d",
                     window=DAY - 1).pack()
    assert budget_left(key(limits=old_day), DAY, MONTH) == Left(950_000, 1_000_000)
    this_month = Limits(budget=10, spent=12, period="m", window=MONTH).pack()
    assert budget_left(key(limits=this_month), DAY, MONTH) == Left(-2, 10)
    assert budget_left(key(limits=this_month), DAY, MONTH).fraction == 0
    assert budget_left(key(limits=Limits(max_concurrency=3).pack()), DAY, MONTH) is None
    assert budget_left(key(), DAY, MONTH) is None
    assert budget_left(key(limits="garbage"), DAY, MONTH) is None


def test_the_boundary_is_the_scripts_left_at_most_t_times_total():
    # th_cross's comparison, in doubles: 1 of 20 is at 0.05, 4 of 20 at 0.2
    assert Left(1, 20).at_most(0.05) and Left(4, 20).at_most(0.2)
    assert not Left(5, 20).at_most(0.2) and not Left(1, 20).at_most(0)
    assert Left(-3, 20).at_most(0)


@pytest.mark.parametrize("rec,why", [
    (key(active=False, quota_remaining=0, quota_used=5), "disabled"),
    (key(expires_ms=NOW, quota_remaining=0, quota_used=5), "expired"),
    (key(type=KeyType.admin, quota_remaining=0, quota_used=5), "admin"),
    (key(rotated_to="key_next", quota_remaining=0, quota_used=5), "rotated"),
])
def test_keys_that_cannot_use_what_is_left_are_not_counted(rec, why):
    assert not counted(rec, NOW), why
    tally = Tally(THRESHOLDS)
    tally.add(rec, NOW, DAY, MONTH)
    assert tally.keys == 1 and not any(tally.counts.values())
    assert counted(key(expires_ms=NOW + 1), NOW)


def test_the_tally_by_kind_and_threshold():
    tally = Tally(THRESHOLDS)
    budget = Limits(budget=100, spent=90).pack()           # 10% of the budget left
    for rec in (key(quota_remaining=1, quota_used=9),      # 0.1: under 0.2
                key(quota_remaining=1, quota_used=19),     # 0.05: under 0.2 and 0.05
                key(quota_remaining=0, quota_used=3),      # 0: under all three
                key(quota_remaining=50, quota_used=50),    # 0.5: none
                key(unlimited=True, limits=budget)):       # budget only
        tally.add(rec, NOW, DAY, MONTH)
    assert tally.keys == 5
    assert tally.counts == {(QUOTA, "0.2"): 3, (QUOTA, "0.05"): 2, (QUOTA, "0"): 1,
                            (BUDGET, "0.2"): 1, (BUDGET, "0.05"): 0, (BUDGET, "0"): 0}
    assert Tally(()).counts == {}


def test_threshold_labels_are_the_packed_defaults():
    assert threshold_labels("0.2,0.05,0") == THRESHOLDS
    assert threshold_labels("n") == () and threshold_labels("-") == ()


def test_the_census_round_trips_through_its_hash():
    census = Census(NOW, 12, 5, True, "host-1-abc", {(QUOTA, "0.2"): 3, (BUDGET, "0"): 0})
    stored = census.to_hash()
    assert stored == {"at": str(NOW), "took_ms": "12", "keys": "5", "complete": "1",
                      "by": "host-1-abc", "quota:0.2": "3", "budget:0": "0"}
    assert Census.from_hash(stored) == census
    assert Census.from_hash({k.encode(): v.encode() for k, v in stored.items()}) == census
    partial = Census(NOW, 1, 1_000_000, False, "h", {})
    assert Census.from_hash(partial.to_hash()) == partial
    assert Census.from_hash({}) is None
    assert Census.from_hash({"at": "soon", "keys": "1"}) is None


def test_a_budgets_ended_holds_count_by_the_expiry_policy():
    """As the next call would see it: a hold that has ended is spent (charge) or given
    back (release); one still running stays reserved."""
    state = Limits(budget=100, spent=50, reserved=40,
                   holds=((NOW - 1, 30, 0), (NOW + 10_000, 10, 0))).pack()
    rec = key(unlimited=True, limits=state)
    assert budget_left(rec, DAY, MONTH, NOW, charge=True) == Left(10, 100)
    assert budget_left(rec, DAY, MONTH, NOW, charge=False) == Left(40, 100)
    released = Tally(("0.2",), charge_expired=False)
    released.add(rec, NOW, DAY, MONTH)
    charged = Tally(("0.2",))
    charged.add(rec, NOW, DAY, MONTH)
    assert (released.counts["budget", "0.2"], charged.counts["budget", "0.2"]) == (0, 1)
