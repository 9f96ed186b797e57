"""What the commands print: --json, the key alone (--quiet), or one of two human forms.

`plain` is the key commands' form (a key table, `name: value` lines); `control` is the
organization commands' (column tables, nested values as JSON). Secrets are printed only
where a result carries a new key's plaintext, once.
"""

from __future__ import annotations

import argparse
import sys

import orjson

# Columns shown by the human-readable list output, per kind of row.
_COLUMNS = {"organization": ("id", "name", "created_at"),
            "member": ("id", "user", "role", "name"),
            "project": ("id", "name", "created_at"),
            "service_account": ("id", "project_id", "name"),
            "subscription": ("id", "account", "plan", "key_id", "status", "cycle_remaining"),
            "audit_event": ("id", "time", "action", "resource", "actor")}


def emit(result, args: argparse.Namespace) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if getattr(args, "quiet", False) and isinstance(result, dict) and result.get("key"):
        print(result["key"])
        return
    args.show(result, args)


def plain(result, args: argparse.Namespace | None = None) -> None:
    """Keys and balances: a key table, a new key once, or `name: value` lines."""
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


def control(result, args: argparse.Namespace | None = None) -> None:
    """Organizations and what they hold: a table, or `name: value` lines."""
    if isinstance(result, list):
        _table(result)
        return
    if result.get("changed") is False:   # admin bootstrap, run again
        from .parsing import command_name
        org, key = result["organization"], result["admin_key"]
        again = f"{command_name()} admin create-key --org {org['id']}"
        if key.get("member_id"):
            again += f" --member {key['member_id']}"
        print(f"Organization {org['name']} already has an active admin key ({key['id']}): "
              f"nothing changed. Another admin key: {again}")
        return
    if result.get("key"):
        kind = result.get("type") or result.get("admin_key", {}).get("type") or "new"
        ident = result.get("key_id") or result.get("admin_key", {}).get("id") or result["id"]
        print(f"Created {kind} key {ident}. Store it now; it is not shown again:\n\n"
              f"  {result['key']}\n")
    for name, value in result.items():
        if name != "key":
            text = value if not isinstance(value, dict | list) else orjson.dumps(value).decode()
            print(f"{name:>20}: {text}")


def _table(rows: list[dict]) -> None:
    if not rows:
        print("(none)")
        return
    columns = _COLUMNS.get(rows[0].get("object", ""), tuple(rows[0])[:5])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def _cell(value) -> str:
    if isinstance(value, dict):
        return "/".join(str(v) for v in value.values() if v)
    return "" if value is None else str(value)
