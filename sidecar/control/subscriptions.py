"""Subscriptions: a plan with a cycle quota and renewal date, its auto-created sk-sub-
key, and the PAYG-fallback switch (the key record holds the cycle; see keystore.py)."""

from __future__ import annotations

import contextlib

from ..schema import names
from ..schema.contracts import CreateUniqueArgs
from ..schema.keys import KeyType, new_id
from ..schema.record import _iso, now_ms
from .audit import AuditLog
from .checks import check_text
from .entities import Entities
from .errors import Conflict, Invalid, NotFound, from_key_error
from .key_spec import InvalidKeySpec, KeyError_, KeySpec
from .keystore import KeyStore
from .policy import CLI, Actor, Resource, check
from .views import cycle_view, pairs, text


class Subscriptions:
    """Plans and their keys, and the billing accounts (wallets) of an organization."""

    def __init__(self, redis, audit: AuditLog, keystore: KeyStore, entities: Entities):
        self.redis = redis
        self.audit = audit
        self.keystore = keystore
        self.entities = entities

    # -- subscriptions -----------------------------------------------------------------

    async def create_subscription(self, org: str, req: dict,
                                  actor: Actor = CLI) -> tuple[dict, str]:
        """A plan with a cycle quota and its auto-created sk-sub- key (plaintext once)."""
        await self.entities.org(org)
        account = req.get("account", "")
        check_text(account, "account", required=True)
        plan = req.get("plan", "")
        check_text(plan, "plan", required=True)
        check(actor, "subscription.create", Resource("subscription", org))
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
            key, plaintext = await self.keystore.create(spec)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        rec = {"id": sub_id, "org": org, "acct": account, "plan": plan, "key": key["id"],
               "ca": str(now_ms()), "cb": actor.created_by}
        held = await self.entities.create_unique(CreateUniqueArgs(
            names.org_subscriptions(org), names.subscription(org, sub_id), "", account,
            sub_id, tuple(pairs(rec))))
        if held != sub_id:      # a concurrent twin won: take back the key just made
            await self.keystore.delete(key["id"])
            raise Conflict(f"account: {account!r} already has a subscription", "account")
        out = await self.subscription(org, sub_id)
        await self.audit.record(org, actor, "subscription.created", "subscription", sub_id,
                                None, out)
        return out, plaintext

    async def subscription(self, org: str, sub_id: str) -> dict:
        rec = await self.entities.entity(names.subscription(org, sub_id), "subscription",
                                         sub_id, "subscription_id")
        try:
            key = await self.keystore.get(rec["key"])
        except KeyError_:
            key = None
        return {"object": "subscription", "id": rec["id"], "org_id": rec["org"],
                "account": rec["acct"], "plan": rec["plan"], "key_id": rec["key"],
                "status": key["status"] if key else "deleted",
                **cycle_view(key),
                "payg_balance": await self.keystore.wallets.balance(rec["acct"], rec["org"]),
                "created_at": _iso(rec.get("ca")), "created_by": rec.get("cb") or None}

    # -- billing accounts (PAYG wallets) of an organization: the operator's -------------

    async def account(self, org: str | None, account: str) -> dict:
        """org None: a standalone account, the wallet of keys outside any organization."""
        if org is not None:
            await self.entities.org(org)
        try:
            balance = await self.keystore.wallets.balance(account, org)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        return {"object": "account", "account": account, "org_id": org, "balance": balance}

    async def set_account_balance(self, org: str | None, account: str, units: int,
                                  actor: Actor = CLI) -> dict:
        before = await self.account(org, account)
        try:
            await self.keystore.wallets.set_balance(account, units, org=org)
        except InvalidKeySpec as exc:
            raise from_key_error(exc) from None
        after = await self.account(org, account)
        if org is not None:   # a standalone account has no organization's log
            await self.audit.record(org, actor, "account.balance_set", "account", account,
                                    before, after)
        return after

    async def list_subscriptions(self, org: str) -> list[dict]:
        await self.entities.org(org)
        ids = sorted(text(i) for i in await self.redis.hvals(names.org_subscriptions(org)))
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
        check(actor, "subscription.update", Resource("subscription", org, id=sub_id))
        if "plan" in changes:
            check_text(changes["plan"], "plan", required=True)
        try:
            if changes.get("cycle_quota") is not None:
                await self.keystore.set_quota(before["key_id"], changes["cycle_quota"])
            if changes.get("payg_fallback") is not None:
                await self.keystore.update(before["key_id"],
                                           payg_fallback=bool(changes["payg_fallback"]))
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
        check(actor, "subscription.cancel", Resource("subscription", org, id=sub_id))
        with contextlib.suppress(KeyError_):
            await self.keystore.set_status(before["key_id"], False, "subscription_cancelled")
        async with self.redis.pipeline(transaction=True) as tx:
            tx.delete(names.subscription(org, sub_id))
            tx.hdel(names.org_subscriptions(org), before["account"])
            await tx.execute()
        after = {"deleted": True, "disabled_keys": [before["key_id"]]}
        await self.audit.record(org, actor, "subscription.cancelled", "subscription", sub_id,
                                before, after)
        return {**before, **after}
