"""Budgets in money and concurrency limits, at every level: a key, its project, its
organization, its member (user keys). The control plane sets them; authorize.lua and
settle.lua count against them (schema/limits.lua, docs/budgets.md).

Where the state lives: a key's own in its record (field `lim`); a project's,
organization's or member's in the budgets hash of the organization's tag (`b:{tag}`),
which is where the keys of the organization are minted, so one script call sees every
level at once on one Redis Cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..redis.runner import run_script
from ..schema import names
from ..schema.contracts import SetLimitsArgs, SetLimitsReply
from ..schema.keys import KeyHasher, shard_of
from ..schema.limits import (
    MAX_CONCURRENCY,
    OBSERVABLE,
    OBSERVABLE_NAMES,
    PERIOD_NAMES,
    PERIODS,
    BadThresholds,
    Calendar,
    Limits,
    observe_letters,
    pack_thresholds,
    parse_thresholds,
    unpack_thresholds,
)
from ..schema.money import MAX_AMOUNT, BadAmount, format_amount, parse_amount
from ..schema.record import FIELD, QUOTA_FIRED, now_ms
from ..schema.scripts import SET_LIMITS
from .errors import Invalid, NotFound


@dataclass(frozen=True, slots=True)
class LimitChange:
    """What a request changes; None leaves a setting as it is."""
    budget: int | None = None              # micro-units; 0 removes the budget
    period: str | None = None              # total | day | month
    max_concurrency: int | None = None     # 0 removes the limit
    observe: tuple[str, ...] | None = None  # OBSERVABLE names; () enforces everything

    def empty(self) -> bool:
        return all(v is None for v in (self.budget, self.period, self.max_concurrency,
                                       self.observe))


def parse_change(req: dict) -> LimitChange:
    """A change from the API's (and the CLI's) fields: budget ("5.00", or null / "0" to
    remove), budget_period, max_concurrency, observe (list). Invalid names the field."""
    budget = req.get("budget", ...)
    if budget is ...:
        micro = None
    elif budget is None:
        micro = 0
    else:
        try:
            micro = parse_amount(budget, MAX_AMOUNT, "budget")
        except BadAmount as exc:
            raise Invalid(str(exc), "budget") from None
    period = req.get("budget_period")
    if period is not None and period not in PERIODS:
        raise Invalid("budget_period: one of total, day, month", "budget_period")
    conc = req.get("max_concurrency")
    if conc is not None and (not isinstance(conc, int) or isinstance(conc, bool)
                             or not 0 <= conc <= MAX_CONCURRENCY):
        raise Invalid(f"max_concurrency: a whole number between 0 (none) and "
                      f"{MAX_CONCURRENCY}", "max_concurrency")
    observe = req.get("observe")
    if observe is not None:
        if not isinstance(observe, list) or not all(o in OBSERVABLE for o in observe):
            raise Invalid("observe: a list of " + ", ".join(OBSERVABLE), "observe")
        observe = tuple(observe)
    return LimitChange(micro, period, conc, observe)


LIMIT_FIELDS = ("budget", "budget_period", "max_concurrency", "observe")


def initial_limits(req: dict) -> bytes:
    """A new key's own limits from its request, packed for its record (b'' none)."""
    if not any(req.get(f) is not None for f in LIMIT_FIELDS):
        return b""
    change = parse_change(req)
    return Limits(budget=change.budget or 0, period=PERIODS[change.period or "total"],
                  max_concurrency=change.max_concurrency or 0,
                  observe=observe_letters(change.observe or ())).pack()


def limits_view(state: Limits | None, now: tuple[int, int], now_ms: int,
                charge: bool) -> dict:
    """What is set, spent, reserved and left, as the next call would see it (at `now_ms`,
    holds that ended charged or released by the expiry policy, `charge`)."""
    lim = (state or Limits()).now(*now, now_ms, charge)
    left = max(lim.budget - lim.spent - lim.reserved, 0) if lim.budget else None
    return {
        "budget": format_amount(lim.budget) if lim.budget else None,
        "budget_period": PERIOD_NAMES[lim.period],
        "spent": format_amount(lim.spent),
        "reserved": format_amount(lim.reserved),
        "remaining": None if left is None else format_amount(left),
        "max_concurrency": lim.max_concurrency or None,
        "in_flight": lim.in_flight,
        "observe": sorted(OBSERVABLE_NAMES[c] for c in lim.observe if c in OBSERVABLE_NAMES),
    }


def parse_threshold_change(req: dict) -> tuple[float, ...] | None:
    """{"thresholds": [0.5, 0.1, 0]} ([] none) or {"thresholds": null} (the default)."""
    if "thresholds" not in req:
        raise Invalid("thresholds: a list of fractions, or null for the default",
                      "thresholds")
    value = req["thresholds"]
    if value is None:
        return None
    try:
        return parse_thresholds(value)
    except BadThresholds as exc:
        raise Invalid(str(exc), "thresholds") from None


def thresholds_view(text: str | None, default: tuple[float, ...]) -> dict:
    own = text not in (None, "", "-")
    return {"thresholds": list(unpack_thresholds(text, default)), "default": not own}


class Budgets:
    """Reads and writes the limits of one level; the caller has checked who may."""

    def __init__(self, redis, hasher: KeyHasher, timezone: str = "UTC",
                 thresholds: tuple[float, ...] = (0.2, 0.05, 0.0)):
        self.redis = redis
        self.hasher = hasher
        self.calendar = Calendar(timezone)
        self.default_thresholds = thresholds
        self.charge_expired = True   # expired_reservation: charge (else release)

    def view(self, state: Limits | None) -> dict:
        now = now_ms()
        return limits_view(state, self.calendar.numbers(now), now, self.charge_expired)

    def where(self, level: str, org: str, entity_id: str) -> tuple[str, str]:
        """(hash, field) of a project's, organization's or member's state."""
        return (names.budgets(self.hasher.org_tag(org)),
                names.level_field(level, entity_id))

    async def key_hash(self, key_id: str) -> str:
        found = await self.redis.hget(names.KEY_INDEX, key_id)
        if not found:
            raise NotFound(f"no key with id {key_id!r}", "key_id")
        return found.decode() if isinstance(found, bytes) else found

    async def read(self, hash_: str, field_: str) -> dict:
        return self.view(Limits.unpack(await self.redis.hget(hash_, field_)))

    async def write(self, hash_: str, field_: str, change: LimitChange) -> dict:
        if change.empty():
            raise Invalid("give at least one of budget, budget_period, max_concurrency, "
                          "observe", "budget")
        args = SetLimitsArgs(
            hash_, field_, "" if change.budget is None else change.budget,
            "" if change.period is None else PERIODS[change.period],
            "" if change.max_concurrency is None else change.max_concurrency,
            "" if change.observe is None else observe_letters(change.observe))
        stored = SetLimitsReply.parse(await run_script(self.redis, SET_LIMITS, args.keys(),
                                                       args.argv()))
        return self.view(Limits.unpack(stored.state))

    async def of_key(self, key_id: str) -> dict:
        return await self.read(names.record(await self.key_hash(key_id)), "lim")

    async def set_key(self, key_id: str, change: LimitChange) -> dict:
        return await self.write(names.record(await self.key_hash(key_id)), "lim", change)

    def covered(self, key_hash: str, org: str) -> bool:
        """Whether a key of `org` sits on the organization's tag (every key minted since
        budgets exist): only those see the levels above them."""
        return shard_of(key_hash) == self.hasher.org_tag(org)

    # -- alert thresholds (issue 12): a key's in its record (th), a level's in its state --

    async def thresholds(self, hash_: str, field_: str) -> dict:
        if field_ == "lim":
            return thresholds_view(_s(await self.redis.hget(hash_, FIELD["thresholds"])),
                                   self.default_thresholds)
        state = Limits.unpack(await self.redis.hget(hash_, field_))
        return thresholds_view(state and state.thresholds, self.default_thresholds)

    async def set_thresholds(self, hash_: str, field_: str,
                             thresholds: tuple[float, ...] | None) -> dict:
        """Store them and re-arm the alerts (none has fired for the new list)."""
        packed = pack_thresholds(thresholds)
        if field_ == "lim":
            await self.redis.hset(hash_, FIELD["thresholds"], packed)
            await self.redis.hdel(hash_, QUOTA_FIRED)
            state = Limits.unpack(await self.redis.hget(hash_, "lim"))
            if state and state.fired:
                await run_script(self.redis, SET_LIMITS, (hash_,),
                                 SetLimitsArgs(hash_, "lim", thresholds="-").argv())
        else:
            await run_script(self.redis, SET_LIMITS, (hash_,),
                             SetLimitsArgs(hash_, field_, thresholds=packed).argv())
        return await self.thresholds(hash_, field_)


def _s(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
