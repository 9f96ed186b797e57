"""HTTP plumbing of the admin API: the error shape, JSON bodies, and the middleware that
turns every failure under /admin/ into a JSON error (never a traceback or an HTML page).

Error body: {"error": {"message", "type", "code", "param"}}, the OpenAI shape plus the
field the error is about.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from ..control.errors import ControlError

MAX_BODY = 64 * 1024            # admin requests are small; the app's own cap is 1 MiB
log = logging.getLogger("sidecar.admin")

_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error",
         409: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 503: "api_error", 500: "api_error"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def error_response(status: int, code: str, message: str,
                   param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": _TYPE.get(status, "invalid_request_error"),
                      "code": code, "param": param}}
    headers = {"WWW-Authenticate": 'Bearer realm="admin"'} if status == 401 else None
    return web.Response(status=status, body=orjson.dumps(body),
                        content_type="application/json", headers=headers)


def json_response(payload, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload),
                        content_type="application/json")


async def read_json(request: web.Request) -> dict:
    """The request's JSON object; {} for an empty body."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "body_too_large", f"body: larger than {MAX_BODY} bytes", "body")
    raw = await request.read()          # bounded by the app's client_max_size too
    if len(raw) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"body: larger than {MAX_BODY} bytes", "body")
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "body: not valid JSON", "body") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_type", "body: must be a JSON object", "body")
    return value


@web.middleware
async def json_errors(request: web.Request, handler):
    if not request.path.startswith("/admin/"):
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.param)
    except ControlError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.param)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed",
                413: "body_too_large"}.get(exc.status, "invalid_request")
        reply = error_response(exc.status, code, exc.reason or "request refused")
        if "Allow" in exc.headers:      # a 405 names the methods the path has
            reply.headers["Allow"] = exc.headers["Allow"]
        return reply
    except (RedisError, OSError) as exc:
        log.warning("admin api: redis unavailable: %s", type(exc).__name__)
        return error_response(503, "service_unavailable", "Redis did not answer; retry")
    except Exception:
        log.exception("admin api: unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error")
