"""Who may change the budgets and concurrency limits of a key, a project, a member or
the organization, and the audit trail of every change. The state itself: budgets.py."""

from __future__ import annotations

from ..schema.keys import KeyType
from .budgets import Budgets, parse_change
from .errors import Conflicting
from .policy import CLI, Actor, Resource, check


class LimitRules:
    """A ControlStore service (`store.limits`; its operations are the store's *_limits);
    `store` gives it the entity lookups,
    the key's policy resource and the audit log."""

    def __init__(self, store, budgets: Budgets):
        self.store = store
        self.budgets = budgets

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
