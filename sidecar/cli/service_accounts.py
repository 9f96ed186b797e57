"""`sidecar service-accounts create|list|show|rename|delete`: a project's service
accounts."""

from __future__ import annotations

import argparse

from .output import control
from .parsing import command, group, org_option


def register(sub, common: argparse.ArgumentParser) -> None:
    sas = group(sub, "service-accounts", "project service accounts")
    parents = [common, org_option()]
    made = command(sas, "create", _create, control, parents, "create a service account")
    made.add_argument("name")
    made.add_argument("--project", required=True)
    command(sas, "list", _list, control, parents,
            "list service accounts").add_argument("--project")
    command(sas, "show", _show, control, parents, "show a service account").add_argument("id")
    rename = command(sas, "rename", _rename, control, parents, "rename a service account")
    rename.add_argument("id")
    rename.add_argument("name")
    command(sas, "delete", _delete, control, parents,
            "delete a service account (disables its keys)").add_argument("id")


async def _create(args: argparse.Namespace, store) -> dict:
    return await store.create_service_account(await store.resolve_org(args.org),
                                              args.project, args.name)


async def _list(args: argparse.Namespace, store) -> list:
    return await store.list_service_accounts(await store.resolve_org(args.org), args.project)


async def _show(args: argparse.Namespace, store) -> dict:
    return await store.service_account(await store.resolve_org(args.org), args.id)


async def _rename(args: argparse.Namespace, store) -> dict:
    return await store.update_service_account(await store.resolve_org(args.org), args.id,
                                              args.name)


async def _delete(args: argparse.Namespace, store) -> dict:
    return await store.delete_service_account(await store.resolve_org(args.org), args.id)
