"""The audit log: every admin change (who, what, when; before/after, never a secret),
queried through the API with filters and pagination, and through the CLI."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from admin_helpers import Plane, cli_json, module_plane
from conftest import PEPPER

plane = module_plane("audit")


@pytest.fixture(scope="module")
def story(plane: Plane) -> dict:
    """A run of changes made through the API by the owner's admin key."""
    prj = plane.ok("POST", "/projects", {"name": "audited"})
    key = plane.ok("POST", "/keys", {"project_id": prj["id"], "name": "before", "quota": 5})
    plane.ok("PATCH", f"/keys/{key['id']}", {"name": "after", "rpm": 7})
    plane.ok("POST", f"/keys/{key['id']}/quota", {"add": 5}, status=200)
    rotated = plane.ok("POST", f"/keys/{key['id']}/rotate", {"grace_seconds": 0})
    mem = plane.ok("POST", "/members", {"user": "aud@example.com"})
    plane.ok("DELETE", f"/members/{mem['id']}")
    admin_key_id = plane.ok("GET", "/keys?type=admin")["data"][0]["id"]
    return {"project": prj, "key": key, "rotated": rotated, "member": mem,
            "admin_key_id": admin_key_id}


def events(plane: Plane, query: str = "") -> list[dict]:
    return plane.ok("GET", "/audit_logs" + query)["data"]


def test_every_change_is_recorded_newest_first(plane: Plane, story: dict):
    actions = [e["action"] for e in events(plane)]
    assert actions[:7] == ["member.removed", "member.added", "key.rotated",
                           "key.quota_changed", "key.updated", "key.created",
                           "project.created"]
    newest = events(plane)[0]
    assert newest["actor"] == {"type": "admin_key", "id": story["admin_key_id"],
                               "member_id": plane.member}
    assert newest["resource"] == {"type": "member", "id": story["member"]["id"]}
    assert newest["time"].endswith("Z")


def test_before_and_after_show_the_change(plane: Plane, story: dict):
    (updated,) = events(plane, f"?action=key.updated&resource_id={story['key']['id']}")
    assert (updated["before"]["name"], updated["after"]["name"]) == ("before", "after")
    assert (updated["before"]["rpm"], updated["after"]["rpm"]) == (0, 7)
    (quota,) = events(plane, "?action=key.quota_changed")
    assert (quota["before"]["quota_remaining"], quota["after"]["quota_remaining"]) == (5, 10)
    (rotated,) = events(plane, "?action=key.rotated")
    assert rotated["after"]["new_key"]["id"] == story["rotated"]["id"]
    (removed,) = events(plane, f"?resource_id={story['member']['id']}&action=member.removed")
    assert removed["before"]["user"] == "aud@example.com" and removed["after"]["deleted"]


def test_no_secret_ever_reaches_the_log(plane: Plane, story: dict):
    raw = str(plane.redis.client().xrange(f"o:{{{plane.org}}}:audit"))
    for plaintext in (story["key"]["key"], story["rotated"]["key"], plane.key):
        digest = hmac.new(PEPPER.encode(), plaintext.encode(), hashlib.sha256).hexdigest()
        assert plaintext not in raw and digest not in raw
        assert plaintext[10:30] not in raw


def test_filters_and_pagination(plane: Plane, story: dict):
    keys_only = events(plane, "?resource_type=key")
    assert keys_only and {e["resource"]["type"] for e in keys_only} == {"key"}
    prefixed = events(plane, "?action=key.*")
    assert {e["action"] for e in prefixed} == {"key.created", "key.updated",
                                               "key.quota_changed", "key.rotated"}
    by_actor = events(plane, f"?actor_id={story['admin_key_id']}")
    assert len(by_actor) >= 7
    by_member = events(plane, f"?actor_id={plane.member}")
    assert [e["id"] for e in by_member] == [e["id"] for e in by_actor]
    assert events(plane, "?since=2099-01-01T00:00:00Z") == []
    assert events(plane, "?until=2000-01-01T00:00:00Z") == []

    everything = events(plane, "?limit=500")
    seen, cursor = [], None
    for _ in range(100):
        page = plane.ok("GET", "/audit_logs?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        assert len(page["data"]) <= 3
        seen += [e["id"] for e in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [e["id"] for e in everything]


def test_cli_changes_are_audited_and_the_cli_reads_the_log(plane: Plane, story: dict):
    prj = cli_json(plane.redis.url, "projects", "create", "from-cli", "--org", plane.org)
    listed = cli_json(plane.redis.url, "audit", "list", "--org", plane.org, "--limit", "3")
    assert listed[0]["action"] == "project.created"
    assert listed[0]["actor"] == {"type": "cli", "id": "cli", "member_id": None}
    assert listed[0]["resource"]["id"] == prj["id"]
    filtered = cli_json(plane.redis.url, "audit", "list", "--org", "acme", "--action",
                        "key.rotated")
    assert [e["resource"]["id"] for e in filtered] == [story["key"]["id"]]
    api = events(plane, "?limit=3")
    assert [e["id"] for e in api] == [e["id"] for e in listed]
    key = plane.ok("POST", "/keys", {"project_id": prj["id"]})
    assert plane.cli("keys", "disable", key["id"]).returncode == 0
    (disabled,) = cli_json(plane.redis.url, "audit", "list", "--org", plane.org, "--action",
                           "key.disabled", "--resource-id", key["id"])
    assert disabled["actor"]["type"] == "cli" and disabled["after"]["status"] == "disabled"
    text = plane.cli("audit", "list", "--org", plane.org, "--limit", "3")
    assert text.returncode == 0 and "key.disabled" in text.stdout
    bad = plane.cli("audit", "list", "--org", "no-such-org")
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "sidecar: error: no organization with id or name 'no-such-org'")
