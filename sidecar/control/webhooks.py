"""An organization's webhook endpoints (issue 12): one hash under the org's tag,
endpoint id -> JSON. The secret is generated here unless given, shown once (on create),
and kept in Redis because every delivery is signed with it; views never hold it, so
neither do the audit log, listings or logs.
"""

from __future__ import annotations

import orjson

from ..schema import names
from ..schema.keys import new_id
from ..schema.record import _iso, now_ms
from ..schema.webhooks import (
    InvalidEndpoint,
    Networks,
    WebhookEndpoint,
    check_events,
    check_reachable,
    check_secret,
    check_url,
    new_secret,
    shown_url,
)
from .audit import AuditLog
from .checks import check_text
from .entities import Entities
from .errors import Conflict, Invalid, NotFound
from .policy import CLI, Actor, Resource, check
from .views import text

MAX_ENDPOINTS = 20               # per organization


def webhook_view(rec: dict) -> dict:
    return {"object": "webhook_endpoint", "id": rec["id"], "org_id": rec.get("org"),
            "url": rec["url"], "events": list(rec.get("events") or []) or ["*"],
            "description": rec.get("nm", ""), "created_at": _iso(rec.get("ca")),
            "created_by": rec.get("cb") or None}


def endpoints_of(raw: dict) -> list[WebhookEndpoint]:
    """The hash's entries as delivery targets (the worker's view)."""
    out = []
    for value in raw.values():
        rec = orjson.loads(value)
        out.append(WebhookEndpoint(rec["id"], rec["url"], rec["secret"], tuple(rec.get("events")
                                                                        or ()), rec["org"]))
    return sorted(out, key=lambda e: e.ref)


class Webhooks:
    """An organization's webhook endpoints."""

    # The non-public networks endpoints may reach (settings.webhook_networks()), set by
    # whoever knows the settings (admin API, CLI); None: unknown here, so only the
    # delivery checks (it always does, after DNS).
    webhook_networks: Networks | None = None

    def __init__(self, redis, audit: AuditLog, entities: Entities):
        self.redis = redis
        self.audit = audit
        self.entities = entities

    async def create_webhook(self, org: str, req: dict, actor: Actor = CLI) -> dict:
        """A new endpoint; the answer carries its secret, this once."""
        check(actor, "webhook.create", Resource("webhook", org))
        await self.entities.org(org)
        try:
            url = check_url(req.get("url"))
            if self.webhook_networks is not None:
                check_reachable(url, self.webhook_networks)
            secret = check_secret(req["secret"]) if req.get("secret") is not None else (
                new_secret())
            events = check_events(req.get("events"))
        except InvalidEndpoint as exc:
            raise Invalid(str(exc), exc.field) from None
        description = req.get("description", "")
        check_text(description, "description")
        held = await self.redis.hgetall(names.org_webhooks(org))
        if len(held) >= MAX_ENDPOINTS:
            raise Conflict(f"url: an organization has at most {MAX_ENDPOINTS} webhook "
                           "endpoints; delete one first", "url")
        if any(orjson.loads(v)["url"] == url for v in held.values()):
            raise Conflict(f"url: {shown_url(url)} is already an endpoint", "url")
        rec = {"id": new_id("wh"), "org": org, "url": url, "secret": secret,
               "events": list(events), "nm": description, "ca": str(now_ms()),
               "cb": actor.created_by}
        await self.redis.hset(names.org_webhooks(org), rec["id"], orjson.dumps(rec))
        out = webhook_view(rec)
        await self.audit.record(org, actor, "webhook.created", "webhook", rec["id"],
                                None, out)
        return {**out, "secret": secret}

    async def _webhook(self, org: str, webhook_id: str) -> dict:
        raw = await self.redis.hget(names.org_webhooks(org), webhook_id)
        if raw is None:
            raise NotFound(f"no webhook endpoint with id {webhook_id!r}", "webhook_id")
        return orjson.loads(raw)

    async def webhook(self, org: str, webhook_id: str, actor: Actor = CLI) -> dict:
        check(actor, "webhook.read", Resource("webhook", org, id=webhook_id))
        return webhook_view(await self._webhook(org, webhook_id))

    async def list_webhooks(self, org: str, actor: Actor = CLI) -> list[dict]:
        check(actor, "webhook.read", Resource("webhook", org))
        raw = await self.redis.hgetall(names.org_webhooks(org))
        views = [webhook_view(orjson.loads(v)) for v in raw.values()]
        return sorted(views, key=lambda v: (v["created_at"] or "", v["id"]))

    async def delete_webhook(self, org: str, webhook_id: str, actor: Actor = CLI) -> dict:
        check(actor, "webhook.delete", Resource("webhook", org, id=webhook_id))
        before = webhook_view(await self._webhook(org, webhook_id))
        await self.redis.hdel(names.org_webhooks(org), webhook_id)
        await self.audit.record(org, actor, "webhook.deleted", "webhook", webhook_id,
                                before, None)
        return {"id": webhook_id, "object": "webhook_endpoint", "deleted": True}

    async def webhook_endpoints(self, org: str) -> list[WebhookEndpoint]:
        """The organization's endpoints with their secrets (delivery only)."""
        return endpoints_of({text(k): v for k, v in
                             (await self.redis.hgetall(names.org_webhooks(org))).items()})
