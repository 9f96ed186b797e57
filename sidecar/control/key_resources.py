"""Keys as the authority model sees them (policy.Resource): org, type, owning member and
that member's role now. Key operations and the entity cascades both ask."""

from __future__ import annotations

from ..schema import names
from ..schema.record import CASCADE_REASONS, KeyRecord
from .key_spec import KeyError_
from .keystore import KeyStore
from .policy import Grant, Resource
from .views import text


class KeyResources:
    def __init__(self, redis, keystore: KeyStore):
        self.redis = redis
        self.keystore = keystore

    async def role(self, org: str | None, member_id: str | None) -> str | None:
        """A member's role now (None: no such member, e.g. removed)."""
        if not org or not member_id:
            return None
        role = await self.redis.hget(names.member(org, member_id), "role")
        return text(role) if role is not None else None

    async def resource(self, rec: KeyRecord, grant: Grant | None = None) -> Resource:
        """A key as the policy sees it: its org, type, owning member and their role."""
        org, member = rec.org or None, rec.member or None
        return Resource("key", org, id=rec.id or None, member=member,
                        key_type=rec.type.value, member_role=await self.role(org, member),
                        grant=grant)

    async def cascade(self, *owners: str) -> tuple[Resource, ...]:
        """The keys a cascade over these owner indexes ('prj:<id>', ...) would disable."""
        found: dict[str, Resource] = {}
        for owner in owners:
            for key_id in sorted(text(i) for i in
                                 await self.redis.smembers(names.owner_index(owner))):
                try:
                    _, rec = await self.keystore.load(key_id)
                except KeyError_:
                    continue
                if key_id not in found and rec.disabled_reason not in CASCADE_REASONS:
                    found[key_id] = await self.resource(rec)
        return tuple(found.values())
