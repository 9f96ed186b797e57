"""The key record's vocabulary: its fields, permission words, limits and times.

A record is one Redis hash `k:{tag}:<hmac>`. Field names are short on purpose: a record
is kept in memory for every key. The control plane reads and writes records only through
KeyRecord (below: readable names, one map for each code); the scripts, and the data plane
that calls them, use the same fields by their short names:

  id  key id            t   type s/b/o/a        st  status a(ctive)/d(isabled)
  dr  why it is disabled (CASCADE_REASONS cannot be undone by enabling)
  nm  name              ca  created ms          cb  created by
  ex  expires ms (0 = never)
  ul  unlimited 1/0     qr  quota remaining     qu  quota used (units)
  ips allowed nets 'hex/bits,...'               m   models ',a,b,'
  qp  the rotation's shared quota pool (a wallet field) that holds qr instead
  pm  permission a/r/ro sc  scopes ',s1,s2,'
  rpm, tpm              limits per minute; ra / ta: their GCRA state, the µs time at
                        which the requests / reported tokens so far have drained
                        (authorize.lua; rw, rc, tw, tc of the old fixed windows are unused)
  cq, cu, ce, cp        subscription: cycle quota, used, cycle end ms, period ms
  pg  PAYG fallback 1/0 ow  owning account (wallet field)   pu  units paid by the wallet
  org, prj, mem, sa     organization, project, member, service account
  la, lip, lm, n        recent activity: last used ms, IP, model; request count
  rt, rf                rotation: rotated to / rotated from (key ids)
  rpd, tpd              limits per day; rd / td: their GCRA state (as ra / ta)
  lim                   the key's budget and concurrency state, packed (schema/limits.py):
                        the one field that is bytes, not text
  lv                    the levels above it with budgets: fields of the tag's budgets
                        hash, 'p:<project> o:<org> m:<member>' (names.level_field)
  sub                   the subscription (plan) an sk-sub- key belongs to
  th                    alert thresholds of the key's quota and budget (limits.py
                        pack_thresholds; absent = the deployment's default)
  qf, xn                alerts: quota thresholds fired (reset when the quota is raised),
                        the expiry a key.expired event was sent for (authorize.lua)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

from .keys import TYPE_CODE, TYPE_OF_CODE, KeyType

MAX_QUOTA = 10**12        # Lua numbers are doubles: stay well inside exact integers
ALL, RESTRICTED, READ_ONLY = "all", "restricted", "read-only"   # the permission words
PERMISSIONS = {ALL: "a", RESTRICTED: "r", READ_ONLY: "ro"}      # word -> record code (pm)
PERMISSION_NAMES = {v: k for k, v in PERMISSIONS.items()}


def permission_of(rec: dict) -> str:
    """The permission word of a record (field pm; absent or unknown: all)."""
    return PERMISSION_NAMES.get(rec.get("pm", "a"), ALL)
DAY_MS = 86_400_000
# Owner gone: enabling the key again would resurrect access the owner's removal revoked.
CASCADE_REASONS = frozenset({"member_removed", "service_account_deleted", "project_deleted",
                             "subscription_cancelled"})
# Settings a rotated key keeps (copied to its successor); counters and activity start anew.
ROTATION_COPIED = ("t", "nm", "ex", "ul", "qr", "ips", "m", "pm", "sc", "rpm", "tpm", "rpd",
                   "tpd", "lv", "cq", "th",
                   "cu", "ce", "cp", "pg", "ow", "org", "prj", "mem", "sa", "sub")


def _iso(ms: str | int | None) -> str | None:
    if not ms or int(ms) == 0:
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat().replace("+00:00", "Z")


def now_ms() -> int:
    return int(time.time() * 1000)


ACTIVE, DISABLED = "a", "d"     # status codes (st)
QUOTA_FIRED = "qf"              # the scripts' alert state: deleted to re-arm the alerts


def _f(name: str, kind: str = "s", default=None):
    """A KeyRecord attribute stored as hash field `name`; kind says how: s text,
    i integer, b flag 1/0, l set ',a,b,', c list 'a,b', t type code, st status a/d,
    p permission code, raw the stored bytes (or text, as older records have it)."""
    if default is None:
        default = {"s": "", "l": [], "c": []}.get(kind)
    meta = {"field": name, "kind": kind}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class KeyRecord:
    """A key record by readable names; the short hash fields are only in this class.

    Absent fields read as "", [] or None (and are not written back); `extra` keeps the
    fields the control plane does not name (the scripts' limiter state, ...), so a
    record read and written again loses nothing.
    """

    id: str = _f("id")
    type: KeyType = _f("t", "t", KeyType.standard)
    active: bool = _f("st", "st", False)
    disabled_reason: str = _f("dr")
    name: str = _f("nm")
    created_ms: int | None = _f("ca", "i")
    created_by: str = _f("cb")
    expires_ms: int | None = _f("ex", "i")            # 0: never
    unlimited: bool | None = _f("ul", "b")
    quota_remaining: int | None = _f("qr", "i")
    quota_used: int | None = _f("qu", "i")
    quota_pool: str = _f("qp")
    networks: list[str] = _f("ips", "c")               # 'hex/bits' (schema/ips.py)
    models: list[str] = _f("m", "l")
    permission: str = _f("pm", "p", ALL)
    scopes: list[str] = _f("sc", "l")
    rpm: int | None = _f("rpm", "i")
    tpm: int | None = _f("tpm", "i")
    rpd: int | None = _f("rpd", "i")
    tpd: int | None = _f("tpd", "i")
    limits: bytes | str = _f("lim", "raw", b"")    # schema/limits.py, packed
    levels: str = _f("lv")                         # names.level_field words
    cycle_quota: int | None = _f("cq", "i")
    cycle_used: int | None = _f("cu", "i")
    cycle_end_ms: int | None = _f("ce", "i")
    cycle_ms: int | None = _f("cp", "i")
    payg_fallback: bool | None = _f("pg", "b")
    wallet: str = _f("ow")
    payg_used: int | None = _f("pu", "i")
    org: str = _f("org")
    project: str = _f("prj")
    member: str = _f("mem")
    service_account: str = _f("sa")
    subscription: str = _f("sub")
    thresholds: str = _f("th")                     # limits.pack_thresholds
    rotated_to: str = _f("rt")
    rotated_from: str = _f("rf")
    last_used_ms: int | None = _f("la", "i")
    last_ip: str = _f("lip")
    last_model: str = _f("lm")
    requests: int | None = _f("n", "i")
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, raw: Mapping) -> KeyRecord:
        """From HGETALL's reply (str or bytes)."""
        named, extra = {}, {}
        for k, v in raw.items():   # the fields present only (the census reads them all)
            k = text(k)
            known = _BY_FIELD.get(k)
            if known is None:
                extra[k] = text(v)
            else:
                named[known[0]] = v if known[1] == "raw" else _decode(known[1], text(v))
        return cls(**named, extra=extra)

    def to_hash(self) -> dict[str, str | bytes]:
        """The hash to HSET: every named field that is set, and the extra ones."""
        out = dict(self.extra)
        for f in _NAMED:
            value = getattr(self, f.name)
            if value is not None and value != "" and value != b"" and value != []:
                out[f.metadata["field"]] = _encode(f.metadata["kind"], value)
        return out

    @staticmethod
    def fields(**changes) -> dict[str, str | bytes]:
        """The hash fields of a partial write, by attribute: fields(active=False, ...)."""
        return {FIELD[name]: _encode(_KIND[name], value) for name, value in changes.items()}

    def expired(self, now: int) -> bool:
        return 0 < (self.expires_ms or 0) <= now

    def owners(self) -> list[str]:
        """Index entries a key belongs to: member, service account, project, account, org."""
        return [prefix + value for prefix, value in (
            ("mem:", self.member), ("sa:", self.service_account), ("prj:", self.project),
            ("acct:", self.wallet), ("org:", self.org)) if value]


_NAMED = [f for f in fields(KeyRecord) if "field" in f.metadata]
FIELD = {f.name: f.metadata["field"] for f in _NAMED}      # attribute -> hash field
_KIND = {f.name: f.metadata["kind"] for f in _NAMED}
_BY_FIELD = {f.metadata["field"]: (f.name, f.metadata["kind"]) for f in _NAMED}


def _decode(kind: str, value: str):
    if kind == "i":
        return int(value) if value else None
    if kind == "b":
        return value == "1"
    if kind == "l":
        return [v for v in value.split(",") if v]
    if kind == "c":
        return value.split(",") if value else []
    if kind == "t":
        return TYPE_OF_CODE.get(value, KeyType.standard)
    if kind == "st":
        return value == ACTIVE
    if kind == "p":
        return PERMISSION_NAMES.get(value, ALL)
    return value


def _encode(kind: str, value) -> str | bytes:
    if kind == "raw":
        return value
    if kind == "b":
        return "1" if value else "0"
    if kind == "l":
        return "," + ",".join(value) + "," if value else ""
    if kind == "c":
        return ",".join(value)
    if kind == "t":
        return TYPE_CODE[value]
    if kind == "st":
        return ACTIVE if value else DISABLED
    if kind == "p":
        return PERMISSIONS[value]
    return str(value)


def stored(raw: Mapping) -> dict[str, str | bytes]:
    """A record's HGETALL reply by field: text, but the packed `lim` as its bytes."""
    out: dict[str, str | bytes] = {}
    for k, v in raw.items():
        k = text(k)
        out[k] = v if _BY_FIELD.get(k, ("", ""))[1] == "raw" else text(v)
    return out


def text(value) -> str:
    """A Redis reply's value as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)
