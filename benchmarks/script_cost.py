"""Redis CPU per decision of authorize.lua alone: plain keys against the budget hierarchy.

    python -m benchmarks.script_cost                 # 20,000 keys each, 3 rounds
    python -m benchmarks.script_cost --calls 100000 --rounds 5

No sidecar and no HTTP: the script called by EVALSHA, pipelined 64 deep on one socket,
with the arguments dataplane/authorize.py builds. Plain: the main benchmark's keys (quota
+ rpm, nothing above them). Budgets: benchmarks/budgets.py's keys (a budget and a
concurrency limit on the key, its project and its organization) with settlement on, so
each call reserves at three levels and writes its reservation. Rounds alternate plain and
budgets on one Redis. Per decision: the script's own time inside Redis (INFO
commandstats, `evalsha` usec / calls) and Redis's process CPU (INFO cpu, which adds the
protocol work and the expiry of reservations). It answers "what does a change to a
script cost" in seconds, where the full run needs minutes and carries the sidecar's noise.
"""

from __future__ import annotations

import argparse
import random
import secrets
import socket
import statistics
import tempfile
import time
from pathlib import Path

import hiredis

from sidecar.schema.keys import KeyHasher
from sidecar.schema.limits import Calendar
from sidecar.schema.scripts import AUTHORIZE

from .alerts import script_call
from .budgets import TTL_S, load_hierarchy
from .keyload import _read_replies, load_keys
from .procs import Processes

PEPPER = "script-cost-" + "0" * 20
DEPTH = 64
MONEY = 2461   # micro-units a call reserves (budgets.py's model and body)


class Conn:
    """One pipelined socket to Redis: commands out, replies in order."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = hiredis.Reader()

    def call(self, *commands: tuple) -> list:
        self.sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))
        return _read_replies(self.sock, self.reader, len(commands))

    def counters(self) -> tuple[int, int, float]:
        """(evalsha calls, evalsha usec, Redis CPU seconds) so far."""
        stats, cpu = (r.decode() for r in self.call(("INFO", "commandstats"),
                                                    ("INFO", "cpu")))
        calls = usec = 0
        for line in stats.splitlines():
            if line.startswith("cmdstat_evalsha:"):
                kv = dict(x.split("=") for x in line.split(":", 1)[1].split(","))
                calls, usec = int(kv["calls"]), int(kv["usec"])
        c = dict(line.split(":", 1) for line in cpu.splitlines() if ":" in line)
        return calls, usec, float(c["used_cpu_sys"]) + float(c["used_cpu_user"])


def run(conn: Conn, hashes: list[str], calls: int, settle: bool) -> dict:
    calendar = Calendar("UTC")
    rng = random.Random(7)
    before = conn.counters()
    done = 0
    while done < calls:
        batch = []
        for _ in range(DEPTH):
            now = int(time.time() * 1000)
            day, month = calendar.numbers(now)
            keys, args = script_call(
                hashes[rng.randrange(len(hashes))], now, day, month,
                reservation=secrets.token_hex(8) if settle else "",
                ttl_ms=TTL_S * 1000 if settle else 0, money=MONEY if settle else -1)
            batch.append(("EVALSHA", AUTHORIZE.sha, len(keys), *keys, *args))
        replies = conn.call(*batch)
        if any(not isinstance(r, list) or r[0] != 0 for r in replies):
            raise SystemExit(f"script_cost: a call was not allowed: {replies[0]!r}")
        done += DEPTH
    after = conn.counters()
    n = after[0] - before[0]
    return {"script_us": (after[1] - before[1]) / n,
            "redis_cpu_us": (after[2] - before[2]) * 1e6 / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.script_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=20_000, help="keys of each kind (20000)")
    p.add_argument("--calls", type=int, default=60_000, help="calls per run (60000)")
    p.add_argument("--rounds", type=int, default=3, help="plain, budgets rounds (3)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="script-cost-") as tmp, \
            Processes(Path(tmp)) as procs:
        redis = procs.redis()
        hasher = KeyHasher(PEPPER)
        kinds = {"plain": ([hasher(k) for k in load_keys("127.0.0.1", redis.port, PEPPER,
                                                          args.keys)], False),
                 "budgets": ([hasher(k) for k in load_hierarchy("127.0.0.1", redis.port,
                                                                PEPPER, args.keys)], True)}
        conn = Conn(redis.port)
        conn.call(("SCRIPT", "LOAD", AUTHORIZE.source))
        got: dict[str, list[dict]] = {name: [] for name in kinds}
        for i in range(args.rounds):
            for name, (hashes, settle) in kinds.items():
                got[name].append(run(conn, hashes, args.calls, settle))
                print(f"round {i + 1} {name}: script {got[name][-1]['script_us']:.2f} µs, "
                      f"Redis CPU {got[name][-1]['redis_cpu_us']:.2f} µs per decision")
    for name, runs in got.items():
        print(f"{name}: median of {len(runs)} rounds: script "
              f"{statistics.median(r['script_us'] for r in runs):.2f} µs, Redis CPU "
              f"{statistics.median(r['redis_cpu_us'] for r in runs):.2f} µs per decision")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
