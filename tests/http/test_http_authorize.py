"""The running sidecar over real sockets: every row of the contract's table, the three
proxy styles, the trusted-proxy rule, immediate revocation, recent activity, and the
official OpenAI / Anthropic SDKs raising their own error classes on our denials.

The decision table runs over both transports (the `ask` fixture): the HTTP edge and gRPC
ext_authz (Check), one decision path behind them.

Keys are made by the control plane (ControlStore) on the same Redis and pepper as the
sidecar process.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from conftest import free_port, start_sidecar, stop_process
from live import (
    CHAT,
    DENIAL_ROWS,
    MESSAGES,
    Transport,
    authz,
    balance,
    cli,
    denial_row,
    make,
    sdk_gateway,
)

from sidecar.schema.keys import KeyType

ANTHROPIC_TYPES = {401: "authentication_error", 402: "billing_error",
                   403: "permission_error", 429: "rate_limit_error"}


@pytest.fixture(scope="module")
def car(tmp_path_factory, redis_server):
    """A sidecar trusting no proxy (the default), with both transports on."""
    sidecar = start_sidecar(tmp_path_factory.mktemp("car"), redis_server.url,
                            grpc_listen=f"127.0.0.1:{free_port()}")
    yield sidecar
    stop_process(sidecar.proc)


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory, redis_server):
    """A sidecar whose proxy is 127.0.0.1 (so the test client is a trusted proxy)."""
    sidecar = start_sidecar(tmp_path_factory.mktemp("proxied"), redis_server.url,
                            trusted_proxies="127.0.0.1/32",
                            grpc_listen=f"127.0.0.1:{free_port()}")
    yield sidecar
    stop_process(sidecar.proc)


@pytest.fixture(params=["http", "grpc"])
async def ask(request, http):
    """The decision table runs over both transports of the data plane: the HTTP edge and
    gRPC ext_authz (Check), against the same running sidecar."""
    transport = Transport(request.param, http)
    yield transport
    await transport.close()


def assert_denial(answer, status: int, code: str, anthropic: bool = False) -> None:
    assert answer.status == status, (answer.status, answer.raw)
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json
    if anthropic:
        assert body["type"] == "error"
        assert body["error"]["type"] == (ANTHROPIC_TYPES[status] if status != 503
                                         else "api_error")
        assert body["error"]["message"]
    else:
        assert body["error"]["code"] == code
        assert body["error"]["message"] and body["error"]["type"]
    # NGINX drops auth bodies: the same JSON travels in one header line.
    assert answer.headers["x-auth-error"] == answer.raw.decode()
    assert "\n" not in answer.headers["x-auth-error"]


# -- the contract's table, row by row, in both dialects -------------------------------

@pytest.mark.parametrize("row,status", DENIAL_ROWS,
                         ids=[r for r, _ in DENIAL_ROWS])
async def test_each_denial_row_in_both_dialects(car, plane, ask, row, status):
    key, call = await denial_row(plane, row)
    code = row.split("/")[0]
    openai_answer = await ask(car, CHAT, key=key, **call)
    assert_denial(openai_answer, status, code)
    anthropic_answer = await ask(car, MESSAGES, api_key=key, **call)
    assert_denial(anthropic_answer, status, code, anthropic=True)
    if status == 401:
        assert "www-authenticate" in openai_answer.headers


async def test_allow_is_exactly_200_with_identity_and_reserves_quota(car, plane, ask):
    key_id, key = await make(plane, quota=2, rpm=100)
    answer = await ask(car, key=key, body={"model": "gpt-x"})
    assert answer.status == 200 and answer.raw == b""
    assert set(answer.removed) == {"authorization", "x-api-key"}   # the key stays at the edge
    assert answer.headers["x-key-id"] == key_id
    assert answer.headers["x-key-type"] == "standard"
    assert answer.headers["x-org-id"] == "" and answer.headers["x-project-id"] == ""
    assert answer.headers["x-ratelimit-limit-requests"] == "100"
    assert 0 <= int(answer.headers["x-ratelimit-remaining-requests"]) <= 99
    assert answer.headers["x-ratelimit-reset-requests"]
    assert "x-auth-error" not in answer.headers
    assert (await plane.key(None, key_id))["quota_remaining"] == 1


async def test_org_key_identity_and_restricted_scopes(car, plane, ask):
    org = (await plane.create_org("a"))["id"]
    project = (await plane.create_project(org, "b"))["id"]
    key_id, key = await make(plane, type=KeyType.org, unlimited=True, org=org,
                             project_id=project, permission="restricted",
                             scopes=["chat.completions:write"])
    allowed = await ask(car, key=key, body={"model": "gpt-x"})
    assert allowed.status == 200
    assert (allowed.headers["x-key-id"], allowed.headers["x-key-type"],
            allowed.headers["x-org-id"], allowed.headers["x-project-id"]) == (
        key_id, "org", org, project)
    # Without ratelimits no x-ratelimit-* header is sent.
    assert not any(h.startswith("x-ratelimit") for h in allowed.headers)
    denied = await ask(car, "/v1/embeddings", key=key, body={"model": "gpt-x"})
    assert_denial(denied, 403, "permission_denied")


async def test_read_only_key_reads_and_model_whitelist_rules(car, plane, ask):
    _, key = await make(plane, unlimited=True, permission="read-only", models=["gpt-x"])
    assert (await ask(car, "/v1/models", method="GET", key=key)).status == 200
    assert (await ask(car, "/v1/models/gpt-x", method="GET", key=key)).status == 200
    assert_denial(await ask(car, "/v1/models/gpt-y", method="GET", key=key),
                  403, "model_not_allowed")
    _, writer = await make(plane, unlimited=True, models=["gpt-x"])
    # A write call that names no model is refused when a whitelist applies.
    assert_denial(await ask(car, key=writer, body={"messages": []}),
                  403, "model_not_allowed")
    assert (await ask(car, key=writer, body={"model": "gpt-x"})).status == 200


async def test_rate_limited_with_retry_after(car, plane, ask):
    _, key = await make(plane, unlimited=True, rpm=2)
    assert (await ask(car, key=key, body={"model": "m"})).status == 200
    assert (await ask(car, key=key, body={"model": "m"})).status == 200
    for path, anthropic in ((CHAT, False), (MESSAGES, True)):
        denied = await ask(car, path, key=key, body={"model": "m"})
        assert_denial(denied, 429, "rate_limited", anthropic=anthropic)
        assert 1 <= int(denied.headers["retry-after"]) <= 60
        assert denied.headers["x-ratelimit-limit-requests"] == "2"
        assert denied.headers["x-ratelimit-remaining-requests"] == "0"


async def test_a_402_suggests_only_what_the_key_type_has(car, plane, ask):
    """PAYG fallback exists for subscription keys only: a standard or org key's 402 must
    not send its owner looking for it."""
    for spec in ({}, {"type": KeyType.org, "org": "default", "project_id": "default"},
                 {"type": KeyType.subscription, "account": "acct_9"}):
        _, key = await make(plane, quota=0, **spec)
        for path in (CHAT, MESSAGES):
            answer = await ask(car, path, key=key, body={"model": "m"})
            assert answer.status == 402, (spec, answer.raw)
            message = answer.json["error"]["message"]
            assert ("PAYG" in message) == (spec.get("type") is KeyType.subscription), message
            assert ("billing cycle" in message) == ("PAYG" in message), message


async def test_a_burst_gets_exactly_the_rpm_and_a_truthful_retry_after(car, plane, ask):
    """rpm 4 (a call every 15 s, at most 4 at once): ten calls at once, four pass, six
    get 429 whose Retry-After is when the next call fits: 15 s after the burst began,
    less the time it took (never earlier, rounded up to whole seconds)."""
    _, key = await make(plane, unlimited=True, rpm=4)
    began = time.time()
    answers = await asyncio.gather(*(ask(car, key=key, body={"model": "m"})
                                     for _ in range(10)))
    took = time.time() - began
    allowed = [a for a in answers if a.status == 200]
    denied = [a for a in answers if a.status == 429]
    assert (len(allowed), len(denied)) == (4, 6)
    assert sorted(a.headers["x-ratelimit-remaining-requests"] for a in allowed) == \
        ["0", "1", "2", "3"]
    for answer in denied:
        assert_denial(answer, 429, "rate_limited")
        assert 15 - took - 0.01 <= int(answer.headers["retry-after"]) <= 15
        assert answer.headers["x-ratelimit-remaining-requests"] == "0"
        # Whole again once all four have drained: a minute after the burst began.
        reset = answer.headers["x-ratelimit-reset-requests"]
        assert re.fullmatch(r"\d+(\.\d+)?s|1m0s", reset), reset


async def test_subscription_cycle_then_payg_wallet_then_402(car, plane, ask):
    key_id, key = await make(plane, type=KeyType.subscription, quota=1, account="acct_1",
                             payg_fallback=True)
    await plane.set_account_balance(None, "acct_1", 1)
    first = await ask(car, key=key, body={"model": "m"})
    assert first.status == 200 and first.headers["x-key-type"] == "subscription"
    assert (await ask(car, key=key, body={"model": "m"})).status == 200
    assert_denial(await ask(car, key=key, body={"model": "m"}), 402, "quota_exhausted")
    assert await balance(plane, "acct_1") == 0
    view = await plane.key(None, key_id)
    assert view["subscription"]["cycle_used"] == 1
    assert view["subscription"]["payg_used"] == 1


async def test_nothing_is_consumed_on_a_denial(car, plane, ask):
    key_id, key = await make(plane, quota=5, rpm=10, models=["gpt-x"])
    for _ in range(3):
        assert (await ask(car, key=key, body={"model": "other"})).status == 403
    view = await plane.key(None, key_id)
    assert view["quota_remaining"] == 5 and view["request_count"] == 0
    answer = await ask(car, key=key, body={"model": "gpt-x"})
    assert answer.headers["x-ratelimit-remaining-requests"] == "9"


# -- headers --------------------------------------------------------------------------

async def test_authorization_header_wins_over_x_api_key(car, plane, ask):
    key_id, key = await make(plane, unlimited=True)
    answer = await ask(car, key=key, api_key="sk-" + "B" * 40, body={"model": "m"})
    assert answer.status == 200 and answer.headers["x-key-id"] == key_id
    denied = await ask(car, key="sk-" + "B" * 40, api_key=key, body={"model": "m"})
    assert_denial(denied, 401, "invalid_api_key")


async def test_x_api_key_on_anthropic_messages(car, plane, ask):
    key_id, key = await make(plane, quota=1)
    body = {"model": "claude-x", "max_tokens": 8, "messages": []}
    answer = await ask(car, MESSAGES, api_key=key, body=body)
    assert answer.status == 200 and answer.headers["x-key-id"] == key_id
    assert_denial(await ask(car, MESSAGES, api_key=key, body=body),
                  402, "quota_exhausted", anthropic=True)
    assert (await plane.key(None, key_id))["last_model"] == "claude-x"


# -- the three proxy styles ------------------------------------------------------------

async def test_envoy_style_truncated_body_with_query(car, plane, ask):
    key_id, key = await make(plane, quota=5)
    truncated = b'{"model": "gpt-x", "messages": [{"role": "user", "content": "hel'
    headers = {"x-envoy-auth-partial-body": "true", "Content-Type": "application/json"}
    answer = await ask(car, "/v1/chat/completions?stream=true", key=key,
                         headers=headers, body=truncated)
    assert answer.status == 200 and answer.headers["x-key-id"] == key_id
    view = await plane.key(None, key_id)
    assert (view["last_model"], view["quota_remaining"]) == ("gpt-x", 4)
    # A model read from a cut-off body is uncertain (a second "model" may follow past the
    # cut): a key with a model whitelist refuses it on a write call, even a listed one.
    _, listed = await make(plane, unlimited=True, models=["gpt-x"])
    assert_denial(await ask(car, "/v1/chat/completions?x=1", key=listed,
                              headers=headers, body=truncated), 403, "model_not_allowed")
    whole = b'{"model": "gpt-x", "messages": []}'
    assert_denial(await ask(car, "/v1/chat/completions?x=1", key=listed,
                            headers=headers, body=whole), 403, "model_not_allowed")
    # Envoy says whether it cut the body; a whole one is certain.
    assert (await ask(car, "/v1/chat/completions?x=1", key=listed,
                      headers={**headers, "x-envoy-auth-partial-body": "false"},
                      body=whole)).status == 200


async def test_nginx_style_get_with_original_headers(behind_proxy, plane, http):
    _, reader = await make(plane, unlimited=True, permission="read-only")
    nginx = {"X-Original-Method": "POST", "X-Original-URI": "/v1/chat/completions?a=b",
             "X-Real-IP": "10.9.9.9", "x-model": "gpt-x"}
    # The subrequest is a GET, but the client's call is a write: the read-only key fails.
    assert_denial(await authz(http, behind_proxy, method="GET", key=reader, headers=nginx,
                              authz_path="/authz"), 403, "permission_denied")
    key_id, key = await make(plane, unlimited=True, models=["gpt-x"])
    assert (await authz(http, behind_proxy, method="GET", key=key, headers=nginx,
                        authz_path="/authz")).status == 200
    wrong = {**nginx, "x-model": "gpt-q"}
    assert_denial(await authz(http, behind_proxy, method="GET", key=key, headers=wrong,
                              authz_path="/authz"), 403, "model_not_allowed")
    # From a trusted proxy, X-Real-IP names the client (tests/http/test_forwarded_trust.py:
    # from anyone else, none of these headers count).
    assert (await plane.key(None, key_id))["last_ip"] == "10.9.9.9"
    # The Anthropic dialect follows the original URI, not /authz.
    anthropic = {**nginx, "X-Original-URI": "/v1/messages"}
    assert_denial(await authz(http, behind_proxy, method="GET", api_key=reader,
                              headers=anthropic, authz_path="/authz"), 403, "permission_denied",
                  anthropic=True)


async def test_traefik_style_forwarded_headers(behind_proxy, plane, http):
    key_id, key = await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8"], models=["gpt-x"],
                             permission="read-only")
    traefik = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/v1/models/gpt-x",
               "X-Forwarded-For": "10.4.5.6", "X-Forwarded-Proto": "https",
               "X-Forwarded-Host": "api.example"}
    ok = await authz(http, behind_proxy, method="GET", key=key, headers=traefik,
                     authz_path="/authz")
    assert ok.status == 200
    view = await plane.key(None, key_id)
    assert (view["last_ip"], view["last_model"]) == ("10.4.5.6", "gpt-x")
    write = {**traefik, "X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/v1/completions",
             "x-model": "gpt-x"}
    assert_denial(await authz(http, behind_proxy, method="GET", key=key, headers=write,
                              authz_path="/authz"), 403, "permission_denied")
    # A client-forged entry sits left of the one the proxy appended: it is not used.
    forged = {**traefik, "X-Forwarded-For": "10.1.1.1, 192.168.1.1"}
    assert_denial(await authz(http, behind_proxy, method="GET", key=key, headers=forged,
                              authz_path="/authz"), 403, "ip_not_allowed")


# -- trusted-proxy IP rule -------------------------------------------------------------

async def test_trusted_proxy_real_ip_decides(behind_proxy, plane, ask):
    _, key = await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8", "2001:db8::/32"])
    body = {"model": "m"}
    for ip in ("10.1.2.3", "2001:db8::7"):
        assert (await ask(behind_proxy, key=key, body=body,
                            headers={"X-Real-IP": ip})).status == 200
    for ip in ("192.168.1.1", "2001:db9::1"):
        assert_denial(await ask(behind_proxy, key=key, body=body,
                                  headers={"X-Real-IP": ip}), 403, "ip_not_allowed")
    assert (await ask(behind_proxy, key=key, body=body,
                        headers={"x-envoy-external-address": "10.7.7.7"})).status == 200


async def test_untrusted_peer_cannot_choose_its_ip(car, plane, ask):
    _, key = await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8"])
    for headers in ({"X-Real-IP": "10.1.2.3"}, {"X-Forwarded-For": "10.1.2.3"},
                    {"x-envoy-external-address": "10.1.2.3"}, {"x-client-ip": "10.1.2.3"}):
        assert_denial(await ask(car, key=key, body={"model": "m"}, headers=headers),
                      403, "ip_not_allowed")
    _, local = await make(plane, unlimited=True, allowed_ips=["127.0.0.1"])
    answer = await ask(car, key=local, body={"model": "m"},
                         headers={"X-Real-IP": "192.168.1.1"})
    assert answer.status == 200


# -- immediate revocation and recent activity ------------------------------------------

async def test_revocation_takes_effect_on_the_next_call(car, plane, ask, redis_url):
    body = {"model": "m"}
    key_id, key = await make(plane, unlimited=True)
    assert (await ask(car, key=key, body=body)).status == 200
    done = cli(redis_url, "keys", "disable", key_id, "--json")
    assert done.returncode == 0, done.stderr
    assert_denial(await ask(car, key=key, body=body), 401, "key_disabled")
    await plane.set_key_status(None, key_id, True)
    assert (await ask(car, key=key, body=body)).status == 200

    done = cli(redis_url, "keys", "set-quota", key_id, "0", "--json")
    assert done.returncode == 0, done.stderr
    assert_denial(await ask(car, key=key, body=body), 402, "quota_exhausted")
    await plane.set_key_quota(None, key_id, set_to=1)
    assert (await ask(car, key=key, body=body)).status == 200

    await plane.set_key_quota(None, key_id, unlimited=True)
    assert (await ask(car, key=key, body=body)).status == 200
    done = cli(redis_url, "keys", "delete", key_id)
    assert done.returncode == 0, done.stderr
    assert_denial(await ask(car, key=key, body=body), 401, "invalid_api_key")

    other_id, other = await make(plane, unlimited=True)
    assert (await ask(car, key=other, body=body)).status == 200
    await plane.delete_key(None, other_id)
    assert_denial(await ask(car, key=other, body=body), 401, "invalid_api_key")


async def test_recent_activity_is_recorded(behind_proxy, plane, ask):
    key_id, key = await make(plane, quota=10)
    before = datetime.now(UTC) - timedelta(seconds=5)
    assert (await plane.key(None, key_id))["last_used_at"] is None
    for ip, model in (("10.0.0.1", "gpt-a"), ("10.0.0.2", "gpt-b"), ("10.0.0.3", "gpt-c")):
        answer = await ask(behind_proxy, key=key, body={"model": model},
                             headers={"X-Real-IP": ip})
        assert answer.status == 200
    view = await plane.key(None, key_id)
    assert view["request_count"] == 3 and view["quota_used"] == 3
    assert (view["last_ip"], view["last_model"]) == ("10.0.0.3", "gpt-c")
    last = datetime.fromisoformat(view["last_used_at"].replace("Z", "+00:00"))
    assert before <= last <= datetime.now(UTC) + timedelta(seconds=5)


# -- the official SDKs -----------------------------------------------------------------

async def _sdk_keys(plane) -> dict[str, str]:
    keys = {"ok": (await make(plane, unlimited=True))[1],
            "unknown": "sk-" + "Z" * 40,
            "forbidden": (await make(plane, unlimited=True, models=["other"]))[1],
            "no_quota": (await make(plane, quota=0))[1]}
    _, limited = await make(plane, unlimited=True, rpm=1)
    keys["limited"] = limited
    return keys


async def test_openai_sdk_raises_its_own_errors(car, plane):
    import openai
    keys = await _sdk_keys(plane)
    runner, url = await sdk_gateway(car)
    try:
        def client(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(api_key=key, base_url=url + "/v1", max_retries=0,
                                      timeout=10)

        async def chat(key: str):
            return await client(key).chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": "hi"}])

        assert (await chat(keys["ok"])).choices[0].message.content == "ok"
        with pytest.raises(openai.AuthenticationError) as err:
            await chat(keys["unknown"])
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        with pytest.raises(openai.PermissionDeniedError) as err:
            await chat(keys["forbidden"])
        assert err.value.code == "model_not_allowed"
        with pytest.raises(openai.APIStatusError) as err:
            await chat(keys["no_quota"])
        assert err.value.status_code == 402 and err.value.code == "quota_exhausted"
        assert err.value.body["code"] == "quota_exhausted"
        await chat(keys["limited"])
        with pytest.raises(openai.RateLimitError) as err:
            await chat(keys["limited"])
        assert err.value.code == "rate_limited"
        assert int(err.value.response.headers["retry-after"]) >= 1
    finally:
        await runner.cleanup()


async def test_anthropic_sdk_raises_its_own_errors(car, plane):
    import anthropic
    keys = await _sdk_keys(plane)
    runner, url = await sdk_gateway(car)
    try:
        async def message(key: str):
            client = anthropic.AsyncAnthropic(api_key=key, base_url=url, max_retries=0,
                                              timeout=10)
            return await client.messages.create(
                model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])

        assert (await message(keys["ok"])).content[0].text == "ok"
        with pytest.raises(anthropic.AuthenticationError) as err:
            await message(keys["unknown"])
        assert err.value.status_code == 401
        with pytest.raises(anthropic.PermissionDeniedError):
            await message(keys["forbidden"])
        with pytest.raises(anthropic.APIStatusError) as err:
            await message(keys["no_quota"])
        assert err.value.status_code == 402
        assert err.value.body["error"]["type"] == "billing_error"
        await message(keys["limited"])
        with pytest.raises(anthropic.RateLimitError):
            await message(keys["limited"])
    finally:
        await runner.cleanup()
