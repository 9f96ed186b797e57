"""Turn one run's results into results.json, plot.png, RESULTS.md and PROFILE.md."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {"authorize": "sidecar authorize", "baseline": "baseline (authorize minus Redis)",
          "bare": "bare handler", "nginx_lua": "NGINX + Lua peer"}
ENVOY_LABELS = {"alone": "Envoy alone (direct_response, no ext_authz)",
                "sidecar": "Envoy + ext_authz → sidecar",
                "sidecar_grpc": "Envoy + gRPC ext_authz → sidecar (envoy-grpc.yaml)",
                "nginx_lua": "Envoy + ext_authz → NGINX + Lua peer",
                "sidecar_bare": "Envoy + ext_authz → the sidecar's bare handler (no decision)",
                "free_authz": "Envoy + ext_authz → NGINX `return 200` (a free authorizer)"}
STYLES = {"authorize": ("tab:blue", "o"), "baseline": ("tab:green", "s"),
          "bare": ("tab:gray", "^"), "nginx_lua": ("tab:red", "D")}


def merged(results: dict, folder: Path, alone: tuple[str, ...]) -> dict:
    """What to publish. A run of sections alone (--only) goes into the published results
    of the last full run; a full run keeps the sections it did not run from them."""
    path = folder / "results.json"
    published = json.loads(path.read_text()) if path.exists() else None
    if "main" not in results:
        if published is None or "main" not in published:
            raise SystemExit(f"benchmarks: no full results in {path} to add sections to")
        return {**published, **{k: results[k] for k in alone if k in results}}
    if published:
        return {**results, **{k: published[k] for k in alone
                              if k in published and k not in results}}
    return results


def publish(results: dict, folder: Path, plot: bool = True) -> list[Path]:
    """`plot=False` (sections added alone): the sweep's plot is left as it is."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.json"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    plot = plot and plot_sweep(results, folder / "plot.png")
    if plot:
        written.append(plot)
    md = folder / "RESULTS.md"
    md.write_text(results_markdown(results))
    written.append(md)
    if "profile" in results:
        from .profile import render_markdown
        prof = folder / "PROFILE.md"
        prof.write_text(render_markdown(results["profile"], results["meta"]["command"],
                                        machine_line(results["meta"]), results["main"]))
        written.append(prof)
    return written


def plot_sweep(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("[bench] matplotlib not installed: no plot (pip install -e '.[dev]')")
        return None
    fig, (left, right, cost) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, runs in results["sweep"].items():
        runs = sorted(runs, key=lambda r: r["connections"])
        xs = [r["connections"] for r in runs]
        color, marker = STYLES.get(name, ("black", "x"))
        label = LABELS.get(name, name)
        rps = [r["rps"] for r in runs]
        # error bars: min-max of req/s over the interleaved rounds (none with one round)
        spans = [(r.get("spread") or {}).get("rps") or [r["rps"], r["rps"]] for r in runs]
        left.errorbar(xs, rps, yerr=[[v - lo for v, (lo, _) in zip(rps, spans, strict=True)],
                                     [hi - v for v, (_, hi) in zip(rps, spans, strict=True)]],
                      marker=marker, color=color, label=label, capsize=3)
        right.plot(xs, [r["latency_ms"]["p99"] for r in runs], marker=marker, color=color,
                   label=label)
        cost.plot(xs, [r.get("server_and_redis_cpu_us_per_call") or 0 for r in runs],
                  marker=marker, color=color, label=label)
    for ax, title, ylabel in ((left, "Throughput", "requests / s"),
                              (right, "p99 latency", "ms (log)"),
                              (cost, "CPU per call (server + Redis)", "µs")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent connections (wrk -c)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        xs = sorted({r["connections"] for runs in results["sweep"].values() for r in runs})
        ax.set_xticks(xs, [str(x) for x in xs])
    left.set_ylim(bottom=0)
    cost.set_ylim(bottom=0)
    right.set_yscale("log")
    right.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    right.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    right.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"1 sidecar worker, {results['keys']['count']:,} keys, "
                 f"{_rounds_text(meta)} — {machine_line(meta)}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _repeat(meta: dict) -> int:
    return int(meta.get("settings", {}).get("repeat", 1))


def _rounds_text(meta: dict) -> str:
    n, d = _repeat(meta), meta["settings"]["duration_s"]
    return f"{d:g} s runs" if n == 1 else f"medians of {n} interleaved {d:g} s runs"


def _span(values: list[float] | None, fmt: str = "{:,.0f}") -> str:
    """' (lo–hi)' when there was more than one round, else nothing."""
    if not values or None in values:
        return ""
    return f" ({fmt.format(values[0])}–{fmt.format(values[1])})"


def _rps(r: dict) -> str:
    spread = (r.get("spread") or {}).get("rps") if r.get("repeats", 1) > 1 else None
    return f"{r['rps']:,.0f}" + _span(spread)


def _ratio_cell(medians: dict, spread: dict | None, key: str, rounds: int) -> str:
    value = medians.get(key)
    if value is None:
        return "-"
    span = (spread or {}).get(key) if rounds > 1 else None
    return f"{value}" + _span(span, "{}")


def all_runs(results: dict, alone: bool = True) -> list[dict]:
    """Every run; `alone=False` leaves out the sections run on their own (--only)."""
    runs = [r for rs in results.get("sweep", {}).values() for r in rs]
    for row in results.get("traefik", {}).get("rounds", []) if alone else []:
        runs += list(row.values())
    for row in results.get("envoy", {}).get("rounds", []) if alone else []:
        runs += list(row.values())
    for row in results.get("cluster", {}).get("rounds", []) if alone else []:
        runs += list(row.values())
    if alone and "alerts" in results:   # run alone or in the full run: its own noise line
        from .alerts import TARGETS
        runs += [results["alerts"][k] for k in TARGETS if k in results["alerts"]]
    runs += [results["edge"][k] for k in ("plain", "authz", "peer")
             if k in results.get("edge", {})]
    for row in results.get("workers", []):
        runs += [v for v in row.values() if isinstance(v, dict) and "rps" in v]
    return runs


def noise_line(results: dict, runs: list[dict] | None = None) -> str:
    """How much of the machine other processes took while this run measured."""
    # every round counts: the median of a cell would hide a burst during one round
    others = [o.get("other_processes_cpu_percent")
              for r in (all_runs(results, alone=False) if runs is None else runs)
              for o in (r.get("rounds") or [r])]
    others = [o for o in others if o is not None]
    if not others:
        return ""
    avg, top = sum(others) / len(others), max(others)
    verdict = ("a quiet machine" if top < 15 else
               "a busy machine: treat absolute figures, and ratios of runs taken minutes "
               "apart, with care")
    return (f"Noise: processes outside the benchmark used {avg:.0f}% of a core on average "
            f"during the runs (max {top:.0f}%): {verdict}.")


def machine_line(meta: dict) -> str:
    return (f"{meta['cpu_model']}, {meta['cores']} cores, Linux {meta['kernel']}, "
            f"Python {meta['python']}, {meta['redis_server'].split(' sha=')[0]}")


def _mib(n: float | None) -> str:
    return f"{n / 1048576:.1f} MiB" if n else "-"


def _run_row(label: str, r: dict, cost: bool = False) -> str:
    lat = r["latency_ms"]
    extra = f" {r.get('server_and_redis_cpu_us_per_call', '-')} |" if cost else ""
    return (f"| {label} | {_rps(r)} | {lat['p50']:.2f} | {lat['p99']:.2f} |{extra} "
            f"{_cpu(r)} |")


def _cpu(r: dict) -> str:
    return ", ".join(f"{k} {v:.0f}%" for k, v in r["cpu_percent"].items() if v >= 1) + \
        f"; machine {r['machine_busy_percent']:.0f}%"


def _ok(value: float | None, target: float, higher: bool = True) -> str:
    if value is None:
        return "-"
    met = value >= target if higher else value <= target
    return "met" if met else "not met"


def results_markdown(results: dict) -> str:  # noqa: C901 — one page, section by section
    meta, main, keys = results["meta"], results["main"], results["keys"]
    c = main["concurrency"]
    ratios = main["ratios"]
    spread = main.get("ratio_spread") or {}
    n = _repeat(meta)

    def cell(key: str) -> str:
        return _ratio_cell(ratios, spread, key, n)
    rt = results["round_trips"]
    mem = results["memory"]
    targets = results["targets"]
    quick = meta["mode"] == "quick"
    p99_ok = _ok(ratios["p99_authorize_over_baseline"],
                 targets["p99_authorize_over_baseline_max"], higher=False)
    out = [
        "# Benchmark results",
        "",
        ("> **Quick run** (short runs, one concurrency): a smoke figure, not the measurement."
         if quick else
         "> Full run. The ratios, measured in the same run, are what carries; absolute "
         "numbers depend on what else the 2 cores were doing (see Noise: a single run "
         "moves ±20% on this shared machine, hence the medians of interleaved rounds)."
         if meta["mode"] == "full" else
         "> **Custom run** (shorter, smaller or partial, see the command): not the full "
         "measurement."),
        "",
        *([f"> **Invalid runs** — {len(results['problems'])} runs had denials or socket "
           "errors, so their req/s is not the allow path's: "
           + "; ".join(results["problems"]), ""] if results.get("problems") else []),
        f"Command: `{meta['command']}` ({meta['seconds']:.0f} s, {meta['timestamp']}, "
        f"commit {meta.get('git') or 'unknown'})  ",
        f"Machine: {machine_line(meta)}; {meta['nginx']}; {meta['wrk'].split(' [')[0]}  ",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in meta["packages"].items()) + "  ",
        f"Load: wrk -t{meta['settings']['wrk_threads']}, "
        f"{meta['settings']['duration_s']:g} s per run"
        + (f", {n} rounds per cell" if n > 1 else "") + ", every request a `POST "
        "/v1/chat/completions` JSON body with a Bearer key drawn at random from "
        f"{keys['count']:,} keys (standard keys with a finite quota and an rpm limit far above "
        "the load, so each call runs every check, the quota decrement and the rate window). "
        "All processes on the same 2 cores.",
        "",
        noise_line(results),
        "",
        *([repeat_method(n), ""] if n > 1 else []),
        f"## The authorize path at c{c} (1 sidecar worker)",
        "",
        "| handler | req/s | p50 ms | p99 ms | µs CPU/call (server + Redis) | "
        "CPU during the run |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in ("authorize", "baseline", "bare", "nginx_lua"):
        if name in main:
            out.append(_run_row(LABELS[name], main[name], cost=True))
    out += [
        "",
        ("| ratio | median of the per-round ratios (min–max over rounds) | issue 5 target |"
         if n > 1 else "| ratio | value | issue 5 target |"),
        "|---|---:|---|",
        f"| authorize / baseline req/s | {cell('authorize_over_baseline')} | "
        f"≥ {targets['authorize_over_baseline']} "
        f"({_ok(ratios['authorize_over_baseline'], targets['authorize_over_baseline'])}) |",
        f"| authorize / baseline p99 | {cell('p99_authorize_over_baseline')} | "
        f"≤ {targets['p99_authorize_over_baseline_max']} ({p99_ok}) |",
        f"| authorize / bare req/s | {cell('authorize_over_bare')} | reported |",
        f"| baseline / bare req/s | {cell('baseline_over_bare')} | reported |",
    ]
    if "authorize_over_nginx_lua" in ratios:
        out.append(f"| authorize / NGINX+Lua, 1 worker | {cell('authorize_over_nginx_lua')} "
                   f"| ≥ {targets['authorize_over_nginx_lua']} with all workers (below) |")
    for key, label in (("cpu_baseline_over_authorize", "baseline / authorize"),
                       ("server_cpu_baseline_over_authorize",
                        "sidecar process only, baseline / authorize (< 1: the baseline "
                        "is authorize's work minus Redis)"),
                       ("cpu_bare_over_authorize", "bare / authorize"),
                       ("cpu_nginx_lua_over_authorize", "NGINX+Lua / authorize")):
        if ratios.get(key) is not None:
            out.append(f"| CPU per call, {label} | {cell(key)} | reported |")
    out += [
        "",
        "Baseline: `/bench/baseline/...` is authorize's work minus the Redis call: the same "
        "`Authorizer` (body read, key hash, model extraction, the EVALSHA packed and "
        "batched per tick in the production `Pipeline`, callers resumed by their batch's "
        "future, the same response headers and metrics); only the write to Redis, Redis "
        "and the reply's read and parse are left out (each batch is answered on the next "
        "loop tick with a fixed allow reply, benchmarks/serve.py). Bare: `/bench/bare`, "
        "a 200 \"ok\" from the same process, same "
        "request bytes. The NGINX + Lua peer runs the same `authorize.lua` with the same "
        "KEYS/ARGV, one EVALSHA per request (benchmarks/nginx_lua/). µs CPU/call: CPU "
        "the serving process(es) and redis-server used during the run (/proc), per answered "
        "call; on a busy machine it is steadier than req/s (the CPU-per-call ratios are "
        "cost ratios: above 1 means authorize is cheaper).",
        "",
        "## Round trips and Redis cost",
        "",
        f"- Calls per Redis round trip at c{c}: **{rt['calls_per_round_trip']}** "
        f"({rt['redis_calls']:,} calls in {rt['redis_round_trips']:,} pipelined writes; "
        "from `sidecar_redis_batch_calls` sum/count). Worst case is one round trip per call.",
        f"- Redis CPU per decision: **{rt['redis_cpu_us_per_decision']} µs** (sidecar, "
        "batched)" + (f" vs {rt['nginx_lua_redis_cpu_us_per_decision']} µs for the NGINX + "
                      "Lua peer (one EVALSHA per request)"
                      if rt.get("nginx_lua_redis_cpu_us_per_decision") is not None else "")
        + " — `INFO cpu` user+sys delta / requests.",
    ]
    script = results.get("script", {})
    if script.get("authorize", {}).get("usec_per_call"):
        out.append(
            f"- authorize.lua alone inside Redis (redis-benchmark -P 20, one record): "
            f"**{script['authorize']['usec_per_call']} µs** per call (an empty script: "
            f"{script['empty_script']['usec_per_call']} µs): Redis's one thread caps "
            f"decisions at ~{script['decisions_per_s_ceiling']:,}/s for all workers together.")
    gcs = results.get("gc") or {}
    if gcs:
        out.append(
            "- Garbage collection in the sidecar worker during the sweep (every call in "
            "flight waits for it): " + "; ".join(
                f"generation {g}: {s['collections']:,} collections, longest "
                f"{s['longest_serving_ms']} ms" for g, s in sorted(gcs.items()))
            + " (what the process loaded before serving is frozen out of the collector: "
            "OPTIMIZATIONS.md §19).")
    out += [
        "",
        "## Concurrency sweep",
        "",
        "![throughput, p99 latency and CPU per call against concurrency](plot.png)",
        "",
        "| handler | c | req/s | p50 ms | p99 ms | µs CPU/call | calls/round trip |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results["sweep"].items():
        for r in sorted(runs, key=lambda r: r["connections"]):
            out.append(f"| {LABELS.get(name, name)} | {r['connections']} | {_rps(r)} | "
                       f"{r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} | "
                       f"{r.get('server_and_redis_cpu_us_per_call', '-')} | "
                       f"{r.get('calls_per_round_trip') or '-'} |")
    if results.get("sweep_ratios"):
        peer = any("authorize_over_nginx_lua" in row["ratios"]
                   for row in results["sweep_ratios"])
        out += ["", "| c | authorize / baseline | authorize / bare | p99 authorize / baseline"
                + (" | authorize / NGINX+Lua |" if peer else " |"),
                "|---:|---:|---:|---:|" + ("---:|" if peer else "")]
        for row in sorted(results["sweep_ratios"], key=lambda r: r["connections"]):
            cols = ["authorize_over_baseline", "authorize_over_bare",
                    "p99_authorize_over_baseline"] + (["authorize_over_nginx_lua"]
                                                      if peer else [])
            out.append(f"| {row['connections']} | " + " | ".join(
                _ratio_cell(row["ratios"], row["spread"], k, n) for k in cols) + " |")
        if n > 1:
            out += ["", "Ratios: median of the per-round ratios (min–max over the rounds)."]
    if "workers" in results:
        out += ["", f"## Workers (c{c})", "",
                "| workers | sidecar req/s | NGINX+Lua req/s | sidecar / peer | bare req/s | "
                "who saturates (sidecar run) | CPU during the sidecar run |",
                "|---:|---:|---:|---:|---:|---|---|"]
        for row in results["workers"]:
            a = row["authorize"]
            peer = row.get("nginx_lua")
            peer_rps = _rps(peer) if peer else "-"
            ratio = _ratio_cell(row, {"authorize_over_nginx_lua":
                                      row.get("authorize_over_nginx_lua_spread")},
                                "authorize_over_nginx_lua", n)
            out.append(
                f"| {row['workers']} | {_rps(a)} | {peer_rps} | {ratio} | "
                f"{_rps(row['bare'])} | {a['saturation']['verdict']} | {_cpu(a)} |")
        out += ["", "Where the machine saturates (authorize runs): the req/s the cores left "
                "by other processes could carry at the CPU per call measured, all our "
                "processes together (sidecar + Redis + wrk); near 100% of it, the cores "
                "are the limit and a second worker cannot add one.", "",
                "| workers | µs CPU per call, all processes | cores left (%) | ceiling req/s "
                "| measured / ceiling |", "|---:|---:|---:|---:|---:|"]
        for row in results["workers"]:
            ceil = row.get("ceiling")
            if ceil:
                out.append(f"| {row['workers']} | {ceil['us_per_call_all_processes']} | "
                           f"{ceil['cores_left_percent']} | {ceil['ceiling_rps']:,} | "
                           f"{ceil['of_ceiling']} |")
        out += ["", "CPU% is per process group, 100% = one core (sidecar = all its workers; "
                "nginx_lua = the peer's workers; wrk = the load generator). A single-threaded "
                "process at ≥ 85% is named as saturated."]
    if "edge" in results:
        e = results["edge"]
        en = e.get("repeat", 1)
        er, es = e.get("ratios", {}), e.get("ratio_spread") or {}
        out += ["", f"## At the edge (NGINX auth_request, c{c})", "",
                f"{en} interleaved round(s).", "",
                "| front | req/s | p50 ms | p99 ms | CPU |", "|---|---:|---:|---:|---|",
                _run_row("NGINX → upstream, no auth", e["plain"]),
                _run_row("NGINX auth_request → sidecar, → upstream", e["authz"])]
        if "peer" in e:
            out.append(_run_row("NGINX auth_request → NGINX + Lua peer, → upstream",
                                e["peer"]))
        if "authz_over_peer" in er:
            out += ["", "| ratio | median of the per-round ratios (min–max) | aim |",
                    "|---|---:|---|",
                    f"| sidecar / no auth | {_ratio_cell(er, es, 'authz_over_plain', en)} | "
                    "reported |",
                    f"| NGINX + Lua peer / no auth | "
                    f"{_ratio_cell(er, es, 'peer_over_plain', en)} | reported |",
                    f"| sidecar / NGINX + Lua peer, same edge | "
                    f"{_ratio_cell(er, es, 'authz_over_peer', en)} | ≥ 1.0 "
                    f"({_ok(er['authz_over_peer'], 1.0)}) |"]
        out += ["",
                f"NGINX + sidecar keeps **{e['authz_over_plain']:.0%}** of the same NGINX's "
                "throughput without auth (anchor: Kong keeps 76% with key-auth + "
                f"rate-limiting). {e['note']} Config: benchmarks/edge/nginx.conf."]
    from .estimate import million, million_markdown
    out += million_markdown(million(results))
    if "budgets" in results:
        from .budgets import markdown
        out += markdown(results["budgets"], lambda m, s, k: _ratio_cell(m, s, k, n),
                        _run_row)
    if "alerts" in results:
        from .alerts import markdown as alerts_markdown
        out += alerts_markdown(results["alerts"], _ratio_cell, _run_row, noise_line)
    if "cluster" in results:
        from .cluster import markdown as cluster_markdown
        out += cluster_markdown(results["cluster"])
    if "traefik" in results:
        out += traefik_markdown(results["traefik"])
    if "envoy" in results:
        out += envoy_markdown(results["envoy"])
    rec_load, rec_used = keys["record_after_load"], mem["record_after_traffic"]
    record_ok = _ok(rec_used["bytes_beyond_hash"], targets["record_bytes_beyond_hash_max"],
                    higher=False)
    out += [
        "", "## Memory", "",
        f"- Sidecar RSS after the run (1 worker, {keys['count']:,} keys in Redis): "
        f"**{_mib(mem['sidecar_rss_bytes'])}**"
        + (f"; NGINX + Lua peer workers: {_mib(mem.get('nginx_lua_rss_bytes'))}"
           if mem.get("nginx_lua_rss_bytes") else "") + ".",
        f"- Redis `used_memory` grew {keys['used_memory_per_key']:.0f} bytes per key while "
        "loading (record + id index entry + keyspace overhead).",
        f"- `MEMORY USAGE` of a key record (avg of {rec_load['sampled']}, "
        f"{rec_load['encoding']}): {rec_load['memory_usage_avg']:.0f} bytes as created "
        f"({rec_load['fields_avg']:.0f} fields), {rec_used['memory_usage_avg']:.0f} bytes "
        f"after traffic ({rec_used['fields_avg']:.0f} fields, with recent activity and "
        "counters).",
        f"- Beyond the 64-hex hash: **{rec_used['bytes_beyond_hash']:.0f} bytes** per used "
        f"record ({rec_load['bytes_beyond_hash']:.0f} fresh); target ≤ "
        f"{targets['record_bytes_beyond_hash_max']} ({record_ok}).",
    ]
    if "profile" in results and "error" not in results["profile"]:
        p = results["profile"]
        out += ["", "## Profile", "",
                f"py-spy on the worker under load: {p['cpu_us_per_call']} µs of CPU per call; "
                "top areas: " + ", ".join(f"{a['area']} {a['percent']}%"
                                           for a in p["by_area"][:5])
                + ". Details in [PROFILE.md](PROFILE.md)."]
    out += ["", "Raw figures: [results.json](results.json) (this run); every run also writes "
            "benchmarks/results/<timestamp>.json (not committed).", ""]
    return "\n".join(out)


TRAEFIK_LABELS = {
    "sidecar_alone": "sidecar alone (wrk → /authz, no proxy)",
    "plain": "Traefik → upstream, no auth",
    "shipped": "shipped: forwardAuth → sidecar-authz loop → sidecar, 1 MiB body",
    "direct": "forwardAuth → sidecar directly (its own client)",
    "body_64k": "shipped, maxBodySize 64 KiB",
    "no_body": "shipped, forwardBody off (no model check)",
    "free_authz": "shipped, forwardAuth → NGINX `return 200` (a free authorizer: the ceiling)",
}


def traefik_markdown(t: dict) -> list[str]:
    meta = t.get("meta", {})
    n = len(t.get("rounds", [])) or 1
    out = ["", f"## Traefik forwardAuth (c{t['connections']})", "",
           f"Command: `{meta.get('command', 'python -m benchmarks.run --only traefik')}` "
           f"({meta.get('timestamp', '?')}, commit {meta.get('git', '?')}), "
           f"{n} interleaved round(s); the shipped deploy/traefik/ files run by a real "
           "Traefik, loopback addresses, upstream a `return 200` NGINX, access log off.", "",
           noise_line({}, [r for row in t.get("rounds", []) for r in row.values()]), "",
           "| front | req/s | p50 ms | p99 ms | µs CPU/call: Traefik, sidecar + Redis | CPU "
           "| to the sidecar: connections open mid-run, closed per call | Traefik RSS |",
           "|---|---:|---:|---:|---|---|---|---:|"]
    for name, label in TRAEFIK_LABELS.items():
        r = t["variants"].get(name)
        if r is None:
            continue
        ss = r.get("ss_sidecar_port") or {}
        conns = "-" if name in ("plain", "sidecar_alone", "free_authz") else \
            f"{ss.get('client ESTAB', 0)}, {r.get('closed_per_call')}"
        rss = _mib(r.get("traefik_rss_bytes")) if name != "sidecar_alone" else "-"
        cpu = r.get("cpu_percent", {})

        def per_call(*names: str, run: dict = r, cpu: dict = cpu) -> str:
            if not run["rps"]:
                return "-"
            return f"{sum(cpu.get(n, 0.0) for n in names) / 100 / run['rps'] * 1e6:,.0f}"
        costs = f"{per_call('traefik')}, {per_call('sidecar', 'redis')}"
        out.append(f"| {label} | {_rps(r)} | {r['latency_ms']['p50']:.2f} | "
                   f"{r['latency_ms']['p99']:.2f} | {costs} | {_cpu(r)} | {conns} | {rss} |")
    bad = [p for p in t.get("problems", [])]
    if bad:
        out += ["", "Invalid runs: " + "; ".join(bad) + "."]
    ratios, spread = t.get("ratios", {}), t.get("ratio_spread", {})
    out += ["", "| ratio to Traefik alone | median of the per-round ratios (min–max) | aim |",
            "|---|---:|---|"]
    for name in TRAEFIK_LABELS:
        key = f"{name}_over_plain"
        if key in ratios:
            aim = f"≥ {t['target']} ({_ok(ratios[key], t['target'])})" \
                if name == "shipped" else "reported"
            out.append(f"| {name} | {_ratio_cell(ratios, spread, key, n)} | {aim} |")
    out += ["", "Closed per call: TIME-WAIT sockets the run added on the connections to the "
            "sidecar's port, per call (a lower bound). Why forwardAuth costs what it costs "
            "and what was changed: deploy/README.md (Traefik and the body). The free "
            "authorizer row is the most any authorizer could keep behind this forwardAuth "
            "on this machine: what is left between it and Traefik alone is Traefik's own "
            "auth call."]
    return out


def repeat_method(n: int) -> str:
    return (f"Method: every cell of the sweep (which holds the c64 comparison) and of the "
            f"workers section was measured {n} times, interleaved across the targets "
            "compared (A B C D, A B C D, ...), so each round's runs are seconds apart. "
            "req/s, p50, p99, CPU% and CPU per call are the medians over the rounds, "
            "with the min–max of req/s in brackets. Every ratio is the **median of the "
            "per-round ratios** (each round's ratio divides figures measured seconds "
            "apart), with its min–max over the rounds in brackets; it is not the ratio of "
            "the medians. The edge and profile sections are single runs.")


def traefik_lines(t: dict) -> list[str]:
    lines = [f"  traefik c{t['connections']}: " + ", ".join(
        f"{name} {_rps(r)}" for name, r in t["variants"].items())]
    lines.append("  traefik ratios to Traefik alone: " + ", ".join(
        f"{k.removesuffix('_over_plain')} {v}" for k, v in t["ratios"].items()))
    return lines


def alerts_summary(a: dict) -> str:
    from .alerts import summary_line
    return summary_line(a)


def summary_lines(results: dict) -> list[str]:
    if "main" not in results:   # sections run alone
        lines = [f"  !! INVALID: {p}" for p in results.get("problems", [])]
        return lines + (traefik_lines(results["traefik"]) if "traefik" in results else []) \
            + (envoy_lines(results["envoy"]) if "envoy" in results else []) \
            + ([f"  cluster/one Redis req/s {results['cluster']['cluster_over_one_rps']}"]
               if "cluster" in results else []) \
            + ([alerts_summary(results["alerts"])] if "alerts" in results else [])
    main = results["main"]
    r = main["ratios"]
    n = main.get("repeat", 1)
    spread = main.get("ratio_spread") or {}

    def cell(key: str) -> str:
        return _ratio_cell(r, spread, key, n)
    lines = ["", f"== c{main['concurrency']}, 1 worker"
             + (f", medians of {n} interleaved rounds" if n > 1 else "") + " =="]
    for problem in results.get("problems", []):
        lines.append(f"  !! INVALID: {problem}")
    for name in ("authorize", "baseline", "bare", "nginx_lua"):
        if name in main:
            run = main[name]
            lines.append(f"  {LABELS[name]:<22} {_rps(run):>9} req/s  "
                         f"p50 {run['latency_ms']['p50']:6.2f} ms  "
                         f"p99 {run['latency_ms']['p99']:6.2f} ms")
    lines.append(f"  authorize/baseline {cell('authorize_over_baseline')}  "
                 f"authorize/bare {cell('authorize_over_bare')}  "
                 f"p99 authorize/baseline {cell('p99_authorize_over_baseline')}"
                 + (f"  authorize/nginx_lua {cell('authorize_over_nginx_lua')}"
                    if "authorize_over_nginx_lua" in r else "")
                 + ("  (median of per-round ratios, min-max)" if n > 1 else ""))
    lines.append("  µs CPU/call (server + Redis): " + ", ".join(
        f"{n} {main[n].get('server_and_redis_cpu_us_per_call')}"
        for n in ("authorize", "baseline", "bare", "nginx_lua") if n in main))
    rt = results["round_trips"]
    lines.append(f"  calls/round trip {rt['calls_per_round_trip']}  "
                 f"redis CPU/decision {rt['redis_cpu_us_per_decision']} us")
    script = results.get("script", {})
    if script.get("decisions_per_s_ceiling"):
        lines.append(f"  authorize.lua in Redis: {script['authorize']['usec_per_call']} us/call "
                     f"-> ceiling ~{script['decisions_per_s_ceiling']:,} decisions/s")
    for row in results.get("workers", []):
        peer = row.get("nginx_lua")
        lines.append(f"  workers {row['workers']}: sidecar {_rps(row['authorize'])}"
                     + (f"  peer {_rps(peer)}  ratio {row['authorize_over_nginx_lua']}"
                        + (_span(row.get("authorize_over_nginx_lua_spread"), "{}")
                           if n > 1 else "")
                        if peer else "")
                     + f"  ({row['authorize']['saturation']['verdict']})")
    if "budgets" in results:
        b = results["budgets"]
        lines.append(f"  budgets/plain req/s {b['ratios']['rps']}  CPU/call plain/budgets "
                     f"{b['ratios']['cpu_plain_over_budgets']}  commands/call "
                     f"{b['budgets'].get('redis_commands_per_call')}")
    if "alerts" in results:
        lines.append(alerts_summary(results["alerts"]))
    if "edge" in results:
        edge = results["edge"]
        lines.append(f"  edge: auth_request keeps {edge['authz_over_plain']:.0%}"
                     + (f", sidecar/peer same edge {edge['ratios']['authz_over_peer']}"
                        if "authz_over_peer" in edge.get("ratios", {}) else ""))
    if "traefik" in results:
        lines += traefik_lines(results["traefik"])
    rec = results["memory"]["record_after_traffic"]
    lines.append(f"  memory: sidecar RSS {_mib(results['memory']['sidecar_rss_bytes'])}, "
                 f"record {rec['memory_usage_avg']:.0f} B ({rec['bytes_beyond_hash']:.0f} B "
                 "beyond the hash)")
    return lines


def envoy_markdown(e: dict) -> list[str]:
    """The Envoy section (--only envoy): the fronts and their ratios."""
    if "error" in e:
        return ["", "## Behind real Envoy", "", f"Not measured: {e['error']}."]
    meta, n = e.get("meta", {}), e.get("repeat", 1)
    out = ["", f"## Behind real Envoy (HTTP and gRPC ext_authz, POST, c{e['concurrency']})",
           "",
           f"Command: `{meta.get('command', 'python -m benchmarks.run --only envoy')}` "
           f"({meta.get('timestamp', '?')}, commit {meta.get('git', '?')}); {e['envoy']}, "
           f"`--concurrency {e['envoy_workers']}`; {n} interleaved round(s); sidecar 1 "
           "worker.", "",
           noise_line({}, [e[k] for k in ENVOY_LABELS if k in e]), "",
           "| front | req/s | p50 ms | p99 ms | µs CPU/call (all servers) | CPU |",
           "|---|---:|---:|---:|---:|---|"]
    for k, label in ENVOY_LABELS.items():
        if k in e:
            lat = e[k]["latency_ms"]
            out.append(f"| {label} | {_rps(e[k])} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
                       f"{e[k].get('servers_cpu_us_per_call', '-')} | {_cpu(e[k])} |")
    if e.get("problems"):
        out += ["", "Invalid runs: " + "; ".join(e["problems"]) + "."]
    r, spread = e["ratios"], e.get("ratio_spread") or {}
    out += ["", "| ratio | median of the per-round ratios (min–max) | aim |",
            "|---|---:|---|",
            f"| Envoy + sidecar / Envoy alone | "
            f"{_ratio_cell(r, spread, 'sidecar_over_alone', n)} | "
            f"≥ 0.3 ({_ok(r.get('sidecar_over_alone'), 0.3)}) |"]
    if "sidecar_grpc_over_alone" in r:
        out += [f"| Envoy + sidecar (gRPC) / Envoy alone | "
                f"{_ratio_cell(r, spread, 'sidecar_grpc_over_alone', n)} | reported |",
                f"| gRPC mode / HTTP mode | "
                f"{_ratio_cell(r, spread, 'sidecar_grpc_over_sidecar', n)} | reported |"]
    if "nginx_lua_over_alone" in r:
        out += [f"| Envoy + NGINX+Lua / Envoy alone | "
                f"{_ratio_cell(r, spread, 'nginx_lua_over_alone', n)} | reported |",
                f"| Envoy + sidecar / Envoy + NGINX+Lua | "
                f"{_ratio_cell(r, spread, 'sidecar_over_nginx_lua', n)} | reported |"]
    for key, what in (("sidecar_bare", "the sidecar's bare handler"),
                      ("free_authz", "a free authorizer (the ceiling)")):
        if f"{key}_over_alone" in r:
            out.append(f"| Envoy + {what} / Envoy alone | "
                       f"{_ratio_cell(r, spread, f'{key}_over_alone', n)} | reported |")
    reuse = e.get("authorizer_connections") or {}
    if reuse:
        out += ["", "Envoy → authorizer connections (Envoy's cluster counters over the whole "
                "section): " + "; ".join(
                    f"{ENVOY_LABELS[k].split('→ ')[-1]}: {v['calls']:,} calls on "
                    f"{v['connections']} connections" for k, v in reuse.items()) + "."]
    out += ["", "Where the difference goes: with ext_authz each call crosses Envoy twice "
            "more (a second HTTP exchange, the body buffered and copied into the check) and "
            "adds the authorizer and Redis, so the ratio is bounded by CPU per call (the "
            "µs CPU/call column), and on a machine other processes load it also waits for "
            "the CPU in each of the three processes, which the lone Envoy does not. "
            "The free authorizer's row is the most any authorizer keeps behind this Envoy "
            "(the second exchange alone); the sidecar's bare handler against it is what "
            "the sidecar's HTTP edge costs; the full decision against the bare handler "
            "is the Redis round trip and the script, the same for the NGINX + Lua peer.",
            "", "The Envoys are the shipped deploy/envoy/envoy.yaml (envoy-grpc.yaml for gRPC) "
            "with the addresses "
            "moved to loopback and the upstream replaced by a `direct_response` (no upstream "
            "process shares the cores); \"alone\" also has the ext_authz filter removed and "
            "a buffer filter of the same size in its place (Envoy reads the whole body, as "
            "with ext_authz; answering before it, Envoy would close every connection). Every "
            "call is allowed (random key of the loaded set). See benchmarks/envoy.py."]
    return out


def envoy_lines(e: dict) -> list[str]:
    if "ratios" not in e:
        return [f"  envoy: {e.get('error', 'not run')}"]
    lines = [f"  envoy c{e['concurrency']}: " + ", ".join(
        f"{k} {_rps(e[k])}" for k in ENVOY_LABELS if k in e)]
    lines.append("  envoy ratios: " + "  ".join(f"{k} {v}" for k, v in e["ratios"].items()))
    return lines
