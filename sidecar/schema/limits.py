"""The budget and concurrency state of one level, as limits.lua packs it. Pure.

A level is a key or one above it: its project, organization, or member (user keys).
Each has at most one budget (money, micro-units, over a period) and one concurrency
limit, and either may be observe-only (evaluated and counted, never enforced). The
state is one string, so a script reads a level with one field:

    '<budget> <spent> <reserved> <window> <period> <max_conc> <in_flight> <observe>'

The control plane writes the settings (budget, period, max_conc, observe) through
set_limits.lua, which keeps the counters the hot path moves (spent, reserved, window,
in_flight).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from zoneinfo import ZoneInfo

PERIODS = {"total": "t", "day": "d", "month": "m"}     # period word -> code
PERIOD_NAMES = {v: k for k, v in PERIODS.items()}
LEVELS = ("key", "project", "organization", "member")
# What can be observe-only, and its letter in the state (authorize.lua's `enforced`).
OBSERVABLE = {"budget": "b", "concurrency": "c", "quota": "q", "requests": "r",
              "tokens": "t"}
OBSERVABLE_NAMES = {v: k for k, v in OBSERVABLE.items()}
MAX_CONCURRENCY = 100_000
_PACKED = re.compile(r"(\d+) (\d+) (\d+) (\d+) ([tdm]) (\d+) (\d+) (\S+)")


@dataclass(frozen=True, slots=True)
class Limits:
    budget: int = 0            # micro-units per period; 0 = no budget
    spent: int = 0             # micro-units spent in the window
    reserved: int = 0          # micro-units held by calls not yet settled
    window: int = 0            # the day or month number `spent` belongs to
    period: str = "t"          # t total, d day, m month
    max_concurrency: int = 0   # 0 = no limit
    in_flight: int = 0
    observe: str = "-"         # letters of OBSERVABLE, '-' none

    def pack(self) -> str:
        return (f"{self.budget} {self.spent} {self.reserved} {self.window} {self.period} "
                f"{self.max_concurrency} {self.in_flight} {self.observe or '-'}")

    @classmethod
    def unpack(cls, text: str | bytes | None) -> Limits | None:
        if text is None:
            return None
        match = _PACKED.fullmatch(text.decode() if isinstance(text, bytes) else text)
        if not match:
            return None
        b, s, r, w, p, mc, fl, ob = match.groups()
        return cls(int(b), int(s), int(r), int(w), p, int(mc), int(fl), ob)

    def empty(self) -> bool:
        """Nothing set: the level can be dropped."""
        return not self.budget and not self.max_concurrency and self.observe == "-"

    def now(self, day: int, month: int) -> Limits:
        """As the next call sees it: a new day or month starts with nothing spent."""
        window = {"d": day, "m": month}.get(self.period, 0)
        return self if window == self.window else replace(self, spent=0, window=window)

    def observes(self, what: str) -> bool:
        return OBSERVABLE[what] in self.observe


def observe_letters(names: list[str] | tuple[str, ...]) -> str:
    """'-' or the letters of the observe-only limits named (OBSERVABLE keys)."""
    return "".join(sorted({OBSERVABLE[n] for n in names})) or "-"


class Calendar:
    """Day and month numbers in the budget time zone: what a `day` or `month` period
    resets on. Day = days since 1970-01-01 there; month = year * 12 + month - 1."""

    def __init__(self, tz: str = "UTC"):
        self.tz = ZoneInfo(tz)
        self._second = -1
        self._numbers = (0, 0)

    def numbers(self, now_ms: int) -> tuple[int, int]:
        second = now_ms // 1000
        if second != self._second:   # the hot path asks per call: once a second is enough
            local = datetime.fromtimestamp(second, self.tz)
            day = (local.date().toordinal() - 719163)   # date(1970, 1, 1).toordinal()
            self._numbers = (day, local.year * 12 + local.month - 1)
            self._second = second
        return self._numbers
