"""The control plane's side of events (issue 12): what it emits, and the dead letters.

Every event the control plane emits goes through `emit` (XADD into the stream of the
key's shard tag, then ZINCRBY of that tag in names.EVENTS_ACTIVE so the delivery worker
finds it at once); key.disabled is made in one place, `key_disabled`, which the key store
calls wherever a key goes from active to disabled (by hand, by a cascade, by a
cancelled subscription).

Dead letters (names.DEAD_LETTERS) are the deliveries that failed for a whole retry
window, one entry per event and endpoint; `replay` puts them back in their stream with
`to` set, so only that endpoint gets the event again, with the same webhook-id.
"""

from __future__ import annotations

import orjson

from ..schema import events, names
from ..schema.keys import shard_of
from ..schema.record import KeyRecord
from .views import text

DEAD_MAXLEN = 10_000            # dead letters kept (approximate trim)
_BATCH = 500


async def emit(redis, tag: str, fields: dict[str, str]) -> str:
    """Append one event to the tag's stream and mark the tag active; the entry id."""
    entry = await redis.xadd(names.events(tag), fields, maxlen=events.STREAM_MAXLEN,
                             approximate=True)
    await redis.zincrby(names.EVENTS_ACTIVE, 1, tag)
    return text(entry)


async def key_disabled(redis, key_hash: str, rec: KeyRecord, reason: str) -> str:
    """key.disabled for a key that was active until now (rec: its record before)."""
    fields = events.entry("key.disabled", key_id=rec.id or None, org=rec.org or None,
                          project=rec.project or None, reason=reason or None)
    await emit(redis, shard_of(key_hash), fields)
    return fields["id"]


def _letter(entry_id, raw: dict) -> dict:
    f = {text(k): text(v) for k, v in raw.items()}
    fields = orjson.loads(f.get("ev") or "{}")
    return {"dead_letter_id": text(entry_id), "event_id": fields.get("id"),
            "type": fields.get("t"), "endpoint": f.get("ep"), "url": f.get("url"),
            "attempts": int(f.get("n") or 0), "last_error": f.get("err"),
            "dead_at_ms": events.entry_ms(text(entry_id)), "tag": f.get("tag"),
            "fields": fields}


async def dead_letters(redis, limit: int | None = None) -> list[dict]:
    """Dead letters, oldest first."""
    found: list[dict] = []
    low = "-"
    while limit is None or len(found) < limit:
        batch = await redis.xrange(names.DEAD_LETTERS, low, "+", count=_BATCH)
        found.extend(_letter(i, raw) for i, raw in batch)
        if len(batch) < _BATCH:
            break
        low = "(" + text(batch[-1][0])
    return found[:limit] if limit is not None else found


async def replay(redis, event_id: str | None) -> list[dict]:
    """Put dead letters back for delivery: those of `event_id`, or all (None). Each goes
    to its stream for its one endpoint; returns what was replayed."""
    chosen = [d for d in await dead_letters(redis)
              if event_id is None or d["event_id"] == event_id]
    for d in chosen:
        fields = {k: v for k, v in d["fields"].items() if k != "to"}
        fields["to"] = d["endpoint"]
        await emit(redis, d["tag"], fields)
        await redis.xdel(names.DEAD_LETTERS, d["dead_letter_id"])
    return chosen


async def add_dead_letter(redis, event: events.Event, endpoint: str, url: str,
                          attempts: int, error: str) -> None:
    """A delivery that failed for the whole window (the worker calls it)."""
    # id and time pinned: a replay is the same event (same id, same occurred_at)
    fields = dict(event.fields, id=event.id, at=str(event.occurred_ms))
    fields.pop("to", None)
    await redis.xadd(names.DEAD_LETTERS, {"ev": orjson.dumps(fields), "tag": event.tag,
                                          "ep": endpoint, "url": url, "n": str(attempts),
                                          "err": error[:300]},
                     maxlen=DEAD_MAXLEN, approximate=True)
