"""All Prometheus objects, behind functions named for what happened.

No label ever holds a key, a key id or a client IP: labels are bounded enums.
With `--workers N` the processes share values through PROMETHEUS_MULTIPROC_DIR (set by
the supervisor before this module is imported) and the admin listener aggregates them.
"""

from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from ..schema.remaining import Census

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0)

DECISIONS = Counter("sidecar_decisions", "Authorize decisions by HTTP status and code",
                    ["status", "code"])
AUTHORIZE_SECONDS = Histogram("sidecar_authorize_duration_seconds",
                              "Time to answer one authorize call", buckets=_LATENCY_BUCKETS)
REDIS_SECONDS = Histogram("sidecar_redis_roundtrip_seconds",
                          "Time of one pipelined Redis round trip", buckets=_LATENCY_BUCKETS)
REDIS_ERRORS = Counter("sidecar_redis_errors", "Redis failures by kind", ["kind"])
BATCH_SIZE = Histogram("sidecar_redis_batch_calls", "Authorize calls sharing one round trip",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
FAIL_OPEN = Counter("sidecar_fail_open", "Calls allowed without a decision (failure_mode=open)")
REDIS_UP = Gauge("sidecar_redis_up",
                 "1 while the hot-path connection (or the last probe) reaches Redis",
                 multiprocess_mode="min")
SHADOW_DENIALS = Counter("sidecar_shadow_denials", "Denials an observe-only limit or budget "
                         "would have made (the call went on)", ["code"])
SETTLEMENTS = Counter("sidecar_settlements", "Usage reports by result", ["result"])
# Webhooks: outcome is delivered | failed (an attempt; it is retried) | dead_letter.
WEBHOOK_DELIVERIES = Counter("sidecar_webhook_deliveries",
                             "Webhook delivery attempts by outcome", ["outcome"])
WEBHOOK_LAG = Histogram("sidecar_webhook_delivery_lag_seconds",
                        "From an event to its successful delivery",
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
                                 14400, 86400))
WEBHOOK_DEAD_LETTERS = Counter("sidecar_webhook_dead_letters",
                               "Deliveries moved to the dead-letter stream after their "
                               "retry window")
# Alerts (issue 12): crossings the scripts appended, counted by the webhook worker as it
# takes each event (once per deployment), by kind (the event type) and threshold: a
# common fraction as itself, any other as "other", so no key or level shows.
THRESHOLD_CROSSINGS = Counter("sidecar_threshold_crossings",
                              "Quota and budget thresholds crossed, and keys first refused "
                              "as expired", ["kind", "threshold"])
COMMON_THRESHOLDS = frozenset({"0", "0.01", "0.05", "0.1", "0.2", "0.25", "0.5", "0.75"})
# The threshold census (runtime/census.py): one sidecar counts, every sidecar shows the
# stored result. kind: quota | budget; threshold: one of the deployment's
# alert_thresholds (at most limits.MAX_THRESHOLDS values). Only the process running the
# admin listener sets them: with --workers N the most recent value is shown.
KEYS_BELOW = Gauge("sidecar_keys_below_threshold",
                   "Keys whose quota (or own budget) left is at or below the threshold, "
                   "as the last census counted", ["kind", "threshold"],
                   multiprocess_mode="mostrecent")
CENSUS_TIME = Gauge("sidecar_threshold_census_timestamp_seconds",
                    "When the last threshold census began (Unix time; 0: none known yet)",
                    multiprocess_mode="mostrecent")
CENSUS_KEYS = Gauge("sidecar_threshold_census_keys",
                    "Key records the last threshold census examined",
                    multiprocess_mode="mostrecent")
CENSUS_COMPLETE = Gauge("sidecar_threshold_census_complete",
                        "1 when the last threshold census examined every key, 0 when its "
                        "cap stopped it first", multiprocess_mode="mostrecent")

# The hot path's metrics (a decision's count and latency, a round trip's time and size)
# are tallied in plain Python and added to the Prometheus values by flush(): every
# FLUSH_S in each data-plane process (start_flushing), before this process's own
# exposition, and when it stops. A value's increment costs ~0.35 µs in one process and
# ~1.1 µs with --workers N (prometheus_client's mmap files: a lock, a getpid() and a
# write per increment), three or more per decision; a tally costs a dict and a list
# update. So with --workers N a scrape sees each worker's series up to FLUSH_S late.
# tests/unit/test_metrics.py and tests/edges/test_observability.py read them back.
FLUSH_S = 1.0


class _Histogram:
    """A histogram's observations since the last flush: its bucket counts and sum."""

    __slots__ = ("family", "bounds", "counts", "sum")

    def __init__(self, family: Histogram):
        self.family = family
        self.bounds = list(family._upper_bounds)       # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def flush(self) -> None:
        # The stored values themselves (Histogram.observe would add exemplar checks and
        # a Python loop over the buckets): a bucket holds its own count, exposition sums.
        counts, self.counts = self.counts, [0] * len(self.bounds)
        for stored, n in zip(self.family._buckets, counts, strict=True):
            if n:
                stored.inc(n)
        if any(counts):
            self.family._sum.inc(self.sum)
        self.sum = 0.0


_decisions: dict[tuple[int, str], int] = {}
_decision_values: dict[tuple[int, str], object] = {}
_latency = _Histogram(AUTHORIZE_SECONDS)
_round_trips = _Histogram(REDIS_SECONDS)
_batches = _Histogram(BATCH_SIZE)


def decision(status: int, code: str, seconds: float) -> None:
    key = (status, code)
    _decisions[key] = _decisions.get(key, 0) + 1
    _latency.observe(seconds)


def redis_round_trip(seconds: float) -> None:
    _round_trips.observe(seconds)


def redis_batch(calls: int) -> None:
    _batches.observe(calls)


def flush() -> None:
    """Add what the hot path tallied since the last flush to the Prometheus values."""
    for key, n in _decisions.items():
        value = _decision_values.get(key)
        if value is None:
            value = _decision_values[key] = DECISIONS.labels(str(key[0]), key[1])._value
        value.inc(n)
    _decisions.clear()
    for histogram in (_latency, _round_trips, _batches):
        histogram.flush()


def start_flushing(loop) -> None:
    """Flush every FLUSH_S on `loop`, for as long as it runs."""
    def tick() -> None:
        flush()
        loop.call_later(FLUSH_S, tick)
    loop.call_later(FLUSH_S, tick)


_error_children: dict[str, Counter] = {}


def redis_error(kind: str) -> None:
    child = _error_children.get(kind)
    if child is None:
        child = _error_children[kind] = REDIS_ERRORS.labels(kind)
    child.inc()


def fail_open() -> None:
    FAIL_OPEN.inc()


def redis_up(up: bool) -> None:
    REDIS_UP.set(1 if up else 0)


def settlement(result: str) -> None:
    SETTLEMENTS.labels(result).inc()


def webhook_delivered(lag_seconds: float) -> None:
    WEBHOOK_DELIVERIES.labels("delivered").inc()
    WEBHOOK_LAG.observe(max(lag_seconds, 0.0))


def webhook_failed() -> None:
    WEBHOOK_DELIVERIES.labels("failed").inc()


def webhook_dead_letter() -> None:
    WEBHOOK_DELIVERIES.labels("dead_letter").inc()
    WEBHOOK_DEAD_LETTERS.inc()


def exposition() -> bytes:
    """The text format, aggregated across worker processes when there are several."""
    flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()



def shadow_denial(code: str) -> None:
    """A denial an observe-only limit would have made (the contract's code)."""
    SHADOW_DENIALS.labels(code).inc()


def threshold_crossing(kind: str, threshold: str | None) -> None:
    label = "" if threshold is None else (
        threshold if threshold in COMMON_THRESHOLDS else "other")
    THRESHOLD_CROSSINGS.labels(kind, label).inc()


_census_series: set[tuple[str, str]] = set()


def threshold_census(census: Census) -> None:
    """Show a census result (read from Redis): its counts, time, keys and completeness."""
    for gone in _census_series - census.counts.keys():
        KEYS_BELOW.remove(*gone)
        _census_series.discard(gone)
    for (kind, threshold), count in census.counts.items():
        KEYS_BELOW.labels(kind, threshold).set(count)
        _census_series.add((kind, threshold))
    CENSUS_TIME.set(census.at_ms / 1000)
    CENSUS_KEYS.set(census.keys)
    CENSUS_COMPLETE.set(1 if census.complete else 0)
