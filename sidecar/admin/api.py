"""The admin API's frame: the route table, one wrapper for every endpoint, the setup.

Each endpoint is a `Route`: method, path, the admin scope it needs, its request schemas
and a handler `(AdminCall) -> (status, payload)`. The wrapper runs the same steps for all:

    authenticate the admin key -> the permission mode allows the route's action
    (policy.gate) -> check path ids, query and body against the schemas -> handler -> JSON

The handler's control-plane call then asks the same policy (policy.decide) with the
facts of the resource: tenancy, ranks, roles, cascades. Every check runs before the first
write, so a refused request leaves nothing behind. The OpenAPI document is built from the
same table.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from aiohttp import web

from ..control import policy
from ..control.errors import NotFound
from ..control.store import ControlStore
from ..schema.keys import KeyHasher
from . import schemas
from .auth import authenticate
from .http import ApiError, json_errors, json_response, read_json
from .routing import PREFIX, AdminCall, Route
from .validation import validate

_ID = re.compile(schemas.ID_PATTERN.strip("^$"))


def routes() -> list[Route]:
    from . import (
        routes_audit,
        routes_keys,
        routes_limits,
        routes_org,
        routes_subscriptions,
        routes_usage,
        routes_webhooks,
    )
    return [*routes_org.ROUTES, *routes_keys.ROUTES, *routes_limits.ROUTES,
            *routes_subscriptions.ROUTES, *routes_audit.ROUTES, *routes_webhooks.ROUTES,
            *routes_usage.ROUTES]


def endpoint(route: Route, app: web.Application) -> Callable:
    async def handle(request: web.Request) -> web.Response:
        store: ControlStore = app["control_store"]
        actor = await authenticate(request.headers.get("Authorization"), store)
        allowed = policy.gate(actor, route.action)
        if not allowed:
            raise allowed.error()
        params = {}
        for name, value in request.match_info.items():
            if not _ID.fullmatch(value):       # no such id can exist
                raise NotFound(f"no {name.removesuffix('_id')} with id {value[:64]!r}", name)
            params[name] = value
        query = {}
        for name in request.query:
            values = request.query.getall(name)
            if len(values) > 1:
                raise ApiError(400, "invalid_value", f"{name}: given more than once", name)
            query[name] = values[0]
        query = validate(route.query, query, "query", strings=True)
        body = validate(route.body, await read_json(request)) if route.body else {}
        call = AdminCall(store, actor, params, query, body, request.headers)
        status, payload = await route.handler(call)
        return json_response(payload, status)

    return handle


def setup_admin_api(app: web.Application, settings) -> None:
    """Mount /admin/v1 on the admin listener, with its own redis-py control client."""
    from ..redis.runner import control_client
    from .openapi import document

    table = routes()
    spec = document(table)
    app.middlewares.append(json_errors)

    async def start(app: web.Application) -> None:
        client = control_client(settings.redis_url, settings.redis_timeout_ms / 1000 * 8,
                                settings.redis_pool_size)
        app["control_hasher"] = KeyHasher(settings.key_pepper)
        app["control_store"] = ControlStore(client, app["control_hasher"],
                                            settings.budget_timezone)
        app["control_store"].configure(settings)

    async def stop(app: web.Application) -> None:
        store = app.get("control_store")
        if store is not None:
            await store.redis.aclose()

    async def openapi(_: web.Request) -> web.Response:
        return json_response(spec)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get(PREFIX + "/openapi.json", openapi)
    for route in table:
        app.router.add_route(route.method, PREFIX + route.path, endpoint(route, app))
