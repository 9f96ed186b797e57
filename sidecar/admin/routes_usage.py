"""Admin API: alert thresholds of a key, a project and the organization, and their usage
history (control/limit_rules.py, control/usage.py; docs/usage.md)."""

from __future__ import annotations

from . import schemas as s
from .routing import AdminCall, Route


async def key_thresholds(c: AdminCall):
    return 200, await c.store.thresholds_of_key(c.org, c.params["key_id"])


async def set_key_thresholds(c: AdminCall):
    return 200, await c.store.set_key_thresholds(c.org, c.params["key_id"], c.body,
                                                        c.actor)


async def project_thresholds(c: AdminCall):
    return 200, await c.store.thresholds_of(c.org, "project", c.params["project_id"])


async def set_project_thresholds(c: AdminCall):
    return 200, await c.store.set_thresholds(c.org, "project", c.params["project_id"],
                                                    c.body, c.actor)


async def org_thresholds(c: AdminCall):
    return 200, await c.store.thresholds_of(c.org, "organization", c.org)


async def set_org_thresholds(c: AdminCall):
    return 200, await c.store.set_thresholds(c.org, "organization", c.org, c.body,
                                                    c.actor)


async def key_usage(c: AdminCall):
    return 200, await c.store.usage_of_key(c.org, c.params["key_id"],
                                                  c.query.get("since"))


async def project_usage(c: AdminCall):
    return 200, await c.store.usage_of(c.org, "project", c.params["project_id"],
                                              c.query.get("since"))


async def org_usage(c: AdminCall):
    return 200, await c.store.usage_of(c.org, "organization", c.org,
                                              c.query.get("since"))


_SET = ("Set the alert thresholds: fractions of the quota or budget left that raise "
        "quota.* / budget.* events ([] none, null the deployment's default)")
_USAGE = ("requests, tokens and spend per day (usage_retention_days) and per hour "
          "(the last 48 h)")
ROUTES = [
    Route("GET", "/keys/{key_id}/thresholds", "key.read", "A key's alert thresholds",
          key_thresholds, "Thresholds", tag="usage"),
    Route("PUT", "/keys/{key_id}/thresholds", "key.limits", _SET + " of a key",
          set_key_thresholds, "Thresholds", body=s.THRESHOLDS, tag="usage"),
    Route("GET", "/projects/{project_id}/thresholds", "project.read",
          "A project's alert thresholds", project_thresholds, "Thresholds", tag="usage"),
    Route("PUT", "/projects/{project_id}/thresholds", "project.limits",
          _SET + " of a project", set_project_thresholds, "Thresholds", body=s.THRESHOLDS,
          tag="usage"),
    Route("GET", "/organization/thresholds", "organization.read",
          "The organization's alert thresholds", org_thresholds, "Thresholds", tag="usage"),
    Route("PUT", "/organization/thresholds", "organization.limits",
          _SET + " of the organization", set_org_thresholds, "Thresholds",
          body=s.THRESHOLDS, tag="usage"),
    Route("GET", "/keys/{key_id}/usage", "key.read", "A key's " + _USAGE, key_usage,
          "Usage", query=s.USAGE_QUERY, tag="usage"),
    Route("GET", "/projects/{project_id}/usage", "project.read",
          "A project's " + _USAGE + ", over its keys", project_usage, "Usage",
          query=s.USAGE_QUERY, tag="usage"),
    Route("GET", "/organization/usage", "organization.read",
          "The organization's " + _USAGE + ", over its keys", org_usage, "Usage",
          query=s.USAGE_QUERY, tag="usage"),
]
