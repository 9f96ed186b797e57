"""Key rotation through the admin API and the CLI, checked on the data plane: the new key
works at once; the old one works during the grace window and is refused after it; a
repeated request (same idempotency key) returns the same new key and mints nothing."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
from admin_helpers import Plane, cli_json, module_plane

plane = module_plane("rotation")


@pytest.fixture
def project(plane: Plane) -> str:
    return plane.ok("POST", "/projects", {"name": "rot"})["id"]


def key_count(plane: Plane, project: str) -> int:
    return len(plane.ok("GET", f"/keys?project_id={project}&limit=500")["data"])


def test_rotation_with_a_grace_window(plane: Plane, project: str):
    old = plane.ok("POST", "/keys", {"project_id": project, "unlimited": True, "rpm": 50,
                                     "models": ["gpt-5.5"], "name": "svc"})
    rotated = plane.ok("POST", f"/keys/{old['id']}/rotate", {"grace_seconds": 2})
    new = rotated["key"]
    assert new.startswith("sk-org_") and new != old["key"] and rotated["replayed"] is False
    assert rotated["rotated_from"] == old["id"]
    assert rotated["old_key"]["rotated_to"] == rotated["id"]
    same = ("name", "models", "rpm", "unlimited", "project_id", "owner", "permission")
    assert {f: rotated[f] for f in same} == {f: old[f] for f in same}

    assert plane.authz(new).status == 200
    assert plane.authz(old["key"]).status == 200          # inside the grace window
    grace_end = datetime.fromisoformat(rotated["old_key"]["expires_at"].replace("Z", "+00:00"))
    time.sleep(max(0.0, grace_end.timestamp() - time.time()) + 0.2)
    assert plane.authz(old["key"]).code == "key_expired"
    assert plane.authz(new).status == 200
    again = plane.admin("POST", f"/keys/{old['id']}/rotate", {"grace_seconds": 0})
    assert (again.status, again.param) == (409, "rotated_to")


def test_old_and_new_key_share_one_quota_during_grace(plane: Plane, project: str):
    """The grace window must not double the remaining quota: both keys draw on one pool,
    raced with real calls; quota shown and set on either key is the pool's."""
    old = plane.ok("POST", "/keys", {"project_id": project, "quota": 9})
    assert plane.authz(old["key"]).status == 200                  # 8 left
    rotated = plane.ok("POST", f"/keys/{old['id']}/rotate", {"grace_seconds": 60})
    keys = [old["key"], rotated["key"]] * 10
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda k: plane.authz(k).status, keys))
    assert statuses.count(200) == 8 and statuses.count(402) == 12
    assert plane.ok("GET", f"/keys/{old['id']}")["quota_remaining"] == 0
    assert plane.ok("GET", f"/keys/{rotated['id']}")["quota_remaining"] == 0
    plane.ok("POST", f"/keys/{rotated['id']}/quota", {"set": 2})
    assert plane.ok("GET", f"/keys/{old['id']}")["quota_remaining"] == 2
    assert [plane.authz(k).status for k in (old["key"], rotated["key"], old["key"])] == \
        [200, 200, 402]


def test_rotation_without_grace_ends_the_old_key_at_once(plane: Plane, project: str):
    old = plane.ok("POST", "/keys", {"project_id": project, "unlimited": True})
    rotated = plane.ok("POST", f"/keys/{old['id']}/rotate")
    assert plane.authz(old["key"]).code == "key_disabled"
    assert plane.authz(rotated["key"]).status == 200
    shown = plane.ok("GET", f"/keys/{old['id']}")
    assert (shown["status"], shown["disabled_reason"]) == ("disabled", "rotated")


def test_repeated_request_returns_the_same_key_and_mints_nothing(plane: Plane, project: str):
    old = plane.ok("POST", "/keys", {"project_id": project, "unlimited": True})
    headers = {"Idempotency-Key": "rotate-once-123"}
    first = plane.ok("POST", f"/keys/{old['id']}/rotate", {"grace_seconds": 60},
                     headers=headers)
    count = key_count(plane, project)
    for body in ({"grace_seconds": 60}, {"grace_seconds": 60,
                                         "idempotency_key": "rotate-once-123"}):
        repeat = plane.admin("POST", f"/keys/{old['id']}/rotate", body, headers=headers)
        assert repeat.status == 200, repeat.body
        assert (repeat.body["id"], repeat.body["key"], repeat.body["replayed"]) == (
            first["id"], None, True)
    assert key_count(plane, project) == count
    assert plane.authz(first["key"]).status == 200

    other = plane.ok("POST", "/keys", {"project_id": project})
    reuse = plane.admin("POST", f"/keys/{other['id']}/rotate", headers=headers)
    assert (reuse.status, reuse.param) == (409, "idempotency_key")
    differ = plane.admin("POST", f"/keys/{other['id']}/rotate", {"idempotency_key": "a"},
                         headers={"Idempotency-Key": "b"})
    assert (differ.status, differ.code) == (400, "conflicting_options")


def test_racing_duplicates_mint_one_key(plane: Plane, project: str):
    old = plane.ok("POST", "/keys", {"project_id": project, "unlimited": True})
    before = key_count(plane, project)

    def rotate(_):
        return plane.admin("POST", f"/keys/{old['id']}/rotate", {"grace_seconds": 30},
                           headers={"Idempotency-Key": "race-1"})

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(rotate, range(6)))
    assert {r.status for r in replies} <= {200, 201}, [r.body for r in replies]
    assert len({r.body["id"] for r in replies}) == 1
    assert sum(1 for r in replies if r.body["key"]) == 1     # the plaintext, once
    assert key_count(plane, project) == before + 1


def test_rotating_an_admin_key_keeps_its_grant(plane: Plane):
    adm = plane.ok("POST", "/keys", {"type": "admin", "permission": "read-only"})
    rotated = plane.ok("POST", f"/keys/{adm['id']}/rotate")
    assert rotated["key"].startswith("sk-admin_") and rotated["permission"] == "read-only"
    assert plane.admin("GET", "/keys", key=rotated["key"]).status == 200
    assert plane.admin("POST", "/projects", {"name": "x"}, key=rotated["key"]).status == 403
    assert plane.admin("GET", "/keys", key=adm["key"]).code == "key_disabled"


def test_subscription_follows_its_rotated_key(plane: Plane):
    sub = plane.ok("POST", "/subscriptions", {"account": "rot-acct", "plan": "pro",
                                              "cycle_quota": 10})
    plane.authz(sub["key"])
    rotated = plane.ok("POST", f"/keys/{sub['key_id']}/rotate")
    assert rotated["key"].startswith("sk-sub-")
    shown = plane.ok("GET", f"/subscriptions/{sub['id']}")
    assert (shown["key_id"], shown["cycle_used"]) == (rotated["id"], 1)
    assert plane.authz(rotated["key"]).status == 200


def test_cli_rotate_is_repeat_safe(plane: Plane, project: str):
    old = plane.ok("POST", "/keys", {"project_id": project, "unlimited": True})
    args = ("keys", "rotate", old["id"], "--grace", "30", "--idempotency-key", "cli-1")
    first = cli_json(plane.redis.url, *args)
    second = cli_json(plane.redis.url, *args)
    assert first["key"].startswith("sk-org_") and second["key"] is None
    assert first["id"] == second["id"] and second["replayed"] is True
    assert plane.authz(first["key"]).status == 200
    assert plane.authz(old["key"]).status == 200
    bad = plane.cli("keys", "rotate", "key_unknown")
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
