"""The key record's vocabulary: its fields, permission words, limits and times.

A record is one Redis hash `k:{tag}:<hmac>`. Field names are short on purpose: a record
is kept in memory for every key. The authorize script reads and writes the same fields:

  id  key id            t   type s/b/o/a        st  status a(ctive)/d(isabled)
  dr  why it is disabled (CASCADE_REASONS cannot be undone by enabling)
  nm  name              ca  created ms          cb  created by
  ex  expires ms (0 = never)
  ul  unlimited 1/0     qr  quota remaining     qu  quota used (units)
  ips allowed nets 'hex/bits,...'               m   models ',a,b,'
  pm  permission a/r/ro sc  scopes ',s1,s2,'
  rpm, tpm              limits per minute; ra / ta: their GCRA state, the µs time at
                        which the requests / reported tokens so far have drained
                        (authorize.lua; rw, rc, tw, tc of the old fixed windows are unused)
  cq, cu, ce, cp        subscription: cycle quota, used, cycle end ms, period ms
  pg  PAYG fallback 1/0 ow  owning account (wallet field)   pu  units paid by the wallet
  org, prj, mem, sa     organization, project, member, service account
  la, lip, lm, n        recent activity: last used ms, IP, model; request count
  rt, rf                rotation: rotated to / rotated from (key ids)
  sub                   the subscription (plan) an sk-sub- key belongs to
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

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
ROTATION_COPIED = ("t", "nm", "ex", "ul", "qr", "ips", "m", "pm", "sc", "rpm", "tpm", "cq",
                   "cu", "ce", "cp", "pg", "ow", "org", "prj", "mem", "sa", "sub")


def _iso(ms: str | int | None) -> str | None:
    if not ms or int(ms) == 0:
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat().replace("+00:00", "Z")


def now_ms() -> int:
    return int(time.time() * 1000)
