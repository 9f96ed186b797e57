"""Helpers for the control-plane tests: one real redis-server and one real sidecar per
test module, an organization bootstrapped through the CLI, and a small HTTP client."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    RedisServer,
    Sidecar,
    sidecar_env,
    start_redis,
    start_sidecar,
    stop_process,
)


@dataclass
class Reply:
    status: int
    body: dict
    headers: dict

    @property
    def code(self) -> str | None:
        return (self.body.get("error") or {}).get("code")

    @property
    def param(self) -> str | None:
        return (self.body.get("error") or {}).get("param")


def request(port: int, method: str, path: str, body=None, key: str | None = None,
            headers: dict | None = None, raw: bytes | None = None) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sent = dict(headers or {})
        if key:
            sent["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=sent)
        resp = conn.getresponse()
        text = resp.read()
        try:
            parsed = json.loads(text) if text else {}
        except ValueError:
            parsed = {"_text": text.decode(errors="replace")}
        return Reply(resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], env=sidecar_env(redis_url),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def cli_json(redis_url: str, *args: str):
    done = cli(redis_url, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass
class Plane:
    """A running sidecar over its own Redis, with an organization and an owner's admin key."""
    redis: RedisServer
    car: Sidecar
    org: str
    member: str
    key: str

    def admin(self, method: str, path: str, body=None, key: str | None = None,
              **kw) -> Reply:
        return request(self.car.admin_port, method, "/admin/v1" + path, body,
                       self.key if key is None else (key or None), **kw)

    def ok(self, method: str, path: str, body=None, key: str | None = None,
           status: int | None = None, **kw) -> dict:
        reply = self.admin(method, path, body, key, **kw)
        expected = status or (201 if method == "POST" and not path.endswith(
            ("/disable", "/enable", "/quota")) else 200)
        assert reply.status == expected, (method, path, reply.status, reply.body)
        return reply.body

    def authz(self, key: str, model: str = "gpt-5.5") -> Reply:
        return request(self.car.port, "POST", "/authz/v1/chat/completions",
                       {"model": model, "messages": []}, key)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return cli(self.redis.url, *args)


def start_plane(tmp: Path, org_name: str = "acme", **settings: str) -> Plane:
    server = start_redis(tmp / "redis")
    try:
        car = start_sidecar(tmp / "sidecar", server.url, **settings)
    except BaseException:
        stop_process(server.proc)
        raise
    try:
        boot = cli_json(server.url, "admin", "bootstrap", "--org", org_name, "--user",
                        "owner@example.com")
    except BaseException:
        stop_process(car.proc)
        stop_process(server.proc)
        raise
    return Plane(server, car, boot["organization"]["id"], boot["member"]["id"], boot["key"])


def stop_plane(plane: Plane) -> None:
    stop_process(plane.car.proc)
    stop_process(plane.redis.proc)


def module_plane(name: str):
    """A module-scoped `plane` fixture: one plane (its own Redis and sidecar) for the
    module's tests, started in a temporary folder named `name`, stopped after them."""
    @pytest.fixture(scope="module")
    def plane(tmp_path_factory):
        p = start_plane(tmp_path_factory.mktemp(name))
        yield p
        stop_plane(p)
    return plane
