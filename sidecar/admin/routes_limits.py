"""Admin API: budgets in money and concurrency limits of a key, a project, a member and
the organization (control/limit_rules.py): what is set, spent, reserved and left."""

from __future__ import annotations

from . import schemas as s
from .routing import AdminCall, Route


async def key_limits(c: AdminCall):
    return 200, await c.store.key_limits(c.org, c.params["key_id"])


async def set_key_limits(c: AdminCall):
    return 200, await c.store.set_key_limits(c.org, c.params["key_id"], c.body, c.actor)


async def project_limits(c: AdminCall):
    return 200, await c.store.project_limits(c.org, c.params["project_id"])


async def set_project_limits(c: AdminCall):
    return 200, await c.store.set_project_limits(c.org, c.params["project_id"], c.body,
                                                 c.actor)


async def member_limits(c: AdminCall):
    return 200, await c.store.member_limits(c.org, c.params["member_id"])


async def set_member_limits(c: AdminCall):
    return 200, await c.store.set_member_limits(c.org, c.params["member_id"], c.body,
                                                c.actor)


async def org_limits(c: AdminCall):
    return 200, await c.store.org_limits(c.org)


async def set_org_limits(c: AdminCall):
    return 200, await c.store.set_org_limits(c.org, c.body, c.actor)


_SET = ("Set the budget (a decimal amount in the deployment's currency, null or \"0\" "
        "removes it), its period, the concurrency limit and what is only observed")
ROUTES = [
    Route("GET", "/keys/{key_id}/limits", "key.read", "A key's budget and concurrency: "
          "set, spent, reserved, left", key_limits, "Limits", tag="limits"),
    Route("PUT", "/keys/{key_id}/limits", "key.limits", _SET + " of a key",
          set_key_limits, "Limits", body=s.LIMITS, tag="limits"),
    Route("GET", "/projects/{project_id}/limits", "project.read",
          "A project's budget and concurrency", project_limits, "Limits", tag="limits"),
    Route("PUT", "/projects/{project_id}/limits", "project.limits", _SET + " of a project",
          set_project_limits, "Limits", body=s.LIMITS, tag="limits"),
    Route("GET", "/members/{member_id}/limits", "member.read",
          "A member's budget and concurrency (their user keys)", member_limits, "Limits",
          tag="limits"),
    Route("PUT", "/members/{member_id}/limits", "member.limits", _SET + " of a member",
          set_member_limits, "Limits", body=s.LIMITS, tag="limits"),
    Route("GET", "/organization/limits", "organization.read",
          "The organization's budget and concurrency", org_limits, "Limits", tag="limits"),
    Route("PUT", "/organization/limits", "organization.limits",
          _SET + " of the organization", set_org_limits, "Limits", body=s.LIMITS,
          tag="limits"),
]
