"""Budgets in money on a running sidecar: prices from the config, the worst case reserved
at authorize time from the body (or a trusted x-prompt-tokens), 402 budget_exhausted
naming the level, POST /settle with the upstream's own usage object, the admin API and
the CLI, and the official SDKs' error classes for the new codes.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
from admin_helpers import start_plane, stop_plane
from live import CLIENT_TIMEOUT, authz, metric_value, sdk_gateway

TOKEN = "budget-settle-token-0123456789"
PRICES = json.dumps({"gpt-p": {"input": "2.00", "output": "10.00", "cached_input": "0.50"},
                     "claude-p": {"input": "3.00", "output": "15.00"}})


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    p = start_plane(tmp_path_factory.mktemp("budgets"), settlement_token=TOKEN,
                    prices=PRICES, trusted_proxies="127.0.0.1/32",
                    default_max_output_tokens="1000", prompt_bytes_per_token="4")
    yield p
    stop_plane(p)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def project(plane, **limits) -> str:
    made = plane.ok("POST", "/projects", {"name": f"p{len(limits)}-{id(limits)}"})
    if limits:
        plane.ok("PUT", f"/projects/{made['id']}/limits", limits)
    return made["id"]


def key(plane, project_id: str, **req) -> tuple[str, str]:
    made = plane.ok("POST", "/keys", {"owner": "project", "project_id": project_id,
                                      "unlimited": True, **req}, status=201)
    return made["id"], made["key"]


def chat(max_tokens: int | None = None, model: str = "gpt-p") -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def worst_case(body: dict, input_price: int = 2, output_price: int = 10) -> int:
    """Micro-units the sidecar reserves for `body` (prompt = bytes / 4, rounded up)."""
    size = len(json.dumps(body, separators=(",", ":")).encode())
    prompt = -(-size // 4)
    return prompt * input_price + (body.get("max_tokens") or 1000) * output_price


async def settle(http, plane, report: dict) -> tuple[int, dict]:
    async with http.post(plane.car.url + "/settle", json=report, timeout=CLIENT_TIMEOUT,
                         headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_the_worst_case_is_reserved_and_the_real_usage_settled(plane, http):
    """Budget 0.011 on the key: a call capped at 500 output tokens reserves about 0.005,
    so two fit and the third is refused (402, param key); settling the first at its real
    usage (OpenAI's usage object) frees the rest of its reservation."""
    prj = project(plane)
    key_id, plaintext = key(plane, prj, budget="0.011")
    body = chat(max_tokens=500)
    held = worst_case(body)
    rids = []
    for _ in range(2):
        answer = await authz(http, plane.car, key=plaintext, body=body)
        assert answer.status == 200
        rids.append(answer.headers["x-reservation-id"])
    denied = await authz(http, plane.car, key=plaintext, body=body)
    assert denied.status == 402 and denied.code == "budget_exhausted"
    assert denied.json["error"]["param"] == "key"
    shown = plane.ok("GET", f"/keys/{key_id}/limits")
    assert shown["reserved"] == f"0.{2 * held:06d}".rstrip("0").ljust(4, "0")
    status, done = await settle(http, plane, {
        "reservation_id": rids[0], "key_id": key_id, "model": "gpt-p",
        "usage": {"prompt_tokens": 10, "completion_tokens": 20,
                  "prompt_tokens_details": {"cached_tokens": 4}}})
    assert status == 200
    charged = 6 * 2 + 4 * 0.5 + 20 * 10          # 214 micro-units: cached input is cheaper
    assert done["money"] == {"reserved": f"0.{held:06d}".rstrip("0").ljust(4, "0"),
                             "charged": "0.000214"}
    assert charged == 214
    shown = plane.ok("GET", f"/keys/{key_id}/limits")
    assert shown["spent"] == "0.000214"
    assert (await authz(http, plane.car, key=plaintext, body=body)).status == 200


async def test_a_trusted_prompt_count_and_anthropic_usage(plane, http):
    """x-prompt-tokens from a trusted proxy sets the prompt part of the reservation;
    Anthropic's usage (input, cache reads, output) is priced per kind."""
    prj = project(plane)
    key_id, plaintext = key(plane, prj, budget="1.00")
    body = {"model": "claude-p", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]}
    answer = await authz(http, plane.car, "/v1/messages", key=plaintext, body=body,
                         headers={"x-prompt-tokens": "2000"})
    assert answer.status == 200
    assert plane.ok("GET", f"/keys/{key_id}/limits")["reserved"] == "0.0075"   # 6000+1500
    status, done = await settle(http, plane, {
        "reservation_id": answer.headers["x-reservation-id"], "key_id": key_id,
        "model": "claude-p", "usage": {"input_tokens": 100, "cache_read_input_tokens": 50,
                                       "output_tokens": 10}})
    assert status == 200
    # No cached price for claude-p: cache reads at the input price. 150*3 + 10*15 = 600.
    assert done["money"]["charged"] == "0.0006"


async def test_a_project_budget_refuses_every_key_of_the_project(plane, http):
    prj = project(plane, budget="0.02")
    keys = [key(plane, prj)[1] for _ in range(3)]
    body = chat(max_tokens=900)            # about 0.009 each
    results = [(await authz(http, plane.car, key=k, body=body)).status for k in keys]
    assert results == [200, 200, 402]
    denied = await authz(http, plane.car, key=keys[0], body=body)
    assert denied.json["error"]["param"] == "project"
    assert "project's budget" in denied.json["error"]["message"]


async def test_unpriced_models_only_matter_under_a_budget(plane, http):
    prj = project(plane)
    _, free = key(plane, prj)
    _, budgeted = key(plane, prj, budget="5.00")
    assert (await authz(http, plane.car, key=free, body=chat(model="other"))).status == 200
    denied = await authz(http, plane.car, key=budgeted, body=chat(model="other"))
    assert denied.status == 400 and denied.code == "model_not_priced"


async def test_observe_only_budgets_count_shadow_denials(plane, http):
    prj = project(plane, budget="0.001", observe=["budget"])
    _, plaintext = key(plane, prj)
    before = metric_value(await _metrics(http, plane), "sidecar_shadow_denials_total",
                          {"code": "budget_exhausted"})
    answer = await authz(http, plane.car, key=plaintext, body=chat(max_tokens=500))
    assert answer.status == 200
    after = metric_value(await _metrics(http, plane), "sidecar_shadow_denials_total",
                         {"code": "budget_exhausted"})
    assert after == before + 1


async def _metrics(http, plane) -> str:
    async with http.get(plane.car.admin_url + "/metrics", timeout=CLIENT_TIMEOUT) as resp:
        return await resp.text()


@pytest.mark.parametrize("body, param", [
    ({"budget": 5.0}, "budget"), ({"budget": "5.0000001"}, "budget"),
    ({"budget": "-1"}, "budget"), ({"budget_period": "week"}, "budget_period"),
    ({"max_concurrency": -1}, "max_concurrency"), ({"observe": ["all"]}, "observe"),
    ({}, None)])
def test_bad_limits_are_a_400_naming_the_field(plane, body, param):
    prj = project(plane)
    reply = plane.admin("PUT", f"/projects/{prj}/limits", body)
    assert reply.status == 400, reply.body
    if param:
        assert reply.param.startswith(param)


def test_limits_of_every_level_and_the_audit_log(plane):
    prj = project(plane)
    shown = plane.ok("PUT", f"/projects/{prj}/limits",
                     {"budget": "12.50", "budget_period": "month", "max_concurrency": 4})
    assert shown == {"budget": "12.50", "budget_period": "month", "spent": "0.00",
                     "reserved": "0.00", "remaining": "12.50", "max_concurrency": 4,
                     "in_flight": 0, "observe": []}
    assert plane.ok("GET", f"/projects/{prj}/limits") == shown
    assert plane.ok("PUT", "/organization/limits", {"budget": "100"})["budget"] == "100.00"
    assert plane.ok("PUT", f"/members/{plane.member}/limits",
                    {"budget": "1.5"})["remaining"] == "1.50"
    assert plane.ok("PUT", f"/projects/{prj}/limits", {"budget": None})["budget"] is None
    events = plane.ok("GET", "/audit_logs?action=project.limits_changed")["data"]
    assert events[0]["resource"]["id"] == prj
    assert events[0]["before"]["budget"] == "12.50" and events[0]["after"]["budget"] is None
    assert plane.admin("GET", "/projects/prj_nope/limits").status == 404


def test_the_cli_sets_and_shows_budgets(plane):
    prj = project(plane)
    done = plane.cli("projects", "set-budget", prj, "7.25", "--budget-period", "day",
                     "--org", plane.org, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["budget"] == "7.25"
    shown = json.loads(plane.cli("projects", "show", prj, "--org", plane.org,
                                 "--json").stdout)
    assert shown["limits"]["budget_period"] == "day"
    bad = plane.cli("projects", "set-budget", prj, "seven", "--org", plane.org)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "budget" in bad.stderr
    assert "Traceback" not in bad.stderr
    made = plane.cli("keys", "create", "--name", "b", "--quota", "5", "--budget", "2.00",
                     "--budget-period", "month", "--max-concurrency", "3", "--json")
    assert made.returncode == 0, made.stderr
    key_id = json.loads(made.stdout)["id"]
    shown = json.loads(plane.cli("keys", "show", key_id, "--json").stdout)["limits"]
    assert (shown["budget"], shown["budget_period"], shown["max_concurrency"]) == \
        ("2.00", "month", 3)


async def test_the_sdks_raise_their_own_errors_for_the_new_codes(plane):
    import anthropic
    import openai
    prj = project(plane, budget="0.000001")
    _, broke = key(plane, prj)
    _, busy = key(plane, project(plane), max_concurrency=1)
    runner, url = await sdk_gateway(plane.car)
    try:
        client = openai.AsyncOpenAI(api_key=broke, base_url=url + "/v1", max_retries=0,
                                    timeout=10)
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="gpt-p", messages=[
                {"role": "user", "content": "hi"}])
        assert err.value.status_code == 402 and err.value.code == "budget_exhausted"
        assert err.value.param == "project"
        # One call in flight (never settled) holds the only slot.
        busy_client = openai.AsyncOpenAI(api_key=busy, base_url=url + "/v1",
                                         max_retries=0, timeout=10)
        await busy_client.chat.completions.create(model="gpt-p", messages=[])
        with pytest.raises(openai.RateLimitError) as err:
            await busy_client.chat.completions.create(model="gpt-p", messages=[])
        assert err.value.code == "concurrency_limited"
        assert err.value.response.headers["retry-after"] == "1"
        claude = anthropic.AsyncAnthropic(api_key=broke, base_url=url, max_retries=0,
                                          timeout=10)
        with pytest.raises(anthropic.APIStatusError) as err:
            await claude.messages.create(model="claude-p", max_tokens=8, messages=[
                {"role": "user", "content": "hi"}])
        assert err.value.status_code == 402
        assert err.value.body["error"]["type"] == "billing_error"
        busy_claude = anthropic.AsyncAnthropic(api_key=busy, base_url=url, max_retries=0,
                                               timeout=10)
        with pytest.raises(anthropic.RateLimitError):
            await busy_claude.messages.create(model="claude-p", max_tokens=8, messages=[])
    finally:
        await runner.cleanup()


def test_only_managers_set_budgets_and_a_member_cannot_raise_their_own(plane):
    """A member's admin key (all scopes) may read, not change, the budgets above it: its
    own member budget, its project's and the organization's stay as a manager set them."""
    member = plane.ok("POST", "/members", {"user": "budget-member@example.com",
                                           "role": "member"})
    prj = project(plane, budget="1.00")
    plane.ok("PUT", f"/members/{member['id']}/limits", {"budget": "2.00"})
    made = plane.cli("admin", "create-key", "--org", plane.org, "--member", member["id"],
                     "--json")
    assert made.returncode == 0, made.stderr
    own = json.loads(made.stdout)["key"]
    for path in (f"/members/{member['id']}/limits", f"/projects/{prj}/limits",
                 "/organization/limits"):
        assert plane.admin("GET", path, key=own).status == 200
        refused = plane.admin("PUT", path, {"budget": "1000000"}, key=own)
        assert (refused.status, refused.code) == (403, "permission_denied"), path
    assert plane.ok("GET", f"/members/{member['id']}/limits")["budget"] == "2.00"
    assert plane.ok("GET", f"/projects/{prj}/limits")["budget"] == "1.00"


def test_a_member_cannot_raise_the_budget_of_their_own_user_key(plane):
    """A member may put a budget on a user key they make, never raise it after: budgets
    are what managers hold members to (the owner can)."""
    member = plane.ok("POST", "/members", {"user": "key-owner@example.com", "role": "member"})
    prj = project(plane)
    made = plane.cli("admin", "create-key", "--org", plane.org, "--member", member["id"],
                     "--json")
    own = json.loads(made.stdout)["key"]
    user_key = plane.ok("POST", "/keys", {"owner": "user", "project_id": prj,
                                          "unlimited": True, "budget": "1.00"},
                        key=own, status=201)
    refused = plane.admin("PUT", f"/keys/{user_key['id']}/limits", {"budget": "500"},
                          key=own)
    assert (refused.status, refused.code) == (403, "permission_denied")
    assert plane.ok("GET", f"/keys/{user_key['id']}/limits")["budget"] == "1.00"
    assert plane.ok("PUT", f"/keys/{user_key['id']}/limits",
                    {"budget": "5.00"})["budget"] == "5.00"
