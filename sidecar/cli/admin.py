"""`sidecar admin bootstrap|create-key`: the first admin key, and admin keys tied to a
member of an organization."""

from __future__ import annotations

import argparse

from ..schema.record import ALL, PERMISSIONS
from .output import control
from .parsing import _csv, _when, command, group, org_option


def register(sub, common: argparse.ArgumentParser) -> None:
    admin = group(sub, "admin", "first admin key, admin keys")
    boot = command(admin, "bootstrap", _bootstrap, control, [common],
                   "create the organization (if missing), an owner member and the first "
                   "admin key (printed once)")
    boot.add_argument("--org", help="organization name (default: the built-in default)")
    boot.add_argument("--user", default="owner", help="the owner's user name or e-mail")
    made = command(admin, "create-key", _create_key, control, [common, org_option()],
                   "create an admin key tied to a member")
    made.add_argument("--member", required=True, help="member id the key is tied to")
    made.add_argument("--name", default="")
    made.add_argument("--permission", default=ALL, choices=list(PERMISSIONS))
    made.add_argument("--scopes", type=_csv, default=[], help="e.g. keys:read,audit:read")
    made.add_argument("--expires", type=_when)


async def _bootstrap(args: argparse.Namespace, store) -> dict:
    return await store.bootstrap(args.org, args.user)


async def _create_key(args: argparse.Namespace, store) -> dict:
    req = {"type": "admin", "name": args.name, "member_id": args.member,
           "permission": args.permission, "scopes": args.scopes, "expires_at": args.expires}
    view, plaintext = await store.create_key(await store.resolve_org(args.org), req)
    return {**view, "key": plaintext}
