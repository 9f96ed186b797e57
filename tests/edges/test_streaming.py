"""Streamed calls settled by the shipped proxies themselves (docs/budgets.md "Streaming").

A real sidecar with prices and a budget on a key, a small aiohttp SSE upstream that
answers in the OpenAI Chat Completions or the Anthropic Messages shape (and can cut its
stream off mid-way), and in front the shipped NGINX (deploy/nginx/, njs usage.js) and
Envoy (deploy/envoy/*.yaml, the Lua filter) configurations, rendered with only their
addresses swapped. What a client and the operator observe: the budget's `spent`
(admin API GET /admin/v1/keys/{id}/limits) is the priced usage of the final chunk; a
stream cut off mid-way (by the upstream, or by a client going away) is settled by the
rule through NGINX (Anthropic: the prompt tokens seen and the output delivered; OpenAI:
no prompt count, so nothing is reported and the reservation stays held until
expired_reservation ends it) and left to expiry through Envoy; NGINX asks for the usage
of a Chat Completions stream itself and keeps that chunk from the client; a non-streamed
call still works and is left to the upstream's own report.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import aiohttp
import pytest
from admin_helpers import start_plane, stop_plane
from aiohttp import web
from conftest import free_port, stop_process
from live import metric_value
from proxies import ENVOY_GRPC_YAML, ENVOY_YAML, start_envoy
from test_nginx import start_nginx

TOKEN = "stream-settle-token-0123456789"
# micro-units per token: gpt-s 2 in, 10 out, 0.5 cached in; claude-s 3 in, 15 out
PRICES = json.dumps({"gpt-s": {"input": "2.00", "output": "10.00", "cached_input": "0.50"},
                     "claude-s": {"input": "3.00", "output": "15.00"}})
TIMEOUT = aiohttp.ClientTimeout(total=10)
DELTA = "hello "                       # 6 bytes a delta, 3 deltas before any cut

OPENAI_USAGE = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35,
                "prompt_tokens_details": {"cached_tokens": 10},
                "completion_tokens_details": {"reasoning_tokens": 0}}
OPENAI_SPENT = "0.000095"              # 20 x 2 + 10 x 0.5 + 5 x 10
ANTHROPIC_SPENT = "0.0003"             # 40 x 3 + 12 x 15
ANTHROPIC_CUT_SPENT = "0.000255"       # 40 x 3 + max(1, 3 deltas, 18 bytes / 2) x 15


@dataclass
class SseUpstream:
    """An LLM API stand-in that streams: OpenAI chunks on /v1/chat/completions,
    Anthropic events on /v1/messages; a user message "cut" ends the stream (the TCP
    connection) after three deltas. Records every call."""

    port: int = 0
    calls: list[dict] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def start(self) -> SseUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        self.calls.append({"path": request.path, "body": body, "raw": raw,
                           "headers": {k.lower(): v for k, v in request.headers.items()}})
        anthropic = request.path.startswith("/v1/messages")
        if not body.get("stream"):
            usage = {"input_tokens": 40, "output_tokens": 2} if anthropic else OPENAI_USAGE
            return web.json_response({"model": body["model"], "usage": usage,
                                      "choices": [{"message": {"content": "hi"}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        cut = body["messages"][-1]["content"] == "cut"
        stall = body["messages"][-1]["content"] == "stall"
        events = anthropic_events(body) if anthropic else openai_events(body)
        for number, event in enumerate(events):
            if cut and number == 4:
                request.transport.close()          # mid-stream, no final chunk
                return resp
            if stall and number == 4:
                await asyncio.sleep(3)             # the client gives up meanwhile
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def stop(self) -> None:
        await self.runner.cleanup()


def sse(doc: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(doc)}\n\n".encode()


def openai_events(body: dict) -> list[bytes]:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"]}
    with_usage = (body.get("stream_options") or {}).get("include_usage")
    extra = {"usage": None} if with_usage else {}
    out = [sse({**chunk, **extra, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
    out += [sse({**chunk, **extra, "choices": [{"index": 0, "delta": {"content": DELTA}}]})
            for _ in range(3)]
    out.append(sse({**chunk, **extra,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if with_usage:
        out.append(sse({**chunk, "choices": [], "usage": OPENAI_USAGE}))
    return [*out, b"data: [DONE]\n\n"]


def anthropic_events(body: dict) -> list[bytes]:
    start = {"type": "message_start", "message": {
        "id": "m1", "type": "message", "role": "assistant", "model": body["model"],
        "content": [], "usage": {"input_tokens": 40, "cache_read_input_tokens": 0,
                                 "output_tokens": 1}}}
    delta = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": DELTA}}
    return [sse(start, "message_start"),
            *[sse(delta, "content_block_delta") for _ in range(3)],
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                 "usage": {"output_tokens": 12}}, "message_delta"),
            sse({"type": "message_stop"}, "message_stop")]


# -- the stack ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    p = start_plane(tmp_path_factory.mktemp("streaming"), settlement_token=TOKEN,
                    prices=PRICES, trusted_proxies="127.0.0.1/32",
                    default_max_output_tokens="1000",
                    grpc_listen=f"127.0.0.1:{free_port()}")
    yield p
    stop_plane(p)


@pytest.fixture
async def upstream():
    up = await SseUpstream().start()
    yield up
    await up.stop()


@pytest.fixture
def nginx(plane, upstream, tmp_path):
    server = start_nginx(tmp_path / "nginx", plane.car.port, upstream.port,
                         env={"SIDECAR_SETTLEMENT_TOKEN": TOKEN})
    yield server
    stop_process(server.proc)


def budgeted_key(plane) -> tuple[str, str]:
    """A project key with a 1.00 budget: (key id, key)."""
    project = plane.ok("POST", "/projects", {"name": f"stream-{free_port()}"})["id"]
    made = plane.ok("POST", "/keys", {"owner": "project", "project_id": project,
                                      "unlimited": True, "budget": "1.00"}, status=201)
    return made["id"], made["key"]


def limits(plane, key_id: str) -> dict:
    return plane.ok("GET", f"/keys/{key_id}/limits")


async def settled(plane, key_id: str) -> dict:
    """The key's limits once nothing is reserved any more (the report follows the
    answer): bounded, then the state as it is."""
    for _ in range(100):
        shown = limits(plane, key_id)
        if shown["reserved"] in ("0.00", "0"):
            return shown
        await asyncio.sleep(0.05)
    return limits(plane, key_id)


async def stream(url: str, path: str, key: str,
                 body: dict | bytes) -> tuple[int, bytes, bool]:
    """(status, the bytes delivered, whether the stream ended cleanly)."""
    headers = {"Authorization": f"Bearer {key}", "x-api-key": key,
               "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(
            url + path, data=data, headers=headers, timeout=TIMEOUT) as resp:
        got = b""
        try:
            async for chunk in resp.content.iter_any():
                got += chunk
        except aiohttp.ClientPayloadError:
            return resp.status, got, False
        return resp.status, got, True


def chat(content: str = "hi", **extra) -> dict:
    return {"model": "gpt-s", "stream": True, "max_tokens": 100,
            "messages": [{"role": "user", "content": content}], **extra}


def message(content: str = "hi") -> dict:
    return {"model": "claude-s", "stream": True, "max_tokens": 100,
            "messages": [{"role": "user", "content": content}]}


# -- NGINX ------------------------------------------------------------------------------------

async def test_nginx_settles_an_openai_stream_at_its_final_usage(plane, upstream, nginx):
    key_id, key = budgeted_key(plane)
    status, got, clean = await stream(nginx.url, "/v1/chat/completions", key,
                                      chat(stream_options={"include_usage": True}))
    assert (status, clean) == (200, True) and got.count(DELTA.encode()) == 3
    assert b'"usage": {"prompt_tokens": 30' in got and got.endswith(b"data: [DONE]\n\n")
    assert "authorization" not in upstream.calls[-1]["headers"]
    shown = await settled(plane, key_id)
    assert (shown["spent"], shown["reserved"]) == (OPENAI_SPENT, "0.00")


async def test_nginx_asks_for_the_usage_and_keeps_it_from_a_client_that_did_not(
        plane, upstream, nginx):
    """A streamed Chat Completions call without stream_options: NGINX adds
    include_usage (the rest of the body byte for byte), settles the last chunk's usage,
    and the client gets the stream it asked for, without that chunk."""
    key_id, key = budgeted_key(plane)
    raw = b'{ "model": "gpt-s",\n "stream": true, "max_tokens": 100, "n": 1.50,' \
          b' "messages": [{"role": "user", "content": "h\\u00e9 \xc3\xa9"}]}'
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(
            nginx.url + "/v1/chat/completions", data=raw, headers=headers,
            timeout=TIMEOUT) as resp:
        got = await resp.read()
    assert resp.status == 200 and got.count(DELTA.encode()) == 3
    assert b'"choices": []' not in got and b'"prompt_tokens"' not in got
    assert got.endswith(b"data: [DONE]\n\n")
    sent = upstream.calls[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}
    assert upstream.calls[-1]["raw"] == b'{"stream_options":{"include_usage":true},' + raw[1:]
    shown = await settled(plane, key_id)
    assert (shown["spent"], shown["reserved"]) == (OPENAI_SPENT, "0.00")


async def test_nginx_leaves_other_bodies_as_they_came(plane, upstream, nginx):
    _, key = budgeted_key(plane)
    bodies = [chat(stream_options={"include_usage": False}),   # the client's choice
              {**chat(), "stream": False}, {**chat(), "stream": "true"}]
    raws = [json.dumps(body).encode() for body in bodies] + [
        # a repeated "stream": not certain which one the upstream reads
        b'{"model": "gpt-s", "stream": false, "messages": [{"role": "user",'
        b' "content": "x"}], "stream": true}']
    for raw in raws:
        await stream(nginx.url, "/v1/chat/completions", key, raw)
        assert upstream.calls[-1]["raw"] == raw
    raw = json.dumps(message()).encode()
    await stream(nginx.url, "/v1/messages", key, raw)
    assert upstream.calls[-1]["raw"] == raw


async def test_nginx_keeps_concurrent_streams_apart(plane, nginx):
    """Each call's stream is read on its own: eight at once, of both dialects, each
    key ends with its own call's price."""
    keys = [budgeted_key(plane) for _ in range(8)]
    calls = [stream(nginx.url, "/v1/messages", key, message()) if n % 2 else
             stream(nginx.url, "/v1/chat/completions", key, chat())
             for n, (_, key) in enumerate(keys)]
    assert all(done[0] == 200 and done[2] for done in await asyncio.gather(*calls))
    for n, (key_id, _) in enumerate(keys):
        shown = await settled(plane, key_id)
        assert shown["spent"] == (ANTHROPIC_SPENT if n % 2 else OPENAI_SPENT), n


async def test_nginx_settles_an_anthropic_stream_at_message_delta(plane, nginx):
    key_id, key = budgeted_key(plane)
    status, got, clean = await stream(nginx.url, "/v1/messages", key, message())
    assert (status, clean) == (200, True) and b"message_stop" in got
    shown = await settled(plane, key_id)
    assert (shown["spent"], shown["reserved"]) == (ANTHROPIC_SPENT, "0.00")


async def test_nginx_settles_what_a_cut_anthropic_stream_delivered(plane, nginx):
    key_id, key = budgeted_key(plane)
    status, got, clean = await stream(nginx.url, "/v1/messages", key, message("cut"))
    assert status == 200 and not clean and got.count(DELTA.encode()) == 3
    assert b"message_delta" not in got
    shown = await settled(plane, key_id)
    assert (shown["spent"], shown["reserved"]) == (ANTHROPIC_CUT_SPENT, "0.00")


async def test_nginx_settles_what_was_delivered_to_a_client_that_went_away(plane, nginx):
    key_id, key = budgeted_key(plane)
    headers = {"x-api-key": key, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(nginx.url + "/v1/messages", data=json.dumps(message("stall")),
                               headers=headers, timeout=TIMEOUT)
        got = b""
        while got.count(DELTA.encode()) < 3:
            got += await resp.content.readany()
        resp.close()                                # gone, mid-stream
    shown = await settled(plane, key_id)
    assert (shown["spent"], shown["reserved"]) == (ANTHROPIC_CUT_SPENT, "0.00")


async def test_nginx_leaves_an_uncountable_cut_stream_to_expiry(plane, nginx):
    """An OpenAI stream names its prompt tokens only in its last chunk: cut before it,
    nothing is reported and the worst case stays reserved (expired_reservation ends
    it, charged in full by default): breaking a stream never makes a call free."""
    key_id, key = budgeted_key(plane)
    status, _, clean = await stream(nginx.url, "/v1/chat/completions", key,
                                    chat("cut", stream_options={"include_usage": True}))
    assert status == 200 and not clean
    # A second call on the same key settles, so the first report had its chance.
    await stream(nginx.url, "/v1/messages", key, message())
    for _ in range(100):
        if limits(plane, key_id)["spent"] != "0.00":
            break
        await asyncio.sleep(0.05)
    shown = limits(plane, key_id)
    assert shown["spent"] == ANTHROPIC_SPENT and shown["reserved"] != "0.00"


async def test_nginx_non_streamed_calls_are_left_to_the_upstream(plane, upstream, nginx):
    key_id, key = budgeted_key(plane)
    body = {"model": "gpt-s", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as http, http.post(
            nginx.url + "/v1/chat/completions", json=body, timeout=TIMEOUT,
            headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200 and (await resp.json())["usage"] == OPENAI_USAGE
    assert upstream.calls[-1]["body"] == body
    assert upstream.calls[-1]["headers"]["x-reservation-id"].startswith("rsv_")
    shown = limits(plane, key_id)
    assert shown["spent"] == "0.00" and shown["reserved"] != "0.00"


# -- Envoy (ext_authz over HTTP and over gRPC, the same Lua filter) --------------------------

@pytest.fixture(params=["http", "grpc"])
def envoy(request, plane, upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECAR_SETTLEMENT_TOKEN", TOKEN)      # Envoy's environment
    car = plane.car
    config, authz = ((ENVOY_YAML, {"sidecar:8080": car.port}) if request.param == "http"
                     else (ENVOY_GRPC_YAML, {"sidecar:9090": car.grpc_port,
                                             "sidecar:8080": car.port}))
    server = start_envoy(tmp_path / "envoy", {**authz, "llm-upstream:9000": upstream.port},
                         config=config)
    yield server
    stop_process(server.proc)


async def test_envoy_settles_an_openai_stream_at_its_final_usage(plane, upstream, envoy):
    key_id, key = budgeted_key(plane)
    status, got, clean = await stream(envoy.url, "/v1/chat/completions", key,
                                      chat(stream_options={"include_usage": True}))
    assert (status, clean) == (200, True) and got.count(DELTA.encode()) == 3
    assert got.endswith(b"data: [DONE]\n\n")
    assert "authorization" not in upstream.calls[-1]["headers"]
    shown = await settled(plane, key_id)
    assert (shown["spent"], shown["reserved"]) == (OPENAI_SPENT, "0.00")


async def test_envoy_settles_an_anthropic_stream_at_message_delta(plane, envoy):
    key_id, key = budgeted_key(plane)
    status, got, clean = await stream(envoy.url, "/v1/messages", key, message())
    assert (status, clean) == (200, True) and b"message_stop" in got
    shown = await settled(plane, key_id)
    assert (shown["spent"], shown["reserved"]) == (ANTHROPIC_SPENT, "0.00")


async def test_envoy_leaves_a_cut_stream_to_expiry(plane, envoy):
    """A stream broken off ends Envoy's filter with it: no report, the worst case stays
    reserved until expired_reservation ends it (charged in full by default)."""
    key_id, key = budgeted_key(plane)
    status, got, clean = await stream(envoy.url, "/v1/messages", key, message("cut"))
    assert status == 200 and not clean and got.count(DELTA.encode()) == 3
    await stream(envoy.url, "/v1/messages", key, message())   # this one settles
    for _ in range(100):
        if limits(plane, key_id)["spent"] != "0.00":
            break
        await asyncio.sleep(0.05)
    shown = limits(plane, key_id)
    assert shown["spent"] == ANTHROPIC_SPENT and shown["reserved"] != "0.00"


async def test_envoy_non_streamed_calls_are_left_to_the_upstream(plane, upstream, envoy):
    key_id, key = budgeted_key(plane)
    body = {"model": "gpt-s", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as http, http.post(
            envoy.url + "/v1/chat/completions", json=body, timeout=TIMEOUT,
            headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200 and (await resp.json())["usage"] == OPENAI_USAGE
    assert upstream.calls[-1]["body"] == body
    shown = limits(plane, key_id)
    assert shown["spent"] == "0.00" and shown["reserved"] != "0.00"


def test_every_report_the_proxies_sent_was_accepted(plane):
    """Run last in this module: every report NGINX and Envoy sent above was well-formed,
    carried the right token, named a known key and an open reservation, and none came
    twice (a refused report would show here, not as a wrong `spent`)."""
    import urllib.request
    with urllib.request.urlopen(plane.car.admin_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    name = "sidecar_settlements_total"
    assert sum(metric_value(text, name, {"result": accepted})
               for accepted in ("refund", "charge", "exact")) >= 10
    for refused in ("unauthorized", "rejected", "unknown_key", "unknown_reservation",
                    "duplicate", "unavailable"):
        assert metric_value(text, name, {"result": refused}) == 0, refused
