"""The budget and concurrency state of one level, as limits.lua stores it. Pure.

A level is a key or one above it: its project, organization, or member (user keys).
Each has at most one budget (money, micro-units, over a period) and one concurrency
limit, and either may be observe-only (evaluated and counted, never enforced). The
state is one value, so a script reads a level with one field: the key's own in its
record's field `lim`, a level above it in its field of the tag's budgets hash. Both are
packed (read and written by every call of the key: C's struct costs a fraction of Lua
patterns): the byte 1, then little-endian budget, spent, reserved (int64), window
(int32), period (one byte), max_conc, in_flight (int32), fired (uint8), the number of
holds (uint16), observe and thresholds (each NUL-terminated), then each hold as end ms,
money (int64), slots (int32). `Limits.pack` writes it, `Limits.unpack` reads it and the
older text form, which states written before were in (and are packed at their next
write):

    '<budget> <spent> <reserved> <window> <period> <max_conc> <in_flight> <observe>
     <thresholds> <fired> <holds>'

thresholds: the alert thresholds (fractions of the budget left, highest first,
'0.2,0.05,0'; '-' the deployment's default, 'n' none); fired: how many have fired since
the budget was set or its period rolled over (limits.lua th_cross). holds: the money and
slots of reservations not yet settled, by when they expire (in the text form '<end
ms>:<money>:<slots>,…', or '-'), ends ascending; reserved and in_flight are their sums.
A hold that has ended is charged or released by the expiry policy when the level is next
read (limits.lua lim_now). Older text forms: 8 words read as '- 0 -'; 10 words hold
their reserved and in-flight in one hold that has ended.

The control plane writes the settings (budget, period, max_conc, observe) through
set_limits.lua, which keeps the counters the hot path moves (spent, window, holds).
"""

from __future__ import annotations

import re
import struct
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
_PACKED = re.compile(r"(\d+) (\d+) (\d+) (\d+) ([tdm]) (\d+) (\d+) (\S+)"
                     r"(?: (\S+) (\d+)(?: (\S+))?)?")
_HOLD = re.compile(r"(\d+):(\d+):(\d+)")
Hold = tuple[int, int, int]   # (end ms, money, slots)
PACKED_MARK = b"\x01"         # the packed form's first byte (text starts with a digit)
_PACKED_HEAD = struct.Struct("<BqqqiciiBH")   # limits.lua LIM_PACKED, the strings after
_PACKED_HOLD = struct.Struct("<qqi")                             # limits.lua LIM_HOLD
DEFAULT_THRESHOLDS = (0.2, 0.05, 0.0)
MAX_THRESHOLDS = 8


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
    thresholds: str = "-"      # pack_thresholds(...): '-' default, 'n' none
    fired: int = 0
    holds: tuple[Hold, ...] = ()   # reserved and in_flight by when they expire

    def pack(self) -> bytes:
        """The stored form, as limits.lua's lim_pack writes it (bytes, not text)."""
        head = _PACKED_HEAD.pack(1, self.budget, self.spent, self.reserved, self.window,
                                 self.period.encode(), self.max_concurrency,
                                 self.in_flight, self.fired, len(self.holds))
        tail = b"".join(_PACKED_HOLD.pack(*h) for h in self.holds)
        return (head + (self.observe or "-").encode() + b"\0"
                + (self.thresholds or "-").encode() + b"\0" + tail)

    @classmethod
    def unpack(cls, text: str | bytes | None) -> Limits | None:
        if text is None:
            return None
        if isinstance(text, bytes) and text[:1] == PACKED_MARK:
            return cls._unpack_packed(text)
        match = _PACKED.fullmatch(text.decode() if isinstance(text, bytes) else text)
        if not match:
            return None
        b, s, r, w, p, mc, fl, ob, th, tf, hs = match.groups()
        if hs:
            holds = tuple((int(e), int(m), int(c)) for e, m, c in _HOLD.findall(hs))
        else:   # an older form: what it held sits in a hold that has ended
            holds = ((0, int(r), int(fl)),) if int(r) or int(fl) else ()
        return cls(int(b), int(s), int(r), int(w), p, int(mc), int(fl), ob, th or "-",
                   int(tf or 0), holds)

    @classmethod
    def _unpack_packed(cls, data: bytes) -> Limits | None:
        try:
            _, b, s, r, w, p, mc, fl, tf, n = _PACKED_HEAD.unpack_from(data)
            ob_end = data.index(b"\0", _PACKED_HEAD.size)
            th_end = data.index(b"\0", ob_end + 1)
            ob = data[_PACKED_HEAD.size:ob_end].decode()
            th = data[ob_end + 1:th_end].decode()
            at = th_end + 1
            if len(data) != at + n * _PACKED_HOLD.size or p not in b"tdm":
                return None
            holds = tuple(_PACKED_HOLD.unpack_from(data, at + i * _PACKED_HOLD.size)
                          for i in range(n))
        except (struct.error, ValueError):   # not a state: read as none, as text is
            return None
        return cls(b, s, r, w, p.decode(), mc, fl, ob, th, tf, holds)

    def empty(self) -> bool:
        """Nothing set: the level can be dropped."""
        return (not self.budget and not self.max_concurrency and self.observe == "-"
                and self.thresholds == "-")

    def now(self, day: int, month: int, now_ms: int = 0, charge: bool = True) -> Limits:
        """As the next call at `now_ms` sees it (limits.lua lim_now): a new day or month
        starts with nothing spent; a hold that has ended is charged (or released) and
        its slots are free."""
        window = {"d": day, "m": month}.get(self.period, 0)
        lim = self if window == self.window else replace(self, spent=0, window=window,
                                                         fired=0)
        ended = [h for h in lim.holds if h[0] <= now_ms]
        if not ended:
            return lim
        money, slots = sum(h[1] for h in ended), sum(h[2] for h in ended)
        live = tuple(h for h in lim.holds if h[0] > now_ms)
        return replace(lim, holds=live, reserved=max(lim.reserved - money, 0),
                       in_flight=max(lim.in_flight - slots, 0),
                       spent=lim.spent + (money if charge else 0))

    def observes(self, what: str) -> bool:
        return OBSERVABLE[what] in self.observe


class BadThresholds(ValueError):
    pass


def parse_thresholds(value) -> tuple[float, ...]:
    """Thresholds from a list of numbers or a text '0.5,0.1,0': each a fraction of the
    quota or budget left, 0 <= t < 1, at most MAX_THRESHOLDS; sorted highest first."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise BadThresholds("thresholds: numbers between 0 and 1, e.g. 0.2,0.05,0") \
                from None
    if not isinstance(value, list | tuple) or not all(
            isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t < 1
            for t in value):
        raise BadThresholds("thresholds: numbers from 0 up to (not including) 1")
    if len(value) > MAX_THRESHOLDS:
        raise BadThresholds(f"thresholds: at most {MAX_THRESHOLDS}")
    return tuple(sorted({float(t) for t in value}, reverse=True))


def _fraction(t: float) -> str:
    return f"{t:.6f}".rstrip("0").rstrip(".") or "0"


def pack_thresholds(thresholds: tuple[float, ...] | None) -> str:
    """The scripts' form: None the default ('-'), () none ('n'), else '0.2,0.05,0'."""
    if thresholds is None:
        return "-"
    return ",".join(_fraction(t) for t in thresholds) or "n"


def unpack_thresholds(text: str | None, default: tuple[float, ...]) -> tuple[float, ...]:
    if not text or text == "-":
        return default
    if text == "n":
        return ()
    return tuple(float(t) for t in text.split(","))


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
