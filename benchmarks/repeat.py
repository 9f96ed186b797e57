"""Repeated, interleaved runs: one figure per cell from N rounds (medians and spread).

On a shared 2-core machine one wrk run per cell moves ±20% between runs. The harness
measures every cell N times, interleaving the targets compared (A B C D, A B C D, ...),
and reports medians. A ratio is the median of the per-round ratios: each round's ratio
divides figures measured seconds apart, so drift of the machine cancels inside a round.
"""

from __future__ import annotations

import copy
from statistics import median

# Counts that add up over rounds (the combined run covers all of them).
_SUMMED = ("requests", "non_2xx", "socket_errors", "redis_calls", "redis_round_trips",
           "decisions", "allowed", "evalsha")
# Figures of one run that the combined run reports as the median over rounds, with the
# decimals a single run has (a median of an even count would add one).
_MEDIAN = {"rps": 1, "server_cpu_us_per_call": 1, "server_and_redis_cpu_us_per_call": 1,
           "redis_cpu_us_per_decision": 2, "machine_busy_percent": 1,
           "other_processes_cpu_percent": 1}
# The figures whose min-max over rounds is kept beside the median.
_SPREAD = ("rps", "p50", "p99", "server_and_redis_cpu_us_per_call")


def _median(values: list[float | None], digits: int = 3) -> float | None:
    present = [v for v in values if v is not None]
    return round(median(present), digits) if present else None


def _span(values: list[float | None]) -> list[float] | None:
    present = [v for v in values if v is not None]
    return [min(present), max(present)] if present else None


def round_summary(run: dict) -> dict:
    """The few figures of one round kept in the results (the full record is the median)."""
    return {"rps": run["rps"], "p50": run["latency_ms"]["p50"],
            "p99": run["latency_ms"]["p99"],
            "server_and_redis_cpu_us_per_call": run.get("server_and_redis_cpu_us_per_call"),
            "other_processes_cpu_percent": run.get("other_processes_cpu_percent"),
            "requests": run["requests"], "non_2xx": run["non_2xx"],
            "socket_errors": run["socket_errors"]}


def combine(runs: list[dict]) -> dict:
    """One run record from N rounds of the same cell.

    Figures (req/s, every latency percentile, CPU%, CPU per call) are medians over the
    rounds; counts (requests, errors, Redis calls and round trips) are sums, so a denial
    in any round still shows. `rounds` keeps each round's main figures, `spread` their
    min-max. The caller recomputes `saturation` from the median CPU.
    """
    if not runs:
        raise ValueError("combine() needs at least one run")
    out = copy.deepcopy(runs[0])
    out.pop("saturation", None)
    for field, digits in _MEDIAN.items():
        if field in out:
            out[field] = _median([r.get(field) for r in runs], digits)
    out["latency_ms"] = {k: _median([r["latency_ms"][k] for r in runs])
                         for k in runs[0]["latency_ms"]}
    out["cpu_percent"] = {g: _median([r["cpu_percent"].get(g, 0.0) for r in runs], 1)
                          for g in runs[0]["cpu_percent"]}
    for field in _SUMMED:
        if field in out:
            out[field] = sum(r.get(field) or 0 for r in runs)
    out["duration_s"] = round(sum(r["duration_s"] for r in runs), 3)
    if out.get("evalsha") is not None and out["requests"]:
        out["evalsha_per_call"] = round(out["evalsha"] / out["requests"], 3)
    if "calls_per_round_trip" in out:
        trips = out.get("redis_round_trips") or 0
        out["calls_per_round_trip"] = (round(out["redis_calls"] / trips, 2) if trips
                                       else None)
    rounds = [round_summary(r) for r in runs]
    out["repeats"] = len(runs)
    out["rounds"] = rounds
    out["spread"] = {k: _span([r[k] for r in rounds]) for k in _SPREAD}
    return out


def feature_ratios(on: dict, off: dict, over: str) -> dict:
    """One round's ratios of a run with a feature (`on`) to one without (`off`): req/s
    and p99 on / off, CPU per call off / on (server + Redis, sidecar, Redis per decision),
    keyed 'cpu_<over>', 'sidecar_cpu_<over>', 'redis_cpu_<over>'."""
    def r(a, b):
        return round(a / b, 3) if a and b else None
    return {"rps": r(on["rps"], off["rps"]),
            "p99": r(on["latency_ms"]["p99"], off["latency_ms"]["p99"]),
            f"cpu_{over}": r(off.get("server_and_redis_cpu_us_per_call"),
                             on.get("server_and_redis_cpu_us_per_call")),
            f"sidecar_cpu_{over}": r(off.get("server_cpu_us_per_call"),
                                     on.get("server_cpu_us_per_call")),
            f"redis_cpu_{over}": r(off.get("redis_cpu_us_per_decision"),
                                   on.get("redis_cpu_us_per_decision"))}


def median_ratios(per_round: list[dict]) -> tuple[dict, dict]:
    """The median of each ratio over the rounds, and its min-max ([lo, hi])."""
    keys = list(dict.fromkeys(k for r in per_round for k in r))
    medians = {k: _median([r.get(k) for r in per_round]) for k in keys}
    spread = {k: _span([r.get(k) for r in per_round]) for k in keys}
    return medians, spread
