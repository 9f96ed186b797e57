"""Helpers for the tests that talk to a running sidecar over HTTP (not fixtures).

The fixtures themselves (redis_server, plane, http, start_sidecar) live in conftest.py;
this module only holds the small request/CLI helpers those tests share. Keys are made
through the control plane (`make`), never written into Redis by hand.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from conftest import (
    PEPPER,
    ROOT,
    Sidecar,
    free_port,
    sidecar_env,
    start_sidecar,
    stop_process,
    wait_for,
)

from sidecar.schema import names
from sidecar.schema.keys import KeyHasher, KeyType
from sidecar.schema.record import stored

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)  # a hang fails the test, never blocks it


@dataclass
class Answer:
    status: int
    headers: dict[str, str]        # lower-cased names
    raw: bytes
    removed: tuple[str, ...] = ()  # request headers the proxy removes before the upstream

    @property
    def json(self) -> dict:
        return orjson.loads(self.raw)

    @property
    def code(self) -> str | None:
        """The OpenAI-style `code` of a denial, or the Anthropic error type."""
        body = self.json
        if body.get("type") == "error":
            return body["error"]["type"]
        return body["error"]["code"]


async def authz(http: aiohttp.ClientSession, car: Sidecar, path: str = CHAT, *,
                method: str = "POST", key: str | None = None, api_key: str | None = None,
                headers: dict[str, str] | None = None, body: dict | bytes | None = None,
                authz_path: str | None = None,
                timeout: aiohttp.ClientTimeout = CLIENT_TIMEOUT) -> Answer:
    """One authorize call the way Envoy makes it: original method, /authz + path."""
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if api_key is not None:
        sent["x-api-key"] = api_key
    data = orjson.dumps(body) if isinstance(body, dict) else body
    if isinstance(body, dict):
        sent.setdefault("Content-Type", "application/json")
    url = car.url + (authz_path if authz_path is not None else "/authz" + path)
    async with http.request(method, url, headers=sent, data=data,
                            timeout=timeout) as resp:
        raw = await resp.read()
        headers = {k.lower(): v for k, v in resp.headers.items()}
        removed = headers.get("x-envoy-auth-headers-to-remove", "")
        return Answer(resp.status, headers, raw, tuple(filter(None, removed.split(","))))


# -- gRPC ext_authz (Authorization/Check), the way Envoy calls it ------------------------

# On the HTTP edge a trusted proxy names the client IP in one of these headers; in gRPC
# mode Envoy gives it as attributes.source instead, and headers never choose it.
IP_HEADERS = ("x-envoy-external-address", "x-client-ip", "x-real-ip", "x-forwarded-for")


async def check(channel, path: str = CHAT, *, method: str = "POST", key: str | None = None,
                api_key: str | None = None, headers: dict[str, str] | None = None,
                body: dict | bytes | None = None, source: str = "127.0.0.1",
                ip_headers_as_source: bool = True) -> Answer:
    """One Check call as Envoy's gRPC ext_authz makes it (with_request_body,
    pack_as_bytes), answered as the client or upstream would see it: a denial's status,
    headers and body; an allow's upstream headers, response headers and removals."""
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
    from google.rpc import code_pb2

    sent = {k.lower(): v for k, v in (headers or {}).items()}
    if ip_headers_as_source:
        for name in IP_HEADERS:
            if name in sent:
                source = sent.pop(name).split(",")[0].strip()
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    if api_key is not None:
        sent["x-api-key"] = api_key
    data = orjson.dumps(body) if isinstance(body, dict) else body or b""
    if isinstance(body, dict):
        sent.setdefault("content-type", "application/json")
    sent.update({":method": method, ":path": path, ":authority": "api.example"})
    request = pb.CheckRequest()
    request.attributes.source.address.socket_address.address = source
    request.attributes.source.address.socket_address.port_value = 40000
    http = request.attributes.request.http
    http.method, http.path, http.host, http.raw_body = method, path, "api.example", data
    http.size = len(data)
    http.headers.update(sent)
    reply = await pb_grpc.AuthorizationStub(channel).Check(request, timeout=10)
    if reply.WhichOneof("http_response") == "denied_response":
        assert reply.status.code != code_pb2.OK
        denied = reply.denied_response
        return Answer(denied.status.code, {h.header.key.lower(): h.header.value
                                           for h in denied.headers}, denied.body.encode())
    assert reply.status.code == code_pb2.OK, reply
    ok = reply.ok_response
    seen = {h.header.key.lower(): h.header.value
            for h in (*ok.headers, *ok.response_headers_to_add)}
    return Answer(200, seen, b"", tuple(ok.headers_to_remove))


class Transport:
    """Authorize calls to a running sidecar over one data-plane transport: "http" (the
    edge, Envoy's HTTP service style) or "grpc" (Check). Same arguments, same Answer."""

    def __init__(self, kind: str, http: aiohttp.ClientSession):
        self.kind = kind
        self.http = http
        self._channels: dict[int, object] = {}

    async def __call__(self, car: Sidecar, path: str = CHAT, **kwargs) -> Answer:
        if self.kind == "http":
            return await authz(self.http, car, path, **kwargs)
        import grpc
        assert car.grpc_port, "start the sidecar with grpc_listen"
        channel = self._channels.get(car.grpc_port)
        if channel is None:
            channel = self._channels[car.grpc_port] = grpc.aio.insecure_channel(
                f"127.0.0.1:{car.grpc_port}")
        return await check(channel, path, **kwargs)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


hash_of = KeyHasher(PEPPER)        # a plaintext key's keyed hash, as the sidecar's


async def raw_record(aredis, key: str) -> dict[str, str | bytes]:
    """A key's record as stored, for tests whose subject is what a call leaves in it
    (text, but the packed `lim` as bytes)."""
    return stored(await aredis.hgetall(names.record(hash_of(key))))


async def make(plane, type: str = "standard", org: str = "default",
               **settings) -> tuple[str, str]:
    """(key id, plaintext key) of a new key made by the control plane (ControlStore).

    settings use the admin API's names (quota, unlimited, models, allowed_ips, rpm, tpm,
    permission, scopes, expires_at, account, cycle_days, payg_fallback, project_id, ...).
    Standard and subscription keys are made outside any organization; an org key goes to
    `org`'s default project unless an owner is given; an admin key gets an owner of its
    own in `org`.
    """
    type = KeyType(type).value
    if type in ("standard", "subscription"):
        view, plaintext = await plane.create_standalone_key({"type": type, **settings})
        return view["id"], plaintext
    org = await plane.resolve_org(org)
    if type == "admin" and "member_id" not in settings:
        member = await plane.add_member(org, f"admin-{len(await plane.list_members(org))}",
                                        "owner")
        settings["member_id"] = member["id"]
    elif type == "org" and not {"project_id", "member_id",
                                "service_account_id"} & settings.keys():
        settings["project_id"] = "default" if org == "default" else (
            await plane.create_project(org, "p"))["id"]
    view, plaintext = await plane.create_key(org, {"type": type, **settings})
    return view["id"], plaintext


async def key_on(redis_url: str, quota: int = 100) -> str:
    """One organization key with `quota`, made through the control plane on a Redis the
    test started itself (no `plane` fixture on it)."""
    import redis.asyncio as aioredis

    from sidecar.control.store import ControlStore
    client = aioredis.from_url(redis_url)
    try:
        control = ControlStore(client, KeyHasher(PEPPER))
        org = await control.create_org("acme")
        project = await control.create_project(org["id"], "drain")
        _, key = await control.create_key(org["id"], {"project_id": project["id"],
                                                      "quota": quota})
    finally:
        await client.aclose()
    return key


async def disable(plane, key_id: str) -> dict:
    return await plane.set_key_status(None, key_id, False)


async def balance(plane, account: str) -> int:
    """A standalone account's PAYG balance."""
    return (await plane.account(None, account))["balance"]


async def expire_now(aredis, key: str) -> None:
    """Age a key past its expiry. The control plane (rightly) refuses an expiry in the
    past, so the record's field is rewritten as the passing of time would leave it."""
    await aredis.hset(names.record(hash_of(key)), "ex", str(int(time.time() * 1000) - 1000))


# The contract's denials a client can cause, with their status: each through every
# front door (the sidecar itself, each real proxy).
DENIAL_ROWS = [("missing_api_key", 401), ("invalid_api_key/malformed", 401),
               ("invalid_api_key/unknown", 401), ("invalid_api_key/deleted", 401),
               ("key_disabled", 401), ("key_expired", 401), ("admin_key_not_allowed", 403),
               ("ip_not_allowed", 403), ("model_not_allowed", 403),
               ("permission_denied", 403), ("quota_exhausted", 402)]


async def denial_row(plane, row: str) -> tuple[str | None, dict]:
    """(key, call kwargs) that make `row`'s denial happen on a fresh database, for a
    client on 127.0.0.1 calling model gpt-x with a write call."""
    body = {"model": "gpt-x", "messages": []}
    if row == "missing_api_key":
        return None, {"body": body}
    if row == "invalid_api_key/malformed":
        return "sk-short", {"body": body}
    if row == "invalid_api_key/unknown":
        return "sk-" + "A" * 40, {"body": body}
    if row == "invalid_api_key/deleted":
        key_id, key = await make(plane, unlimited=True)
        await plane.delete_key(None, key_id)
        return key, {"body": body}
    if row == "key_disabled":
        key_id, key = await make(plane, unlimited=True)
        await disable(plane, key_id)
        return key, {"body": body}
    if row == "key_expired":
        key_id, key = await make(plane, unlimited=True,
                                 expires_at=datetime.now(UTC) + timedelta(days=1))
        await expire_now(plane.redis, key)
        return key, {"body": body}
    if row == "admin_key_not_allowed":
        _, key = await make(plane, type="admin")
        return key, {"body": body}
    if row == "ip_not_allowed":
        _, key = await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8"])
        return key, {"body": body}
    if row == "model_not_allowed":
        _, key = await make(plane, unlimited=True, models=["gpt-y"])
        return key, {"body": body}
    if row == "permission_denied":
        _, key = await make(plane, unlimited=True, permission="read-only")
        return key, {"body": body}
    if row == "quota_exhausted":
        _, key = await make(plane, quota=0)
        return key, {"body": body}
    raise AssertionError(row)


async def send(car, request: bytes, shut_write: bool = False) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one raw request on a fresh connection; 10 s bound."""
    async def exchange():
        reader, writer = await asyncio.open_connection("127.0.0.1", car.port)
        try:
            writer.write(request)
            if shut_write:
                writer.write_eof()
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            head_only = request.startswith(b"HEAD ")   # no body follows, whatever the length
            body = await reader.readexactly(length) if length and not head_only else b""
            return int(head.split(b" ", 2)[1]), head, body
        finally:
            writer.close()
    return await asyncio.wait_for(exchange(), 10)


def cli(redis_url: str, *args: str, cwd=None, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """`python -m sidecar ...` against the test Redis, with the test pepper."""
    return subprocess.run([sys.executable, "-m", "sidecar", *args],
                          env=env or sidecar_env(redis_url), cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=30)


def evalsha_calls(client) -> int:
    """How many EVALSHA commands this redis-server has run (INFO commandstats)."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",")
                     if "=" in part)
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in (labels or {}).items()):
            total += float(value)
    return total


# -- processes and their sockets (Linux /proc), for --workers N -------------------------

def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
    return inodes


def tcp_inodes(local_port: int, state: str, remote_port: int | None = None) -> set[str]:
    """Inodes of TCP sockets on `local_port` in `state` ('0A' listen, '01' established)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local, remote, st, inode = cols[1], cols[2], cols[3], cols[9]
                if int(local.rsplit(":", 1)[1], 16) != local_port or st != state:
                    continue
                if remote_port is not None and int(remote.rsplit(":", 1)[1], 16) != remote_port:
                    continue
                found.add(inode)
    return found


def start_workers(tmp: Path, redis_url: str, workers: int, **settings) -> Sidecar:
    """`serve --workers N`, returned once all N workers listen on the data-plane port."""
    car = start_sidecar(tmp, redis_url, "--workers", str(workers), **settings)

    def all_listening() -> bool:
        pids = children(car.proc.pid)
        listening = tcp_inodes(car.port, "0A")
        return len(pids) == workers and all(socket_inodes(p) & listening for p in pids)
    try:
        wait_for(all_listening, 20, f"{workers} workers listening")
    except TimeoutError:
        stop_process(car.proc)
        raise
    return car


# -- the official SDKs against a sidecar ---------------------------------------------

RELAYED_HEADERS = ("content-type", "x-auth-error", "retry-after", "www-authenticate")


async def sdk_gateway(car) -> tuple[web.AppRunner, str]:
    """A tiny gateway for the official SDKs: asks the sidecar, then relays its denial
    (status, JSON, Retry-After, x-ratelimit-*) or fakes the completion."""
    session = aiohttp.ClientSession()

    async def handle(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "x-api-key", "content-type")}
        async with session.request(request.method, car.url + "/authz" + request.path_qs,
                                   headers=headers, data=await request.read(),
                                   timeout=CLIENT_TIMEOUT) as auth:
            body = await auth.read()
            if auth.status != 200:
                relayed = {k: v for k, v in auth.headers.items()
                           if k.lower() in RELAYED_HEADERS or k.lower().startswith("x-ratelimit")}
                return web.Response(status=auth.status, body=body, headers=relayed)
        model = orjson.loads(await request.read()).get("model", "")
        if request.path.startswith("/v1/messages"):
            return web.json_response({
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}})
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"
