"""The process's open-file limit, and the connection cap under it.

Every connection holds a file descriptor. At a default soft limit (often 1024) a flood
of slow clients takes them all; accept() then fails for everyone, fresh requests too.
So each process raises its soft limit to the hard one at start, and the data-plane edge
keeps its connections under a cap below it (edge.py sheds the idle and the slowest when
full, dataplane/shedding.py picks them), leaving a reserve for Redis connections, the
admin listener, logs and metrics.
"""

from __future__ import annotations

import resource

RESERVE = 64          # descriptors left for everything that is not a data-plane connection
UNLIMITED = 1 << 20   # what "unlimited" is raised to (the kernel's usual nr_open)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY:
        return UNLIMITED
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):   # e.g. above fs.nr_open: keep what we have
            pass
    return soft


def connection_cap(setting: int, soft_limit: int, reserve: int) -> int:
    """Data-plane connections allowed: `setting` (0: as many as fit), never more than the
    open-file limit minus `reserve`; under a tiny limit, a quarter of it. Pure."""
    room = max(soft_limit - reserve, soft_limit // 4, 1)
    return room if setting == 0 else min(setting, room)
