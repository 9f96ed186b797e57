"""Ownership cascades through the data plane: after each one, the affected keys are
refused (401 key_disabled) on the very next call by every running sidecar process, and
the keys it does not touch still pass."""

from __future__ import annotations

import pytest
from admin_helpers import Plane, cli_json, request, start_plane, stop_plane
from conftest import start_sidecar, stop_process


@pytest.fixture(scope="module")
def planes(tmp_path_factory):
    """The plane's sidecar and a second sidecar process over the same Redis."""
    tmp = tmp_path_factory.mktemp("cascades")
    plane = start_plane(tmp)
    try:
        second = start_sidecar(tmp / "second", plane.redis.url)
    except BaseException:
        stop_plane(plane)
        raise
    yield plane, second
    stop_process(second.proc)
    stop_plane(plane)


def verdicts(plane: Plane, second, keys: dict[str, str]) -> dict[str, tuple]:
    """Each key's (status, code) from both processes; they must agree."""
    out = {}
    for name, key in keys.items():
        answers = {(r.status, r.code) for r in (
            plane.authz(key),
            request(second.port, "POST", "/authz/v1/chat/completions",
                    {"model": "gpt-5.5", "messages": []}, key))}
        assert len(answers) == 1, (name, answers)
        out[name] = answers.pop()
    return out


OK, DISABLED = (200, None), (401, "key_disabled")


def test_removing_a_member_disables_their_user_and_admin_keys(planes):
    plane, second = planes
    prj = plane.ok("POST", "/projects", {"name": "team"})
    ann = plane.ok("POST", "/members", {"user": "ann@example.com", "role": "admin"})
    ann_admin = cli_json(plane.redis.url, "admin", "create-key", "--org", plane.org,
                         "--member", ann["id"])
    as_ann = {"key": ann_admin["key"]}
    ann_user = plane.ok("POST", "/keys", {"owner": "user", "unlimited": True}, **as_ann)
    ann_scoped = plane.ok("POST", "/keys", {"owner": "user", "project_id": prj["id"],
                                            "unlimited": True}, **as_ann)
    ann_project = plane.ok("POST", "/keys", {"project_id": prj["id"], "unlimited": True},
                           **as_ann)
    owner_user = plane.ok("POST", "/keys", {"owner": "user", "unlimited": True})
    keys = {"ann_user": ann_user["key"], "ann_scoped": ann_scoped["key"],
            "ann_project": ann_project["key"], "owner_user": owner_user["key"]}
    assert set(verdicts(plane, second, keys).values()) == {OK}
    assert plane.authz(ann_admin["key"]).code == "admin_key_not_allowed"

    removed = plane.ok("DELETE", f"/members/{ann['id']}")
    assert set(removed["disabled_keys"]) == {ann_user["id"], ann_scoped["id"],
                                             ann_admin["id"]}
    assert verdicts(plane, second, keys) == {"ann_user": DISABLED, "ann_scoped": DISABLED,
                                             "ann_project": OK, "owner_user": OK}
    assert plane.authz(ann_admin["key"]).code == "key_disabled"
    refused = plane.admin("GET", "/keys", key=ann_admin["key"])
    assert (refused.status, refused.code) == (401, "key_disabled")
    shown = plane.ok("GET", f"/keys/{ann_user['id']}")
    assert (shown["status"], shown["disabled_reason"]) == ("disabled", "member_removed")
    again = plane.admin("POST", f"/keys/{ann_user['id']}/enable")
    assert (again.status, again.code) == (409, "conflict")
    assert plane.authz(ann_user["key"]).code == "key_disabled"


def test_deleting_a_service_account_disables_its_keys(planes):
    plane, second = planes
    prj = plane.ok("POST", "/projects", {"name": "robots"})
    doomed = plane.ok("POST", "/service_accounts", {"project_id": prj["id"], "name": "a"})
    kept = plane.ok("POST", "/service_accounts", {"project_id": prj["id"], "name": "b"})
    made = {name: plane.ok("POST", "/keys", {"service_account_id": sa["id"],
                                             "unlimited": True})
            for name, sa in (("doomed1", doomed), ("doomed2", doomed), ("kept", kept))}
    made["project"] = plane.ok("POST", "/keys", {"project_id": prj["id"], "unlimited": True})
    keys = {name: k["key"] for name, k in made.items()}
    assert set(verdicts(plane, second, keys).values()) == {OK}

    gone = plane.ok("DELETE", f"/service_accounts/{doomed['id']}")
    assert set(gone["disabled_keys"]) == {made["doomed1"]["id"], made["doomed2"]["id"]}
    assert verdicts(plane, second, keys) == {"doomed1": DISABLED, "doomed2": DISABLED,
                                             "kept": OK, "project": OK}
    assert plane.ok("GET", f"/keys/{made['doomed1']['id']}")["disabled_reason"] == \
        "service_account_deleted"


def test_deleting_a_project_disables_every_key_scoped_to_it(planes):
    plane, second = planes
    doomed = plane.ok("POST", "/projects", {"name": "doomed"})
    kept = plane.ok("POST", "/projects", {"name": "kept"})
    sa = plane.ok("POST", "/service_accounts", {"project_id": doomed["id"], "name": "s"})
    made = {
        "project": plane.ok("POST", "/keys", {"project_id": doomed["id"], "unlimited": True}),
        "user_scoped": plane.ok("POST", "/keys", {"owner": "user", "project_id": doomed["id"],
                                                  "unlimited": True}),
        "service_account": plane.ok("POST", "/keys", {"service_account_id": sa["id"],
                                                      "unlimited": True}),
        "other_project": plane.ok("POST", "/keys", {"project_id": kept["id"],
                                                    "unlimited": True}),
    }
    keys = {name: k["key"] for name, k in made.items()}
    assert set(verdicts(plane, second, keys).values()) == {OK}

    gone = plane.ok("DELETE", f"/projects/{doomed['id']}")
    assert gone["deleted_service_accounts"] == [sa["id"]]
    assert verdicts(plane, second, keys) == {"project": DISABLED, "user_scoped": DISABLED,
                                             "service_account": DISABLED,
                                             "other_project": OK}
    assert plane.admin("GET", f"/service_accounts/{sa['id']}").status == 404
    late = plane.admin("POST", "/keys", {"project_id": doomed["id"]})
    assert (late.status, late.param) == (404, "project_id")


def test_disabling_a_key_stops_only_that_key_until_enabled(planes):
    plane, second = planes
    prj = plane.ok("POST", "/projects", {"name": "switch"})
    one = plane.ok("POST", "/keys", {"project_id": prj["id"], "unlimited": True})
    two = plane.ok("POST", "/keys", {"project_id": prj["id"], "unlimited": True})
    keys = {"one": one["key"], "two": two["key"]}
    plane.ok("POST", f"/keys/{one['id']}/disable")
    assert verdicts(plane, second, keys) == {"one": DISABLED, "two": OK}
    plane.ok("POST", f"/keys/{one['id']}/enable")
    assert verdicts(plane, second, keys) == {"one": OK, "two": OK}
    plane.ok("DELETE", f"/keys/{one['id']}")
    assert verdicts(plane, second, keys) == {"one": (401, "invalid_api_key"), "two": OK}


def test_cancelling_a_subscription_disables_its_key(planes):
    plane, second = planes
    sub = plane.ok("POST", "/subscriptions", {"account": "acct-c", "plan": "pro",
                                              "cycle_quota": 100})
    other = plane.ok("POST", "/subscriptions", {"account": "acct-d", "plan": "pro",
                                                "cycle_quota": 100})
    keys = {"cancelled": sub["key"], "other": other["key"]}
    assert set(verdicts(plane, second, keys).values()) == {OK}
    plane.ok("DELETE", f"/subscriptions/{sub['id']}")
    assert verdicts(plane, second, keys) == {"cancelled": DISABLED, "other": OK}


def test_cli_cascades_match_the_api(planes):
    plane, second = planes
    member = cli_json(plane.redis.url, "members", "add", "--org", plane.org, "--user",
                      "cli@example.com")
    key = cli_json(plane.redis.url, "keys", "create", "--type", "org", "--org", plane.org,
                   "--member", member["id"], "--unlimited")
    assert (key["owner"], plane.authz(key["key"]).status) == ("user", 200)
    removed = cli_json(plane.redis.url, "members", "remove", member["id"], "--org", plane.org)
    assert removed["disabled_keys"] == [key["id"]]
    assert verdicts(plane, second, {"k": key["key"]}) == {"k": DISABLED}
    enable = plane.cli("keys", "enable", key["id"])
    assert enable.returncode == 1 and enable.stderr.count("\n") == 1, enable.stderr
    assert "owner is gone" in enable.stderr
