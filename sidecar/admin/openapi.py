"""The OpenAPI 3.1 document of the admin API, built from the route table and the very
schemas requests are validated against."""

from __future__ import annotations

import re

from ..control.input_limits import DEFAULT_PAGE
from .routing import PREFIX, Route
from .schemas import ID, REQUIRED_TEXT, RESPONSES

_ERRORS = {"400": "invalid request: unknown field, wrong type, bad value, conflicting "
                  "options (the error names the field)",
           "401": "missing, malformed, unknown, disabled or expired admin key",
           "403": "permission_denied: the admin key's permission mode, or its member's "
                  "role or rank, does not allow it (the message names the rule, `param` "
                  "the field: scope, role, member_id, key_id, ...)",
           "404": "unknown id, or one of another organization: the same answer, with "
                  "nothing of theirs in it",
           "409": "conflicts with the current state",
           "413": "body larger than 64 KiB",
           "503": "Redis did not answer"}
_TAGS = {"organization": "The organization the admin key belongs to",
         "limits": "Budgets in money and concurrency limits, at every level",
         "usage": "Alert thresholds and usage history of keys, projects and the "
                  "organization",
         "members": "People of the organization and their roles",
         "projects": "Projects: the owners of keys and service accounts",
         "service_accounts": "Non-person identities of a project",
         "keys": "API keys: create, edit, quota, rotation, revocation",
         "subscriptions": "Plans with a per-cycle quota",
         "audit": "Who changed what, newest first",
         "webhooks": "Endpoints that receive the organization's events, signed "
                     "(Standard Webhooks)"}
_QUERY = {"limit": f"Page size (default {DEFAULT_PAGE})",
          "cursor": "The `next_cursor` of the previous page",
          "since": "Only entries at or after this time (RFC 3339)",
          "until": "Only entries at or before this time (RFC 3339)"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(route: Route) -> dict:
    params = [{"name": name, "in": "path", "required": True, "schema": ID,
               "description": f"The {name.removesuffix('_id').replace('_', ' ')}'s id (one "
                              "of another organization is a 404)"}
              for name in re.findall(r"{(\w+)}", route.path)]
    for name, schema in route.query.get("properties", {}).items():
        params.append({"name": name, "in": "query", "required": False, "schema": schema,
                       "description": _QUERY.get(name, f"Only those whose `{name}` is this")})
    result = _ref(route.response)
    if route.list_of:
        result = {"type": "object", "required": ["object", "data", "next_cursor"],
                  "properties": {"object": {"const": "list"},
                                 "data": {"type": "array", "items": result},
                                 "next_cursor": {"type": ["string", "null"]}}}
    responses = {str(route.status): _json(result, "success")}
    if route.also:
        responses[str(route.also)] = _json(result, "success (a replay)")
    for status, text in _ERRORS.items():
        if status == "413" and route.body is None:
            continue
        responses[status] = _json(_ref("Error"), text)
    op = {"operationId": route.operation_id, "summary": route.summary,
          "tags": [route.tag] if route.tag else [],
          "description": f"Needs the admin scope `{route.scope}` (or permission mode all"
                         + (", or read-only" if route.scope.endswith(":read") else "")
                         + f"), then the role and rank rules of policy action "
                           f"`{route.action}` (README: who may do what).",
          "parameters": params, "responses": responses}
    if route.path.endswith("/rotate"):
        op["parameters"].append({"name": "Idempotency-Key", "in": "header", "required": False,
                                 "schema": REQUIRED_TEXT,
                                 "description": "A retry with the same value replays the "
                                                "first rotation's answer"})
    if route.body is not None:
        needed = bool(route.body.get("required") or route.body.get("minProperties"))
        op["requestBody"] = {"required": needed,
                             "content": {"application/json": {"schema": route.body}}}
    return op


def document(routes: list[Route]) -> dict:
    paths: dict[str, dict] = {}
    tags = dict.fromkeys(route.tag for route in routes if route.tag)
    for route in routes:
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-key-sidecar admin API", "version": "1",
                 "description": "Organizations, members, projects, service accounts, keys, "
                                "subscriptions, webhook endpoints and the audit log. "
                                "Authenticate with an organization admin key: "
                                "`Authorization: Bearer sk-admin_...`."
                                " Errors: {\"error\": {\"message\", \"type\", \"code\", "
                                "\"param\"}}.",
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "servers": [{"url": "/"}],
        "security": [{"adminKey": []}],
        # a tag missing from _TAGS goes undescribed: the redocly lint test names it
        "tags": [{"name": tag, **({"description": _TAGS[tag]} if tag in _TAGS else {})}
                 for tag in tags],
        "paths": paths,
        "components": {
            "schemas": RESPONSES,
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer",
                                             "description": "an sk-admin_ key"}},
        },
    }
