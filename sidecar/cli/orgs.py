"""`sidecar orgs create|list|show|rename`: organizations (by id or name)."""

from __future__ import annotations

import argparse

from .limits import register_for
from .output import control
from .parsing import command, group


def register(sub, common: argparse.ArgumentParser) -> None:
    orgs = group(sub, "orgs", "organizations")
    command(orgs, "create", _create, control, [common],
            "create an organization").add_argument("name")
    command(orgs, "list", _list, control, [common], "list organizations")
    command(orgs, "show", _show, control, [common], "show an organization").add_argument("org")
    rename = command(orgs, "rename", _rename, control, [common], "rename an organization")
    rename.add_argument("org")
    rename.add_argument("name")
    register_for(orgs, "organization", [common])


async def _create(args: argparse.Namespace, store) -> dict:
    return await store.create_org(args.name)


async def _list(args: argparse.Namespace, store) -> list:
    return await store.list_orgs()


async def _show(args: argparse.Namespace, store) -> dict:
    org = await store.resolve_org(args.org)
    return {**await store.org(org), "limits": await store.org_limits(org)}


async def _rename(args: argparse.Namespace, store) -> dict:
    return await store.update_org(await store.resolve_org(args.org), args.name)
