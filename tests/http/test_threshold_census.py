"""The threshold census over real sockets (issue 12): sidecar_keys_below_threshold.

Keys are made through the control plane with known quotas and budgets, and spent by
real authorize calls spread over two sidecar processes on one Redis, each started with a
1 s census interval. Then both sidecars' /metrics show the same exact counts per kind and
threshold (quota: a key's own, a subscription's cycle, a rotation's shared pool once;
budget: a key's own), leave disabled, expired and unlimited keys out, carry no key id in
any label, and export the census time; the logs show one census per interval for the
deployment. With --workers 2 the supervisor's gauges reach /metrics; a Redis stall is
logged and the census goes on after it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import orjson
from admin_helpers import request
from conftest import start_sidecar, stop_process, wait_for
from live import disable, expire_now, make, metric_value, start_workers

PRICES = json.dumps({"gpt-p": {"input": "2.00", "output": "10.00"}})
PRICED = {"model": "gpt-p", "messages": [], "max_tokens": 10_000}    # ~0.10 a call
BELOW = "sidecar_keys_below_threshold"
STAMP = "sidecar_threshold_census_timestamp_seconds"
THRESHOLDS = ("0.2", "0.05", "0")


def scrape(car) -> str:
    with urllib.request.urlopen(car.admin_url + "/metrics", timeout=5) as resp:
        return resp.read().decode()


def counts(text: str) -> dict[tuple[str, str], float]:
    return {(kind, t): metric_value(text, BELOW, {"kind": kind, "threshold": t})
            for kind in ("quota", "budget") for t in THRESHOLDS}


def censuses(*cars) -> list[int]:
    """When each census the sidecars' logs report began (ms), in order."""
    found = []
    for car in cars:
        for line in car.logs().splitlines():
            if '"threshold_census"' in line:
                found.append(orjson.loads(line)["at"])
    return sorted(found)


class Calls:
    """Authorize calls spread over the sidecars in turn; their statuses."""

    def __init__(self, cars):
        self.cars, self.n = cars, 0

    def __call__(self, key: str, times: int, body: dict | None = None) -> list[int]:
        out = []
        for _ in range(times):
            car = self.cars[self.n % len(self.cars)]
            self.n += 1
            out.append(request(car.port, "POST", "/authz/v1/chat/completions",
                               body or {"model": "gpt-5.5", "messages": []}, key).status)
        return out


async def spent_keys(plane, aredis, call: Calls) -> None:
    """Keys at known places; expected: quota 0.2: 5, 0.05: 3, 0: 2; budget 0.2: 1."""
    for quota, times in ((10, 9), (20, 19), (20, 20), (100, 5)):   # 0.1, 0.05, 0, 0.95
        _, key = await make(plane, "org", quota=quota)
        assert call(key, times) == [200] * times
    _, unlimited = await make(plane, unlimited=True)
    assert call(unlimited, 3) == [200] * 3
    off_id, off = await make(plane, quota=5)
    assert call(off, 5) == [200] * 5
    await disable(plane, off_id)                   # nothing left, but disabled
    _, old = await make(plane, quota=5, expires_at=datetime.now(UTC) + timedelta(days=1))
    assert call(old, 5) == [200] * 5
    await expire_now(aredis, old)                  # nothing left, but expired
    _, sub = await make(plane, "subscription", quota=10)
    assert call(sub, 8) == [200] * 8               # 2 of the cycle's 10: 0.2
    rotated_id, rotated = await make(plane, quota=10)
    assert call(rotated, 5) == [200] * 5
    successor = (await plane.rotate_key(None, rotated_id, grace_s=600))["key"]
    assert call(successor, 5) + call(successor, 1) == [200] * 5 + [402]   # the pool: 0
    for times in (9, 1):                           # budgets: 0.0995 and 0.9 left
        budget_id, key = await make(plane, unlimited=True)
        await plane.set_key_limits(None, budget_id, {"budget": "1.00"})
        assert call(key, times, PRICED) == [200] * times
        state = await plane.key_limits(None, budget_id)
        left = float(state["remaining"]) / float(state["budget"])
        assert (0.05 < left <= 0.2) if times == 9 else left > 0.2, state


async def test_two_sidecars_show_the_same_exact_counts_and_one_census_per_interval(
        tmp_path, redis_url, aredis, plane):
    cars = [start_sidecar(tmp_path / f"car{i}", redis_url, prices=PRICES,
                          threshold_census_interval_s="1") for i in range(2)]
    try:
        await spent_keys(plane, aredis, Calls(cars))
        done = time.time()

        def counted_after_the_calls() -> bool:
            return all(metric_value(scrape(car), STAMP) > done for car in cars)
        wait_for(counted_after_the_calls, 15, "a census after the last call")
        shown = [scrape(car) for car in cars]
        expected = {("quota", "0.2"): 5, ("quota", "0.05"): 3, ("quota", "0"): 2,
                    ("budget", "0.2"): 1, ("budget", "0.05"): 0, ("budget", "0"): 0}
        if counts(shown[0]) != counts(shown[1]):   # one sidecar read a newer census
            time.sleep(1.2)
            shown = [scrape(car) for car in cars]
        assert [counts(t) for t in shown] == [expected, expected]
        for text in shown:
            assert metric_value(text, "sidecar_threshold_census_complete") == 1
            assert metric_value(text, "sidecar_threshold_census_keys") == 12
            assert "key_" not in text and "sk-" not in text     # no key, no key id
        # One census per interval for the deployment, whichever sidecar took it.
        wait_for(lambda: len(censuses(*cars)) >= 4, 15, "four censuses")
        began = censuses(*cars)
        gaps = [b - a for a, b in zip(began, began[1:], strict=False)]
        assert min(gaps) >= 1000 - 50, gaps
    finally:
        for car in cars:
            stop_process(car.proc)
    assert all("threshold_census_error" not in car.logs() for car in cars)


async def test_workers_show_the_supervisors_census_and_a_redis_stall_is_survived(
        tmp_path, redis_server, redis_url, aredis, plane):
    car = start_workers(tmp_path, redis_url, 2, threshold_census_interval_s="1",
                        redis_timeout_ms="50")
    try:
        _, key = await make(plane, quota=1)
        assert Calls([car])(key, 1) == [200]
        done = time.time()
        wait_for(lambda: metric_value(scrape(car), STAMP) > done, 15, "a census")
        text = scrape(car)
        assert counts(text)["quota", "0"] == 1 and counts(text)["budget", "0.2"] == 0
        assert len([line for line in text.splitlines()
                    if line.startswith(BELOW + "{")]) == 6      # one series each, no pid
        # Redis stalls past the census's timeouts: logged, then counted again.
        stall = threading.Thread(target=redis_server.pause, args=(4.0,))
        stall.start()
        stall.join(10)
        resumed = time.time()
        wait_for(lambda: metric_value(scrape(car), STAMP) > resumed, 15,
                 "a census after the stall")
        assert "threshold_census_redis_error" in car.logs()
        assert car.proc.poll() is None
    finally:
        stop_process(car.proc)
