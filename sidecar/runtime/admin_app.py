"""The admin listener: /metrics, /healthz, /readyz and the admin API under /admin/v1/."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..admin import setup_admin_api
from ..redis.runner import ScriptRunner
from . import metrics
from .config import Settings


async def admin_app(settings: Settings, runner: ScriptRunner) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app["settings"] = settings
    app["runner"] = runner

    async def metrics_handler(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        up = await runner.ping()
        metrics.redis_up(up)
        if up:
            return web.json_response({"status": "ready", "redis": "up"})
        return web.json_response({"status": "not ready", "redis": "unreachable"}, status=503)

    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    setup_admin_api(app, settings)
    return app
