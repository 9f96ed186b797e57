"""`sidecar keys create|list|show|disable|enable|delete|set-quota|rotate|edit`.

Every command is one ControlStore call as the operator, so a key made or changed here
gets the same checks and audit entries as through the admin API. Without --org,
--member or --service-account, `keys create` makes what the control plane keeps outside
any organization (standard and subscription keys) or, for `--type org`, a project key of
the built-in `default` organization; admin keys are always tied to a member of an
organization (`--org ORG --member ID`).
"""

from __future__ import annotations

import argparse

from ..schema.keys import KeyType
from ..schema.record import ALL
from ..schema.record import PERMISSIONS as _CODES
from .limits import add_limit_arguments, limit_request, register_for
from .output import control, plain
from .parsing import (
    UsageError,
    _csv,
    _non_negative,
    _positive_int,
    _quota_or_unlimited,
    _when,
    command,
    group,
)

TYPES = [t.value for t in KeyType]
PERMISSIONS = list(_CODES)              # the words, in the record's order


def register(sub, common: argparse.ArgumentParser) -> None:
    keys = group(sub, "keys", "manage API keys")
    _add_create(command(keys, "create", _create, _show_created, [common],
                        "create a key (printed once)"))
    lister = command(keys, "list", _list, plain, [common], "list keys")
    lister.add_argument("--type", choices=TYPES)
    lister.add_argument("--status", choices=["active", "disabled"])
    for action, run in (("show", _show), ("disable", _set_status), ("enable", _set_status),
                        ("delete", _delete)):
        command(keys, action, run, plain, [common], f"{action} a key by id").add_argument("id")
    setq = command(keys, "set-quota", _set_quota, plain, [common],
                   "set a key's remaining quota")
    setq.add_argument("id")
    setq.add_argument("quota", type=_quota_or_unlimited, help="units, or 'unlimited'")
    rot = command(keys, "rotate", _rotate, control, [common],
                  "rotate a key into a new one (printed once)")
    rot.add_argument("id")
    rot.add_argument("--grace", type=_non_negative, default=0,
                     help="seconds the old key keeps working (0: disabled at once)")
    rot.add_argument("--idempotency-key", help="repeat-safe: the same value returns the "
                                               "same new key id and mints nothing")
    _add_edit(command(keys, "edit", _edit, control, [common], "change a key's settings"))
    register_for(keys, "key", [common])


def _add_create(create: argparse.ArgumentParser) -> None:
    create.add_argument("--type", default="standard", choices=TYPES)
    create.add_argument("--name", default="")
    quota = create.add_mutually_exclusive_group()
    quota.add_argument("--quota", type=_non_negative, help="quota units (cycle quota for "
                                                           "subscription keys)")
    quota.add_argument("--unlimited", action="store_true")
    create.add_argument("--models", type=_csv, default=[])
    create.add_argument("--ips", type=_csv, default=[], help="allowed IPs / CIDRs")
    create.add_argument("--expires", type=_when, help="ISO-8601 expiry")
    create.add_argument("--rpm", type=_non_negative, default=0, help="requests per minute")
    create.add_argument("--tpm", type=_non_negative, default=0, help="tokens per minute")
    create.add_argument("--rpd", type=_non_negative, default=0, help="requests per day")
    create.add_argument("--tpd", type=_non_negative, default=0, help="tokens per day")
    add_limit_arguments(create)
    create.add_argument("--permission", default=ALL, choices=PERMISSIONS)
    create.add_argument("--scopes", type=_csv, default=[],
                        help="for restricted keys, e.g. chat.completions:write,models:read")
    create.add_argument("--project", help="org keys: owning project (default: default)")
    create.add_argument("--account", help="owning account (PAYG wallet)")
    create.add_argument("--cycle-days", type=_positive_int, default=30)
    create.add_argument("--payg-fallback", action="store_true",
                        help="subscription keys: spend the account balance when the cycle "
                             "quota is used up")
    create.add_argument("--quiet", "-q", action="store_true",
                        help="print the new key only (KEY=$(sidecar keys create ... -q))")
    create.add_argument("--org", help="organization id or name: checked org key")
    create.add_argument("--member", help="org keys: the owning member (a user key); "
                                         "admin keys: the member it is tied to")
    create.add_argument("--service-account", help="org keys: the owning service account")
    create.set_defaults(check=_check_create)


def _add_edit(edit: argparse.ArgumentParser) -> None:
    edit.add_argument("id")
    edit.add_argument("--name")
    edit.add_argument("--permission", choices=PERMISSIONS)
    edit.add_argument("--scopes", type=_csv)
    edit.add_argument("--models", type=_csv, help="'' clears the whitelist")
    edit.add_argument("--ips", type=_csv, help="'' clears the IP restriction")
    edit.add_argument("--rpm", type=_non_negative)
    edit.add_argument("--tpm", type=_non_negative)
    edit.add_argument("--rpd", type=_non_negative)
    edit.add_argument("--tpd", type=_non_negative)
    edit.add_argument("--expires", help="ISO-8601, or 'never'")
    edit.set_defaults(check=_check_edit)


# -- create ----------------------------------------------------------------------------

def _in_org(args: argparse.Namespace) -> bool:
    """--org, --member or --service-account: a key of a named organization."""
    return bool(args.org or args.member or args.service_account)


def _check_create(args: argparse.Namespace) -> None:
    """What the command line alone shows to be wrong, before any store is touched."""
    if args.type != "admin" and args.quota is None and not args.unlimited:
        # A key with no quota would be refused (402) from its very first call.
        raise UsageError("quota: give --quota N (units the key may spend) or --unlimited")
    if args.type == "admin" and not (args.org and args.member):
        raise UsageError("keys create --type admin: an admin key is tied to a member of an "
                         "organization: give --org ORG --member MEMBER_ID (the same as "
                         "`sidecar admin create-key --org ORG --member MEMBER_ID`)")
    if _in_org(args):
        if args.type == "subscription":
            raise UsageError("type: use `sidecar subscriptions create` for sk-sub- keys")
        if args.cycle_days != 30 or args.payg_fallback:
            raise UsageError("cycle-days: only subscription keys have a billing cycle")
        return
    if args.payg_fallback and args.type != "subscription":
        raise UsageError("payg-fallback: only for subscription keys")
    if args.payg_fallback and not args.account:
        raise UsageError("account: --payg-fallback needs the --account that pays")
    if args.project and args.type != "org":
        raise UsageError("project: only org keys belong to a project")


def _request(args: argparse.Namespace) -> dict:
    """The key's settings as the control plane (and the admin API) names them."""
    req = {"type": args.type, "name": args.name, "quota": args.quota,
           "unlimited": args.unlimited, "models": args.models, "allowed_ips": args.ips,
           "expires_at": args.expires, "rpm": args.rpm, "tpm": args.tpm,
           "rpd": args.rpd or None, "tpd": args.tpd or None, **limit_request(args),
           "permission": args.permission, "scopes": args.scopes, "project_id": args.project,
           "member_id": args.member, "service_account_id": args.service_account,
           "account": args.account}
    return {k: v for k, v in req.items() if v is not None}


async def _create(args: argparse.Namespace, store) -> dict:
    req = _request(args)
    if _in_org(args):
        org = await store.resolve_org(args.org or "default")
        view, plaintext = await store.create_key(org, req)
    elif args.type == "org":     # the built-in default organization and project
        view, plaintext = await store.create_key("default", {"project_id": "default",
                                                             **req})
    else:                        # standard and subscription keys outside any organization
        view, plaintext = await store.create_standalone_key(
            {**req, "cycle_days": args.cycle_days, "payg_fallback": args.payg_fallback})
    return {**view, "key": plaintext}


def _show_created(result: dict, args: argparse.Namespace) -> None:
    (control if _in_org(args) else plain)(result)


# -- read and change -------------------------------------------------------------------

async def _list(args: argparse.Namespace, store) -> list:
    return await store.all_keys(args.type, args.status)


async def _show(args: argparse.Namespace, store) -> dict:
    return {**await store.key(None, args.id),
            "limits": await store.key_limits(None, args.id)}


async def _set_status(args: argparse.Namespace, store) -> dict:
    return await store.set_key_status(None, args.id, args.action == "enable")


async def _delete(args: argparse.Namespace, store) -> dict:
    await store.delete_key(None, args.id)
    return {"id": args.id, "deleted": True}


async def _set_quota(args: argparse.Namespace, store) -> dict:
    if args.quota == "unlimited":   # parsed by parsing._quota_or_unlimited
        return await store.set_key_quota(None, args.id, unlimited=True)
    return await store.set_key_quota(None, args.id, set_to=args.quota)


async def _rotate(args: argparse.Namespace, store) -> dict:
    return await store.rotate_key(None, args.id, args.grace, args.idempotency_key)


async def _edit(args: argparse.Namespace, store) -> dict:
    from ..control.store import parse_when

    changes = _edited(args)
    if args.expires is not None:
        changes["expires_at"] = None if args.expires == "never" else parse_when(args.expires,
                                                                                "expires")
    return await store.edit_key(None, args.id, changes)


def _edited(args: argparse.Namespace) -> dict:
    """The settings `keys edit` changes, by the control plane's names (None: unchanged)."""
    return {name: getattr(args, attr) for name, attr in (
        ("name", "name"), ("permission", "permission"), ("scopes", "scopes"),
        ("models", "models"), ("allowed_ips", "ips"), ("rpm", "rpm"), ("tpm", "tpm"),
        ("rpd", "rpd"), ("tpd", "tpd"),
        ("expires_at", "expires")) if getattr(args, attr) is not None}


def _check_edit(args: argparse.Namespace) -> None:
    if not _edited(args):
        raise UsageError("edit: give at least one setting to change")
