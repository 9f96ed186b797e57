"""Key records on the control plane: store, read, change, delete (redis-py, not hot).

The record's fields: sidecar/schema/record.py (KeyRecord); the settings and their check:
key_spec.py; what an operator sees: key_view.py; rotation: key_rotation.py.
"""

from __future__ import annotations

from ..schema import names
from ..schema.keys import KeyHasher, KeyType, mint, new_id, shard_of
from ..schema.record import (
    CASCADE_REASONS,
    FIELD,
    MAX_QUOTA,
    QUOTA_FIRED,
    RESTRICTED,
    KeyRecord,
    stored,
    text,
)
from .events import key_disabled
from .key_spec import EDITABLE, InvalidKeySpec, KeyConflict, KeyError_, KeySpec, validate_spec
from .key_view import view
from .wallets import Wallets


class KeyStore:
    """Key CRUD over a redis-py asyncio client (standalone, Sentinel master or Cluster)."""

    def __init__(self, redis, hasher: KeyHasher):
        self.redis = redis
        self.hasher = hasher
        self.wallets = Wallets(redis, hasher)

    async def create(self, spec: KeySpec) -> tuple[dict, str]:
        """Store a new key; returns (view, plaintext). The plaintext is not kept."""
        rec = validate_spec(spec)
        # An organization's keys are minted on its tag (its accounts' wallets are there
        # too), so one script call reaches the budgets above the key (names.budgets).
        if rec.org:
            shard = self.hasher.org_tag(rec.org)
            rec.levels = " ".join(names.level_field(level, entity) for level, entity in (
                ("project", rec.project), ("organization", rec.org),
                ("member", rec.member)) if entity)
        else:
            shard = self.hasher.account_tag(rec.wallet) if rec.wallet else None
        plaintext, key_hash = mint(spec.type, self.hasher, shard)
        rec.id = new_id("key")
        await self.write_new(key_hash, rec)
        return view(rec), plaintext

    async def write_new(self, key_hash: str, rec: KeyRecord) -> None:
        """Record first, index second: an index entry never points at nothing."""
        await self.redis.hset(names.record(key_hash), mapping=rec.to_hash())
        await self.redis.hset(names.KEY_INDEX, rec.id, key_hash)
        for owner in rec.owners():
            await self.redis.sadd(names.owner_index(owner), rec.id)

    async def _hash_of(self, key_id: str) -> str:
        key_hash = await self.redis.hget(names.KEY_INDEX, key_id)
        if not key_hash:
            raise KeyError_(f"no key with id {key_id!r}")
        return text(key_hash)

    async def record(self, key_id: str) -> tuple[str, dict[str, str | bytes]]:
        """(key hash, the stored hash); a rotation's pool shows as its remaining quota."""
        key_hash = await self._hash_of(key_id)
        raw = await self.redis.hgetall(names.record(key_hash))
        if not raw:
            raise KeyError_(f"no key with id {key_id!r}")
        rec = stored(raw)
        if rec.get(FIELD["quota_pool"]):   # a rotation's shared pool holds the quota
            pooled = await self.redis.hget(names.wallet(shard_of(key_hash)),
                                           names.pool_field(rec[FIELD["quota_pool"]]))
            rec[FIELD["quota_remaining"]] = text(pooled or 0)
        return key_hash, rec

    async def load(self, key_id: str) -> tuple[str, KeyRecord]:
        """(key hash, the record) as the control plane reads it."""
        key_hash, rec = await self.record(key_id)
        return key_hash, KeyRecord.from_hash(rec)

    async def get(self, key_id: str) -> dict:
        return view((await self.load(key_id))[1])

    async def list(self, type_: str | None = None, status: str | None = None,
                   owner: str | None = None, cursor: int = 0,
                   limit: int = 100) -> tuple[list[dict], int]:
        """One page of keys (ordered by the index scan) and the next cursor (0 = done)."""
        if owner:
            ids = sorted(text(i) for i in await self.redis.smembers(names.owner_index(owner)))
            page, cursor = ids[cursor:cursor + limit], (cursor + limit
                                                        if cursor + limit < len(ids) else 0)
            hashes = [await self.redis.hget(names.KEY_INDEX, i) for i in page]
        else:
            cursor, found = await self.redis.hscan(names.KEY_INDEX, cursor, count=limit)
            hashes = list(found.values())
        views = []
        for h in hashes:
            if not h:
                continue
            raw = await self.redis.hgetall(names.record(text(h)))
            if raw:
                v = view(KeyRecord.from_hash(raw))
                if (type_ is None or v["type"] == type_) and (
                        status is None or v["status"] == status):
                    views.append(v)
        views.sort(key=lambda v: v["created_at"] or "")
        return views, int(cursor)

    async def set_status(self, key_id: str, active: bool, reason: str = "") -> dict:
        key_hash, rec = await self.load(key_id)
        if active and rec.disabled_reason in CASCADE_REASONS:
            raise KeyConflict("status", f"{key_id} was disabled because "
                              f"{rec.disabled_reason} (its owner is gone); create a new key "
                              "instead")
        await self.redis.hset(names.record(key_hash), mapping=KeyRecord.fields(
            active=active, disabled_reason="" if active else reason))
        if not active and rec.active:
            await key_disabled(self.redis, key_hash, rec, reason)
        return await self.get(key_id)

    async def update(self, key_id: str, **changes) -> dict:
        """Rewrite some attributes of a record (KeyRecord names)."""
        key_hash, _ = await self.record(key_id)
        if changes:
            await self.redis.hset(names.record(key_hash), mapping=KeyRecord.fields(**changes))
        return await self.get(key_id)

    async def edit(self, key_id: str, changes: dict) -> tuple[dict, dict]:
        """Change settings (keys of EDITABLE; ips as text); returns (before, after) views.

        The merged settings are validated as a whole (a restricted key keeps a scope) before
        one HSET/HDEL pair rewrites only the fields the change touches.
        """
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise InvalidKeySpec(sorted(unknown)[0], "not an editable setting")
        key_hash, rec = await self.load(key_id)
        before = view(rec)
        merged = {"name": before["name"], "permission": before["permission"],
                  "scopes": before["scopes"], "models": before["models"],
                  "ips": before["allowed_ips"], "rpm": before["rpm"], "tpm": before["tpm"],
                  "rpd": before["rpd"], "tpd": before["tpd"], "expires_at": None}
        if "permission" in changes and changes["permission"] != RESTRICTED \
                and "scopes" not in changes:
            merged["scopes"] = []   # scopes mean something only to a restricted key
        merged.update(changes)
        fields = validate_spec(KeySpec(type=rec.type, **merged)).to_hash()
        touched = {FIELD[attr] for name in changes for attr in EDITABLE[name]}
        if "permission" in changes:
            touched.add(FIELD["scopes"])
        put = {f: fields[f] for f in touched if fields.get(f)}
        drop = tuple(f for f in touched if not fields.get(f))
        rkey = names.record(key_hash)
        if put:
            await self.redis.hset(rkey, mapping=put)
        if drop:
            await self.redis.hdel(rkey, *drop)
        return before, await self.get(key_id)

    async def disable_owned(self, owner: str, reason: str) -> list[str]:
        """Cascade: disable every key in an owner index ('mem:<id>', 'sa:<id>', 'prj:<id>').

        Each key's own record is written (disabled, with the reason), because the
        authorize script reads only the record: the next call in every process sees it.
        Returns the keys it disabled; a key an earlier cascade already took keeps its
        first reason (the owner gone first is the truer story).
        """
        ids = sorted(text(i) for i in await self.redis.smembers(names.owner_index(owner)))
        done = []
        for key_id in ids:
            key_hash = await self.redis.hget(names.KEY_INDEX, key_id)
            if not key_hash:
                continue
            rkey = names.record(text(key_hash))
            wanted = [FIELD[a] for a in ("active", "disabled_reason", "org", "project")]
            rec = KeyRecord.from_hash({f: v for f, v in zip(
                wanted, await self.redis.hmget(rkey, *wanted), strict=True) if v is not None})
            if rec.disabled_reason in CASCADE_REASONS:
                continue
            await self.redis.hset(rkey, mapping=KeyRecord.fields(
                active=False, disabled_reason=reason))
            if rec.active:
                rec.id = key_id
                await key_disabled(self.redis, text(key_hash), rec, reason)
            done.append(key_id)
        return done

    async def set_quota(self, key_id: str, quota: int | None, add: bool = False) -> dict:
        """Set (or add to) the remaining quota (a subscription key's: the cycle quota);
        None makes the key unlimited."""
        key_hash, rec = await self.load(key_id)
        rkey = names.record(key_hash)
        if quota is None:
            await self.redis.hset(rkey, mapping=KeyRecord.fields(unlimited=True))
            return await self.get(key_id)
        if not (-MAX_QUOTA <= quota <= MAX_QUOTA) or (quota < 0 and not add):
            raise InvalidKeySpec("quota", f"must be between 0 and {MAX_QUOTA}")
        attr = "cycle_quota" if rec.type is KeyType.subscription else "quota_remaining"
        if attr == "quota_remaining" and rec.quota_pool:   # the rotation pool holds it
            wallet, pool = names.wallet(shard_of(key_hash)), names.pool_field(rec.quota_pool)
            if add:
                await self.redis.hincrby(wallet, pool, quota)
            else:
                await self.redis.hset(wallet, pool, str(quota))
            await self.redis.hset(rkey, mapping=KeyRecord.fields(unlimited=False))
        elif add:
            await self.redis.hincrby(rkey, FIELD[attr], quota)
        else:
            await self.redis.hset(rkey, mapping=KeyRecord.fields(
                **{attr: quota}, unlimited=False))
        if quota > 0 or not add:   # raised or set anew: the quota alerts re-arm
            await self.redis.hdel(rkey, QUOTA_FIRED)
        return await self.get(key_id)

    async def delete(self, key_id: str) -> None:
        key_hash, rec = await self.load(key_id)
        await self.redis.delete(names.record(key_hash))
        await self.redis.hdel(names.KEY_INDEX, key_id)
        for owner in rec.owners():
            await self.redis.srem(names.owner_index(owner), key_id)

    # The wallets are reached through the key store by tools and tests that seed them.
    async def set_balance(self, account: str, units: int, add: bool = False,
                          org: str | None = None) -> int:
        return await self.wallets.set_balance(account, units, add, org)

    async def balance(self, account: str, org: str | None = None) -> int:
        return await self.wallets.balance(account, org)
