"""`sidecar audit list`: an organization's audit log, newest first."""

from __future__ import annotations

import argparse

from ..control.input_limits import DEFAULT_PAGE
from .output import control
from .parsing import _positive_int, _when, command, group, org_option


def register(sub, common: argparse.ArgumentParser) -> None:
    audit = group(sub, "audit", "the audit log")
    events = command(audit, "list", _list, control, [common, org_option()],
                     "audit events, newest first")
    events.add_argument("--action", help="e.g. key.rotated, or key.* for a prefix")
    events.add_argument("--actor", help="admin key id or member id")
    events.add_argument("--resource-type")
    events.add_argument("--resource-id")
    events.add_argument("--since", type=_when)
    events.add_argument("--until", type=_when)
    events.add_argument("--limit", type=_positive_int, default=DEFAULT_PAGE)


def _ms(when) -> int | None:
    return None if when is None else max(0, int(when.timestamp() * 1000))


async def _list(args: argparse.Namespace, store) -> list:
    events, _ = await store.audit.query(
        await store.resolve_org(args.org), action=args.action, actor_id=args.actor,
        resource_type=args.resource_type, resource_id=args.resource_id,
        since_ms=_ms(args.since), until_ms=_ms(args.until), limit=args.limit)
    return events
