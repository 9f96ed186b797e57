"""The attacks of issue 8 on the authority model, replayed on a running sidecar over
real sockets: each must be refused, and afterwards nothing the attacker touched has
changed (roles, keys on the data plane, the organization)."""

from __future__ import annotations

import pytest
from admin_helpers import Plane, cli_json, module_plane

plane = module_plane("authority")


def member_with_key(plane: Plane, user: str, role: str) -> tuple[dict, str]:
    """A member of the plane's org and an admin key (all) tied to it, made by the CLI."""
    made = plane.ok("POST", "/members", {"user": user, "role": role})
    key = cli_json(plane.redis.url, "admin", "create-key", "--org", plane.org,
                   "--member", made["id"])["key"]
    return made, key


def refused(plane: Plane, method: str, path: str, body=None, *, key: str,
            param: str | None = None) -> None:
    reply = plane.admin(method, path, body, key=key)
    assert (reply.status, reply.code) == (403, "permission_denied"), (path, reply.body)
    assert reply.body["error"]["message"]
    if param is not None:
        assert reply.param == param, reply.body


def roles(plane: Plane) -> dict[str, str]:
    return {m["id"]: m["role"] for m in plane.ok("GET", "/members?limit=100")["data"]}


def test_an_admin_cannot_touch_an_owners_admin_keys_nor_take_the_org(plane: Plane):
    ann, ann_key = member_with_key(plane, "ann@example.com", "admin")
    owner_extra = plane.ok("POST", "/keys", {"type": "admin", "name": "owner's"})
    before = roles(plane)
    audit_before = len(plane.ok("GET", "/audit_logs?limit=500")["data"])

    for action in ("disable", "enable", "rotate"):
        refused(plane, "POST", f"/keys/{owner_extra['id']}/{action}", key=ann_key,
                param="key_id")
    refused(plane, "DELETE", f"/keys/{owner_extra['id']}", key=ann_key, param="key_id")
    refused(plane, "PATCH", f"/keys/{owner_extra['id']}", {"name": "mine"}, key=ann_key)
    # The old attack's second half: make itself owner, demote the owner.
    refused(plane, "PATCH", f"/members/{ann['id']}", {"role": "owner"}, key=ann_key,
            param="role")
    refused(plane, "PATCH", f"/members/{plane.member}", {"role": "member"}, key=ann_key,
            param="role")
    refused(plane, "DELETE", f"/members/{plane.member}", key=ann_key, param="member_id")
    refused(plane, "POST", "/members", {"user": "ally@example.com", "role": "owner"},
            key=ann_key, param="role")
    refused(plane, "POST", "/members", {"user": "ally@example.com", "role": "admin"},
            key=ann_key, param="role")
    # Nor another admin's membership or keys (equal rank).
    bea, bea_key = member_with_key(plane, "bea@example.com", "admin")
    bea_admin = plane.ok("GET", f"/keys?member_id={bea['id']}")["data"][0]
    refused(plane, "POST", f"/keys/{bea_admin['id']}/disable", key=ann_key)
    refused(plane, "PATCH", f"/members/{bea['id']}", {"role": "member"}, key=ann_key)

    # Nothing changed: roles, the owner's keys, the log.
    assert roles(plane) == {**before, bea["id"]: "admin"}
    shown = plane.ok("GET", f"/keys/{owner_extra['id']}")
    assert (shown["status"], shown["rotated_to"]) == ("active", None)
    assert plane.admin("GET", "/organization", key=owner_extra["key"]).status == 200
    assert plane.admin("GET", "/organization", key=bea_key).status == 200
    events = plane.ok("GET", "/audit_logs?limit=500")["data"]
    assert len(events) == audit_before + 2      # bea added, her admin key made
    assert all(e["actor"]["member_id"] != ann["id"] for e in events)

    # What an admin may do: its own admin key, members below it.
    second = plane.ok("POST", "/keys", {"type": "admin", "name": "ann 2"}, key=ann_key)
    assert second["member_id"] == ann["id"]
    again = plane.ok("POST", f"/keys/{second['id']}/rotate", key=ann_key)
    assert again["member_id"] == ann["id"] and again["key"].startswith("sk-admin_")
    dev = plane.ok("POST", "/members", {"user": "dev@example.com"}, key=ann_key)
    assert plane.ok("DELETE", f"/members/{dev['id']}", key=ann_key)["deleted"] is True
    # The owner still outranks the admin.
    assert plane.ok("PATCH", f"/members/{ann['id']}", {"role": "member"})["role"] == \
        "member"
    refused(plane, "POST", "/keys", {"type": "admin"}, key=ann_key, param="type")


def test_rotating_needs_the_authority_to_create(plane: Plane):
    """An owner outranks a member but cannot mint the member's user key, so it cannot
    rotate one either; it may still disable it."""
    cat, cat_key = member_with_key(plane, "cat@example.com", "member")
    own = plane.ok("POST", "/keys", {"owner": "user", "unlimited": True}, key=cat_key)
    refused(plane, "POST", f"/keys/{own['id']}/rotate", param="key_id", key=plane.key)
    assert plane.authz(own["key"]).status == 200
    plane.ok("POST", f"/keys/{own['id']}/disable", status=200)
    assert plane.authz(own["key"]).code == "key_disabled"


def test_a_member_cannot_act_above_its_role(plane: Plane):
    prj = plane.ok("POST", "/projects", {"name": "shared"})
    sa = plane.ok("POST", "/service_accounts", {"project_id": prj["id"], "name": "bot"})
    project_key = plane.ok("POST", "/keys", {"project_id": prj["id"], "unlimited": True})
    sa_key = plane.ok("POST", "/keys", {"service_account_id": sa["id"], "unlimited": True})
    name = plane.ok("GET", "/organization")["name"]
    dev, dev_key = member_with_key(plane, "dev2@example.com", "member")

    refused(plane, "POST", f"/keys/{project_key['id']}/disable", key=dev_key)
    # The cascades that disable the same keys are refused too.
    refused(plane, "DELETE", f"/service_accounts/{sa['id']}", key=dev_key,
            param="service_account_id")
    refused(plane, "DELETE", f"/projects/{prj['id']}", key=dev_key, param="project_id")
    refused(plane, "PATCH", "/organization", {"name": "pwned"}, key=dev_key)
    refused(plane, "POST", "/projects", {"name": "mine"}, key=dev_key)
    refused(plane, "POST", "/members", {"user": "friend@example.com"}, key=dev_key)
    refused(plane, "POST", "/keys", {"type": "standard", "account": "x"}, key=dev_key)
    refused(plane, "POST", "/subscriptions", {"account": "x", "plan": "p",
                                              "cycle_quota": 1}, key=dev_key)

    assert plane.ok("GET", "/organization")["name"] == name
    assert plane.ok("GET", f"/projects/{prj['id']}")["id"] == prj["id"]
    assert plane.ok("GET", f"/service_accounts/{sa['id']}")["id"] == sa["id"]
    assert plane.authz(project_key["key"]).status == 200
    assert plane.authz(sa_key["key"]).status == 200

    # Its own things it may: a user key, rename itself, leave.
    own = plane.ok("POST", "/keys", {"owner": "user", "quota": 1}, key=dev_key)
    assert plane.ok("PATCH", f"/members/{dev['id']}", {"name": "Dev"},
                    key=dev_key)["name"] == "Dev"
    assert plane.ok("DELETE", f"/members/{dev['id']}", key=dev_key)["disabled_keys"]
    assert plane.authz(own["key"]).code == "key_disabled"


def test_a_cascade_needs_the_authority_over_every_key_it_disables(plane: Plane):
    eve, eve_key = member_with_key(plane, "eve@example.com", "admin")
    prj = plane.ok("POST", "/projects", {"name": "mixed"}, key=eve_key)
    owner_scoped = plane.ok("POST", "/keys", {"owner": "user", "project_id": prj["id"],
                                              "unlimited": True})
    refused(plane, "DELETE", f"/projects/{prj['id']}", key=eve_key, param="project_id")
    assert plane.authz(owner_scoped["key"]).status == 200
    assert plane.ok("GET", f"/projects/{prj['id']}")["id"] == prj["id"]
    gone = plane.ok("DELETE", f"/projects/{prj['id']}")      # the owner may
    assert gone["disabled_keys"] == [owner_scoped["id"]]
    assert plane.authz(owner_scoped["key"]).code == "key_disabled"


# -- tenancy -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tenants(plane: Plane):
    """Org A (the plane's) and org B, each with an owner key (all), over one sidecar."""
    b = cli_json(plane.redis.url, "admin", "bootstrap", "--org", "beta", "--user",
                 "bob@beta.example")
    return plane.key, b["key"], b["organization"]["id"]


def test_billing_accounts_are_the_organizations_own(plane: Plane, tenants):
    a_key, b_key, b_org = tenants
    funded = cli_json(plane.redis.url, "accounts", "set-balance", "--org", plane.org,
                      "wallet", "1000")
    assert (funded["org_id"], funded["balance"]) == (plane.org, 1000)
    a_sub = plane.ok("POST", "/subscriptions", {"account": "wallet", "plan": "pro",
                                                "cycle_quota": 1, "payg_fallback": True})
    assert a_sub["payg_balance"] == 1000

    # Org B names the same account: it gets its own, empty wallet, never A's.
    b_sub = plane.ok("POST", "/subscriptions", {"account": "wallet", "plan": "pro",
                                                "cycle_quota": 1, "payg_fallback": True},
                     key=b_key)
    assert (b_sub["org_id"], b_sub["payg_balance"]) == (b_org, 0)
    assert plane.authz(b_sub["key"]).status == 200             # its cycle quota
    spent = plane.authz(b_sub["key"])                           # then its own wallet: empty
    assert (spent.status, spent.code) == (402, "quota_exhausted")
    assert cli_json(plane.redis.url, "accounts", "show", "--org", plane.org,
                    "wallet")["balance"] == 1000
    assert plane.ok("GET", f"/subscriptions/{a_sub['id']}")["payg_balance"] == 1000

    # A's wallet pays for A's key only.
    assert plane.authz(a_sub["key"]).status == 200
    assert plane.authz(a_sub["key"]).status == 200
    assert cli_json(plane.redis.url, "accounts", "show", "--org", plane.org,
                    "wallet")["balance"] == 999
    # An account name that spells another org's wallet field is not a name at all.
    spelled = plane.admin("POST", "/subscriptions", {
        "account": f"{plane.org}:wallet", "plan": "p", "cycle_quota": 1}, key=b_key)
    assert (spelled.status, spelled.param) == (400, "account")

    # A standalone account of the same name stays the operator's, apart from both.
    assert cli_json(plane.redis.url, "accounts", "show", "wallet")["balance"] == 0
    assert cli_json(plane.redis.url, "accounts", "set-balance", "wallet",
                    "7")["balance"] == 7
    assert cli_json(plane.redis.url, "accounts", "show", "--org", plane.org,
                    "wallet")["balance"] == 999
    assert plane.ok("GET", f"/subscriptions/{b_sub['id']}", key=b_key)["payg_balance"] == 0
    set_in_log = plane.ok("GET", "/audit_logs?action=account.*")["data"]
    assert [(e["action"], e["after"]["balance"]) for e in set_in_log] == [
        ("account.balance_set", 1000)]


def test_no_id_of_another_organization_is_readable_or_usable(plane: Plane, tenants):
    """Every route with an id, driven by org B's owner key (all) with org A's ids: 404,
    and nothing of A's in the answer; A's things unchanged afterwards."""
    a_key, b_key, _ = tenants
    prj = plane.ok("POST", "/projects", {"name": "secret-project"})
    ids = {"member_id": plane.ok("POST", "/members", {"user": "alice@a.example",
                                                      "role": "member"})["id"],
           "project_id": prj["id"],
           "service_account_id": plane.ok("POST", "/service_accounts", {
               "project_id": prj["id"], "name": "secret-bot"})["id"],
           "subscription_id": plane.ok("POST", "/subscriptions", {
               "account": "secret-acct", "plan": "p", "cycle_quota": 5})["id"],
           "webhook_id": plane.ok("POST", "/webhooks", {
               "url": "https://hooks.example.com/secret-hook"})["id"]}
    a_key_made = plane.ok("POST", "/keys", {"project_id": prj["id"], "unlimited": True,
                                            "name": "secret-key"})
    ids["key_id"] = a_key_made["id"]
    bodies = {"PATCH": {"name": "mine"}, "POST": {}, "PUT": {"budget": "1.00"}}
    body_for = {"/keys/{key_id}/quota": {"set": 0}, "/members/{member_id}": {"role": "member"},
                "/subscriptions/{subscription_id}": {"plan": "mine"},
                "/keys/{key_id}/thresholds": {"thresholds": [0.5]},
                "/projects/{project_id}/thresholds": {"thresholds": [0.5]}}
    doc = plane.ok("GET", "/openapi.json")
    tried = 0
    for path, ops in doc["paths"].items():
        if "{" not in path:
            continue
        local = path.removeprefix("/admin/v1")
        for method in ops:
            body = bodies.get(method.upper())
            if body is not None:
                body = body_for.get(local, body)
            reply = plane.admin(method.upper(), local.format(**ids), body, key=b_key)
            assert (reply.status, reply.code) == (404, "not_found"), (method, path, reply.body)
            text = str(reply.body)
            for secret in ("secret", plane.org, "alice"):
                assert secret not in text, (method, path, reply.body)
            tried += 1
    assert tried == 34   # members 5, projects 8, service accounts 3, keys 13, subs 3,
    #                      webhooks 2 (projects and keys: thresholds 2, usage 1)
    # Ids of A in B's request bodies and filters: not found either.
    for body in ({"project_id": prj["id"]}, {"service_account_id": ids["service_account_id"]},
                 {"owner": "user", "member_id": ids["member_id"]}):
        reply = plane.admin("POST", "/keys", body, key=b_key)
        assert reply.status == 404 and "secret" not in str(reply.body), reply.body
    assert plane.admin("GET", f"/keys?project_id={prj['id']}", key=b_key).status == 404
    assert plane.admin("POST", "/service_accounts", {"project_id": prj["id"], "name": "x"},
                       key=b_key).status == 404
    # A's things are as they were.
    assert plane.ok("GET", f"/keys/{a_key_made['id']}")["status"] == "active"
    assert plane.authz(a_key_made["key"]).status == 200
    assert plane.ok("GET", f"/members/{ids['member_id']}")["role"] == "member"
    assert plane.ok("GET", f"/projects/{prj['id']}")["name"] == "secret-project"
    assert plane.ok("GET", f"/webhooks/{ids['webhook_id']}")["url"].endswith("secret-hook")
    assert plane.ok("GET", f"/subscriptions/{ids['subscription_id']}")["plan"] == "p"
