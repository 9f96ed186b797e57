"""No plaintext key reaches Redis: only its keyed hash, as part of the record's name."""

from __future__ import annotations

import time

from sidecar.control.keystore import KeySpec
from sidecar.dataplane.decision import Code
from sidecar.dataplane.request import classify
from sidecar.redis.runner import make_runner
from sidecar.schema import names
from sidecar.schema.ips import ip_hex
from sidecar.schema.keys import PREFIX_OF, KeyType, key_type, shard_of
from sidecar.schema.scripts import AUTHORIZE


async def everything_in(redis) -> list[bytes]:
    """Every key name, field and value in the database, whatever its type."""
    out: list[bytes] = []
    async for name in redis.scan_iter(count=500):
        out.append(name)
        kind = (await redis.type(name)).decode()
        if kind == "hash":
            for field, value in (await redis.hgetall(name)).items():
                out += [field, value]
        elif kind == "string":
            out.append(await redis.get(name))
        elif kind == "set":
            out += list(await redis.smembers(name))
        elif kind == "list":
            out += await redis.lrange(name, 0, -1)
        elif kind == "zset":
            out += await redis.zrange(name, 0, -1)
        elif kind == "stream":   # events (ev:{tag}), audit logs
            for _, fields in await redis.xrange(name):
                for field, value in fields.items():
                    out += [field, value]
        else:
            raise AssertionError(f"unexpected Redis type {kind} at {name!r}")
    return out


async def test_only_the_hmac_is_stored(store, redis_url):
    specs = [
        KeySpec(quota=5, models=["gpt-5.5"], ips=["10.0.0.0/8"], rpm=10),
        KeySpec(type=KeyType.subscription, quota=1, account="acct-s", payg_fallback=True),
        KeySpec(type=KeyType.org, unlimited=True, permission="restricted",
                scopes=["chat.completions:write"], org="default", project="default"),
        KeySpec(type=KeyType.admin, unlimited=True, org="default"),
    ]
    made = [await store.create(spec) for spec in specs]
    await store.set_balance("acct-s", 10)
    await store.set_quota(made[0][0]["id"], 9)
    await store.set_status(made[3][0]["id"], False, "test")

    runner = make_runner(redis_url, 2.0)
    try:
        endpoint = classify("POST", "/v1/chat/completions")
        codes = []
        for _, key in made:
            key_hash = store.hasher(key)
            for _ in range(2):   # the subscription key's second call is paid by the wallet
                reply = await runner.run(
                    AUTHORIZE, (names.record(key_hash), names.wallet(shard_of(key_hash))),
                    [int(time.time() * 1000), 1, ip_hex("10.1.2.3"), "10.1.2.3", "gpt-5.5",
                     endpoint.scope, endpoint.granting, 1])
                codes.append(reply[0])
    finally:
        await runner.close()
    assert codes == [Code.allow] * 6 + [Code.key_disabled] * 2

    stored = await everything_in(store.redis)
    names_stored = set(await store.redis.keys("*"))
    for _, key in made:
        body = key[len(PREFIX_OF[key_type(key)]):]
        for item in stored:
            assert key.encode() not in item
            assert body[:16].encode() not in item and body[-16:].encode() not in item
        assert names.record(store.hasher(key)).encode() in names_stored
