"""Admin API: the caller's organization, its members, projects and service accounts.

An admin key belongs to one organization: every route works inside it, and an id from
another organization is simply not found.
"""

from __future__ import annotations

from . import schemas as s
from .routing import AdminCall, Route, page


async def get_org(c: AdminCall):
    return 200, await c.store.org(c.org)


async def update_org(c: AdminCall):
    return 200, await c.store.update_org(c.org, c.body["name"], c.actor)


async def list_members(c: AdminCall):
    return 200, page(await c.store.list_members(c.org, c.query.get("role")), c.query)


async def add_member(c: AdminCall):
    b = c.body
    return 201, await c.store.add_member(c.org, b["user"], b.get("role", "member"),
                                         b.get("name", ""), c.actor)


async def get_member(c: AdminCall):
    return 200, await c.store.member(c.org, c.params["member_id"])


async def update_member(c: AdminCall):
    return 200, await c.store.update_member(c.org, c.params["member_id"], c.body, c.actor)


async def remove_member(c: AdminCall):
    return 200, await c.store.remove_member(c.org, c.params["member_id"], c.actor)


async def list_projects(c: AdminCall):
    return 200, page(await c.store.list_projects(c.org), c.query)


async def create_project(c: AdminCall):
    return 201, await c.store.create_project(c.org, c.body["name"], c.actor)


async def get_project(c: AdminCall):
    return 200, await c.store.project(c.org, c.params["project_id"])


async def update_project(c: AdminCall):
    return 200, await c.store.update_project(c.org, c.params["project_id"], c.body["name"],
                                             c.actor)


async def delete_project(c: AdminCall):
    return 200, await c.store.delete_project(c.org, c.params["project_id"], c.actor)


async def list_service_accounts(c: AdminCall):
    found = await c.store.list_service_accounts(c.org, c.query.get("project_id"))
    return 200, page(found, c.query)


async def create_service_account(c: AdminCall):
    return 201, await c.store.create_service_account(c.org, c.body["project_id"],
                                                     c.body["name"], c.actor)


async def get_service_account(c: AdminCall):
    return 200, await c.store.service_account(c.org, c.params["service_account_id"])


async def update_service_account(c: AdminCall):
    return 200, await c.store.update_service_account(
        c.org, c.params["service_account_id"], c.body["name"], c.actor)


async def delete_service_account(c: AdminCall):
    return 200, await c.store.delete_service_account(c.org, c.params["service_account_id"],
                                                     c.actor)


M, P, SA = "/members/{member_id}", "/projects/{project_id}", \
    "/service_accounts/{service_account_id}"
ROUTES = [
    Route("GET", "/organization", "organization.read", "The caller's organization", get_org,
          "Organization", tag="organization"),
    Route("PATCH", "/organization", "organization.update", "Rename the organization", update_org,
          "Organization", body=s.ORG_UPDATE, tag="organization"),

    Route("GET", "/members", "member.read", "List members", list_members, "Member",
          query=s.MEMBER_QUERY, list_of=True, tag="members"),
    Route("POST", "/members", "member.add", "Add a member with a role", add_member,
          "Member", status=201, body=s.MEMBER_CREATE, tag="members"),
    Route("GET", M, "member.read", "Get a member", get_member, "Member", tag="members"),
    Route("PATCH", M, "member.update", "Change a member's name or role", update_member,
          "Member", body=s.MEMBER_UPDATE, tag="members"),
    Route("DELETE", M, "member.remove", "Remove a member: disables their user keys and the "
          "admin keys tied to the membership", remove_member, "Deleted", tag="members"),

    Route("GET", "/projects", "project.read", "List projects", list_projects, "Project",
          query=s.PAGE_QUERY, list_of=True, tag="projects"),
    Route("POST", "/projects", "project.create", "Create a project", create_project,
          "Project", status=201, body=s.PROJECT_CREATE, tag="projects"),
    Route("GET", P, "project.read", "Get a project", get_project, "Project",
          tag="projects"),
    Route("PATCH", P, "project.update", "Rename a project", update_project, "Project",
          body=s.NAME_UPDATE, tag="projects"),
    Route("DELETE", P, "project.delete", "Delete a project: disables every key scoped to it "
          "and deletes its service accounts", delete_project, "Deleted", tag="projects"),

    Route("GET", "/service_accounts", "service_account.read", "List service accounts",
          list_service_accounts, "ServiceAccount", query=s.SA_QUERY, list_of=True,
          tag="service_accounts"),
    Route("POST", "/service_accounts", "service_account.create",
          "Create a service account in a project", create_service_account, "ServiceAccount",
          status=201, body=s.SA_CREATE, tag="service_accounts"),
    Route("GET", SA, "service_account.read", "Get a service account", get_service_account,
          "ServiceAccount", tag="service_accounts"),
    Route("PATCH", SA, "service_account.update", "Rename a service account",
          update_service_account, "ServiceAccount", body=s.NAME_UPDATE,
          tag="service_accounts"),
    Route("DELETE", SA, "service_account.delete", "Delete a service account: disables its "
          "keys", delete_service_account, "Deleted", tag="service_accounts"),
]
