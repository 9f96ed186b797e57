"""Organizations, members, projects and service accounts: hashes plus per-org index sets,
all under the org's hash tag, so an entity and its indexes change in one MULTI/EXEC."""

from __future__ import annotations

from ..redis.runner import run_script
from ..schema import names
from ..schema.contracts import CreateUniqueArgs, CreateUniqueReply
from ..schema.keys import new_id
from ..schema.record import now_ms
from ..schema.scripts import CREATE_UNIQUE
from .audit import AuditLog
from .checks import check_role, check_text
from .errors import Conflict, NotFound
from .input_limits import MAX_USER
from .key_resources import KeyResources
from .keystore import KeyStore
from .policy import CLI, Actor, Resource, check
from .views import decode, member_view, org_view, pairs, project_view, sa_view, text

DEFAULT = "default"                 # built-in organization and project of `keys create`


class Entities:
    """Organizations, members, projects, service accounts; removals cascade to keys."""

    def __init__(self, redis, audit: AuditLog, keystore: KeyStore, resources: KeyResources):
        self.redis = redis
        self.audit = audit
        self.keystore = keystore
        self.resources = resources

    async def create_unique(self, call: CreateUniqueArgs) -> str:
        """create_unique.lua: the id holding the name (call.new_id when created)."""
        raw = await run_script(self.redis, CREATE_UNIQUE, call.keys(), call.argv())
        return CreateUniqueReply.parse(raw).held

    # -- organizations -------------------------------------------------------------

    async def create_org(self, name: str, actor: Actor = CLI) -> dict:
        check_text(name, "name", required=True)
        org_id = new_id("org")
        if not await self.redis.hsetnx(names.ORG_NAMES, name, org_id):
            held = text(await self.redis.hget(names.ORG_NAMES, name))
            if await self.redis.exists(names.org(held)):
                raise Conflict(f"name: an organization named {name!r} exists ({held})", "name")
            org_id = held   # a create that failed half-way: finish it under the same id
        rec = {"id": org_id, "nm": name, "ca": str(now_ms()), "cb": actor.created_by}
        await self.redis.hset(names.org(org_id), mapping=rec)
        await self.redis.hset(names.ORG_INDEX, org_id, name)
        out = org_view(rec)
        await self.audit.record(org_id, actor, "organization.created", "organization",
                                org_id, None, out)
        return out

    async def ensure_default(self) -> None:
        """The built-in `default` organization and project (`keys create --type org`)."""
        if await self.redis.exists(names.project(DEFAULT, DEFAULT)):
            return
        now = str(now_ms())
        for key, extra in ((names.org(DEFAULT), {}), (names.project(DEFAULT, DEFAULT),
                                                     {"org": DEFAULT})):
            for field, value in {"id": DEFAULT, "nm": DEFAULT, "ca": now, "cb": "builtin",
                                 **extra}.items():
                await self.redis.hsetnx(key, field, value)
        await self.redis.hsetnx(names.ORG_INDEX, DEFAULT, DEFAULT)
        await self.redis.hsetnx(names.ORG_NAMES, DEFAULT, DEFAULT)
        await self.redis.sadd(names.org_projects(DEFAULT), DEFAULT)

    async def resolve_org(self, ref: str) -> str:
        """An organization id from an id or a name (CLI convenience)."""
        if ref == DEFAULT:
            await self.ensure_default()
        if await self.redis.exists(names.org(ref)):
            return ref
        held = await self.redis.hget(names.ORG_NAMES, ref)
        if held and await self.redis.exists(names.org(text(held))):
            return text(held)
        raise NotFound(f"no organization with id or name {ref!r}", "org")

    async def org(self, org_id: str) -> dict:
        if org_id == DEFAULT:
            await self.ensure_default()
        return org_view(await self.entity(names.org(org_id), "organization", org_id, "org"))

    async def list_orgs(self) -> list[dict]:
        ids = sorted(text(i) for i in await self.redis.hkeys(names.ORG_INDEX))
        out = []
        for org_id in ids:
            raw = await self.redis.hgetall(names.org(org_id))
            if raw:
                out.append(org_view(decode(raw)))
        return out

    async def update_org(self, org_id: str, name: str, actor: Actor = CLI) -> dict:
        check_text(name, "name", required=True)
        before = await self.org(org_id)
        check(actor, "organization.update", Resource("organization", org_id, id=org_id))
        if name != before["name"]:
            if not await self.redis.hsetnx(names.ORG_NAMES, name, org_id):
                raise Conflict(f"name: an organization named {name!r} exists", "name")
            await self.redis.hset(names.org(org_id), "nm", name)
            await self.redis.hset(names.ORG_INDEX, org_id, name)
            await self.redis.hdel(names.ORG_NAMES, before["name"])
        after = await self.org(org_id)
        await self.audit.record(org_id, actor, "organization.updated", "organization",
                                org_id, before, after)
        return after

    # -- members ---------------------------------------------------------------------

    async def add_member(self, org: str, user: str, role: str = "member", name: str = "",
                         actor: Actor = CLI) -> dict:
        await self.org(org)
        check_text(user, "user", required=True, limit=MAX_USER)
        check_text(name, "name")
        check_role(role)
        check(actor, "member.add", Resource("member", org, role=role))
        member_id = new_id("mem")
        rec = {"id": member_id, "org": org, "user": user, "nm": name, "role": role,
               "ca": str(now_ms()), "cb": actor.created_by}
        held = await self.create_unique(CreateUniqueArgs(
            names.org_users(org), names.member(org, member_id), names.org_members(org), user,
            member_id, tuple(pairs(rec))))
        if held != member_id:
            raise Conflict(f"user: {user!r} is already a member ({held})", "user")
        out = member_view(rec)
        await self.audit.record(org, actor, "member.added", "member", member_id, None, out)
        return out

    async def member(self, org: str, member_id: str) -> dict:
        return member_view(await self.entity(names.member(org, member_id), "member",
                                               member_id, "member_id"))

    async def list_members(self, org: str, role: str | None = None) -> list[dict]:
        await self.org(org)
        views = await self._list(names.org_members(org), lambda i: names.member(org, i),
                                 member_view)
        return [v for v in views if role is None or v["role"] == role]

    async def update_member(self, org: str, member_id: str, changes: dict,
                            actor: Actor = CLI) -> dict:
        before = await self.member(org, member_id)
        fields: dict[str, str] = {}
        if "name" in changes:
            check_text(changes["name"], "name")
            fields["nm"] = changes["name"]
        role = changes.get("role")
        if role is not None:
            check_role(role)
        check(actor, "member.update", Resource(
            "member", org, id=member_id, member=member_id, member_role=before["role"],
            role=role if role != before["role"] else None))
        if role is not None and role != before["role"]:
            if before["role"] == "owner":
                await self._keep_an_owner(org, member_id, "role")
            fields["role"] = role
        if fields:
            await self.redis.hset(names.member(org, member_id), mapping=fields)
        after = await self.member(org, member_id)
        await self.audit.record(org, actor, "member.updated", "member", member_id, before,
                                after)
        return after

    async def remove_member(self, org: str, member_id: str, actor: Actor = CLI) -> dict:
        """The page: the member's user keys and the admin keys tied to the membership are
        disabled (each key record is written, so the next authorize call refuses it)."""
        before = await self.member(org, member_id)
        check(actor, "member.remove", Resource(
            "member", org, id=member_id, member=member_id, member_role=before["role"],
            touches=await self.resources.cascade("mem:" + member_id)))
        if before["role"] == "owner":
            await self._keep_an_owner(org, member_id, "member_id")
        disabled = await self.keystore.disable_owned("mem:" + member_id, "member_removed")
        async with self.redis.pipeline(transaction=True) as tx:
            tx.delete(names.member(org, member_id))
            tx.srem(names.org_members(org), member_id)
            tx.hdel(names.org_users(org), before["user"])
            await tx.execute()
        after = {"deleted": True, "disabled_keys": disabled}
        await self.audit.record(org, actor, "member.removed", "member", member_id, before,
                                after)
        return {**before, **after}

    async def _keep_an_owner(self, org: str, member_id: str, param: str) -> None:
        owners = [m for m in await self.list_members(org, "owner") if m["id"] != member_id]
        if not owners:
            raise Conflict(f"{param}: an organization keeps at least one owner", param)

    # -- projects --------------------------------------------------------------------

    async def create_project(self, org: str, name: str, actor: Actor = CLI) -> dict:
        await self.org(org)
        check_text(name, "name", required=True)
        check(actor, "project.create", Resource("project", org))
        project_id = new_id("prj")
        rec = {"id": project_id, "org": org, "nm": name, "ca": str(now_ms()),
               "cb": actor.created_by}
        async with self.redis.pipeline(transaction=True) as tx:
            tx.hset(names.project(org, project_id), mapping=rec)
            tx.sadd(names.org_projects(org), project_id)
            await tx.execute()
        out = project_view(rec)
        await self.audit.record(org, actor, "project.created", "project", project_id, None,
                                out)
        return out

    async def project(self, org: str, project_id: str) -> dict:
        if org == DEFAULT and project_id == DEFAULT:
            await self.ensure_default()
        return project_view(await self.entity(names.project(org, project_id), "project",
                                                project_id, "project_id"))

    async def list_projects(self, org: str) -> list[dict]:
        await self.org(org)
        return await self._list(names.org_projects(org), lambda i: names.project(org, i),
                                project_view)

    async def update_project(self, org: str, project_id: str, name: str,
                             actor: Actor = CLI) -> dict:
        before = await self.project(org, project_id)
        check_text(name, "name", required=True)
        check(actor, "project.update", Resource("project", org, id=project_id))
        await self.redis.hset(names.project(org, project_id), "nm", name)
        after = await self.project(org, project_id)
        await self.audit.record(org, actor, "project.updated", "project", project_id, before,
                                after)
        return after

    async def delete_project(self, org: str, project_id: str, actor: Actor = CLI) -> dict:
        """Disables every key scoped to the project (project, user and service-account
        keys) and deletes its service accounts."""
        before = await self.project(org, project_id)
        if org == DEFAULT and project_id == DEFAULT:
            raise Conflict("project_id: the built-in default project cannot be deleted",
                           "project_id")
        accounts = await self.list_service_accounts(org, project_id)
        check(actor, "project.delete", Resource("project", org, id=project_id, touches=(
            await self.resources.cascade("prj:" + project_id,
                                    *("sa:" + sa["id"] for sa in accounts)))))
        disabled = await self.keystore.disable_owned("prj:" + project_id, "project_deleted")
        for sa in accounts:   # their keys are scoped to the project too; belt and braces
            disabled += await self.keystore.disable_owned("sa:" + sa["id"], "project_deleted")
        async with self.redis.pipeline(transaction=True) as tx:
            for sa in accounts:
                tx.delete(names.service_account(org, sa["id"]))
                tx.srem(names.org_service_accounts(org), sa["id"])
            tx.delete(names.project(org, project_id))
            tx.srem(names.org_projects(org), project_id)
            await tx.execute()
        after = {"deleted": True, "disabled_keys": sorted(set(disabled)),
                 "deleted_service_accounts": [sa["id"] for sa in accounts]}
        await self.audit.record(org, actor, "project.deleted", "project", project_id, before,
                                after)
        return {**before, **after}

    # -- service accounts ------------------------------------------------------------

    async def create_service_account(self, org: str, project_id: str, name: str,
                                     actor: Actor = CLI) -> dict:
        await self.project(org, project_id)
        check_text(name, "name", required=True)
        check(actor, "service_account.create", Resource("service_account", org))
        sa_id = new_id("sa")
        rec = {"id": sa_id, "org": org, "prj": project_id, "nm": name, "ca": str(now_ms()),
               "cb": actor.created_by}
        async with self.redis.pipeline(transaction=True) as tx:
            tx.hset(names.service_account(org, sa_id), mapping=rec)
            tx.sadd(names.org_service_accounts(org), sa_id)
            await tx.execute()
        out = sa_view(rec)
        await self.audit.record(org, actor, "service_account.created", "service_account",
                                sa_id, None, out)
        return out

    async def service_account(self, org: str, sa_id: str) -> dict:
        return sa_view(await self.entity(names.service_account(org, sa_id),
                                           "service account", sa_id, "service_account_id"))

    async def list_service_accounts(self, org: str,
                                    project_id: str | None = None) -> list[dict]:
        if project_id is not None:
            await self.project(org, project_id)
        views = await self._list(names.org_service_accounts(org),
                                 lambda i: names.service_account(org, i), sa_view)
        return [v for v in views if project_id is None or v["project_id"] == project_id]

    async def update_service_account(self, org: str, sa_id: str, name: str,
                                     actor: Actor = CLI) -> dict:
        before = await self.service_account(org, sa_id)
        check_text(name, "name", required=True)
        check(actor, "service_account.update", Resource("service_account", org, id=sa_id))
        await self.redis.hset(names.service_account(org, sa_id), "nm", name)
        after = await self.service_account(org, sa_id)
        await self.audit.record(org, actor, "service_account.updated", "service_account",
                                sa_id, before, after)
        return after

    async def delete_service_account(self, org: str, sa_id: str, actor: Actor = CLI) -> dict:
        before = await self.service_account(org, sa_id)
        check(actor, "service_account.delete", Resource(
            "service_account", org, id=sa_id, touches=await self.resources.cascade("sa:" + sa_id)))
        disabled = await self.keystore.disable_owned("sa:" + sa_id, "service_account_deleted")
        async with self.redis.pipeline(transaction=True) as tx:
            tx.delete(names.service_account(org, sa_id))
            tx.srem(names.org_service_accounts(org), sa_id)
            await tx.execute()
        after = {"deleted": True, "disabled_keys": disabled}
        await self.audit.record(org, actor, "service_account.deleted", "service_account",
                                sa_id, before, after)
        return {**before, **after}

    # -- helpers -------------------------------------------------------------------------

    async def entity(self, key: str, what: str, entity_id: str, param: str) -> dict:
        raw = await self.redis.hgetall(key)
        if not raw:
            raise NotFound(f"no {what} with id {entity_id!r}", param)
        return decode(raw)

    async def _list(self, index: str, name_of, view_of) -> list[dict]:
        ids = [text(i) for i in await self.redis.smembers(index)]
        out = []
        for entity_id in ids:
            raw = await self.redis.hgetall(name_of(entity_id))
            if raw:
                out.append(view_of(decode(raw)))
        return sorted(out, key=lambda v: (v["created_at"] or "", v["id"]))
