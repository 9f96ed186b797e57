"""Usage history (issue 12): requests, tokens and spend per key, project and organization,
in daily buckets (kept usage_retention_days) and hourly ones (the last 48 h), as
authorize.lua (requests) and settle.lua (tokens, money) count them. Read-only here; who
may read whose is the caller's (LimitRules' lookups: another organization's id is a 404).

A key's buckets are on its own tag; a project's and an organization's on the
organization's tag, where its keys are minted (names.usage_day), so they add up there.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from ..schema import names
from ..schema.keys import KeyHasher, shard_of
from ..schema.limits import Calendar
from ..schema.money import format_amount
from ..schema.record import now_ms
from .errors import Invalid

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
HOUR_MS = 3_600_000
HOURS_KEPT = 48
KINDS = ("n", "t", "m")          # names.USAGE_KINDS: requests, tokens, money


def day_of(text: str | None) -> int | None:
    """A --since / ?since= date (YYYY-MM-DD) as a day number; None if not given."""
    if text is None:
        return None
    try:
        return date.fromisoformat(text).toordinal() - _EPOCH_ORDINAL
    except (TypeError, ValueError):
        raise Invalid("since: a date, YYYY-MM-DD", "since") from None


def _row(values: list) -> dict:
    n, t, m = (int(v or 0) for v in values)
    return {"requests": n, "tokens": t, "spend": format_amount(m)}


def _empty(row: dict) -> bool:
    return not row["requests"] and not row["tokens"] and row["spend"] == "0.00"


class UsageHistory:
    def __init__(self, redis, hasher: KeyHasher, timezone: str = "UTC",
                 retention_days: int = 90):
        self.redis = redis
        self.hasher = hasher
        self.calendar = Calendar(timezone)
        self.retention_days = retention_days

    def org_tag(self, org: str) -> str:
        return self.hasher.org_tag(org)

    @staticmethod
    def key_tag(key_hash: str) -> str:
        return shard_of(key_hash)

    async def history(self, tag: str, who: str, since: str | None,
                      now: int | None = None) -> dict:
        """The non-empty daily and hourly buckets of `who` on `tag`, oldest first, and
        the daily total since `since` (default: as far as history is kept)."""
        now = now_ms() if now is None else now
        today = self.calendar.numbers(now)[0]
        first = today - max(self.retention_days, 1) + 1
        asked = day_of(since)
        if asked is not None:
            first = max(first, asked)
        hour = now // HOUR_MS
        days = list(range(first, today + 1))
        hours = list(range(hour - HOURS_KEPT + 1, hour + 1))
        fields = [names.usage_field(who, k) for k in KINDS]
        pipe = self.redis.pipeline(transaction=False)
        for d in days:
            pipe.hmget(names.usage_day(tag, d), fields)
        for h in hours:
            pipe.hmget(names.usage_hour(tag, h), fields)
        found = await pipe.execute()
        daily = [{"date": date.fromordinal(d + _EPOCH_ORDINAL).isoformat(), **_row(v)}
                 for d, v in zip(days, found[:len(days)], strict=True)]
        hourly = [{"hour": datetime.fromtimestamp(h * 3600, UTC).isoformat().replace(
                      "+00:00", "Z"), **_row(v)}
                  for h, v in zip(hours, found[len(days):], strict=True)]
        total = {"requests": sum(r["requests"] for r in daily),
                 "tokens": sum(r["tokens"] for r in daily),
                 "spend": format_amount(sum(int(v[2] or 0) for v in found[:len(days)]))}
        return {"object": "usage", "since": daily[0]["date"] if daily else None,
                "total": total, "daily": [r for r in daily if not _empty(r)],
                "hourly": [r for r in hourly if not _empty(r)]}
