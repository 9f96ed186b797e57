"""The performance benchmark (issue 5): one command, every figure, one machine, one run.

    python -m benchmarks.run            # full: c16/64/256, 3 rounds of 5 s runs, profile, ~6 min
    python -m benchmarks.run --quick    # c64 only, 1 round of 3 s runs, no profile, ~1 min
    python -m benchmarks.run --quick --repeat 2
    python -m benchmarks.run --keys 1000000 --duration 10 --concurrency 64,256

It starts its own redis-server (temp dir, free port), loads N keys, starts the sidecar
(`--workers 1`, bench routes on) and the NGINX + Lua peer, then drives each with wrk:
  sweep    authorize, baseline (authorize's work minus the Redis call), bare handler
           and the NGINX + Lua peer at each concurrency
  repeat   the sweep (which holds the main c64 comparison) and the workers runs measure
           each cell --repeat N times, interleaved (A B C D, A B C D, ...); figures are
           medians, ratios the median of the per-round ratios, min-max kept as spread
  budgets  the full budget hierarchy against plain authorize; also alone with --only budgets
           (benchmarks/budgets.py)
  alerts   authorize with alert thresholds and usage history on (the defaults) against
           off, standard and organization keys; also alone with --only alerts
           (benchmarks/alerts.py)
  profile  py-spy on the sidecar worker under the authorize load (PROFILE.md)
  edge     NGINX auth_request + sidecar vs the same NGINX proxying without auth
  workers  sidecar and peer with --workers N / worker_processes N, CPU% per process
  traefik  only with --only traefik: the shipped Traefik files with and without
           forwardAuth, and variants (benchmarks/traefik.py)
  envoy    only with --only envoy: real Envoy on the shipped envoy.yaml alone, with
           ext_authz -> sidecar and with ext_authz -> the NGINX + Lua peer
           (benchmarks/envoy.py)
  cluster  only with --only cluster: authorize on a 3-node Redis Cluster against one
           Redis, per-node Redis CPU per decision (benchmarks/cluster.py)
Results: results/<timestamp>.json always; with --publish (default for full runs) also
results.json, plot.png, RESULTS.md and PROFILE.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from sidecar.runtime.metrics import FLUSH_S  # noqa: E402
from sidecar.schema import names  # noqa: E402
from sidecar.schema.keys import TYPE_OF_CODE, KeyHasher  # noqa: E402
from sidecar.schema.limits import Calendar  # noqa: E402
from sidecar.schema.scripts import AUTHORIZE  # noqa: E402

from .alerts import script_call  # noqa: E402
from .estimate import machine_ceiling  # noqa: E402
from .keyload import load_keys, write_key_file  # noqa: E402
from .load import Load, run_wrk  # noqa: E402
from .procs import Nginx, Processes, Sidecar, free_port, http_get, rss_bytes  # noqa: E402
from .repeat import combine, median_ratios  # noqa: E402
from .stats import (  # noqa: E402
    redis_commands,
    redis_cpu_seconds,
    round_trip_figures,
    saturation,
    sidecar_counters,
)

HERE = Path(__file__).resolve().parent
AUTHZ_PATH = "/authz/v1/chat/completions"
TARGETS = ("authorize", "baseline", "bare", "nginx_lua")
SECTIONS = ("peer", "budgets", "alerts", "profile", "edge", "workers", "script")
# sections run alone (--only), merged into results.json on publish (alerts, budgets: in
# both)
ONLY = ("traefik", "envoy", "cluster", "alerts", "budgets")

# What issue 5 asks for; reported next to the figures, never asserted by tests.
TARGET_RATIOS = {"authorize_over_baseline": 0.8, "p99_authorize_over_baseline_max": 1.5,
                 "authorize_over_nginx_lua": 1.0, "record_bytes_beyond_hash_max": 300}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 16,64,256: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers: {text!r}")
    return values


def _names(text: str, known: tuple[str, ...] = SECTIONS) -> list[str]:
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    for name in chosen:
        if name not in known:
            raise argparse.ArgumentTypeError(f"{name!r}: sections are {', '.join(known)}")
    return chosen


def _only(text: str) -> list[str]:
    return _names(text, ONLY)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="c64 only, 3 s runs, 1 round, 1 s warm-up, no profile, not published")
    p.add_argument("--duration", type=float,
                   help="seconds per wrk run (full: 5 with --repeat > 1, else 8; quick: 3)")
    p.add_argument("--repeat", type=int,
                   help="interleaved rounds per sweep/workers cell; medians reported "
                        "(full: 3, quick: 1)")
    p.add_argument("--concurrency", type=_ints, help="connections for the sweep/plot "
                   "(full: 16,64,256; quick: 64)")
    p.add_argument("--main-concurrency", type=int, default=64,
                   help="connections for the ratios, profile, edge and workers (64)")
    p.add_argument("--keys", type=int, default=100_000, help="keys loaded in Redis (100000)")
    p.add_argument("--workers", type=_ints, default=[1, 2],
                   help="worker counts for the scaling runs (1,2)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (1)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per target (full: 2)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="py-spy profile of the sidecar (default: on for full runs)")
    p.add_argument("--profile-target", choices=("authorize", "baseline", "bare"),
                   default="authorize", help="the route profiled (authorize)")
    p.add_argument("--skip", type=_names, default=[],
                   help=f"sections to leave out: {','.join(SECTIONS)}")
    p.add_argument("--only", type=_only, default=[],
                   help=f"run only these sections: {','.join(ONLY)} (keys and one sidecar; "
                        "--publish merges them into the published results)")
    p.add_argument("--envoy-concurrency", type=int, default=32,
                   help="connections for the envoy section (32)")
    p.add_argument("--envoy-workers", type=int, default=2,
                   help="Envoy --concurrency (worker threads) in the envoy section (2)")
    p.add_argument("--results-dir", type=Path, default=HERE / "results",
                   help="where results/<timestamp>.json goes")
    p.add_argument("--publish", type=Path, default=None, metavar="DIR",
                   help="write results.json, plot.png, RESULTS.md (and PROFILE.md) here "
                        "(default: benchmarks/ for full runs)")
    p.add_argument("--no-publish", action="store_true", help="write the timestamped JSON only")
    args = p.parse_args(argv)
    quick = args.quick
    args.repeat = args.repeat or (1 if quick else 3)
    # N rounds of 5 s keep a full run near 6 minutes; one round alone gets the longer 8 s.
    args.duration = args.duration or (3.0 if quick else 5.0 if args.repeat > 1 else 8.0)
    args.concurrency = args.concurrency or ([64] if quick else [16, 64, 256])
    args.warmup = (1.0 if quick else 2.0) if args.warmup is None else args.warmup
    if args.profile is None:
        args.profile = not quick
    if "profile" in args.skip:
        args.profile = False
    if args.no_publish:
        args.publish = None
    elif args.publish is None and not quick and not args.only:
        args.publish = HERE
    if args.only and "envoy" not in args.only:   # the envoy section runs the peer too
        args.skip = sorted({*args.skip, "peer"})
    if min(args.keys, args.main_concurrency, args.wrk_threads, args.repeat) < 1:
        p.error("--keys, --main-concurrency, --wrk-threads and --repeat must be positive")
    return args


@dataclass
class Stack:
    """The servers of one worker count: the sidecar and (unless skipped) the peer."""

    workers: int
    sidecar: Sidecar
    peer: Nginx | None

    def target(self, name: str) -> tuple[str, str]:
        if name == "nginx_lua":
            assert self.peer is not None
            return f"http://127.0.0.1:{self.peer.ports['peer']}", AUTHZ_PATH
        path = {"authorize": AUTHZ_PATH, "baseline": "/bench/baseline/v1/chat/completions",
                "bare": "/bench/bare"}[name]
        return self.sidecar.url, path


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: Path, stamp: str):
        self.args = args
        self.stamp = stamp
        self.procs = procs
        self.tmp = tmp
        self.pepper = "bench-" + secrets.token_hex(16)
        self.redis = None
        self.key_file: Path | None = None
        self.keys: list[str] = []

    def log(self, text: str) -> None:
        print(f"[bench] {text}", flush=True)

    # -- set-up ---------------------------------------------------------------------------
    def load(self) -> dict:
        self.redis = self.procs.redis()
        client = self.redis.client()
        before = int(client.info("memory")["used_memory"])
        started = time.perf_counter()
        self.keys = load_keys("127.0.0.1", self.redis.port, self.pepper, self.args.keys)
        seconds = time.perf_counter() - started
        after = int(client.info("memory")["used_memory"])
        self.key_file = write_key_file(self.keys, self.tmp / "keys.txt")
        # The peer runs the very script the sidecar sends: authorize.lua with its prelude.
        self.script = self.tmp / "authorize.lua"
        self.script.write_bytes(AUTHORIZE.source)
        self.log(f"loaded {len(self.keys):,} keys in {seconds:.1f} s")
        return {"count": len(self.keys), "load_seconds": round(seconds, 2),
                "used_memory_before": before, "used_memory_after_load": after,
                "used_memory_per_key": round((after - before) / len(self.keys), 1),
                "record_after_load": self.record_sizes()}

    def record_sizes(self, sample: int = 200, used_only: bool = False) -> dict:
        """MEMORY USAGE of a sample of key records (the key name holds the 64-hex hash).

        used_only: records that served calls (they carry counters and recent activity),
        looked for among up to 25x the sample so a short run over 1M keys still finds some.
        """
        client = self.redis.client()
        hasher = KeyHasher(self.pepper)
        pool = sample * (25 if used_only else 1)
        step = max(1, len(self.keys) // pool)
        candidates = [names.record(hasher(k)) for k in self.keys[::step][:pool]]
        if used_only:
            pipe = client.pipeline(transaction=False)
            for k in candidates:
                pipe.hexists(k, "n")
            used = [k for k, hit in zip(candidates, pipe.execute(), strict=True) if hit]
            candidates = used[:sample] or candidates[:sample]
        pipe = client.pipeline(transaction=False)
        for k in candidates:
            pipe.memory_usage(k, samples=0)
            pipe.hlen(k)
        replies = pipe.execute()
        sizes, fields = replies[0::2], replies[1::2]
        avg = sum(s or 0 for s in sizes) / len(sizes)
        return {"sampled": len(sizes), "memory_usage_avg": round(avg, 1),
                "bytes_beyond_hash": round(avg - 64, 1),
                "fields_avg": round(sum(fields) / len(fields), 1),
                "encoding": client.object("encoding", candidates[0])}

    def start_stack(self, workers: int) -> Stack:
        # The Envoy section also measures the gRPC mode (deploy/envoy/envoy-grpc.yaml).
        car = self.procs.sidecar(self.redis.url, self.pepper, workers=workers,
                                 grpc="envoy" in (self.args.only or ()))
        peer = None
        if "peer" not in self.args.skip:
            peer = self.procs.nginx(
                f"peer-w{workers}", HERE / "nginx_lua" / "nginx.conf",
                {"WORKERS": str(workers), "LUA_DIR": str(HERE / "nginx_lua"),
                 "PEPPER": self.pepper, "SCRIPT": str(self.script),
                 "KEY_TYPES": _lua_table({c: t.value for c, t in TYPE_OF_CODE.items()}),
                 "POOL_PREFIX": names.POOL_PREFIX},
                {"peer": free_port(), "redis": self.redis.port})
        stack = Stack(workers, car, peer)
        for name in self.targets(stack):
            self.expect(*stack.target(name), 200)
        return stack

    def stop_stack(self, stack: Stack) -> None:
        self.procs.stop(stack.sidecar.proc)
        if stack.peer:
            self.procs.stop(stack.peer.proc)

    def targets(self, stack: Stack) -> list[str]:
        return [t for t in TARGETS if t != "nginx_lua" or stack.peer is not None]

    def expect(self, url: str, path: str, status: int, key: str | None = None) -> None:
        """One real request first: a benchmark of 401s would look fast and mean nothing."""
        body = b'{"model":"gpt-4o-mini","messages":[]}'
        req = urllib.request.Request(url + path, data=body, method="POST")
        req.add_header("Authorization", "Bearer " + (key or self.keys[0]))
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                got = resp.status
        except urllib.error.HTTPError as exc:
            got = exc.code
        if got != status:
            raise SystemExit(f"benchmarks: {url}{path} answered {got}, expected {status}\n"
                             f"{self.procs.log_tails()}")

    # -- measuring ------------------------------------------------------------------------
    def cpu_groups(self, stack: Stack) -> dict[str, list[int]]:
        groups = {"sidecar": stack.sidecar.worker_pids(), "redis": [self.redis.proc.pid]}
        if stack.peer:
            groups["nginx_lua"] = stack.peer.worker_pids()
        return groups

    @staticmethod
    def sidecar_metrics(stack: Stack) -> str:
        """The sidecar's /metrics with every call so far in it: with --workers N each
        worker adds its tallies every FLUSH_S (runtime/metrics.py); one process flushes
        before it answers."""
        if stack.workers > 1:
            time.sleep(FLUSH_S + 0.25)
        return stack.sidecar.metrics()

    def measure(self, stack: Stack, name: str, connections: int,
                duration: float | None = None, label: str = "",
                key_file: Path | None = None) -> dict:
        url, path = stack.target(name)
        client = self.redis.client()
        counters = sidecar_counters(self.sidecar_metrics(stack)) \
            if name == "authorize" else None
        commands = redis_commands(client)
        redis_cpu = redis_cpu_seconds(client)
        try:
            run = run_wrk(url, path, key_file or self.key_file,
                          Load(connections, duration or self.args.duration,
                               self.args.wrk_threads), self.cpu_groups(stack))
        except RuntimeError as exc:
            raise SystemExit(f"benchmarks: {name}: {exc}\n{self.procs.log_tails()}") from None
        redis_used = redis_cpu_seconds(client) - redis_cpu
        commands = redis_commands(client, commands)
        run["target"] = name
        run["workers"] = stack.workers
        server = "nginx_lua" if name == "nginx_lua" else "sidecar"
        if run["requests"]:  # CPU the serving processes spent per answered call
            def per_call(percent: float) -> float:
                return round(percent / 100 * run["duration_s"] / run["requests"] * 1e6, 1)
            run["server_cpu_us_per_call"] = per_call(run["cpu_percent"].get(server, 0.0))
            run["server_and_redis_cpu_us_per_call"] = per_call(
                run["cpu_percent"].get(server, 0.0) + run["cpu_percent"].get("redis", 0.0))
        if name in ("authorize", "nginx_lua") and run["requests"]:
            run["redis_cpu_us_per_decision"] = round(redis_used / run["requests"] * 1e6, 2)
            # one round trip per decision: every command Redis ran, per answered call
            run["redis_commands_per_call"] = round(commands["all"] / run["requests"], 3)
            run["evalsha_per_call"] = round(commands["evalsha"] / run["requests"], 3)
            # calls wrk had sent but not yet counted when it stopped ran EVALSHA too
            run["evalsha"] = commands["evalsha"]
        if counters is not None:
            run.update(round_trip_figures(counters,
                                          sidecar_counters(self.sidecar_metrics(stack))))
        run["saturation"] = self.saturation(stack, run)
        flag = "" if run["non_2xx"] == 0 and run["socket_errors"] == 0 else \
            f"  !! non-2xx {run['non_2xx']} socket errors {run['socket_errors']}"
        self.log(f"w{stack.workers} {name:<10} c{connections:<4}{label} "
                 f"{run['rps']:>9,.0f} req/s  "
                 f"p50 {run['latency_ms']['p50']:.2f} ms  p99 {run['latency_ms']['p99']:.2f} ms"
                 f"{flag}")
        return run

    def saturation(self, stack: Stack, run: dict) -> dict:
        return saturation(
            run, {"sidecar": stack.workers, "redis": 1, "wrk": self.args.wrk_threads,
                  **({"nginx_lua": stack.workers} if stack.peer else {})}, os.cpu_count() or 1)

    def measure_rounds(self, stack: Stack, targets: list[str],
                       connections: int) -> tuple[dict[str, dict], list[dict[str, dict]]]:
        """--repeat rounds of every target, interleaved: A B C D, A B C D, ...

        Returns the combined run per target (medians, see repeat.combine) and the rounds
        themselves, so ratios can be taken within each round.
        """
        n = self.args.repeat
        rounds = []
        for i in range(n):
            label = f" r{i + 1}/{n}" if n > 1 else ""
            rounds.append({t: self.measure(stack, t, connections, label=label)
                           for t in targets})
        combined = {}
        for t in targets:
            run = combine([r[t] for r in rounds])
            run["saturation"] = self.saturation(stack, run)
            combined[t] = run
        return combined, rounds

    def warm_one(self, stack: Stack, name: str, key_file: Path | None = None) -> None:
        url, path = stack.target(name)
        run_wrk(url, path, key_file or self.key_file,
                Load(self.args.main_concurrency, self.args.warmup, self.args.wrk_threads))

    def warm(self, stack: Stack) -> None:
        if self.args.warmup > 0:
            for name in self.targets(stack):
                url, path = stack.target(name)
                run_wrk(url, path, self.key_file,
                        Load(self.args.main_concurrency, self.args.warmup,
                             self.args.wrk_threads))

    # -- sections -------------------------------------------------------------------------
    def only_sections(self, stack) -> dict:
        """--only: the edge sections alone, added to a published full run."""
        out = {}
        if "traefik" in self.args.only:
            from .traefik import section
            out["traefik"] = section(self, stack)
        if "envoy" in self.args.only:
            from . import envoy
            out["envoy"] = envoy.section(self, stack)
        if "cluster" in self.args.only:
            from . import cluster
            out["cluster"] = cluster.section(self, stack)
        if "alerts" in self.args.only:
            from . import alerts
            out["alerts"] = alerts.section(self, Stack)
        if "budgets" in self.args.only:
            from . import budgets
            out["budgets"] = budgets.section(self, stack, Stack)
        return out

    def feature_sections(self, stack: Stack) -> dict:
        """Plain authorize against the features on: budgets (issue 11), alerts (12)."""
        out = {}
        if "budgets" not in self.args.skip:
            from . import budgets
            out["budgets"] = budgets.section(self, stack, Stack)
        if "alerts" not in self.args.skip:
            from . import alerts
            out["alerts"] = alerts.section(self, Stack)
        return out

    def run(self) -> dict:
        args = self.args
        results: dict = {"meta": machine_info(), "keys": self.load(), "targets": TARGET_RATIOS}
        stack = self.start_stack(1)
        if args.only:
            try:
                results.update(self.only_sections(stack))
            finally:
                self.stop_stack(stack)
            return results
        self.warm(stack)
        gc_pauses(stack.sidecar.url)   # from here on, collections count as under load

        sweep: dict[str, list[dict]] = {t: [] for t in self.targets(stack)}
        sweep_ratios: list[dict] = []
        concurrencies = list(dict.fromkeys([*args.concurrency, args.main_concurrency]))
        main_rounds: list[dict[str, dict]] = []
        for c in concurrencies:
            # interleaved: drift hits every target alike, within each round
            combined, rounds = self.measure_rounds(stack, self.targets(stack), c)
            for name, run in combined.items():
                sweep[name].append(run)
            medians, spread = median_ratios([ratios(r) for r in rounds])
            sweep_ratios.append({"connections": c, "ratios": medians, "spread": spread})
            if args.repeat > 1:
                self.log(f"c{c} medians of {args.repeat} rounds: " + ratio_log(medians, spread))
            if c == args.main_concurrency:
                main_rounds = rounds
        results["sweep"] = sweep
        results["sweep_ratios"] = sweep_ratios
        main = {n: next(r for r in runs if r["connections"] == args.main_concurrency)
                for n, runs in sweep.items()}
        per_round = [ratios(r) for r in main_rounds]
        medians, spread = median_ratios(per_round)
        results["main"] = {"concurrency": args.main_concurrency, "repeat": args.repeat,
                           **main, "ratios": medians, "ratio_spread": spread,
                           "ratio_rounds": per_round}
        results["round_trips"] = round_trips(main)
        results["gc"] = gc_pauses(stack.sidecar.url)
        results["memory"] = {
            "sidecar_rss_bytes": sum(rss_bytes(p) for p in stack.sidecar.worker_pids()),
            "sidecar_workers": 1,
            "redis_used_memory": int(self.redis.client().info("memory")["used_memory"]),
            "record_after_traffic": self.record_sizes(used_only=True),
        }
        if stack.peer:
            results["memory"]["nginx_lua_rss_bytes"] = sum(
                rss_bytes(p) for p in stack.peer.worker_pids())

        results.update(self.feature_sections(stack))
        if args.profile:
            results["profile"] = self.profile(stack)
        if "edge" not in args.skip:
            results["edge"] = self.edge(stack)
        if "workers" not in args.skip:
            results["workers"] = self.scaling(stack, main, main_rounds)
        else:
            self.stop_stack(stack)
        if "script" not in args.skip:
            results["script"] = self.script_cost()
        return results

    def script_cost(self, calls: int = 50_000) -> dict:
        """authorize.lua inside Redis alone: redis-benchmark, pipelined, on one record.

        Redis runs every script on its one thread, so 1e6 / usec_per_call is the ceiling
        of decisions per second for all sidecar workers (or peers) together.
        """
        binary = shutil.which("redis-benchmark")
        if binary is None:
            return {"error": "redis-benchmark not installed (Debian: redis-tools)"}
        client = self.redis.client()
        key_hash = KeyHasher(self.pepper)(self.keys[0])
        now = int(time.time() * 1000)
        day, month = Calendar().numbers(now)
        keys, argv = script_call(key_hash, now, day, month)   # history and thresholds on
        command = [str(len(keys)), *keys, *(str(a) for a in argv)]
        out = {}
        for name, source in (("empty_script", "return 1"),
                             ("authorize", AUTHORIZE.source.decode())):
            sha = client.script_load(source)
            client.config_resetstat()
            done = subprocess.run(
                [binary, "-p", str(self.redis.port), "-n", str(calls), "-P", "20", "-q",
                 "EVALSHA", sha, *command], capture_output=True, text=True, timeout=120)
            stats = client.info("commandstats").get("cmdstat_evalsha", {})
            rps = done.stdout.strip().rsplit(": ", 1)[-1].split(" ", 1)[0]
            out[name] = {"usec_per_call": stats.get("usec_per_call"),
                         "redis_benchmark_rps": float(rps) if rps.replace(".", "").isdigit()
                         else None}
        usec = out["authorize"]["usec_per_call"]
        out["decisions_per_s_ceiling"] = round(1e6 / usec) if usec else None
        self.log(f"authorize.lua inside Redis: {usec} us per call "
                 f"(empty script {out['empty_script']['usec_per_call']} us)")
        return out

    def profile(self, stack: Stack) -> dict:
        from .profile import profile_worker
        self.log(f"profiling the sidecar worker with py-spy ({self.args.profile_target})")
        url, path = stack.target(self.args.profile_target)
        self.args.results_dir.mkdir(parents=True, exist_ok=True)
        summary = profile_worker(stack.sidecar.worker_pids()[0], url, path, self.key_file,
                                 Load(self.args.main_concurrency, self.args.duration,
                                      self.args.wrk_threads),
                                 self.args.results_dir / f"{self.stamp}.speedscope.json")
        if "error" in summary:
            self.log(summary["error"])
        summary["target"] = self.args.profile_target
        summary["path"] = path
        return summary

    def edge(self, stack: Stack) -> dict:
        """NGINX auth_request: no auth, the sidecar, the peer (same edge, same upstream,
        same script), over --repeat interleaved rounds."""
        ports = {"app": free_port(), "plain": free_port(), "authz": free_port(),
                 "peer": free_port()}
        # Without the peer (--skip peer) its front proxies to the sidecar and is not run.
        peer_port = stack.peer.ports["peer"] if stack.peer else stack.sidecar.port
        edge = self.procs.nginx("edge", HERE / "edge" / "nginx.conf",
                                {"WORKERS": "1", "SIDECAR_PORT": str(stack.sidecar.port),
                                 "PEER_AUTHZ_PORT": str(peer_port)}, ports)
        fronts = ("plain", "authz", "peer") if stack.peer else ("plain", "authz")
        urls = {name: f"http://127.0.0.1:{ports[name]}" for name in fronts}
        path = "/v1/chat/completions"
        load = Load(self.args.main_concurrency, self.args.duration, self.args.wrk_threads)
        rounds: list[dict] = []
        try:
            for name, url in urls.items():
                self.expect(url, path, 200)
                if name != "plain":
                    self.expect(url, path, 401, key="sk-" + "0" * 40)
                if self.args.warmup > 0:
                    run_wrk(url, path, self.key_file,
                            Load(load.connections, self.args.warmup, load.threads))
            groups = {**self.cpu_groups(stack), "nginx_edge": edge.worker_pids()}
            for i in range(self.args.repeat):
                one = {}
                for name, url in urls.items():
                    run = one[name] = run_wrk(url, path, self.key_file, load, groups)
                    run["target"] = f"edge_{name}"
                    self.log(f"edge {name:<6} c{load.connections} r{i + 1}/{self.args.repeat}"
                             f" {run['rps']:>9,.0f} req/s  p99 "
                             f"{run['latency_ms']['p99']:.2f} ms")
                rounds.append(one)
        finally:
            self.procs.stop(edge.proc)
        out: dict = {name: combine([r[name] for r in rounds]) for name in fronts}
        per_round = [{f"{a}_over_{b}": _ratio(r[a]["rps"], r[b]["rps"])
                      for a, b in (("authz", "plain"), ("peer", "plain"), ("authz", "peer"))
                      if a in r and b in r} for r in rounds]
        out["ratios"], out["ratio_spread"] = median_ratios(per_round)
        out["authz_over_plain"] = out["ratios"]["authz_over_plain"]
        out["repeat"] = self.args.repeat
        out["note"] = ("NGINX 1 worker serves every front and the `return 200` upstream; the "
                       "auth subrequest carries headers only (no body: no model check).")
        return out

    def scaling(self, stack: Stack, main: dict, main_rounds: list[dict]) -> list[dict]:
        rows = []
        first = True
        for workers in self.args.workers:
            if workers == 1:
                runs: dict = {n: main[n] for n in ("authorize", "bare", "nginx_lua")
                              if n in main}
                rounds = main_rounds
            else:
                if first:
                    self.stop_stack(stack)  # idle servers off the machine
                    first = False
                other = self.start_stack(workers)
                try:
                    self.warm(other)
                    compared = [n for n in ("authorize", "bare", "nginx_lua")
                              if n != "nginx_lua" or other.peer is not None]
                    runs, rounds = self.measure_rounds(other, compared,
                                                       self.args.main_concurrency)
                    rss = sum(rss_bytes(p) for p in other.sidecar.worker_pids())
                finally:
                    self.stop_stack(other)
                runs["sidecar_rss_bytes"] = rss
            row = {"workers": workers, **runs}
            row["ceiling"] = machine_ceiling(runs["authorize"], os.cpu_count() or 1,
                                             ("sidecar", "redis", "wrk"))
            if "nginx_lua" in runs:
                # the median of the per-round ratios, like the main comparison
                medians, spread = median_ratios(
                    [{"r": _ratio(r["authorize"]["rps"], r["nginx_lua"]["rps"])}
                     for r in rounds])
                row["authorize_over_nginx_lua"] = medians["r"]
                row["authorize_over_nginx_lua_spread"] = spread["r"]
            rows.append(row)
        if first:
            self.stop_stack(stack)
        return rows


def gc_pauses(url: str) -> dict:
    """The sidecar worker's cyclic garbage collections (benchmarks/serve.py /bench/gc)."""
    status, body = http_get(url + "/bench/gc", 5)
    return json.loads(body) if status == 200 else {}


def _lua_table(mapping: dict[str, str]) -> str:
    """A Lua table literal of identifier keys and string values, for the peer's config."""
    return "{" + ", ".join(f'{k} = "{v}"' for k, v in mapping.items()) + "}"


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def ratios(main: dict) -> dict:
    a, b, bare = main["authorize"], main["baseline"], main["bare"]
    out = {"authorize_over_baseline": _ratio(a["rps"], b["rps"]),
           "authorize_over_bare": _ratio(a["rps"], bare["rps"]),
           "baseline_over_bare": _ratio(b["rps"], bare["rps"]),
           "p99_authorize_over_baseline": _ratio(a["latency_ms"]["p99"],
                                                 b["latency_ms"]["p99"])}
    if "nginx_lua" in main:
        out["authorize_over_nginx_lua"] = _ratio(a["rps"], main["nginx_lua"]["rps"])
    # The same comparisons by CPU per call (server + Redis): less sensitive to what other
    # processes do to the machine meanwhile than req/s is. > 1 means authorize is cheaper.
    cost = {n: r.get("server_and_redis_cpu_us_per_call") for n, r in main.items()}
    server = {n: r.get("server_cpu_us_per_call") for n, r in main.items()}
    if server.get("authorize") and server.get("baseline"):
        out["server_cpu_baseline_over_authorize"] = _ratio(server["baseline"],
                                                           server["authorize"])
    if cost.get("authorize"):
        out["cpu_baseline_over_authorize"] = _ratio(cost.get("baseline") or 0, cost["authorize"])
        out["cpu_bare_over_authorize"] = _ratio(cost.get("bare") or 0, cost["authorize"])
        if cost.get("nginx_lua"):
            out["cpu_nginx_lua_over_authorize"] = _ratio(cost["nginx_lua"], cost["authorize"])
    return out


def ratio_log(medians: dict, spread: dict) -> str:
    def one(key: str, label: str) -> str:
        lo, hi = spread.get(key) or (None, None)
        return f"{label} {medians[key]} ({lo}-{hi})" if key in medians else ""
    return "  ".join(filter(None, (
        one("authorize_over_baseline", "authorize/baseline"),
        one("authorize_over_bare", "authorize/bare"),
        one("authorize_over_nginx_lua", "authorize/nginx_lua"),
        one("p99_authorize_over_baseline", "p99 authorize/baseline"))))


def round_trips(main: dict) -> dict:
    a = main["authorize"]
    out = {"calls_per_round_trip": a.get("calls_per_round_trip"),
           "redis_round_trips": a.get("redis_round_trips"),
           "redis_calls": a.get("redis_calls"),
           "redis_cpu_us_per_decision": a.get("redis_cpu_us_per_decision")}
    if "nginx_lua" in main:
        out["nginx_lua_redis_cpu_us_per_decision"] = main["nginx_lua"].get(
            "redis_cpu_us_per_decision")
    return out


def run_mode(args: argparse.Namespace) -> str:
    if args.quick:
        return "quick"
    full = (args.duration >= 5 and args.repeat >= 3 and 64 in args.concurrency
            and len(args.concurrency) >= 3 and args.keys >= 100_000 and not args.skip)
    return "full" if full else "custom"


def problems(results: dict) -> list[str]:
    """Runs whose figures do not mean what they claim: denials or broken connections."""
    from .report import all_runs
    out = []
    for run in all_runs(results):
        if run["non_2xx"] or run["socket_errors"]:
            out.append(f"w{run.get('workers', 1)} {run.get('target')} c{run['connections']}: "
                       f"{run['non_2xx']} non-2xx answers, {run['socket_errors']} socket "
                       f"errors of {run['requests']} requests")
    return sorted(set(out))


def _version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def git_state() -> str | None:
    """The commit measured, '+dirty' when sidecar/ has uncommitted changes."""
    root = str(HERE.parent)
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "sidecar"],
                               capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    if rev.returncode != 0:
        return os.environ.get("BENCH_GIT_REV")  # a tree exported without .git
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages = {}
    for name in ("aiohttp", "uvloop", "hiredis", "redis", "orjson", "prometheus-client"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "git": git_state(),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": _version(["redis-server", "--version"]),
        "nginx": _version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
        "wrk": _version(["wrk", "--version"]),
        "packages": packages,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmpdir, \
            Processes(Path(tmpdir)) as procs:
        results = Bench(args, procs, Path(tmpdir), stamp).run()
    results["problems"] = problems(results)
    results["meta"].update(
        timestamp=stamp, mode=run_mode(args),
        command="python -m benchmarks.run" + "".join(f" {a}" for a in argv),
        seconds=round(time.monotonic() - started, 1),
        settings={"duration_s": args.duration, "repeat": args.repeat,
                  "concurrency": args.concurrency,
                  "main_concurrency": args.main_concurrency, "keys": args.keys,
                  "workers": args.workers, "wrk_threads": args.wrk_threads,
                  "warmup_s": args.warmup, "profile": args.profile,
                  "profile_target": args.profile_target, "skip": args.skip})
    for name in args.only:   # a section published alone carries when and how it was run
        results[name]["meta"] = {k: results["meta"][k]
                                 for k in ("timestamp", "command", "git", "seconds")}
        results[name]["problems"] = results["problems"]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[bench] results: {out}")
    if args.publish:
        from .report import merged, publish
        for path in publish(merged(results, args.publish, ONLY), args.publish,
                            plot=not args.only):
            print(f"[bench] wrote {path}")
    from .report import summary_lines
    print("\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
