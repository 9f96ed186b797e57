"""What an admin endpoint is (Route) and what its handler gets (AdminCall): the route
modules, the API and the OpenAPI document share them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..control import policy
from ..control.input_limits import DEFAULT_PAGE
from ..control.policy import Actor
from ..control.store import ControlStore
from . import schemas

PREFIX = "/admin/v1"


@dataclass
class AdminCall:
    store: ControlStore
    actor: Actor
    params: dict[str, str]
    query: dict[str, Any]
    body: dict[str, Any]
    headers: Any

    @property
    def org(self) -> str:
        return self.actor.org or ""


Handler = Callable[[AdminCall], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str                       # below PREFIX, e.g. "/keys/{key_id}"
    action: str                     # policy action, e.g. "key.rotate" (policy.ACTIONS)
    summary: str
    handler: Handler
    response: str                   # component schema of the success body
    status: int = 200
    also: int | None = None         # a second success status (a replayed rotation: 200)
    body: dict | None = None        # request body schema (None: no body)
    query: dict = field(default_factory=lambda: schemas.obj({}))
    list_of: bool = False           # the response is a page of `response`
    tag: str = ""

    @property
    def scope(self) -> str:
        """The admin scope the action needs, e.g. "keys:write"."""
        return policy.ACTIONS[self.action]

    @property
    def operation_id(self) -> str:
        words = [p.strip("{}") for p in self.path.split("/") if p]
        return "_".join([self.method.lower(), *words])


def page(items: list, query: dict) -> dict:
    """Offset pagination over a full list: {"object": "list", "data", "next_cursor"}."""
    start = int(query.get("cursor") or 0)
    limit = query.get("limit") or DEFAULT_PAGE
    end = start + limit
    return {"object": "list", "data": items[start:end],
            "next_cursor": str(end) if end < len(items) else None}
