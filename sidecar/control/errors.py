"""Control-plane failures. Each names the request field it is about (`param`), so the API
can answer a 4xx JSON error naming it and the CLI one line."""

from __future__ import annotations

from .key_spec import InvalidKeySpec, KeyConflict, KeyError_


class ControlError(Exception):
    status = 400
    code = "invalid_value"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class Invalid(ControlError):
    status, code = 400, "invalid_value"


class Conflicting(ControlError):
    """Two options that cannot go together."""
    status, code = 400, "conflicting_options"


class NotFound(ControlError):
    status, code = 404, "not_found"


class Conflict(ControlError):
    status, code = 409, "conflict"


class Forbidden(ControlError):
    status, code = 403, "permission_denied"


class Unauthenticated(ControlError):
    """The caller's key does not stand for anyone who may act; `code` says why."""
    status = 401

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# KeySpec field names as the API calls them.
_API_FIELD = {"ips": "allowed_ips", "expires": "expires_at", "cycle_days": "cycle_days",
              "quota": "quota", "status": "status"}


def from_key_error(exc: Exception) -> ControlError:
    """KeyStore's exceptions as control errors, naming the field as the API calls it."""
    if isinstance(exc, KeyError_):
        return NotFound(str(exc).strip('"'), "key_id")
    param = _API_FIELD.get(exc.field, exc.field) if isinstance(exc, InvalidKeySpec) else None
    if isinstance(exc, KeyConflict):
        return Conflict(str(exc), param)
    if isinstance(exc, InvalidKeySpec):
        return Invalid(str(exc), param)
    raise exc
