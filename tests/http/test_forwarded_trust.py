"""Forwarded metadata and the model rule, attacked over real sockets (issue 8, items 3-4).

Two running sidecars on the same Redis: `direct` trusts a proxy network the test client is
not in (10.0.0.0/8), so every header the client sends is a client's; `proxied` trusts
127.0.0.1, so the test client speaks as NGINX / Traefik / Envoy would. What must hold:
- from an untrusted peer, X-Original-* / X-Forwarded-* method and URI, x-model, the cost
  header and the client-IP headers change nothing: the request line and the peer decide;
- the model in the path is the one the upstream serves: no header or body overrides it;
- sources that disagree, two "model" keys, or a body the sidecar cannot read whole make
  the model uncertain, which a key with a model whitelist refuses on a write call.
"""

from __future__ import annotations

import gzip

import orjson
import pytest
from conftest import start_sidecar, stop_process
from live import CHAT, authz, make, send

GEMINI = "/v1beta/models/{}:generateContent"


@pytest.fixture(scope="module")
def direct(tmp_path_factory, redis_server):
    car = start_sidecar(tmp_path_factory.mktemp("direct"), redis_server.url,
                        trusted_proxies="10.0.0.0/8", cost_header="x-cost")
    yield car
    stop_process(car.proc)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, redis_server):
    car = start_sidecar(tmp_path_factory.mktemp("proxied"), redis_server.url,
                        trusted_proxies="127.0.0.1/32", cost_header="x-cost")
    yield car
    stop_process(car.proc)


def refused(answer, code: str) -> bool:
    return answer.status == 403 and answer.json["error"]["code"] == code


# -- item 4: forwarded metadata only from trusted peers ----------------------------------

@pytest.mark.parametrize("forged", [
    {"X-Original-Method": "GET", "X-Original-URI": "/v1/models"},
    {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/v1/models"},
    {"X-Original-Method": "GET"},
    {"X-Forwarded-Method": "HEAD"},
])
async def test_read_only_key_cannot_call_its_post_a_get(direct, proxied, plane, http,
                                                        forged):
    key_id, reader = await make(plane, unlimited=True, permission="read-only")
    answer = await authz(http, direct, CHAT, key=reader, headers=forged,
                         body={"model": "m"})
    assert refused(answer, "permission_denied"), answer.raw
    # Only a trusted proxy can say what the call was (here: it says GET, and it is).
    assert (await authz(http, proxied, CHAT, key=reader, headers=forged)).status == 200
    assert (await plane.key(None, key_id))["request_count"] == 1


async def test_forged_uri_cannot_reach_another_scope(direct, plane, http):
    _, restricted = await make(plane, unlimited=True, permission="restricted",
                               scopes=["models:read"])
    forged = {"X-Original-URI": "/v1/models", "X-Forwarded-Uri": "/v1/models"}
    answer = await authz(http, direct, CHAT, method="GET", key=restricted, headers=forged)
    assert refused(answer, "permission_denied"), answer.raw
    assert (await authz(http, direct, "/v1/models", method="GET",
                        key=restricted)).status == 200


async def test_cost_and_ip_headers_from_an_untrusted_peer_change_nothing(direct, plane,
                                                                          http):
    key_id, key = await make(plane, quota=10)
    forged = {"x-cost": "0", "X-Real-IP": "10.1.1.1", "X-Forwarded-For": "10.1.1.1",
              "x-client-ip": "10.1.1.1", "x-envoy-external-address": "10.1.1.1"}
    assert (await authz(http, direct, CHAT, key=key, headers=forged,
                        body={"model": "m"})).status == 200
    view = await plane.key(None, key_id)
    assert (view["quota_remaining"], view["last_ip"]) == (9, "127.0.0.1")
    _, fenced = await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8"])
    assert refused(await authz(http, direct, CHAT, key=fenced, headers=forged,
                               body={"model": "m"}), "ip_not_allowed")


# -- item 3: where the model comes from --------------------------------------------------

async def test_model_in_the_path_beats_header_and_body(direct, proxied, plane, http):
    key_id, key = await make(plane, unlimited=True, models=["gemini-flash"])
    forbidden = GEMINI.format("gemini-pro")
    for car in (direct, proxied):
        for sent in ({"headers": {"x-model": "gemini-flash"}},
                     {"body": {"model": "gemini-flash", "contents": []}},
                     {"headers": {"x-model": "gemini-flash"},
                      "body": {"model": "gemini-flash"}}):
            answer = await authz(http, car, forbidden, key=key, **sent)
            assert refused(answer, "model_not_allowed"), (car.port, sent, answer.raw)
    allowed = await authz(http, direct, GEMINI.format("gemini-flash"), key=key,
                          body={"contents": []})
    assert allowed.status == 200
    view = await plane.key(None, key_id)
    assert (view["request_count"], view["last_model"]) == (1, "gemini-flash")


async def test_path_tricks_are_uncertain(direct, plane, http):
    """Sent as raw bytes: an HTTP client library would normalise these paths first."""
    _, key = await make(plane, unlimited=True, models=["gemini-flash"])
    for path in (b"/v1beta/models/gemini-flash/../../v1beta/models/gemini-pro:generateContent",
                 b"/v1beta/models/gemini-fl%61sh:generateContent",
                 b"/v1beta/models/gemini-flash:generateContent",):
        request = (b"POST /authz" + path + b" HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer "
                   + key.encode() + b"\r\nContent-Length: 2\r\n\r\n{}")
        status, head, body = await send(direct, request)
        if path.endswith(b"/gemini-flash:generateContent"):
            assert status == 200, head     # the plain path: allowed (the check can fail)
        else:
            assert status == 403 and orjson.loads(body)["error"]["code"] == \
                "model_not_allowed", (path, head)


async def test_x_model_counts_only_from_a_trusted_proxy(direct, proxied, plane, http):
    _, key = await make(plane, unlimited=True, models=["gpt-a"])
    # The NGINX shape: no body reaches the sidecar, the proxy relays the body's model.
    assert refused(await authz(http, direct, CHAT, key=key, headers={"x-model": "gpt-a"}),
                   "model_not_allowed")
    assert (await authz(http, proxied, CHAT, key=key,
                        headers={"x-model": "gpt-a"})).status == 200
    # With the body in hand, the header cannot stand in for a model the body leaves out...
    assert refused(await authz(http, proxied, CHAT, key=key, headers={"x-model": "gpt-a"},
                               body={"messages": []}), "model_not_allowed")
    # ...nor contradict the body; agreeing with it is fine.
    assert refused(await authz(http, proxied, CHAT, key=key, headers={"x-model": "gpt-a"},
                               body={"model": "gpt-b"}), "model_not_allowed")
    assert refused(await authz(http, proxied, CHAT, key=key, headers={"x-model": "gpt-b"},
                               body={"model": "gpt-a"}), "model_not_allowed")
    assert (await authz(http, proxied, CHAT, key=key, headers={"x-model": "gpt-a"},
                        body={"model": "gpt-a"})).status == 200


DUPLICATES = {
    "plain": b'{"model": "gpt-b", "messages": [], "model": "gpt-a"}',
    "escaped key": b'{"mod\\u0065l": "gpt-b", "messages": [], "model": "gpt-a"}',
    "all escaped": b'{"\\u006d\\u006f\\u0064\\u0065\\u006C": "gpt-b", "model": "gpt-a"}',
}


@pytest.mark.parametrize("body", DUPLICATES.values(), ids=DUPLICATES.keys())
async def test_duplicate_model_keys_are_refused_for_whitelisted_keys(direct, plane, http,
                                                                     body):
    _, listed = await make(plane, unlimited=True, models=["gpt-a"])
    json_type = {"Content-Type": "application/json"}
    answer = await authz(http, direct, CHAT, key=listed, headers=json_type, body=body)
    assert refused(answer, "model_not_allowed"), answer.raw
    # Keys without a whitelist are not refused for it; nested "model"s are no duplicate.
    _, free = await make(plane, unlimited=True)
    assert (await authz(http, direct, CHAT, key=free, headers=json_type,
                        body=body)).status == 200
    nested = b'{"tools": [{"model": "gpt-b"}], "model": "gpt-a", "meta": {"model": "x"}}'
    assert (await authz(http, direct, CHAT, key=listed, headers=json_type,
                        body=nested)).status == 200


UNREADABLE = {
    # A nested "model" first, NaN (strict parsers fail; Python's json serves "gpt-b").
    "nan": ({}, b'{"metadata": {"model": "gpt-a"}, "t": NaN, "model": "gpt-b"}'),
    "gzip": ({"Content-Encoding": "gzip"}, gzip.compress(b'{"model": "gpt-a"}')),
    "cut by envoy": ({"x-envoy-auth-partial-body": "true"}, b'{"model": "gpt-a"}'),
    "multipart": ({"Content-Type": "multipart/form-data; boundary=b"},
                  b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-a\r\n'
                  b'--b--\r\n'),
}


@pytest.mark.parametrize("headers,body", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_unreadable_bodies_leave_the_model_uncertain(proxied, plane, http, headers,
                                                           body):
    _, listed = await make(plane, unlimited=True, models=["gpt-a"])
    sent = {"Content-Type": "application/json", **headers}
    answer = await authz(http, proxied, CHAT, key=listed, headers=sent, body=body)
    assert refused(answer, "model_not_allowed"), answer.raw
    # Not even a trusted x-model naming a listed model makes it certain.
    answer = await authz(http, proxied, CHAT, key=listed, body=body,
                         headers={**sent, "x-model": "gpt-a"})
    assert refused(answer, "model_not_allowed"), answer.raw
    _, free = await make(plane, unlimited=True)
    assert (await authz(http, proxied, CHAT, key=free, headers=sent, body=body)).status == 200
