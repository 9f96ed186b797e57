"""Budgets and concurrency limits from the CLI (control/limit_rules.py): the options
`keys create` shares, and `set-budget` / `set-limits` for keys, projects, members and
organizations. Amounts are decimal strings in the deployment's currency ("5.00"); the
control plane checks them, so a bad one is the same one-line error as from the API."""

from __future__ import annotations

import argparse

from ..schema.limits import OBSERVABLE, PERIODS
from .output import control
from .parsing import _csv, _non_negative, command

LEVELS = ("key", "project", "member", "organization")


def add_limit_arguments(p: argparse.ArgumentParser, budget_flag: bool = True) -> None:
    if budget_flag:
        p.add_argument("--budget", metavar="AMOUNT",
                       help='spend limit in money, e.g. "5.00" (0 removes it)')
    p.add_argument("--budget-period", choices=list(PERIODS),
                   help="total (default), day or month (calendar, budget_timezone)")
    p.add_argument("--max-concurrency", type=_non_negative, metavar="N",
                   help="calls in flight at most (0 removes the limit)")
    p.add_argument("--observe", type=_csv, metavar="LIST",
                   help="observe-only, never enforced: " + ",".join(OBSERVABLE)
                   + " ('' enforces all again)")


def limit_request(args: argparse.Namespace) -> dict:
    """The limits the options set, by the control plane's names (absent: unchanged)."""
    req = {"budget": getattr(args, "budget", None), "budget_period": args.budget_period,
           "max_concurrency": args.max_concurrency, "observe": args.observe}
    return {k: v for k, v in req.items() if v is not None}


def register_for(actions, level: str, parents: list) -> None:
    """`set-budget ID AMOUNT` and `set-limits ID [options]` in a command group."""
    what = "the organization" if level == "organization" else f"a {level}"
    target = "org" if level == "organization" else "id"
    budget = command(actions, "set-budget", _run(level), control, parents,
                     f"set {what}'s spend limit in money")
    budget.add_argument(target)
    budget.add_argument("budget", metavar="AMOUNT", help='e.g. "5.00"; 0 removes it')
    add_limit_arguments(budget, budget_flag=False)
    limits = command(actions, "set-limits", _run(level), control, parents,
                     f"set {what}'s budget, concurrency limit and observe-only limits")
    limits.add_argument(target)
    add_limit_arguments(limits)
    if level != "member":
        th = command(actions, "set-thresholds", _thresholds(level), control, parents,
                     f"set {what}'s alert thresholds (fractions of quota or budget left)")
        th.add_argument(target)
        th.add_argument("thresholds", metavar="LIST",
                        help="e.g. 0.5,0.1,0; 'default' (alert_thresholds) or 'none'")


def _run(level: str):
    async def run(args: argparse.Namespace, store) -> dict:
        req = limit_request(args)
        if level == "key":
            return await store.set_key_limits(None, args.id, req)
        org = await store.resolve_org(args.org)
        if level == "organization":
            return await store.set_org_limits(org, req)
        if level == "project":
            return await store.set_project_limits(org, args.id, req)
        return await store.set_member_limits(org, args.id, req)
    return run


def threshold_request(text: str) -> dict:
    """The API's body: a list the control plane checks, [] for none, null for default."""
    if text == "default":
        return {"thresholds": None}
    if text == "none":
        return {"thresholds": []}
    return {"thresholds": text}   # a text '0.5,0.1,0': parsed and checked there


def _thresholds(level: str):
    async def run(args: argparse.Namespace, store) -> dict:
        req = threshold_request(args.thresholds)
        if level == "key":
            return await store.set_key_thresholds(None, args.id, req)
        org = await store.resolve_org(args.org)
        if level == "organization":
            return await store.set_thresholds(org, "organization", org, req)
        return await store.set_thresholds(org, "project", args.id, req)
    return run
