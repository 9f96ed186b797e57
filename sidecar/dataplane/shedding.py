"""Which open connections the edge closes when it is full (`max_connections`).

The idle keep-alive connections go first (least recently active first), then those still
receiving a request, the one begun longest ago first: the slowest. A connection with
answers pending is busy, not slow (Redis bounds it): it stays. A share of the cap goes at
once, so a flood of accepts costs one scan per share, and the scan happens only when full.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

SHED_SHARE = 16           # when full, close 1/16 of the cap at once: one scan, many accepts


def shed_count(open_connections: int, max_connections: int) -> int:
    """How many to close now: the excess, or a share of the cap, at least one."""
    return max(open_connections - max_connections, max_connections // SHED_SHARE, 1)


def pick_victims(connections: Iterable, count: int) -> list:
    """Up to `count` connections to close, by the order above. A connection here has
    `queue` (answers pending), `transport` (None once closed), `in_message`,
    `last_active` and `request_start` (loop times)."""
    idle, arriving = [], []
    for conn in connections:
        if not conn.queue and conn.transport is not None:
            (arriving if conn.in_message else idle).append(conn)
    victims = heapq.nsmallest(count, idle, key=_last_active)
    if len(victims) < count:
        victims += heapq.nsmallest(count - len(victims), arriving, key=_request_start)
    return victims


def _last_active(conn) -> float:
    return conn.last_active


def _request_start(conn) -> float:
    return conn.request_start
