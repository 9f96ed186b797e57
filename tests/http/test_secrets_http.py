"""No plaintext key leaves the running sidecar: not in its log output, not in /metrics;
and /metrics has the contract's metric names with no label holding a key id or an IP.
"""

from __future__ import annotations

import asyncio
import re
import signal

import aiohttp
import pytest
from conftest import start_redis, start_sidecar, stop_process
from live import CHAT, MESSAGES, authz, metric_value

from sidecar.runtime.metrics import COMMON_THRESHOLDS

QUICK = aiohttp.ClientTimeout(total=5)
CLIENT_IPS = ("10.20.30.40", "2001:db8::42", "192.168.77.1")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture
def own_redis(tmp_path):
    server = start_redis(tmp_path / "redis")
    yield server
    stop_process(server.proc)


async def test_no_plaintext_in_logs_or_metrics(tmp_path, own_redis, http):
    import redis.asyncio as aioredis
    from conftest import PEPPER

    from sidecar.control.store import ControlStore
    from sidecar.schema.keys import KeyHasher

    client = aioredis.from_url(own_redis.url)
    control = ControlStore(client, KeyHasher(PEPPER))
    org = (await control.create_org("acme"))["id"]
    project = (await control.create_project(org, "secrets"))["id"]
    made = [await control.create_key(org, {"project_id": project, **req}) for req in (
        {"quota": 2}, {"unlimited": True, "models": ["gpt-x"]},
        {"unlimited": True, "allowed_ips": ["10.0.0.0/8"]}, {"unlimited": True, "rpm": 1},
        {"unlimited": True})]
    ids = [view["id"] for view, _ in made]
    keys = [key for _, key in made]
    await control.set_key_status(org, ids[4], False)
    await client.aclose()

    car = start_sidecar(tmp_path / "car", own_redis.url, log_level="debug",
                        trusted_proxies="127.0.0.1/32", redis_timeout_ms=150)
    try:
        statuses = set()
        for i, key in enumerate(keys * 3):
            for path in (CHAT, MESSAGES):
                ip = CLIENT_IPS[i % len(CLIENT_IPS)]
                for call in ({"key": key}, {"api_key": key}, {"key": key + "!"},
                             {"key": key[:-1]}, {"headers": {"Authorization": key}}):
                    answer = await authz(http, car, path, body={"model": "gpt-y"},
                                         headers={"X-Real-IP": ip, **call.pop("headers", {})},
                                         timeout=QUICK, **call)
                    statuses.add(answer.status)
        # ...and while Redis stalls: the failure path logs too.
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            stalled = await asyncio.gather(*(authz(http, car, key=k, body={"model": "m"},
                                                   timeout=QUICK) for k in keys))
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        statuses.update(a.status for a in stalled)
        assert {200, 401, 402, 403, 429, 503} <= statuses   # the mix really happened

        async with http.get(car.admin_url + "/metrics", timeout=QUICK) as resp:
            metrics = await resp.text()
    finally:
        stop_process(car.proc)
    logs = car.logs()
    assert "redis unavailable" in logs   # the log did get the failure lines
    for key in keys:
        body = key.split("-", 1)[1].split("_", 1)[-1]   # the secret part, without prefix
        for text, where in ((logs, "logs"), (metrics, "/metrics")):
            assert key not in text, where
            assert body[:32] not in text, where

    # The contract's metric names.
    for family, kind in (("sidecar_decisions_total", "counter"),
                         ("sidecar_authorize_duration_seconds", "histogram"),
                         ("sidecar_redis_roundtrip_seconds", "histogram"),
                         ("sidecar_redis_errors_total", "counter")):
        # (older prometheus-client versions print counters' TYPE without `_total`)
        type_line = rf"^# TYPE {family.removesuffix('_total')}(_total)? {kind}$"
        assert re.search(type_line, metrics, re.M), family
    for status, code in (("200", "ok"), ("401", "invalid_api_key"), ("401", "key_disabled"),
                         ("402", "quota_exhausted"), ("403", "ip_not_allowed"),
                         ("403", "model_not_allowed"), ("429", "rate_limited"),
                         ("503", "service_unavailable")):
        labels = {"status": status, "code": code}
        assert metric_value(metrics, "sidecar_decisions_total", labels) >= 1, labels
    assert re.search(r"^sidecar_authorize_duration_seconds_count [1-9]", metrics, re.M)
    assert re.search(r"^sidecar_redis_roundtrip_seconds_count [1-9]", metrics, re.M)
    assert re.search(r"^sidecar_redis_errors_total\{kind=\"\w+\"\} [1-9]", metrics, re.M)

    # No label holds a key, a key id or a client IP.
    values = {value for _, value in LABEL.findall(metrics)}
    forbidden = set(ids) | set(keys) | set(CLIENT_IPS) | {"127.0.0.1", "::1"}
    assert not values & forbidden
    assert not any(v.startswith("sk-") or re.fullmatch(r"key_[0-9a-f]{16}", v) for v in values)
    ours = "\n".join(line for line in metrics.splitlines() if line.startswith("sidecar_"))
    names = {name for name, _ in LABEL.findall(ours)}
    assert names <= {"status", "code", "kind", "le", "result", "threshold"}, names   # bounded enums
    # A crossing's threshold label is a common fraction or "other", never a key's own
    # level; the census gauge's (sidecar_keys_below_threshold) is one of the deployment's
    # alert_thresholds, here the default 0.2, 0.05, 0.
    thresholds = {value for name, value in LABEL.findall(ours) if name == "threshold"}
    assert thresholds <= COMMON_THRESHOLDS | {"other", ""}, thresholds
