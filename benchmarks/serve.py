"""`python -m benchmarks.serve serve ...`: `sidecar serve` plus two benchmark-only routes.

    /bench/baseline/...  the whole authorize request work (body read, key hash, model
                         extraction, the same headers and metrics) against a fixed record,
                         without Redis: what the sidecar costs apart from Redis
    /bench/bare          200 "ok" from the same process: what the edge alone costs

They wrap the router of the production data plane from outside, so no production module
carries a benchmark route or setting. Workers (--workers N) are started through this module
too (server.WORKER_ENTRY), so every worker has the routes.
"""

from __future__ import annotations

import sys

from sidecar.cli.main import main
from sidecar.dataplane.authorize import Authorizer
from sidecar.dataplane.http_messages import Answer, Call
from sidecar.runtime import server
from sidecar.schema.contracts import AuthorizeReply
from sidecar.schema.keys import KeyHasher


class FixedRecordRunner:
    """The script's allow reply for a fixed record, without Redis."""

    REPLY = list(AuthorizeReply(code=0, key_id=b"key_baseline", type=b"s", org=b"",
                                project=b"", rpm=600, rpm_remaining=599, rpm_reset_ms=100))

    async def run(self, script, keys, args) -> list:
        return self.REPLY

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


async def _ok(_: Call) -> Answer:
    return Answer(200, {}, b"ok", "text/plain")


_production = server.data_plane


def data_plane(settings, runner):
    edge, authorize = _production(settings, runner)
    baseline = Authorizer(settings, KeyHasher(settings.key_pepper), FixedRecordRunner())
    production = edge.router

    def router(path: str):
        found = production(path)
        if found is not None:
            return found
        if path == "/bench/bare":
            return _ok, True
        if path.startswith("/bench/baseline"):
            return baseline, True
        return None

    edge.router = router
    return edge, authorize


server.data_plane = data_plane
server.WORKER_ENTRY = "benchmarks.serve"

if __name__ == "__main__":
    sys.exit(main())
