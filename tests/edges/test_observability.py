"""The Grafana dashboard and the Prometheus rules name only metrics a running sidecar
exports, with labels it exports; the rules pass promtool (check + unit tests); no label
anywhere can hold a key, a key id or a client IP.

Metric names are parsed out of the PromQL of every dashboard target and alert rule. The
running sidecar is driven first through allows, each kind of denial, a Redis stall (so
sidecar_redis_errors_total and 503 decisions exist) and a usage report, so its labelled
series exist when /metrics is read. The dashboard is also checked against Grafana's schema
(@grafana/schema's TypeScript types); tests/edges/test_prometheus_live.py evaluates every
expression in a real Prometheus.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
import time
import urllib.request

import orjson
import pytest
import yaml
from conftest import ROOT, npm_tool, start_sidecar, stop_process, wait_for
from live import CLIENT_TIMEOUT, authz, make

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sidecar.json"
PROMETHEUS_SYNTHETIC = {"up"}       # Prometheus's own per-target series, not exported
ALLOWED_LABELS = {"status", "code", "kind", "result", "outcome", "threshold", "le"}
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series
TOKEN = "observability-token-0123456789"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "and", "or", "unless", "offset", "inf", "nan"}


# -- parsing PromQL -----------------------------------------------------------------------

def _strip(expr: str) -> str:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)   # strings
    return re.sub(r"\[[^\]]*\]", "", expr)                                 # ranges


def grouping_labels(expr: str) -> set[str]:
    """Label names in by (...), without (...), on (...), ignoring (...) clauses."""
    found: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", _strip(expr)):
        found |= {g.strip() for g in group.split(",") if g.strip()}
    return found


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every series selector in the expression."""
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "",
                  _strip(expr))
    out = []
    for match in re.finditer(
            r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?(\s*\()?", text):
        name, braces, call = match.groups()
        if call or name.lower() in _KEYWORDS:
            continue          # a function or aggregation, or a keyword
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)",
                                braces or ""))
        out.append((name, labels))
    return out


def test_promql_parsing():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(sidecar_a_bucket{le="0.025", '
            'code=~"x|y"}[5m]))) / clamp_min(sum(rate(sidecar_b_total[$__rate_interval])),'
            ' 1e-9) > bool 0.5 and on (instance) up{job="sidecar"} == 0')
    assert selectors(expr) == [("sidecar_a_bucket", {"le", "code"}),
                               ("sidecar_b_total", set()), ("up", {"job"})]
    assert grouping_labels(expr) == {"le", "instance"}


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every alert rule and dashboard target."""
    out = []
    for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"alert {rule['alert']}", rule["expr"]))
    for panel in orjson.loads(DASHBOARD.read_bytes())["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    return out


# -- promtool -----------------------------------------------------------------------------

def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool") or "/usr/bin/promtool"
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60)


def test_promtool_checks_the_rules_and_the_config():
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_of_the_alerts():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# -- against a running sidecar ------------------------------------------------------------

@pytest.fixture(scope="module")
def car(tmp_path_factory, redis_server):
    # A census an earlier module's sidecar stored (or its lock) would be what this one
    # shows: start from an empty Redis, as a deployment's first sidecar does.
    redis_server.client().flushall()
    sidecar = start_sidecar(tmp_path_factory.mktemp("observability"), redis_server.url,
                            settlement_token=TOKEN, redis_timeout_ms=100)
    yield sidecar
    stop_process(sidecar.proc)


async def drive(car, plane, http, redis_server) -> None:
    """Make the sidecar produce every kind of series the dashboard and rules use."""
    _, ok = await make(plane, unlimited=True, rpm=1)
    first = await authz(http, car, key=ok, body={"model": "m"})
    assert first.status == 200
    assert (await authz(http, car, key=ok, body={"model": "m"})).status == 429
    _, broke = await make(plane, quota=0)
    assert (await authz(http, car, key=broke, body={"model": "m"})).status == 402
    assert (await authz(http, car, body={"model": "m"})).status == 401
    async with http.post(car.url + "/settle", timeout=CLIENT_TIMEOUT,
                         headers={"Authorization": f"Bearer {TOKEN}"},
                         json={"reservation_id": first.headers["x-reservation-id"],
                               "key": ok, "cost": 0}) as resp:
        assert resp.status == 200
    # A Redis stall longer than redis_timeout_ms: a 503 decision and a Redis error.
    stall = threading.Thread(target=redis_server.pause, args=(0.6,))
    stall.start()
    try:
        time.sleep(0.1)
        assert (await authz(http, car, key=ok, body={"model": "m"})).status == 503
    finally:
        stall.join(5)


def scrape(car) -> str:
    with urllib.request.urlopen(car.admin_url + "/metrics", timeout=5) as resp:
        return resp.read().decode()


def exported(text: str) -> dict[str, set[str]]:
    """Sample name -> label names seen on it, from the Prometheus text format."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series = line.rsplit(" ", 1)[0]
        name, _, labels = series.partition("{")
        out.setdefault(name, set()).update(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', labels))
    return out


async def test_every_metric_in_dashboard_and_rules_is_exported(car, plane, http,
                                                              redis_server):
    await drive(car, plane, http, redis_server)
    # The census is taken in the background (runtime/census.py): shown once it is stored.
    await asyncio.to_thread(wait_for, lambda: "sidecar_keys_below_threshold{"
                            in scrape(car), 10, "the threshold census shown")
    samples = exported(scrape(car))
    named = 0
    for where, expr in expressions():
        for name, labels in selectors(expr):
            if name in PROMETHEUS_SYNTHETIC:
                continue
            named += 1
            # Exact sample names: a histogram is used through _bucket/_sum/_count, a
            # counter through _total; a bare family name or a wrong suffix is not exported.
            assert name in samples, f"{where}: {name} is not exported by the sidecar"
            missing = labels - samples[name] - SCRAPE_LABELS
            assert not missing, f"{where}: {name} has no label {missing}"
        for label in grouping_labels(expr):
            assert label in ALLOWED_LABELS | SCRAPE_LABELS, f"{where}: groups by {label}"
    assert named >= 15


async def test_no_label_can_hold_a_key_or_an_ip(car, plane, http, redis_server):
    samples = exported(scrape(car))
    sidecar_labels = set().union(*(labels for name, labels in samples.items()
                                   if name.startswith("sidecar_")))
    assert sidecar_labels <= ALLOWED_LABELS, sidecar_labels - ALLOWED_LABELS


def test_dashboard_shape():
    dash = orjson.loads(DASHBOARD.read_bytes())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    provisioned = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" /
                                  "datasources" / "prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("decisions", "latency", "redis round trip", "redis errors", "quota",
                  "rate limited", "per redis round trip", "fail-open"):
        assert topic in titles, topic


def test_dashboard_matches_grafana_schema(tmp_path):
    """TypeScript checks the dashboard, as an object literal, against the `Dashboard` type
    @grafana/schema generates from Grafana's dashboard schema (field names and types, panel
    fields included). A copy with one mistyped panel field must fail the same check."""
    types = ROOT / ".tools" / "node_modules" / "@grafana" / "schema" / "dist" / "types" / "index"
    shipped = DASHBOARD.read_text()
    broken = orjson.loads(shipped)
    broken["panels"][0]["gridPos"] = "top"
    for name, text in (("shipped", shipped), ("broken", orjson.dumps(broken).decode())):
        (tmp_path / f"{name}.ts").write_text(
            f'import type {{ Dashboard }} from "{types}";\n'
            f"export const dashboard = ({text}) satisfies Dashboard;\n")
    result = subprocess.run(
        [*npm_tool("typescript/bin/tsc"), "--noEmit", "--strict", "--skipLibCheck",
         "--target", "es2022", "--module", "esnext", "--moduleResolution", "bundler",
         "shipped.ts", "broken.ts"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if line and not line.startswith(" ")]
    assert all(line.startswith("broken.ts(") for line in errors), "\n".join(errors)
    assert errors, "the schema check accepted a mistyped panel"
