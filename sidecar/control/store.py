"""ControlStore: organizations and what they hold, on Redis, with the page's rules.

Entities are plain hashes plus per-organization index sets, all under the org's hash tag
(see names.py). Keys stay in KeyStore; this module adds who may do what to them, the
cascades and rotation.

Write order, so that a failure never leaves something half-made:
- every check (fields, ids, rules) runs before the first write;
- a created thing is complete before anything points at it (record, then index);
- a removal takes effect first (keys disabled), then the entity and its indexes go in one
  MULTI/EXEC on the org's slot. A retry after a failure finishes the job.
"""

from __future__ import annotations

from ..schema import names
from ..schema.keys import KeyHasher
from .audit import AuditLog
from .checks import parse_when
from .entities import DEFAULT, EntityOps
from .errors import Conflict, NotFound
from .key_ops import KeyOps
from .keystore import KeyStore
from .subscriptions import SubscriptionOps
from .views import text
from .webhooks import WebhookOps

__all__ = ["ControlStore", "parse_when"]


class ControlStore(EntityOps, KeyOps, SubscriptionOps, WebhookOps):
    def __init__(self, redis, hasher: KeyHasher):
        self.redis = redis
        self.keys = KeyStore(redis, hasher)
        self.audit = AuditLog(redis)

    # -- bootstrap -----------------------------------------------------------------------

    async def bootstrap(self, org_name: str | None = None, user: str = "owner") -> dict:
        """The organization (if missing), an owner member, and a first admin key (all);
        nothing when the organization already has an active admin key."""
        if org_name is None or org_name == DEFAULT:
            org_id = await self.resolve_org(DEFAULT)
        else:
            try:
                org_id = await self.resolve_org(org_name)
            except NotFound:
                org_id = (await self.create_org(org_name))["id"]
        # Idempotent: an organization that already has a working admin key is bootstrapped;
        # a second run changes nothing (no second owner, no second key) and says so.
        cursor = 0
        while True:
            found, cursor = await self.list_keys(org_id, type_="admin", status="active",
                                                 limit=500, cursor=cursor)
            if found:
                return {"organization": await self.org(org_id), "changed": False,
                        "admin_key": found[0]}
            if not cursor:
                break
        held = await self.redis.hget(names.org_users(org_id), user)
        if held:
            member = await self.member(org_id, text(held))
            if member["role"] != "owner":
                raise Conflict(f"user: {user!r} is a {member['role']}, not an owner", "user")
        else:
            member = await self.add_member(org_id, user, "owner")
        key, plaintext = await self.create_key(org_id, {
            "type": "admin", "name": "bootstrap", "member_id": member["id"]})
        return {"organization": await self.org(org_id), "changed": True, "member": member,
                "admin_key": key, "key": plaintext}
