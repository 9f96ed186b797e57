"""Usage settlement (POST /settle) on a real sidecar and a real Redis: each allowed call's
reservation (x-reservation-id) settled once, refunds bounded by what it reserved and
given back where it was taken from, overages, subscription cycles and the PAYG wallet,
tokens per minute, and reports that must change nothing (forged, replayed, of another
key, malformed).

The sidecar reserves `model_costs` (or a trusted cost header) at authorize time; the
report names the reservation and says what the call cost.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.request

import orjson
import pytest
from conftest import start_sidecar, stop_process
from live import CLIENT_TIMEOUT, authz, balance, hash_of, make, metric_value, raw_record

from sidecar.dataplane.settle import BadReport, Report, actual_cost, parse_report
from sidecar.schema import names
from sidecar.schema.keys import RESERVATION_ID, KeyType

TOKEN = "settle-token-0123456789"
BIG = "gpt-big"            # reserves 10 units
PRICED = "gpt-priced"      # reserves 1 unit; settles at 2 units per 1000 tokens
RID = "rsv_" + "0" * 32


@pytest.fixture(scope="module")
def car(tmp_path_factory, redis_server):
    sidecar = start_sidecar(tmp_path_factory.mktemp("settle"), redis_server.url,
                            settlement_token=TOKEN, model_costs=f"{BIG}=10",
                            token_costs=f"{PRICED}=2", cost_header="x-cost",
                            trusted_proxies="127.0.0.1/32", reservation_ttl_s=900)
    yield sidecar
    stop_process(sidecar.proc)


async def settle(http, car, report: dict | bytes, token: str | None = TOKEN,
                 method: str = "POST") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs = {"json": report} if isinstance(report, dict) else {"data": report}
    async with http.request(method, car.url + "/settle", headers=headers,
                            timeout=CLIENT_TIMEOUT, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def allowed(http, car, key: str, model: str = BIG, **headers: str) -> str:
    """One allowed call; its reservation id."""
    answer = await authz(http, car, key=key, body={"model": model, "messages": []},
                         headers=headers)
    assert answer.status == 200, answer.raw
    assert RESERVATION_ID.fullmatch(answer.headers["x-reservation-id"])
    return answer.headers["x-reservation-id"]


async def quota(plane, key_id: str) -> tuple[int, int]:
    view = await plane.key(None, key_id)
    return view["quota_remaining"], view["quota_used"]


# -- pure: the report and its price -----------------------------------------------------

def body(**fields) -> bytes:
    return orjson.dumps({"reservation_id": RID, "key_id": "key_1", **fields})


@pytest.mark.parametrize("body,field", [
    (b"{", "body"), (b"[1]", "body"),
    (b'{"key_id":"key_1"}', "reservation_id"),
    (body(reservation_id="req-1"), "reservation_id"),
    (body(reservation_id=RID.upper()), "reservation_id"),
    (body(reservation_id=RID + "."), "reservation_id"),
    (body(reservation_id=RID + " "), "reservation_id"),
    (body(reserved=1000), "reserved"),
    (orjson.dumps({"reservation_id": RID}), "key / key_id"),
    (body(key_id=None, key="sk-short"), "key"),
    (body(prompt_tokens=-1), "prompt_tokens"),
    (body(completion_tokens=1.5), "completion_tokens"),
    (body(cost=True), "cost"),
])
def test_parse_report_names_the_bad_field(body, field):
    with pytest.raises(BadReport, match=f"^{field}"):
        parse_report(body)


def test_actual_cost_prefers_cost_then_token_price_then_the_reservation():
    def report(**kw):
        return Report(RID, None, "key_1", kw.get("model", "m"), kw.get("tokens", 0),
                      kw.get("cost"))
    assert actual_cost(report(cost=7, tokens=5000, model="m"), {"m": 2}) == 7
    assert actual_cost(report(tokens=1500, model="m"), {"m": 2}) == 3
    assert actual_cost(report(tokens=1, model="m"), {"m": 2}) == 1   # rounded up
    assert actual_cost(report(tokens=1500, model="other"), {"m": 2}) is None


# -- the reservation ----------------------------------------------------------------------

async def test_each_allowed_call_records_its_own_reservation(car, plane, http, aredis):
    key_id, key = await make(plane, quota=100)
    ids = {await allowed(http, car, key) for _ in range(3)}
    assert len(ids) == 3
    key_hash = hash_of(key)
    for rid in ids:
        name = names.reservation(key_hash, rid)
        assert await aredis.get(name) == b"10 q"
        assert 0 < await aredis.pttl(name) <= 900_000       # reservation_ttl_s
    # A denied call reserves nothing and records nothing.
    _, broke = await make(plane, quota=0)
    denied = await authz(http, car, key=broke, body={"model": BIG})
    assert denied.status == 402 and "x-reservation-id" not in denied.headers
    assert [k async for k in aredis.scan_iter(
        names.reservation(hash_of(broke), "*"))] == []


async def test_no_reservation_without_the_settle_endpoint(tmp_path, redis_url, plane, http,
                                                          aredis):
    plain = start_sidecar(tmp_path, redis_url)
    try:
        _, key = await make(plane, quota=5)
        answer = await authz(http, plain, key=key, body={"model": BIG},
                             headers={"x-reservation-id": RID})
        assert answer.status == 200 and answer.headers["x-reservation-id"] == ""
        assert [k async for k in aredis.scan_iter("r:*")] == []
    finally:
        stop_process(plain.proc)


# -- settling -----------------------------------------------------------------------------

async def test_refund_returns_the_unused_reservation(car, plane, http):
    key_id, key = await make(plane, quota=100)
    rid = await allowed(http, car, key)
    assert await quota(plane, key_id) == (90, 10)
    status, body = await settle(http, car, {"reservation_id": rid, "key": key,
                                            "model": BIG, "cost": 3})
    assert status == 200 and body["status"] == "settled" and body["reservation_id"] == rid
    assert (body["reserved"], body["actual"], body["delta"]) == (10, 3, -7)
    assert await quota(plane, key_id) == (97, 3)


async def test_overage_is_charged_even_past_the_quota(car, plane, http):
    key_id, key = await make(plane, quota=20)
    rid = await allowed(http, car, key)
    status, body = await settle(http, car, {"reservation_id": rid, "key_id": key_id,
                                            "model": BIG, "cost": 25})
    assert status == 200 and body["delta"] == 15
    assert await quota(plane, key_id) == (-5, 25)
    # The call was served, so the overage is owed: the next call is refused.
    answer = await authz(http, car, key=key, body={"model": BIG})
    assert answer.status == 402 and answer.json["error"]["code"] == "quota_exhausted"


async def test_tokens_priced_per_model_when_no_cost_is_given(car, plane, http):
    key_id, key = await make(plane, quota=50)
    rid = await allowed(http, car, key, model=PRICED)      # reserves the default 1 unit
    status, body = await settle(http, car, {"reservation_id": rid, "key": key,
                                            "model": PRICED, "prompt_tokens": 1000,
                                            "completion_tokens": 500})
    assert status == 200 and (body["reserved"], body["actual"]) == (1, 3)
    assert (await quota(plane, key_id))[0] == 47


async def test_a_report_without_a_price_settles_at_the_reservation(car, plane, http):
    key_id, key = await make(plane, quota=50)
    rid = await allowed(http, car, key)
    status, body = await settle(http, car, {"reservation_id": rid, "key": key,
                                            "model": "unpriced", "prompt_tokens": 7})
    assert status == 200 and (body["reserved"], body["delta"], body["tokens"]) == (10, 0, 7)
    assert await quota(plane, key_id) == (40, 10)


async def test_the_reservation_a_cost_header_made_is_what_settles(car, plane, http):
    """A call whose cost came from a trusted cost header reserved that cost, not the
    model's: the reservation remembers it; the report need not (and cannot) say."""
    key_id, key = await make(plane, quota=100)
    rid = await allowed(http, car, key, **{"x-cost": "30"})
    assert (await quota(plane, key_id))[0] == 70
    status, body = await settle(http, car, {"reservation_id": rid, "key": key,
                                            "model": BIG, "cost": 12})
    assert status == 200 and (body["reserved"], body["delta"]) == (30, -18)
    assert (await quota(plane, key_id))[0] == 88


async def test_unlimited_key_only_counts_usage(car, plane, http):
    key_id, key = await make(plane, unlimited=True)
    rid = await allowed(http, car, key)
    status, body = await settle(http, car, {"reservation_id": rid, "key": key,
                                            "model": BIG, "cost": 4})
    assert status == 200 and body["delta"] == -6
    assert await quota(plane, key_id) == (None, 4)


async def test_a_refund_goes_only_where_the_reservation_was_taken(car, plane, http):
    """An unlimited key's reservation took nothing: made limited before the report,
    it gets nothing back (the quota it now has was never charged for the call)."""
    key_id, key = await make(plane, unlimited=True)
    rid = await allowed(http, car, key)
    await plane.set_key_quota(None, key_id, set_to=5)
    status, body = await settle(http, car, {"reservation_id": rid, "key": key,
                                            "model": BIG, "cost": 0})
    assert status == 200 and body["delta"] == -10
    assert (await quota(plane, key_id))[0] == 5


async def test_subscription_cycle_then_wallet_for_the_overage(car, plane, http):
    key_id, key = await make(plane, type=KeyType.subscription, quota=50, account="acct-s",
                             payg_fallback=True)
    await plane.set_account_balance(None, "acct-s", 100)
    first = await allowed(http, car, key)                           # cycle used 10
    await settle(http, car, {"reservation_id": first, "key": key, "model": BIG, "cost": 4})
    assert (await plane.key(None, key_id))["subscription"]["cycle_used"] == 4   # refund: 6
    second = await allowed(http, car, key)                          # cycle used 14
    status, body = await settle(http, car, {"reservation_id": second, "key": key,
                                            "model": BIG, "cost": 60})
    # 14 + 50 = 64 > 50: the cycle fills up, the 14 beyond it come from the wallet.
    assert status == 200 and (body["delta"], body["from_wallet"]) == (50, 14)
    sub = (await plane.key(None, key_id))["subscription"]
    assert (sub["cycle_used"], sub["payg_used"]) == (50, 14)
    assert await balance(plane, "acct-s") == 86


async def test_a_call_the_wallet_paid_is_refunded_to_the_wallet(car, plane, http):
    key_id, key = await make(plane, type=KeyType.subscription, quota=10, account="acct-w",
                             payg_fallback=True)
    await plane.set_account_balance(None, "acct-w", 100)
    await allowed(http, car, key)                                    # the cycle: 10 of 10
    paid = await allowed(http, car, key)                             # the wallet: 10
    assert await balance(plane, "acct-w") == 90
    status, body = await settle(http, car, {"reservation_id": paid, "key": key,
                                            "model": BIG, "cost": 2})
    assert status == 200 and body["delta"] == -8
    assert await balance(plane, "acct-w") == 98
    sub = (await plane.key(None, key_id))["subscription"]
    assert (sub["cycle_used"], sub["payg_used"]) == (10, 2)


async def test_a_renewed_cycle_gets_no_refund_of_the_last_one(car, plane, http, aredis):
    key_id, key = await make(plane, type=KeyType.subscription, quota=50, cycle_days=1)
    rid = await allowed(http, car, key)
    rec = await raw_record(aredis, key)
    # The cycle ends before the report arrives (moved back a period).
    await aredis.hset(names.record(hash_of(key)), "ce", int(rec["ce"]) - int(rec["cp"]))
    status, body = await settle(http, car, {"reservation_id": rid, "key": key,
                                            "model": BIG, "cost": 0})
    assert status == 200 and body["delta"] == -10
    sub = (await plane.key(None, key_id))["subscription"]
    assert sub["cycle_used"] == 0                # a fresh cycle, not 0 - 10 of the old


# -- the attack: refunds beyond the reservation -------------------------------------------

async def test_a_refund_is_at_most_what_the_call_reserved(car, plane, http):
    """The old protocol believed `reserved`: a call that reserved 1 could be reported as
    reserved=1000, cost=0 and credit 1000. Now the field is refused, and the lowest
    possible report gives back exactly the 1 unit reserved."""
    key_id, key = await make(plane, quota=100)
    rid = await allowed(http, car, key, model=PRICED)                # reserves 1
    status, body = await settle(http, car, {"reservation_id": rid, "key": key,
                                            "reserved": 1000, "cost": 0})
    assert status == 400 and body["error"]["code"] == "invalid_report"
    assert await quota(plane, key_id) == (99, 1)
    status, body = await settle(http, car, {"reservation_id": rid, "key": key, "cost": 0})
    assert status == 200 and body["delta"] == -1
    assert await quota(plane, key_id) == (100, 0)


async def test_one_reservation_settles_once_whatever_the_spelling(car, plane, http):
    key_id, key = await make(plane, quota=100)
    rid = await allowed(http, car, key)
    status, _ = await settle(http, car, {"reservation_id": rid, "key": key, "cost": 0})
    assert status == 200 and await quota(plane, key_id) == (100, 0)
    for spelling in (rid.upper(), "RSV_" + rid[4:], rid + ".", rid + " ", " " + rid,
                     rid[:-1] + rid[-1].upper() if rid[-1].isalpha() else rid + "0",
                     rid + "%00", rid.replace("rsv_", "rsv-")):
        status, body = await settle(http, car, {"reservation_id": spelling, "key": key,
                                                "cost": 0})
        assert status == 400 and body["error"]["code"] == "invalid_report", spelling
    again = await settle(http, car, {"reservation_id": rid, "key": key, "cost": 0})
    by_id = await settle(http, car, {"reservation_id": rid, "key_id": key_id, "cost": 0})
    for status, body in (again, by_id):
        assert status == 409 and body["error"]["code"] == "already_settled"
    assert await quota(plane, key_id) == (100, 0)


async def test_unknown_and_foreign_reservations_are_404_and_change_nothing(
        car, plane, http, aredis):
    id_a, key_a = await make(plane, quota=100)
    id_b, key_b = await make(plane, quota=100)
    rid_b = await allowed(http, car, key_b)
    before = [await raw_record(aredis, k) for k in (key_a, key_b)]
    for report in ({"reservation_id": "rsv_" + secrets.token_hex(16), "key": key_a},
                   {"reservation_id": rid_b, "key": key_a},          # B's, reported by A
                   {"reservation_id": rid_b, "key_id": id_a}):
        status, body = await settle(http, car, {**report, "cost": 0})
        assert status == 404 and body["error"]["code"] == "unknown_reservation"
    assert [await raw_record(aredis, k) for k in (key_a, key_b)] == before
    status, _ = await settle(http, car, {"reservation_id": rid_b, "key": key_b, "cost": 10})
    assert status == 200                                  # B's own report still settles


async def test_an_expired_reservation_is_404(car, plane, http, aredis):
    key_id, key = await make(plane, quota=100)
    rid = await allowed(http, car, key)
    await aredis.delete(names.reservation(hash_of(key), rid))   # as its TTL ends
    status, body = await settle(http, car, {"reservation_id": rid, "key": key, "cost": 0})
    assert status == 404 and body["error"]["code"] == "unknown_reservation"
    assert await quota(plane, key_id) == (90, 10)


async def test_racing_reports_of_one_reservation_apply_exactly_once(car, plane, http):
    key_id, key = await make(plane, quota=1000)
    rids = [await allowed(http, car, key) for _ in range(5)]           # 950 left
    same = {"reservation_id": rids[0], "key": key, "model": BIG, "cost": 0}
    distinct = [{"reservation_id": r, "key": key, "model": BIG, "cost": 30}
                for r in rids[1:]]
    answers = await asyncio.gather(*(settle(http, car, same) for _ in range(24)),
                                   *(settle(http, car, r) for r in distinct))
    statuses = [status for status, _ in answers[:24]]
    assert statuses.count(200) == 1 and statuses.count(409) == 23
    assert all(status == 200 for status, _ in answers[24:])
    # one refund of 10, four overages of 20 each
    assert (await quota(plane, key_id))[0] == 950 + 10 - 4 * 20


async def test_reported_tokens_fill_the_tokens_per_minute_limit(car, plane, http):
    """tpm 6: a token drains every 10 s, so nothing drains between these calls."""
    key_id, key = await make(plane, unlimited=True, tpm=6)
    first = await authz(http, car, key=key, body={"model": BIG})
    assert first.status == 200 and first.headers["x-ratelimit-remaining-tokens"] == "6"
    await settle(http, car, {"reservation_id": first.headers["x-reservation-id"],
                             "key": key, "model": BIG, "prompt_tokens": 2,
                             "completion_tokens": 2})
    second = await authz(http, car, key=key, body={"model": BIG})
    assert second.status == 200 and second.headers["x-ratelimit-remaining-tokens"] == "2"
    assert second.headers["x-ratelimit-reset-tokens"].endswith("s")     # ~40 s
    await settle(http, car, {"reservation_id": second.headers["x-reservation-id"],
                             "key": key, "model": BIG, "prompt_tokens": 3})
    limited = await authz(http, car, key=key, body={"model": BIG})
    assert limited.status == 429 and limited.json["error"]["code"] == "rate_limited"
    # 7 tokens reported of 6: one over, so the next call fits once two have drained.
    assert 11 <= int(limited.headers["retry-after"]) <= 20
    assert limited.headers["x-ratelimit-remaining-tokens"] == "0"


BAD = [
    ("wrong token", {"model": BIG, "cost": 0}, "nope" * 6, 401),
    ("no token", {"model": BIG, "cost": 0}, None, 401),
    ("bad json", b'{"reservation_id": "b", "key', TOKEN, 400),
    ("no reservation id", {"model": BIG, "cost": 0, "reservation_id": None}, TOKEN, 400),
    ("a request id instead", {"request_id": "req-1", "reservation_id": None}, TOKEN, 400),
    ("claims a reservation", {"reserved": 1000, "cost": 0}, TOKEN, 400),
    ("negative tokens", {"model": BIG, "prompt_tokens": -5}, TOKEN, 400),
    ("negative cost", {"model": BIG, "cost": -1}, TOKEN, 400),
    ("unknown key", {"key": "sk-" + "Z" * 40, "cost": 0}, TOKEN, 422),
    ("unknown key id", {"key_id": "key_nope", "cost": 0}, TOKEN, 422),
    ("too large", {"model": "x" * 20_000}, TOKEN, 413),
]


@pytest.mark.parametrize("what,report,token,status", BAD, ids=[b[0] for b in BAD])
async def test_bad_reports_get_4xx_and_change_nothing(car, plane, http, aredis,
                                                      what, report, token, status):
    key_id, key = await make(plane, quota=100, tpm=1000)
    rid = await allowed(http, car, key)
    if isinstance(report, dict):
        report = {"reservation_id": rid, **report}
        if "key_id" not in report:
            report.setdefault("key", key)
        report = {k: v for k, v in report.items() if v is not None}
    before = await raw_record(aredis, key)
    got, body = await settle(http, car, report, token=token)
    assert got == status, body
    assert body["error"]["code"] and body["error"]["message"]
    assert await raw_record(aredis, key) == before
    assert await aredis.get(names.reservation(hash_of(key), rid)) == b"10 q"   # still open


async def test_wrong_method(car, http):
    status, body = await settle(http, car, {"reservation_id": RID}, method="GET")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


async def test_endpoint_is_off_without_a_token(tmp_path, redis_url, http):
    plain = start_sidecar(tmp_path, redis_url)
    try:
        status, _ = await settle(http, plain, {"reservation_id": RID, "key_id": "k"})
        assert status == 404
    finally:
        stop_process(plain.proc)


async def test_settlements_are_counted_without_key_labels(car, plane, http):
    key_id, key = await make(plane, quota=10)
    rid = await allowed(http, car, key)
    await settle(http, car, {"reservation_id": rid, "key": key, "model": BIG, "cost": 1})
    await settle(http, car, {"reservation_id": rid, "key": key, "model": BIG, "cost": 1})
    with urllib.request.urlopen(car.admin_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert metric_value(text, "sidecar_settlements_total", {"result": "refund"}) >= 1
    assert metric_value(text, "sidecar_settlements_total", {"result": "duplicate"}) >= 1
    assert key not in text and key_id not in text and rid not in text
