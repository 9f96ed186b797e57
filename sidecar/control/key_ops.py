"""Key operations inside an organization: who may create which key (project, user,
service-account, admin), edits, status, quota, and rotation with idempotency."""

from __future__ import annotations

import asyncio
import hashlib

import orjson

from ..schema import names
from ..schema.keys import KeyType
from ..schema.record import ALL, KeyRecord
from .audit import AuditLog
from .budgets import initial_limits
from .checks import check_scopes_mode, check_text, refuse
from .entities import Entities
from .errors import Conflict, Conflicting, Invalid, NotFound, from_key_error
from .input_limits import DEFAULT_PAGE, MAX_GRACE_S, MAX_PAGE
from .key_resources import KeyResources
from .key_rotation import KeyRotation
from .key_spec import InvalidKeySpec, KeyError_, KeySpec
from .key_view import view as key_view
from .keystore import KeyStore
from .policy import CLI, Actor, Grant, Resource, check, check_admin_scopes

IDEMPOTENCY_TTL_S = 86_400


class KeyOps:
    """Keys of an organization (and the operator's standalone keys), with the rules."""

    def __init__(self, redis, audit: AuditLog, keystore: KeyStore, entities: Entities,
                 resources: KeyResources):
        self.redis = redis
        self.audit = audit
        self.keystore = keystore
        self.rotation = KeyRotation(keystore)
        self.entities = entities
        self.resources = resources

    # -- keys --------------------------------------------------------------------------

    async def create_key(self, org: str, req: dict, actor: Actor = CLI) -> tuple[dict, str]:
        """A standard, org or admin key of the organization; (view, plaintext once).

        req uses the API's names: type, name, owner, project_id, member_id,
        service_account_id, quota, unlimited, models, allowed_ips, expires_at, rpm, tpm,
        permission, scopes, account.
        """
        await self.entities.org(org)
        typ = req.get("type", "org")
        if typ == "subscription":
            raise Conflicting("type: subscription keys come with their plan: create a "
                              "subscription instead", "type")
        spec = _spec(typ, req, org, actor)
        if typ == "admin":
            await self._admin_key_owner(org, req, actor, spec)
        elif typ == "org":
            await self._org_key_owner(org, req, actor, spec)
        else:
            refuse(req, ("owner", "project_id", "member_id", "service_account_id"),
                    "standard keys have no organization owner")
            spec.account = req.get("account") or None
        grant = Grant(spec.permission, frozenset(spec.scopes)) if typ == "admin" else None
        check(actor, "key.create", Resource(
            "key", org, member=spec.member or None, key_type=typ, grant=grant,
            member_role=await self.resources.role(org, spec.member)))
        try:
            out, plaintext = await self.keystore.create(spec)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        await self._recheck_owner(org, out)
        await self.audit.record(org, actor, "key.created", "key", out["id"], None, out)
        return out, plaintext

    async def create_standalone_key(self, req: dict,
                                    actor: Actor = CLI) -> tuple[dict, str]:
        """A standard or subscription key outside any organization (the operator's
        `sidecar keys create` without --org): create_key's checks, plus the billing
        cycle (cycle_days, payg_fallback) of a subscription key with no plan. It has no
        organization, so no organization's audit log (see _audit_key)."""
        typ = req.get("type", "standard")
        if typ not in ("standard", "subscription"):
            raise Conflicting(f"type: {typ} keys belong to an organization", "type")
        spec = _spec(typ, req, "", actor)
        spec.account = req.get("account") or None
        spec.cycle_days = req.get("cycle_days", spec.cycle_days)
        spec.payg_fallback = bool(req.get("payg_fallback"))
        check(actor, "key.create", Resource("key", None, key_type=typ))
        try:
            return await self.keystore.create(spec)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None

    async def _admin_key_owner(self, org: str, req: dict, actor: Actor, spec: KeySpec) -> None:
        refuse(req, ("owner", "project_id", "service_account_id", "quota", "unlimited",
                      "models", "allowed_ips", "rpm", "tpm", "rpd", "tpd", "account",
                      "budget", "budget_period", "max_concurrency", "observe"),
                "admin keys only administer; they carry no data-plane settings")
        check_admin_scopes(Grant(spec.permission, frozenset(spec.scopes)))
        member_id = req.get("member_id") or actor.member
        if not member_id:
            raise Invalid("member_id: an admin key is tied to the member it is made for",
                          "member_id")
        spec.member = (await self.entities.member(org, member_id))["id"]

    async def _org_key_owner(self, org: str, req: dict, actor: Actor, spec: KeySpec) -> None:
        """Project, user or service-account key: check the owner and who may create it."""
        refuse(req, ("account",), "org keys bill to the organization")
        owner = req.get("owner") or ("service_account" if req.get("service_account_id")
                                     else "user" if req.get("member_id") else "project")
        if owner == "project":
            refuse(req, ("member_id", "service_account_id"), "a project key has no "
                    "member or service account owner")
            if not req.get("project_id"):
                raise Invalid("project_id: a project key needs its project", "project_id")
            spec.project = (await self.entities.project(org, req["project_id"]))["id"]
        elif owner == "user":
            refuse(req, ("service_account_id",), "a user key is owned by a member")
            member_id = req.get("member_id") or actor.member
            if not member_id:
                raise Invalid("member_id: a user key needs the member who owns it",
                              "member_id")
            spec.member = (await self.entities.member(org, member_id))["id"]
            if req.get("project_id"):
                spec.project = (await self.entities.project(org, req["project_id"]))["id"]
        else:
            refuse(req, ("member_id",), "a service-account key is owned by the account")
            if not req.get("service_account_id"):
                raise Invalid("service_account_id: a service-account key needs its account",
                              "service_account_id")
            sa = await self.entities.service_account(org, req["service_account_id"])
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
                await self.keystore.set_status(key["id"], False, reason)

    async def org_key(self, org: str | None, key_id: str) -> KeyRecord:
        """A key's record, only if it belongs to the organization (None: any key)."""
        try:
            _, rec = await self.keystore.load(key_id)
        except KeyError_:
            raise NotFound(f"no key with id {key_id!r}", "key_id") from None
        if org is not None and rec.org != org:
            raise NotFound(f"no key with id {key_id!r}", "key_id")
        return rec

    async def key(self, org: str | None, key_id: str) -> dict:
        return key_view(await self.org_key(org, key_id))

    async def list_keys(self, org: str, *, type_: str | None = None,
                        status: str | None = None, owner: str | None = None,
                        project_id: str | None = None, member_id: str | None = None,
                        service_account_id: str | None = None, limit: int = DEFAULT_PAGE,
                        cursor: int = 0) -> tuple[list[dict], int]:
        await self.entities.org(org)
        index = "org:" + org
        if service_account_id:
            sa = await self.entities.service_account(org, service_account_id)
            index = "sa:" + sa["id"]
        elif member_id:
            index = "mem:" + (await self.entities.member(org, member_id))["id"]
        elif project_id:
            index = "prj:" + (await self.entities.project(org, project_id))["id"]
        views, cursor = await self.keystore.list(type_, status, owner=index, cursor=cursor,
                                             limit=limit)
        views = [v for v in views if v["org_id"] == org and (
            owner is None or v["owner"] == owner) and (
            not project_id or v["project_id"] == project_id)]
        return views, cursor

    async def all_keys(self, type_: str | None = None,
                       status: str | None = None) -> list[dict]:
        """Every key, in any organization or none: the operator's `sidecar keys list`."""
        views, cursor = [], 0
        while True:
            page, cursor = await self.keystore.list(type_, status, cursor=cursor, limit=MAX_PAGE)
            views.extend(page)
            if not cursor:
                return views

    async def edit_key(self, org: str | None, key_id: str, changes: dict,
                       actor: Actor = CLI) -> dict:
        rec = await self.org_key(org, key_id)
        admin = rec.type is KeyType.admin
        if admin:
            refuse(changes, ("models", "allowed_ips", "rpm", "tpm", "rpd", "tpd"),
                    "admin keys carry no data-plane settings")
        permission = changes.get("permission", rec.permission)
        if "scopes" in changes:
            check_scopes_mode(permission, changes["scopes"])
        grant = None
        if admin and ("permission" in changes or "scopes" in changes):
            scopes = changes.get("scopes", [] if "permission" in changes else rec.scopes)
            grant = Grant(permission, frozenset(scopes))
            check_admin_scopes(grant)
        check(actor, "key.update", await self.resources.resource(rec, grant))
        edits = {("ips" if k == "allowed_ips" else k): v for k, v in changes.items()}
        try:
            before, after = await self.keystore.edit(key_id, edits)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        await self._audit_key(rec, actor, "key.updated", "key",
                                key_id, before, after)
        return after

    async def set_key_status(self, org: str | None, key_id: str, active: bool,
                             actor: Actor = CLI) -> dict:
        rec = await self.org_key(org, key_id)
        check(actor, "key.enable" if active else "key.disable",
              await self.resources.resource(rec, _grant(rec)))
        before = await self.key(org, key_id)
        reason = "disabled by " + actor.created_by
        try:
            after = await self.keystore.set_status(key_id, active, reason)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        await self._audit_key(rec, actor,
                                "key.enabled" if active else "key.disabled", "key", key_id,
                                before, after)
        return after

    async def delete_key(self, org: str | None, key_id: str, actor: Actor = CLI) -> dict:
        rec = await self.org_key(org, key_id)
        check(actor, "key.delete", await self.resources.resource(rec))
        before = await self.key(org, key_id)
        await self.keystore.delete(key_id)
        await self._audit_key(rec, actor, "key.deleted", "key",
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
        check(actor, "key.quota", await self.resources.resource(rec))
        if rec.type is KeyType.admin:
            raise Conflicting("quota: admin keys have no quota", "set")
        before = await self.key(org, key_id)
        try:
            if unlimited:
                after = await self.keystore.set_quota(key_id, None)
            elif add is not None:
                after = await self.keystore.set_quota(key_id, add, add=True)
            else:
                after = await self.keystore.set_quota(key_id, set_to)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        await self._audit_key(rec, actor, "key.quota_changed",
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
        check(actor, "key.rotate", await self.resources.resource(rec, _grant(rec)))
        scope = org or rec.org or "-"
        slot = None
        if idempotency_key is not None:
            check_text(idempotency_key, "idempotency_key", required=True)
            digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
            slot = names.idempotency(scope, digest)
            replay = await self._claim(slot, key_id)
            if replay:
                return {**await self.key(org, replay), "key": None, "replayed": True,
                        "old_key": await self.key(org, key_id)}
        try:
            new, plaintext, old = await self.rotation.rotate(key_id, grace_s * 1000,
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
        if rec.subscription and rec.org:
            await self.redis.hset(names.subscription(rec.org, rec.subscription), "key",
                                  new["id"])
        await self._audit_key(rec, actor, "key.rotated", "key", key_id,
                                {"key": key_view(rec)},
                                {"key": old, "new_key": new, "grace_seconds": grace_s})
        return {**new, "key": plaintext, "replayed": False, "old_key": old}

    async def _audit_key(self, rec: KeyRecord, actor: Actor, action: str, *args) -> None:
        """Into the key's organization's log; keys outside any organization (plain
        `sidecar keys create` standard and subscription keys) have no organization log."""
        if rec.org:
            await self.audit.record(rec.org, actor, action, *args)

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


def _spec(typ: str, req: dict, org: str, actor: Actor) -> KeySpec:
    """A new key's settings from a request (the API's names), checked for the mode."""
    permission, scopes = req.get("permission", ALL), list(req.get("scopes") or [])
    check_scopes_mode(permission, scopes)
    if req.get("quota") is not None and req.get("unlimited"):
        raise Conflicting("unlimited: give quota or unlimited, not both", "unlimited")
    return KeySpec(type=KeyType(typ), name=req.get("name", ""), quota=req.get("quota"),
                   unlimited=bool(req.get("unlimited")), models=req.get("models") or [],
                   ips=req.get("allowed_ips") or [], expires_at=req.get("expires_at"),
                   rpm=req.get("rpm") or 0, tpm=req.get("tpm") or 0,
                   rpd=req.get("rpd") or 0, tpd=req.get("tpd") or 0,
                   permission=permission, scopes=scopes, org=org,
                   created_by=actor.created_by, limits=initial_limits(req))


def _grant(rec: KeyRecord) -> Grant | None:
    """An admin key's grant as stored (None for other keys)."""
    if rec.type is not KeyType.admin:
        return None
    return Grant(rec.permission, frozenset(rec.scopes))
