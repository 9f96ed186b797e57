"""`python -m benchmarks.serve serve ...`: `sidecar serve` plus two benchmark-only routes.

    /bench/baseline/...  authorize's work minus the Redis call: the same Authorizer (body
                         read, key hash, model extraction, the EVALSHA packed, batched per
                         tick in the same Pipeline, the callers resumed by their batch's
                         future, the same headers and metrics); only the socket write to
                         Redis, Redis itself and the reply's read and parse are left out:
                         each batch resolves on the next loop tick with a fixed allow reply
    /bench/bare          200 "ok" from the same process: what the edge alone costs
    /bench/gc            this process's cyclic garbage collections so far, per
                         generation: how many, their total and longest pause (ms), and
                         the longest one after the server started (the pauses calls see)

They wrap the router of the production data plane from outside, so no production module
carries a benchmark route or setting. Workers (--workers N) are started through this module
too (server.WORKER_ENTRY), so every worker has the routes.
"""

from __future__ import annotations

import gc
import sys
import time

import orjson

from sidecar.cli.main import main
from sidecar.dataplane.authorize import Authorizer
from sidecar.dataplane.http_messages import Answer, Call
from sidecar.redis.pipeline import Pipeline, RedisEndpoint
from sidecar.redis.runner import PipelineRunner
from sidecar.runtime import server
from sidecar.schema.contracts import AuthorizeReply
from sidecar.schema.keys import KeyHasher

REPLY = list(AuthorizeReply(code=0, key_id=b"key_baseline", type=b"s", org=b"", project=b"",
                            rpm=600, rpm_remaining=599, rpm_reset_ms=100))


class NoRedisPipeline(Pipeline):
    """The production Pipeline (submit, batches of max_batch, flush per tick), whose
    batches are answered on the next loop tick with the fixed allow reply instead of
    being written to Redis. The first connect is skipped: there is no server."""

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._loop.call_soon(_answer, pending)


def _answer(pending) -> None:
    for commands, future in pending:
        if not future.done():
            future.set_result([REPLY] * len(commands))


class FixedRecordRunner(PipelineRunner):
    """authorize's runner minus Redis: the command is packed and batched as in production."""

    def __init__(self) -> None:
        super().__init__(NoRedisPipeline(RedisEndpoint(), timeout=1.0))


async def _ok(_: Call) -> Answer:
    return Answer(200, {}, b"ok", "text/plain")


class GcPauses:
    """gc.callbacks: each collection's pause, by generation (in this process)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.stats = {g: {"collections": 0, "total_ms": 0.0, "longest_ms": 0.0,
                          "longest_serving_ms": 0.0} for g in range(3)}
        self.serving = False
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        ms = (time.perf_counter() - self.started) * 1000
        one = self.stats[info["generation"]]
        one["collections"] += 1
        one["total_ms"] += ms
        one["longest_ms"] = max(one["longest_ms"], ms)
        if self.serving:
            one["longest_serving_ms"] = max(one["longest_serving_ms"], ms)

    async def answer(self, _: Call) -> Answer:
        self.serving = True   # from the first call on (the startup's collections before)
        return Answer(200, {}, orjson.dumps({str(g): {k: round(v, 2) for k, v in s.items()}
                                             for g, s in self.stats.items()}),
                      "application/json")


GC = GcPauses()


_production = server.data_plane


def data_plane(settings, runner):
    edge, authorize = _production(settings, runner)
    baseline = Authorizer(settings, KeyHasher(settings.key_pepper), FixedRecordRunner())
    production = edge.router

    def router(path: str):
        found = production(path)
        if found is not None:
            return found
        if path == "/bench/bare" or path.startswith("/bench/bare/"):
            return _ok, True
        if path == "/bench/gc":
            return GC.answer, True
        if path.startswith("/bench/baseline"):
            return baseline, True
        return None

    edge.router = router
    return edge, authorize


server.data_plane = data_plane
server.WORKER_ENTRY = "benchmarks.serve"

if __name__ == "__main__":
    sys.exit(main())
