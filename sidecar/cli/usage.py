"""`sidecar usage keys|projects|orgs ID [--since DATE] [--json] [--org ORG]`: the usage
history of a key, a project or an organization (control/usage.py): requests, tokens and
spend per day, and per hour for the last 48 h."""

from __future__ import annotations

import argparse

from .parsing import command, group, org_option


def register(sub, common: argparse.ArgumentParser) -> None:
    usage = group(sub, "usage", "usage history: requests, tokens and spend")
    for name, run, text in (("keys", _key, "a key's usage"),
                            ("projects", _project, "a project's usage (its keys)"),
                            ("orgs", _org, "an organization's usage (its keys)")):
        parents = [common, org_option()] if name == "projects" else [common]
        p = command(usage, name, run, show, parents, text)
        if name == "keys":
            p.add_argument("--org", help="only if the key is this organization's "
                           "(id or name)")
        p.add_argument("id", metavar="ORG" if name == "orgs" else "ID")
        p.add_argument("--since", metavar="DATE", help="first day, YYYY-MM-DD (default: "
                       "as far back as usage_retention_days keeps)")


async def _key(args: argparse.Namespace, store) -> dict:
    # --org given: the key must be that organization's (else not found), as in the API
    org = None if args.org is None else await store.resolve_org(args.org)
    return await store.usage_of_key(org, args.id, args.since)


async def _project(args: argparse.Namespace, store) -> dict:
    org = await store.resolve_org(args.org)
    return await store.usage_of(org, "project", args.id, args.since)


async def _org(args: argparse.Namespace, store) -> dict:
    org = await store.resolve_org(args.id)
    return await store.usage_of(org, "organization", org, args.since)


def show(result: dict, args: argparse.Namespace | None = None) -> None:
    """A line per day with usage, the total, then the last 48 h by hour."""
    total = result["total"]
    print(f"since {result['since']}: {total['requests']} requests, {total['tokens']} "
          f"tokens, {total['spend']} spent")
    for title, rows, when in (("daily", result["daily"], "date"),
                              ("hourly (48 h)", result["hourly"], "hour")):
        if rows:
            print(f"\n{title}:")
            print(f"  {'when':<21} {'requests':>9} {'tokens':>12} {'spend':>12}")
            for r in rows:
                print(f"  {r[when]:<21} {r['requests']:>9} {r['tokens']:>12} "
                      f"{r['spend']:>12}")
