"""The admin API over HTTP on a running sidecar's admin listener: every resource's
create / read / list / update / delete, and bad input answered 4xx naming the field with
nothing left behind in Redis."""

from __future__ import annotations

from admin_helpers import Plane, cli_json, module_plane, request

from sidecar.schema import names

plane = module_plane("admin-api")


def test_bootstrap_key_opens_the_api_and_openapi_is_public(plane: Plane):
    org = plane.ok("GET", "/organization")
    assert org["id"] == plane.org and org["name"] == "acme"
    doc = request(plane.car.admin_port, "GET", "/admin/v1/openapi.json")
    assert doc.status == 200 and doc.body["openapi"].startswith("3.1")


def test_every_route_refuses_a_missing_or_wrong_key(plane: Plane):
    data_key = cli_json(plane.redis.url, "keys", "create", "--quota", "5")["key"]
    doc = request(plane.car.admin_port, "GET", "/admin/v1/openapi.json").body
    for path, ops in doc["paths"].items():
        concrete = path.replace("{", "x").replace("}", "")
        for method in ops:
            missing = request(plane.car.admin_port, method.upper(), concrete)
            assert (missing.status, missing.code) == (401, "missing_api_key"), (path, method)
            wrong = request(plane.car.admin_port, method.upper(), concrete, key=data_key)
            assert (wrong.status, wrong.code) == (401, "admin_key_required"), (path, method)
    bad = request(plane.car.admin_port, "GET", "/admin/v1/keys", key="sk-admin_" + "a" * 40)
    assert (bad.status, bad.code) == (401, "invalid_api_key")
    junk = request(plane.car.admin_port, "GET", "/admin/v1/keys", key="not-a-key")
    assert (junk.status, junk.code) == (401, "invalid_api_key")


def test_organization_rename(plane: Plane):
    assert plane.ok("PATCH", "/organization", {"name": "acme-renamed"})["name"] == \
        "acme-renamed"
    bad = plane.admin("PATCH", "/organization", {"name": ""})
    assert (bad.status, bad.param) == (400, "name")
    plane.ok("PATCH", "/organization", {"name": "acme"})


def test_members_crud(plane: Plane):
    bob = plane.ok("POST", "/members", {"user": "bob@example.com", "role": "member",
                                        "name": "Bob"})
    assert (bob["role"], bob["user"], bob["org_id"]) == ("member", "bob@example.com",
                                                         plane.org)
    twice = plane.admin("POST", "/members", {"user": "bob@example.com"})
    assert (twice.status, twice.code, twice.param) == (409, "conflict", "user")
    assert plane.ok("GET", f"/members/{bob['id']}")["name"] == "Bob"
    listed = plane.ok("GET", "/members?role=member")["data"]
    assert [m["id"] for m in listed] == [bob["id"]]
    assert plane.ok("PATCH", f"/members/{bob['id']}", {"role": "admin"})["role"] == "admin"
    bad = plane.admin("PATCH", f"/members/{bob['id']}", {"role": "god"})
    assert (bad.status, bad.param) == (400, "role")
    gone = plane.ok("DELETE", f"/members/{bob['id']}")
    assert gone["deleted"] is True
    assert plane.admin("GET", f"/members/{bob['id']}").status == 404
    last = plane.admin("DELETE", f"/members/{plane.member}")
    assert (last.status, last.param) == (409, "member_id")


def test_projects_and_service_accounts_crud(plane: Plane):
    prj = plane.ok("POST", "/projects", {"name": "web"})
    assert plane.ok("GET", f"/projects/{prj['id']}")["name"] == "web"
    assert plane.ok("PATCH", f"/projects/{prj['id']}", {"name": "web2"})["name"] == "web2"
    assert prj["id"] in [p["id"] for p in plane.ok("GET", "/projects")["data"]]

    sa = plane.ok("POST", "/service_accounts", {"project_id": prj["id"], "name": "ci"})
    assert (sa["project_id"], sa["name"]) == (prj["id"], "ci")
    assert plane.ok("GET", f"/service_accounts/{sa['id']}")["id"] == sa["id"]
    assert plane.ok("PATCH", f"/service_accounts/{sa['id']}", {"name": "ci2"})["name"] == "ci2"
    listed = plane.ok("GET", f"/service_accounts?project_id={prj['id']}")["data"]
    assert [s["id"] for s in listed] == [sa["id"]]
    missing = plane.admin("POST", "/service_accounts", {"project_id": "prj_nope", "name": "x"})
    assert (missing.status, missing.param) == (404, "project_id")

    assert plane.ok("DELETE", f"/service_accounts/{sa['id']}")["deleted"] is True
    assert plane.admin("GET", f"/service_accounts/{sa['id']}").status == 404
    assert plane.ok("DELETE", f"/projects/{prj['id']}")["deleted"] is True
    gone = plane.admin("GET", f"/projects/{prj['id']}")
    assert (gone.status, gone.code, gone.param) == (404, "not_found", "project_id")


def test_keys_crud_edit_quota_activity(plane: Plane):
    prj = plane.ok("POST", "/projects", {"name": "keys"})
    made = plane.ok("POST", "/keys", {"name": "svc", "project_id": prj["id"], "quota": 10,
                                      "models": ["gpt-5.5"]})
    assert made["key"].startswith("sk-org_") and made["owner"] == "project"
    assert made["created_by"] == plane.member and made["project_id"] == prj["id"]
    key_id = made["id"]
    shown = plane.ok("GET", f"/keys/{key_id}")
    assert "key" not in shown and made["key"] not in str(shown)

    edited = plane.ok("PATCH", f"/keys/{key_id}", {
        "name": "svc2", "permission": "restricted", "scopes": ["chat.completions:write"],
        "models": ["gpt-5.5", "o4"], "allowed_ips": ["127.0.0.0/8"], "rpm": 100, "tpm": 5000,
        "expires_at": "2099-01-01T00:00:00Z"})
    assert (edited["name"], edited["permission"], edited["scopes"], edited["models"],
            edited["allowed_ips"], edited["rpm"], edited["tpm"], edited["expires_at"]) == (
        "svc2", "restricted", ["chat.completions:write"], ["gpt-5.5", "o4"], ["127.0.0.0/8"],
        100, 5000, "2099-01-01T00:00:00Z")
    assert plane.authz(made["key"]).status == 200
    cleared = plane.ok("PATCH", f"/keys/{key_id}", {"permission": "all", "expires_at": None,
                                                    "models": []})
    assert (cleared["permission"], cleared["scopes"], cleared["expires_at"],
            cleared["models"]) == ("all", [], None, [])

    assert plane.ok("POST", f"/keys/{key_id}/quota", {"set": 3})["quota_remaining"] == 3
    assert plane.ok("POST", f"/keys/{key_id}/quota", {"add": 2})["quota_remaining"] == 5
    assert plane.ok("POST", f"/keys/{key_id}/quota", {"unlimited": True})["unlimited"] is True
    both = plane.admin("POST", f"/keys/{key_id}/quota", {"set": 1, "add": 1})
    assert (both.status, both.code) == (400, "conflicting_options")

    activity = plane.ok("GET", f"/keys/{key_id}/activity")
    assert activity["request_count"] == 1 and activity["last_model"] == "gpt-5.5"
    assert activity["last_used_at"] is not None

    assert plane.ok("POST", f"/keys/{key_id}/disable")["status"] == "disabled"
    assert plane.authz(made["key"]).code == "key_disabled"
    assert plane.ok("POST", f"/keys/{key_id}/enable")["status"] == "active"
    assert plane.authz(made["key"]).status == 200

    assert plane.ok("DELETE", f"/keys/{key_id}")["deleted"] is True
    assert plane.admin("GET", f"/keys/{key_id}").status == 404
    assert plane.authz(made["key"]).code == "invalid_api_key"


def test_key_kinds_owners_and_listing(plane: Plane):
    prj = plane.ok("POST", "/projects", {"name": "owners"})
    sa = plane.ok("POST", "/service_accounts", {"project_id": prj["id"], "name": "bot"})
    mine = plane.ok("POST", "/keys", {"owner": "user", "name": "mine", "quota": 5})
    assert (mine["owner"], mine["member_id"]) == ("user", plane.member)
    robot = plane.ok("POST", "/keys", {"service_account_id": sa["id"], "unlimited": True})
    assert (robot["owner"], robot["project_id"]) == ("service_account", prj["id"])
    std = plane.ok("POST", "/keys", {"type": "standard", "quota": 1})
    assert std["key"].startswith("sk-") and std["type"] == "standard"
    adm = plane.ok("POST", "/keys", {"type": "admin", "permission": "read-only"})
    assert adm["key"].startswith("sk-admin_") and adm["member_id"] == plane.member
    for k in (mine, robot, std):
        assert plane.authz(k["key"]).status == 200, k["type"]
    assert plane.authz(adm["key"]).code == "admin_key_not_allowed"

    other = plane.ok("POST", "/members", {"user": "carol@example.com"})
    refused = plane.admin("POST", "/keys", {"owner": "user", "member_id": other["id"]})
    assert (refused.status, refused.code, refused.param) == (403, "permission_denied",
                                                            "member_id")

    by_sa = plane.ok("GET", f"/keys?service_account_id={sa['id']}")["data"]
    assert [k["id"] for k in by_sa] == [robot["id"]]
    users = plane.ok("GET", "/keys?owner=user")["data"]
    assert mine["id"] in [k["id"] for k in users] and all(k["owner"] == "user" for k in users)
    admins = plane.ok("GET", "/keys?type=admin")["data"]
    assert adm["id"] in [k["id"] for k in admins]

    seen, cursor = [], None
    for _ in range(50):
        page = plane.ok("GET", "/keys?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        assert len(page["data"]) <= 2
        seen += [k["id"] for k in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and {mine["id"], robot["id"], std["id"]} <= set(seen)


def test_subscriptions_crud(plane: Plane):
    sub = plane.ok("POST", "/subscriptions", {"account": "acct-1", "plan": "pro",
                                              "cycle_quota": 2, "cycle_days": 30})
    assert sub["key"].startswith("sk-sub-") and sub["cycle_quota"] == 2
    assert sub["renews_at"] is not None and sub["payg_fallback"] is False
    again = plane.admin("POST", "/subscriptions", {"account": "acct-1", "plan": "pro",
                                                   "cycle_quota": 1})
    assert (again.status, again.param) == (409, "account")
    assert plane.authz(sub["key"]).status == 200
    assert plane.authz(sub["key"]).status == 200
    assert plane.authz(sub["key"]).code == "quota_exhausted"
    changed = plane.ok("PATCH", f"/subscriptions/{sub['id']}", {"payg_fallback": True,
                                                                "cycle_quota": 5,
                                                                "plan": "max"})
    assert (changed["payg_fallback"], changed["cycle_quota"], changed["plan"]) == (
        True, 5, "max")
    assert plane.authz(sub["key"]).status == 200
    got = plane.ok("GET", f"/subscriptions/{sub['id']}")
    assert got["cycle_used"] == 3 and got["key_id"] == sub["key_id"] and "key" not in got
    assert sub["id"] in [s["id"] for s in plane.ok("GET", "/subscriptions")["data"]]
    assert plane.ok("DELETE", f"/subscriptions/{sub['id']}")["deleted"] is True
    assert plane.authz(sub["key"]).code == "key_disabled"
    assert plane.admin("GET", f"/subscriptions/{sub['id']}").status == 404


BAD_REQUESTS = [
    # (method, path, body, status, code, param)
    ("POST", "/keys", {"project_id": "P", "colour": "red"}, 400, "unknown_field", "colour"),
    ("POST", "/keys", {"project_id": "P", "quota": "ten"}, 400, "invalid_type", "quota"),
    ("POST", "/keys", {"project_id": "P", "quota": True}, 400, "invalid_type", "quota"),
    ("POST", "/keys", {"project_id": "P", "quota": 1.5}, 400, "invalid_type", "quota"),
    ("POST", "/keys", {"project_id": "P", "quota": -1}, 400, "invalid_value", "quota"),
    ("POST", "/keys", {"project_id": "P", "models": "gpt"}, 400, "invalid_type", "models"),
    ("POST", "/keys", {"project_id": "P", "models": [1]}, 400, "invalid_type", "models[0]"),
    ("POST", "/keys", {"project_id": "P", "quota": 1, "unlimited": True}, 400,
     "conflicting_options", "unlimited"),
    ("POST", "/keys", {"project_id": "P", "scopes": ["a:read"]}, 400, "conflicting_options",
     "scopes"),
    ("POST", "/keys", {"project_id": "P", "permission": "restricted"}, 400, "invalid_value",
     "scopes"),
    ("POST", "/keys", {"project_id": "P", "allowed_ips": ["300.1.1.1"]}, 400, "invalid_value",
     "allowed_ips"),
    ("POST", "/keys", {"project_id": "P", "expires_at": "2001-01-01T00:00:00Z"}, 400,
     "invalid_value", "expires_at"),
    ("POST", "/keys", {"project_id": "P", "expires_at": "soon"}, 400, "invalid_value",
     "expires_at"),
    ("POST", "/keys", {"owner": "user", "service_account_id": "sa_x"}, 400,
     "conflicting_options", "service_account_id"),
    ("POST", "/keys", {"type": "admin", "quota": 5}, 400, "conflicting_options", "quota"),
    ("POST", "/keys", {"type": "admin", "permission": "restricted", "scopes": ["x:read"]},
     400, "invalid_value", "scopes"),
    ("POST", "/keys", {"type": "subscription"}, 400, "invalid_value", "type"),
    ("POST", "/keys", {"owner": "project"}, 400, "invalid_value", "project_id"),
    ("POST", "/keys", {"project_id": "prj_unknown"}, 404, "not_found", "project_id"),
    ("POST", "/keys", {"type": "standard", "project_id": "P"}, 400, "conflicting_options",
     "project_id"),
    ("POST", "/members", {"role": "owner"}, 400, "missing_field", "user"),
    ("POST", "/members", {"user": "x\u0000y"}, 400, "invalid_value", "user"),
    ("POST", "/projects", {"name": "x" * 201}, 400, "invalid_value", "name"),
    ("POST", "/projects", [1, 2], 400, "invalid_type", "body"),
    ("POST", "/service_accounts", {"name": "x"}, 400, "missing_field", "project_id"),
    ("PATCH", "/keys/key_nope", {"name": "x"}, 404, "not_found", "key_id"),
    ("PATCH", "/keys/K", {}, 400, "missing_field", "name"),
    ("POST", "/keys/K/quota", {"set": 1, "unlimited": True}, 400, "conflicting_options",
     "unlimited"),
    ("POST", "/keys/K/rotate", {"grace_seconds": -1}, 400, "invalid_value", "grace_seconds"),
    ("POST", "/subscriptions", {"account": "a", "plan": "p"}, 400, "missing_field",
     "cycle_quota"),
    ("POST", "/subscriptions", {"account": "a", "plan": "p", "cycle_quota": 1,
                                "cycle_days": 0}, 400, "invalid_value", "cycle_days"),
    ("GET", "/keys?limit=0", None, 400, "invalid_value", "limit"),
    ("GET", "/keys?limit=ten", None, 400, "invalid_type", "limit"),
    ("GET", "/keys?colour=red", None, 400, "unknown_field", "colour"),
    ("GET", "/keys?type=gold", None, 400, "invalid_value", "type"),
    ("GET", "/audit_logs?since=yesterday", None, 400, "invalid_value", "since"),
    ("GET", "/keys/bad%20id", None, 404, "not_found", "key_id"),
    ("GET", "/members/mem_nope", None, 404, "not_found", "member_id"),
]


def _snapshot(plane: Plane) -> dict:
    """Every Redis key and its content, minus the admin key's own activity fields and
    the webhook worker's own state (ev:active, ev:sweep); of an event stream, how many
    entries were ever added (the worker deletes what it delivered)."""
    r = plane.redis.client()
    out = {}
    for name in r.keys("*"):
        if name in (names.EVENTS_ACTIVE, names.EVENTS_SWEEP):
            continue
        kind = r.type(name)
        if kind == "stream" and name.startswith("ev:"):
            out[name] = r.xinfo_stream(name)["entries-added"]
            continue
        if kind == "hash":
            value = {k: v for k, v in r.hgetall(name).items() if k not in ("la", "n")}
        elif kind == "set":
            value = sorted(r.smembers(name))
        elif kind == "stream":
            value = r.xlen(name)
        else:
            value = r.get(name)
        out[name] = value
    return out


def test_bad_input_is_a_4xx_naming_the_field_and_writes_nothing(plane: Plane):
    prj = plane.ok("POST", "/projects", {"name": "bad-input"})
    key = plane.ok("POST", "/keys", {"project_id": prj["id"]})
    before = _snapshot(plane)
    for method, path, body, status, code, param in BAD_REQUESTS:
        path = path.replace("/K", "/" + key["id"])
        if isinstance(body, dict) and body.get("project_id") == "P":
            body = {**body, "project_id": prj["id"]}
        reply = plane.admin(method, path, body)
        assert (reply.status, reply.code, reply.param) == (status, code, param), (
            method, path, body, reply.body)
        assert reply.body["error"]["message"] and reply.body["error"]["type"]
    assert _snapshot(plane) == before


def test_malformed_bodies(plane: Plane):
    big = plane.admin("POST", "/projects", raw=b'{"name": "' + b"x" * 70_000 + b'"}')
    assert (big.status, big.code) == (413, "body_too_large")
    broken = plane.admin("POST", "/projects", raw=b'{"name": ')
    assert (broken.status, broken.code) == (400, "invalid_json")
    dup = plane.admin("GET", "/keys?limit=1&limit=2")
    assert (dup.status, dup.param) == (400, "limit")
    put = plane.admin("PUT", "/projects")
    assert (put.status, put.code) == (405, "method_not_allowed")
    assert set(put.headers["allow"].split(",")) >= {"GET", "POST"}
    nowhere = plane.admin("GET", "/nowhere")
    assert (nowhere.status, nowhere.code) == (404, "not_found")


def test_another_organization_sees_nothing_of_this_one(plane: Plane):
    prj = plane.ok("POST", "/projects", {"name": "private"})
    key = plane.ok("POST", "/keys", {"project_id": prj["id"]})
    other = cli_json(plane.redis.url, "admin", "bootstrap", "--org", "globex", "--user",
                     "g@example.com")
    assert other["organization"]["id"] != plane.org
    for path in (f"/projects/{prj['id']}", f"/keys/{key['id']}", f"/members/{plane.member}"):
        assert plane.admin("GET", path, key=other["key"]).status == 404, path
    assert plane.admin("DELETE", f"/keys/{key['id']}", key=other["key"]).status == 404
    listed = plane.ok("GET", "/keys", key=other["key"])["data"]
    assert [k["id"] for k in listed] == [other["admin_key"]["id"]]
