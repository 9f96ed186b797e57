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

import asyncio
import contextlib
import hashlib
from datetime import UTC, datetime
from importlib import resources

import orjson

from ..keys import KeyHasher, KeyType, new_id
from ..store import names
from ..store.keystore import (
    PERMISSION_NAMES,
    InvalidKeySpec,
    KeyError_,
    KeySpec,
    KeyStore,
    _iso,
    now_ms,
)
from ..store.keystore import view as key_view
from .audit import AuditLog
from .errors import Conflict, Conflicting, Forbidden, Invalid, NotFound, from_key_error
from .policy import (
    CLI,
    ROLES,
    Actor,
    Grant,
    check_admin_grant,
    check_user_key_owner,
    require,
)

DEFAULT = "default"                 # built-in organization and project of `keys create`
IDEMPOTENCY_TTL_S = 86_400
MAX_GRACE_S = 30 * 86_400
_CREATE_UNIQUE = resources.files(__package__).joinpath("create_unique.lua").read_bytes()


class ControlStore:
    def __init__(self, redis, hasher: KeyHasher):
        self.redis = redis
        self.keys = KeyStore(redis, hasher)
        self.audit = AuditLog(redis)
        self._create_unique = redis.register_script(_CREATE_UNIQUE)

    # -- organizations -------------------------------------------------------------

    async def create_org(self, name: str, actor: Actor = CLI) -> dict:
        _check_text(name, "name", required=True)
        org_id = new_id("org")
        if not await self.redis.hsetnx(names.ORG_NAMES, name, org_id):
            held = _s(await self.redis.hget(names.ORG_NAMES, name))
            if await self.redis.exists(names.org(held)):
                raise Conflict(f"name: an organization named {name!r} exists ({held})", "name")
            org_id = held   # a create that failed half-way: finish it under the same id
        rec = {"id": org_id, "nm": name, "ca": str(now_ms()), "cb": actor.created_by}
        await self.redis.hset(names.org(org_id), mapping=rec)
        await self.redis.hset(names.ORG_INDEX, org_id, name)
        out = _org_view(rec)
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
        if held and await self.redis.exists(names.org(_s(held))):
            return _s(held)
        raise NotFound(f"no organization with id or name {ref!r}", "org")

    async def org(self, org_id: str) -> dict:
        if org_id == DEFAULT:
            await self.ensure_default()
        return _org_view(await self._entity(names.org(org_id), "organization", org_id, "org"))

    async def list_orgs(self) -> list[dict]:
        ids = sorted(_s(i) for i in await self.redis.hkeys(names.ORG_INDEX))
        out = []
        for org_id in ids:
            raw = await self.redis.hgetall(names.org(org_id))
            if raw:
                out.append(_org_view(_decode(raw)))
        return out

    async def update_org(self, org_id: str, name: str, actor: Actor = CLI) -> dict:
        _check_text(name, "name", required=True)
        before = await self.org(org_id)
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
        _check_text(user, "user", required=True, limit=320)
        _check_text(name, "name")
        _check_role(role)
        if role == "owner":
            _require_owner(actor, "adding an owner")
        member_id = new_id("mem")
        rec = {"id": member_id, "org": org, "user": user, "nm": name, "role": role,
               "ca": str(now_ms()), "cb": actor.created_by}
        held = _s(await self._create_unique(
            keys=[names.org_users(org), names.member(org, member_id), names.org_members(org)],
            args=[user, member_id, *_pairs(rec)]))
        if held != member_id:
            raise Conflict(f"user: {user!r} is already a member ({held})", "user")
        out = _member_view(rec)
        await self.audit.record(org, actor, "member.added", "member", member_id, None, out)
        return out

    async def member(self, org: str, member_id: str) -> dict:
        return _member_view(await self._entity(names.member(org, member_id), "member",
                                               member_id, "member_id"))

    async def list_members(self, org: str, role: str | None = None) -> list[dict]:
        await self.org(org)
        views = await self._list(names.org_members(org), lambda i: names.member(org, i),
                                 _member_view)
        return [v for v in views if role is None or v["role"] == role]

    async def update_member(self, org: str, member_id: str, changes: dict,
                            actor: Actor = CLI) -> dict:
        before = await self.member(org, member_id)
        fields: dict[str, str] = {}
        if "name" in changes:
            _check_text(changes["name"], "name")
            fields["nm"] = changes["name"]
        if "role" in changes and changes["role"] != before["role"]:
            _check_role(changes["role"])
            if "owner" in (changes["role"], before["role"]):
                _require_owner(actor, "granting or taking the owner role")
            if before["role"] == "owner":
                await self._keep_an_owner(org, member_id, "role")
            fields["role"] = changes["role"]
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
        if before["role"] == "owner":
            _require_owner(actor, "removing an owner")
            await self._keep_an_owner(org, member_id, "member_id")
        disabled = await self.keys.disable_owned("mem:" + member_id, "member_removed")
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
        _check_text(name, "name", required=True)
        project_id = new_id("prj")
        rec = {"id": project_id, "org": org, "nm": name, "ca": str(now_ms()),
               "cb": actor.created_by}
        async with self.redis.pipeline(transaction=True) as tx:
            tx.hset(names.project(org, project_id), mapping=rec)
            tx.sadd(names.org_projects(org), project_id)
            await tx.execute()
        out = _project_view(rec)
        await self.audit.record(org, actor, "project.created", "project", project_id, None,
                                out)
        return out

    async def project(self, org: str, project_id: str) -> dict:
        if org == DEFAULT and project_id == DEFAULT:
            await self.ensure_default()
        return _project_view(await self._entity(names.project(org, project_id), "project",
                                                project_id, "project_id"))

    async def list_projects(self, org: str) -> list[dict]:
        await self.org(org)
        return await self._list(names.org_projects(org), lambda i: names.project(org, i),
                                _project_view)

    async def update_project(self, org: str, project_id: str, name: str,
                             actor: Actor = CLI) -> dict:
        before = await self.project(org, project_id)
        _check_text(name, "name", required=True)
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
        disabled = await self.keys.disable_owned("prj:" + project_id, "project_deleted")
        for sa in accounts:   # their keys are scoped to the project too; belt and braces
            disabled += await self.keys.disable_owned("sa:" + sa["id"], "project_deleted")
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
        _check_text(name, "name", required=True)
        sa_id = new_id("sa")
        rec = {"id": sa_id, "org": org, "prj": project_id, "nm": name, "ca": str(now_ms()),
               "cb": actor.created_by}
        async with self.redis.pipeline(transaction=True) as tx:
            tx.hset(names.service_account(org, sa_id), mapping=rec)
            tx.sadd(names.org_service_accounts(org), sa_id)
            await tx.execute()
        out = _sa_view(rec)
        await self.audit.record(org, actor, "service_account.created", "service_account",
                                sa_id, None, out)
        return out

    async def service_account(self, org: str, sa_id: str) -> dict:
        return _sa_view(await self._entity(names.service_account(org, sa_id),
                                           "service account", sa_id, "service_account_id"))

    async def list_service_accounts(self, org: str,
                                    project_id: str | None = None) -> list[dict]:
        if project_id is not None:
            await self.project(org, project_id)
        views = await self._list(names.org_service_accounts(org),
                                 lambda i: names.service_account(org, i), _sa_view)
        return [v for v in views if project_id is None or v["project_id"] == project_id]

    async def update_service_account(self, org: str, sa_id: str, name: str,
                                     actor: Actor = CLI) -> dict:
        before = await self.service_account(org, sa_id)
        _check_text(name, "name", required=True)
        await self.redis.hset(names.service_account(org, sa_id), "nm", name)
        after = await self.service_account(org, sa_id)
        await self.audit.record(org, actor, "service_account.updated", "service_account",
                                sa_id, before, after)
        return after

    async def delete_service_account(self, org: str, sa_id: str, actor: Actor = CLI) -> dict:
        before = await self.service_account(org, sa_id)
        disabled = await self.keys.disable_owned("sa:" + sa_id, "service_account_deleted")
        async with self.redis.pipeline(transaction=True) as tx:
            tx.delete(names.service_account(org, sa_id))
            tx.srem(names.org_service_accounts(org), sa_id)
            await tx.execute()
        after = {"deleted": True, "disabled_keys": disabled}
        await self.audit.record(org, actor, "service_account.deleted", "service_account",
                                sa_id, before, after)
        return {**before, **after}

    # -- keys --------------------------------------------------------------------------

    async def create_key(self, org: str, req: dict, actor: Actor = CLI) -> tuple[dict, str]:
        """A standard, org or admin key of the organization; (view, plaintext once).

        req uses the API's names: type, name, owner, project_id, member_id,
        service_account_id, quota, unlimited, models, allowed_ips, expires_at, rpm, tpm,
        permission, scopes, account.
        """
        await self.org(org)
        typ = req.get("type", "org")
        if typ == "subscription":
            raise Conflicting("type: subscription keys come with their plan: create a "
                              "subscription instead", "type")
        permission, scopes = req.get("permission", "all"), list(req.get("scopes") or [])
        _check_scopes_mode(permission, scopes)
        if req.get("quota") is not None and req.get("unlimited"):
            raise Conflicting("unlimited: give quota or unlimited, not both", "unlimited")
        spec = KeySpec(type=KeyType(typ), name=req.get("name", ""), quota=req.get("quota"),
                       unlimited=bool(req.get("unlimited")), models=req.get("models") or [],
                       ips=req.get("allowed_ips") or [], expires_at=req.get("expires_at"),
                       rpm=req.get("rpm") or 0, tpm=req.get("tpm") or 0,
                       permission=permission, scopes=scopes, org=org,
                       created_by=actor.created_by)
        if typ == "admin":
            await self._admin_key_owner(org, req, actor, spec)
        elif typ == "org":
            await self._org_key_owner(org, req, actor, spec)
        else:
            _refuse(req, ("owner", "project_id", "member_id", "service_account_id"),
                    "standard keys have no organization owner")
            spec.account = req.get("account") or None
        try:
            out, plaintext = await self.keys.create(spec)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        await self._recheck_owner(org, out)
        await self.audit.record(org, actor, "key.created", "key", out["id"], None, out)
        return out, plaintext

    async def _admin_key_owner(self, org: str, req: dict, actor: Actor, spec: KeySpec) -> None:
        _refuse(req, ("owner", "project_id", "service_account_id", "quota", "unlimited",
                      "models", "allowed_ips", "rpm", "tpm", "account"),
                "admin keys only administer; they carry no data-plane settings")
        require(actor, "admin_keys", "creating an admin key", "type")
        check_admin_grant(actor, Grant(spec.permission, frozenset(spec.scopes)))
        member_id = req.get("member_id")
        if actor.operator:
            if not member_id:
                raise Invalid("member_id: an admin key is tied to the member it is made for",
                              "member_id")
        elif member_id and member_id != actor.member:
            raise Forbidden("member_id: an admin key is tied to the membership of the member "
                            "who creates it", "member_id")
        else:
            member_id = actor.member
        if member_id:
            await self.member(org, member_id)
            spec.member = member_id

    async def _org_key_owner(self, org: str, req: dict, actor: Actor, spec: KeySpec) -> None:
        """Project, user or service-account key: check the owner and who may create it."""
        _refuse(req, ("account",), "org keys bill to the organization")
        owner = req.get("owner") or ("service_account" if req.get("service_account_id")
                                     else "user" if req.get("member_id") else "project")
        if owner == "project":
            _refuse(req, ("member_id", "service_account_id"), "a project key has no "
                    "member or service account owner")
            if not req.get("project_id"):
                raise Invalid("project_id: a project key needs its project", "project_id")
            require(actor, "manage_keys", "creating a project key", "owner")
            spec.project = (await self.project(org, req["project_id"]))["id"]
        elif owner == "user":
            _refuse(req, ("service_account_id",), "a user key is owned by a member")
            member_id = req.get("member_id") or actor.member
            if not member_id:
                raise Invalid("member_id: a user key needs the member who owns it",
                              "member_id")
            check_user_key_owner(actor, member_id)
            spec.member = (await self.member(org, member_id))["id"]
            if req.get("project_id"):
                spec.project = (await self.project(org, req["project_id"]))["id"]
        else:
            _refuse(req, ("member_id",), "a service-account key is owned by the account")
            if not req.get("service_account_id"):
                raise Invalid("service_account_id: a service-account key needs its account",
                              "service_account_id")
            require(actor, "manage_keys", "creating a service-account key", "owner")
            sa = await self.service_account(org, req["service_account_id"])
            if req.get("project_id") and req["project_id"] != sa["project_id"]:
                raise Conflicting(f"project_id: service account {sa['id']} belongs to "
                                  f"project {sa['project_id']}", "project_id")
            spec.service_account, spec.project = sa["id"], sa["project_id"]

    async def _recheck_owner(self, org: str, key: dict) -> None:
        """An owner removed while its key was being made: apply the cascade to it too."""
        checks = (("member_id", names.member, "member_removed"),
                  ("service_account_id", names.service_account, "service_account_deleted"),
                  ("project_id", names.project, "project_deleted"))
        for field, name_of, reason in checks:
            if key.get(field) and not await self.redis.exists(name_of(org, key[field])):
                await self.keys.set_status(key["id"], False, reason)

    async def org_key(self, org: str | None, key_id: str) -> dict[str, str]:
        """A key's record, only if it belongs to the organization (None: any key)."""
        try:
            _, rec = await self.keys.record(key_id)
        except KeyError_:
            raise NotFound(f"no key with id {key_id!r}", "key_id") from None
        if org is not None and rec.get("org") != org:
            raise NotFound(f"no key with id {key_id!r}", "key_id")
        return rec

    async def key(self, org: str | None, key_id: str) -> dict:
        return key_view(await self.org_key(org, key_id))

    async def list_keys(self, org: str, *, type_: str | None = None,
                        status: str | None = None, owner: str | None = None,
                        project_id: str | None = None, member_id: str | None = None,
                        service_account_id: str | None = None, limit: int = 100,
                        cursor: int = 0) -> tuple[list[dict], int]:
        await self.org(org)
        index = "org:" + org
        if service_account_id:
            index = "sa:" + (await self.service_account(org, service_account_id))["id"]
        elif member_id:
            index = "mem:" + (await self.member(org, member_id))["id"]
        elif project_id:
            index = "prj:" + (await self.project(org, project_id))["id"]
        views, cursor = await self.keys.list(type_, status, owner=index, cursor=cursor,
                                             limit=limit)
        views = [v for v in views if v["org_id"] == org and (
            owner is None or v["owner"] == owner) and (
            not project_id or v["project_id"] == project_id)]
        return views, cursor

    async def edit_key(self, org: str | None, key_id: str, changes: dict,
                       actor: Actor = CLI) -> dict:
        rec = await self.org_key(org, key_id)
        _require_key_control(actor, rec)
        admin = rec.get("t") == "a"
        if admin:
            _refuse(changes, ("models", "allowed_ips", "rpm", "tpm"),
                    "admin keys carry no data-plane settings")
        permission = changes.get("permission", PERMISSION_NAMES.get(rec.get("pm", "a")))
        if "scopes" in changes:
            _check_scopes_mode(permission, changes["scopes"])
        if admin and ("permission" in changes or "scopes" in changes):
            scopes = changes.get("scopes", [] if "permission" in changes else
                                 [s for s in rec.get("sc", "").split(",") if s])
            check_admin_grant(actor, Grant(permission, frozenset(scopes)))
        edits = {("ips" if k == "allowed_ips" else k): v for k, v in changes.items()}
        try:
            before, after = await self.keys.edit(key_id, edits)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        await self.audit.record(org or rec.get("org") or "-", actor, "key.updated", "key",
                                key_id, before, after)
        return after

    async def set_key_status(self, org: str | None, key_id: str, active: bool,
                             actor: Actor = CLI) -> dict:
        rec = await self.org_key(org, key_id)
        _require_key_control(actor, rec)
        before = await self.key(org, key_id)
        reason = "disabled by " + actor.created_by
        try:
            after = await self.keys.set_status(key_id, active, reason)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        await self.audit.record(org or rec.get("org") or "-", actor,
                                "key.enabled" if active else "key.disabled", "key", key_id,
                                before, after)
        return after

    async def delete_key(self, org: str | None, key_id: str, actor: Actor = CLI) -> dict:
        rec = await self.org_key(org, key_id)
        _require_key_control(actor, rec)
        before = await self.key(org, key_id)
        await self.keys.delete(key_id)
        await self.audit.record(org or rec.get("org") or "-", actor, "key.deleted", "key",
                                key_id, before, None)
        return {"id": key_id, "object": "key", "deleted": True}

    async def set_key_quota(self, org: str | None, key_id: str, *, set_to: int | None = None,
                            add: int | None = None, unlimited: bool = False,
                            actor: Actor = CLI) -> dict:
        given = [n for n, v in (("set", set_to), ("add", add)) if v is not None]
        if unlimited:
            given.append("unlimited")
        if len(given) != 1:
            raise Conflicting("quota: give exactly one of set, add, unlimited",
                              given[-1] if given else "set")
        rec = await self.org_key(org, key_id)
        _require_key_control(actor, rec)
        if rec.get("t") == "a":
            raise Conflicting("quota: admin keys have no quota", "set")
        before = await self.key(org, key_id)
        try:
            if unlimited:
                after = await self.keys.set_quota(key_id, None)
            elif add is not None:
                after = await self.keys.set_quota(key_id, add, add=True)
            else:
                after = await self.keys.set_quota(key_id, set_to)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        await self.audit.record(org or rec.get("org") or "-", actor, "key.quota_changed",
                                "key", key_id, before, after)
        return after

    async def rotate_key(self, org: str | None, key_id: str, grace_s: int = 0,
                         idempotency_key: str | None = None,
                         actor: Actor = CLI) -> dict:
        """A successor with the same settings; the old key ends now or after grace_s.

        With an idempotency key the result is remembered for a day: the same request
        again returns the same new key id (without its plaintext, which is never stored)
        and mints nothing. A concurrent duplicate waits for the first to finish.
        """
        if not 0 <= grace_s <= MAX_GRACE_S:
            raise Invalid(f"grace_seconds: must be between 0 and {MAX_GRACE_S}",
                          "grace_seconds")
        rec = await self.org_key(org, key_id)
        _require_key_control(actor, rec)
        if rec.get("t") == "o" and rec.get("mem"):
            check_user_key_owner(actor, rec["mem"])
        if rec.get("t") == "a":
            check_admin_grant(actor, Grant(PERMISSION_NAMES.get(rec.get("pm", "a"), "all"),
                                           frozenset(s for s in rec.get("sc", "").split(",")
                                                     if s)))
        scope = org or rec.get("org") or "-"
        slot = None
        if idempotency_key is not None:
            _check_text(idempotency_key, "idempotency_key", required=True)
            digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
            slot = names.idempotency(scope, digest)
            replay = await self._claim(slot, key_id)
            if replay:
                return {**await self.key(org, replay), "key": None, "replayed": True,
                        "old_key": await self.key(org, key_id)}
        try:
            new, plaintext, old = await self.keys.rotate(key_id, grace_s * 1000,
                                                         actor.created_by)
        except BaseException as exc:
            if slot:
                await self.redis.delete(slot)
            if isinstance(exc, InvalidKeySpec | KeyError_):
                raise from_key_error(exc) from None
            raise
        if slot:
            await self.redis.set(slot, orjson.dumps({"key_id": key_id, "new_id": new["id"]}),
                                 ex=IDEMPOTENCY_TTL_S)
        if rec.get("sub") and rec.get("org"):
            await self.redis.hset(names.subscription(rec["org"], rec["sub"]), "key", new["id"])
        await self.audit.record(scope, actor, "key.rotated", "key", key_id,
                                {"key": key_view(rec)},
                                {"key": old, "new_key": new, "grace_seconds": grace_s})
        return {**new, "key": plaintext, "replayed": False, "old_key": old}

    async def _claim(self, slot: str, key_id: str) -> str | None:
        """Take the idempotency slot, or return the new key id a finished twin made."""
        pending = orjson.dumps({"key_id": key_id})
        for _ in range(100):                       # ~2 s at most behind a running twin
            if await self.redis.set(slot, pending, nx=True, ex=IDEMPOTENCY_TTL_S):
                return None
            raw = await self.redis.get(slot)
            if raw is None:
                continue
            held = orjson.loads(raw)
            if held.get("key_id") != key_id:
                raise Conflict("idempotency_key: already used to rotate another key",
                               "idempotency_key")
            if held.get("new_id"):
                return held["new_id"]
            await asyncio.sleep(0.02)
        raise Conflict("idempotency_key: the same rotation is still running; retry",
                       "idempotency_key")

    # -- subscriptions -----------------------------------------------------------------

    async def create_subscription(self, org: str, req: dict,
                                  actor: Actor = CLI) -> tuple[dict, str]:
        """A plan with a cycle quota and its auto-created sk-sub- key (plaintext once)."""
        await self.org(org)
        account = req.get("account", "")
        _check_text(account, "account", required=True)
        plan = req.get("plan", "")
        _check_text(plan, "plan", required=True)
        require(actor, "manage_keys", "creating a subscription", "account")
        if await self.redis.hexists(names.org_subscriptions(org), account):
            raise Conflict(f"account: {account!r} already has a subscription", "account")
        sub_id = new_id("sub")
        spec = KeySpec(type=KeyType.subscription, name=req.get("name") or f"{plan} plan",
                       quota=req.get("cycle_quota"), cycle_days=req.get("cycle_days", 30),
                       payg_fallback=bool(req.get("payg_fallback")), account=account,
                       org=org, subscription=sub_id, created_by=actor.created_by)
        if spec.quota is None:
            raise Invalid("cycle_quota: required", "cycle_quota")
        try:
            key, plaintext = await self.keys.create(spec)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        rec = {"id": sub_id, "org": org, "acct": account, "plan": plan, "key": key["id"],
               "ca": str(now_ms()), "cb": actor.created_by}
        held = _s(await self._create_unique(
            keys=[names.org_subscriptions(org), names.subscription(org, sub_id)],
            args=[account, sub_id, *_pairs(rec)]))
        if held != sub_id:      # a concurrent twin won: take back the key just made
            await self.keys.delete(key["id"])
            raise Conflict(f"account: {account!r} already has a subscription", "account")
        out = await self.subscription(org, sub_id)
        await self.audit.record(org, actor, "subscription.created", "subscription", sub_id,
                                None, out)
        return out, plaintext

    async def subscription(self, org: str, sub_id: str) -> dict:
        rec = await self._entity(names.subscription(org, sub_id), "subscription", sub_id,
                                 "subscription_id")
        try:
            key = await self.keys.get(rec["key"])
        except KeyError_:
            key = None
        return {"object": "subscription", "id": rec["id"], "org_id": rec["org"],
                "account": rec["acct"], "plan": rec["plan"], "key_id": rec["key"],
                "status": key["status"] if key else "deleted",
                **_cycle(key), "payg_balance": await self.keys.balance(rec["acct"]),
                "created_at": _iso(rec.get("ca")), "created_by": rec.get("cb") or None}

    async def list_subscriptions(self, org: str) -> list[dict]:
        await self.org(org)
        ids = sorted(_s(i) for i in await self.redis.hvals(names.org_subscriptions(org)))
        out = []
        for sub_id in ids:
            try:
                out.append(await self.subscription(org, sub_id))
            except NotFound:
                continue
        return sorted(out, key=lambda v: (v["created_at"] or "", v["id"]))

    async def update_subscription(self, org: str, sub_id: str, changes: dict,
                                  actor: Actor = CLI) -> dict:
        before = await self.subscription(org, sub_id)
        require(actor, "manage_keys", "changing a subscription", "plan")
        if "plan" in changes:
            _check_text(changes["plan"], "plan", required=True)
        try:
            if changes.get("cycle_quota") is not None:
                await self.keys.set_quota(before["key_id"], changes["cycle_quota"])
            if changes.get("payg_fallback") is not None:
                await self.keys.update(before["key_id"],
                                       {"pg": "1" if changes["payg_fallback"] else "0"})
        except (InvalidKeySpec, KeyError_) as exc:
            raise from_key_error(exc) from None
        if "plan" in changes:
            await self.redis.hset(names.subscription(org, sub_id), "plan", changes["plan"])
        after = await self.subscription(org, sub_id)
        await self.audit.record(org, actor, "subscription.updated", "subscription", sub_id,
                                before, after)
        return after

    async def cancel_subscription(self, org: str, sub_id: str, actor: Actor = CLI) -> dict:
        before = await self.subscription(org, sub_id)
        require(actor, "manage_keys", "cancelling a subscription", "subscription_id")
        with contextlib.suppress(KeyError_):
            await self.keys.set_status(before["key_id"], False, "subscription_cancelled")
        async with self.redis.pipeline(transaction=True) as tx:
            tx.delete(names.subscription(org, sub_id))
            tx.hdel(names.org_subscriptions(org), before["account"])
            await tx.execute()
        after = {"deleted": True, "disabled_keys": [before["key_id"]]}
        await self.audit.record(org, actor, "subscription.cancelled", "subscription", sub_id,
                                before, after)
        return {**before, **after}

    # -- bootstrap -----------------------------------------------------------------------

    async def bootstrap(self, org_name: str | None = None, user: str = "owner") -> dict:
        """The organization (if missing), an owner member, and a first admin key (all)."""
        if org_name is None or org_name == DEFAULT:
            org_id = await self.resolve_org(DEFAULT)
        else:
            try:
                org_id = await self.resolve_org(org_name)
            except NotFound:
                org_id = (await self.create_org(org_name))["id"]
        held = await self.redis.hget(names.org_users(org_id), user)
        if held:
            member = await self.member(org_id, _s(held))
            if member["role"] != "owner":
                raise Conflict(f"user: {user!r} is a {member['role']}, not an owner", "user")
        else:
            member = await self.add_member(org_id, user, "owner")
        key, plaintext = await self.create_key(org_id, {
            "type": "admin", "name": "bootstrap", "member_id": member["id"]})
        return {"organization": await self.org(org_id), "member": member,
                "admin_key": key, "key": plaintext}

    # -- helpers -------------------------------------------------------------------------

    async def _entity(self, key: str, what: str, entity_id: str, param: str) -> dict:
        raw = await self.redis.hgetall(key)
        if not raw:
            raise NotFound(f"no {what} with id {entity_id!r}", param)
        return _decode(raw)

    async def _list(self, index: str, name_of, view_of) -> list[dict]:
        ids = [_s(i) for i in await self.redis.smembers(index)]
        out = []
        for entity_id in ids:
            raw = await self.redis.hgetall(name_of(entity_id))
            if raw:
                out.append(view_of(_decode(raw)))
        return sorted(out, key=lambda v: (v["created_at"] or "", v["id"]))


def _require_key_control(actor: Actor, rec: dict[str, str]) -> None:
    """Admin keys need admin-key rights; a member controls their own user keys; the rest
    needs key management."""
    if rec.get("t") == "a":
        require(actor, "admin_keys", "changing an admin key", "key_id")
    elif not (rec.get("t") == "o" and rec.get("mem") and rec["mem"] == actor.member):
        require(actor, "manage_keys", "changing this key", "key_id")


def _check_scopes_mode(permission: str, scopes: list[str]) -> None:
    if scopes and permission != "restricted":
        raise Conflicting("scopes: only a restricted key has scopes (permission is "
                          f"{permission!r})", "scopes")


def _refuse(req: dict, fields: tuple[str, ...], why: str) -> None:
    for field in fields:
        if req.get(field) not in (None, False, [], ""):
            raise Conflicting(f"{field}: {why}", field)


def _check_text(value, param: str, required: bool = False, limit: int = 200) -> None:
    if not isinstance(value, str):
        raise Invalid(f"{param}: must be a string", param)
    if required and not value.strip():
        raise Invalid(f"{param}: must not be empty", param)
    if len(value) > limit:
        raise Invalid(f"{param}: at most {limit} characters", param)
    if any(ord(c) < 32 for c in value):
        raise Invalid(f"{param}: control characters are not allowed", param)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise Invalid(f"role: one of {', '.join(ROLES)}", "role")


def _require_owner(actor: Actor, what: str) -> None:
    if not actor.operator and actor.role not in (None, "owner"):
        raise Forbidden(f"{what} needs an owner (your role: {actor.role})", "role")


def _cycle(key: dict | None) -> dict:
    sub = (key or {}).get("subscription") or {}
    return {"cycle_quota": sub.get("cycle_quota", 0), "cycle_used": sub.get("cycle_used", 0),
            "cycle_remaining": sub.get("cycle_remaining", 0),
            "cycle_days": sub.get("cycle_days", 0), "renews_at": sub.get("renews_at"),
            "payg_fallback": bool(sub.get("payg_fallback")),
            "payg_used": sub.get("payg_used", 0)}


def _org_view(rec: dict[str, str]) -> dict:
    return {"object": "organization", "id": rec["id"], "name": rec.get("nm", ""),
            "created_at": _iso(rec.get("ca")), "created_by": rec.get("cb") or None}


def _member_view(rec: dict[str, str]) -> dict:
    return {"object": "member", "id": rec["id"], "org_id": rec.get("org"),
            "user": rec.get("user", ""), "name": rec.get("nm", ""),
            "role": rec.get("role", "member"), "created_at": _iso(rec.get("ca")),
            "created_by": rec.get("cb") or None}


def _project_view(rec: dict[str, str]) -> dict:
    return {"object": "project", "id": rec["id"], "org_id": rec.get("org"),
            "name": rec.get("nm", ""), "created_at": _iso(rec.get("ca")),
            "created_by": rec.get("cb") or None}


def _sa_view(rec: dict[str, str]) -> dict:
    return {"object": "service_account", "id": rec["id"], "org_id": rec.get("org"),
            "project_id": rec.get("prj"), "name": rec.get("nm", ""),
            "created_at": _iso(rec.get("ca")), "created_by": rec.get("cb") or None}


def _pairs(rec: dict[str, str]) -> list[str]:
    return [x for kv in rec.items() for x in kv]


def _decode(raw: dict) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in raw.items()}


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_when(text: str, param: str = "expires_at") -> datetime:
    """An ISO-8601 date-time (Z allowed); naive means UTC."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise Invalid(f"{param}: {text!r} is not an ISO-8601 date-time", param) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
