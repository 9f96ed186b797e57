"""`sidecar projects create|list|show|rename|delete`: an organization's projects."""

from __future__ import annotations

import argparse

from .limits import register_for
from .output import control
from .parsing import command, group, org_option


def register(sub, common: argparse.ArgumentParser) -> None:
    projects = group(sub, "projects", "organization projects")
    parents = [common, org_option()]
    command(projects, "create", _create, control, parents,
            "create a project").add_argument("name")
    command(projects, "list", _list, control, parents, "list projects")
    command(projects, "show", _show, control, parents, "show a project").add_argument("id")
    rename = command(projects, "rename", _rename, control, parents, "rename a project")
    rename.add_argument("id")
    rename.add_argument("name")
    command(projects, "delete", _delete, control, parents, "delete a project (disables its "
            "keys, deletes its service accounts)").add_argument("id")
    register_for(projects, "project", parents)


async def _create(args: argparse.Namespace, store) -> dict:
    return await store.create_project(await store.resolve_org(args.org), args.name)


async def _list(args: argparse.Namespace, store) -> list:
    return await store.list_projects(await store.resolve_org(args.org))


async def _show(args: argparse.Namespace, store) -> dict:
    org = await store.resolve_org(args.org)
    return {**await store.project(org, args.id),
            "limits": await store.project_limits(org, args.id)}


async def _rename(args: argparse.Namespace, store) -> dict:
    return await store.update_project(await store.resolve_org(args.org), args.id, args.name)


async def _delete(args: argparse.Namespace, store) -> dict:
    return await store.delete_project(await store.resolve_org(args.org), args.id)
