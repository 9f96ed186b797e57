"""The cluster section (`--only cluster`, issue 13): authorize on a real 3-node Redis
Cluster (local processes, no replicas) against the same sidecar on one Redis.

The same keys are loaded into both (on the cluster each record goes to the node of its
slot; the id index, which only the control plane reads, is left out there). Two
sidecars, one per backend, are driven in interleaved rounds at the main concurrency.
Per node: its share of the decisions (EVALSHA from INFO commandstats), its CPU (INFO
cpu), so Redis CPU per decision per node; and the sidecar's calls per round trip, which
on a cluster count per node's write.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from statistics import median

import hiredis
from redis.crc import key_slot

from sidecar.schema import names
from sidecar.schema.keys import KeyHasher

from .keyload import BENCH_SPEC, _read_replies
from .load import Load, run_wrk
from .procs import Redis, free_port, wait_for
from .stats import redis_commands, redis_cpu_seconds, round_trip_figures, sidecar_counters

NODES = 3


def _cluster_port() -> int:
    """Redis refuses ports above 55535 in cluster mode (bus port = port + 10000)."""
    while True:
        port = free_port()
        if port <= 55535:
            return port


def start_cluster(procs) -> list[Redis]:
    binary = shutil.which("redis-server")
    nodes = []
    for i in range(NODES):
        port = _cluster_port()
        data = procs.tmp / f"cluster-{i}"
        data.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(data), "--logfile", str(data / "redis.log"),
             "--cluster-enabled", "yes", "--cluster-config-file", str(data / "nodes.conf"),
             "--cluster-node-timeout", "5000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.started.append(proc)
        node = Redis(port, proc)
        wait_for(lambda n=node: n.client().ping(), 10, "cluster node")
        nodes.append(node)
    subprocess.run(["redis-cli", "--cluster", "create",
                    *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
                    "--cluster-yes"], check=True, capture_output=True, timeout=60)
    wait_for(lambda: all(n.client().cluster("info")["cluster_state"] == "ok"
                         for n in nodes), 30, "cluster_state:ok")
    return nodes


def _owner(nodes: list[Redis]) -> list[int]:
    """slot -> index of the node that serves it."""
    owner = [0] * 16384
    by_port = {n.port: i for i, n in enumerate(nodes)}
    for start, end, primary, *_ in nodes[0].client().execute_command("CLUSTER", "SLOTS"):
        for slot in range(int(start), int(end) + 1):
            owner[slot] = by_port[int(primary[1])]
    return owner


def load_cluster(nodes: list[Redis], pepper: str, keys: list[str]) -> list[int]:
    """The benchmark's records, each on the node of its slot; returns keys per node."""
    from sidecar.control.key_spec import validate_spec
    from sidecar.schema.keys import new_id
    hasher = KeyHasher(pepper)
    fields = [x for kv in validate_spec(BENCH_SPEC).to_hash().items() for x in kv]
    owner = _owner(nodes)
    per_node: list[list[bytes]] = [[] for _ in nodes]
    for key in keys:
        name = names.record(hasher(key))
        per_node[owner[key_slot(name.encode())]].append(
            hiredis.pack_command(("HSET", name, "id", new_id("key"), *fields)))
    for node, commands in zip(nodes, per_node, strict=True):
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
            reader = hiredis.Reader()
            for start in range(0, len(commands), 5000):
                chunk = commands[start:start + 5000]
                sock.sendall(b"".join(chunk))
                _read_replies(sock, reader, len(chunk))
    return [len(c) for c in per_node]


def _node_state(nodes: list[Redis]) -> list[tuple[float, dict]]:
    return [(redis_cpu_seconds(c), redis_commands(c)) for c in (n.client() for n in nodes)]


def _one(bench, car, nodes: list[Redis] | None, connections: int, label: str) -> dict:
    """One wrk run on `car`; per node (cluster) or for the one Redis: CPU and decisions."""
    backends = nodes or [bench.redis]
    before = _node_state(backends)
    counters = sidecar_counters(car.metrics())
    groups = {"sidecar": car.worker_pids(),
              **{f"redis{i}": [n.proc.pid] for i, n in enumerate(backends)}}
    run = run_wrk(car.url, "/authz/v1/chat/completions", bench.key_file,
                  Load(connections, bench.args.duration, bench.args.wrk_threads), groups)
    after = _node_state(backends)
    run.update(round_trip_figures(counters, sidecar_counters(car.metrics())))
    per_node = []
    for (cpu0, cmd0), (cpu1, _), node in zip(before, after, backends, strict=True):
        calls = redis_commands(node.client(), cmd0)["evalsha"]
        used = cpu1 - cpu0
        per_node.append({"decisions": calls, "redis_cpu_s": round(used, 3),
                         "redis_cpu_us_per_decision": round(used / calls * 1e6, 2)
                         if calls else None,
                         "cpu_percent": run["cpu_percent"].get(f"redis{len(per_node)}")})
    run["nodes"] = per_node
    run["server_cpu_us_per_call"] = round(run["cpu_percent"]["sidecar"] / 100
                                          * run["duration_s"] / max(run["requests"], 1) * 1e6, 1)
    run["redis_cpu_us_per_decision"] = round(
        sum(n["redis_cpu_s"] for n in per_node) / max(run["requests"], 1) * 1e6, 2)
    bench.log(f"{label:<8} c{connections} {run['rps']:>9,.0f} req/s  "
              f"p99 {run['latency_ms']['p99']:.2f} ms  calls/trip {run['calls_per_round_trip']}"
              f"  non-2xx {run['non_2xx']}")
    return run


def section(bench, stack) -> dict:
    args = bench.args
    nodes = start_cluster(bench.procs)
    spread = load_cluster(nodes, bench.pepper, bench.keys)
    url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
    car = bench.procs.sidecar(url, bench.pepper, workers=1)
    try:
        bench.expect(car.url, "/authz/v1/chat/completions", 200)
        if args.warmup > 0:
            run_wrk(car.url, "/authz/v1/chat/completions", bench.key_file,
                    Load(args.main_concurrency, args.warmup, args.wrk_threads))
        rounds = []
        for i in range(args.repeat):
            tag = f"r{i + 1}/{args.repeat}"
            rounds.append({
                "one": _one(bench, stack.sidecar, None, args.main_concurrency, f"one {tag}"),
                "cluster": _one(bench, car, nodes, args.main_concurrency, f"cl {tag}")})
    finally:
        bench.procs.stop(car.proc)
        for n in nodes:
            bench.procs.stop(n.proc)
    med = median
    out = {"nodes": NODES, "keys_per_node": spread, "concurrency": args.main_concurrency,
           "repeat": args.repeat, "rounds": rounds}
    for name in ("one", "cluster"):
        runs = [r[name] for r in rounds]
        out[name] = {k: med(r[k] for r in runs) for k in
                     ("rps", "server_cpu_us_per_call", "redis_cpu_us_per_decision")}
        out[name]["calls_per_round_trip"] = med(r["calls_per_round_trip"] or 0 for r in runs)
        out[name]["p99_ms"] = med(r["latency_ms"]["p99"] for r in runs)
        out[name]["non_2xx"] = sum(r["non_2xx"] for r in runs)
        out[name]["other_processes_cpu_percent"] = med(
            r["other_processes_cpu_percent"] for r in runs)
    out["cluster"]["per_node"] = [
        {"decisions_share": round(med(r["cluster"]["nodes"][i]["decisions"]
                                      / max(r["cluster"]["requests"], 1) for r in rounds), 3),
         "redis_cpu_us_per_decision": med(r["cluster"]["nodes"][i]["redis_cpu_us_per_decision"]
                                          or 0 for r in rounds),
         "cpu_percent": med(r["cluster"]["nodes"][i]["cpu_percent"] or 0 for r in rounds)}
        for i in range(NODES)]
    out["cluster_over_one_rps"] = round(med(r["cluster"]["rps"] / r["one"]["rps"]
                                            for r in rounds), 3)
    return out


def markdown(c: dict) -> list[str]:
    one, cl = c["one"], c["cluster"]
    meta = c.get("meta", {})
    lines = ["", f"## Redis Cluster, 3 nodes (c{c['concurrency']}, 1 sidecar worker)", "",
             f"Command: `{meta.get('command', 'python -m benchmarks.run --only cluster')}` "
             f"({meta.get('timestamp', '?')}, commit {meta.get('git', '?')}); "
             f"{c['repeat']} interleaved round(s); three local redis-server processes in "
             "cluster mode, no replicas, on the same 2 cores as everything else; keys "
             f"per node {c['keys_per_node']}.", "",
             "| backend | req/s | p99 ms | sidecar µs CPU/call | Redis µs CPU/decision (all "
             "nodes) | calls per write |", "|---|---:|---:|---:|---:|---:|"]
    for label, r in (("one Redis", one), ("3-node cluster", cl)):
        lines.append(f"| {label} | {r['rps']:,.0f} | {r['p99_ms']:.2f} | "
                     f"{r['server_cpu_us_per_call']} | {r['redis_cpu_us_per_decision']} | "
                     f"{r['calls_per_round_trip']} |")
    lines += ["", f"cluster / one Redis req/s: **{c['cluster_over_one_rps']}** (median of the "
              "per-round ratios).", "", "| node | share of decisions | Redis µs CPU per "
              "decision on it | CPU % |", "|---:|---:|---:|---:|"]
    for i, n in enumerate(cl["per_node"]):
        lines.append(f"| {i} | {n['decisions_share']} | {n['redis_cpu_us_per_decision']} | "
                     f"{n['cpu_percent']} |")
    lines += ["", "Calls per write on the cluster are per node's write: each node gets its "
              "own slots' calls of a tick, so its batches are about a third as full as one "
              "Redis's at the same load. See benchmarks/cluster.py."]
    return lines
