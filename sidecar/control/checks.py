"""Pure checks shared by the control-plane operations; each error names its field."""

from __future__ import annotations

from datetime import UTC, datetime

from ..schema.record import RESTRICTED
from .errors import Conflicting, Invalid
from .input_limits import MAX_NAME
from .policy import ROLES


def check_scopes_mode(permission: str, scopes: list[str]) -> None:
    if scopes and permission != RESTRICTED:
        raise Conflicting("scopes: only a restricted key has scopes (permission is "
                          f"{permission!r})", "scopes")


def refuse(req: dict, fields: tuple[str, ...], why: str) -> None:
    for field in fields:
        if req.get(field) not in (None, False, [], ""):
            raise Conflicting(f"{field}: {why}", field)


def check_text(value, param: str, required: bool = False, limit: int = MAX_NAME) -> None:
    if not isinstance(value, str):
        raise Invalid(f"{param}: must be a string", param)
    if required and not value.strip():
        raise Invalid(f"{param}: must not be empty", param)
    if len(value) > limit:
        raise Invalid(f"{param}: at most {limit} characters", param)
    if any(ord(c) < 32 for c in value):
        raise Invalid(f"{param}: control characters are not allowed", param)


def check_role(role: str) -> None:
    if role not in ROLES:
        raise Invalid(f"role: one of {', '.join(ROLES)}", "role")


def parse_when(text: str, param: str = "expires_at") -> datetime:
    """An ISO-8601 date-time (Z allowed); naive means UTC."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise Invalid(f"{param}: {text!r} is not an ISO-8601 date-time", param) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
