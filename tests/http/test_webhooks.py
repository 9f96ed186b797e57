"""Webhooks over real sockets (issue 12): a local HTTP receiver that checks every
signature the Standard Webhooks way, sidecar processes on one Redis, the CLI.

- an event (a key disabled) reaches the receiver once, across two sidecars;
- nothing happening sends nothing;
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from admin_helpers import request
from conftest import PEPPER, free_port, start_sidecar, stop_process, wait_for

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
