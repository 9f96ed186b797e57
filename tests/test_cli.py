"""The CLI as an operator runs it: `python -m sidecar ...` in a subprocess, on a real Redis."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import PEPPER, ROOT, free_port, sidecar_env

from sidecar.keys import KeyType, key_type
from sidecar.request import classify, ip_hex
from sidecar.store import names
from sidecar.store.runner import make_runner
from sidecar.store.scripts import AUTHORIZE


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
             "--project", "prj-1"]),
    ("admin", ["--permission", "read-only", "--org", "default", "--member", "{owner}"]),
])
def test_create_every_type(env, typ, extra):
    if typ == "admin":      # an admin key is tied to a member: the bootstrapped owner
        owner = ok_json("admin", "bootstrap", env=env)["member"]["id"]
        extra = [a.format(owner=owner) for a in extra]
    made = ok_json("keys", "create", "--type", typ, "--name", f"my {typ}", *extra, env=env)
    assert made["id"].startswith("key_")
    assert key_type(made["key"]) is KeyType(typ)
    shown = ok_json("keys", "show", made["id"], env=env)
    assert (shown["type"], shown["name"], shown["status"]) == (typ, f"my {typ}", "active")
    if typ == "org":
        assert (shown["org_id"], shown["project_id"]) == ("default", "prj-1")
        assert shown["scopes"] == ["chat.completions:write", "models:read"]
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
    done = cli("keys", "create", "--name", "plain", env=env)
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
    made = ok_json("keys", "create", "--type", "org", env=env)
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
        reply = await runner.run(
            AUTHORIZE, (names.record(key_hash), names.wallet(key_hash[:3])),
            [int(datetime.now(UTC).timestamp() * 1000), 1, ip_hex("10.1.1.1"), "10.1.1.1",
             "gpt-5.5", endpoint.scope, endpoint.granting, 1])
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
    std = ok_json("keys", "create", env=env)
    sub = ok_json("keys", "create", "--type", "subscription", env=env)
    assert {v["id"] for v in ok_json("keys", "list", env=env)} == {std["id"], sub["id"]}
    assert [v["id"] for v in ok_json("keys", "list", "--type", "subscription", env=env)] \
        == [sub["id"]]


# -- change a key ------------------------------------------------------------------

def test_disable_enable_delete(env):
    made = ok_json("keys", "create", env=env)
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


# -- errors: one line, non-zero, no traceback ------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["keys", "create", "--expires", "2020-01-01T00:00:00Z"], "expires"),
    (["keys", "create", "--expires", "next tuesday"], "expires"),
    (["keys", "create", "--ips", "10.0.0.0/33"], "ips"),
    (["keys", "create", "--ips", "10.0.0.1,nonsense"], "nonsense"),
    (["keys", "create", "--quota", "-1"], "quota"),
    (["keys", "create", "--quota", "lots"], "quota"),
    (["keys", "create", "--quota", "5", "--unlimited"], "quota"),
    (["keys", "create", "--rpm", "-5"], "rpm"),
    (["keys", "create", "--type", "superuser"], "type"),
    (["keys", "create", "--permission", "restricted"], "scopes"),
    (["keys", "create", "--permission", "restricted", "--scopes", "chat"], "scopes"),
    (["keys", "create", "--type", "subscription", "--payg-fallback"], "account"),
    (["keys", "create", "--project", "p1"], "project"),
    (["keys", "set-quota", "key_0000000000000000", "-1"], "quota"),
    (["keys", "set-quota", "key_0000000000000000", "many"], "quota"),
    (["keys", "show", "key_0000000000000000"], "key_0000000000000000"),
    (["keys", "disable", "key_0000000000000000"], "key_0000000000000000"),
    (["keys", "delete", "key_0000000000000000"], "key_0000000000000000"),
    (["accounts", "set-balance", "acct", "-3"], "units"),
    (["keys", "frobnicate"], "frobnicate"),
])
def test_bad_arguments(env, args, fragment):
    assert_one_line_error(cli(*args, env=env), fragment)


def test_nothing_created_by_a_refused_create(env):
    assert cli("keys", "create", "--ips", "bad", env=env).returncode != 0
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


# -- the embedded default --------------------------------------------------------------

def _redis_processes_under(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "redis" in cmdline and str(path) in cmdline:
            found.append(int(proc.name))
    return found


def test_embedded_default_persists_and_stops(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    state = tmp_path / ".sidecar-state"
    try:
        done = cli("keys", "create", "--name", "emb", "--quota", "4", "--json", env=env,
                   cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        made = json.loads(done.stdout)
        assert key_type(made["key"]) is KeyType.standard
        assert (state / "pepper").stat().st_mode & 0o077 == 0
        assert _redis_processes_under(state) == []

        # A second command starts a fresh private server, which reads the AOF back.
        done = cli("keys", "list", "--json", env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert [(v["id"], v["quota_remaining"]) for v in json.loads(done.stdout)] == [
            (made["id"], 4)]
        assert _redis_processes_under(state) == []
        assert made["key"] not in done.stdout
    finally:
        for pid in _redis_processes_under(state):   # only if the test failed midway
            os.kill(pid, 15)
