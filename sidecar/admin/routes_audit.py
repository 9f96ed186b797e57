"""Admin API: the organization's audit log, newest first."""

from __future__ import annotations

from ..control.input_limits import DEFAULT_PAGE
from ..control.store import parse_when
from . import schemas as s
from .routing import AdminCall, Route


def _ms(text: str | None, param: str) -> int | None:
    """Stream ids start at 0: a time before 1970 means from the start."""
    return None if text is None else max(0, int(parse_when(text, param).timestamp() * 1000))


async def list_audit(c: AdminCall):
    q = c.query
    events, cursor = await c.store.audit.query(
        c.org, action=q.get("action"), actor_id=q.get("actor_id"),
        resource_type=q.get("resource_type"), resource_id=q.get("resource_id"),
        since_ms=_ms(q.get("since"), "since"), until_ms=_ms(q.get("until"), "until"),
        limit=q.get("limit") or DEFAULT_PAGE, cursor=q.get("cursor"))
    return 200, {"object": "list", "data": events, "next_cursor": cursor}


ROUTES = [
    Route("GET", "/audit_logs", "audit.read", "Audit log: who changed what, when (filters: "
          "action, actor, resource, time; pagination)", list_audit, "AuditEvent",
          query=s.AUDIT_QUERY, list_of=True, tag="audit"),
]
