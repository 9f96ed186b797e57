"""Alert thresholds (issue 12): their parsing, the scripts' form, and the level state's
two new words (schema/limits.py). Pure."""

from __future__ import annotations

import pytest

from sidecar.schema.limits import (
    BadThresholds,
    Limits,
    pack_thresholds,
    parse_thresholds,
    unpack_thresholds,
)


def test_thresholds_parse_sorted_highest_first_and_pack():
    assert parse_thresholds("0,0.5, 0.1") == (0.5, 0.1, 0.0)
    assert parse_thresholds([0.05, 0.2, 0, 0.2]) == (0.2, 0.05, 0.0)
    assert pack_thresholds((0.2, 0.05, 0.0)) == "0.2,0.05,0"
    assert pack_thresholds(()) == "n" and pack_thresholds(None) == "-"
    assert unpack_thresholds("n", (0.2,)) == () and unpack_thresholds("-", (0.2,)) == (0.2,)
    assert unpack_thresholds("0.5,0", (0.2,)) == (0.5, 0.0)


@pytest.mark.parametrize("bad", ["x", "1", "-0.1", [1.0], [True], [0.1] * 9, "0.5,,abc",
                                 {"a": 1}])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(BadThresholds):
        parse_thresholds(bad)


def test_the_state_keeps_thresholds_and_reads_old_eight_word_states():
    state = Limits(budget=5, thresholds="0.5,0", fired=1)
    assert Limits.unpack(state.pack()) == state
    assert Limits.unpack("5 0 0 0 t 0 0 - 0.5,0 1 -") == state
    old = Limits.unpack("5 1 0 0 t 0 0 -")
    assert (old.thresholds, old.fired) == ("-", 0)
    # a new window re-arms the alerts
    daily = Limits(budget=5, spent=3, window=7, period="d", fired=2)
    assert daily.now(8, 0).fired == 0 and daily.now(7, 0).fired == 2
    assert not Limits(thresholds="n").empty()
