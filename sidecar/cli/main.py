"""`sidecar` command line: the entry point and the parser, assembled from one module per
command group (serve.py, keys.py, accounts.py, admin.py, orgs.py, members.py,
projects.py, service_accounts.py, subscriptions.py, audit.py); session.py runs a store
command, output.py prints it.

Errors follow one convention: one line on stderr (`sidecar: error: FIELD: ...`), never a
traceback; exit 2 for a usage error (a bad argument, option or setting: nothing was
tried) and 1 for an operation that failed (no such key, Redis unreachable, the state
folder in use, a port held). A field is named as its option is (`quota`, `cycle-days`),
whichever way the value came.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ..runtime.config import ConfigError, Refused, load_settings, with_overrides
from . import (
    accounts,
    admin,
    audit,
    keys,
    members,
    orgs,
    projects,
    serve,
    service_accounts,
    subscriptions,
    usage,
    webhooks,
)
from .parsing import CliError, _Parser, common_options, config_path
from .serve import first_key_hint

__all__ = ["build_parser", "first_key_hint", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sidecar", description="API-key auth sidecar for LLM gateways")
    parser.add_argument("--config", help="YAML settings file (default: $SIDECAR_CONFIG, "
                                         "else none)")
    parser.add_argument("--state-dir", help="the embedded default's store (default: "
                                            "$SIDECAR_STATE_DIR, state_dir, else "
                                            "~/.local/state/llm-key-sidecar)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve.register(sub)
    common = common_options()
    for module in (keys, accounts, admin, orgs, members, projects, service_accounts,
                   subscriptions, audit, webhooks, usage):
        module.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "bare", None):
            return args.bare(args)
        if getattr(args, "check", None):   # what the command line alone shows wrong
            args.check(args)
        settings = load_settings(config_path(args))
        state_dir = getattr(args, "state_dir_sub", None) or args.state_dir
        if state_dir:
            from ..runtime.config import absolute_dir
            settings = with_overrides(settings, state_dir=absolute_dir(state_dir, Path.cwd()))
        if getattr(args, "start", None):
            return args.start(args, settings)
        from .session import run
        return asyncio.run(run(args, settings))
    except CliError as exc:
        print(f"sidecar: error: {_field_named(str(exc))}", file=sys.stderr)
        return exc.code
    except (ConfigError, Refused) as exc:   # these name settings (state_dir, listen)
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


def _field_named(message: str) -> str:
    """'cycle_days: ...' from the control plane reads 'cycle-days: ...', as the option."""
    field, sep, rest = message.partition(": ")
    return field.replace("_", "-") + sep + rest if sep and field.isidentifier() else message
