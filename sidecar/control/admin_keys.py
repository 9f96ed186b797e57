"""Who is calling the admin API: the rules an `sk-admin_` key must meet, in the control
plane with every other rule (the admin API only reads the header).

The key must be a stored admin key, active, unexpired, of an existing organization, and
(when it was made for a member) that membership must still exist. Its permission mode
becomes the actor's grant; its last use and request count are recorded (authorize.lua
never writes an admin key: it refuses them before any write).
"""

from __future__ import annotations

from ..schema import names
from ..schema.keys import KeyHasher, KeyType, key_type
from ..schema.record import FIELD, KeyRecord, now_ms
from .entities import Entities
from .errors import NotFound, Unauthenticated
from .policy import Actor, Grant
from .views import text


class AdminKeys:
    def __init__(self, redis, hasher: KeyHasher, entities: Entities):
        self.redis = redis
        self.hasher = hasher
        self.entities = entities

    async def authenticate(self, token: str) -> Actor:
        """The actor an admin key stands for, or Unauthenticated saying why not."""
        typ = key_type(token)
        if typ is None:
            raise Unauthenticated("invalid_api_key", "malformed API key")
        if typ is not KeyType.admin:
            raise Unauthenticated("admin_key_required", "the admin API accepts organization "
                                                        "admin keys (sk-admin_) only")
        key_hash = self.hasher(token)
        raw = await self.redis.hgetall(names.record(key_hash))
        rec = KeyRecord.from_hash(raw)
        if not raw or rec.type is not KeyType.admin or not rec.org:
            raise Unauthenticated("invalid_api_key", "unknown or deleted admin key")
        if not rec.active:
            raise Unauthenticated("key_disabled", "this admin key is disabled")
        now = now_ms()
        if rec.expired(now):
            raise Unauthenticated("key_expired", "this admin key has expired")
        role = await self._role(rec)
        try:
            await self.entities.org(rec.org)
        except NotFound:
            raise Unauthenticated("invalid_api_key",
                                  "this admin key's organization is gone") from None
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(names.record(key_hash), mapping=KeyRecord.fields(last_used_ms=now))
        pipe.hincrby(names.record(key_hash), FIELD["requests"], 1)
        await pipe.execute()
        return Actor(kind="admin_key", id=rec.id, org=rec.org, member=rec.member or None,
                     role=role, grant=Grant(rec.permission, frozenset(rec.scopes)))

    async def _role(self, rec: KeyRecord) -> str | None:
        """The role of the member the key was made for (None: made for no member)."""
        if not rec.member:
            return None
        role = await self.redis.hget(names.member(rec.org, rec.member), "role")
        if role is None:   # the cascade disables it too; this covers a race with it
            raise Unauthenticated("key_disabled", "the membership this admin key is tied "
                                                  "to is gone")
        return text(role)
