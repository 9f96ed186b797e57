"""`sidecar members add|list|show|update|remove`: an organization's members and roles."""

from __future__ import annotations

import argparse

from .limits import register_for
from .output import control
from .parsing import command, group, org_option

ROLES = ["owner", "admin", "member"]


def register(sub, common: argparse.ArgumentParser) -> None:
    members = group(sub, "members", "organization members and roles")
    parents = [common, org_option()]
    add = command(members, "add", _add, control, parents, "add a member")
    add.add_argument("--user", required=True)
    add.add_argument("--role", default="member", choices=ROLES)
    add.add_argument("--name", default="")
    command(members, "list", _list, control, parents, "list members").add_argument(
        "--role", choices=ROLES)
    command(members, "show", _show, control, parents, "show a member").add_argument("id")
    upd = command(members, "update", _update, control, parents,
                  "change a member's role or name")
    upd.add_argument("id")
    upd.add_argument("--role", choices=ROLES)
    upd.add_argument("--name")
    command(members, "remove", _remove, control, parents, "remove a member (disables "
            "their user keys and admin keys)").add_argument("id")
    register_for(members, "member", parents)


async def _add(args: argparse.Namespace, store) -> dict:
    return await store.add_member(await store.resolve_org(args.org), args.user, args.role,
                                  args.name)


async def _list(args: argparse.Namespace, store) -> list:
    return await store.list_members(await store.resolve_org(args.org), args.role)


async def _show(args: argparse.Namespace, store) -> dict:
    return await store.member(await store.resolve_org(args.org), args.id)


async def _update(args: argparse.Namespace, store) -> dict:
    changes = {k: v for k, v in (("role", args.role), ("name", args.name)) if v is not None}
    return await store.update_member(await store.resolve_org(args.org), args.id, changes)


async def _remove(args: argparse.Namespace, store) -> dict:
    return await store.remove_member(await store.resolve_org(args.org), args.id)
