"""`sidecar admin|orgs|members|projects|service-accounts|subscriptions|audit ...` and
`sidecar keys rotate|edit`: the control plane from the command line, straight on Redis.

Each command calls the same ControlStore as the admin API, as the operator (actor
`cli`, the root principal of the authority model in control/policy.py: allowed every
action, still bound by the invariants such as "an organization keeps an owner"), so the
checks, cascades and audit entries are the same. `--org` takes an
organization id or name (default: the built-in `default`). Errors are one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import orjson

# Columns shown by the human-readable list output, per kind of row.
_COLUMNS = {"organization": ("id", "name", "created_at"),
            "member": ("id", "user", "role", "name"),
            "project": ("id", "name", "created_at"),
            "service_account": ("id", "project_id", "name"),
            "subscription": ("id", "account", "plan", "key_id", "status", "cycle_remaining"),
            "audit_event": ("id", "time", "action", "resource", "actor")}


def add_admin_commands(sub, keys, common: argparse.ArgumentParser, accounts=None) -> None:
    """Register the control-plane commands on the `sidecar` parser (called by main.py)."""
    from .parsing import _csv, _non_negative, _Parser, _positive_int, _when

    org = _Parser(add_help=False)
    org.add_argument("--org", default="default", help="organization id or name")

    def group(name: str, text: str):
        return sub.add_parser(name, help=text).add_subparsers(
            dest="action", required=True, parser_class=_Parser)

    def command(parent, name: str, run: Callable, text: str, *, with_org: bool = True):
        p = parent.add_parser(name, parents=[common, org] if with_org else [common],
                              help=text)
        p.set_defaults(run_admin=_wrap(run))
        return p

    admin = group("admin", "first admin key, admin keys")
    boot = command(admin, "bootstrap", _bootstrap, "create the organization (if missing), "
                   "an owner member and the first admin key (printed once)", with_org=False)
    boot.add_argument("--org", help="organization name (default: the built-in default)")
    boot.add_argument("--user", default="owner", help="the owner's user name or e-mail")
    made = command(admin, "create-key", _admin_key, "create an admin key tied to a member")
    made.add_argument("--member", required=True, help="member id the key is tied to")
    made.add_argument("--name", default="")
    made.add_argument("--permission", default="all", choices=["all", "restricted",
                                                              "read-only"])
    made.add_argument("--scopes", type=_csv, default=[], help="e.g. keys:read,audit:read")
    made.add_argument("--expires", type=_when)

    orgs = group("orgs", "organizations")
    command(orgs, "create", _org_create, "create an organization",
            with_org=False).add_argument("name")
    command(orgs, "list", _org_list, "list organizations", with_org=False)
    command(orgs, "show", _org_show, "show an organization", with_org=False).add_argument("org")
    rename = command(orgs, "rename", _org_rename, "rename an organization", with_org=False)
    rename.add_argument("org")
    rename.add_argument("name")

    members = group("members", "organization members and roles")
    add = command(members, "add", _member_add, "add a member")
    add.add_argument("--user", required=True)
    add.add_argument("--role", default="member", choices=["owner", "admin", "member"])
    add.add_argument("--name", default="")
    command(members, "list", _member_list, "list members").add_argument(
        "--role", choices=["owner", "admin", "member"])
    command(members, "show", _member_show, "show a member").add_argument("id")
    upd = command(members, "update", _member_update, "change a member's role or name")
    upd.add_argument("id")
    upd.add_argument("--role", choices=["owner", "admin", "member"])
    upd.add_argument("--name")
    command(members, "remove", _member_remove, "remove a member (disables their user keys "
            "and admin keys)").add_argument("id")

    projects = group("projects", "organization projects")
    command(projects, "create", _project_create, "create a project").add_argument("name")
    command(projects, "list", _project_list, "list projects")
    command(projects, "show", _project_show, "show a project").add_argument("id")
    prn = command(projects, "rename", _project_rename, "rename a project")
    prn.add_argument("id")
    prn.add_argument("name")
    command(projects, "delete", _project_delete, "delete a project (disables its keys, "
            "deletes its service accounts)").add_argument("id")

    sas = group("service-accounts", "project service accounts")
    sac = command(sas, "create", _sa_create, "create a service account")
    sac.add_argument("name")
    sac.add_argument("--project", required=True)
    command(sas, "list", _sa_list, "list service accounts").add_argument("--project")
    command(sas, "show", _sa_show, "show a service account").add_argument("id")
    srn = command(sas, "rename", _sa_rename, "rename a service account")
    srn.add_argument("id")
    srn.add_argument("name")
    command(sas, "delete", _sa_delete, "delete a service account (disables its keys)"
            ).add_argument("id")

    subs = group("subscriptions", "subscription plans and their sk-sub- keys")
    sc = command(subs, "create", _sub_create, "start a subscription (its key printed once)")
    sc.add_argument("--account", required=True)
    sc.add_argument("--plan", required=True)
    sc.add_argument("--cycle-quota", type=_non_negative, required=True)
    sc.add_argument("--cycle-days", type=_positive_int, default=30)
    sc.add_argument("--payg-fallback", action="store_true")
    command(subs, "list", _sub_list, "list subscriptions")
    command(subs, "show", _sub_show, "show a subscription").add_argument("id")
    su = command(subs, "update", _sub_update, "change plan, cycle quota, PAYG fallback")
    su.add_argument("id")
    su.add_argument("--plan")
    su.add_argument("--cycle-quota", type=_non_negative)
    su.add_argument("--payg-fallback", choices=["on", "off"])
    command(subs, "cancel", _sub_cancel, "cancel (disables its key)").add_argument("id")

    audit = group("audit", "the audit log")
    al = command(audit, "list", _audit_list, "audit events, newest first")
    al.add_argument("--action", help="e.g. key.rotated, or key.* for a prefix")
    al.add_argument("--actor", help="admin key id or member id")
    al.add_argument("--resource-type")
    al.add_argument("--resource-id")
    al.add_argument("--since", type=_when)
    al.add_argument("--until", type=_when)
    al.add_argument("--limit", type=_positive_int, default=100)

    rot = command(keys, "rotate", _key_rotate, "rotate a key into a new one (printed once)",
                  with_org=False)
    rot.add_argument("id")
    rot.add_argument("--grace", type=_non_negative, default=0,
                     help="seconds the old key keeps working (0: disabled at once)")
    rot.add_argument("--idempotency-key", help="repeat-safe: the same value returns the "
                                               "same new key id and mints nothing")
    edit = command(keys, "edit", _key_edit, "change a key's settings", with_org=False)
    edit.add_argument("id")
    edit.add_argument("--name")
    edit.add_argument("--permission", choices=["all", "restricted", "read-only"])
    edit.add_argument("--scopes", type=_csv)
    edit.add_argument("--models", type=_csv, help="'' clears the whitelist")
    edit.add_argument("--ips", type=_csv, help="'' clears the IP restriction")
    edit.add_argument("--rpm", type=_non_negative)
    edit.add_argument("--tpm", type=_non_negative)
    edit.add_argument("--expires", help="ISO-8601, or 'never'")

    # `keys create` for an organization's owners: --org with --project, --member or
    # --service-account takes the control-plane path (checks + audit); without them the
    # plain path in main.py is unchanged. Admin keys always take the control-plane path:
    # each is tied to a member and audited, so --org and --member are required.
    create = keys.choices["create"]
    create.add_argument("--org", help="organization id or name: checked org key")
    create.add_argument("--member", help="org keys: the owning member (a user key); "
                                         "admin keys: the member it is tied to")
    create.add_argument("--service-account", help="org keys: the owning service account")
    create.set_defaults(run_admin=_wrap(_key_create), usage_error=create.error)
    # An organization's billing accounts are its own (another org's "acme" is another
    # wallet): --org picks the organization; without it, a standalone account.
    for action in ("set-balance", "show") if accounts is not None else ():
        acct = accounts.choices[action]
        acct.add_argument("--org", help="organization id or name: its own billing account "
                                        "(default: a standalone account)")
        acct.set_defaults(run_admin=_wrap(_account, own_output=False))
    # Key changes go through the control plane too, so they land in the audit log; the
    # answers keep main.py's shapes and printing.
    for action in ("disable", "enable", "delete", "set-quota"):
        keys.choices[action].set_defaults(run_admin=_wrap(_key_change, own_output=False))


def _wrap(run: Callable, own_output: bool = True) -> Callable:
    """ControlStore from the CLI's KeyStore; control errors become one-line CLI errors.
    A handled result is printed by _show (None: main.py's own path goes on)."""
    async def call(args: argparse.Namespace, keystore):
        from ..control.errors import ControlError
        from ..control.store import ControlStore
        from .parsing import CliError, UsageError

        store = ControlStore(keystore.redis, keystore.hasher)
        try:
            result = await run(args, store)
        except ControlError as exc:   # a 400 is a bad command line; the rest failed
            raise (UsageError if exc.status == 400 else CliError)(exc.message) from None
        if result is not None and own_output:
            args.print_admin = _show
        return result
    return call


async def _org_id(args, store) -> str:
    return await store.resolve_org(args.org)


# -- handlers (args, ControlStore) -> result --------------------------------------------

async def _bootstrap(args, store):
    return await store.bootstrap(args.org, args.user)


async def _admin_key(args, store):
    req = {"type": "admin", "name": args.name, "member_id": args.member,
           "permission": args.permission, "scopes": args.scopes, "expires_at": args.expires}
    view, plaintext = await store.create_key(await _org_id(args, store), req)
    return {**view, "key": plaintext}


async def _org_create(args, store):
    return await store.create_org(args.name)


async def _org_list(args, store):
    return await store.list_orgs()


async def _org_show(args, store):
    return await store.org(await store.resolve_org(args.org))


async def _org_rename(args, store):
    return await store.update_org(await store.resolve_org(args.org), args.name)


async def _member_add(args, store):
    return await store.add_member(await _org_id(args, store), args.user, args.role, args.name)


async def _member_list(args, store):
    return await store.list_members(await _org_id(args, store), args.role)


async def _member_show(args, store):
    return await store.member(await _org_id(args, store), args.id)


async def _member_update(args, store):
    changes = {k: v for k, v in (("role", args.role), ("name", args.name)) if v is not None}
    return await store.update_member(await _org_id(args, store), args.id, changes)


async def _member_remove(args, store):
    return await store.remove_member(await _org_id(args, store), args.id)


async def _project_create(args, store):
    return await store.create_project(await _org_id(args, store), args.name)


async def _project_list(args, store):
    return await store.list_projects(await _org_id(args, store))


async def _project_show(args, store):
    return await store.project(await _org_id(args, store), args.id)


async def _project_rename(args, store):
    return await store.update_project(await _org_id(args, store), args.id, args.name)


async def _project_delete(args, store):
    return await store.delete_project(await _org_id(args, store), args.id)


async def _sa_create(args, store):
    return await store.create_service_account(await _org_id(args, store), args.project,
                                              args.name)


async def _sa_list(args, store):
    return await store.list_service_accounts(await _org_id(args, store), args.project)


async def _sa_show(args, store):
    return await store.service_account(await _org_id(args, store), args.id)


async def _sa_rename(args, store):
    return await store.update_service_account(await _org_id(args, store), args.id, args.name)


async def _sa_delete(args, store):
    return await store.delete_service_account(await _org_id(args, store), args.id)


async def _sub_create(args, store):
    req = {"account": args.account, "plan": args.plan, "cycle_quota": args.cycle_quota,
           "cycle_days": args.cycle_days, "payg_fallback": args.payg_fallback}
    sub, plaintext = await store.create_subscription(await _org_id(args, store), req)
    return {**sub, "key": plaintext}


async def _sub_list(args, store):
    return await store.list_subscriptions(await _org_id(args, store))


async def _sub_show(args, store):
    return await store.subscription(await _org_id(args, store), args.id)


async def _sub_update(args, store):
    changes = {"plan": args.plan, "cycle_quota": args.cycle_quota,
               "payg_fallback": None if args.payg_fallback is None
               else args.payg_fallback == "on"}
    return await store.update_subscription(await _org_id(args, store), args.id,
                                           {k: v for k, v in changes.items() if v is not None})


async def _sub_cancel(args, store):
    return await store.cancel_subscription(await _org_id(args, store), args.id)


async def _audit_list(args, store):
    def ms(when):
        return None if when is None else max(0, int(when.timestamp() * 1000))
    events, _ = await store.audit.query(
        await _org_id(args, store), action=args.action, actor_id=args.actor,
        resource_type=args.resource_type, resource_id=args.resource_id,
        since_ms=ms(args.since), until_ms=ms(args.until), limit=args.limit)
    return events


async def _account(args, store):
    if not args.org:
        return None                     # a standalone account: main.py's plain path
    org = await store.resolve_org(args.org)
    if args.action == "set-balance":
        return await store.set_account_balance(org, args.account, args.units)
    return await store.account(org, args.account)


async def _key_rotate(args, store):
    return await store.rotate_key(None, args.id, args.grace, args.idempotency_key)


async def _key_edit(args, store):
    from ..control.errors import Invalid
    from ..control.store import parse_when

    changes = {name: getattr(args, attr) for name, attr in (
        ("name", "name"), ("permission", "permission"), ("scopes", "scopes"),
        ("models", "models"), ("allowed_ips", "ips"), ("rpm", "rpm"), ("tpm", "tpm"))
        if getattr(args, attr) is not None}
    if args.expires is not None:
        changes["expires_at"] = None if args.expires == "never" else parse_when(args.expires,
                                                                                "expires")
    if not changes:
        raise Invalid("edit: give at least one setting to change")
    return await store.edit_key(None, args.id, changes)


async def _key_change(args, store):
    if args.action == "delete":
        await store.delete_key(None, args.id)
        return {"id": args.id, "deleted": True}
    if args.action in ("disable", "enable"):
        return await store.set_key_status(None, args.id, args.action == "enable")
    if args.quota == "unlimited":   # parsed by cli._quota_or_unlimited
        return await store.set_key_quota(None, args.id, unlimited=True)
    return await store.set_key_quota(None, args.id, set_to=args.quota)


async def _key_create(args, store):
    if args.type == "admin" and not (args.org and args.member):
        args.usage_error("keys create --type admin: an admin key is tied to a member of an "
                         "organization: give --org ORG --member MEMBER_ID (the same as "
                         "`sidecar admin create-key --org ORG --member MEMBER_ID`)")
    if not (args.org or args.member or args.service_account):
        return None                     # the plain `keys create` of main.py
    from ..control.errors import Conflicting
    if args.type == "subscription":
        raise Conflicting("type: use `sidecar subscriptions create` for sk-sub- keys")
    if args.cycle_days != 30 or args.payg_fallback:
        raise Conflicting("cycle-days: only subscription keys have a billing cycle")
    req = {"type": args.type, "name": args.name, "quota": args.quota,
           "unlimited": args.unlimited, "models": args.models, "allowed_ips": args.ips,
           "expires_at": args.expires, "rpm": args.rpm, "tpm": args.tpm,
           "permission": args.permission, "scopes": args.scopes, "project_id": args.project,
           "member_id": args.member, "service_account_id": args.service_account,
           "account": args.account}
    view, plaintext = await store.create_key(await store.resolve_org(args.org or "default"),
                                             {k: v for k, v in req.items() if v is not None})
    return {**view, "key": plaintext}


# -- output -----------------------------------------------------------------------------

def _show(result) -> None:
    """Human output of a control-plane result (--json is printed by main.py)."""
    if isinstance(result, list):
        _table(result)
        return
    if result.get("changed") is False:   # admin bootstrap, run again
        from .parsing import command_name
        org, key = result["organization"], result["admin_key"]
        again = f"{command_name()} admin create-key --org {org['id']}"
        if key.get("member_id"):
            again += f" --member {key['member_id']}"
        print(f"Organization {org['name']} already has an active admin key ({key['id']}): "
              f"nothing changed. Another admin key: {again}")
        return
    if result.get("key"):
        kind = result.get("type") or result.get("admin_key", {}).get("type") or "new"
        ident = result.get("key_id") or result.get("admin_key", {}).get("id") or result["id"]
        print(f"Created {kind} key {ident}. Store it now; it is not shown again:\n\n"
              f"  {result['key']}\n")
    for name, value in result.items():
        if name != "key":
            text = value if not isinstance(value, dict | list) else orjson.dumps(value).decode()
            print(f"{name:>20}: {text}")


def _table(rows: list[dict]) -> None:
    if not rows:
        print("(none)")
        return
    columns = _COLUMNS.get(rows[0].get("object", ""), tuple(rows[0])[:5])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def _cell(value) -> str:
    if isinstance(value, dict):
        return "/".join(str(v) for v in value.values() if v)
    return "" if value is None else str(value)
