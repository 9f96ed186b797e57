"""Typed contracts between Python and the Lua scripts: KEYS, ARGV and replies by name.

One class per script's arguments, its fields in the order of the script's header
(`-- KEYS[n]` then `-- ARGV[n]`, the names as the header spells them), `keys()` and
`argv()` giving exactly what the script reads; one class per reply, `parse(raw)` naming
the fields of the header's `-- Returns ...` line. tests/unit/test_contracts.py checks
the two stay the same. NamedTuples (a frozen dataclass costs a few µs to build); the hot
path's `AuthorizeArgs.pack` builds KEYS and ARGV as plain tuples, without the instance.
"""

from __future__ import annotations

from typing import NamedTuple

from . import names

_new = tuple.__new__


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


# -- authorize.lua ---------------------------------------------------------------------


class AuthorizeArgs(NamedTuple):
    KEYS = ("record", "wallet", "budgets", "events", "usage_day", "usage_hour",
            "reservation")
    ARGV = ("now", "cost", "ip_hex", "ip", "model", "scope", "granting", "write",
            "uncertain", "pool_prefix", "reservation_ttl", "money", "day", "month",
            "expiry", "thresholds", "usage_days")
    OPTIONAL = ("reservation",)   # KEYS[7] only when /settle is on

    record: str
    wallet: str
    budgets: str
    events: str               # names.events(tag)
    usage_day: str            # names.usage_day(tag, day)
    usage_hour: str           # names.usage_hour(tag, hour)
    reservation: str          # '' when /settle is off: no KEYS[7]
    now: int
    cost: int
    ip_hex: str
    ip: str
    model: str
    scope: str
    granting: str
    write: int
    uncertain: int
    pool_prefix: str = names.POOL_PREFIX
    reservation_ttl: int = 0
    money: int = -1           # micro-units at most (dataplane/spend.py); -1 no price
    day: int = 0              # schema/limits.Calendar
    month: int = 0
    expiry: str = "c"         # 'c' charge, 'r' release an expired reservation
    thresholds: str = "0.2,0.05,0"   # the default alert thresholds, 'n' none
    usage_days: int = 0       # usage history kept (days); 0 writes none

    def keys(self) -> tuple:
        return self[:7] if self[6] else self[:6]

    def argv(self) -> tuple:
        return self[7:]

    @staticmethod
    def pack(record: str, wallet: str, budgets: str, events: str,
             usage_day: str, usage_hour: str, reservation: str, now: int, cost: int,
             ip_hex: str, ip: str, model: str, scope: str, granting: str, write: int,
             uncertain: int, pool_prefix: str, reservation_ttl: int, money: int, day: int,
             month: int, expiry: str, thresholds: str,
             usage_days: int) -> tuple[tuple, tuple]:
        """(keys(), argv()) of the instance these arguments make, without making it: the
        hot path's one build per call (~100 ns, the instance ~450 ns)."""
        argv = (now, cost, ip_hex, ip, model, scope, granting, write, uncertain,
                pool_prefix, reservation_ttl, money, day, month, expiry, thresholds,
                usage_days)
        if reservation:
            return (record, wallet, budgets, events, usage_day, usage_hour,
                    reservation), argv
        return (record, wallet, budgets, events, usage_day, usage_hour), argv


class AuthorizeReply(NamedTuple):
    FIELDS = ("code", "key_id", "type", "org", "project", "rpm", "rpm_remaining", "tpm",
              "tpm_remaining", "rpm_reset_ms", "tpm_reset_ms", "retry_ms", "level",
              "observed")

    code: int
    key_id: str = ""
    type: str = ""            # the record's one-letter type code (schema/keys.TYPE_CODE)
    org: str = ""
    project: str = ""
    rpm: int = 0              # the tightest requests limit: per minute or per day
    rpm_remaining: int = 0
    tpm: int = 0              # the tightest tokens limit
    tpm_remaining: int = 0
    rpm_reset_ms: int = 0
    tpm_reset_ms: int = 0
    retry_ms: int = 0
    level: str = ""           # of a budget / concurrency denial: 'k' or a budgets field
    observed: str = ""        # ',<code>,...' observe-only limits would have refused

    @property
    def limits_known(self) -> bool:
        """Codes 1..7 are refused before the limits are read: the reply is {code} only."""
        return self.code == 0 or self.code > 7

    @classmethod
    def parse(cls, raw: list) -> AuthorizeReply:
        if len(raw) == 1:
            return cls(raw[0])
        if len(raw) != 14:
            raise ValueError(f"authorize.lua: a reply of {len(raw)} values")
        code, key_id, typ, org, project, rpm, rpm_left, tpm, tpm_left, rpm_reset, \
            tpm_reset, retry, level, observed = raw
        try:    # hiredis gives bytes; tuple.__new__ skips the generated __new__
            return _new(cls, (code, key_id.decode(), typ.decode(), org.decode(),
                              project.decode(), rpm, rpm_left, tpm, tpm_left, rpm_reset,
                              tpm_reset, retry, level.decode(), observed.decode()))
        except AttributeError:   # a client that decodes replies already
            return _new(cls, (code, _text(key_id), _text(typ), _text(org), _text(project),
                              rpm, rpm_left, tpm, tpm_left, rpm_reset, tpm_reset, retry,
                              _text(level), _text(observed)))


# -- settle.lua ------------------------------------------------------------------------


class SettleArgs(NamedTuple):
    KEYS = ("record", "wallet", "budgets", "reservation", "events", "usage_day",
            "usage_hour")
    ARGV = ("now", "actual", "tokens", "settled_ttl", "pool_prefix", "money", "day",
            "month", "expiry", "thresholds", "usage_days")
    OPTIONAL = ()

    record: str
    wallet: str
    budgets: str
    reservation: str
    events: str
    usage_day: str
    usage_hour: str
    now: int
    actual: int | str         # '' = what the call reserved
    tokens: int
    settled_ttl: int
    pool_prefix: str = names.POOL_PREFIX
    money: int | str = ""     # micro-units the call cost; '' = what it reserved
    day: int = 0
    month: int = 0
    expiry: str = "c"
    thresholds: str = "0.2,0.05,0"
    usage_days: int = 0

    def keys(self) -> tuple:
        return self[:7]

    def argv(self) -> tuple:
        return self[7:]


class SettleReply(NamedTuple):
    FIELDS = ("code", "reserved", "delta", "from_wallet", "money_reserved",
              "money_actual")
    SETTLED, UNKNOWN_KEY, ALREADY_SETTLED, NO_RESERVATION = 0, 1, 2, 3

    code: int
    reserved: int = 0
    delta: int = 0
    from_wallet: int = 0
    money_reserved: int = 0   # micro-units the call held at its levels
    money_actual: int = 0     # ... and was charged there

    @classmethod
    def parse(cls, raw: list) -> SettleReply:
        if len(raw) not in (1, 6):
            raise ValueError(f"settle.lua: a reply of {len(raw)} values")
        return cls(*(int(v) for v in raw))


# -- pool_quota.lua (control plane: rotation) -------------------------------------------


class PoolQuotaArgs(NamedTuple):
    KEYS = ("record", "wallet")
    ARGV = ("pool_field", "pool_id")
    OPTIONAL = ()

    record: str
    wallet: str
    pool_field: str           # names.pool_field(pool_id)
    pool_id: str

    def keys(self) -> tuple:
        return self[:2]

    def argv(self) -> tuple:
        return self[2:]


class PoolQuotaReply(NamedTuple):
    FIELDS = ("moved",)

    moved: int

    @classmethod
    def parse(cls, raw: object) -> PoolQuotaReply:
        return cls(int(raw))


# -- create_unique.lua (control plane: unique names) ------------------------------------


class CreateUniqueArgs(NamedTuple):
    KEYS = ("unique", "entity", "ids")
    ARGV = ("name", "new_id", "fields")
    OPTIONAL = ("ids",)
    VARIADIC = "fields"       # ARGV[3..]: the entity's fields and values, in pairs

    unique: str               # the unique index hash: name -> id
    entity: str
    ids: str                  # '' for no set of ids
    name: str
    new_id: str
    fields: tuple = ()

    def keys(self) -> tuple:
        return self[:3] if self[2] else self[:2]

    def argv(self) -> tuple:
        return (self.name, self.new_id, *self.fields)


class CreateUniqueReply(NamedTuple):
    FIELDS = ("held",)

    held: str                 # == new_id when created, else the id holding the name

    @classmethod
    def parse(cls, raw: object) -> CreateUniqueReply:
        return cls(_text(raw))


# -- retire_tag.lua (webhook worker) -----------------------------------------------------


class RetireTagArgs(NamedTuple):
    KEYS = ("active",)
    ARGV = ("tag", "score")
    OPTIONAL = ()

    active: str               # names.EVENTS_ACTIVE
    tag: str
    score: str

    def keys(self) -> tuple:
        return self[:1]

    def argv(self) -> tuple:
        return self[1:]


class RetireTagReply(NamedTuple):
    FIELDS = ("removed",)

    removed: int

    @classmethod
    def parse(cls, raw: object) -> RetireTagReply:
        return cls(int(raw))


# -- set_limits.lua (control plane: budgets and concurrency) -----------------------------


class SetLimitsArgs(NamedTuple):
    KEYS = ("holder",)
    ARGV = ("field", "budget", "period", "max_concurrency", "observe", "thresholds")
    OPTIONAL = ()

    holder: str               # names.record(...) or names.budgets(tag)
    field: str                # 'lim', or names.level_field(...)
    budget: int | str = ""    # '' leaves a setting unchanged
    period: str = ""
    max_concurrency: int | str = ""
    observe: str = ""
    thresholds: str = ""      # '0.2,0.05,0', '-' default, 'n' none

    def keys(self) -> tuple:
        return self[:1]

    def argv(self) -> tuple:
        return self[1:]


class SetLimitsReply(NamedTuple):
    FIELDS = ("state",)

    state: bytes              # packed (schema/limits.py Limits.unpack reads it)

    @classmethod
    def parse(cls, raw: object) -> SetLimitsReply:
        return cls(raw if isinstance(raw, bytes) else _text(raw).encode())


# script name -> (arguments, reply): what tests/unit/test_contracts.py compares
CONTRACTS = {
    "authorize": (AuthorizeArgs, AuthorizeReply),
    "settle": (SettleArgs, SettleReply),
    "pool_quota": (PoolQuotaArgs, PoolQuotaReply),
    "create_unique": (CreateUniqueArgs, CreateUniqueReply),
    "retire_tag": (RetireTagArgs, RetireTagReply),
    "set_limits": (SetLimitsArgs, SetLimitsReply),
}
