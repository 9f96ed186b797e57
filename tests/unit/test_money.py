"""Pure tests of money: amounts, prices, the cost of a call and its worst case, the
budget state's packing and the calendar a period turns on."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.dataplane.spend import UNPRICED, Estimator, output_cap, usage_of
from sidecar.schema.limits import PACKED_MARK, Calendar, Limits
from sidecar.schema.money import (
    MAX_AMOUNT,
    MAX_TOKENS,
    MICRO,
    BadAmount,
    Price,
    PriceList,
    Usage,
    cost,
    format_amount,
    parse_amount,
    prompt_estimate,
    reservation,
)

PRICE = Price(input=2_500_000, output=10_000_000, cached_input=1_250_000)   # per million


@pytest.mark.parametrize("text, micro", [("5", 5 * MICRO), ("5.00", 5 * MICRO),
                                         ("0.000001", 1), ("12.5", 12_500_000),
                                         (" 3.25 ", 3_250_000), ("0", 0)])
def test_amounts_are_exact_micro_units(text, micro):
    assert parse_amount(text) == micro


@pytest.mark.parametrize("bad", ["5.0000001", "-1", "1e3", "five", "", "1,5", ".5", "5.",
                                 5.0, 5, None, "99999999999"])
def test_bad_amounts_are_refused_with_a_reason(bad):
    with pytest.raises(BadAmount) as err:
        parse_amount(bad, what="budget")
    assert str(err.value).startswith("budget:")


def test_amounts_above_the_bound_are_refused():
    assert parse_amount(format_amount(MAX_AMOUNT)) == MAX_AMOUNT
    with pytest.raises(BadAmount):
        parse_amount(format_amount(MAX_AMOUNT + 1))


@given(st.integers(min_value=0, max_value=MAX_AMOUNT))
def test_format_and_parse_round_trip(micro):
    assert parse_amount(format_amount(micro)) == micro


def test_format_shows_two_decimals_or_as_many_as_needed():
    assert [format_amount(m) for m in (5 * MICRO, 1, 125, 1_500_000, -250_000)] == \
        ["5.00", "0.000001", "0.000125", "1.50", "-0.25"]


@given(st.integers(0, MAX_TOKENS), st.integers(0, MAX_TOKENS), st.integers(0, MAX_TOKENS),
       st.integers(0, 10**10), st.integers(0, 10**10), st.integers(0, 10**10))
def test_cost_rounds_toward_the_house_by_less_than_one_micro_unit(inp, out, cached, pi, po,
                                                                 pc):
    """Never below the exact price (the house loses nothing), never a whole micro-unit
    above it; huge token counts stay exact (Python integers)."""
    price = Price(pi, po, pc)
    usage = Usage(inp, out, cached)
    cached = min(cached, inp)
    exact = Fraction((inp - cached) * pi + cached * pc + out * po, MICRO)
    charged = cost(price, usage)
    assert exact <= charged < exact + 1


def test_cost_of_known_calls():
    assert cost(PRICE, Usage(1000, 500)) == 2_500 + 5_000
    assert cost(PRICE, Usage(1000, 0, cached=400)) == 600 * 2.5 + 400 * 1.25
    assert cost(PRICE, Usage(1, 0)) == 3                       # 2.5 rounded up
    assert cost(PRICE, Usage(0, 0)) == 0
    assert cost(PRICE, Usage(10, 0, cached=99)) == 13          # cached beyond input: input


@given(st.integers(0, MAX_TOKENS), st.integers(0, MAX_TOKENS))
def test_the_worst_case_is_the_cost_of_the_whole_prompt_and_output_cap(prompt, cap):
    assert reservation(PRICE, prompt, cap) == cost(PRICE, Usage(prompt, cap))


def test_the_worst_case_prices_every_prompt_token_at_the_full_input_price():
    assert reservation(PRICE, 1000, 500) == cost(PRICE, Usage(1000, 500))
    assert reservation(PRICE, 1000, 500) >= cost(PRICE, Usage(1000, 500, cached=1000))


def test_prompt_estimate_rounds_up():
    assert [prompt_estimate(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_price_lists_and_unknown_models():
    table = PriceList.parse({"a": {"input": "1", "output": "2"}}, None)
    assert table.of("a") == Price(MICRO, 2 * MICRO, MICRO)    # cached: the input price
    assert table.of("b") is None
    with_default = PriceList.parse({}, {"input": "0.5", "output": "1.5"})
    assert with_default.of("anything") == Price(500_000, 1_500_000, 500_000)
    assert not PriceList.parse(None, None)
    for bad in ({"a": {"input": "1"}}, {"a": {"input": "1", "output": "x"}},
                {"a": {"input": "1", "output": "2", "extra": "3"}}, ["a"]):
        with pytest.raises(BadAmount):
            PriceList.parse(bad, None)


def test_output_caps_are_read_from_the_top_level_only():
    assert output_cap(b'{"model":"m","max_tokens":500}') == 500
    assert output_cap(b'{"max_completion_tokens":7,"max_tokens":9}') == 9
    assert output_cap(b'{"max_output_tokens":64}') == 64
    # Nested (a tool schema), absent, not JSON, zero or a bool: no cap from the body.
    assert output_cap(b'{"tools":[{"max_tokens":1}]}') is None
    assert output_cap(b'{"model":"m"}') is None
    assert output_cap(b'\x1f\x8b max_tokens') is None
    assert output_cap(b'{"max_tokens":0}') is None
    assert output_cap(b'{"max_tokens":true}') is None
    assert output_cap(b'{"max_tokens":99999999999999}') == MAX_TOKENS


def test_the_estimate_uses_a_trusted_prompt_count_else_the_body():
    est = Estimator(PriceList({"m": PRICE}), default_output=100, bytes_per_token=4)
    body = b'{"model":"m","max_tokens":10,"messages":[]}'       # 44 bytes: 11 tokens
    assert est.worst_case("m", body, {}, trusted=False) == reservation(PRICE, 11, 10)
    assert est.worst_case("m", body, {"x-prompt-tokens": "1000"}, trusted=True) == \
        reservation(PRICE, 1000, 10)
    # From an untrusted peer the header is ignored; a bad value is ignored too.
    assert est.worst_case("m", body, {"x-prompt-tokens": "1000"}, trusted=False) == \
        reservation(PRICE, 11, 10)
    assert est.worst_case("m", body, {"x-prompt-tokens": "-5"}, trusted=True) == \
        reservation(PRICE, 11, 10)
    # A body cut at max_body_bytes is sized by its Content-Length.
    assert est.worst_case("m", body[:10], {"content-length": "400"}, trusted=False) == \
        reservation(PRICE, 100, 100)
    assert est.worst_case("other", body, {}, trusted=False) == UNPRICED
    assert Estimator(PriceList({}), 100, 4).worst_case("m", body, {}, False) == UNPRICED


def test_usage_in_each_upstream_dialect():
    assert usage_of({"prompt_tokens": 10, "completion_tokens": 5,
                     "prompt_tokens_details": {"cached_tokens": 4}}) == Usage(10, 5, 4)
    assert usage_of({"input_tokens": 10, "output_tokens": 5,
                     "cache_read_input_tokens": 20,
                     "cache_creation_input_tokens": 3}) == Usage(33, 5, 20)
    assert usage_of({"input_tokens": 10, "output_tokens": 5,
                     "input_tokens_details": {"cached_tokens": 6}}) == Usage(10, 5, 6)
    assert usage_of({"model": "m"}) is None
    for bad in ({"prompt_tokens": -1}, {"output_tokens": 1.5}, {"input_tokens": True},
                {"prompt_tokens": 1, "prompt_tokens_details": [1]}):
        with pytest.raises(ValueError):
            usage_of(bad)


def test_the_older_text_form_still_reads():
    """States stored before they were packed are read as they were (limits.lua too)."""
    state = Limits(budget=5 * MICRO, spent=10, reserved=20, window=20_000, period="d",
                   max_concurrency=3, in_flight=1, observe="bc",
                   holds=((1_000_000, 15, 1), (2_000_000, 5, 0)))
    text = "5000000 10 20 20000 d 3 1 bc - 0 1000000:15:1,2000000:5:0"
    assert Limits.unpack(text) == state == Limits.unpack(text.encode())
    assert Limits.unpack("7 0 0 0 t 0 0 - - 0 -") == Limits(budget=7)
    assert Limits.unpack("1 2 3") is None and Limits.unpack(None) is None
    assert Limits.unpack("1 2 3 4 w 5 6 -") is None          # no such period


def test_the_stored_form_is_packed_and_reads_back_whole():
    """Every level is stored packed (limits.lua lim_pack): the same state as the text it
    replaced; a cut or padded value, or one with no such period, reads as none."""
    state = Limits(budget=10 ** 15, spent=10, reserved=20, window=20_000, period="m",
                   max_concurrency=100_000, in_flight=7, observe="bc", thresholds="0.5,0",
                   fired=2, holds=((1_733_280_000_000, 15, 1), (1_733_280_001_000, 5, 6)))
    packed = state.pack()
    assert packed[:1] == PACKED_MARK and Limits.unpack(packed) == state
    assert Limits.unpack(Limits().pack()) == Limits()
    text = ("1000000000000000 10 20 20000 m 100000 7 bc 0.5,0 2 "
            "1733280000000:15:1,1733280001000:5:6")
    assert Limits.unpack(text) == Limits.unpack(packed)
    period_at = 1 + 3 * 8 + 4     # the marker, budget, spent, reserved, window
    assert packed[period_at:period_at + 1] == b"m"
    for junk in (packed[:-1], packed + b"\0", packed[:30], PACKED_MARK,
                 packed[:period_at] + b"w" + packed[period_at + 1:]):
        assert Limits.unpack(junk) is None


def test_older_forms_hold_what_they_reserved_in_a_hold_that_has_ended():
    ten = Limits.unpack("100 10 20 0 t 3 1 - - 0")
    eight = Limits.unpack("100 10 20 0 t 3 1 -")
    for old in (ten, eight):
        assert old.holds == ((0, 20, 1),) and old.thresholds == "-"
        assert old.now(0, 0, 5).spent == 30 and old.now(0, 0, 5).in_flight == 0
        assert old.now(0, 0, 5, charge=False).spent == 10


def test_a_hold_that_ended_is_charged_or_released_and_frees_its_slots():
    lim = Limits(budget=MICRO, spent=100, reserved=50, max_concurrency=5, in_flight=3,
                 holds=((1_000, 30, 2), (2_000, 20, 1)))
    assert lim.now(0, 0, 999) == lim                      # nothing has ended yet
    charged = lim.now(0, 0, 1_000)
    assert (charged.spent, charged.reserved, charged.in_flight) == (130, 20, 1)
    assert charged.holds == ((2_000, 20, 1),)
    released = lim.now(0, 0, 2_500, charge=False)
    assert (released.spent, released.reserved, released.in_flight) == (100, 0, 0)


def test_a_new_period_starts_with_nothing_spent():
    day = Limits(budget=MICRO, spent=500, reserved=7, window=20_000, period="d")
    assert day.now(20_000, 1) == day
    assert day.now(20_001, 1) == Limits(budget=MICRO, spent=0, reserved=7, window=20_001,
                                        period="d")
    total = Limits(budget=MICRO, spent=500, period="t")
    assert total.now(20_001, 99) == total


def test_the_calendar_turns_at_midnight_in_its_time_zone():
    utc, tokyo = Calendar("UTC"), Calendar("Asia/Tokyo")
    # 2026-01-31T20:00:00Z: still the 31st in UTC, already February 1st in Tokyo.
    at = 1_769_889_600_000
    day, month = utc.numbers(at)
    assert month == 2026 * 12 + 0
    assert tokyo.numbers(at) == (day + 1, 2026 * 12 + 1)
    assert utc.numbers(at + 4 * 3_600_000)[0] == day + 1       # midnight UTC
