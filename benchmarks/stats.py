"""Counters read around a run: the sidecar's /metrics, Redis INFO, and who saturated."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class SidecarCounters:
    batch_calls_sum: float      # authorize calls sent to Redis
    batch_count: float          # round trips (pipelined writes)
    allowed: float              # decisions answered 200 "ok"
    decisions: float            # all decisions


def sidecar_counters(metrics_text: str) -> SidecarCounters:
    values: dict[str, float] = {"sum": 0.0, "count": 0.0, "ok": 0.0, "all": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "sidecar_redis_batch_calls_sum":
                values["sum"] += sample.value
            elif sample.name == "sidecar_redis_batch_calls_count":
                values["count"] += sample.value
            elif sample.name == "sidecar_decisions_total":
                values["all"] += sample.value
                if sample.labels.get("status") == "200":
                    values["ok"] += sample.value
    return SidecarCounters(values["sum"], values["count"], values["ok"], values["all"])


def round_trip_figures(before: SidecarCounters, after: SidecarCounters) -> dict:
    calls = after.batch_calls_sum - before.batch_calls_sum
    trips = after.batch_count - before.batch_count
    return {
        "redis_calls": int(calls),
        "redis_round_trips": int(trips),
        "calls_per_round_trip": round(calls / trips, 2) if trips else None,
        "decisions": int(after.decisions - before.decisions),
        "allowed": int(after.allowed - before.allowed),
    }


def redis_cpu_seconds(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_commands(client, before: dict | None = None) -> dict:
    """Commands Redis ran so far (INFO commandstats, INFO itself left out): all and
    EVALSHA; with `before`, the difference since then."""
    stats = client.info("commandstats")
    now = {"all": sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info"),
           "evalsha": stats.get("cmdstat_evalsha", {}).get("calls", 0)}
    return {k: v - before[k] for k, v in now.items()} if before else now


def redis_command_counts(client, before: dict | None = None) -> dict[str, int]:
    """Calls per command name (INFO commandstats, INFO itself left out; a script's own
    redis.call()s count under their names); with `before`, the difference since then."""
    now = {k.removeprefix("cmdstat_"): int(v["calls"])
           for k, v in client.info("commandstats").items() if k != "cmdstat_info"}
    if before is None:
        return now
    return {k: n - before.get(k, 0) for k, n in now.items() if n - before.get(k, 0)}


def saturation(run: dict, processes: dict[str, int], cores: int) -> dict:
    """Which process held its core(s) during a run.

    A single-threaded process (each sidecar worker, redis-server, each nginx worker, each
    wrk thread) cannot use more than 100% of a core: at >= 85% on average it is the
    bottleneck. When the whole machine is >= 90% busy, the cores are the limit and the
    busiest group is named as the one that would gain from more.
    """
    cpu = run["cpu_percent"]
    per_process = {g: round(cpu.get(g, 0.0) / max(n, 1), 1) for g, n in processes.items()}
    saturated = sorted((g for g, v in per_process.items() if v >= 85.0),
                       key=lambda g: -per_process[g])
    machine = run["machine_busy_percent"] >= 90.0
    busiest = max(cpu, key=lambda g: cpu[g]) if cpu else None
    if saturated:
        verdict = f"{', '.join(saturated)} at its core limit"
    elif machine:
        verdict = f"the machine ({cores} cores) is saturated; busiest: {busiest}"
    else:
        verdict = "nothing saturated (latency-bound)"
    return {"per_process_percent": per_process, "saturated": saturated,
            "machine_saturated": machine, "verdict": verdict}
