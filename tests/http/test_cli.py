"""The CLI as an operator runs it: `python -m sidecar ...` in a subprocess, on a real Redis."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis as redis_sync
from conftest import PEPPER, ROOT, free_port, sidecar_env

from sidecar.dataplane.request import classify
from sidecar.redis.runner import make_runner
from sidecar.schema import names
from sidecar.schema.contracts import AuthorizeArgs
from sidecar.schema.ips import ip_hex
from sidecar.schema.keys import KeyType, key_type
from sidecar.schema.scripts import AUTHORIZE


def cli(*args: str, env: dict[str, str], cwd: Path | str = ROOT,
        timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def ok_json(*args: str, env: dict[str, str]):
    done = cli(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sidecar: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert done.stdout == ""


@pytest.fixture
def env(redis_url) -> dict[str, str]:
    return sidecar_env(redis_url)


# -- create, every type -------------------------------------------------------------

@pytest.mark.parametrize("typ,extra", [
    ("standard", ["--quota", "10"]),
    ("subscription", ["--quota", "100", "--cycle-days", "7", "--account", "acct-1",
                      "--payg-fallback"]),
    ("org", ["--permission", "restricted", "--scopes", "chat.completions:write,models:read",
             "--project", "{project}", "--unlimited"]),
    ("admin", ["--permission", "read-only", "--org", "default", "--member", "{owner}"]),
])
def test_create_every_type(env, typ, extra):
    if typ == "admin":      # an admin key is tied to a member: the bootstrapped owner
        owner = ok_json("admin", "bootstrap", env=env)["member"]["id"]
        extra = [a.format(owner=owner) for a in extra]
    project = None
    if typ == "org":        # a project of the default organization that exists
        project = ok_json("projects", "create", "p1", env=env)["id"]
        extra = [project if a == "{project}" else a for a in extra]
    made = ok_json("keys", "create", "--type", typ, "--name", f"my {typ}", *extra, env=env)
    assert made["id"].startswith("key_")
    assert key_type(made["key"]) is KeyType(typ)
    shown = ok_json("keys", "show", made["id"], env=env)
    assert (shown["type"], shown["name"], shown["status"]) == (typ, f"my {typ}", "active")
    if typ == "org":
        assert (shown["org_id"], shown["project_id"]) == ("default", project)
        assert shown["scopes"] == ["chat.completions:write", "models:read"]
        audit = ok_json("audit", "list", "--resource-id", made["id"], env=env)
        assert [e["action"] for e in audit] == ["key.created"]   # as through the API
    if typ == "subscription":
        assert shown["subscription"]["cycle_days"] == 7
        assert shown["subscription"]["payg_fallback"] is True
    if typ == "admin":      # the same control-plane path as the API: member + audit entry
        assert (shown["org_id"], shown["member_id"]) == ("default", owner)
        audit = ok_json("audit", "list", "--org", "default", "--resource-id", made["id"],
                        env=env)
        assert [e["action"] for e in audit] == ["key.created"]


@pytest.mark.parametrize("extra", [[], ["--org", "default"], ["--member", "mem_x"]])
def test_admin_key_without_a_member_is_a_usage_error(env, extra):
    """No side road: an admin key made by the CLI is tied to a member and audited."""
    done = cli("keys", "create", "--type", "admin", *extra, env=env)
    assert done.returncode == 2
    assert_one_line_error(done, "--org ORG --member", "sidecar admin create-key")
    assert ok_json("keys", "list", "--type", "admin", env=env) == []


def test_create_prints_the_key_once_in_text(env):
    done = cli("keys", "create", "--name", "plain", "--quota", "1", env=env)
    assert done.returncode == 0, done.stderr
    keys = [w for w in done.stdout.split() if key_type(w) is KeyType.standard]
    assert len(keys) == 1


def test_create_with_every_restriction(env):
    expires = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    made = ok_json("keys", "create", "--quota", "50", "--models", "gpt-5.5, o3",
                   "--ips", "10.0.0.0/8,2001:db8::/61,192.168.1.7", "--expires",
                   expires.isoformat(), "--rpm", "60", "--tpm", "1000", env=env)
    shown = ok_json("keys", "show", made["id"], env=env)
    assert shown["models"] == ["gpt-5.5", "o3"]
    assert shown["allowed_ips"] == ["10.0.0.0/8", "2001:db8::/61", "192.168.1.7"]
    assert shown["expires_at"] == expires.isoformat().replace("+00:00", "Z")
    assert (shown["rpm"], shown["tpm"], shown["quota_remaining"]) == (60, 1000, 50)


def test_org_key_without_project_goes_to_default(env):
    made = ok_json("keys", "create", "--type", "org", "--quota", "1", env=env)
    assert (made["org_id"], made["project_id"]) == ("default", "default")


# -- show / list: the fields, and never the key ------------------------------------------

SHOW_FIELDS = ("id", "type", "status", "quota_remaining", "quota_used", "unlimited",
               "expires_at", "last_used_at")


async def test_show_and_list_never_reveal_the_key(env, redis_url):
    made = ok_json("keys", "create", "--quota", "3", env=env)
    key = made["key"]
    key_hash = hmac.new(PEPPER.encode(), key.encode(), hashlib.sha256).hexdigest()

    # The key works on the hot path; show then reports the use.
    runner = make_runner(redis_url, 2.0)
    try:
        endpoint = classify("POST", "/v1/chat/completions")
        tag = key_hash[:3]
        args = AuthorizeArgs(
            names.record(key_hash), names.wallet(tag), names.budgets(tag), names.events(tag),
            names.usage_day(tag, 0), names.usage_hour(tag, 0), "",
            int(datetime.now(UTC).timestamp() * 1000), 1, ip_hex("10.1.1.1"), "10.1.1.1",
            "gpt-5.5", endpoint.scope, endpoint.granting, 1, 0)
        reply = await runner.run(AUTHORIZE, args.keys(), args.argv())
    finally:
        await runner.close()
    assert reply[0] == 0

    shown = ok_json("keys", "show", made["id"], env=env)
    assert {f: shown[f] for f in SHOW_FIELDS} == {
        "id": made["id"], "type": "standard", "status": "active", "quota_remaining": 2,
        "quota_used": 1, "unlimited": False, "expires_at": None,
        "last_used_at": shown["last_used_at"]}
    assert shown["last_used_at"].endswith("Z")
    outputs = [cli("keys", "show", made["id"], env=env).stdout,
               cli("keys", "show", made["id"], "--json", env=env).stdout,
               cli("keys", "list", env=env).stdout,
               cli("keys", "list", "--json", env=env).stdout]
    assert made["id"] in outputs[2]
    for out in outputs:
        assert key not in out and key[3:] not in out
        assert key_hash not in out and key_hash[3:20] not in out


def test_list_filters(env):
    std = ok_json("keys", "create", "--quota", "1", env=env)
    sub = ok_json("keys", "create", "--type", "subscription", "--quota", "1", env=env)
    assert {v["id"] for v in ok_json("keys", "list", env=env)} == {std["id"], sub["id"]}
    assert [v["id"] for v in ok_json("keys", "list", "--type", "subscription", env=env)] \
        == [sub["id"]]


# -- change a key ------------------------------------------------------------------

def test_disable_enable_delete(env):
    made = ok_json("keys", "create", "--unlimited", env=env)
    assert ok_json("keys", "disable", made["id"], env=env)["status"] == "disabled"
    assert ok_json("keys", "show", made["id"], env=env)["status"] == "disabled"
    assert [v["id"] for v in ok_json("keys", "list", "--status", "disabled", env=env)] \
        == [made["id"]]
    assert ok_json("keys", "enable", made["id"], env=env)["status"] == "active"
    assert ok_json("keys", "delete", made["id"], env=env) == {"id": made["id"],
                                                               "deleted": True}
    assert_one_line_error(cli("keys", "show", made["id"], env=env), made["id"])
    assert ok_json("keys", "list", env=env) == []


def test_set_quota_and_unlimited(env):
    made = ok_json("keys", "create", "--quota", "1", env=env)
    shown = ok_json("keys", "set-quota", made["id"], "7", env=env)
    assert (shown["quota_remaining"], shown["unlimited"]) == (7, False)
    shown = ok_json("keys", "set-quota", made["id"], "unlimited", env=env)
    assert (shown["quota_remaining"], shown["unlimited"]) == (None, True)
    shown = ok_json("keys", "set-quota", made["id"], "0", env=env)
    assert (shown["quota_remaining"], shown["unlimited"]) == (0, False)


def test_accounts_balance(env):
    assert ok_json("accounts", "show", "acct-9", env=env) == {"account": "acct-9",
                                                              "balance": 0}
    assert ok_json("accounts", "set-balance", "acct-9", "50", env=env)["balance"] == 50
    assert ok_json("accounts", "show", "acct-9", env=env)["balance"] == 50


# -- errors: one line, no traceback; 2 for usage, 1 for a failed operation ---------------

MISSING = "key_0000000000000000"
Q = ["--quota", "1"]


@pytest.mark.parametrize("args,fragment,rc", [
    (["keys", "create", *Q, "--expires", "2020-01-01T00:00:00Z"], "expires", 2),
    (["keys", "create", *Q, "--expires", "next tuesday"], "expires: 'next tuesday'", 2),
    (["keys", "create", *Q, "--ips", "10.0.0.0/33"], "ips", 2),
    (["keys", "create", *Q, "--ips", "10.0.0.1,nonsense"], "nonsense", 2),
    (["keys", "create", "--quota", "-1"], "quota: -1 is negative", 2),
    (["keys", "create", "--quota", "lots"], "quota: 'lots' is not a whole number", 2),
    (["keys", "create", "--quota", "5", "--unlimited"], "quota", 2),
    (["keys", "create"], "quota: give --quota N", 2),
    (["keys", "create", "--type", "subscription"], "quota: give --quota N", 2),
    (["keys", "create", *Q, "--rpm", "-5"], "rpm: -5 is negative", 2),
    (["keys", "create", *Q, "--cycle-days", "0"], "cycle-days: 0 is less than 1", 2),
    (["keys", "create", *Q, "--type", "superuser"], "type: invalid choice", 2),
    (["keys", "create", *Q, "--permission", "restricted"], "scopes", 2),
    (["keys", "create", *Q, "--permission", "restricted", "--scopes", "chat"], "scopes", 2),
    (["keys", "create", *Q, "--type", "subscription", "--payg-fallback"], "account", 2),
    (["keys", "create", *Q, "--project", "p1"], "project", 2),
    # The control plane's rules, the same as through the admin API:
    (["keys", "create", *Q, "--type", "org", "--project", "prj_nope"], "no project", 1),
    (["keys", "create", *Q, "--type", "org", "--account", "a1"], "account", 2),
    (["keys", "create", *Q, "--scopes", "models:read"], "scopes: only a restricted", 2),
    (["keys", "set-quota", MISSING, "-1"], "quota: -1 is negative", 2),
    (["keys", "set-quota", MISSING, "many"], "quota: 'many' is not a whole number", 2),
    (["keys", "set-quota", MISSING, "5"], MISSING, 1),
    (["keys", "show", MISSING], MISSING, 1),
    (["keys", "disable", MISSING], MISSING, 1),
    (["keys", "delete", MISSING], MISSING, 1),
    (["accounts", "set-balance", "acct", "-3"], "units: -3 is negative", 2),
    (["keys", "frobnicate"], "frobnicate", 2),
    (["keys", "show"], "required: id", 2),
])
def test_bad_arguments(env, args, fragment, rc):
    done = cli(*args, env=env)
    assert_one_line_error(done, fragment)
    assert done.returncode == rc, (args, done.stderr)


def test_the_same_mistake_reads_the_same_wherever_it_is_made(env):
    """`--quota -5` on create and `set-quota ID -5`: one field name, one wording, one code."""
    made = ok_json("keys", "create", "--quota", "1", env=env)
    on_create = cli("keys", "create", "--quota", "-5", env=env)
    on_change = cli("keys", "set-quota", made["id"], "-5", env=env)
    assert on_create.returncode == on_change.returncode == 2
    assert on_create.stderr.startswith("sidecar: error: quota: -5 is negative")
    assert on_change.stderr.startswith("sidecar: error: quota: -5 is negative")


def test_a_key_made_without_a_quota_choice_is_refused_not_made(env):
    """A key with no quota would be a 402 on its first call: the CLI asks for the choice."""
    done = cli("keys", "create", "--name", "forgot", env=env)
    assert_one_line_error(done, "--quota N", "--unlimited")
    assert done.returncode == 2
    assert ok_json("keys", "list", env=env) == []


def test_quiet_prints_the_key_alone(env):
    done = cli("keys", "create", "--quota", "2", "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    assert key_type(done.stdout.strip()) is KeyType.standard
    assert done.stdout.count("\n") == 1


def test_nothing_created_by_a_refused_create(env):
    assert cli("keys", "create", "--ips", "bad", "--quota", "1", env=env).returncode != 0
    assert ok_json("keys", "list", env=env) == []


def test_unreachable_redis(redis_url):
    closed = f"redis://127.0.0.1:{free_port()}/0"
    env = sidecar_env(closed)
    # A hang would raise TimeoutExpired: the CLI must give up on its own, quickly.
    for args in (["keys", "list"], ["keys", "create", "--quota", "1"]):
        done = cli(*args, env=env, timeout=10)
        assert_one_line_error(done, "cannot reach Redis", closed)


@pytest.mark.parametrize("yaml_text,field", [
    ("workers: 0\n", "workers"),
    ("no_such_setting: 1\n", "no_such_setting"),
    ("redis_timeout_ms: soon\n", "redis_timeout_ms"),
])
def test_bad_config_file(env, tmp_path, yaml_text, field):
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml_text)
    for args in (["--config", str(config), "keys", "list"],
                 ["keys", "list", "--config", str(config)]):
        assert_one_line_error(cli(*args, env=env), field)


# -- admin bootstrap: once, however often it is run --------------------------------------

def test_bootstrap_twice_changes_nothing_the_second_time(env, redis_url):
    first = ok_json("admin", "bootstrap", "--user", "owner@example.com", env=env)
    assert first["changed"] is True and first["key"].startswith("sk-admin_")
    db = redis_sync.Redis.from_url(redis_url)
    writes = db.info("persistence")["rdb_changes_since_last_save"]   # every change counts

    again = cli("admin", "bootstrap", "--user", "owner@example.com", env=env)
    assert again.returncode == 0, again.stderr
    assert "nothing changed" in again.stdout and first["admin_key"]["id"] in again.stdout
    assert "sk-admin_" not in again.stdout and again.stderr == ""
    other_user = ok_json("admin", "bootstrap", "--user", "someone@example.com", env=env)
    assert other_user["changed"] is False and "key" not in other_user
    assert db.info("persistence")["rdb_changes_since_last_save"] == writes   # no write
    members = ok_json("members", "list", env=env)
    assert [m["user"] for m in members] == ["owner@example.com"]
    admin_keys = ok_json("keys", "list", "--type", "admin", env=env)
    assert [k["id"] for k in admin_keys] == [first["admin_key"]["id"]]
