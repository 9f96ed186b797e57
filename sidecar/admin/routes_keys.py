"""Admin API: keys of the caller's organization (standard, org and admin keys; the
sk-sub- keys come with subscriptions). The plaintext is in the create and rotate answers
only, once."""

from __future__ import annotations

from ..control.input_limits import DEFAULT_PAGE
from ..control.store import parse_when
from . import schemas as s
from .http import ApiError
from .routing import AdminCall, Route
from .validation import validate


def _settings(body: dict) -> dict:
    out = dict(body)
    if out.get("expires_at") is not None:
        out["expires_at"] = parse_when(out["expires_at"])
    return out


async def list_keys(c: AdminCall):
    q = c.query
    views, nxt = await c.store.list_keys(
        c.org, type_=q.get("type"), status=q.get("status"), owner=q.get("owner"),
        project_id=q.get("project_id"), member_id=q.get("member_id"),
        service_account_id=q.get("service_account_id"), limit=q.get("limit") or DEFAULT_PAGE,
        cursor=int(q.get("cursor") or 0))
    return 200, {"object": "list", "data": views, "next_cursor": str(nxt) if nxt else None}


async def create_key(c: AdminCall):
    view, plaintext = await c.store.create_key(c.org, _settings(c.body), c.actor)
    return 201, {**view, "key": plaintext}


async def get_key(c: AdminCall):
    return 200, await c.store.key(c.org, c.params["key_id"])


async def edit_key(c: AdminCall):
    return 200, await c.store.edit_key(c.org, c.params["key_id"], _settings(c.body),
                                       c.actor)


async def delete_key(c: AdminCall):
    return 200, await c.store.delete_key(c.org, c.params["key_id"], c.actor)


async def disable_key(c: AdminCall):
    return 200, await c.store.set_key_status(c.org, c.params["key_id"], False, c.actor)


async def enable_key(c: AdminCall):
    return 200, await c.store.set_key_status(c.org, c.params["key_id"], True, c.actor)


async def set_quota(c: AdminCall):
    b = c.body
    return 200, await c.store.set_key_quota(c.org, c.params["key_id"], set_to=b.get("set"),
                                            add=b.get("add"),
                                            unlimited=bool(b.get("unlimited")),
                                            actor=c.actor)


async def activity(c: AdminCall):
    v = await c.store.key(c.org, c.params["key_id"])
    return 200, {k: v[k] for k in ("id", "last_used_at", "last_ip", "last_model",
                                   "request_count", "quota_used", "quota_remaining")}


async def rotate_key(c: AdminCall):
    header = c.headers.get("Idempotency-Key")
    field = c.body.get("idempotency_key")
    if header is not None and field is not None and header != field:
        raise ApiError(400, "conflicting_options", "idempotency_key: the body and the "
                       "Idempotency-Key header differ", "idempotency_key")
    if header is not None:
        validate(s.KEY_ROTATE["properties"]["idempotency_key"], header, "Idempotency-Key")
    result = await c.store.rotate_key(c.org, c.params["key_id"],
                                      c.body.get("grace_seconds", 0), field or header,
                                      c.actor)
    return (200 if result["replayed"] else 201), result


K = "/keys/{key_id}"
ROUTES = [
    Route("GET", "/keys", "key.read", "List keys (filters, pagination)", list_keys, "Key",
          query=s.KEY_QUERY, list_of=True, tag="keys"),
    Route("POST", "/keys", "key.create", "Create a key; the plaintext is returned once",
          create_key, "KeyCreated", status=201, body=s.KEY_CREATE, tag="keys"),
    Route("GET", K, "key.read", "Get a key (never its plaintext)", get_key, "Key",
          tag="keys"),
    Route("PATCH", K, "key.update", "Edit name, permission, scopes, models, IPs, limits, "
          "expiry", edit_key, "Key", body=s.KEY_EDIT, tag="keys"),
    Route("DELETE", K, "key.delete", "Delete (revoke) a key", delete_key, "Deleted",
          tag="keys"),
    Route("POST", K + "/disable", "key.disable", "Disable a key", disable_key, "Key",
          tag="keys"),
    Route("POST", K + "/enable", "key.enable", "Enable a key again", enable_key, "Key",
          tag="keys"),
    Route("POST", K + "/quota", "key.quota", "Set, add to, or lift a key's quota",
          set_quota, "Key", body=s.KEY_QUOTA, tag="keys"),
    Route("GET", K + "/activity", "key.read", "A key's recent activity", activity,
          "KeyActivity", tag="keys"),
    Route("POST", K + "/rotate", "key.rotate", "Rotate into a new key with the same "
          "settings; the old one works for grace_seconds more (Idempotency-Key: a repeat "
          "returns the same new key id and mints nothing)", rotate_key, "KeyRotated",
          status=201, also=200, body=s.KEY_ROTATE, tag="keys"),
]
