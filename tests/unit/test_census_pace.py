"""The census is paced (runtime/census.py): its batches are spread over SPREAD_SHARE of the
interval, never more than MAX_PAUSE_S apart, so the sidecar that takes it keeps serving."""

import pytest

from sidecar.runtime import census


@pytest.mark.parametrize("keys", [100_000, 1_000_000, 5_000_000])
@pytest.mark.parametrize("interval", [60.0, 300.0, 3600.0])
def test_a_census_of_many_keys_spreads_over_half_the_interval(keys, interval):
    batches = -(-keys // census.BATCH)
    gap = census.pause(keys, interval)
    assert 0 < gap <= census.MAX_PAUSE_S
    # spread: its batches, one per gap, end within the spread share of the interval
    assert batches * gap <= census.SPREAD_SHARE * interval + 1e-9
    if gap < census.MAX_PAUSE_S:   # not capped: it uses the share, not less
        assert batches * gap == pytest.approx(census.SPREAD_SHARE * interval)


@pytest.mark.parametrize("keys", [0, 1, census.BATCH, 3 * census.BATCH])
def test_a_census_of_few_keys_is_not_drawn_out(keys):
    assert census.pause(keys, 86_400) == census.MAX_PAUSE_S
