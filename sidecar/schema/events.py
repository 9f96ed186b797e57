"""Events (issue 12): the stream entry the writers append and the JSON webhooks deliver.

A writer (a Lua script, the control plane) appends one entry to `names.events(tag)`, the
stream of the key's shard tag, with flat string fields (short names, as in records):

  t    type (TYPES), required          k    key id          o    organization id
  id   event id; absent: the worker    p    project id      l    level: k(ey), p(roject),
       derives it from the tag and                               o(rganization), m(ember)
       the entry id (scripts need no   th   threshold crossed, a fraction ('0.2', '0')
       random id)                      r    remaining after the call (units, or the
  at   when, ms; absent: the entry id       budget's money as a decimal string)
  why  key.disabled / key.expired: the reason    lim  what `r` is a part of (optional)
  to   replays only: deliver to this one endpoint (its ref), not every subscriber

A Lua script writes, e.g.:
  redis.call('XADD', KEYS[n], 'MAXLEN', '~', 100000, '*', 't', 'quota.low',
             'k', rec_id, 'o', org, 'p', prj, 'l', 'k', 'th', '0.2', 'r', remaining)
Who writes what: the authorize and settle scripts the threshold crossings (quota.*,
budget.*) and key.expired (they are the ones who see a call cross or an expired key);
the control plane key.disabled (control/events.key_disabled: by hand, cascades, a
cancelled subscription; a rotation's old key is rotated, not disabled).
Unknown fields are ignored and a missing optional one is null in the JSON, so writers
can add fields later without breaking the worker. Pure: no I/O.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

TYPES = ("quota.low", "quota.exhausted", "budget.low", "budget.exhausted", "key.disabled",
         "key.expired")
LEVELS = {"k": "key", "p": "project", "o": "organization", "m": "member"}
STREAM_MAXLEN = 100_000          # entries kept per tag stream (approximate trim)
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


def new_id() -> str:
    """An event id for a writer that can make one (the control plane)."""
    return "evt_" + secrets.token_hex(12)


def derived_id(tag: str, entry_id: str) -> str:
    """The id of an entry written without one: unique, as (tag, entry id) is."""
    return f"evt_{tag}_{entry_id}"


def valid_id(event_id: str) -> bool:
    return 0 < len(event_id) <= 80 and event_id.startswith("evt_") and set(
        event_id) <= _ID_CHARS


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    occurred_ms: int
    tag: str
    fields: dict[str, str] = field(default_factory=dict)   # the entry as written

    @property
    def org(self) -> str | None:
        return self.fields.get("o") or None

    @property
    def target(self) -> str | None:
        """The one endpoint a replay goes to (None: every subscribed endpoint)."""
        return self.fields.get("to") or None


def entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def from_entry(tag: str, entry_id: str, fields: dict[str, str]) -> Event | None:
    """The event of a stream entry, or None when it is no event (no known type)."""
    typ = fields.get("t", "")
    if typ not in TYPES:
        return None
    event_id = fields.get("id") or derived_id(tag, entry_id)
    at = fields.get("at", "")
    occurred = int(at) if at.isdigit() else entry_ms(entry_id)
    return Event(event_id, typ, occurred, tag, dict(fields))


def entry(event_type: str, *, event_id: str | None = None, key_id: str | None = None,
          org: str | None = None, project: str | None = None, level: str = "k",
          reason: str | None = None, at_ms: int | None = None) -> dict[str, str]:
    """The stream fields of an event the control plane writes (empty ones left out)."""
    if event_type not in TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    fields = {"id": event_id or new_id(), "t": event_type, "k": key_id, "o": org,
              "p": project, "l": level, "why": reason,
              "at": None if at_ms is None else str(at_ms)}
    return {k: v for k, v in fields.items() if v}


def _number(text: str | None) -> int | float | str | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def payload(event: Event) -> dict:
    """The JSON a webhook receives (docs/webhooks.md)."""
    f = event.fields
    # money stays a decimal string ("2.50"); units and fractions are numbers
    number = (lambda v: v or None) if event.type.startswith("budget.") else _number
    return {"id": event.id, "object": "event", "type": event.type,
            "occurred_at": _iso(event.occurred_ms),
            "data": {"key_id": f.get("k") or None, "organization_id": f.get("o") or None,
                     "project_id": f.get("p") or None,
                     "level": LEVELS.get(f.get("l", "k"), "key"),
                     "threshold": _number(f.get("th")), "remaining": number(f.get("r")),
                     "limit": number(f.get("lim")), "reason": f.get("why") or None}}


def body(event: Event) -> bytes:
    """The exact bytes sent and signed."""
    return orjson.dumps(payload(event))
