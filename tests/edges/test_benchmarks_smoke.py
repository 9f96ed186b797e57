"""A smoke test of the benchmark harness, not a benchmark: every section runs end to end in
a tiny mode (4 connections, one worker, 1 s runs, ~25 s in all) and writes what it
promises. The load itself (c16/64/256, 1 and 2 workers) runs only in `python -m
benchmarks.run`, never in the test suite.

Speed is never asserted here (benchmarks/ measures it); only that every section ran
against real servers, answered allows (a run of 401s would look fast and mean nothing),
and left a complete results file, plot and RESULTS.md. Two rounds per cell, so the
medians, the per-round ratios and their spread are exercised too.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def run_alone(out, section: str, *args: str) -> dict:
    """`--only <section>` published into a copy of the published results: its part, after
    checking that it left every other part as it was."""
    out.mkdir()
    published = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(published))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", section, "--duration", "1",
         "--warmup", "0", *args, "--results-dir", str(out / "results"), "--publish",
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    merged = json.loads((out / "results.json").read_text())
    part = merged.pop(section)
    assert merged == {k: v for k, v in published.items() if k != section}
    return part


def test_tiny_run_writes_complete_results(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--keys", "200", "--duration", "1",
         "--repeat", "2", "--concurrency", "4", "--main-concurrency", "4", "--warmup", "0",
         "--workers", "1", "--profile",
         "--results-dir", str(out / "results"), "--publish", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    stamped = [p for p in (out / "results").glob("*.json") if ".speedscope" not in p.name]
    assert len(stamped) == 1
    results = json.loads(stamped[0].read_text())
    assert json.loads((out / "results.json").read_text()) == results

    assert results["problems"] == []
    assert results["meta"]["settings"]["repeat"] == 2
    main = results["main"]
    assert main["concurrency"] == 4 and main["repeat"] == 2
    for name in ("authorize", "baseline", "bare", "nginx_lua"):
        run = main[name]
        assert run["rps"] > 0 and run["requests"] > 0, name
        assert run["non_2xx"] == 0, (name, run)
        assert 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p99"], name
        assert set(run["cpu_percent"]) >= {"sidecar", "redis", "wrk"}, name
        # the reported figure is the median of the two rounds, the spread their min-max
        assert run["repeats"] == 2 and len(run["rounds"]) == 2, name
        lo, hi = run["spread"]["rps"]
        assert lo <= run["rps"] <= hi, (name, run["spread"])
        assert [lo, hi] == sorted(r["rps"] for r in run["rounds"]), name
        assert run["requests"] == sum(r["requests"] for r in run["rounds"]), name
    assert main["authorize"]["allowed"] > 0
    ratio_keys = {"authorize_over_baseline", "authorize_over_bare",
                  "p99_authorize_over_baseline", "authorize_over_nginx_lua"}
    assert set(main["ratios"]) >= ratio_keys
    assert len(main["ratio_rounds"]) == 2
    for key in ratio_keys:  # the ratio is the median of the per-round ratios
        per_round = sorted(r[key] for r in main["ratio_rounds"])
        assert main["ratio_spread"][key] == per_round, key
        assert per_round[0] <= main["ratios"][key] <= per_round[1], key
    assert [row["connections"] for row in results["sweep_ratios"]] == [4]

    trips = results["round_trips"]
    assert trips["redis_round_trips"] > 0
    assert trips["calls_per_round_trip"] >= 1
    assert trips["redis_cpu_us_per_decision"] > 0

    assert results["keys"]["count"] == 200
    memory = results["memory"]
    assert memory["sidecar_rss_bytes"] > 0
    assert memory["record_after_traffic"]["memory_usage_avg"] > 64
    # Traffic adds recent activity and counters to the records it touched.
    assert (memory["record_after_traffic"]["fields_avg"]
            > results["keys"]["record_after_load"]["fields_avg"])

    budgets = results["budgets"]   # the full hierarchy against plain (issue 11)
    for name in ("plain", "budgets"):
        run = budgets[name]
        assert run["rps"] > 0 and run["non_2xx"] == 0, (name, run)
        assert run["evalsha_per_call"] >= 1, (name, run)
    assert set(budgets["levels_after_one_call"]) == {"key", "project", "organization"}
    assert all(v > 0 for v in budgets["levels_after_one_call"].values())
    assert budgets["ratios"]["rps"] > 0
    assert "## Budgets" in (out / "RESULTS.md").read_text()

    alerts = results["alerts"]   # thresholds and usage history on against off (issue 12)
    for name in ("on", "off", "on_new", "org_on", "org_off", "org_on_new"):
        assert alerts[name]["rps"] > 0 and alerts[name]["non_2xx"] == 0, name
    assert alerts["ratios"]["rps"] > 0 and alerts["ratios"]["org_rps"] > 0
    assert "## Alerts and usage history" in (out / "RESULTS.md").read_text()

    edge = results["edge"]
    assert edge["plain"]["rps"] > 0 and edge["authz"]["rps"] > 0
    assert edge["authz"]["non_2xx"] == 0
    assert edge["authz_over_plain"] > 0

    assert [row["workers"] for row in results["workers"]] == [1]
    for row in results["workers"]:
        assert row["authorize"]["rps"] > 0 and row["nginx_lua"]["rps"] > 0
        assert row["authorize"]["non_2xx"] == 0
        assert row["authorize"]["saturation"]["verdict"]
        assert row["authorize"]["repeats"] == 2 and row["nginx_lua"]["repeats"] == 2
        lo, hi = row["authorize_over_nginx_lua_spread"]
        assert lo <= row["authorize_over_nginx_lua"] <= hi

    script = results["script"]
    assert script["authorize"]["usec_per_call"] > script["empty_script"]["usec_per_call"] > 0
    assert script["decisions_per_s_ceiling"] > 0

    profile = results["profile"]
    assert "error" not in profile, profile
    assert profile["samples"] > 0 and profile["by_area"]
    assert json.loads((out / "results" / stamped[0].name.replace(
        ".json", ".speedscope.json")).read_text())["profiles"]

    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "RESULTS.md").read_text()
    assert results["meta"]["command"] in text and results["meta"]["cpu_model"] in text
    assert "median of the per-round ratios" in text
    assert "Profile of the authorize path" in (out / "PROFILE.md").read_text()


def test_traefik_section_alone_merges_into_the_published_results(tmp_path):
    """`--only traefik`: the shipped Traefik files against Traefik alone, every variant
    answering allows, added to the last full run's results without touching the rest."""
    out = tmp_path / "bench"
    traefik = run_alone(out, "traefik", "--keys", "200", "--repeat", "1")
    from benchmarks.traefik import VARIANTS
    assert set(traefik["variants"]) == {"sidecar_alone", *VARIANTS}
    for name, run in traefik["variants"].items():
        assert run["requests"] > 0 and run["non_2xx"] == 0, (name, run)
    assert "traefik" in traefik["variants"]["shipped"]["cpu_percent"]
    assert set(traefik["ratios"]) == {f"{v}_over_plain" for v in traefik["variants"]
                                      if v != "plain"}
    assert traefik["meta"]["command"].endswith("--publish " + str(out))
    text = (out / "RESULTS.md").read_text()
    assert "## Traefik forwardAuth (c64)" in text and "## The authorize path" in text
    assert not (out / "plot.png").exists()      # the sweep's plot is not redrawn


def test_tiny_budgets_section_alone_merges_into_the_published_results(tmp_path):
    """--only budgets: the full hierarchy against plain authorize, one EVALSHA per call,
    every level reserved at, added to the last full run's results."""
    out = tmp_path / "bench"
    budgets = run_alone(out, "budgets", "--keys", "300", "--repeat", "2",
                        "--main-concurrency", "4")
    assert set(budgets["levels_after_one_call"]) == {"key", "project", "organization"}
    for name in ("plain", "budgets"):
        run = budgets[name]
        assert run["requests"] > 0 and run["non_2xx"] == 0, name
        # One EVALSHA per call: the answered ones, and at most the calls in flight (c4)
        # of each round that wrk stopped before it could count their answers.
        assert run["requests"] <= run["evalsha"] <= run["requests"] + 4 * 2, name
    assert budgets["meta"]["command"].endswith("--publish " + str(out))
    assert "## Budgets: the full hierarchy" in (out / "RESULTS.md").read_text()


def test_envoy_section_alone_merges_into_the_published_results(tmp_path):
    """`--only envoy`: real Envoy on the shipped envoy.yaml alone, in front of the sidecar
    and in front of the NGINX + Lua peer, every front answering allows, added to the last
    full run's results without touching the rest."""
    out = tmp_path / "bench"
    envoy = run_alone(out, "envoy", "--keys", "200", "--repeat", "2")
    for name in ("alone", "sidecar", "nginx_lua"):
        run = envoy[name]
        assert run["requests"] > 0 and run["non_2xx"] == 0, (name, run)
        assert run["repeats"] == 2 and "envoy" in run["cpu_percent"], name
    assert envoy["sidecar"]["cpu_percent"]["sidecar"] > 0
    assert envoy["nginx_lua"]["cpu_percent"]["nginx_lua"] > 0
    for key in ("sidecar_over_alone", "nginx_lua_over_alone", "sidecar_over_nginx_lua"):
        lo, hi = envoy["ratio_spread"][key]
        assert 0 < lo <= envoy["ratios"][key] <= hi, key
    # Envoy kept its connections to the authorizer: far fewer than calls.
    reuse = envoy["authorizer_connections"]["sidecar"]
    assert 0 < reuse["connections"] < reuse["calls"]
    text = (out / "RESULTS.md").read_text()
    assert "## Behind real Envoy (HTTP and gRPC ext_authz, POST, c32)" in text
    assert "## The authorize path" in text


def test_tiny_cluster_section(tmp_path):
    """--only cluster: a real 3-node Redis Cluster behind a sidecar, against one Redis;
    every node decided calls and none was denied."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "cluster", "--keys", "300",
         "--duration", "1", "--repeat", "1", "--main-concurrency", "4", "--warmup", "0",
         "--results-dir", str(tmp_path), "--no-publish"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (stamped,) = [p for p in tmp_path.glob("*.json")]
    results = json.loads(stamped.read_text())
    assert results["problems"] == []
    cluster = results["cluster"]
    assert cluster["one"]["rps"] > 0 and cluster["cluster"]["rps"] > 0
    assert sum(cluster["keys_per_node"]) == 300
    assert all(n["decisions_share"] > 0 for n in cluster["cluster"]["per_node"])


def test_tiny_alerts_section_alone_merges_into_the_published_results(tmp_path):
    """--only alerts: authorize with alert thresholds and usage history on (the defaults)
    against off, standard and organization keys, in interleaved rounds; history counted by
    on only, still one EVALSHA per call, added to the last full run's results."""
    out = tmp_path / "bench"
    alerts = run_alone(out, "alerts", "--keys", "300", "--repeat", "2",
                       "--main-concurrency", "4")
    assert alerts["problems"] == []
    assert alerts["settings"]["on"] == {"alert_thresholds": "0.2,0.05,0",
                                        "usage_retention_days": "90"}
    for name in ("on", "off", "on_new", "org_on", "org_off", "org_on_new"):
        run = alerts[name]
        assert run["rps"] > 0 and run["non_2xx"] == 0, (name, run)
        assert run["repeats"] == 2 and len(run["expire_per_call_by_round"]) == 2, name
        # one round trip per call (calls still in flight when wrk stops count in Redis)
        assert abs(run["evalsha_per_call"] - 1) < 0.01, (name, run["commands_per_call"])
    # history: one HINCRBY per bucket (day, hour) and holder (key; key, project, org)
    for name, holders in (("on", 1), ("on_new", 1), ("org_on", 3), ("org_on_new", 3)):
        commands = alerts[name]["commands"]
        assert commands["hincrby"] == 2 * holders * commands["evalsha"], name
    # with the buckets deleted, each key's first call sets their time to live
    assert alerts["on_new"]["commands"]["expire"] > 0
    assert alerts["org_on_new"]["commands"]["expire"] > 0
    assert "hincrby" not in alerts["off"]["commands"]
    assert "hincrby" not in alerts["org_off"]["commands"]
    assert alerts["on"]["redis_commands_per_call"] > alerts["off"]["redis_commands_per_call"]
    for key in ("rps", "org_rps", "rps_new", "org_rps_new", "cpu_off_over_on"):
        # medians of the per-round ratios
        lo, hi = alerts["ratio_spread"][key]
        assert 0 < lo <= alerts["ratios"][key] <= hi, key
    script = alerts["script"]
    assert "error" not in script, script
    for kind, holders in (("standard", 1), ("organization", 3)):
        assert script[kind]["on"]["commands_per_call"]["hincrby"] == 2 * holders
        assert "hincrby" not in script[kind]["off"]["commands_per_call"]
        assert all(script[kind][c]["usec_per_call"] > 0 for c in script[kind])
        assert script["hincrby"][kind]["first_field_usec"] > 0
        assert script["hincrby"][kind]["last_field_usec"] > 0
    assert alerts["buckets"]["daily"]["hashes"] > 0
    assert alerts["meta"]["command"].endswith("--publish " + str(out))
    text = (out / "RESULTS.md").read_text()
    assert "## Alerts and usage history: on against off (c4, 1 worker, issue 12)" in text
    assert alerts["meta"]["command"] in text and "## The authorize path" in text
    assert not (out / "plot.png").exists()      # the sweep's plot is not redrawn
