"""Usage settlement (POST /settle) on a real sidecar and a real Redis: refunds, overages,
subscription cycles and the PAYG wallet, tokens per minute, idempotency by request id
(retried and racing reports), and bad reports that must change nothing.

The sidecar reserves `model_costs` at authorize time; the report says what the call cost.
"""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from conftest import start_sidecar, stop_process
from live import CLIENT_TIMEOUT, authz, avoid_minute_edge, metric_value

from sidecar.keys import KeyType
from sidecar.settle import BadReport, Report, actual_cost, parse_report
from sidecar.store import names
from sidecar.store.keystore import KeySpec

TOKEN = "settle-token-0123456789"
BIG = "gpt-big"            # reserves 10 units
PRICED = "gpt-priced"      # reserves 1 unit; settles at 2 units per 1000 tokens


@pytest.fixture(scope="module")
def car(tmp_path_factory, redis_server):
    sidecar = start_sidecar(tmp_path_factory.mktemp("settle"), redis_server.url,
                            settlement_token=TOKEN, model_costs=f"{BIG}=10",
                            token_costs=f"{PRICED}=2")
    yield sidecar
    stop_process(sidecar.proc)


async def settle(http, car, report: dict | bytes, token: str | None = TOKEN,
                 method: str = "POST") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs = {"json": report} if isinstance(report, dict) else {"data": report}
    async with http.request(method, car.url + "/settle", headers=headers,
                            timeout=CLIENT_TIMEOUT, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def make(store, **spec) -> tuple[str, str]:
    view, plaintext = await store.create(KeySpec(**spec))
    return view["id"], plaintext


async def allowed(http, car, key: str, model: str = BIG) -> None:
    answer = await authz(http, car, key=key, body={"model": model, "messages": []})
    assert answer.status == 200, answer.raw


# -- pure: the report and its price -----------------------------------------------------

@pytest.mark.parametrize("body,field", [
    (b"{", "body"), (b"[1]", "body"),
    (b'{"key_id":"key_1"}', "request_id"),
    (b'{"request_id":"a b","key_id":"key_1"}', "request_id"),
    (b'{"request_id":"r"}', "key / key_id"),
    (b'{"request_id":"r","key":"sk-short"}', "key"),
    (b'{"request_id":"r","key_id":"key_1","prompt_tokens":-1}', "prompt_tokens"),
    (b'{"request_id":"r","key_id":"key_1","completion_tokens":1.5}', "completion_tokens"),
    (b'{"request_id":"r","key_id":"key_1","cost":true}', "cost"),
    (b'{"request_id":"r","key_id":"key_1","reserved":-3}', "reserved"),
])
def test_parse_report_names_the_bad_field(body, field):
    with pytest.raises(BadReport, match=f"^{field}"):
        parse_report(body)


def test_actual_cost_prefers_cost_then_token_price_then_reserved():
    def report(**kw):
        return Report("r", None, "key_1", kw.get("model", "m"), kw.get("tokens", 0),
                      kw.get("cost"))
    assert actual_cost(report(cost=7, tokens=5000, model="m"), 10, {"m": 2}) == 7
    assert actual_cost(report(tokens=1500, model="m"), 10, {"m": 2}) == 3
    assert actual_cost(report(tokens=1, model="m"), 10, {"m": 2}) == 1   # rounded up
    assert actual_cost(report(tokens=1500, model="other"), 10, {"m": 2}) == 10


# -- the endpoint -----------------------------------------------------------------------

async def test_refund_returns_the_unused_reservation(car, store, http):
    key_id, key = await make(store, quota=100)
    await allowed(http, car, key)
    assert (await store.get(key_id))["quota_remaining"] == 90
    status, body = await settle(http, car, {"request_id": "req-refund", "key": key,
                                            "model": BIG, "cost": 3})
    assert status == 200 and body["status"] == "settled"
    assert (body["reserved"], body["actual"], body["delta"]) == (10, 3, -7)
    view = await store.get(key_id)
    assert (view["quota_remaining"], view["quota_used"]) == (97, 3)


async def test_overage_is_charged_even_past_the_quota(car, store, http):
    key_id, key = await make(store, quota=20)
    await allowed(http, car, key)
    status, body = await settle(http, car, {"request_id": "req-over", "key_id": key_id,
                                            "model": BIG, "cost": 25})
    assert status == 200 and body["delta"] == 15
    view = await store.get(key_id)
    assert (view["quota_remaining"], view["quota_used"]) == (-5, 25)
    # The call was served, so the overage is owed: the next call is refused.
    answer = await authz(http, car, key=key, body={"model": BIG})
    assert answer.status == 402 and answer.json["error"]["code"] == "quota_exhausted"


async def test_tokens_priced_per_model_when_no_cost_is_given(car, store, http):
    key_id, key = await make(store, quota=50)
    await allowed(http, car, key, model=PRICED)          # reserves the default 1 unit
    status, body = await settle(http, car, {"request_id": "req-priced", "key": key,
                                            "model": PRICED, "prompt_tokens": 1000,
                                            "completion_tokens": 500})
    assert status == 200 and (body["reserved"], body["actual"]) == (1, 3)
    assert (await store.get(key_id))["quota_remaining"] == 47


async def test_reserved_units_given_by_the_report(car, store, http):
    """A call whose cost came from a trusted cost header reserved that cost, not the
    model's: the gateway says so in `reserved`."""
    key_id, key = await make(store, quota=100)
    await store.set_quota(key_id, 70)            # as if a cost header had reserved 30
    status, body = await settle(http, car, {"request_id": "req-res", "key": key,
                                            "model": BIG, "reserved": 30, "cost": 12})
    assert status == 200 and (body["reserved"], body["delta"]) == (30, -18)
    assert (await store.get(key_id))["quota_remaining"] == 88


async def test_unlimited_key_only_counts_usage(car, store, http):
    key_id, key = await make(store, unlimited=True)
    await allowed(http, car, key)
    status, body = await settle(http, car, {"request_id": "req-unl", "key": key,
                                            "model": BIG, "cost": 4})
    assert status == 200 and body["delta"] == -6
    view = await store.get(key_id)
    assert view["quota_remaining"] is None and view["quota_used"] == 4


async def test_subscription_cycle_then_wallet_for_the_overage(car, store, http):
    key_id, key = await make(store, type=KeyType.subscription, quota=50, account="acct-s",
                             payg_fallback=True)
    await store.set_balance("acct-s", 100)
    await allowed(http, car, key)                                   # cycle used 10
    await settle(http, car, {"request_id": "s1", "key": key, "model": BIG, "cost": 4})
    assert (await store.get(key_id))["subscription"]["cycle_used"] == 4   # refund: 6
    await allowed(http, car, key)                                   # cycle used 14
    status, body = await settle(http, car, {"request_id": "s2", "key": key, "model": BIG,
                                            "cost": 60})
    # 14 + 50 = 64 > 50: the cycle fills up, the 14 beyond it come from the wallet.
    assert status == 200 and (body["delta"], body["from_wallet"]) == (50, 14)
    sub = (await store.get(key_id))["subscription"]
    assert (sub["cycle_used"], sub["payg_used"]) == (50, 14)
    assert await store.balance("acct-s") == 86


async def test_retried_report_is_settled_once(car, store, http):
    key_id, key = await make(store, quota=100)
    await allowed(http, car, key)
    report = {"request_id": "req-retry", "key": key, "model": BIG, "cost": 2}
    first = await settle(http, car, report)
    again = await settle(http, car, report)
    by_id = await settle(http, car, {"request_id": "req-retry", "key_id": key_id,
                                     "model": BIG, "cost": 2})
    assert first[1]["status"] == "settled"
    assert again == (200, {"request_id": "req-retry", "status": "already_settled"})
    assert by_id[1]["status"] == "already_settled"    # same key, same request id
    assert (await store.get(key_id))["quota_remaining"] == 98


async def test_same_request_id_of_another_key_is_its_own_report(car, store, http):
    id_a, key_a = await make(store, quota=100)
    id_b, key_b = await make(store, quota=100)
    for key in (key_a, key_b):
        await allowed(http, car, key)
        status, body = await settle(http, car, {"request_id": "shared-id", "key": key,
                                                "model": BIG, "cost": 1})
        assert status == 200 and body["status"] == "settled"
    assert [(await store.get(i))["quota_remaining"] for i in (id_a, id_b)] == [99, 99]


async def test_racing_reports_of_one_request_apply_exactly_once(car, store, http):
    key_id, key = await make(store, quota=1000)
    for _ in range(5):
        await allowed(http, car, key)                               # 950 left
    same = {"request_id": "req-race", "key": key, "model": BIG, "cost": 0}
    distinct = [{"request_id": f"req-{i}", "key": key, "model": BIG, "cost": 30}
                for i in range(4)]
    answers = await asyncio.gather(*(settle(http, car, same) for _ in range(24)),
                                   *(settle(http, car, r) for r in distinct))
    statuses = [body["status"] for _, body in answers[:24]]
    assert statuses.count("settled") == 1 and statuses.count("already_settled") == 23
    assert all(body["status"] == "settled" for _, body in answers[24:])
    # one refund of 10, four overages of 20 each
    assert (await store.get(key_id))["quota_remaining"] == 950 + 10 - 4 * 20


async def test_reported_tokens_fill_the_tokens_per_minute_limit(car, store, http):
    avoid_minute_edge(5)
    key_id, key = await make(store, unlimited=True, tpm=100)
    first = await authz(http, car, key=key, body={"model": BIG})
    assert first.status == 200 and first.headers["x-ratelimit-remaining-tokens"] == "100"
    await settle(http, car, {"request_id": "t1", "key": key, "model": BIG,
                             "prompt_tokens": 30, "completion_tokens": 30})
    second = await authz(http, car, key=key, body={"model": BIG})
    assert second.status == 200 and second.headers["x-ratelimit-remaining-tokens"] == "40"
    await settle(http, car, {"request_id": "t2", "key": key, "model": BIG,
                             "prompt_tokens": 40})
    limited = await authz(http, car, key=key, body={"model": BIG})
    assert limited.status == 429 and limited.json["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 60


BAD = [
    ("wrong token", {"request_id": "b", "model": BIG, "cost": 0}, "nope" * 6, 401),
    ("no token", {"request_id": "b", "model": BIG, "cost": 0}, None, 401),
    ("bad json", b'{"request_id": "b", "key', TOKEN, 400),
    ("no request id", {"model": BIG, "cost": 0}, TOKEN, 400),
    ("negative tokens", {"request_id": "b", "model": BIG, "prompt_tokens": -5}, TOKEN, 400),
    ("negative cost", {"request_id": "b", "model": BIG, "cost": -1}, TOKEN, 400),
    ("unknown key", {"request_id": "b", "key": "sk-" + "Z" * 40, "cost": 0}, TOKEN, 422),
    ("unknown key id", {"request_id": "b", "key_id": "key_nope", "cost": 0}, TOKEN, 422),
    ("too large", {"request_id": "b", "model": "x" * 20_000}, TOKEN, 413),
]


@pytest.mark.parametrize("what,report,token,status", BAD, ids=[b[0] for b in BAD])
async def test_bad_reports_get_4xx_and_change_nothing(car, store, http, aredis,
                                                      what, report, token, status):
    key_id, key = await make(store, quota=100, tpm=1000)
    await allowed(http, car, key)
    if isinstance(report, dict) and "key" not in report and "key_id" not in report:
        report = {**report, "key": key}
    key_hash, before = await store.record(key_id)
    got, body = await settle(http, car, report, token=token)
    assert got == status, body
    assert body["error"]["code"] and body["error"]["message"]
    assert (await store.record(key_id))[1] == before
    assert await aredis.exists(names.settlement(key_hash, "b")) == 0


async def test_wrong_method(car, http):
    status, body = await settle(http, car, {"request_id": "x"}, method="GET")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


async def test_endpoint_is_off_without_a_token(tmp_path, redis_url, http):
    plain = start_sidecar(tmp_path, redis_url)
    try:
        status, _ = await settle(http, plain, {"request_id": "x", "key_id": "k"})
        assert status == 404
    finally:
        stop_process(plain.proc)


async def test_settlements_are_counted_without_key_labels(car, store, http):
    key_id, key = await make(store, quota=10)
    await allowed(http, car, key)
    await settle(http, car, {"request_id": "m1", "key": key, "model": BIG, "cost": 1})
    with urllib.request.urlopen(car.admin_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert metric_value(text, "sidecar_settlements_total", {"result": "refund"}) >= 1
    assert key not in text and key_id not in text
