"""`sidecar webhooks ...` (docs/webhooks.md): `dead-letters` and `replay EVENT_ID|--all`,
the deliveries that failed for a whole retry window and sending them again, each to its
one endpoint with the same webhook-id; `endpoints`, `add` and `remove`, an
organization's endpoints (the admin API's /webhooks, as the operator)."""

from __future__ import annotations

import argparse

from ..control.events import dead_letters, replay
from ..schema.events import valid_id
from ..schema.record import _iso
from .parsing import CliError, UsageError, _csv, _positive_int, command, group, org_option


def register(sub, common: argparse.ArgumentParser) -> None:
    hooks = group(sub, "webhooks", "webhook deliveries: dead letters and replays")
    listing = command(hooks, "dead-letters", _list, _show_letters, [common],
                      "deliveries that failed for their whole retry window, oldest first")
    listing.add_argument("--limit", type=_positive_int, default=1000)
    again = command(hooks, "replay", _replay, _show_replayed, [common],
                    "deliver dead letters again (the same event id) to their endpoint")
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("event_id", nargs="?", help="the event id (evt_...)")
    which.add_argument("--all", action="store_true", help="every dead letter")
    org = org_option()
    command(hooks, "endpoints", _endpoints, _show_endpoints, [common, org],
            "an organization's webhook endpoints")
    add = command(hooks, "add", _add, _show_endpoints, [common, org],
                  "add an organization endpoint (its secret is printed once)")
    add.add_argument("url", help="http:// or https://, no user:password")
    add.add_argument("--events", type=_csv, help="event types (default: all)")
    add.add_argument("--secret", help="whsec_<base64> (default: generated)")
    add.add_argument("--description", default="")
    remove = command(hooks, "remove", _remove, _show_endpoints, [common, org],
                     "delete an organization endpoint")
    remove.add_argument("id", help="the endpoint id (wh_...)")


def _view(letter: dict) -> dict:
    return {"event_id": letter["event_id"], "type": letter["type"],
            "endpoint": letter["endpoint"], "url": letter["url"],
            "attempts": letter["attempts"], "last_error": letter["last_error"],
            "dead_at": _iso(letter["dead_at_ms"]),
            "dead_letter_id": letter["dead_letter_id"]}


async def _list(args: argparse.Namespace, store) -> list[dict]:
    return [_view(d) for d in await dead_letters(store.redis, args.limit)]


async def _replay(args: argparse.Namespace, store) -> dict:
    if args.event_id is not None and not valid_id(args.event_id):
        raise UsageError(f"event-id: {args.event_id[:80]!r} is not an event id (evt_...)")
    done = await replay(store.redis, None if args.all else args.event_id)
    if args.event_id is not None and not done:
        raise CliError(f"event-id: no dead letter of event {args.event_id!r}")
    return {"replayed": [_view(d) for d in done]}


async def _endpoints(args: argparse.Namespace, store) -> list[dict]:
    return await store.list_webhooks(await store.resolve_org(args.org))


async def _add(args: argparse.Namespace, store) -> dict:
    req = {"url": args.url, "events": args.events, "description": args.description,
           "secret": args.secret}
    return await store.create_webhook(await store.resolve_org(args.org), req)


async def _remove(args: argparse.Namespace, store) -> dict:
    return await store.delete_webhook(await store.resolve_org(args.org), args.id)


def _show_endpoints(result, args: argparse.Namespace | None = None) -> None:
    if isinstance(result, list):
        print(f"{'ID':<22} {'EVENTS':<30} URL")
        for w in result:
            print(f"{w['id']:<22} {','.join(w['events']):<30} {w['url']}")
        return
    if result.get("deleted"):
        print(f"Deleted webhook endpoint {result['id']}.")
        return
    print(f"Added webhook endpoint {result['id']} for {result['url']}. Its signing secret "
          f"(shown once):\n\n  {result['secret']}\n")


def _show_letters(result: list[dict], args: argparse.Namespace | None = None) -> None:
    if not result:
        print("No dead letters.")
        return
    print(f"{'EVENT':<40} {'TYPE':<17} {'ATTEMPTS':>8}  {'DEAD AT':<24}  URL / LAST ERROR")
    for d in result:
        print(f"{d['event_id']:<40} {d['type'] or '-':<17} {d['attempts']:>8}  "
              f"{d['dead_at']:<24}  {d['url']}  ({d['last_error']})")


def _show_replayed(result: dict, args: argparse.Namespace | None = None) -> None:
    done = result["replayed"]
    print(f"{len(done)} dead letter(s) queued for delivery again"
          + "".join(f"\n  {d['event_id']} -> {d['url']}" for d in done))
