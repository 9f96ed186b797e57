"""deploy/nginx/nginx.conf with a real NGINX, a real sidecar and a real upstream.

The shipped file is run as it is, with only its addresses and file paths filled in (each
substitution must match exactly once, so an edit that breaks the harness fails here).
The upstream is a small aiohttp app that records what reached it. Proven here: allowed
calls reach the upstream with the identity headers and without the client's key; every
denial reaches the client with its true status (402 and 429 included) and the sidecar's
JSON; the model comes from the JSON body through njs; a client cannot pick its IP.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from conftest import ROOT, free_port, start_sidecar, stop_process, wait_for
from live import CLIENT_TIMEOUT, disable, make
from proxies import Reply, reply_of, request_parts

from sidecar.schema.keys import RESERVATION_ID

NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
STUB = ROOT / "deploy" / "stub-upstream" / "app.py"
SETTLE_TOKEN = "nginx-settle-token-0123456789"


# -- the processes ----------------------------------------------------------------------

@dataclass
class Upstream:
    """The LLM API stand-in: answers 200 and records every call it gets."""

    port: int = 0
    calls: list[dict] = field(default_factory=list)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        self.calls.append({"method": request.method, "path": request.path_qs,
                           "headers": {k.lower(): v for k, v in request.headers.items()},
                           "body": body})
        return web.json_response({"ok": True})

    def serve(self) -> tuple[threading.Thread, asyncio.AbstractEventLoop, web.ServerRunner]:
        async def start() -> web.ServerRunner:
            runner = web.ServerRunner(web.Server(self.handle))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        loop = asyncio.new_event_loop()
        self.port = free_port()
        runner = loop.run_until_complete(start())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        return thread, loop, runner


def nginx_conf(tmp: Path, listen: int, sidecar: int, upstream: int) -> Path:
    """The shipped nginx.conf with this test's addresses and paths."""
    text = NGINX_CONF.read_text()
    swaps = [
        ("server sidecar:8080;", f"server 127.0.0.1:{sidecar};"),
        ("server llm-upstream:9000;", f"server 127.0.0.1:{upstream};"),
        ("listen 8000;", f"listen 127.0.0.1:{listen};"),
        ("js_path /etc/nginx/njs/;", f"js_path {NGINX_CONF.parent}/;"),
        ("pid /var/run/nginx.pid;", f"pid {tmp}/nginx.pid;"),
        ("error_log /dev/stderr warn;", f"error_log {tmp}/error.log info;"),
        ("access_log /dev/stdout;", f"access_log {tmp}/access.log;"),
        ("http {\n", "http {\n" + "".join(
            f"    {kind}_temp_path {tmp}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))),
    ]
    for old, new in swaps:
        assert text.count(old) == 1, f"nginx.conf no longer has exactly one {old!r}"
        text = text.replace(old, new)
    if os.geteuid() == 0:  # workers would run as nobody, unable to use the temp dir
        text = "user root;\n" + text
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    return conf


@dataclass
class Nginx:
    proc: subprocess.Popen
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def errors(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_nginx(tmp: Path, sidecar_port: int, upstream_port: int,
                env: dict[str, str] | None = None) -> Nginx:
    """`env`: NGINX's environment (default: this process's), e.g. the settlement token."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(binary).exists(), "nginx is required (deploy/install.sh --dev installs it)"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = nginx_conf(tmp, port, sidecar_port, upstream_port)
    check = subprocess.run([binary, "-t", "-p", str(tmp), "-c", str(conf)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([binary, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    server = Nginx(proc, port, tmp)

    def up() -> bool:
        assert proc.poll() is None, server.errors()
        with urllib.request.urlopen(server.url + "/nginx-health", timeout=1) as r:
            return r.status == 200
    wait_for(up, 10, "nginx")
    return server


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server):
    """upstream <- nginx (shipped conf) -> sidecar (trusting 127.0.0.1, like the compose)."""
    tmp = tmp_path_factory.mktemp("nginx")
    upstream = Upstream()
    thread, loop, runner = upstream.serve()
    car = start_sidecar(tmp / "sidecar", redis_server.url, trusted_proxies="127.0.0.1/32",
                        model_costs="gpt-big=10,gpt-priced=10", token_costs="gpt-priced=40",
                        settlement_token=SETTLE_TOKEN)
    nginx = None
    try:
        nginx = start_nginx(tmp / "nginx", car.port, upstream.port)
        yield nginx, upstream, car
    finally:
        if nginx is not None:
            stop_process(nginx.proc)
        stop_process(car.proc)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def call(http, nginx: Nginx, path: str = "/v1/chat/completions", *,
               method: str = "POST", key: str | None = None, body: dict | bytes | None = None,
               headers: dict[str, str] | None = None) -> Reply:
    sent, body = request_parts(headers, key, body)
    async with http.request(method, nginx.url + path, data=body, headers=sent,
                            timeout=CLIENT_TIMEOUT) as resp:
        return await reply_of(resp)


def assert_denied(reply: Reply, status: int, code: str, upstream: Upstream, seen: int):
    """The true status and the sidecar's JSON reached the client; the upstream saw nothing."""
    assert reply.status == status, (reply.status, reply.raw)
    assert reply.headers["content-type"] == "application/json"
    body = reply.json
    assert body["error"]["code"] == code and body["error"]["message"]
    assert orjson.loads(reply.headers["x-auth-error"]) == body
    assert len(upstream.calls) == seen


# -- allowed calls ------------------------------------------------------------------------

async def test_allowed_call_reaches_upstream_with_identity_and_without_the_key(
        stack, plane, http):
    nginx, upstream, _ = stack
    key_id, key = await make(plane, unlimited=True)
    body = {"model": "gpt-a", "messages": [{"role": "user", "content": "hi"}]}
    reply = await call(http, nginx, "/v1/chat/completions?x=1", key=key, body=body,
                       headers={"x-api-key": key, "x-key-id": "key_forged",
                                "x-org-id": "org_forged",
                                "x-reservation-id": "rsv_" + "f" * 32})
    assert reply.status == 200 and reply.json == {"ok": True}
    seen = upstream.calls[-1]
    assert (seen["method"], seen["path"]) == ("POST", "/v1/chat/completions?x=1")
    assert orjson.loads(seen["body"]) == body
    headers = seen["headers"]
    assert headers["x-key-id"] == key_id and headers["x-key-type"] == "standard"
    assert "x-org-id" not in headers           # forged, removed: this key has no org
    assert "authorization" not in headers and "x-api-key" not in headers
    assert key not in repr(headers)
    # The upstream's usage report names the sidecar's reservation, never a forged one.
    assert RESERVATION_ID.fullmatch(headers["x-reservation-id"])
    assert headers["x-reservation-id"] != "rsv_" + "f" * 32
    assert len(headers["x-request-id"]) == 32   # for tracing a call


async def test_read_call_keeps_its_method_and_limits_reach_the_client(stack, plane, http):
    nginx, upstream, _ = stack
    _, key = await make(plane, unlimited=True, permission="read-only", rpm=100)
    reply = await call(http, nginx, "/v1/models", method="GET", key=key)
    assert reply.status == 200 and upstream.calls[-1]["method"] == "GET"
    assert reply.headers["x-ratelimit-limit-requests"] == "100"
    assert reply.headers["x-ratelimit-remaining-requests"] == "99"
    seen = len(upstream.calls)
    denied = await call(http, nginx, key=key, body={"model": "m"})
    assert_denied(denied, 403, "permission_denied", upstream, seen)


async def test_large_body_model_is_read_by_njs(stack, plane, http):
    nginx, upstream, _ = stack
    _, key = await make(plane, unlimited=True, models=["gpt-a"])
    big = {"messages": [{"role": "user", "content": "x" * 1_000_000}], "model": "gpt-a"}
    assert (await call(http, nginx, key=key, body=big)).status == 200
    assert len(upstream.calls[-1]["body"]) > 1_000_000
    seen = len(upstream.calls)
    big["model"] = "gpt-b"
    assert_denied(await call(http, nginx, key=key, body=big), 403, "model_not_allowed",
                  upstream, seen)


# -- every denial, with its true status and JSON -----------------------------------------

async def test_missing_invalid_and_disabled_keys_are_401(stack, plane, http):
    nginx, upstream, _ = stack
    seen = len(upstream.calls)
    missing = await call(http, nginx, body={"model": "m"})
    assert_denied(missing, 401, "missing_api_key", upstream, seen)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    unknown = await call(http, nginx, key="sk-" + "Q" * 40, body={"model": "m"})
    assert_denied(unknown, 401, "invalid_api_key", upstream, seen)
    key_id, key = await make(plane, unlimited=True)
    await disable(plane, key_id)
    assert_denied(await call(http, nginx, key=key, body={"model": "m"}), 401,
                  "key_disabled", upstream, seen)


async def test_quota_exhausted_is_402_not_500(stack, plane, http):
    nginx, upstream, _ = stack
    _, key = await make(plane, quota=15)
    assert (await call(http, nginx, key=key, body={"model": "gpt-big"})).status == 200
    seen = len(upstream.calls)
    assert_denied(await call(http, nginx, key=key, body={"model": "gpt-big"}), 402,
                  "quota_exhausted", upstream, seen)


async def test_model_from_the_body_wins_over_a_header(stack, plane, http):
    nginx, upstream, _ = stack
    _, key = await make(plane, unlimited=True, models=["gpt-a"])
    seen = len(upstream.calls)
    lying = await call(http, nginx, key=key, body={"model": "gpt-b"},
                       headers={"x-model": "gpt-a"})
    assert_denied(lying, 403, "model_not_allowed", upstream, seen)
    # No model in the body: the client's own X-Model is not what the upstream reads, and
    # NGINX does not relay it; a write call that names no model is refused for a key
    # with a whitelist.
    assert_denied(await call(http, nginx, key=key, body={"messages": []},
                             headers={"x-model": "gpt-a"}), 403, "model_not_allowed",
                  upstream, seen)
    assert_denied(await call(http, nginx, key=key, body={"messages": []}), 403,
                  "model_not_allowed", upstream, seen)
    # A newline in the model cannot inject a header into the auth request.
    sneaky = await call(http, nginx, key=key,
                        body={"model": "gpt-b\r\nX-Model: gpt-a"})
    assert_denied(sneaky, 403, "model_not_allowed", upstream, seen)


NOT_CERTAIN = {
    # JSON.parse fails on NaN (Python's json serves the last "model"); a text search
    # would find the nested one first.
    "nan": b'{"metadata": {"model": "gpt-a"}, "temperature": NaN, "model": "gpt-b"}',
    # JSON.parse keeps the last "model", an upstream may read the first.
    "duplicate": b'{"model": "gpt-b", "messages": [], "model": "gpt-a"}',
    "escaped duplicate": b'{"mod\\u0065l": "gpt-b", "messages": [], "model": "gpt-a"}',
    "cut off": b'{"model": "gpt-a", "messages": [{"role": "user", "content": "hi',
}


@pytest.mark.parametrize("body", NOT_CERTAIN.values(), ids=NOT_CERTAIN.keys())
async def test_njs_never_sends_a_guess(stack, plane, http, body):
    nginx, upstream, _ = stack
    _, key = await make(plane, unlimited=True, models=["gpt-a"])
    seen = len(upstream.calls)
    reply = await call(http, nginx, key=key, body=body,
                       headers={"Content-Type": "application/json"})
    assert_denied(reply, 403, "model_not_allowed", upstream, seen)
    # The same call with a body njs can read for sure goes through (the check can fail),
    # as do nested "model"s and a "model" value.
    for good in (b'{"model": "gpt-a", "messages": []}',
                 b'{"tools": [{"model": "gpt-b"}], "model": "gpt-a", "m": {"model": "x"}}',
                 b'{"model": "gpt-a", "metadata": {"note": "model"}}'):
        reply = await call(http, nginx, key=key, body=good,
                           headers={"Content-Type": "application/json"})
        assert reply.status == 200, (good, reply.raw)


async def test_model_in_the_path_beats_the_body_through_nginx(stack, plane, http):
    nginx, upstream, _ = stack
    _, key = await make(plane, unlimited=True, models=["gemini-flash"])
    seen = len(upstream.calls)
    forbidden = "/v1beta/models/gemini-pro:generateContent"
    assert_denied(await call(http, nginx, forbidden, key=key, body={"model": "gemini-flash"}),
                  403, "model_not_allowed", upstream, seen)
    assert (await call(http, nginx, "/v1beta/models/gemini-flash:generateContent", key=key,
                       body={"contents": []})).status == 200


async def test_ip_allow_list_sees_the_real_client(stack, plane, http):
    nginx, upstream, _ = stack
    _, key = await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8"])
    forged = {"X-Real-IP": "10.1.1.1", "x-client-ip": "10.1.1.1",
              "x-envoy-external-address": "10.1.1.1", "X-Forwarded-For": "10.1.1.1"}
    seen = len(upstream.calls)
    assert_denied(await call(http, nginx, key=key, body={"model": "m"}, headers=forged),
                  403, "ip_not_allowed", upstream, seen)
    _, local = await make(plane, unlimited=True, allowed_ips=["127.0.0.0/8"])
    assert (await call(http, nginx, key=local, body={"model": "m"})).status == 200


async def test_rate_limited_is_429_with_retry_after(stack, plane, http):
    nginx, upstream, _ = stack
    _, key = await make(plane, unlimited=True, rpm=1)
    assert (await call(http, nginx, key=key, body={"model": "m"})).status == 200
    seen = len(upstream.calls)
    limited = await call(http, nginx, key=key, body={"model": "m"})
    assert_denied(limited, 429, "rate_limited", upstream, seen)
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-limit-requests"] == "1"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"


async def test_anthropic_dialect_through_nginx(stack, plane, http):
    nginx, upstream, _ = stack
    _, key = await make(plane, quota=0)
    seen = len(upstream.calls)
    reply = await call(http, nginx, "/v1/messages", body={"model": "claude-x"},
                       headers={"x-api-key": key, "anthropic-version": "2023-06-01"})
    assert reply.status == 402 and reply.headers["content-type"] == "application/json"
    assert reply.json["type"] == "error" and reply.json["error"]["type"] == "billing_error"
    assert len(upstream.calls) == seen


async def test_auth_location_is_internal(stack, http):
    nginx, _, _ = stack
    reply = await call(http, nginx, "/_sidecar_authz", method="GET")
    assert reply.status == 404


async def test_sidecar_unreachable_is_503_json(tmp_path, http):
    nginx = start_nginx(tmp_path, free_port(), free_port())   # nothing listens there
    try:
        reply = await call(http, nginx, key="sk-" + "A" * 40, body={"model": "m"})
        assert reply.status == 503 and reply.headers["content-type"] == "application/json"
        assert reply.json["error"]["code"] == "service_unavailable"
        anthropic = await call(http, nginx, "/v1/messages", body={"model": "m"},
                               headers={"x-api-key": "sk-" + "A" * 40})
        assert anthropic.status == 503 and anthropic.json["error"]["type"] == "api_error"
    finally:
        stop_process(nginx.proc)


async def test_usage_reported_by_the_upstream_is_settled(stack, plane, http, tmp_path):
    """The whole loop: nginx -> sidecar (reserves) -> stub upstream, which reports its
    usage to /settle by the x-key-id and x-reservation-id nginx gave it -> refund."""
    _, _, car = stack
    port = free_port()
    env = {**os.environ, "STUB_LISTEN": f"127.0.0.1:{port}",
           "SIDECAR_SETTLE_URL": car.url + "/settle", "SIDECAR_SETTLEMENT_TOKEN": SETTLE_TOKEN}
    stub = subprocess.Popen([sys.executable, str(STUB)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    front = None
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                                timeout=1).status == 200, 10, "stub upstream")
        front = start_nginx(tmp_path / "front", car.port, port)
        key_id, key = await make(plane, quota=100)
        reply = await call(http, front, key=key, body={"model": "gpt-priced", "messages": []})
        assert reply.status == 200 and reply.json["usage"]["completion_tokens"] == 16
        # gpt-priced reserved 10 units; the stub reports ~25 tokens, priced at 40 units
        # per 1000 tokens: 1 unit. The report arrives after the answer: wait for it.
        for _ in range(100):
            if (await plane.key(None, key_id))["quota_remaining"] != 90:
                break
            await asyncio.sleep(0.1)
        view = await plane.key(None, key_id)
        assert (view["quota_remaining"], view["quota_used"]) == (99, 1)
    finally:
        if front is not None:
            stop_process(front.proc)
        stop_process(stub)


async def test_business_denials_leave_no_error_line(stack, plane, http):
    """402 and 429 are answers, not faults: the client gets them, the error log gets
    nothing (NGINX logs "auth request unexpected status" for any status it does not
    expect from auth_request)."""
    nginx, upstream, _ = stack
    _, broke = await make(plane, quota=0)
    _, limited = await make(plane, unlimited=True, rpm=1)
    assert (await call(http, nginx, key=limited, body={"model": "m"})).status == 200
    before = nginx.errors().count("\n")
    seen = len(upstream.calls)
    for _ in range(3):
        assert_denied(await call(http, nginx, key=broke, body={"model": "m"}), 402,
                      "quota_exhausted", upstream, seen)
        reply = await call(http, nginx, key=limited, body={"model": "m"})
        assert_denied(reply, 429, "rate_limited", upstream, seen)
        assert int(reply.headers["retry-after"]) >= 1
    new_lines = nginx.errors().splitlines()[before:]
    assert [line for line in new_lines if "[error]" in line or "unexpected" in line] == []
    assert "unexpected status" not in nginx.errors()
