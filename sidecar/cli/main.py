"""`sidecar` command line: serve, and key management straight on Redis.

Errors follow one convention: one line on stderr (`sidecar: error: FIELD: ...`), never a
traceback; exit 2 for a usage error (a bad argument, option or setting: nothing was
tried) and 1 for an operation that failed (no such key, Redis unreachable, the state
folder in use, a port held). A field is named as its option is (`quota`, `cycle-days`),
whichever way the value came.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path

import orjson

from ..runtime.config import (
    ConfigError,
    Refused,
    Settings,
    load_settings,
    state_path,
    with_overrides,
)
from .parsing import (
    CliError,
    UsageError,
    _csv,
    _non_negative,
    _Parser,
    _positive_int,
    _quota_or_unlimited,
    _when,
    command_name,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sidecar", description="API-key auth sidecar for LLM gateways")
    parser.add_argument("--config", help="YAML settings file (default: $SIDECAR_CONFIG, "
                                         "else none)")
    parser.add_argument("--state-dir", help="the embedded default's store (default: "
                                            "$SIDECAR_STATE_DIR, state_dir, else "
                                            "~/.local/state/llm-key-sidecar)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the data-plane and admin listeners")
    serve.add_argument("--config", dest="config_sub")
    serve.add_argument("--state-dir", dest="state_dir_sub")
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
    common.add_argument("--state-dir", dest="state_dir_sub")

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
    create.add_argument("--quiet", "-q", action="store_true",
                        help="print the new key only (KEY=$(sidecar keys create ... -q))")

    for action, text in (("list", "list keys"),):
        lister = keys.add_parser(action, parents=[common], help=text)
        lister.add_argument("--type", choices=["standard", "subscription", "org", "admin"])
        lister.add_argument("--status", choices=["active", "disabled"])
    for action in ("show", "disable", "enable", "delete"):
        p = keys.add_parser(action, parents=[common], help=f"{action} a key by id")
        p.add_argument("id")
    setq = keys.add_parser("set-quota", parents=[common], help="set a key's remaining quota")
    setq.add_argument("id")
    setq.add_argument("quota", type=_quota_or_unlimited, help="units, or 'unlimited'")

    accounts = sub.add_parser("accounts", help="PAYG balances").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    bal = accounts.add_parser("set-balance", parents=[common])
    bal.add_argument("account")
    bal.add_argument("units", type=_non_negative)
    show = accounts.add_parser("show", parents=[common])
    show.add_argument("account")
    from .admin import add_admin_commands  # orgs, members, projects, ... (admin.py)
    add_admin_commands(sub, keys, common, accounts)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "fallback":   # no settings: it must run where the sidecar's don't
            return _fallback(args)
        _check_usage(args)
        settings = load_settings(_config_path(args))
        state_dir = getattr(args, "state_dir_sub", None) or args.state_dir
        if state_dir:
            from ..runtime.config import absolute_dir
            settings = with_overrides(settings, state_dir=absolute_dir(state_dir, Path.cwd()))
        if args.command == "serve":
            return _serve(args, settings)
        return asyncio.run(_manage(args, settings))
    except CliError as exc:
        print(f"sidecar: error: {_field_named(str(exc))}", file=sys.stderr)
        return exc.code
    except (ConfigError, Refused) as exc:   # these name settings (state_dir, listen)
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


def _fallback(args: argparse.Namespace) -> int:
    from ..dataplane import fallback
    from ..runtime.config import parse_hostport
    from ..runtime.server import _run_loop

    host, port = parse_hostport(args.listen, "--listen")
    try:
        _run_loop(fallback.run(host, port))
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    return 0


def _field_named(message: str) -> str:
    """'cycle_days: ...' from the key store reads 'cycle-days: ...', as the option."""
    field, sep, rest = message.partition(": ")
    return field.replace("_", "-") + sep + rest if sep and field.isidentifier() else message


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "config_sub", None) or args.config


def _check_usage(args: argparse.Namespace) -> None:
    """What the command line alone shows to be wrong, before any store is touched."""
    if (args.command, getattr(args, "action", None)) == ("keys", "create") and \
            args.type != "admin" and args.quota is None and not args.unlimited:
        # A key with no quota would be refused (402) from its very first call.
        raise UsageError("quota: give --quota N (units the key may spend) or --unlimited")


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from ..runtime import logs, server

    if args.workers:
        settings = with_overrides(settings, workers=args.workers)
    logs.setup(settings.log_level)
    server.require_grpc(settings)
    if args.worker_process:  # started by a supervising `serve --workers N`
        server._run_loop(server.run(settings, data=True, admin=False, worker=True))
        return 0
    server.prepare_multiprocess_metrics(settings.workers)
    lock = embedded = None
    if settings.embedded_redis:
        from ..runtime.embedded import for_serve
        lock, embedded = for_serve(settings)    # held until this process ends
    # A port held by another process (with SO_REUSEPORT or not) stops us here, before
    # redis-server starts: our own workers are the only ones to share the data plane's.
    server.check_free(settings.listen, "listen")
    server.check_free(settings.admin_listen, "admin_listen")
    if settings.grpc_listen:
        server.check_free(settings.grpc_listen, "grpc_listen")
    if embedded is not None:
        from ..runtime.embedded import start
        settings = start(settings, embedded)
        logs.event("embedded_redis", socket=embedded.url, state_dir=str(embedded.dir),
                   note="no redis_url set: using a private redis-server with AOF on")
    print(first_key_hint(settings, args, embedded is not None), file=sys.stderr, flush=True)
    try:
        return server.serve(settings, embedded, _config_path(args))
    finally:
        if lock is not None:
            lock.release()


def first_key_hint(settings: Settings, args: argparse.Namespace, embedded: bool) -> str:
    """What serve prints: two lines to paste as they are into another shell."""
    from ..runtime.config import parse_hostport

    cmd = command_name()
    config = _config_path(args) or os.environ.get("SIDECAR_CONFIG")
    if config:
        cmd += f" --config {shlex.quote(str(Path(config).absolute()))}"
    if embedded and settings.state_dir:   # not the default: the other shell needs it
        cmd += f" --state-dir {shlex.quote(settings.state_dir)}"
    host, port = parse_hostport(settings.listen, "listen")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (f"sidecar: serving on http://{where}. Make a first key and try it "
            f"(paste in another shell):\n"
            f"  KEY=$({cmd} keys create --name first --quota 1000 --quiet)\n"
            f"  curl -i -H \"Authorization: Bearer $KEY\" "
            f"-d '{{\"model\":\"gpt-5.5\",\"messages\":[]}}' "
            f"http://{where}/authz/v1/chat/completions")


async def _manage(args: argparse.Namespace, settings: Settings) -> int:
    from redis.exceptions import RedisError

    from ..control.keystore import InvalidKeySpec, KeyConflict, KeyError_, KeyStore
    from ..redis.runner import control_client
    from ..schema.keys import KeyHasher

    settings, started, lock = _open_store(settings)
    client = control_client(settings.redis_url, settings.redis_timeout_ms / 1000 * 8,
                            settings.redis_pool_size)
    store = KeyStore(client, KeyHasher(settings.key_pepper))
    try:
        result = await _run_action(args, store)
    except KeyConflict as exc:
        raise CliError(str(exc)) from None
    except InvalidKeySpec as exc:
        raise UsageError(str(exc)) from None
    except KeyError_ as exc:
        raise CliError(str(exc).strip('"')) from None
    except (RedisError, OSError) as exc:
        from ..runtime.config import mask_url
        raise CliError(f"cannot reach Redis at {mask_url(settings.redis_url)}: "
                       f"{exc or type(exc).__name__}") from None
    finally:
        await client.aclose()
        if started is not None:
            started.stop()
        if lock is not None:
            lock.release()
    _print(result, args)
    return 0


def _open_store(settings: Settings):
    """(settings, redis-server started for this command, lock) for a CLI command. With the
    embedded default the store must exist: the CLI never makes a new one (and a new
    pepper) in a folder the server does not use."""
    if not settings.embedded_redis:
        return settings, None, None
    from ..runtime.embedded import for_command, store_exists

    state = state_path(settings)
    if not store_exists(state):
        where = "state_dir" if settings.state_dir else "the default state_dir"
        raise CliError(f"no sidecar store in {state} ({where}); create it with "
                       f"`{command_name()} serve`, or name yours with --state-dir DIR "
                       f"or SIDECAR_STATE_DIR")
    return for_command(settings)


def _key_spec(args: argparse.Namespace):
    """The KeySpec of `keys create` (data-plane types; admin keys go through admin.py)."""
    from ..control.keystore import InvalidKeySpec, KeySpec
    from ..schema.keys import KeyType

    typ = KeyType(args.type)
    if args.payg_fallback and typ is not KeyType.subscription:
        raise InvalidKeySpec("payg-fallback", "only for subscription keys")
    if args.payg_fallback and not args.account:
        raise InvalidKeySpec("account", "--payg-fallback needs the --account that pays")
    if args.project and typ is not KeyType.org:
        raise InvalidKeySpec("project", "only org keys belong to a project")
    spec = KeySpec(type=typ, name=args.name, quota=args.quota, unlimited=args.unlimited,
                   models=args.models, ips=args.ips, expires_at=args.expires,
                   rpm=args.rpm, tpm=args.tpm, permission=args.permission,
                   scopes=args.scopes, account=args.account, cycle_days=args.cycle_days,
                   payg_fallback=args.payg_fallback)
    if typ is KeyType.org:      # admin keys never get here (admin.py: a member)
        spec.org = "default"
        spec.project = args.project or "default"
    return spec


async def _all_keys(args: argparse.Namespace, store) -> list:
    views, cursor = [], 0
    while True:
        page, cursor = await store.list(args.type, args.status, cursor=cursor, limit=500)
        views.extend(page)
        if not cursor:
            return views


async def _run_action(args: argparse.Namespace, store):
    if getattr(args, "run_admin", None):  # control-plane commands (admin.py)
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
        view, plaintext = await store.create(_key_spec(args))
        return {**view, "key": plaintext}
    if action == "list":
        return await _all_keys(args, store)
    if action == "show":
        return await store.get(args.id)
    if action in ("disable", "enable"):
        return await store.set_status(args.id, action == "enable", reason="disabled by cli")
    if action == "delete":
        await store.delete(args.id)
        return {"id": args.id, "deleted": True}
    if action == "set-quota":   # args.quota: parsed by _quota_or_unlimited
        return await store.set_quota(args.id, None if args.quota == "unlimited"
                                     else args.quota)
    raise CliError(f"unknown action {action}")  # pragma: no cover - argparse restricts


def _print(result, args: argparse.Namespace) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if getattr(args, "quiet", False) and isinstance(result, dict) and result.get("key"):
        print(result["key"])
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
