"""Alerts and usage history over real sockets (issue 12).

- a key's quota, or an organization's budget, crossing its thresholds reaches a real
  signed receiver once per crossing, with calls spread over two sidecar processes on one
  Redis; refused calls after it send nothing more; calls that cross nothing send nothing;
- the CLI (`sidecar keys set-thresholds`, `sidecar usage ...`) and the admin API
  (`/thresholds`, `/usage`) show what the calls made, and another organization's ids
  are 404.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from admin_helpers import cli, cli_json, request, start_plane, stop_plane
from conftest import PEPPER, start_sidecar, stop_process, wait_for
from live import metric_value
from webhook_receiver import Receiver, drained, endpoints

from sidecar.control.store import ControlStore
from sidecar.schema.keys import KeyHasher

TOKEN = "usage-settle-token-0123456789"
PRICES = json.dumps({"gpt-p": {"input": "2.00", "output": "10.00"}})


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def authz(port: int, key: str) -> int:
    return request(port, "POST", "/authz/v1/chat/completions",
                   {"model": "gpt-5.5", "messages": []}, key).status


async def test_each_crossing_is_delivered_once_across_two_sidecars(
        tmp_path, redis_server, redis_url, aredis, receiver):
    cars = [start_sidecar(tmp_path / f"car{i}", redis_url, webhooks=endpoints(receiver))
            for i in range(2)]
    try:
        control = ControlStore(aredis, KeyHasher(PEPPER))
        org = (await control.create_org("acme"))["id"]
        project = (await control.create_project(org, "alerts"))["id"]
        roomy, roomy_key = await control.create_key(org, {"project_id": project,
                                                          "quota": 1000})
        view, key = await control.create_key(org, {"project_id": project, "quota": 10})
        # Nothing crosses a threshold: 20 calls of 1000 units
        assert [authz(cars[i % 2].port, roomy_key) for i in range(20)] == [200] * 20
        # 10 units: 0.2 is crossed at 2 left, 0.05 and 0 together at 0; then refusals
        statuses = [authz(cars[i % 2].port, key) for i in range(13)]
        assert statuses == [200] * 10 + [402] * 3
        wait_for(lambda: len(receiver.calls) >= 2, 20, "the two alerts")
        wait_for(lambda: drained(redis_server.client()), 20, "the streams to drain")
        got = receiver.events()
        assert all(c["valid"] for c in receiver.calls)
        # (delivered concurrently: in any order)
        assert sorted((e["type"], e["data"]["threshold"], e["data"]["remaining"],
                       e["data"]["limit"]) for e in got) == [
            ("quota.exhausted", 0, 0, 10), ("quota.low", 0.2, 2, 10)]
        assert {e["data"]["key_id"] for e in got} == {view["id"]}
        assert {e["data"]["organization_id"] for e in got} == {org}
        assert {e["data"]["project_id"] for e in got} == {project}
        assert len({e["id"] for e in got}) == 2
        # Raising the quota re-arms; the next crossing is one more event.
        await control.set_key_quota(org, view["id"], add=10)    # 10 left of 20
        assert [authz(cars[0].port, key) for _ in range(6)] == [200] * 6   # 4 left: 0.2
        wait_for(lambda: len(receiver.calls) == 3, 20, "the re-armed alert")
        wait_for(lambda: drained(redis_server.client()), 20, "the streams to drain")
        assert sorted(e["type"] for e in receiver.events()) == [
            "quota.exhausted", "quota.low", "quota.low"]
        assert [e["data"]["remaining"] for e in receiver.events()
                if e["data"]["remaining"] == 4] == [4]
        assert roomy["id"] not in {e["data"]["key_id"] for e in receiver.events()}
        # Counted once per deployment by kind and threshold, with no key in any label.
        shown = [urllib.request.urlopen(car.admin_url + "/metrics", timeout=5).read().decode()
                 for car in cars]
        name = "sidecar_threshold_crossings_total"
        assert sum(metric_value(t, name, {"kind": "quota.low", "threshold": "0.2"})
                   for t in shown) == 2
        assert sum(metric_value(t, name, {"kind": "quota.exhausted", "threshold": "0"})
                   for t in shown) == 1
        assert all(view["id"] not in t and key not in t for t in shown)
    finally:
        for car in cars:
            stop_process(car.proc)


async def test_an_organizations_budget_crossing_is_delivered_once(
        tmp_path, redis_server, redis_url, aredis, receiver):
    cars = [start_sidecar(tmp_path / f"car{i}", redis_url, webhooks=endpoints(receiver),
                          prices=PRICES) for i in range(2)]
    try:
        control = ControlStore(aredis, KeyHasher(PEPPER))
        org = (await control.create_org("acme"))["id"]
        project = (await control.create_project(org, "alerts"))["id"]
        await control.set_org_limits(org, {"budget": "0.01"})
        await control.set_thresholds(org, "organization", org, {"thresholds": [0.5]})
        _, key = await control.create_key(org, {"project_id": project, "unlimited": True})
        body = {"model": "gpt-p", "messages": [], "max_tokens": 100}   # ~0.001 a call
        statuses = [request(cars[i % 2].port, "POST", "/authz/v1/chat/completions", body,
                            key).status for i in range(15)]
        assert 200 in statuses and statuses[-1] == 402
        wait_for(lambda: receiver.calls, 20, "the alert")
        wait_for(lambda: drained(redis_server.client()), 20, "the streams to drain")
        (event,) = receiver.events()
        assert event["type"] == "budget.low" and receiver.calls[0]["valid"]
        data = event["data"]
        assert (data["level"], data["organization_id"], data["threshold"], data["limit"]) \
            == ("organization", org, 0.5, "0.01")
        assert float(data["remaining"]) <= 0.005
    finally:
        for car in cars:
            stop_process(car.proc)


def test_usage_and_thresholds_through_the_cli_and_the_admin_api(tmp_path):
    plane = start_plane(tmp_path, usage_retention_days="30", settlement_token=TOKEN,
                        prices=PRICES)
    try:
        prj = plane.ok("POST", "/projects", {"name": "web"})["id"]
        made = plane.ok("POST", "/keys", {"project_id": prj, "quota": 100})
        other = plane.ok("POST", "/keys", {"project_id": prj, "quota": 100})
        for _ in range(4):      # each reported: 1100 tokens, 0.003 (1000 x 2.00 + 100 x 10.00
            answer = plane.authz(made["key"], "gpt-p")        # per million tokens)
            assert answer.status == 200
            settled = request(plane.car.port, "POST", "/settle", {
                "reservation_id": answer.headers["x-reservation-id"], "key": made["key"],
                "model": "gpt-p", "usage": {"prompt_tokens": 1000, "completion_tokens": 100}},
                headers={"Authorization": f"Bearer {TOKEN}"})
            assert settled.status == 200, settled.body
        assert [plane.authz(other["key"]).status for _ in range(3)] == [200] * 3

        key_usage = plane.ok("GET", f"/keys/{made['id']}/usage")
        assert key_usage["key_id"] == made["id"]
        assert key_usage["total"] == {"requests": 4, "tokens": 4400, "spend": "0.012"}
        assert [r["requests"] for r in key_usage["daily"]] == [4]
        assert [r["requests"] for r in key_usage["hourly"]] == [4]
        assert plane.ok("GET", f"/projects/{prj}/usage")["total"] == {
            "requests": 7, "tokens": 4400, "spend": "0.012"}
        assert plane.ok("GET", "/organization/usage")["total"]["requests"] == 7
        today = key_usage["daily"][0]["date"]
        assert plane.ok("GET", f"/keys/{made['id']}/usage?since={today}")["total"][
            "requests"] == 4
        bad = plane.admin("GET", f"/keys/{made['id']}/usage?since=yesterday")
        assert (bad.status, bad.body["error"]["param"]) == (400, "since")

        shown = cli_json(plane.redis.url, "usage", "keys", made["id"], "--json")
        assert shown["total"] == key_usage["total"] and shown["daily"] == key_usage["daily"]
        shown = cli_json(plane.redis.url, "usage", "projects", prj, "--org", plane.org,
                         "--json")
        assert shown["total"]["requests"] == 7
        assert cli_json(plane.redis.url, "usage", "orgs", plane.org, "--json")["total"][
            "requests"] == 7
        text = cli(plane.redis.url, "usage", "keys", made["id"])
        assert text.returncode == 0 and "4 requests, 4400 tokens, 0.012 spent" in text.stdout
        assert cli_json(plane.redis.url, "usage", "keys", made["id"], "--org", plane.org,
                        "--json")["total"]["requests"] == 4
        elsewhere = cli(plane.redis.url, "usage", "keys", made["id"], "--org", "default")
        assert elsewhere.returncode != 0 and "no key" in elsewhere.stderr.lower()
        missing = cli(plane.redis.url, "usage", "keys", "key_nope")
        assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1

        # Thresholds: CLI and API, audited, checked
        set_ = cli_json(plane.redis.url, "keys", "set-thresholds", made["id"], "0.5,0.1,0",
                        "--json")
        assert set_ == {"thresholds": [0.5, 0.1, 0.0], "default": False}
        assert plane.ok("GET", f"/keys/{made['id']}/thresholds") == set_
        assert plane.ok("PUT", f"/projects/{prj}/thresholds", {"thresholds": [0.3]}) == {
            "thresholds": [0.3], "default": False}
        assert plane.ok("PUT", "/organization/thresholds", {"thresholds": None}) == {
            "thresholds": [0.2, 0.05, 0.0], "default": True}
        assert cli_json(plane.redis.url, "orgs", "set-thresholds", plane.org, "none",
                        "--json") == {"thresholds": [], "default": False}
        for body in ({"thresholds": [1.5]}, {"thresholds": "x"}, {"thresholds": [0.1] * 9},
                     {}):
            reply = plane.admin("PUT", f"/keys/{made['id']}/thresholds", body)
            assert reply.status == 400, (body, reply.body)
        wrong = cli(plane.redis.url, "keys", "set-thresholds", made["id"], "0.5,abc")
        assert wrong.returncode == 2 and "thresholds" in wrong.stderr
        actions = {e["action"] for e in plane.ok("GET", "/audit_logs?limit=100")["data"]}
        assert {"key.thresholds_changed", "project.thresholds_changed",
                "organization.thresholds_changed"} <= actions

        # Another organization's ids: 404
        boot = cli_json(plane.redis.url, "admin", "bootstrap", "--org", "other", "--user",
                        "o@example.com")
        for path in (f"/keys/{made['id']}/usage", f"/projects/{prj}/usage",
                     f"/keys/{made['id']}/thresholds"):
            reply = plane.admin("GET", path, key=boot["key"])
            assert reply.status == 404, (path, reply.body)
        assert plane.ok("GET", "/organization/usage", key=boot["key"])["total"][
            "requests"] == 0
    finally:
        stop_plane(plane)
