"""The hot path tallies its metrics in plain Python and flush() adds them to the stored
values (runtime/metrics.py): the series Prometheus reads must be what Counter.inc and
Histogram.observe would have made, and nothing shows or is lost before a flush."""

from __future__ import annotations

from sidecar.runtime import metrics


def _samples() -> dict[tuple, float]:
    out = {}
    for family in (metrics.DECISIONS, metrics.AUTHORIZE_SECONDS, metrics.REDIS_SECONDS,
                   metrics.BATCH_SIZE):
        for metric in family.collect():
            for s in metric.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_a_decision_counts_once_and_lands_in_its_latency_buckets():
    before = _samples()
    metrics.decision(429, "rate_limited", 0.00025)   # on a bound: counted as <= it
    metrics.decision(429, "rate_limited", 7.0)       # beyond the last bound: +Inf only
    assert _delta(before, _samples()) == {}          # tallied, not shown yet
    metrics.flush()
    got = _delta(before, _samples())
    assert got[("sidecar_decisions_total", (("code", "rate_limited"),
                                            ("status", "429")))] == 2
    buckets = {dict(k[1])["le"]: v for k, v in got.items()
               if k[0] == "sidecar_authorize_duration_seconds_bucket"}
    # Cumulative buckets: the 0.00025 s call is in le=0.00025 and every bucket above it;
    # the 7 s call only in +Inf.
    assert "0.0001" not in buckets
    assert {le: n for le, n in buckets.items() if le != "+Inf"} == {
        le: 1.0 for le in buckets if le != "+Inf"}
    assert buckets["0.00025"] == 1.0 and buckets["1.0"] == 1.0 and buckets["+Inf"] == 2.0
    assert got[("sidecar_authorize_duration_seconds_count", ())] == 2
    assert abs(got[("sidecar_authorize_duration_seconds_sum", ())] - 7.00025) < 1e-9


def test_round_trips_and_batches_are_histograms_once_flushed():
    metrics.flush()
    before = _samples()
    metrics.redis_round_trip(0.0004)
    metrics.redis_batch(12)
    metrics.redis_batch(1)
    metrics.flush()
    got = _delta(before, _samples())
    assert got[("sidecar_redis_roundtrip_seconds_count", ())] == 1
    assert got[("sidecar_redis_roundtrip_seconds_bucket", (("le", "0.0005"),))] == 1
    assert ("sidecar_redis_roundtrip_seconds_bucket", (("le", "0.00025"),)) not in got
    assert got[("sidecar_redis_batch_calls_count", ())] == 2
    assert got[("sidecar_redis_batch_calls_sum", ())] == 13
    assert got[("sidecar_redis_batch_calls_bucket", (("le", "1.0"),))] == 1
    assert got[("sidecar_redis_batch_calls_bucket", (("le", "16.0"),))] == 2
    metrics.flush()                                   # a second flush adds nothing
    assert _delta(before, _samples()) == got


def test_the_exposition_flushes_first():
    metrics.decision(200, "ok", 0.0003)
    text = metrics.exposition().decode()
    assert 'sidecar_decisions_total{code="ok",status="200"}' in text
    assert metrics._decisions == {}
