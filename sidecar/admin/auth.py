"""Who is calling: an `sk-admin_` key in `Authorization: Bearer`, looked up by its HMAC.

The key must be active, unexpired, of an existing organization, and (when it was made by
a member) that membership must still exist. Its permission mode becomes the actor's grant.
"""

from __future__ import annotations

from ..control.errors import NotFound
from ..control.policy import Actor, Grant
from ..control.store import ControlStore
from ..schema import names
from ..schema.keys import KeyHasher, KeyType, key_type
from ..schema.record import FIELD, KeyRecord, now_ms
from .http import ApiError


async def authenticate(authorization: str | None, store: ControlStore,
                       hasher: KeyHasher) -> Actor:
    if not authorization:
        raise ApiError(401, "missing_api_key",
                       "send an admin key as 'Authorization: Bearer sk-admin_...'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "invalid_api_key", "expected 'Authorization: Bearer sk-admin_...'")
    typ = key_type(token)
    if typ is None:
        raise ApiError(401, "invalid_api_key", "malformed API key")
    if typ is not KeyType.admin:
        raise ApiError(401, "admin_key_required",
                       "the admin API accepts organization admin keys (sk-admin_) only")
    key_hash = hasher(token)
    raw = await store.redis.hgetall(names.record(key_hash))
    rec = KeyRecord.from_hash(raw)
    if not raw or rec.type is not KeyType.admin or not rec.org:
        raise ApiError(401, "invalid_api_key", "unknown or deleted admin key")
    if not rec.active:
        raise ApiError(401, "key_disabled", "this admin key is disabled")
    now = now_ms()
    if rec.expired(now):
        raise ApiError(401, "key_expired", "this admin key has expired")
    org, member_id, role = rec.org, rec.member or None, None
    if member_id:
        role = await store.redis.hget(names.member(org, member_id), "role")
        if role is None:   # the cascade disables it too; this covers a race with it
            raise ApiError(401, "key_disabled", "the membership this admin key is tied to "
                                                "is gone")
        role = _s(role)
    try:
        await store.org(org)
    except NotFound:
        raise ApiError(401, "invalid_api_key", "this admin key's organization is gone") from None
    pipe = store.redis.pipeline(transaction=False)
    pipe.hset(names.record(key_hash), mapping=KeyRecord.fields(last_used_ms=now))
    pipe.hincrby(names.record(key_hash), FIELD["requests"], 1)
    await pipe.execute()
    return Actor(kind="admin_key", id=rec.id, org=org, member=member_id, role=role,
                 grant=Grant(rec.permission, frozenset(rec.scopes)))


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
