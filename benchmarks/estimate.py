"""Figures derived from a run's own measurements: where the machine saturates, and a
paper estimate of what 1M decisions/s would take. Pure arithmetic over results.json."""

from __future__ import annotations

import math


def machine_ceiling(run: dict, cores: int, groups: tuple[str, ...]) -> dict | None:
    """The req/s the cores left over could carry at this run's CPU per call.

    Every process of the call (server, Redis, wrk) spends CPU per answered call; what
    the other agents on the machine took is not ours. ceiling = (cores x 100% - others)
    / (sum of our CPU per call). A run at ~100% of it is bound by the cores, not by the
    number of workers: a second worker cannot add a core.
    """
    requests, seconds = run.get("requests"), run.get("duration_s")
    if not requests or not seconds:
        return None
    cpu = run["cpu_percent"]
    ours = sum(cpu.get(g, 0.0) for g in groups)
    us_per_call = ours / 100 * seconds / requests * 1e6
    left = cores * 100 - (run.get("other_processes_cpu_percent") or 0.0)
    if us_per_call <= 0:
        return None
    ceiling = left / 100 / us_per_call * 1e6
    return {"us_per_call_all_processes": round(us_per_call, 1),
            "cores_left_percent": round(left, 1), "ceiling_rps": round(ceiling),
            "of_ceiling": round(run["rps"] / ceiling, 3)}


def million(results: dict, target: float = 1e6) -> dict | None:
    """Shards and sidecar cores for `target` decisions/s, from this run's per-decision
    costs: Redis CPU per decision (one core per primary, its one thread) and the
    sidecar's CPU per call (one worker per core)."""
    main = results.get("main", {}).get("authorize")
    if not main or not main.get("redis_cpu_us_per_decision"):
        return None
    redis_us = main["redis_cpu_us_per_decision"]
    car_us = main["server_cpu_us_per_call"]
    out = {"redis_us_per_decision": redis_us, "sidecar_us_per_call": car_us,
           "per_primary_decisions_s": round(1e6 / redis_us),
           "shards_at_100_percent": math.ceil(target * redis_us / 1e6),
           # a primary run near 70% busy leaves room for bursts, replication and failover
           "shards_at_70_percent": math.ceil(target * redis_us / 1e6 / 0.7),
           "sidecar_cores": math.ceil(target * car_us / 1e6),
           "sidecar_cores_at_70_percent": math.ceil(target * car_us / 1e6 / 0.7)}
    budgets = results.get("budgets", {}).get("budgets")
    if budgets and budgets.get("redis_cpu_us_per_decision"):
        b_redis, b_car = budgets["redis_cpu_us_per_decision"], budgets["server_cpu_us_per_call"]
        out["with_budgets"] = {"redis_us_per_decision": b_redis, "sidecar_us_per_call": b_car,
                               "shards_at_70_percent": math.ceil(target * b_redis / 1e6 / 0.7),
                               "sidecar_cores_at_70_percent":
                                   math.ceil(target * b_car / 1e6 / 0.7)}
    cluster = results.get("cluster", {}).get("cluster")
    if cluster and cluster.get("per_node"):
        node_us = max(n["redis_cpu_us_per_decision"] for n in cluster["per_node"])
        out["with_cluster"] = {"redis_us_per_decision_per_node": node_us,
                               "sidecar_us_per_call": cluster["server_cpu_us_per_call"],
                               "shards_at_70_percent": math.ceil(target * node_us / 1e6 / 0.7),
                               "sidecar_cores_at_70_percent": math.ceil(
                                   target * cluster["server_cpu_us_per_call"] / 1e6 / 0.7)}
    return out


def million_markdown(m: dict | None) -> list[str]:
    if not m:
        return []
    lines = ["", "## Paper estimate: 1M decisions/s", "",
             "From the measured per-decision costs (main section: one Redis): "
             f"Redis spends {m['redis_us_per_decision']} µs of its one thread per decision "
             f"(a primary tops out near {m['per_primary_decisions_s']:,}/s), a sidecar "
             f"worker {m['sidecar_us_per_call']} µs per call.", "",
             "| for 1,000,000 decisions/s | at 100% busy | at 70% busy (headroom) |",
             "|---|---:|---:|",
             f"| Redis Cluster primaries (shards) | {m['shards_at_100_percent']} | "
             f"{m['shards_at_70_percent']} |",
             f"| sidecar cores (one worker each) | {m['sidecar_cores']} | "
             f"{m['sidecar_cores_at_70_percent']} |"]
    b = m.get("with_budgets")
    if b:
        lines.append(f"| with the full budget hierarchy on (budgets section: "
                     f"{b['redis_us_per_decision']} µs Redis, {b['sidecar_us_per_call']} µs "
                     f"sidecar): shards / sidecar cores | - | {b['shards_at_70_percent']} / "
                     f"{b['sidecar_cores_at_70_percent']} |")
    c = m.get("with_cluster")
    if c:
        lines.append(f"| at the 3-node cluster's measured cost (cluster section: "
                     f"{c['redis_us_per_decision_per_node']} µs per decision on the busiest "
                     f"node, {c['sidecar_us_per_call']} µs sidecar): shards / sidecar cores "
                     f"| - | {c['shards_at_70_percent']} / {c['sidecar_cores_at_70_percent']} |")
    lines += ["", "Assumes keys spread evenly over the shard tags (an organization's keys "
              "share one tag, so one very large organization is one shard's load: "
              "names.py), batching per node as on one Redis (a cluster node sees the "
              "calls of its own slots only, so smaller batches and more per-call cost "
              "at the same load), and replicas on other cores. The cluster row uses the "
              "per-node cost measured on 3 local nodes (smaller batches per node than "
              "one Redis: the "
              "figure to plan with); budgets on would add what the budgets row adds."]
    return lines
