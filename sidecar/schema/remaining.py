"""What is left of a key's quota and of its budget, by authorize.lua's own definitions,
and the threshold census that counts the keys at or below each alert threshold. Pure.

authorize.lua (and limits.lua's th_cross) say a call left a quota or budget at or below
threshold t when `left <= t * total`, with
- a key's own quota: left = qr (or its rotation's shared pool in the wallet hash, when
  the record names one), total = qr + qu; an unlimited key, or one whose total is 0, has
  no quota to run low;
- a subscription: left = cq - cu, total = cq, the cycle renewed (cu = 0) once its end
  has passed, as the next call would see it;
- the key's own budget (the record's `lim`, limits.py): left = budget - spent - reserved,
  total = budget, spent counting from 0 in a new day or month.
The census counts with the very same comparison (in doubles, as Lua does), so a key it
counts under t is one whose next call would have raised (or has raised) that alert.

Which keys count: those that can make calls. Disabled and expired keys are left out
(nothing can use what they have left), and so are admin keys (they make no calls) and a
rotated key's predecessor in its grace window (its successor draws on the same pool and
is the one counted). Budgets of the levels above a key (project, organization, member)
are not keys' and are not counted here.

The census result is one small hash (names.THRESHOLD_CENSUS): `Census.to_hash`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .keys import KeyType
from .limits import Limits
from .record import KeyRecord, text

QUOTA, BUDGET = "quota", "budget"
KINDS = (QUOTA, BUDGET)

@dataclass(frozen=True, slots=True)
class Left:
    """What is left of a quota or budget (units or micro-units), of `total` (> 0)."""

    left: int
    total: int

    @property
    def fraction(self) -> float:
        """The fraction left, 0 when overdrawn."""
        return max(self.left, 0) / self.total

    def at_most(self, threshold: float) -> bool:
        """At or below the threshold: th_cross's own test, `left <= t * total`."""
        return self.left <= threshold * self.total


def counted(rec: KeyRecord, now_ms: int) -> bool:
    """A key the census looks at: one that can make calls (see the module docstring)."""
    return (rec.active and not rec.expired(now_ms) and rec.type is not KeyType.admin
            and not rec.rotated_to)


def quota_left(rec: KeyRecord, now_ms: int, pooled: int | None = None) -> Left | None:
    """The key's quota as authorize.lua reads it; `pooled`: the value of its shared pool
    (None when it has none, or the pool field is absent: then its own qr, as the script
    falls back). None: the key has no quota (unlimited, or a total of 0)."""
    if rec.unlimited:
        return None
    if rec.type is KeyType.subscription:
        quota, used = rec.cycle_quota or 0, rec.cycle_used or 0
        if (rec.cycle_ms or 0) > 0 and now_ms >= (rec.cycle_end_ms or 0):
            used = 0                      # renewed by the next call
        found = Left(quota - used, quota)
    else:
        own = rec.quota_remaining or 0
        left = pooled if pooled is not None and rec.quota_pool else own
        found = Left(left, left + (rec.quota_used or 0))
    return found if found.total > 0 else None


def budget_left(rec: KeyRecord, day: int, month: int, now_ms: int = 0,
                charge: bool = True) -> Left | None:
    """The key's own budget now (day and month numbers: limits.Calendar; holds ended by
    `now_ms` charged or released as `charge` says, as the next call would); None: none."""
    state = Limits.unpack(rec.limits or None)
    if state is None or state.budget <= 0:
        return None
    state = state.now(day, month, now_ms, charge)
    return Left(state.budget - state.spent - state.reserved, state.budget)


def threshold_labels(packed: str) -> tuple[str, ...]:
    """The thresholds of limits.pack_thresholds' form ('0.2,0.05,0'; 'n' or '-': none)
    as the labels they are counted under."""
    return () if packed in ("n", "-", "") else tuple(packed.split(","))


@dataclass
class Tally:
    """Counts of keys at or below each threshold, by kind, as records are added."""

    thresholds: tuple[str, ...]
    charge_expired: bool = True   # expired_reservation: charge (else release)
    keys: int = 0
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {(kind, t): 0 for kind in KINDS for t in self.thresholds}
        self._values = tuple((t, float(t)) for t in self.thresholds)

    def add(self, rec: KeyRecord, now_ms: int, day: int, month: int,
            pooled: int | None = None) -> None:
        self.keys += 1
        if not counted(rec, now_ms):
            return
        for kind, found in ((QUOTA, quota_left(rec, now_ms, pooled)),
                            (BUDGET, budget_left(rec, day, month, now_ms,
                                                 self.charge_expired))):
            if found is not None:
                for label, value in self._values:
                    if found.at_most(value):
                        self.counts[kind, label] += 1


@dataclass(frozen=True)
class Census:
    """One census's result, as stored in names.THRESHOLD_CENSUS: when it began (ms), how
    long it took, how many key records it examined, whether it examined them all (False:
    a cap stopped it), who took it, and the counts by (kind, threshold)."""

    at_ms: int
    took_ms: int
    keys: int
    complete: bool
    by: str
    counts: dict[tuple[str, str], int]

    def to_hash(self) -> dict[str, str]:
        out = {"at": str(self.at_ms), "took_ms": str(self.took_ms), "keys": str(self.keys),
               "complete": "1" if self.complete else "0", "by": self.by}
        out.update({f"{kind}:{t}": str(n) for (kind, t), n in self.counts.items()})
        return out

    @classmethod
    def from_hash(cls, raw: Mapping) -> Census | None:
        """From HGETALL's reply (str or bytes); None when there is none or it is unreadable."""
        data = {text(k): text(v) for k, v in raw.items()}
        try:
            counts = {tuple(k.split(":", 1)): int(v) for k, v in data.items()
                      if k.split(":", 1)[0] in KINDS and ":" in k}
            return cls(int(data["at"]), int(data.get("took_ms", 0)), int(data["keys"]),
                       data.get("complete") == "1", data.get("by", ""), counts)
        except (KeyError, ValueError):
            return None
