"""Rotation: a successor key with the same settings; the old key ends now or after a
grace window, the two sharing one remaining quota meanwhile (redis-py)."""

from __future__ import annotations

from dataclasses import replace

from ..redis.runner import run_script
from ..schema import names
from ..schema.contracts import PoolQuotaArgs
from ..schema.keys import KeyType, mint, new_id, shard_of
from ..schema.limits import Limits
from ..schema.record import ROTATION_COPIED, KeyRecord, now_ms
from ..schema.scripts import POOL_QUOTA
from .key_spec import KeyConflict
from .key_view import view
from .keystore import KeyStore


class KeyRotation:
    def __init__(self, store: KeyStore):
        self.store = store
        self.redis = store.redis

    async def rotate(self, key_id: str, grace_ms: int,
                     created_by: str) -> tuple[dict, str, dict]:
        """Mint a successor with the same settings; the old key ends now or after grace_ms.

        Returns (new view, plaintext, old view). The successor is complete (record, index,
        owner sets) before the old key is touched, so a failure in between leaves the old
        key working and no half-made key reachable.
        """
        key_hash, old = await self.store.load(key_id)
        now = now_ms()
        _check_rotatable(old, now)
        stored = old.to_hash()
        new = KeyRecord.from_hash({f: stored[f] for f in ROTATION_COPIED if stored.get(f)})
        new.id, new.active, new.created_ms, new.created_by = new_id("key"), True, now, created_by
        new.quota_used, new.rotated_from = 0, key_id
        own = Limits.unpack(old.limits)
        if own:   # the budget goes on (what was spent counts); the old key keeps its calls
            new.limits = replace(own, reserved=0, in_flight=0, holds=()).pack()
        # The successor shares the old key's hash tag, so both records and their shared
        # quota pool (in the tag's wallet hash) sit in one slot: during the grace window
        # the two keys draw on one remaining quota, not two copies of it.
        plaintext, new_hash = mint(old.type, self.store.hasher, shard_of(key_hash))
        pooled = old.type is not KeyType.subscription and not old.unlimited
        if pooled:
            new.quota_pool, new.quota_remaining = old.quota_pool or key_id, None
        await self.store.write_new(new_hash, new)
        if pooled and not old.quota_pool:  # the old key's remaining quota becomes the pool
            pool = PoolQuotaArgs(names.record(key_hash), names.wallet(shard_of(key_hash)),
                                 names.pool_field(new.quota_pool), new.quota_pool)
            await run_script(self.redis, POOL_QUOTA, pool.keys(), pool.argv())
        ending = {"rotated_to": new.id}
        if grace_ms <= 0:
            ending.update(active=False, disabled_reason="rotated")
        else:
            ex = old.expires_ms or 0
            ending["expires_ms"] = min(ex, now + grace_ms) if ex else now + grace_ms
        await self.redis.hset(names.record(key_hash), mapping=KeyRecord.fields(**ending))
        return view(new), plaintext, await self.store.get(key_id)


def _check_rotatable(rec: KeyRecord, now: int) -> None:
    if not rec.active:
        raise KeyConflict("status", f"{rec.id} is disabled; enable it before rotating")
    if rec.rotated_to:
        raise KeyConflict("rotated_to", f"{rec.id} was already rotated into {rec.rotated_to}")
    if rec.expired(now):
        raise KeyConflict("expires_at", f"{rec.id} has expired")
