"""Lua scripts: package data, read once, called by SHA (EVALSHA) with an EVAL fallback:
the hot path through redis/runner.py's runners, everything else through
runner.run_script. Their KEYS, ARGV and replies: contracts.py."""

from __future__ import annotations

import hashlib
from importlib import resources


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath(f"{name}.lua").read_bytes()


class Script:
    """One script, sent as its `.lua` file with the shared `prelude` files in front
    (Redis scripts cannot include one another)."""

    def __init__(self, name: str, prelude: tuple[str, ...] = ()):
        self.name = name
        self.source = b"".join(_read(p) for p in prelude) + _read(name)
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


PRELUDES = ("limits",)            # shared functions, sent in front of scripts, never alone
AUTHORIZE = Script("authorize", prelude=("limits",))
SETTLE = Script("settle", prelude=("limits",))
ALL = (AUTHORIZE, SETTLE)          # the hot path's scripts, loaded on every connection
POOL_QUOTA = Script("pool_quota")  # control plane (rotation)
CREATE_UNIQUE = Script("create_unique")  # control plane (unique names)
RETIRE_TAG = Script("retire_tag")  # webhook worker: drop an emptied event stream's tag
SET_LIMITS = Script("set_limits", prelude=("limits",))  # control plane (budgets)
