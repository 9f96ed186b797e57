"""The typed contracts (schema/contracts.py) say what each Lua script's header says.

Each script's header names its KEYS and ARGV, one `-- KEYS[n]  name ...` / `-- ARGV[n]
name ...` line each (ARGV[n..] for a variadic tail), and its reply in a `-- Returns ...`
line ({a, b, ...} for a table, `name:` for one value). A KEYS or ARGV added to a header
but not to its contract (or the other way round, or in another order) fails here.
"""

from __future__ import annotations

import inspect
import re
from importlib import resources

import pytest

from sidecar.schema import contracts, names, scripts

LUA = sorted(p.name[:-4] for p in resources.files("sidecar.schema").iterdir()
             if p.name.endswith(".lua") and p.name[:-4] not in scripts.PRELUDES)
_ARG = re.compile(r"^-- (KEYS|ARGV)\[(\d+)(\.\.)?\]\s+(\w+)", re.M)
_RETURNS = re.compile(r"^-- Returns (?:\{([^}]*)\}|(\w+):)", re.M)


def header(source: str) -> dict:
    """{'KEYS': [...], 'ARGV': [...], 'variadic': name or None, 'returns': [...]}"""
    found: dict = {"KEYS": [], "ARGV": [], "variadic": None}
    for kind, n, rest, name in _ARG.findall(source):
        assert int(n) == len(found[kind]) + 1, f"{kind}[{n}] out of order"
        found[kind].append(name)
        if rest:
            found["variadic"] = name
    returns = _RETURNS.findall(source)
    assert len(returns) == 1, "one '-- Returns' line"
    table, single = returns[0]
    found["returns"] = ([f.strip(" -\n") for f in table.replace("--", "").split(",")]
                        if table else [single])
    return found


def source_of(name: str) -> str:
    return resources.files("sidecar.schema").joinpath(f"{name}.lua").read_text()


def test_every_script_has_a_contract_and_a_script_object():
    assert sorted(contracts.CONTRACTS) == LUA
    loaded = {s.name for s in vars(scripts).values() if isinstance(s, scripts.Script)}
    assert loaded == set(LUA)


@pytest.mark.parametrize("name", LUA)
def test_contract_matches_the_lua_header(name):
    args, reply = contracts.CONTRACTS[name]
    lua = header(source_of(name))
    assert list(args.KEYS) == lua["KEYS"], f"{name}.lua KEYS"
    assert list(args.ARGV) == lua["ARGV"], f"{name}.lua ARGV"
    assert getattr(args, "VARIADIC", None) == lua["variadic"]
    # The fields, in order, are KEYS then ARGV: keys() and argv() slice them.
    assert args._fields == (*args.KEYS, *args.ARGV)
    assert list(reply.FIELDS) == lua["returns"], f"{name}.lua Returns"
    assert reply._fields == reply.FIELDS


def full(args_type) -> tuple:
    """An instance with every field set (the optional ones too), values = field names."""
    values = {f: f for f in args_type._fields}
    if getattr(args_type, "VARIADIC", None):
        values[args_type.VARIADIC] = ("f1", "v1")
    return args_type(**values)


@pytest.mark.parametrize("name", LUA)
def test_keys_and_argv_give_what_the_header_names(name):
    args_type, _ = contracts.CONTRACTS[name]
    call = full(args_type)
    assert call.keys() == args_type.KEYS
    argv = list(args_type.ARGV)
    if getattr(args_type, "VARIADIC", None):
        argv[-1:] = ["f1", "v1"]
    assert call.argv() == tuple(argv)


@pytest.mark.parametrize("reservation", ["reservation", ""])
def test_authorize_pack_is_keys_and_argv_of_the_instance(reservation):
    """The hot path's pack takes the fields in the same order and gives the same."""
    args_type = contracts.AuthorizeArgs
    assert tuple(inspect.signature(args_type.pack).parameters) == args_type._fields
    call = full(args_type)._replace(reservation=reservation)
    assert args_type.pack(*call) == (call.keys(), call.argv())


@pytest.mark.parametrize("name", ["authorize", "create_unique"])
def test_optional_keys_and_argv_are_left_out_together(name):
    args_type, _ = contracts.CONTRACTS[name]
    optional_keys = [f for f in args_type.OPTIONAL if f in args_type.KEYS]
    call = full(args_type)._replace(**{f: "" for f in optional_keys})
    assert call.keys() == tuple(f for f in args_type.KEYS if f not in optional_keys)
    assert not set(args_type.OPTIONAL) & set(call.argv())


def test_authorize_reply_parses_denials_and_allows():
    denied = contracts.AuthorizeReply.parse([5])
    assert (denied.code, denied.type, denied.limits_known) == (5, "", False)
    raw = [0, b"key_1", b"s", b"org_1", b"", 600, 599, 0, 0, 100, 0, 0, b"", b""]
    allowed = contracts.AuthorizeReply.parse(raw)
    assert (allowed.key_id, allowed.type, allowed.org, allowed.project) == \
        ("key_1", "s", "org_1", "")
    assert (allowed.rpm, allowed.rpm_remaining, allowed.rpm_reset_ms) == (600, 599, 100)
    assert allowed.limits_known
    assert contracts.AuthorizeReply.parse([0, "key_1", "s", "org_1", "", *raw[5:]]) == allowed
    with pytest.raises(ValueError):
        contracts.AuthorizeReply.parse([0, b"key_1"])


def test_settle_reply_parses_short_and_full_replies():
    assert contracts.SettleReply.parse([3]) == (3, 0, 0, 0, 0, 0)
    settled = contracts.SettleReply.parse([0, 5, -2, 0, 900, 214])
    assert (settled.delta, settled.money_reserved, settled.money_actual) == (-2, 900, 214)


def test_pool_prefix_is_spelled_once():
    """The wallet field of a quota pool is names.pool_field: the scripts get the prefix
    in ARGV and spell no field name of their own."""
    assert names.pool_field("key_1") == names.POOL_PREFIX + "key_1"
    for name in LUA:
        code = "\n".join(line for line in source_of(name).splitlines()
                         if not line.lstrip().startswith("--"))
        assert "'q:'" not in code and '"q:"' not in code, name


def test_alert_and_usage_keys_are_passed_and_share_the_records_slot():
    """The events stream and the usage buckets come to the scripts in KEYS (names.py),
    on the record's hash tag: authorize and settle stay single-slot on Redis Cluster."""
    from redis.crc import key_slot

    from sidecar.schema.keys import shard_of
    key_hash = "abc" + "d" * 61
    tag = shard_of(key_hash)
    slots = {key_slot(k.encode()) for k in (
        names.record(key_hash), names.events(tag), names.usage_day(tag, 20_000),
        names.usage_hour(tag, 480_000), names.budgets(tag))}
    assert len(slots) == 1
    for script in ("authorize", "settle"):
        args = contracts.CONTRACTS[script][0]
        assert {"events", "usage_day", "usage_hour"} <= set(args.KEYS)
        code = "\n".join(line for line in source_of(script).splitlines()
                         if not line.lstrip().startswith("--"))
        assert "'ev:" not in code and "'u:" not in code, script
