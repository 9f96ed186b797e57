"""Every PromQL expression of the Grafana dashboard and of the alert rules, evaluated by a
real Prometheus that scraped a real sidecar under load, returns series.

A private Prometheus (Debian's /usr/bin/prometheus) runs the shipped prometheus.yml
rendered for loopback (target, 1 s scrape and rule evaluation, the shipped alerts.yml by
absolute path), with a temp storage dir. A bounded load of authorize calls gives allows,
401, 402, 403, 429 and, through a Redis stall, 503 and a Redis error; usage reports give
an accepted and a refused settlement. Then, through /api/v1/query:

- dashboard targets: Grafana's interval variables ($__rate_interval, $__interval,
  $interval, $__range) are replaced by one fixed range (RANGE, longer than the whole
  test); each expression must return at least one series with a finite value;
- alert rules: the whole expression must be accepted by the API (it parses and
  evaluates), and the expression without its final comparison with a constant (the
  `> 0.01` / `== 0` that makes it an alert) must return at least one series, so every
  selector in it matches what the sidecar exports. An alert whose expression does not
  end in such a comparison fails the test until this method is extended for it. The
  rules Prometheus loaded from alerts.yml must also report health "ok".
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import orjson
import pytest
import yaml
from conftest import free_port, start_sidecar, stop_process, wait_for
from live import CLIENT_TIMEOUT, authz, make
from test_observability import PROMETHEUS, expressions

TOKEN = "prometheus-live-token-0123456789"
RANGE = "1m"                 # stands for Grafana's interval variables; > the test's length
GRAFANA_VARIABLES = re.compile(r"\$__rate_interval|\$__interval|\$__range|\$interval"
                               r"|\$\{__rate_interval\}|\$\{__interval\}")
# `<expr> > 0.01`, `<expr> == 0`, `<expr> > bool 0`: the alert's threshold
COMPARISON = re.compile(
    r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?[0-9.]+(?:e[-+]?[0-9]+)?\s*$")
LOAD_ROUNDS = 12             # ~0.25 s apart: a few seconds, several scrapes
POLL_S = 30                  # bound on waiting for Prometheus to have scraped it all


def prometheus_binary() -> str:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).exists(), "prometheus is required (deploy/install.sh --dev)"
    return binary


class Prometheus:
    def __init__(self, tmp: Path, target: str):
        config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target]}]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "prometheus.log"
        self.proc = subprocess.Popen(
            [prometheus_binary(), f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))

        def ready() -> bool:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        wait_for(ready, 30, "prometheus /-/ready")
        # Targets are applied a few seconds after start: load sent before the first
        # scrape would be one sample, no rate.
        wait_for(lambda: self.query(f'up{{instance="{target}"}} == 1')["data"]["result"],
                 30, "prometheus's first scrape of the sidecar")

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as err:      # 400/422: a bad expression
            return orjson.loads(err.read())

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)


def dashboard_expr(expr: str) -> str:
    fixed = GRAFANA_VARIABLES.sub(RANGE, expr)
    assert "$" not in fixed, f"a Grafana variable the test does not know: {expr}"
    return fixed


def alert_selecting_expr(expr: str) -> str:
    stripped = COMPARISON.sub("", expr.strip())
    assert stripped != expr.strip(), f"no final comparison to strip: {expr}"
    return stripped


def checks() -> list[tuple[str, str, str]]:
    """(where, expression as shipped, expression evaluated)."""
    out = []
    for where, expr in expressions():
        evaluated = (alert_selecting_expr(expr) if where.startswith("alert ")
                     else dashboard_expr(expr))
        out.append((where, expr, evaluated))
    return out


def test_expression_rewrites():
    assert alert_selecting_expr("sum(rate(x[5m]))\n  > 0.01\n") == "sum(rate(x[5m]))"
    assert alert_selecting_expr('up{job="s"} == 0') == 'up{job="s"}'
    assert alert_selecting_expr("a > bool 1e-3") == "a"
    with pytest.raises(AssertionError):
        alert_selecting_expr("absent(up)")
    assert dashboard_expr("rate(x[$__rate_interval]) + rate(y[$interval])") == \
        f"rate(x[{RANGE}]) + rate(y[{RANGE}])"
    with pytest.raises(AssertionError):
        dashboard_expr("rate(x[$window])")


@pytest.fixture
def car(tmp_path, redis_url):
    sidecar = start_sidecar(tmp_path / "sidecar", redis_url, settlement_token=TOKEN,
                            redis_timeout_ms=100)
    yield sidecar
    stop_process(sidecar.proc)


@pytest.fixture
def prometheus(tmp_path, car):
    server = Prometheus(tmp_path, f"127.0.0.1:{car.admin_port}")
    yield server
    stop_process(server.proc)


async def settle(http, car, token: str, key: str, reservation_id: str) -> int:
    async with http.post(car.url + "/settle", timeout=CLIENT_TIMEOUT,
                         headers={"Authorization": f"Bearer {token}"},
                         json={"reservation_id": reservation_id, "key": key,
                               "cost": 0}) as resp:
        return resp.status


async def load(car, plane, http, redis_server) -> set[int]:
    """LOAD_ROUNDS rounds of one call per outcome, a Redis stall half-way (503 and a Redis
    timeout), an accepted and a refused usage report. Returns the statuses seen."""
    _, ok = await make(plane, unlimited=True)
    _, limited = await make(plane, unlimited=True, rpm=1)
    _, broke = await make(plane, quota=0)
    _, narrow = await make(plane, unlimited=True, models=["allowed-model"])
    seen: set[int] = set()
    for round_ in range(LOAD_ROUNDS):
        for key, model in ((ok, "m"), (limited, "m"), (broke, "m"), (narrow, "other"),
                           (None, "m")):
            seen.add((await authz(http, car, key=key, body={"model": model})).status)
        if round_ == LOAD_ROUNDS // 2:
            allowed = await authz(http, car, key=ok, body={"model": "m"})
            reservation = allowed.headers["x-reservation-id"]
            assert await settle(http, car, TOKEN, ok, reservation) == 200
            assert await settle(http, car, "wrong-token-0123456789", ok, reservation) == 401
            stall = threading.Thread(target=redis_server.pause, args=(0.6,))
            stall.start()
            try:
                time.sleep(0.1)
                seen.add((await authz(http, car, key=ok, body={"model": "m"})).status)
            finally:
                stall.join(5)
        time.sleep(0.25)
    return seen


def series_count(answer: dict) -> tuple[int, int]:
    """(series returned, those with a finite value) of an instant-query answer."""
    assert answer.get("status") == "success", answer
    data = answer["data"]
    if data["resultType"] == "scalar":
        return 1, int(math.isfinite(float(data["result"][1])))
    values = [float(r["value"][1]) for r in data["result"]]
    return len(values), sum(math.isfinite(v) for v in values)


async def test_every_dashboard_and_alert_expression_returns_series(
        car, prometheus, plane, http, redis_server):
    seen = await load(car, plane, http, redis_server)
    assert seen == {200, 401, 402, 403, 429, 503}, seen
    todo = checks()
    assert len(todo) >= 20

    # The alert rules as written are valid PromQL (the API rejects a bad one with 400).
    for where, expr, _ in todo:
        if where.startswith("alert "):
            answer = prometheus.query(expr)
            assert answer["status"] == "success", (where, answer)

    counts: dict[int, tuple[int, int]] = {}

    def all_returned() -> bool:
        for i, (_, _, evaluated) in enumerate(todo):
            counts[i] = series_count(prometheus.query(evaluated))
        return all(finite > 0 for _, finite in counts.values())
    with contextlib.suppress(TimeoutError):     # the assertion below names them
        wait_for(all_returned, POLL_S, "every expression to return series")
    report = [f"{counts[i][0]:3d} series ({counts[i][1]} finite)  {where}: "
              f"{' '.join(evaluated.split())}" for i, (where, _, evaluated) in enumerate(todo)]
    print("\n" + "\n".join(report))
    empty = [line for i, line in enumerate(report) if counts[i][1] == 0]
    assert not empty, "\n".join(empty)

    # Prometheus evaluated the shipped rule file itself without an error.
    def rules_evaluated() -> bool:
        groups = prometheus.api("rules", type="alert")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == sum(w.startswith("alert ") for w, _, _ in todo) and \
            all(r["health"] != "unknown" for r in rules)
    wait_for(rules_evaluated, POLL_S, "the alert rules to be evaluated")
    groups = prometheus.api("rules", type="alert")["data"]["groups"]
    unhealthy = [(r["name"], r["health"], r.get("lastError")) for g in groups
                 for r in g["rules"] if r["health"] != "ok"]
    assert not unhealthy, unhealthy
