"""The data plane's routes on the edge: /authz/..., /healthz, /settle (once a token is set)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtime import fdlimit
from ..runtime.config import Settings
from .edge import EdgeServer
from .http_messages import Answer, Call

if TYPE_CHECKING:
    from .authorize import Authorizer


def data_plane(settings: Settings, runner) -> tuple[EdgeServer, Authorizer]:
    """The data-plane routes on the bare HTTP/1.1 edge (edge.py), and the authorizer
    behind them (which the gRPC mode shares)."""
    from ..schema.keys import KeyHasher
    from .authorize import Authorizer

    hasher = KeyHasher(settings.key_pepper)
    authorize = Authorizer(settings, hasher, runner)
    settle = None
    if settings.settlement_token:  # POST /settle exists only once a token is configured
        from .settle import Settler
        settle = Settler(settings, hasher, runner)

    async def ok(_: Call) -> Answer:
        return Answer(200, {}, b"ok", "text/plain")

    # (handler, eager): eager handlers run without a task of their own (see edge.py).
    routes = {"/healthz": (ok, True)}
    if settle is not None:
        routes["/settle"] = (settle, False)

    def route(path: str):
        if path.startswith("/authz") and (len(path) == 6 or path[6] == "/"):
            return authorize, True
        return routes.get(path)

    # The process's own descriptors, its Redis pool and the admin listener keep a reserve.
    cap = fdlimit.connection_cap(settings.max_connections, fdlimit.raise_open_file_limit(),
                                 fdlimit.RESERVE + settings.redis_pool_size)
    return EdgeServer(route, max_body=settings.max_body_bytes,
                      keepalive_timeout=settings.keepalive_timeout_s,
                      request_timeout=settings.request_timeout_s,
                      request_deadline=settings.request_deadline_s,
                      max_headers=settings.max_headers,
                      max_header_bytes=settings.max_header_bytes,
                      max_connections=cap), authorize
