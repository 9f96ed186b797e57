"""Lua scripts: package data, read once, called by SHA (EVALSHA) with an EVAL fallback:
the hot path through redis/runner.py's runners, everything else through
runner.run_script. Their KEYS, ARGV and replies: contracts.py."""

from __future__ import annotations

import hashlib
from importlib import resources


class Script:
    def __init__(self, name: str):
        self.name = name
        self.source = resources.files(__package__).joinpath(f"{name}.lua").read_bytes()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


AUTHORIZE = Script("authorize")
SETTLE = Script("settle")
ALL = (AUTHORIZE, SETTLE)          # the hot path's scripts, loaded on every connection
POOL_QUOTA = Script("pool_quota")  # control plane (rotation)
CREATE_UNIQUE = Script("create_unique")  # control plane (unique names)
RETIRE_TAG = Script("retire_tag")  # webhook worker: drop an emptied event stream's tag
