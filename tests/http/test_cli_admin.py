"""The control-plane CLI straight on Redis: every command with --json, the same rules as
the API, and one-line errors."""

from __future__ import annotations

import pytest
from admin_helpers import cli, cli_json
from conftest import start_redis, stop_process


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("cli-admin"))
    yield server.url
    stop_process(server.proc)


def one_line_error(url: str, *args: str, code: int = 1) -> str:
    done = cli(url, *args)
    assert done.returncode == code, (args, done.stdout, done.stderr)
    assert done.stderr.startswith("sidecar: error: ") and done.stderr.count("\n") == 1, \
        done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def test_bootstrap_then_every_resource(url: str):
    boot = cli_json(url, "admin", "bootstrap", "--org", "initech", "--user", "o@x.io")
    org = boot["organization"]["id"]
    assert boot["key"].startswith("sk-admin_") and boot["member"]["role"] == "owner"
    assert boot["admin_key"]["permission"] == "all" and "key" not in boot["admin_key"]
    # Run again it changes nothing (no second owner, no second admin key) and says so.
    again = cli(url, "admin", "bootstrap", "--org", "initech", "--user", "o@x.io")
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stderr
    assert "sk-admin_" not in again.stdout and boot["admin_key"]["id"] in again.stdout
    assert cli_json(url, "admin", "bootstrap", "--org", "initech")["changed"] is False
    assert len(cli_json(url, "members", "list", "--org", org)) == 1

    assert [o["name"] for o in cli_json(url, "orgs", "list")] == ["initech"]
    assert cli_json(url, "orgs", "show", "initech")["id"] == org
    assert cli_json(url, "orgs", "rename", org, "initrode")["name"] == "initrode"
    assert cli_json(url, "orgs", "create", "umbrella")["name"] == "umbrella"

    peter = cli_json(url, "members", "add", "--org", org, "--user", "peter@x.io", "--role",
                     "admin")
    assert cli_json(url, "members", "show", peter["id"], "--org", org)["role"] == "admin"
    assert cli_json(url, "members", "update", peter["id"], "--org", org, "--role",
                    "member")["role"] == "member"
    assert len(cli_json(url, "members", "list", "--org", org)) == 2

    prj = cli_json(url, "projects", "create", "tps", "--org", org)
    assert cli_json(url, "projects", "rename", prj["id"], "tps2", "--org", org)["name"] == \
        "tps2"
    assert [p["id"] for p in cli_json(url, "projects", "list", "--org", org)] == [prj["id"]]
    sa = cli_json(url, "service-accounts", "create", "bot", "--project", prj["id"], "--org",
                  org)
    assert cli_json(url, "service-accounts", "show", sa["id"], "--org", org)["name"] == "bot"
    assert cli_json(url, "service-accounts", "rename", sa["id"], "bot2", "--org",
                    org)["name"] == "bot2"
    assert len(cli_json(url, "service-accounts", "list", "--org", org, "--project",
                        prj["id"])) == 1

    sa_key = cli_json(url, "keys", "create", "--type", "org", "--org", org,
                      "--service-account", sa["id"], "--quota", "3")
    assert (sa_key["owner"], sa_key["project_id"]) == ("service_account", prj["id"])
    edited = cli_json(url, "keys", "edit", sa_key["id"], "--name", "renamed", "--models",
                      "gpt-5.5", "--rpm", "9", "--expires", "2099-01-01T00:00:00Z")
    assert (edited["name"], edited["models"], edited["rpm"]) == ("renamed", ["gpt-5.5"], 9)
    assert cli_json(url, "keys", "edit", sa_key["id"], "--models", "", "--expires",
                    "never")["models"] == []
    adm = cli_json(url, "admin", "create-key", "--org", org, "--member", peter["id"],
                   "--permission", "restricted", "--scopes", "keys:read")
    assert (adm["type"], adm["member_id"], adm["scopes"]) == ("admin", peter["id"],
                                                              ["keys:read"])

    sub = cli_json(url, "subscriptions", "create", "--org", org, "--account", "acct",
                   "--plan", "pro", "--cycle-quota", "10", "--payg-fallback")
    assert sub["key"].startswith("sk-sub-") and sub["payg_fallback"] is True
    assert cli_json(url, "subscriptions", "update", sub["id"], "--org", org,
                    "--payg-fallback", "off", "--cycle-quota", "20")["cycle_quota"] == 20
    assert cli_json(url, "subscriptions", "show", sub["id"], "--org", org)[
        "payg_fallback"] is False
    assert len(cli_json(url, "subscriptions", "list", "--org", org)) == 1
    assert cli_json(url, "subscriptions", "cancel", sub["id"], "--org", org)["deleted"]

    gone = cli_json(url, "service-accounts", "delete", sa["id"], "--org", org)
    assert gone["disabled_keys"] == [sa_key["id"]]
    assert cli_json(url, "projects", "delete", prj["id"], "--org", org)["deleted"]
    removed = cli_json(url, "members", "remove", peter["id"], "--org", org)
    assert removed["disabled_keys"] == [adm["id"]]
    table = cli(url, "members", "list", "--org", org)
    assert table.returncode == 0 and "o@x.io" in table.stdout and "ROLE" in table.stdout


def test_errors_are_one_line(url: str):
    cli_json(url, "admin", "bootstrap")
    assert "no organization" in one_line_error(url, "projects", "list", "--org", "nope")
    assert "no member" in one_line_error(url, "members", "remove", "mem_nope")
    assert "already a member" in one_line_error(url, "members", "add", "--user", "owner")
    assert "at least one owner" in one_line_error(
        url, "members", "remove", cli_json(url, "members", "list")[0]["id"])
    assert "built-in default project" in one_line_error(url, "projects", "delete", "default")
    assert "no key" in one_line_error(url, "keys", "rotate", "key_nope")
    assert "give at least one" in one_line_error(url, "keys", "edit", "key_nope", code=2)
    assert "member" in one_line_error(url, "admin", "create-key", code=2)
    assert "scopes" in one_line_error(url, "keys", "create", "--type", "org", "--org",
                                      "default", "--scopes", "a:read", "--quota", "1",
                                      code=2)
    assert "ISO-8601" in one_line_error(url, "audit", "list", "--since", "later", code=2)
