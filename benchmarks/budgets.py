"""The budgets section (issue 11): authorize with a full money hierarchy against plain.

Plain: the main sidecar and the benchmark keys (quota + rpm, no budget anywhere).
Budgets: a second sidecar with prices, settlement on (each allowed call records its
reservation and joins a hold at each level) and keys of 256 organizations, each key
with its own budget and concurrency limit, under a project budget and an organization
budget (and concurrency limit), so every call reads, checks and reserves at three
levels. Both are driven in interleaved rounds (plain, budgets, plain, budgets, ...), same
body, same wrk.

The report that would end each reservation (POST /settle) is its own call and is not
part of this figure: reservations expire after `reservation_ttl_s` (2 s here, up to a
quarter more: limits.lua's holds) and the levels' holds end by the expiry policy, so
the run holds a steady number of reservations and slots in flight.
EVALSHA per call comes from INFO commandstats around each run: the hierarchy must
still be one script call per decision (commandstats also counts the script's own
redis.call()s: reported as the work per call, not as round trips).
"""

from __future__ import annotations

import json
import secrets
import socket

import hiredis

from sidecar.control.key_spec import KeySpec, validate_spec
from sidecar.schema import names
from sidecar.schema.keys import PREFIX_OF, KeyHasher, KeyType, new_id, shard_of
from sidecar.schema.limits import MAX_CONCURRENCY, Limits
from sidecar.schema.record import stored

from .keyload import _read_replies, random_bodies, write_key_file
from .repeat import combine, feature_ratios, median_ratios

ORGS = 256
TTL_S = 2
PRICES = {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}}
BIG = 10 ** 15      # micro-units: a budget the run never exhausts (1e9 USD)


def _org_tags(hasher: KeyHasher, count: int) -> dict[str, tuple[str, str]]:
    """tag -> (org id, project id) for `count` organizations on distinct tags."""
    out: dict[str, tuple[str, str]] = {}
    while len(out) < count:
        org = new_id("org")
        out.setdefault(hasher.org_tag(org), (org, new_id("prj")))
    return out


def load_hierarchy(host: str, port: int, pepper: str, count: int,
                   limits: bool = True) -> list[str]:
    """Keys minted on their organization's tag, as KeyStore.create does, with limits at
    the key, project and organization; the budgets hashes written as set_limits would.
    limits=False: the same keys under their project and organization, no limit anywhere
    (the record's levels only, as an organization's key is made by default)."""
    hasher = KeyHasher(pepper)
    orgs = _org_tags(hasher, ORGS)
    key_limits = Limits(budget=BIG, period="t", max_concurrency=1000).pack() \
        if limits else ""
    prefix = PREFIX_OF[KeyType.standard]
    base = {}
    commands = []
    keys: list[str] = []
    while len(keys) < count:
        for body in random_bodies(4096):
            key = prefix + body
            key_hash = hasher(key)
            tag = shard_of(key_hash)
            if tag not in orgs or len(keys) >= count:
                continue
            org, prj = orgs[tag]
            if tag not in base:
                spec = KeySpec(type=KeyType.standard, name="bench-budget", quota=10 ** 12,
                               rpm=1_000_000, org=org, project=prj, limits=key_limits,
                               created_by="bench")
                rec = validate_spec(spec)
                rec.levels = f"{names.level_field('project', prj)} " \
                             f"{names.level_field('organization', org)}"
                base[tag] = [x for kv in rec.to_hash().items() for x in kv]
            key_id = new_id("key")
            commands.append(("HSET", names.record(key_hash), "id", key_id, *base[tag]))
            commands.append(("HSET", names.KEY_INDEX, key_id, key_hash))
            keys.append(key)
    project = Limits(budget=BIG, period="m").pack()
    org_limits = Limits(budget=BIG, period="d", max_concurrency=MAX_CONCURRENCY).pack()
    for tag, (org, prj) in orgs.items() if limits else ():
        commands.append(("HSET", names.budgets(tag), names.level_field("project", prj),
                         project, names.level_field("organization", org), org_limits))
    with socket.create_connection((host, port), timeout=30) as sock:
        reader = hiredis.Reader()
        for start in range(0, len(commands), 5000):
            chunk = commands[start:start + 5000]
            sock.sendall(b"".join(hiredis.pack_command(c) for c in chunk))
            _read_replies(sock, reader, len(chunk))
    return keys


def levels_touched(client, pepper: str, key: str) -> dict:
    """The state the hierarchy left for one key: every level reserved or spent money.
    `client` must not decode replies (the levels above the key are packed binary)."""
    hasher = KeyHasher(pepper)
    key_hash = hasher(key)
    rec = stored(client.hgetall(names.record(key_hash)))
    tag = shard_of(key_hash)
    state = {"key": Limits.unpack(rec.get("lim"))}
    for word in rec.get("lv", "").split():
        state[names.level_of(word)] = Limits.unpack(client.hget(names.budgets(tag), word))
    return {level: (s.spent + s.reserved) if s else None for level, s in state.items()}


def section(bench, stack, stack_cls) -> dict:
    args = bench.args
    host, port = "127.0.0.1", bench.redis.port
    keys = load_hierarchy(host, port, bench.pepper, args.keys)
    key_file = write_key_file(keys, bench.tmp / "budget-keys.txt")
    car = bench.procs.sidecar(bench.redis.url, bench.pepper, workers=1,
                              settlement_token="bench-settle-" + secrets.token_hex(12),
                              prices=json.dumps(PRICES), reservation_ttl_s=str(TTL_S))
    budget = stack_cls(1, car, None)
    try:
        bench.expect(car.url, "/authz/v1/chat/completions", 200, key=keys[0])
        touched = levels_touched(bench.redis.client(decode=False), bench.pepper, keys[0])
        if not all(touched.values()) or len(touched) != 3:
            raise SystemExit(f"benchmarks: budgets: a level was not reserved: {touched}")
        c = args.main_concurrency
        if args.warmup > 0:
            bench.warm_one(budget, "authorize", key_file)
        rounds = []
        for i in range(args.repeat):
            label = f" r{i + 1}/{args.repeat}" if args.repeat > 1 else ""
            plain = bench.measure(stack, "authorize", c, label=label + " plain")
            hier = bench.measure(budget, "authorize", c, label=label + " budgets",
                                 key_file=key_file)
            rounds.append({"plain": plain, "budgets": hier})
    finally:
        bench.procs.stop(car.proc)
    out = {name: combine([r[name] for r in rounds]) for name in ("plain", "budgets")}
    per_round = [feature_ratios(r["budgets"], r["plain"], "plain_over_budgets")
                 for r in rounds]
    medians, spread = median_ratios(per_round)
    out.update(concurrency=c, repeat=args.repeat, keys=len(keys), orgs=ORGS,
               reservation_ttl_s=TTL_S, prices=PRICES, levels_after_one_call=touched,
               ratios=medians, ratio_spread=spread, ratio_rounds=per_round)
    bench.log("budgets/plain req/s {} ({}), CPU/call plain/budgets {}".format(
        medians["rps"], spread["rps"], medians["cpu_plain_over_budgets"]))
    return out


def markdown(b: dict, cell, run_row) -> list[str]:
    """RESULTS.md: the budgets section. cell(medians, spread, key) formats a ratio."""
    def ratio(key: str) -> str:
        return cell(b["ratios"], b["ratio_spread"], key)
    ok = "met" if (b["ratios"].get("rps") or 0) >= 0.9 else "not met"
    rows = []
    for name, label in (("plain", "plain authorize (quota + rpm)"),
                        ("budgets", "authorize, key + project + org budgets, concurrency, "
                                    "settlement on")):
        r = b[name]
        rows.append(run_row(label, r, cost=True))
    cmds = [(n, b[n].get("redis_commands_per_call"), b[n].get("evalsha_per_call"))
            for n in ("plain", "budgets")]
    meta = b.get("meta")
    ran = ([f"Command: `{meta['command']}` ({meta['timestamp']}, commit {meta['git']}); "
            f"{b['repeat']} interleaved round(s).", ""] if meta else [])
    return [
        "", f"## Budgets: the full hierarchy against plain authorize (c{b['concurrency']}, "
        "1 worker, issue 11)", "", *ran,
        "| handler | req/s | p50 ms | p99 ms | µs CPU/call (server + Redis) | "
        "CPU during the run |", "|---|---:|---:|---:|---:|---|", *rows, "",
        "| ratio | median of the per-round ratios (min–max) | aim |", "|---|---:|---|",
        f"| budgets / plain req/s | {ratio('rps')} | ≥ 0.9 ({ok}) |",
        f"| budgets / plain p99 | {ratio('p99')} | reported |",
        f"| CPU per call (server + Redis), plain / budgets | "
        f"{ratio('cpu_plain_over_budgets')} | reported |",
        f"| sidecar CPU per call, plain / budgets | "
        f"{ratio('sidecar_cpu_plain_over_budgets')} | reported |",
        f"| Redis CPU per decision, plain / budgets | "
        f"{ratio('redis_cpu_plain_over_budgets')} | reported |",
        "",
        "One round trip per call: EVALSHA per answered call (INFO commandstats around "
        "each run) "
        + "; ".join(f"{n} {e}" for n, c, e in cmds)
        + "; commands Redis ran per call, the script's own `redis.call`s included: "
        + "; ".join(f"{n} {c}" for n, c, e in cmds)
        + ". Redis CPU per decision: plain "
        f"{b['plain'].get('redis_cpu_us_per_decision')} µs, budgets "
        f"{b['budgets'].get('redis_cpu_us_per_decision')} µs.",
        "",
        f"Budgets: {b['keys']:,} keys of {b['orgs']} organizations, each minted on its "
        "organization's tag (as `keys create` does); every key has a budget and a "
        "concurrency limit (1,000), its project a monthly budget, its organization a daily "
        "budget and a concurrency limit; prices for the benchmark's model "
        f"({', '.join(f'{m}: {p}' for m, p in b['prices'].items())}); settlement on, so "
        "each allowed call writes its reservation and joins a hold at each level. The "
        "`/settle` report is a separate call, not counted: reservations expire after "
        f"{b['reservation_ttl_s']} s (up to a quarter more) and their holds end charged, "
        "which keeps reservations and slots in flight steady. The levels one call reserved at "
        f"(micro-units): {b['levels_after_one_call']}. Plain: the main sidecar and keys. "
        "See benchmarks/budgets.py.",
    ]
