"""Who may change the budgets, concurrency limits and alert thresholds of a key, a
project, a member or the organization, and the audit trail of every change; who may read
their usage history. The state itself: budgets.py, usage.py."""

from __future__ import annotations

from ..schema import names
from ..schema.keys import KeyType
from .budgets import Budgets, parse_change, parse_threshold_change
from .errors import Conflicting
from .policy import CLI, Actor, Resource, check
from .usage import UsageHistory


class LimitRules:
    """A ControlStore service (`store.limits`; its operations are the store's *_limits);
    `store` gives it the entity lookups,
    the key's policy resource and the audit log."""

    def __init__(self, store, budgets: Budgets, usage: UsageHistory):
        self.store = store
        self.budgets = budgets
        self.usage = usage

    # -- reads ---------------------------------------------------------------------------

    async def key_limits(self, org: str | None, key_id: str) -> dict:
        await self.store.keys.org_key(org, key_id)     # another organization's: 404
        return await self.budgets.of_key(key_id)

    async def project_limits(self, org: str, project_id: str) -> dict:
        await self.store.project(org, project_id)
        return await self.budgets.read(*self.budgets.where("project", org, project_id))

    async def member_limits(self, org: str, member_id: str) -> dict:
        await self.store.member(org, member_id)
        return await self.budgets.read(*self.budgets.where("member", org, member_id))

    async def org_limits(self, org: str) -> dict:
        await self.store.org(org)
        return await self.budgets.read(*self.budgets.where("organization", org, org))

    # -- changes -------------------------------------------------------------------------

    async def set_key_limits(self, org: str | None, key_id: str, req: dict,
                      actor: Actor = CLI) -> dict:
        change = parse_change(req)
        rec = await self.store.keys.org_key(org, key_id)
        check(actor, "key.limits", await self.store.keys.resources.resource(rec))
        if rec.type is KeyType.admin:
            raise Conflicting("budget: admin keys make no calls to budget", "budget")
        before = await self.budgets.of_key(key_id)
        after = await self.budgets.set_key(key_id, change)
        if rec.org:
            await self.store.audit.record(rec.org, actor, "key.limits_changed", "key",
                                          key_id, before, after)
        return after

    async def set_project_limits(self, org: str, project_id: str, req: dict,
                          actor: Actor = CLI) -> dict:
        change = parse_change(req)
        await self.store.project(org, project_id)
        check(actor, "project.limits", Resource("project", org, id=project_id))
        return await self._write(org, "project", project_id, change, actor)

    async def set_member_limits(self, org: str, member_id: str, req: dict,
                         actor: Actor = CLI) -> dict:
        change = parse_change(req)
        member = await self.store.member(org, member_id)
        check(actor, "member.limits", Resource("member", org, id=member_id, member=member_id,
                                               member_role=member["role"]))
        return await self._write(org, "member", member_id, change, actor)

    async def set_org_limits(self, org: str, req: dict, actor: Actor = CLI) -> dict:
        change = parse_change(req)
        await self.store.org(org)
        check(actor, "organization.limits", Resource("organization", org, id=org))
        return await self._write(org, "organization", org, change, actor)

    async def _write(self, org: str, level: str, entity_id: str, change,
                     actor: Actor) -> dict:
        where = self.budgets.where(level, org, entity_id)
        before = await self.budgets.read(*where)
        after = await self.budgets.write(*where, change)
        await self.store.audit.record(org, actor, f"{level}.limits_changed", level,
                                      entity_id, before, after)
        return after

    # -- alert thresholds (issue 12) -------------------------------------------------------

    async def thresholds_of_key(self, org: str | None, key_id: str) -> dict:
        await self.store.keys.org_key(org, key_id)
        return await self.budgets.thresholds(
            names.record(await self.budgets.key_hash(key_id)), "lim")

    async def thresholds_of(self, org: str, level: str, entity_id: str) -> dict:
        await self._entity(org, level, entity_id)
        return await self.budgets.thresholds(*self.budgets.where(level, org, entity_id))

    async def set_key_thresholds(self, org: str | None, key_id: str, req: dict,
                                 actor: Actor = CLI) -> dict:
        thresholds = parse_threshold_change(req)
        rec = await self.store.keys.org_key(org, key_id)
        check(actor, "key.limits", await self.store.keys.resources.resource(rec))
        if rec.type is KeyType.admin:
            raise Conflicting("thresholds: admin keys make no calls to alert on",
                              "thresholds")
        where = (names.record(await self.budgets.key_hash(key_id)), "lim")
        before = await self.budgets.thresholds(*where)
        after = await self.budgets.set_thresholds(*where, thresholds)
        if rec.org:
            await self.store.audit.record(rec.org, actor, "key.thresholds_changed", "key",
                                          key_id, before, after)
        return after

    async def set_thresholds(self, org: str, level: str, entity_id: str, req: dict,
                             actor: Actor = CLI) -> dict:
        """A project's or the organization's thresholds."""
        thresholds = parse_threshold_change(req)
        await self._entity(org, level, entity_id)
        check(actor, f"{level}.limits", Resource(level, org, id=entity_id))
        where = self.budgets.where(level, org, entity_id)
        before = await self.budgets.thresholds(*where)
        after = await self.budgets.set_thresholds(*where, thresholds)
        await self.store.audit.record(org, actor, f"{level}.thresholds_changed", level,
                                      entity_id, before, after)
        return after

    async def _entity(self, org: str, level: str, entity_id: str) -> None:
        if level == "project":
            await self.store.project(org, entity_id)
        else:
            await self.store.org(org)

    # -- usage history (issue 12) ----------------------------------------------------------

    async def usage_of_key(self, org: str | None, key_id: str,
                           since: str | None = None) -> dict:
        await self.store.keys.org_key(org, key_id)     # another organization's: 404
        tag = self.usage.key_tag(await self.budgets.key_hash(key_id))
        return {"key_id": key_id, **await self.usage.history(tag, key_id, since)}

    async def usage_of(self, org: str, level: str, entity_id: str,
                       since: str | None = None) -> dict:
        """A project's or the organization's (the keys minted on its tag)."""
        await self._entity(org, level, entity_id)
        out = await self.usage.history(self.usage.org_tag(org),
                                       names.level_field(level, entity_id), since)
        return {f"{level}_id": entity_id, **out}
