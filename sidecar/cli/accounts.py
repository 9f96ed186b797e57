"""`sidecar accounts set-balance|show`: PAYG balances.

An organization's billing accounts are its own (another org's "acme" is another
wallet): --org picks the organization; without it, a standalone account (the wallet of
keys outside any organization).
"""

from __future__ import annotations

import argparse

from .output import plain
from .parsing import _non_negative, command, group

ORG_HELP = "organization id or name: its own billing account (default: a standalone account)"


def register(sub, common: argparse.ArgumentParser) -> None:
    accounts = group(sub, "accounts", "PAYG balances")
    bal = command(accounts, "set-balance", _set_balance, plain, [common])
    bal.add_argument("account")
    bal.add_argument("units", type=_non_negative)
    bal.add_argument("--org", help=ORG_HELP)
    show = command(accounts, "show", _show, plain, [common])
    show.add_argument("account")
    show.add_argument("--org", help=ORG_HELP)


async def _set_balance(args: argparse.Namespace, store) -> dict:
    org = await store.resolve_org(args.org) if args.org else None
    return _shaped(await store.set_account_balance(org, args.account, args.units), org)


async def _show(args: argparse.Namespace, store) -> dict:
    org = await store.resolve_org(args.org) if args.org else None
    return _shaped(await store.account(org, args.account), org)


def _shaped(account: dict, org: str | None) -> dict:
    """A standalone account reads as it always has: its name and balance."""
    return account if org else {"account": account["account"], "balance": account["balance"]}
