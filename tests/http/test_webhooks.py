"""Webhooks over real sockets (issue 12): a local HTTP receiver that checks every
signature the Standard Webhooks way, sidecar processes on one Redis, the CLI.

- an event (a key disabled) reaches the receiver once, across two sidecars;
- a receiver answering 500 gets retries, then the event is a dead letter that
  `sidecar webhooks dead-letters` lists and `sidecar webhooks replay` delivers;
- nothing happening sends nothing;
- an organization's endpoints (admin API) get its events, signed with their own secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from admin_helpers import cli, cli_json, request
from conftest import PEPPER, free_port, start_sidecar, stop_process, wait_for
from live import metric_value

from sidecar.control.store import ControlStore
from sidecar.schema import names
from sidecar.schema.keys import KeyHasher

SECRET = "whsec_" + base64.b64encode(b"receiver-secret-0123456789abcdef").decode()


class Receiver:
    """POSTs on 127.0.0.1, answered `status`; each kept with whether its signature is
    right (computed here, independently of the sidecar's code)."""

    def __init__(self, secret: str = SECRET, status: int = 200):
        self.secret, self.status = secret, status
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = outer.status
                with outer.lock:
                    outer.calls.append({"headers": {k.lower(): v for k, v in
                                                    self.headers.items()},
                                        "body": body, "path": self.path,
                                        "valid": outer.valid(self.headers, body),
                                        "status": status})
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=not-for-logs"

    def valid(self, headers, body: bytes) -> bool:
        key = base64.b64decode(self.secret.removeprefix("whsec_"))
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        mac = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        return any(hmac.compare_digest("v1," + mac, s)
                   for s in headers["webhook-signature"].split())

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(c["body"]) for c in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def endpoints(*receivers: Receiver, **extra) -> str:
    return json.dumps([{"url": r.url, "secret": r.secret, **extra} for r in receivers])


def drained(redis_server) -> bool:
    """Every event stream empty and nothing pending: no delivery can still happen."""
    client = redis_server.client()
    for tag in names.ALL_TAGS:
        stream = names.events(tag)
        if client.exists(stream) and (client.xlen(stream) or any(
                g["pending"] for g in client.xinfo_groups(stream))):
            return False
    return True


async def make_key(aredis, org_name: str = "acme") -> tuple[ControlStore, str, dict]:
    control = ControlStore(aredis, KeyHasher(PEPPER))
    org = await control.create_org(org_name)
    project = await control.create_project(org["id"], "alerts")
    view, _ = await control.create_key(org["id"], {"project_id": project["id"],
                                                   "quota": 100})
    return control, org["id"], view


async def test_a_disabled_key_is_delivered_once_across_two_sidecars(
        tmp_path, redis_server, redis_url, aredis, receiver):
    cars = [start_sidecar(tmp_path / f"car{i}", redis_url, webhooks=endpoints(receiver))
            for i in range(2)]
    try:
        control, org, key = await make_key(aredis)
        await control.set_key_status(org, key["id"], False)
        wait_for(lambda: receiver.calls, 15, "the webhook")
        wait_for(lambda: drained(redis_server), 15, "the streams to drain")
        assert len(receiver.calls) == 1
        call = receiver.calls[0]
        assert call["valid"] and call["status"] == 200
        event = json.loads(call["body"])
        assert call["headers"]["webhook-id"] == event["id"]
        assert call["headers"]["content-type"] == "application/json"
        assert event["type"] == "key.disabled" and event["object"] == "event"
        assert event["data"]["key_id"] == key["id"]
        assert event["data"]["organization_id"] == org
        assert event["data"]["project_id"] == key["project_id"]
        assert event["data"]["level"] == "key" and event["data"]["reason"] == "disabled by cli"
        # Disabling it again is no new event; the next key's disable is one more.
        await control.set_key_status(org, key["id"], False)
        key2 = (await control.create_key(org, {"project_id": key["project_id"]}))[0]
        await control.set_key_status(org, key2["id"], False)
        wait_for(lambda: len(receiver.calls) == 2, 15, "the second webhook")
        wait_for(lambda: drained(redis_server), 15, "the streams to drain")
        assert [e["data"]["key_id"] for e in receiver.events()] == [key["id"], key2["id"]]
        for car in cars:
            assert "not-for-logs" not in car.logs() and SECRET not in car.logs()
    finally:
        for car in cars:
            stop_process(car.proc)


async def test_a_failing_receiver_gets_retries_then_a_dead_letter_and_a_replay(
        tmp_path, redis_server, redis_url, aredis, receiver):
    receiver.status = 500
    car = start_sidecar(tmp_path / "car", redis_url, webhooks=endpoints(receiver),
                        webhook_retry_window_s=1.5, webhook_backoff_s=0.1,
                        webhook_backoff_max_s=0.4)
    try:
        control, org, key = await make_key(aredis)
        await control.set_key_status(org, key["id"], False)
        client = redis_server.client()
        wait_for(lambda: client.xlen(names.DEAD_LETTERS) == 1, 15, "the dead letter")
        attempts = list(receiver.calls)
        assert len(attempts) >= 2
        assert all(a["valid"] and a["status"] == 500 for a in attempts)
        event_id = attempts[0]["headers"]["webhook-id"]
        assert {a["headers"]["webhook-id"] for a in attempts} == {event_id}
        wait_for(lambda: drained(redis_server), 15, "the stream to drain")
        assert len(receiver.calls) == len(attempts)   # no attempt after the dead letter

        letters = cli_json(redis_url, "webhooks", "dead-letters")
        assert [(d["event_id"], d["type"], d["attempts"]) for d in letters] == [
            (event_id, "key.disabled", len(attempts))]
        assert letters[0]["url"] == receiver.url.partition("?")[0]   # no query shown
        assert letters[0]["last_error"] == "HTTP 500"
        human = cli(redis_url, "webhooks", "dead-letters")
        assert human.returncode == 0 and event_id in human.stdout

        receiver.status = 200
        done = cli(redis_url, "webhooks", "replay", event_id)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: receiver.calls[-1]["status"] == 200, 15, "the replay")
        wait_for(lambda: drained(redis_server), 15, "the stream to drain")
        replayed = [c for c in receiver.calls if c["status"] == 200]
        assert len(replayed) == 1 and replayed[0]["valid"]
        assert replayed[0]["headers"]["webhook-id"] == event_id
        assert json.loads(replayed[0]["body"]) == json.loads(attempts[0]["body"])
        assert cli_json(redis_url, "webhooks", "dead-letters") == []
        assert "not-for-logs" not in car.logs() and SECRET not in car.logs()
        shown = urllib.request.urlopen(car.admin_url + "/metrics", timeout=5).read().decode()
        outcome = "sidecar_webhook_deliveries_total"
        assert metric_value(shown, outcome, {"outcome": "failed"}) == len(attempts)
        assert metric_value(shown, outcome, {"outcome": "dead_letter"}) == 1
        assert metric_value(shown, outcome, {"outcome": "delivered"}) == 1
        assert metric_value(shown, "sidecar_webhook_dead_letters_total") == 1
        assert metric_value(shown, "sidecar_webhook_delivery_lag_seconds_count") == 1
        assert "key_" not in "".join(line for line in shown.splitlines()
                                     if line.startswith("sidecar_webhook"))
    finally:
        stop_process(car.proc)


def test_replay_of_nothing_is_one_error_line(redis_url):
    for args in (("replay", "evt_nothing"), ("replay", "--all")):
        done = cli(redis_url, "webhooks", *args)
        if args[-1] == "--all":
            assert done.returncode == 0 and "0 " in done.stdout
        else:
            assert done.returncode == 1
            assert done.stderr.strip().count("\n") == 0 and "evt_nothing" in done.stderr
    done = cli(redis_url, "webhooks", "replay")
    assert done.returncode == 2 and "Traceback" not in done.stderr


async def test_nothing_happening_sends_nothing(tmp_path, redis_server, redis_url, aredis,
                                               receiver):
    car = start_sidecar(tmp_path / "car", redis_url, webhooks=endpoints(receiver))
    try:
        control, org, key = await make_key(aredis)
        await control.edit_key(org, key["id"], {"name": "renamed"})
        await control.set_key_status(org, key["id"], True)        # active already
        await control.set_key_quota(org, key["id"], add=5)
        answer = request(car.port, "POST", "/authz/v1/chat/completions",
                         {"model": "gpt-x", "messages": []}, "sk-" + "x" * 40)
        assert answer.status == 401
        # Then one thing happens: once the streams are drained it is all that came.
        await control.set_key_status(org, key["id"], False)
        wait_for(lambda: receiver.calls, 15, "the webhook")
        wait_for(lambda: drained(redis_server), 15, "the streams to drain")
        assert [e["type"] for e in receiver.events()] == ["key.disabled"]
    finally:
        stop_process(car.proc)


async def test_an_organizations_endpoint_gets_its_events_signed_with_its_secret(
        tmp_path, redis_server, redis_url, aredis, receiver):
    car = start_sidecar(tmp_path / "car", redis_url)          # no global endpoint
    theirs = Receiver()
    try:
        boot = cli_json(redis_url, "admin", "bootstrap", "--org", "acme", "--user",
                        "owner@example.com")
        admin, org = boot["key"], boot["organization"]["id"]
        hooks = "/admin/v1/webhooks"
        made = request(car.admin_port, "POST", hooks, {"url": receiver.url,
                                                      "events": ["key.disabled"]}, admin)
        assert made.status == 201, made.body
        assert made.body["secret"].startswith("whsec_") and made.body["events"] == [
            "key.disabled"]
        receiver.secret = made.body["secret"]
        listed = request(car.admin_port, "GET", hooks, key=admin).body["data"]
        assert [w["id"] for w in listed] == [made.body["id"]]
        assert "secret" not in listed[0]
        for bad in ({"url": "ftp://example.com/x"}, {"url": "https://u:p@example.com/"},
                    {"url": receiver.url, "secret": "not-a-secret"},
                    {"url": receiver.url, "events": ["quota.gone"]}, {"url": 5}):
            answer = request(car.admin_port, "POST", hooks, bad, admin)
            assert answer.status == 400 and answer.body["error"]["param"] in (
                "url", "secret", "events[0]"), (bad, answer.body)
        # Another organization's endpoint and keys are not this one's.
        other = cli_json(redis_url, "admin", "bootstrap", "--org", "beta", "--user",
                         "b@example.com")
        mine = request(car.admin_port, "POST", hooks, {"url": theirs.url}, other["key"])
        theirs.secret = mine.body["secret"]
        assert request(car.admin_port, "GET", f"{hooks}/{mine.body['id']}",
                       key=admin).status == 404
        assert request(car.admin_port, "DELETE", f"{hooks}/{mine.body['id']}",
                       key=admin).status == 404

        control = ControlStore(aredis, KeyHasher(PEPPER))
        project = await control.create_project(org, "p")
        key, _ = await control.create_key(org, {"project_id": project["id"]})
        assert request(car.admin_port, "POST", f"/admin/v1/keys/{key['id']}/disable",
                       {}, admin).status == 200
        wait_for(lambda: receiver.calls, 15, "the webhook")
        wait_for(lambda: drained(redis_server), 15, "the streams to drain")
        assert len(receiver.calls) == 1 and receiver.calls[0]["valid"]
        assert receiver.events()[0]["data"]["key_id"] == key["id"]
        assert theirs.calls == []
        assert request(car.admin_port, "DELETE", f"{hooks}/{made.body['id']}",
                       key=admin).status == 200
        assert request(car.admin_port, "GET", hooks, key=admin).body["data"] == []
    finally:
        theirs.close()
        stop_process(car.proc)
