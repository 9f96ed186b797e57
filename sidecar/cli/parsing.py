"""What every CLI command group shares: the one-line errors and the argument types."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path


class CliError(Exception):
    """A one-line error for the user: an operation that failed (exit 1)."""

    code = 1


class UsageError(CliError):
    """A one-line error for the user: the command line is wrong (exit 2)."""

    code = 2


# argparse words its errors "argument --quota: ..."; ours say "quota: ..." like the rest.
_ARGUMENT = re.compile(r"^argument (?:-+)?([\w-]+)(?:/-*[\w-]+)*: ")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + line
        raise UsageError(_ARGUMENT.sub(r"\1: ", message))


def count(text: str, minimum: int = 0) -> int:
    """The one rule for every count the CLI takes, as an option or an argument (argparse
    names the field): a whole number, at least `minimum`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text} is negative" if minimum == 0 else
                                         f"{text} is less than {minimum}")
    return value


def _non_negative(text: str) -> int:
    return count(text)


def _positive_int(text: str) -> int:
    return count(text, 1)


def _quota_or_unlimited(text: str) -> int | str:
    if text == "unlimited":
        return text
    try:
        return count(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (a whole number or 'unlimited')") from None


def _when(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 date") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def command_name() -> str:
    """How to run this very `sidecar` from any shell: the bare name when PATH finds this
    one, else its absolute path (the venv's bin need not be on PATH)."""
    beside = Path(sys.executable).parent / "sidecar"
    if not beside.exists():
        return shlex.join([sys.executable, "-m", "sidecar"])
    found = shutil.which("sidecar")
    if found and Path(found).resolve() == beside.resolve():
        return "sidecar"
    return shlex.quote(str(beside.absolute()))


# -- building the command groups (each module in cli/ registers its own group) ---------

def common_options() -> _Parser:
    """What every store command takes: --json and the settings, also after the command."""
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--config", dest="config_sub")
    common.add_argument("--state-dir", dest="state_dir_sub")
    return common


def org_option() -> _Parser:
    org = _Parser(add_help=False)
    org.add_argument("--org", default="default", help="organization id or name")
    return org


def group(sub, name: str, text: str):
    """A command group (`sidecar NAME ACTION ...`): its subparsers."""
    return sub.add_parser(name, help=text).add_subparsers(
        dest="action", required=True, parser_class=_Parser)


def command(actions, name: str, run, show, parents: list, text: str | None = None):
    """One command: `run(args, store)` makes the ControlStore call, `show(result, args)`
    prints it (unless --json)."""
    p = actions.add_parser(name, parents=parents, **({"help": text} if text else {}))
    p.set_defaults(run=run, show=show)
    return p


def config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "config_sub", None) or args.config
