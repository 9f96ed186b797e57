"""Script tier: authorize.lua on a real redis-server, reached through the real code path.

Records come from KeyStore.create (below the control plane on purpose: the subject is the
script and the raw record, driven with fields the control plane cannot set), calls go
through make_runner(...).run(AUTHORIZE, ...) with the same KEYS and ARGV that
sidecar/dataplane/authorize.py builds. Every call passes an
explicit `now` (ARGV[1]), so no assertion depends on the clock: the rate tests drive
time across minute boundaries and to the millisecond a Retry-After names.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from conftest import PEPPER
from redis.crc import key_slot

from sidecar.control.key_spec import KeySpec
from sidecar.control.keystore import KeyStore
from sidecar.dataplane.decision import Code
from sidecar.dataplane.request import classify
from sidecar.schema import names
from sidecar.schema.contracts import AuthorizeArgs, SettleArgs
from sidecar.schema.ips import ip_hex
from sidecar.schema.keys import KeyHasher, KeyType, new_reservation_id, shard_of
from sidecar.schema.record import DAY_MS
from sidecar.schema.scripts import AUTHORIZE, SETTLE

MINUTE = 60_000
CHAT = ("POST", "/v1/chat/completions")
MODELS = ("GET", "/v1/models")


def mid_window() -> int:
    """Now, moved to the middle of its clock minute (rate tests step from there)."""
    return int(time.time() * 1000) // MINUTE * MINUTE + MINUTE // 2


async def authorize(runner, store, key: str, *, now: int, route=CHAT, model: str = "gpt-5.5",
                    ip: str = "127.0.0.1", cost: int = 1, certain: bool = True,
                    reservation: str | None = None, reservation_ms: int = 60_000,
                    money: int = 0, day: int = 20_000, month: int = 24_300,
                    expiry: str = "c", thresholds: str = "0.2,0.05,0",
                    usage_days: int = 0) -> list:
    """One authorize call, KEYS and ARGV as sidecar/dataplane/authorize.py builds them (with a
    reservation id when /settle is on)."""
    key_hash = store.hasher(key)
    endpoint = classify(*route)
    hexed = ip_hex(ip)
    shard = shard_of(key_hash)
    args = AuthorizeArgs(names.record(key_hash), names.wallet(shard), names.budgets(shard),
                         names.events(shard),
                         names.usage_day(shard, day), names.usage_hour(shard, now // 3_600_000),
                         names.reservation(key_hash, reservation) if reservation else "",
                         now, cost, hexed, ip if hexed else "", model, endpoint.scope,
                         endpoint.granting, 1 if endpoint.write else 0, 0 if certain else 1,
                         names.POOL_PREFIX, reservation_ms if reservation else 0, money,
                         day, month, expiry, thresholds, usage_days)
    return await runner.run(AUTHORIZE, args.keys(), args.argv())


async def settle_call(runner, key_hash: str, rid: str, *, now: int, actual="", tokens=0,
                      money="", day: int = 20_000, month: int = 24_300,
                      expiry: str = "c", thresholds: str = "0.2,0.05,0",
                      usage_days: int = 0) -> list:
    """One settle call, KEYS and ARGV as sidecar/dataplane/settle.py builds them."""
    shard = shard_of(key_hash)
    args = SettleArgs(names.record(key_hash), names.wallet(shard), names.budgets(shard),
                      names.reservation(key_hash, rid),
                      names.events(shard), names.usage_day(shard, day),
                      names.usage_hour(shard, now // 3_600_000), now, actual,
                      tokens, 60_000, names.POOL_PREFIX, money, day, month, expiry,
                      thresholds, usage_days)
    return await runner.run(SETTLE, args.keys(), args.argv())


@pytest.fixture
async def store(aredis):
    # The raw KeyStore, not the plane: these records carry what no operator call could set.
    return KeyStore(aredis, KeyHasher(PEPPER))


@pytest.fixture
def call(runner, store):
    async def call_(key: str, **kw) -> list:
        kw.setdefault("now", mid_window())
        return await authorize(runner, store, key, **kw)
    return call_


async def make(store, **spec) -> tuple[dict, str]:
    return await store.create(KeySpec(**spec))


async def snapshot(store, key: str, account: str | None = None) -> tuple[dict, int]:
    """Everything a call could change: the whole record and the account's wallet (but
    xn, the one write of a refusal: an expired key's first, test_expired)."""
    rec = await store.redis.hgetall(names.record(store.hasher(key)))
    rec.pop(b"xn", None)
    return rec, (await store.balance(account) if account else 0)


async def assert_denied_untouched(call, store, key: str, code: Code,
                                  account: str | None = None, **kw) -> list:
    before = await snapshot(store, key, account)
    reply = await call(key, **kw)
    assert reply[0] == code, reply
    assert await snapshot(store, key, account) == before
    return reply


# -- rows 1-4: lookup, status, expiry, admin ------------------------------------------

async def test_unknown_key(call, store):
    assert (await call("sk-" + "x" * 40))[0] == Code.invalid_api_key


async def test_deleted_key(call, store):
    view, key = await make(store, quota=5)
    assert (await call(key))[0] == Code.allow
    await store.delete(view["id"])
    assert (await call(key))[0] == Code.invalid_api_key


async def test_disabled_then_enabled(call, store):
    view, key = await make(store, quota=5)
    await store.set_status(view["id"], False, "test")
    await assert_denied_untouched(call, store, key, Code.key_disabled)
    await store.set_status(view["id"], True)
    assert (await call(key))[0] == Code.allow


async def test_expired(call, store):
    expires = datetime.now(UTC) + timedelta(seconds=30)
    _, key = await make(store, quota=5, expires_at=expires)
    ex_ms = int(expires.timestamp() * 1000)
    assert (await call(key, now=ex_ms - 1))[0] == Code.allow
    # The first refusal notes the expiry it saw (xn) and appends key.expired, once.
    assert (await call(key, now=ex_ms))[0] == Code.key_expired
    assert await store.redis.hget(names.record(store.hasher(key)), "xn") == str(ex_ms).encode()
    await assert_denied_untouched(call, store, key, Code.key_expired, now=ex_ms + 1)
    await assert_denied_untouched(call, store, key, Code.key_expired, now=ex_ms + DAY_MS)
    stream = names.events(shard_of(store.hasher(key)))
    assert [e[1][b"t"] for e in await store.redis.xrange(stream)] == [b"key.expired"]


@pytest.mark.parametrize("call_", [CHAT, MODELS])
async def test_admin_key_never_on_data_plane(call, store, call_):
    _, key = await make(store, type=KeyType.admin, unlimited=True, org="default")
    await assert_denied_untouched(call, store, key, Code.admin_key_not_allowed, route=call_,
                                  model="")


# -- row 5: client IP ----------------------------------------------------------------

@pytest.mark.parametrize("ips,ip,allowed", [
    (["10.0.0.0/8"], "10.200.1.1", True),
    (["10.0.0.0/8"], "11.0.0.1", False),
    (["10.0.0.0/9"], "10.127.255.255", True),         # non-nibble IPv4 prefix
    (["10.0.0.0/9"], "10.128.0.0", False),
    (["192.168.1.5"], "192.168.1.5", True),
    (["192.168.1.5"], "192.168.1.4", False),
    (["2001:db8::/61"], "2001:db8:0:7:ffff::1", True),   # /61 ends inside a hex digit
    (["2001:db8::/61"], "2001:db8:0:8::1", False),
    (["2001:db8::/61"], "2001:db9::1", False),
    (["2001:db8::1"], "2001:db8::1", True),
    (["2001:db8::1"], "2001:db8::2", False),
    (["10.0.0.0/8"], "::ffff:10.1.1.1", True),        # IPv4-mapped client
    (["::ffff:10.0.0.0/104"], "10.1.1.1", True),      # IPv4-mapped rule
    (["0.0.0.0/0"], "203.0.113.1", True),
    (["0.0.0.0/0"], "2001:db8::1", False),            # all of IPv4 is not IPv6
    (["192.168.1.5", "2001:db8::/32"], "2001:db8:1::1", True),
    (["192.168.1.5", "2001:db8::/32"], "192.168.1.5", True),
    (["10.0.0.0/8"], "", False),                      # unknown client IP
    (["10.0.0.0/8"], "not-an-ip", False),
    ([], "", True),                                   # no restriction
])
async def test_client_ip(call, store, ips, ip, allowed):
    _, key = await make(store, unlimited=True, ips=ips)
    if allowed:
        assert (await call(key, ip=ip))[0] == Code.allow
    else:
        await assert_denied_untouched(call, store, key, Code.ip_not_allowed, ip=ip)


# -- row 6: model whitelist --------------------------------------------------------

@pytest.mark.parametrize("call_,model,allowed", [
    (CHAT, "gpt-5.5", True),
    (CHAT, "claude-sonnet-4-6", True),
    (CHAT, "gpt-4o", False),
    (CHAT, "gpt-5", False),                          # a prefix of an allowed name
    (CHAT, "pt-5.5", False),                         # a suffix
    (CHAT, "gpt-5.5,claude-sonnet-4-6", False),      # two allowed names glued together
    (CHAT, "", False),                               # a write call must name a model
    (MODELS, "", True),                              # a read call may name none
    (("GET", "/v1/models/gpt-4o"), "gpt-4o", False),  # a read naming another model
])
async def test_model_whitelist(call, store, call_, model, allowed):
    _, key = await make(store, unlimited=True, models=["gpt-5.5", "claude-sonnet-4-6"])
    if allowed:
        assert (await call(key, route=call_, model=model))[0] == Code.allow
    else:
        await assert_denied_untouched(call, store, key, Code.model_not_allowed, route=call_,
                                      model=model)


async def test_no_whitelist_allows_any_model_and_none(call, store):
    _, key = await make(store, unlimited=True)
    assert (await call(key, model="anything"))[0] == Code.allow
    assert (await call(key, model=""))[0] == Code.allow


# -- row 7: permissions -------------------------------------------------------------

def org_key(permission: str, scopes: list[str] | None = None) -> dict:
    return dict(type=KeyType.org, unlimited=True, permission=permission, scopes=scopes or [],
                org="default", project="default")


async def test_read_only_key(call, store):
    _, key = await make(store, **org_key("read-only"))
    assert (await call(key, route=MODELS, model=""))[0] == Code.allow
    await assert_denied_untouched(call, store, key, Code.permission_denied)


@pytest.mark.parametrize("scopes,call_,allowed", [
    (["models:read"], MODELS, True),
    (["models:read"], CHAT, False),
    (["chat.completions:write"], CHAT, True),
    (["chat.completions:write"], ("GET", "/v1/chat/completions"), True),  # write grants read
    (["models:write"], MODELS, True),
    (["chat.completions:write"], ("POST", "/v1/embeddings"), False),
    (["chat.completions:read"], CHAT, False),         # read does not grant write
    # A path shaped like the scope list cannot match two scopes at once.
    (["models:read", "chat.completions:write"], ("POST", "/v1/models:read,chat.completions"),
     False),
])
async def test_restricted_key(call, store, scopes, call_, allowed):
    _, key = await make(store, **org_key("restricted", scopes))
    if allowed:
        assert (await call(key, route=call_))[0] == Code.allow
    else:
        await assert_denied_untouched(call, store, key, Code.permission_denied, route=call_)


async def test_all_permission_and_identity_reply(call, store):
    view, key = await make(store, **org_key("all"))
    reply = await call(key, route=("DELETE", "/v1/files/f1"))
    assert reply[:5] == [Code.allow, view["id"].encode(), b"o", b"default", b"default"]


# -- row 8: quota ------------------------------------------------------------------

async def test_quota_exhausted_consumes_nothing(call, store):
    view, key = await make(store, quota=2)
    for _ in range(2):
        assert (await call(key))[0] == Code.allow
    for _ in range(3):
        await assert_denied_untouched(call, store, key, Code.quota_exhausted)
    shown = await store.get(view["id"])
    assert (shown["quota_remaining"], shown["quota_used"], shown["request_count"]) == (0, 2, 2)


async def test_cost_larger_than_one(call, store):
    view, key = await make(store, quota=5)
    assert (await call(key, cost=3))[0] == Code.allow
    await assert_denied_untouched(call, store, key, Code.quota_exhausted, cost=3)
    assert (await call(key, cost=2))[0] == Code.allow
    shown = await store.get(view["id"])
    assert (shown["quota_remaining"], shown["quota_used"]) == (0, 5)


async def test_largest_quota_stays_exact(call, store):
    view, key = await make(store, quota=10**12)
    assert (await call(key))[0] == Code.allow
    rec = (await store.record(view["id"]))[1]
    assert rec["qr"] == str(10**12 - 1)


async def test_set_quota_takes_effect_on_next_call(call, store):
    view, key = await make(store, quota=0)
    await assert_denied_untouched(call, store, key, Code.quota_exhausted)
    await store.set_quota(view["id"], 1)
    assert (await call(key))[0] == Code.allow


@pytest.mark.parametrize("typ", [KeyType.standard, KeyType.subscription])
async def test_unlimited(call, store, typ):
    view, key = await make(store, type=typ, unlimited=True)
    for _ in range(3):
        assert (await call(key, cost=1000))[0] == Code.allow
    shown = await store.get(view["id"])
    assert shown["unlimited"] is True and shown["quota_remaining"] is None
    assert (shown["quota_used"], shown["request_count"]) == (3000, 3)


async def test_set_quota_unlimited_lifts_exhaustion(call, store):
    view, key = await make(store, type=KeyType.subscription, quota=0)
    await assert_denied_untouched(call, store, key, Code.quota_exhausted)
    await store.set_quota(view["id"], None)
    assert (await call(key))[0] == Code.allow


# -- subscription cycles and PAYG ----------------------------------------------------

async def test_subscription_cycle_and_renewal(call, store):
    view, key = await make(store, type=KeyType.subscription, quota=2, cycle_days=30)
    key_hash, rec = await store.record(view["id"])
    ce, cp = int(rec["ce"]), int(rec["cp"])
    assert cp == 30 * DAY_MS
    now = mid_window()
    assert (await call(key, now=now))[0] == Code.allow
    assert (await call(key, now=now))[0] == Code.allow
    await assert_denied_untouched(call, store, key, Code.quota_exhausted, now=now)
    assert (await store.get(view["id"]))["subscription"]["cycle_used"] == 2

    # Renewal at the cycle's end: reset and one period on, in the same call.
    assert (await call(key, now=ce))[0] == Code.allow
    rec = (await store.record(view["id"]))[1]
    assert (int(rec["cu"]), int(rec["ce"])) == (1, ce + cp)

    # Long idle: the end advances by whole periods, past now.
    later = ce + cp + 2 * cp + cp // 2
    assert (await call(key, now=later))[0] == Code.allow
    rec = (await store.record(view["id"]))[1]
    assert (int(rec["cu"]), int(rec["ce"])) == (1, ce + 4 * cp)
    assert int(rec["qu"]) == 4


async def test_subscription_denied_at_renewal_time_writes_nothing(call, store):
    view, key = await make(store, type=KeyType.subscription, quota=1, cycle_days=1,
                           models=["gpt-5.5"])
    ce = int((await store.record(view["id"]))[1]["ce"])
    await assert_denied_untouched(call, store, key, Code.model_not_allowed, now=ce + 1,
                                  model="other")


async def test_payg_fallback_spends_the_wallet(call, store):
    account = "acct-payg"
    view, key = await make(store, type=KeyType.subscription, quota=1, account=account,
                           payg_fallback=True)
    await store.set_balance(account, 2)
    for _ in range(3):                                # 1 from the cycle, 2 from the wallet
        assert (await call(key))[0] == Code.allow
    assert await store.balance(account) == 0
    await assert_denied_untouched(call, store, key, Code.quota_exhausted, account=account)
    rec = (await store.record(view["id"]))[1]
    assert (rec["cu"], rec["pu"], rec["qu"]) == ("1", "2", "3")
    # The wallet cannot cover a larger cost: refused whole, not overdrawn.
    await store.set_balance(account, 2)
    await assert_denied_untouched(call, store, key, Code.quota_exhausted, account=account,
                                  cost=3)


async def test_no_payg_without_the_flag(call, store):
    account = "acct-nopayg"
    _, key = await make(store, type=KeyType.subscription, quota=1, account=account)
    await store.set_balance(account, 100)
    assert (await call(key))[0] == Code.allow
    await assert_denied_untouched(call, store, key, Code.quota_exhausted, account=account)
    assert await store.balance(account) == 100


# -- rows 9-10: rate limits (GCRA) -----------------------------------------------------

def step_ms(limit: int) -> float:
    """How often a limit of `limit` a minute lets one more unit through (µs rounded up)."""
    return -(-60_000_000 // limit) / 1000


async def test_requests_per_minute(call, store):
    """rpm 2: two at once, then one more a step (30 s) after the first; the headers say
    how many are left, when the limit is whole again, and when the next call fits."""
    _, key = await make(store, unlimited=True, rpm=2)
    now = mid_window()
    first = await call(key, now=now)
    assert first[0] == Code.allow
    assert first[5:12] == [2, 1, 0, 0, 30_000, 0, 0]
    assert (await call(key, now=now + 1))[5:10] == [2, 0, 0, 0, 60_000 - 1]
    denied = await assert_denied_untouched(call, store, key, Code.rate_limited, now=now + 2)
    assert denied[5:12] == [2, 0, 0, 0, 60_000 - 2, 0, 30_000 - 2]
    # Retry after is the truth: a millisecond early is refused, on time is allowed.
    retry_at = now + 2 + denied[11]
    await assert_denied_untouched(call, store, key, Code.rate_limited, now=retry_at - 1)
    assert (await call(key, now=retry_at))[:7] == first[:5] + [2, 0]


@pytest.mark.parametrize("before_ms,after_ms", [(1, 1), (500, 400), (30_000, 100)])
async def test_no_burst_across_a_minute_boundary(call, store, before_ms, after_ms):
    """The old fixed windows let an rpm-30 key make 30 calls just before a minute's end
    and 30 more just after it. Now every call after the 30th waits for its step (2 s)."""
    _, key = await make(store, unlimited=True, rpm=30)
    edge = mid_window() // MINUTE * MINUTE + MINUTE          # a minute boundary
    before = [(await call(key, now=edge - before_ms))[0] for _ in range(30)]
    after = [(await call(key, now=edge + after_ms))[0] for _ in range(30)]
    assert before == [Code.allow] * 30
    # Those before the edge refill one call per 2 s since then, and no more.
    refilled = int((before_ms + after_ms) // step_ms(30))
    assert after == [Code.allow] * refilled + [Code.rate_limited] * (30 - refilled)


async def test_steady_calls_get_the_rate_and_no_more(call, store):
    """A call every half step for three minutes: once the burst allowance is used, one
    call per step passes; no span of d ms holds more than rpm + d * rpm / 60 s calls."""
    rpm, step = 12, 5_000
    _, key = await make(store, unlimited=True, rpm=rpm)
    start = mid_window()
    allowed = [now for now in range(start, start + 3 * MINUTE, step // 2)
               if (await call(key, now=now))[0] == Code.allow]
    late = [now for now in allowed if now >= start + MINUTE]
    assert late and {b - a for a, b in zip(late, late[1:], strict=False)} == {step}
    for i, first in enumerate(allowed):
        for j in range(i, len(allowed)):
            assert j - i + 1 <= rpm + (allowed[j] - first) * rpm // MINUTE
    assert max(sum(1 for t in allowed if s <= t < s + MINUTE) for s in allowed) \
        <= 2 * rpm - 1


@pytest.mark.parametrize("rpm", [1, 7, 60, 1000, 100_000])
async def test_a_burst_is_exactly_the_limit_and_retry_after_is_exact(call, store, rpm):
    _, key = await make(store, unlimited=True, rpm=rpm)
    now = mid_window()
    burst = min(rpm, 1000)
    if rpm > burst:          # a large limit: take all but the last 1000 at once
        await store.redis.hset(names.record(store.hasher(key)), "ra",
                               now * 1000 + (rpm - burst) * int(step_ms(rpm) * 1000))
    replies = [await call(key, now=now) for _ in range(burst)]
    assert [r[0] for r in replies] == [Code.allow] * burst
    assert [r[6] for r in replies] == list(range(burst - 1, -1, -1))
    denied = await call(key, now=now)
    assert denied[0] == Code.rate_limited and denied[11] > 0
    assert (await call(key, now=now + denied[11] - 1))[0] == Code.rate_limited
    assert (await call(key, now=now + denied[11]))[0] == Code.allow


async def test_tokens_per_minute(call, store):
    """The tokens reported so far sit in ta (µs, as settle.lua writes it): a call passes
    while at least one token is left; refused, it learns when one will be."""
    _, key = await make(store, unlimited=True, tpm=100)        # a token every 600 ms
    key_hash = store.hasher(key)
    now = mid_window()
    await store.redis.hset(names.record(key_hash), "ta", now * 1000 + 99 * 600_000)
    reply = await call(key, now=now)
    assert reply[0] == Code.allow and reply[7:11] == [100, 1, 0, 99 * 600]
    await store.redis.hset(names.record(key_hash), "ta", now * 1000 + 100 * 600_000)
    denied = await assert_denied_untouched(call, store, key, Code.rate_limited_tokens, now=now)
    assert denied[7:12] == [100, 0, 0, MINUTE, 600]
    assert (await call(key, now=now + 599))[0] == Code.rate_limited_tokens
    assert (await call(key, now=now + 600))[7:9] == [100, 1]
    # Use long past counts for nothing.
    await store.redis.hset(names.record(key_hash), "ta", now * 1000 - 10**9)
    assert (await call(key, now=now))[7:9] == [100, 100]


async def test_retry_after_waits_for_both_limits(call, store):
    _, key = await make(store, unlimited=True, rpm=1, tpm=100)
    now = mid_window()
    assert (await call(key, now=now))[0] == Code.allow             # next request: +60 s
    await store.redis.hset(names.record(store.hasher(key)), "ta",
                           now * 1000 + 230 * 600_000)             # next token: +78.6 s
    denied = await call(key, now=now)
    assert denied[0] == Code.rate_limited and denied[11] == 78_600


async def test_reported_tokens_count_against_tokens_per_minute(runner, call, store):
    """settle.lua adds a report's tokens (a step each) where authorize.lua reads them;
    a report past the limit is owed and refuses calls until it drains."""
    _, key = await make(store, unlimited=True, tpm=100)
    key_hash = store.hasher(key)
    now = mid_window()

    async def settle(tokens: int, at: int) -> list:
        rid = new_reservation_id()
        assert (await call(key, now=at, reservation=rid))[0] == Code.allow
        return await settle_call(runner, key_hash, rid, now=at, tokens=tokens)
    assert (await settle(60, now))[0] == 0
    assert (await call(key, now=now))[7:9] == [100, 40]
    assert (await call(key, now=now + 6_000))[7:9] == [100, 50]     # 10 drained
    assert (await settle(100, now + 6_000))[0] == 0                    # 50 over
    denied = await call(key, now=now + 6_000)
    assert denied[0] == Code.rate_limited_tokens
    assert denied[11] == 51 * 600                   # until 51 drained: one fits again


# -- the reservation for /settle -------------------------------------------------------

async def test_allowed_call_records_units_and_source_of_its_reservation(call, store, aredis):
    """'<units> <source>': q the key's quota, u nothing (unlimited), c<end> the cycle
    ending then, w the PAYG wallet; with the TTL asked for. A denial records nothing."""
    account = "acct-rsv"
    _, own = await make(store, quota=10)
    _, free = await make(store, unlimited=True)
    sub_view, sub = await make(store, type=KeyType.subscription, quota=1, account=account,
                               payg_fallback=True)
    await store.set_balance(account, 5)
    ce = (await store.record(sub_view["id"]))[1]["ce"]
    cases = [(own, 3, "3 q"), (free, 4, "4 u"), (sub, 1, f"1 c{ce}"), (sub, 2, "2 w")]
    for key, cost, held in cases:
        rid = new_reservation_id()
        assert (await call(key, cost=cost, reservation=rid, reservation_ms=5000))[0] == 0
        name = names.reservation(store.hasher(key), rid)
        assert (await aredis.get(name)).decode() == held
        assert 0 < await aredis.pttl(name) <= 5000
        assert key_slot(name.encode()) == key_slot(names.record(store.hasher(key)).encode())
    rid = new_reservation_id()
    await assert_denied_untouched(call, store, own, Code.quota_exhausted, cost=100,
                                  reservation=rid)
    assert await aredis.exists(names.reservation(store.hasher(own), rid)) == 0


# -- recent activity -----------------------------------------------------------------

async def test_recent_activity_written_on_allow_only(call, store):
    view, key = await make(store, quota=10, models=["gpt-5.5"])
    fresh = await store.get(view["id"])
    assert (fresh["last_used_at"], fresh["last_ip"], fresh["last_model"],
            fresh["request_count"]) == (None, None, None, 0)
    now = mid_window()
    assert (await call(key, now=now, ip="2001:db8::7", model="gpt-5.5"))[0] == Code.allow
    await assert_denied_untouched(call, store, key, Code.model_not_allowed, now=now + 5,
                                  ip="198.51.100.1", model="gpt-4o")
    shown = await store.get(view["id"])
    expected_at = datetime.fromtimestamp(now / 1000, UTC).isoformat().replace("+00:00", "Z")
    assert (shown["last_used_at"], shown["last_ip"], shown["last_model"],
            shown["request_count"]) == (expected_at, "2001:db8::7", "gpt-5.5", 1)


# -- first match wins ---------------------------------------------------------------

async def test_order_of_checks(call, store, aredis):
    """Each step adds the next denial's cause to a key that already has the earlier one."""
    expires = datetime.now(UTC) + timedelta(seconds=30)
    after = int(expires.timestamp() * 1000) + 1
    cases = [
        # (spec, call kwargs, expected code)
        (dict(quota=0, rpm=1, ips=["10.0.0.0/8"], models=["gpt-5.5"], expires_at=expires),
         dict(now=after, ip="11.0.0.1", model="gpt-4o"), "disable", Code.key_disabled),
        (dict(type=KeyType.admin, unlimited=True, expires_at=expires, ips=["10.0.0.0/8"]),
         dict(now=after, ip="11.0.0.1"), None, Code.key_expired),
        (dict(type=KeyType.admin, unlimited=True, ips=["10.0.0.0/8"], models=["x"]),
         dict(ip="11.0.0.1"), None, Code.admin_key_not_allowed),
        (dict(quota=0, ips=["10.0.0.0/8"], models=["gpt-5.5"]),
         dict(ip="11.0.0.1", model="gpt-4o"), None, Code.ip_not_allowed),
        (dict(type=KeyType.org, quota=0, models=["gpt-5.5"], permission="read-only"),
         dict(model="gpt-4o"), None, Code.model_not_allowed),
        (dict(type=KeyType.org, quota=0, permission="read-only"),
         dict(), None, Code.permission_denied),
        (dict(quota=0, rpm=1), dict(), "use-rpm", Code.quota_exhausted),
        (dict(unlimited=True, rpm=1, tpm=1), dict(), "use-rpm+tpm", Code.rate_limited),
    ]
    for spec, kw, prepare, expected in cases:
        view, key = await make(store, **spec)
        kw.setdefault("now", mid_window())
        key_hash = store.hasher(key)
        if prepare == "disable":
            await store.set_status(view["id"], False)
        elif prepare and prepare.startswith("use-rpm"):
            used = kw["now"] * 1000 + 60_000_000    # a limit of 1 a minute, used up now
            fields = {"ra": used}
            if prepare.endswith("tpm"):
                fields |= {"ta": used}
            await aredis.hset(names.record(key_hash), mapping=fields)
        await assert_denied_untouched(call, store, key, expected, **kw)


# -- cluster-safe layout -------------------------------------------------------------

async def test_record_and_wallet_share_a_cluster_slot(store):
    for spec in (dict(), dict(type=KeyType.subscription, account="acct-slot",
                              payg_fallback=True)):
        for _ in range(5):
            _, key = await make(store, **spec)
            key_hash = store.hasher(key)
            assert key_slot(names.record(key_hash).encode()) == key_slot(
                names.wallet(shard_of(key_hash)).encode())
    # A PAYG key's wallet is the one set-balance writes to.
    assert names.wallet(shard_of(key_hash)) == names.wallet(
        store.hasher.account_tag("acct-slot"))


async def test_model_from_cut_off_body_is_refused_for_whitelisted_writes(call, store):
    """A model read from a truncated body may be nested or overridden past the cut:
    whitelisted keys refuse it on write calls; other keys and read calls are unaffected."""
    _, listed = await make(store, unlimited=True, models=["gpt-5.5"])
    _, free = await make(store, unlimited=True)
    assert (await call(listed, model="gpt-5.5", certain=False))[0] == Code.model_not_allowed
    assert (await call(listed, model="gpt-5.5", route=MODELS, certain=False))[0] == 0
    assert (await call(listed, model="gpt-5.5"))[0] == 0
    assert (await call(free, model="gpt-5.5", certain=False))[0] == 0


async def test_recent_activity_keeps_its_time_to_the_second(call, store):
    """A busy key's calls within a second of the recorded use leave the time alone (one
    write less per call); a new IP or model is recorded at once; a second later, the time
    moves."""
    view, key = await make(store, quota=10)
    now = mid_window()
    for at, ip, model in ((now, "10.0.0.1", "gpt-5.5"), (now + 999, "10.0.0.2", "gpt-x")):
        assert (await call(key, now=at, ip=ip, model=model))[0] == Code.allow
    shown = await store.get(view["id"])
    at_text = datetime.fromtimestamp(now / 1000, UTC).isoformat().replace("+00:00", "Z")
    assert (shown["last_used_at"], shown["last_ip"], shown["last_model"],
            shown["request_count"]) == (at_text, "10.0.0.2", "gpt-x", 2)
    assert (await call(key, now=now + 1000, ip="10.0.0.2", model="gpt-x"))[0] == Code.allow
    later = datetime.fromtimestamp((now + 1000) / 1000, UTC).isoformat().replace("+00:00",
                                                                                 "Z")
    assert (await store.get(view["id"]))["last_used_at"] == later
