"""The permission matrix: each admin permission mode x each admin endpoint -> allow/deny.

Modes: all; read-only (GET only); restricted with one scope each (a write scope also
grants reading the same resource). An allowed call is sent with an id that does not
exist or a body that fails validation, so it proves it passed the permission gate
(404 / 400, or 200 for reads) without changing anything; a denied call is 403.
Then the member-role rules: key management, admin-key creation, no escalation.
"""

from __future__ import annotations

import time

import pytest
from admin_helpers import cli_json, request, start_plane, stop_plane

SCOPES = ["orgs:read", "orgs:write", "members:read", "members:write", "projects:read",
          "projects:write", "service_accounts:read", "service_accounts:write", "keys:read",
          "keys:write", "subscriptions:read", "subscriptions:write", "audit:read"]
MODES = ["all", "read-only", *(f"restricted:{s}" for s in SCOPES)]

# (method, path, scope needed, body, status when allowed). Ids are real, except where
# the id is `none` (an unknown id): the allowed call then answers 404 and changes nothing.
ENDPOINTS = [
    ("GET", "/organization", "orgs:read", None, 200),
    ("PATCH", "/organization", "orgs:write", {"name": ""}, 400),
    ("GET", "/members", "members:read", None, 200),
    ("POST", "/members", "members:write", {}, 400),
    ("GET", "/members/{member_id}", "members:read", None, 200),
    ("PATCH", "/members/{member_id}", "members:write", {}, 400),
    ("DELETE", "/members/{member_id}", "members:write", "none", 404),
    ("GET", "/projects", "projects:read", None, 200),
    ("POST", "/projects", "projects:write", {}, 400),
    ("GET", "/projects/{project_id}", "projects:read", None, 200),
    ("PATCH", "/projects/{project_id}", "projects:write", {}, 400),
    ("DELETE", "/projects/{project_id}", "projects:write", "none", 404),
    ("GET", "/service_accounts", "service_accounts:read", None, 200),
    ("POST", "/service_accounts", "service_accounts:write", {}, 400),
    ("GET", "/service_accounts/{service_account_id}", "service_accounts:read", None, 200),
    ("PATCH", "/service_accounts/{service_account_id}", "service_accounts:write", {}, 400),
    ("DELETE", "/service_accounts/{service_account_id}", "service_accounts:write", "none",
     404),
    ("GET", "/keys", "keys:read", None, 200),
    ("POST", "/keys", "keys:write", {"colour": 1}, 400),
    ("GET", "/keys/{key_id}", "keys:read", None, 200),
    ("PATCH", "/keys/{key_id}", "keys:write", {}, 400),
    ("DELETE", "/keys/{key_id}", "keys:write", "none", 404),
    ("POST", "/keys/{key_id}/disable", "keys:write", "none", 404),
    ("POST", "/keys/{key_id}/enable", "keys:write", "none", 404),
    ("POST", "/keys/{key_id}/quota", "keys:write", {}, 400),
    ("GET", "/keys/{key_id}/activity", "keys:read", None, 200),
    ("POST", "/keys/{key_id}/rotate", "keys:write", "none", 404),
    ("GET", "/keys/{key_id}/limits", "keys:read", None, 200),
    ("PUT", "/keys/{key_id}/limits", "keys:write", {}, 400),
    ("GET", "/projects/{project_id}/limits", "projects:read", None, 200),
    ("PUT", "/projects/{project_id}/limits", "projects:write", {}, 400),
    ("GET", "/members/{member_id}/limits", "members:read", None, 200),
    ("PUT", "/members/{member_id}/limits", "members:write", {}, 400),
    ("GET", "/organization/limits", "orgs:read", None, 200),
    ("PUT", "/organization/limits", "orgs:write", {}, 400),
    ("GET", "/keys/{key_id}/thresholds", "keys:read", None, 200),
    ("PUT", "/keys/{key_id}/thresholds", "keys:write", {}, 400),
    ("GET", "/projects/{project_id}/thresholds", "projects:read", None, 200),
    ("PUT", "/projects/{project_id}/thresholds", "projects:write", {}, 400),
    ("GET", "/organization/thresholds", "orgs:read", None, 200),
    ("PUT", "/organization/thresholds", "orgs:write", {}, 400),
    ("GET", "/keys/{key_id}/usage", "keys:read", None, 200),
    ("GET", "/projects/{project_id}/usage", "projects:read", None, 200),
    ("GET", "/organization/usage", "orgs:read", None, 200),
    ("GET", "/subscriptions", "subscriptions:read", None, 200),
    ("POST", "/subscriptions", "subscriptions:write", {}, 400),
    ("GET", "/subscriptions/{subscription_id}", "subscriptions:read", None, 200),
    ("PATCH", "/subscriptions/{subscription_id}", "subscriptions:write", {}, 400),
    ("DELETE", "/subscriptions/{subscription_id}", "subscriptions:write", "none", 404),
    ("GET", "/audit_logs", "audit:read", None, 200),
    ("GET", "/webhooks", "orgs:read", None, 200),
    ("POST", "/webhooks", "orgs:write", {}, 400),
    ("GET", "/webhooks/{webhook_id}", "orgs:read", None, 200),
    ("DELETE", "/webhooks/{webhook_id}", "orgs:write", "none", 404),
]
UNKNOWN = {"member_id": "mem_none", "project_id": "prj_none", "service_account_id": "sa_none",
           "key_id": "key_none", "subscription_id": "sub_none", "webhook_id": "wh_none"}


def allowed(mode: str, scope: str) -> bool:
    if mode == "all":
        return True
    if mode == "read-only":
        return scope.endswith(":read")
    held = mode.removeprefix("restricted:")
    return scope == held or (scope.endswith(":read") and
                             held == scope.removesuffix(":read") + ":write")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    plane = start_plane(tmp_path_factory.mktemp("perms"))
    try:
        prj = plane.ok("POST", "/projects", {"name": "p"})
        ids = {
            "member_id": plane.ok("POST", "/members", {"user": "m@example.com"})["id"],
            "project_id": prj["id"],
            "service_account_id": plane.ok("POST", "/service_accounts", {
                "project_id": prj["id"], "name": "s"})["id"],
            "key_id": plane.ok("POST", "/keys", {"project_id": prj["id"]})["id"],
            "subscription_id": plane.ok("POST", "/subscriptions", {
                "account": "a", "plan": "p", "cycle_quota": 1})["id"],
            "webhook_id": plane.ok("POST", "/webhooks", {
                "url": "https://hooks.example.com/perms"})["id"],
        }
        keys = {}
        for mode in MODES:
            body = {"type": "admin", "name": mode}
            if mode.startswith("restricted:"):
                body.update(permission="restricted", scopes=[mode.split(":", 1)[1]])
            else:
                body["permission"] = mode
            keys[mode] = plane.ok("POST", "/keys", body)["key"]
        yield plane, ids, keys
    finally:
        stop_plane(plane)


def test_matrix_covers_every_documented_operation(world):
    plane, _, _ = world
    doc = request(plane.car.admin_port, "GET", "/admin/v1/openapi.json").body
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert {(m, "/admin/v1" + p) for m, p, *_ in ENDPOINTS} == documented


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method,path,scope,body,ok_status", ENDPOINTS,
                         ids=[f"{m} {p}" for m, p, *_ in ENDPOINTS])
def test_permission_matrix(world, mode, method, path, scope, body, ok_status):
    plane, ids, keys = world
    target = path.format(**(UNKNOWN if body == "none" else ids))
    reply = plane.admin(method, target, None if body == "none" else body, key=keys[mode])
    if allowed(mode, scope):
        assert reply.status == ok_status, reply.body
    else:
        assert (reply.status, reply.code) == (403, "permission_denied"), reply.body


def test_admin_key_states(world):
    plane, _, _ = world
    made = plane.ok("POST", "/keys", {"type": "admin", "permission": "read-only"})
    assert plane.admin("GET", "/keys", key=made["key"]).status == 200
    plane.ok("POST", f"/keys/{made['id']}/disable", status=200)
    assert plane.admin("GET", "/keys", key=made["key"]).code == "key_disabled"
    plane.ok("DELETE", f"/keys/{made['id']}")
    assert plane.admin("GET", "/keys", key=made["key"]).code == "invalid_api_key"

    soon = time.time() + 1.5
    brief = plane.ok("POST", "/keys", {
        "type": "admin", "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                     time.gmtime(soon + 1))})
    assert plane.admin("GET", "/keys", key=brief["key"]).status == 200
    time.sleep(max(0.0, soon + 1.1 - time.time()) + 1.0)
    assert plane.admin("GET", "/keys", key=brief["key"]).code == "key_expired"


def test_no_escalation_through_admin_keys(world):
    plane, _, _ = world
    writer = plane.ok("POST", "/keys", {"type": "admin", "permission": "restricted",
                                        "scopes": ["keys:write"]})
    wider = plane.admin("POST", "/keys", {"type": "admin", "permission": "all"},
                        key=writer["key"])
    assert (wider.status, wider.param) == (403, "permission")
    other = plane.admin("POST", "/keys", {"type": "admin", "permission": "restricted",
                                          "scopes": ["projects:write"]}, key=writer["key"])
    assert other.status == 403
    narrower = plane.admin("POST", "/keys", {"type": "admin", "permission": "restricted",
                                             "scopes": ["keys:read"]}, key=writer["key"])
    assert narrower.status == 201
    widen = plane.admin("PATCH", f"/keys/{narrower.body['id']}", {"permission": "all"},
                        key=writer["key"])
    assert (widen.status, widen.param) == (403, "permission")


def test_member_role_limits_what_its_admin_key_may_do(world):
    plane, ids, _ = world
    dev = plane.ok("POST", "/members", {"user": "dev@example.com", "role": "member"})
    dev_key = cli_json(plane.redis.url, "admin", "create-key", "--org", plane.org,
                       "--member", dev["id"])["key"]
    project_key = plane.admin("POST", "/keys", {"project_id": ids["project_id"]},
                              key=dev_key)
    assert (project_key.status, project_key.code) == (403, "permission_denied")
    admin_key = plane.admin("POST", "/keys", {"type": "admin"}, key=dev_key)
    assert admin_key.status == 403
    own = plane.admin("POST", "/keys", {"owner": "user", "quota": 1}, key=dev_key)
    assert (own.status, own.body.get("member_id")) == (201, dev["id"])
    assert plane.admin("POST", f"/keys/{own.body['id']}/disable", key=dev_key).status == 200
    make_owner = plane.admin("POST", "/members", {"user": "x@example.com", "role": "owner"},
                             key=dev_key)
    assert make_owner.status == 403
    # An owner cannot mint a user key for this member either: only the member can.
    for_dev = plane.admin("POST", "/keys", {"owner": "user", "member_id": dev["id"]})
    assert (for_dev.status, for_dev.param) == (403, "member_id")
