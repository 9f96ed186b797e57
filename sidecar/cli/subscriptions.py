"""`sidecar subscriptions create|list|show|update|cancel`: subscription plans and their
sk-sub- keys."""

from __future__ import annotations

import argparse

from .output import control
from .parsing import _non_negative, _positive_int, command, group, org_option


def register(sub, common: argparse.ArgumentParser) -> None:
    subs = group(sub, "subscriptions", "subscription plans and their sk-sub- keys")
    parents = [common, org_option()]
    made = command(subs, "create", _create, control, parents,
                   "start a subscription (its key printed once)")
    made.add_argument("--account", required=True)
    made.add_argument("--plan", required=True)
    made.add_argument("--cycle-quota", type=_non_negative, required=True)
    made.add_argument("--cycle-days", type=_positive_int, default=30)
    made.add_argument("--payg-fallback", action="store_true")
    command(subs, "list", _list, control, parents, "list subscriptions")
    command(subs, "show", _show, control, parents, "show a subscription").add_argument("id")
    upd = command(subs, "update", _update, control, parents,
                  "change plan, cycle quota, PAYG fallback")
    upd.add_argument("id")
    upd.add_argument("--plan")
    upd.add_argument("--cycle-quota", type=_non_negative)
    upd.add_argument("--payg-fallback", choices=["on", "off"])
    command(subs, "cancel", _cancel, control, parents,
            "cancel (disables its key)").add_argument("id")


async def _create(args: argparse.Namespace, store) -> dict:
    req = {"account": args.account, "plan": args.plan, "cycle_quota": args.cycle_quota,
           "cycle_days": args.cycle_days, "payg_fallback": args.payg_fallback}
    made, plaintext = await store.create_subscription(await store.resolve_org(args.org), req)
    return {**made, "key": plaintext}


async def _list(args: argparse.Namespace, store) -> list:
    return await store.list_subscriptions(await store.resolve_org(args.org))


async def _show(args: argparse.Namespace, store) -> dict:
    return await store.subscription(await store.resolve_org(args.org), args.id)


async def _update(args: argparse.Namespace, store) -> dict:
    changes = {"plan": args.plan, "cycle_quota": args.cycle_quota,
               "payg_fallback": None if args.payg_fallback is None
               else args.payg_fallback == "on"}
    return await store.update_subscription(await store.resolve_org(args.org), args.id,
                                           {k: v for k, v in changes.items() if v is not None})


async def _cancel(args: argparse.Namespace, store) -> dict:
    return await store.cancel_subscription(await store.resolve_org(args.org), args.id)
