"""The audit log: one Redis stream per organization (XADD MAXLEN ~), newest first.

An entry says who (actor), what (action, resource) and when, with the resource's view
before and after the change. Views never hold a plaintext key or its hash, so neither
does the log.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from ..schema import names
from ..schema.record import text
from .input_limits import DEFAULT_PAGE
from .policy import Actor

MAXLEN = 100_000            # entries kept per organization (approximate trim)
SCAN_BATCH = 500            # entries read per XREVRANGE while filtering
SCAN_LIMIT = 20_000         # entries examined per query at most; the cursor goes on


class AuditLog:
    def __init__(self, redis):
        self.redis = redis

    async def record(self, org: str, actor: Actor, action: str, resource_type: str,
                     resource_id: str, before: dict | None = None,
                     after: dict | None = None) -> str:
        fields = {"a": action, "rt": resource_type, "ri": resource_id,
                  "at": actor.kind, "ai": actor.id, "am": actor.member or "",
                  "b": orjson.dumps(before), "af": orjson.dumps(after)}
        entry = await self.redis.xadd(names.audit(org), fields, maxlen=MAXLEN,
                                      approximate=True)
        return text(entry)

    async def query(self, org: str, *, action: str | None = None,
                    actor_id: str | None = None, resource_type: str | None = None,
                    resource_id: str | None = None, since_ms: int | None = None,
                    until_ms: int | None = None, limit: int = DEFAULT_PAGE,
                    cursor: str | None = None) -> tuple[list[dict], str | None]:
        """Matching events, newest first, and the cursor to continue from (None = done)."""
        if cursor is not None and _before_first(cursor):
            return [], None     # nothing is older than the first possible id
        high = f"({cursor}" if cursor else (str(until_ms) if until_ms is not None else "+")
        low = str(since_ms) if since_ms is not None else "-"
        found: list[dict] = []
        examined = 0
        while examined < SCAN_LIMIT:
            batch = await self.redis.xrevrange(names.audit(org), high, low, count=SCAN_BATCH)
            if not batch:
                return found, None
            for entry_id, raw in batch:
                examined += 1
                event = _event(text(entry_id), {text(k): text(v) for k, v in raw.items()})
                if _matches(event, action, actor_id, resource_type, resource_id):
                    found.append(event)
                    if len(found) == limit:
                        return found, event["id"]
            last = text(batch[-1][0])
            if len(batch) < SCAN_BATCH:
                return found, None
            high = f"({last}"
        return found, high[1:]


def _before_first(cursor: str) -> bool:
    ms, _, seq = cursor.partition("-")
    return int(ms) == 0 and int(seq or 0) == 0


def _matches(event: dict, action, actor_id, resource_type, resource_id) -> bool:
    if action and not (event["action"] == action or (
            action.endswith("*") and event["action"].startswith(action[:-1]))):
        return False
    if actor_id and actor_id not in (event["actor"]["id"], event["actor"]["member_id"]):
        return False
    if resource_type and event["resource"]["type"] != resource_type:
        return False
    return not (resource_id and event["resource"]["id"] != resource_id)


def _event(entry_id: str, f: dict[str, str]) -> dict:
    ms = int(entry_id.split("-")[0])
    return {"object": "audit_event", "id": entry_id,
            "time": datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z"),
            "actor": {"type": f.get("at"), "id": f.get("ai"),
                      "member_id": f.get("am") or None},
            "action": f.get("a"),
            "resource": {"type": f.get("rt"), "id": f.get("ri")},
            "before": orjson.loads(f.get("b") or "null"),
            "after": orjson.loads(f.get("af") or "null")}
