"""Who is calling: the admin key from `Authorization: Bearer`; the control plane decides
whether it may act (control/admin_keys.py)."""

from __future__ import annotations

from ..control.policy import Actor
from ..control.store import ControlStore
from .http import ApiError


async def authenticate(authorization: str | None, store: ControlStore) -> Actor:
    if not authorization:
        raise ApiError(401, "missing_api_key",
                       "send an admin key as 'Authorization: Bearer sk-admin_...'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "invalid_api_key", "expected 'Authorization: Bearer sk-admin_...'")
    return await store.authenticate(token)
