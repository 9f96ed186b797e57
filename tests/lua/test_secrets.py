"""No plaintext key reaches Redis: only its keyed hash, as part of the record's name.

The keys are made through the control plane, so its audit entries and events are searched
too, and then used by the script."""

from __future__ import annotations

import time

from live import disable, hash_of, make

from sidecar.dataplane.decision import Code
from sidecar.dataplane.request import classify
from sidecar.redis.runner import make_runner
from sidecar.schema import names
from sidecar.schema.contracts import AuthorizeArgs
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


async def test_only_the_hmac_is_stored(plane, redis_url):
    made = [
        await make(plane, quota=5, models=["gpt-5.5"], allowed_ips=["10.0.0.0/8"], rpm=10),
        await make(plane, type=KeyType.subscription, quota=1, account="acct-s",
                   payg_fallback=True),
        await make(plane, type=KeyType.org, unlimited=True, permission="restricted",
                   scopes=["chat.completions:write"]),
        await make(plane, type=KeyType.admin),
    ]
    await plane.set_account_balance(None, "acct-s", 10)
    await plane.set_key_quota(None, made[0][0], set_to=9)
    await disable(plane, made[3][0])

    runner = make_runner(redis_url, 2.0)
    try:
        endpoint = classify("POST", "/v1/chat/completions")
        codes = []
        for _, key in made:
            key_hash = hash_of(key)
            for _ in range(2):   # the subscription key's second call is paid by the wallet
                shard = shard_of(key_hash)
                args = AuthorizeArgs(
                    names.record(key_hash), names.wallet(shard), names.budgets(shard),
                    names.events(shard), names.usage_day(shard, 0),
                    names.usage_hour(shard, 0), "", int(time.time() * 1000), 1, ip_hex("10.1.2.3"),
                    "10.1.2.3", "gpt-5.5", endpoint.scope, endpoint.granting, 1, 0)
                reply = await runner.run(AUTHORIZE, args.keys(), args.argv())
                codes.append(reply[0])
    finally:
        await runner.close()
    assert codes == [Code.allow] * 6 + [Code.key_disabled] * 2

    stored = await everything_in(plane.redis)
    names_stored = set(await plane.redis.keys("*"))
    for _, key in made:
        body = key[len(PREFIX_OF[key_type(key)]):]
        for item in stored:
            assert key.encode() not in item
            assert body[:16].encode() not in item and body[-16:].encode() not in item
        assert names.record(hash_of(key)).encode() in names_stored
