"""`sidecar` command line: serve, and key management straight on Redis.

Every failure is one line on stderr (`sidecar: error: ...`) and a non-zero exit, never a
traceback: 2 for bad arguments or configuration, 1 for a failed operation.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

import orjson

from .config import ConfigError, Settings, load_settings, with_overrides


class CliError(Exception):
    """A one-line error for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + line
        print(f"sidecar: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _when(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 date") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sidecar", description="API-key auth sidecar for LLM gateways")
    parser.add_argument("--config", help="YAML settings file (default config/sidecar.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the data-plane and admin listeners")
    serve.add_argument("--config", dest="config_sub")
    serve.add_argument("--workers", type=_positive_int)
    serve.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)

    fallback = sub.add_parser("fallback", help="serve the JSON errors a proxy shows while "
                                               "the sidecar is down (Traefik)")
    fallback.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--config", dest="config_sub")

    create = keys.add_parser("create", parents=[common], help="create a key (printed once)")
    create.add_argument("--type", default="standard",
                        choices=["standard", "subscription", "org", "admin"])
    create.add_argument("--name", default="")
    quota = create.add_mutually_exclusive_group()
    quota.add_argument("--quota", type=_non_negative, help="quota units (cycle quota for "
                                                           "subscription keys)")
    quota.add_argument("--unlimited", action="store_true")
    create.add_argument("--models", type=_csv, default=[])
    create.add_argument("--ips", type=_csv, default=[], help="allowed IPs / CIDRs")
    create.add_argument("--expires", type=_when, help="ISO-8601 expiry")
    create.add_argument("--rpm", type=_non_negative, default=0, help="requests per minute")
    create.add_argument("--tpm", type=_non_negative, default=0, help="tokens per minute")
    create.add_argument("--permission", default="all", choices=["all", "restricted",
                                                                "read-only"])
    create.add_argument("--scopes", type=_csv, default=[],
                        help="for restricted keys, e.g. chat.completions:write,models:read")
    create.add_argument("--project", help="org keys: owning project (default: default)")
    create.add_argument("--account", help="owning account (PAYG wallet)")
    create.add_argument("--cycle-days", type=_positive_int, default=30)
    create.add_argument("--payg-fallback", action="store_true",
                        help="subscription keys: spend the account balance when the cycle "
                             "quota is used up")

    for action, text in (("list", "list keys"),):
        lister = keys.add_parser(action, parents=[common], help=text)
        lister.add_argument("--type", choices=["standard", "subscription", "org", "admin"])
        lister.add_argument("--status", choices=["active", "disabled"])
    for action in ("show", "disable", "enable", "delete"):
        p = keys.add_parser(action, parents=[common], help=f"{action} a key by id")
        p.add_argument("id")
    setq = keys.add_parser("set-quota", parents=[common], help="set a key's remaining quota")
    setq.add_argument("id")
    setq.add_argument("quota", help="units, or 'unlimited'")

    accounts = sub.add_parser("accounts", help="PAYG balances").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    bal = accounts.add_parser("set-balance", parents=[common])
    bal.add_argument("account")
    bal.add_argument("units", type=_non_negative)
    show = accounts.add_parser("show", parents=[common])
    show.add_argument("account")
    from .cli_admin import add_admin_commands  # orgs, members, projects, ... (cli_admin.py)
    add_admin_commands(sub, keys, common, accounts)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fallback":   # no settings: it must run where the sidecar's don't
            return _fallback(args)
        settings = load_settings(getattr(args, "config_sub", None) or args.config)
        if args.command == "serve":
            return _serve(args, settings)
        return asyncio.run(_manage(args, settings))
    except ConfigError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _fallback(args: argparse.Namespace) -> int:
    from . import fallback
    from .config import parse_hostport
    from .server import _run_loop

    host, port = parse_hostport(args.listen, "--listen")
    try:
        _run_loop(fallback.run(host, port))
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from . import logs, server
    from .embedded import resolve

    if args.workers:
        settings = with_overrides(settings, workers=args.workers)
    logs.setup(settings.log_level)
    server.require_grpc(settings)
    if args.worker_process:  # started by a supervising `serve --workers N`
        server._run_loop(server.run(settings, data=True, admin=False))
        return 0
    server.prepare_multiprocess_metrics(settings.workers)
    settings, embedded = resolve(settings)
    if embedded is not None:
        logs.event("embedded_redis", socket=embedded.url, state_dir=str(embedded.dir),
                   note="no redis_url set: using a private redis-server with AOF on")
        print(f"sidecar: embedded Redis at {embedded.url}. Make a first key in another "
              f"shell:\n  sidecar keys create --name first --quota 1000\nthen try:\n"
              f"  curl -i -H 'Authorization: Bearer <key>' "
              f"http://{settings.listen}/authz/v1/models", file=sys.stderr, flush=True)
    return server.serve(settings, embedded, getattr(args, "config_sub", None) or args.config)


async def _manage(args: argparse.Namespace, settings: Settings) -> int:
    from redis.exceptions import RedisError

    from .embedded import resolve
    from .keys import KeyHasher
    from .store.keystore import InvalidKeySpec, KeyError_, KeyStore
    from .store.runner import control_client

    settings, started = resolve(settings)
    client = control_client(settings.redis_url, settings.redis_timeout_ms / 1000 * 8,
                            settings.redis_pool_size)
    store = KeyStore(client, KeyHasher(settings.key_pepper))
    try:
        result = await _run_action(args, store)
    except InvalidKeySpec as exc:
        raise CliError(str(exc)) from None
    except KeyError_ as exc:
        raise CliError(str(exc).strip('"')) from None
    except (RedisError, OSError) as exc:
        from .config import mask_url
        raise CliError(f"cannot reach Redis at {mask_url(settings.redis_url)}: "
                       f"{exc or type(exc).__name__}") from None
    finally:
        await client.aclose()
        if started is not None:
            started.stop()
    _print(result, args)
    return 0


async def _run_action(args: argparse.Namespace, store):
    from .keys import KeyType
    from .store.keystore import InvalidKeySpec, KeySpec

    if getattr(args, "run_admin", None):  # control-plane commands (cli_admin.py)
        result = await args.run_admin(args, store)
        if result is not None:
            return result
    if args.command == "accounts":
        if args.action == "set-balance":
            return {"account": args.account,
                    "balance": await store.set_balance(args.account, args.units)}
        return {"account": args.account, "balance": await store.balance(args.account)}

    action = args.action
    if action == "create":
        typ = KeyType(args.type)
        if args.payg_fallback and typ is not KeyType.subscription:
            raise InvalidKeySpec("payg-fallback: only for subscription keys")
        if args.payg_fallback and not args.account:
            raise InvalidKeySpec("account: --payg-fallback needs the --account that pays")
        if args.project and typ is not KeyType.org:
            raise InvalidKeySpec("project: only org keys belong to a project")
        spec = KeySpec(type=typ, name=args.name, quota=args.quota, unlimited=args.unlimited,
                       models=args.models, ips=args.ips, expires_at=args.expires,
                       rpm=args.rpm, tpm=args.tpm, permission=args.permission,
                       scopes=args.scopes, account=args.account, cycle_days=args.cycle_days,
                       payg_fallback=args.payg_fallback)
        if typ is KeyType.org:      # admin keys never get here (cli_admin.py: a member)
            spec.org = "default"
            spec.project = args.project or "default"
        view, plaintext = await store.create(spec)
        return {**view, "key": plaintext}
    if action == "list":
        views, cursor = [], 0
        while True:
            page, cursor = await store.list(args.type, args.status, cursor=cursor, limit=500)
            views.extend(page)
            if not cursor:
                return views
    if action == "show":
        return await store.get(args.id)
    if action in ("disable", "enable"):
        return await store.set_status(args.id, action == "enable", reason="disabled by cli")
    if action == "delete":
        await store.delete(args.id)
        return {"id": args.id, "deleted": True}
    if action == "set-quota":
        if args.quota == "unlimited":
            return await store.set_quota(args.id, None)
        try:
            quota = int(args.quota)
        except ValueError:
            raise InvalidKeySpec(f"quota: {args.quota!r} is not a whole number or "
                                 "'unlimited'") from None
        if quota < 0:
            raise InvalidKeySpec(f"quota: {quota} is negative")
        return await store.set_quota(args.id, quota)
    raise CliError(f"unknown action {action}")  # pragma: no cover - argparse restricts


def _print(result, args: argparse.Namespace) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if getattr(args, "print_admin", None):
        return args.print_admin(result)
    if isinstance(result, list):
        print(f"{'ID':<22} {'TYPE':<13} {'STATUS':<9} {'REMAINING':>10} {'USED':>8}  NAME")
        for v in result:
            remaining = "unlimited" if v["unlimited"] else v["quota_remaining"]
            print(f"{v['id']:<22} {v['type']:<13} {v['status']:<9} {remaining!s:>10} "
                  f"{v['quota_used']:>8}  {v['name']}")
        return
    if "key" in result:
        print(f"Created {result['type']} key {result['id']}. Store it now; it is not shown "
              f"again:\n\n  {result['key']}\n")
        return
    for name, value in result.items():
        print(f"{name:>20}: {value}")
