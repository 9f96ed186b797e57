"""The alerts section (issue 12): authorize with alert thresholds and usage history on
(the defaults) against off, in interleaved rounds.

On: a sidecar with the Settings defaults, `alert_thresholds` [0.2, 0.05, 0] and
`usage_retention_days` 90. Off: the same sidecar with `alert_thresholds: []` and
`usage_retention_days: 0`. Both run on the same Redis and keys; what differs is the two
ARGVs authorize.lua receives (thresholds 'n' and usage_days 0 when off).

What history adds to an allowed call (authorize.lua): one HINCRBY per bucket (the day's
and the hour's) and holder (the key, and each level above it in the record's lv), and an
EXPIRE of the bucket when the key's field in it is new (the key's first call of that day
or hour). Thresholds add the parse of the list and a comparison per call, and an XADD
only on a crossing (the benchmark's quotas are far from any).

Two kinds of keys: the main benchmark keys (standard keys, nothing above them: one
holder, 2 HINCRBY a call) and keys of 256 organizations under a project each, without
budgets (3 holders: 6 HINCRBY a call). A round runs, for each kind, on and off (their
order alternating between rounds) with every key already counted in the current day's
and hour's bucket (a steady hour), then on again right after every bucket was deleted
(the first calls of an hour: each key's first call makes its fields and sets the
buckets' time to live). Around each run INFO commandstats per command name: the
commands the history adds per call, and EVALSHA per call (it must stay 1: one round
trip per decision). Afterwards authorize.lua alone inside Redis (redis-benchmark, one
record of each kind) with each of the four combinations, so the cost splits into
thresholds and history, and one HINCRBY on the first and the last field of a bucket.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections import Counter
from dataclasses import fields

import hiredis

from sidecar.runtime.config import Settings
from sidecar.schema import names
from sidecar.schema.contracts import AuthorizeArgs
from sidecar.schema.keys import KeyHasher, shard_of
from sidecar.schema.limits import Calendar
from sidecar.schema.scripts import AUTHORIZE

from .budgets import ORGS, load_hierarchy
from .keyload import _read_replies, write_key_file
from .repeat import combine, feature_ratios, median_ratios
from .stats import redis_command_counts

AUTHZ_PATH = "/authz/v1/chat/completions"
_DEFAULTS = {f.name: f.default for f in fields(Settings)}
ON = {"alert_thresholds": ",".join(_DEFAULTS["alert_thresholds"]),
      "usage_retention_days": str(_DEFAULTS["usage_retention_days"])}
OFF = {"alert_thresholds": "", "usage_retention_days": "0"}
TARGETS = ("on", "off", "on_new", "org_on", "org_off", "org_on_new")
LABELS = {"on": "standard keys, on (the defaults)", "off": "standard keys, off",
          "on_new": "standard keys, on, each key's first calls of the hour",
          "org_on": "organization keys (key + project + org), on",
          "org_off": "organization keys (key + project + org), off",
          "org_on_new": "organization keys, on, each key's first calls of the hour"}
# authorize.lua alone: ARGV[16] thresholds and ARGV[17] usage_days of each combination
COMBOS = {"off": ("n", 0), "thresholds": (ON["alert_thresholds"], 0),
          "history": ("n", int(ON["usage_retention_days"])),
          "on": (ON["alert_thresholds"], int(ON["usage_retention_days"]))}
SCRIPT_CALLS, SCRIPT_ROUNDS = 10_000, 5
# Commands no authorize call of this section runs (no settlement: no SET): the webhook
# worker's polls in the idle sidecars (runtime/webhooks.py: ZRANGE of the active tags, a
# sweep's SET NX and XLEN of every tag's stream now and then) and the clients' HELLO.
BACKGROUND = ("hello", "ping", "zrange", "set", "xlen", "xreadgroup", "xautoclaim", "xack")


def _counted(bench, stack, key_file, connections: int, label: str) -> dict:
    """bench.measure on `stack`, with the commands Redis ran meanwhile, by name."""
    client = bench.redis.client()
    before = redis_command_counts(client)
    run = bench.measure(stack, "authorize", connections, label=label, key_file=key_file)
    run["commands"] = redis_command_counts(client, before)
    return run


def _one_call(bench, car, key: str) -> dict[str, int]:
    """The commands one allowed call made Redis run (by name)."""
    client = bench.redis.client()
    before = redis_command_counts(client)
    bench.expect(car.url, AUTHZ_PATH, 200, key=key)
    return redis_command_counts(client, before)


class Buckets:
    """The usage buckets of the run's keys, set to a known state before each run: every
    key already counted in the current day's and hour's bucket (`fill`: a steady hour,
    where only increments happen), or none (`clear`: the start of an hour, where each
    key's first call makes its field and sets the bucket's time to live).

    `fill` writes a tag's fields in the order the hour's calls would have made them (the
    first key, then the levels above it, then the other keys), so a listpack bucket is
    scanned as far as it would be: its levels near the front."""

    def __init__(self, bench, keys: list[str]):
        self.port = bench.redis.port
        hasher = KeyHasher(bench.pepper)
        hashes = [hasher(k) for k in keys]
        got = _raw(self.port, [("HMGET", names.record(h), "id", "lv") for h in hashes])
        fields: dict[str, dict[str, None]] = {}    # per tag, in order, no repeats
        for key_hash, (key_id, levels) in zip(hashes, got, strict=True):
            tag = fields.setdefault(shard_of(key_hash), {})
            tag[f"{key_id.decode()}:n"] = None
            for where in (levels or b"").decode().split():
                tag.setdefault(f"{where}:n")
        self.fields = {tag: list(f) for tag, f in fields.items()}
        days = int(ON["usage_retention_days"])
        self.ttl = {"d": (days + 1) * 86400, "h": 49 * 3600}   # as authorize.lua sets

    def fill(self) -> None:
        now = int(time.time() * 1000)
        day, _ = Calendar("UTC").numbers(now)
        commands = []
        for tag, keys in self.fields.items():
            for kind, name in (("d", names.usage_day(tag, day)),
                               ("h", names.usage_hour(tag, now // 3_600_000))):
                commands.append(("HSET", name, *(x for k in keys for x in (k, 1))))
                commands.append(("EXPIRE", name, self.ttl[kind]))
        _raw(self.port, commands)

    def clear(self, client) -> None:
        batch = []
        for name in client.scan_iter(match="u:*", count=5000):
            batch.append(name)
            if len(batch) >= 5000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)


def _raw(port: int, commands: list[tuple], chunk: int = 5000) -> list:
    """Pipelined commands on one plain socket (hiredis), the replies in order."""
    out: list = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = hiredis.Reader()
        for start in range(0, len(commands), chunk):
            part = commands[start:start + chunk]
            sock.sendall(b"".join(hiredis.pack_command(c) for c in part))
            out += _read_replies(sock, reader, len(part))
    return out


def section(bench, stack_cls) -> dict:
    args = bench.args
    org_keys = load_hierarchy("127.0.0.1", bench.redis.port, bench.pepper, args.keys,
                              limits=False)
    org_file = write_key_file(org_keys, bench.tmp / "org-keys.txt")
    buckets = Buckets(bench, bench.keys + org_keys)
    on_car = bench.procs.sidecar(bench.redis.url, bench.pepper, workers=1, **ON)
    off_car = bench.procs.sidecar(bench.redis.url, bench.pepper, workers=1, **OFF)
    on, off = stack_cls(1, on_car, None), stack_cls(1, off_car, None)
    plan = {"on": (on, bench.key_file), "off": (off, bench.key_file),
            "on_new": (on, bench.key_file), "org_on": (on, org_file),
            "org_off": (off, org_file), "org_on_new": (on, org_file)}
    try:
        # Each setting does what it says: history counted by on, nothing by off.
        one = {"off": _one_call(bench, off_car, bench.keys[-1]),
               "on": _one_call(bench, on_car, bench.keys[-2]),
               "org_off": _one_call(bench, off_car, org_keys[-1]),
               "org_on": _one_call(bench, on_car, org_keys[-2])}
        hincrby = {k: v.get("hincrby", 0) for k, v in one.items()}
        if hincrby["off"] or hincrby["org_off"] or hincrby["on"] < 2 or hincrby["org_on"] < 6:
            raise SystemExit(f"benchmarks: alerts: HINCRBY per call not as set: {hincrby}")
        c = args.main_concurrency
        if args.warmup > 0:
            for stack, key_file in plan.values():
                bench.warm_one(stack, "authorize", key_file)
        rounds = []
        for i in range(args.repeat):
            label = f" r{i + 1}/{args.repeat}" if args.repeat > 1 else ""
            got = {}
            for prefix in ("", "org_"):
                # on and off, the order alternating between rounds, on a steady hour;
                # then on again, at the start of an hour (no key counted yet)
                pair = ("on", "off") if i % 2 == 0 else ("off", "on")
                buckets.fill()
                for name in (*(prefix + n for n in pair), prefix + "on_new"):
                    if name.endswith("_new"):
                        buckets.clear(bench.redis.client())
                    stack, key_file = plan[name]
                    got[name] = _counted(bench, stack, key_file, c, f"{label} {name}")
                    got[name]["target"] = f"alerts_{name}"
            rounds.append(got)
        buckets.fill()
        memory = bucket_memory(bench.redis.client())
        # a standard key on a tag of no organization: its buckets hold standard keys only
        hasher = KeyHasher(bench.pepper)
        org_tags = {shard_of(hasher(k)) for k in org_keys}
        plain = next((k for k in bench.keys if shard_of(hasher(k)) not in org_tags),
                     bench.keys[0])
        script = script_alone(bench, {"standard": plain, "organization": org_keys[0]})
    finally:
        bench.procs.stop(on_car.proc)
        bench.procs.stop(off_car.proc)
    out: dict = {name: _combined(bench, plan[name][0], [r[name] for r in rounds])
                 for name in TARGETS}
    per_round = []
    for r in rounds:
        ratios = {}
        for prefix in ("", "org_"):
            for on_name, tail in (("on", ""), ("on_new", "_new")):
                pair = feature_ratios(r[prefix + on_name], r[prefix + "off"], "off_over_on")
                for k, v in pair.items():
                    ratios[f"{prefix}{k}{tail}"] = v
        per_round.append(ratios)
    medians, spread = median_ratios(per_round)
    out.update(concurrency=c, repeat=args.repeat, keys=len(bench.keys),
               org_keys=len(org_keys), orgs=ORGS, settings={"on": ON, "off": OFF},
               one_call=one, ratios=medians, ratio_spread=spread, ratio_rounds=per_round,
               script=script, buckets=memory)
    bench.log("alerts on/off req/s {} ({}), org keys {} ({}); commands/call on {} off {}, "
              "EVALSHA/call on {}".format(
                  medians["rps"], spread["rps"], medians["org_rps"], spread["org_rps"],
                  out["on"]["script_commands_per_call"], out["off"]["script_commands_per_call"],
                  out["on"]["evalsha_per_call"]))
    return out


def _combined(bench, stack, runs: list[dict]) -> dict:
    """The rounds' medians (repeat.combine); commands summed over the rounds, per call."""
    run = combine(runs)
    total: Counter = Counter()
    for r in runs:
        total.update(r["commands"])
    calls = max(run["requests"], 1)
    run["commands"] = dict(sorted(total.items()))
    run["commands_per_call"] = {k: round(v / calls, 3) for k, v in run["commands"].items()
                                if v / calls >= 0.0005}   # idle sidecars' polls left out
    run["redis_commands_per_call"] = round(sum(total.values()) / calls, 3)
    run["script_commands_per_call"] = round(sum(
        v for k, v in total.items() if k.split("|")[0] not in BACKGROUND) / calls, 3)
    run["evalsha_per_call"] = round(total.get("evalsha", 0) / calls, 3)
    run["expire_per_call_by_round"] = [round(r["commands"].get("expire", 0)
                                             / max(r["requests"], 1), 3) for r in runs]
    run["saturation"] = bench.saturation(stack, run)
    return run


def script_alone(bench, keys: dict[str, str]) -> dict:
    """authorize.lua inside Redis alone (redis-benchmark -P 20), one record per kind of
    key, with thresholds and history off, each alone, and both: µs per EVALSHA (the
    fastest of SCRIPT_ROUNDS interleaved runs, the one other processes disturbed least:
    the figure is Redis's wall time, preemptions included) and the commands it ran per
    call; and one HINCRBY alone on the first and on the last field of the record's day
    bucket (as full as the section left it): a listpack is scanned from its front."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"error": "redis-benchmark not installed (Debian: redis-tools)"}
    client = bench.redis.client()
    sha = client.script_load(AUTHORIZE.source.decode())
    hasher = KeyHasher(bench.pepper)
    now = int(time.time() * 1000)
    day, month = Calendar("UTC").numbers(now)
    usec: dict[tuple[str, str], list[float]] = {}
    commands: dict[tuple[str, str], dict] = {}
    # runs under 3 s (the smoke test's tiny ones): a tenth of the calls
    script_calls = SCRIPT_CALLS if bench.args.duration >= 3 else SCRIPT_CALLS // 10

    def bench_one(*command: str, calls: int = script_calls) -> dict:
        client.config_resetstat()
        subprocess.run([binary, "-h", "127.0.0.1", "-p", str(bench.redis.port), "-n",
                        str(calls), "-P", "20", "-q", *command],
                       capture_output=True, text=True, timeout=120, check=True)
        return client.info("commandstats")
    for _ in range(SCRIPT_ROUNDS):
        for kind, key in keys.items():
            key_hash = hasher(key)
            tag = shard_of(key_hash)
            bucket = names.usage_day(tag, day)
            order = client.hkeys(bucket)     # a listpack's fields in their order
            for end, field in (("first", order[0]), ("last", order[-1])):
                stats = bench_one("HINCRBY", bucket, field, "1", calls=5 * script_calls)
                usec.setdefault((kind, f"hincrby_{end}"), []).append(
                    stats.get("cmdstat_hincrby", {}).get("usec_per_call"))
            commands[(kind, "hincrby")] = {"bucket_fields": len(order),
                                           "encoding": client.object("encoding", bucket)}
            for combo, (thresholds, days) in COMBOS.items():
                ks, argv = script_call(key_hash, now, day, month, thresholds, days)
                stats = bench_one("EVALSHA", sha, str(len(ks)), *ks, *(str(a) for a in argv))
                evalsha = stats.get("cmdstat_evalsha", {})
                calls = evalsha.get("calls") or 0
                usec.setdefault((kind, combo), []).append(evalsha.get("usec_per_call"))
                commands[(kind, combo)] = {
                    k.removeprefix("cmdstat_"): round(v["calls"] / calls, 3)
                    for k, v in stats.items()
                    if calls and v["calls"] / calls >= 0.0005
                    and not k.startswith(("cmdstat_info", "cmdstat_config"))}
    out: dict = {"calls": script_calls, "rounds": SCRIPT_ROUNDS}
    for (kind, combo), values in usec.items():
        present = [v for v in values if v is not None]
        one = {"usec_per_call": min(present) if present else None, "usec_rounds": values}
        if combo.startswith("hincrby_"):
            end = combo.removeprefix("hincrby_")
            row = out.setdefault("hincrby", {}).setdefault(kind, {**commands[(kind, "hincrby")]})
            row[f"{end}_field_usec"], row[f"{end}_field_usec_rounds"] = (
                one["usec_per_call"], values)
        else:
            out.setdefault(kind, {})[combo] = {**one,
                                               "commands_per_call": commands[(kind, combo)]}
    return out


def script_call(key_hash: str, now: int, day: int, month: int, thresholds: str = "0.2,0.05,0",
                usage_days: int = 90, reservation: str = "", ttl_ms: int = 0,
                money: int = -1) -> tuple[tuple, tuple]:
    """(KEYS, ARGV) of one allowed chat call of `key_hash` as dataplane/authorize.py builds
    them, for authorize.lua called alone (redis-benchmark, benchmarks/script_cost.py):
    by default no settlement and no price; `reservation` (an id), `ttl_ms` and `money`
    (micro-units) as with /settle on and a priced model."""
    tag = shard_of(key_hash)
    return AuthorizeArgs.pack(
        names.record(key_hash), names.wallet(tag), names.budgets(tag), names.events(tag),
        names.usage_day(tag, day), names.usage_hour(tag, now // 3_600_000),
        reservation and names.reservation(key_hash, reservation), now, 1,
        "00000000000000000000ffff7f000001", "127.0.0.1", "gpt-4o-mini",
        "chat.completions:write", "", 1, 0, names.POOL_PREFIX, ttl_ms, money, day, month,
        "c", thresholds, usage_days)


def bucket_memory(client, sample: int = 10_000) -> dict:
    """The usage history in Redis: bucket hashes by kind, their size and encoding."""
    found: dict[str, list[str]] = {"d": [], "h": []}
    counts = Counter()
    for name in client.scan_iter(match="u:*", count=5000):
        kind = name.rsplit(":", 2)[-2]
        counts[kind] += 1
        if kind in found and len(found[kind]) < sample:
            found[kind].append(name)
    out = {}
    for kind, label in (("d", "daily"), ("h", "hourly")):
        if not found[kind]:
            out[label] = {"hashes": 0}
            continue
        pipe = client.pipeline(transaction=False)
        for name in found[kind]:
            pipe.memory_usage(name, samples=0)
            pipe.hlen(name)
            pipe.object("encoding", name)
        replies = pipe.execute()
        sizes, lengths, encodings = replies[0::3], replies[1::3], replies[2::3]
        avg = sum(s or 0 for s in sizes) / len(sizes)
        out[label] = {"hashes": counts[kind], "memory_usage_avg": round(avg, 1),
                      "fields_avg": round(sum(lengths) / len(lengths), 1),
                      "fields_max": max(lengths),
                      "bytes_total_estimate": round(avg * counts[kind]),
                      "encodings": dict(Counter(encodings))}
    out["hash_max_listpack_entries"] = int(
        client.config_get("hash-max-listpack-entries")["hash-max-listpack-entries"])
    return out


def markdown(a: dict, ratio_cell, run_row, noise_line) -> list[str]:
    """RESULTS.md: the alerts section (report.py passes its cell and row formatters)."""
    n = a["repeat"]

    def ratio(key: str) -> str:
        return ratio_cell(a["ratios"], a["ratio_spread"], key, n)

    def met(key: str) -> str:
        return "met" if (a["ratios"].get(key) or 0) >= 0.9 else "not met"
    meta = a.get("meta")
    on, off = a["settings"]["on"], a["settings"]["off"]
    lines = ["", f"## Alerts and usage history: on against off (c{a['concurrency']}, "
             "1 worker, issue 12)", "",
             (f"Command: `{meta['command']}` ({meta['timestamp']}, commit {meta['git']}); "
              if meta else "Part of the full run above; ")
             + f"{n} interleaved round(s), the order of on and off alternating. On: the "
             "defaults, `alert_thresholds: "
             f"[{on['alert_thresholds'].replace(',', ', ')}]` and `usage_retention_days: "
             f"{on['usage_retention_days']}`; off: `alert_thresholds: []` and "
             f"`usage_retention_days: {off['usage_retention_days']}`. Two sidecars, the "
             "same Redis and keys. Before on and off every key is already counted in the "
             "current day's and hour's bucket (a steady hour: the hot path for a key's "
             "every call but its first of the hour); *first calls of the hour*: the same "
             "on sidecar right after all buckets were deleted, so each key's first call in "
             "the run makes its fields and sets the buckets' time to live, as every active "
             "key does when an hour (and a day) begins."]
    noise = noise_line({}, [a[k] for k in TARGETS])
    lines += ["", noise] if noise else []
    lines += ["", "| handler | req/s | p50 ms | p99 ms | µs CPU/call (server + Redis) | "
              "CPU during the run |", "|---|---:|---:|---:|---:|---|",
              *(run_row(LABELS[k], a[k], cost=True) for k in TARGETS), "",
              "| ratio | median of the per-round ratios (min–max) | aim |", "|---|---:|---|",
              f"| on / off req/s, standard keys (the hot path) | {ratio('rps')} | "
              f"≥ 0.9 ({met('rps')}) |",
              f"| on / off p99 | {ratio('p99')} | reported |",
              f"| CPU per call (server + Redis), off / on | {ratio('cpu_off_over_on')} | "
              "reported |",
              f"| sidecar CPU per call, off / on | {ratio('sidecar_cpu_off_over_on')} | "
              "reported |",
              f"| Redis CPU per decision, off / on | {ratio('redis_cpu_off_over_on')} | "
              "reported |",
              f"| first calls of the hour / off req/s | {ratio('rps_new')} | reported "
              f"(≥ 0.9: {met('rps_new')}) |",
              f"| CPU per call (server + Redis), off / first calls of the hour | "
              f"{ratio('cpu_off_over_on_new')} | reported |",
              f"| organization keys: on / off req/s | {ratio('org_rps')} | reported "
              f"(≥ 0.9: {met('org_rps')}) |",
              f"| organization keys: CPU per call (server + Redis), off / on | "
              f"{ratio('org_cpu_off_over_on')} | reported |",
              f"| organization keys: Redis CPU per decision, off / on | "
              f"{ratio('org_redis_cpu_off_over_on')} | reported |",
              f"| organization keys: first calls of the hour / off req/s | "
              f"{ratio('org_rps_new')} | reported (≥ 0.9: {met('org_rps_new')}) |",
              f"| organization keys: CPU per call (server + Redis), off / first calls | "
              f"{ratio('org_cpu_off_over_on_new')} | reported |", "",
              "Redis commands per answered call over all rounds (INFO commandstats around "
              "each run; a script's own `redis.call`s count under their names), round "
              "trips and Redis CPU:", "",
              "| keys, setting | all commands | in the script call | EVALSHA | HINCRBY | "
              "EXPIRE | XADD | calls per round trip | Redis µs CPU/decision |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in TARGETS:
        r, per = a[k], a[k]["commands_per_call"]
        lines.append(f"| {LABELS[k]} | {r['redis_commands_per_call']} | "
                     f"{r['script_commands_per_call']} | {r['evalsha_per_call']} | "
                     f"{per.get('hincrby', 0)} | {per.get('expire', 0)} | "
                     f"{per.get('xadd', 0)} | {r.get('calls_per_round_trip')} | "
                     f"{r.get('redis_cpu_us_per_decision')} |")
    lines += ["", "In the script call: EVALSHA and the script's own commands; all commands "
              "adds the idle sidecars' webhook polls (" + ", ".join(BACKGROUND) + "). "
              "EXPIRE per call, round by round, first calls of the hour: standard keys "
              f"{a['on_new']['expire_per_call_by_round']}, organization keys "
              f"{a['org_on_new']['expire_per_call_by_round']} (at most 2: the day's and the "
              "hour's bucket). authorize.lua sets a bucket's time to live whenever the "
              "key's own field in it is new, so once per key per bucket, not once per "
              f"bucket; a run draws its keys at random from {a['keys']:,} "
              f"(organization: {a['org_keys']:,}), so most of its calls are a key's first."]
    s = a.get("script", {})
    if "error" in s:
        lines += ["", f"authorize.lua alone inside Redis: not measured ({s['error']})."]
    elif s:
        lines += ["", f"authorize.lua alone inside Redis (redis-benchmark -P 20, one record "
                  f"already counted in its buckets, {s['calls']:,} calls a run, the fastest "
                  f"of {s['rounds']} interleaved runs: commandstats time, preemptions "
                  "included), µs per EVALSHA:", "",
                  "| record | off | thresholds only | history only | both (on) | "
                  "both − off | HINCRBY per call (on) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for kind, label in (("standard", "standard key (1 holder)"),
                            ("organization", "organization key (3 holders)")):
            row = s.get(kind, {})
            us = {c: row.get(c, {}).get("usec_per_call") for c in COMBOS}
            diff = round(us["on"] - us["off"], 2) if us["on"] and us["off"] else "-"
            lines.append(f"| {label} | {us['off']} | {us['thresholds']} | {us['history']} | "
                         f"{us['on']} | {diff} | "
                         f"{row.get('on', {}).get('commands_per_call', {}).get('hincrby')} |")
        h = s.get("hincrby", {})
        if h:
            lines += ["", "One HINCRBY alone on the first and on the last field of the "
                      "record's day bucket (the fastest of the same runs, µs): " + "; ".join(
                          f"{kind} key's bucket ({v['bucket_fields']} fields, "
                          f"{v['encoding']}) {v['first_field_usec']} and "
                          f"{v['last_field_usec']}" for kind, v in h.items())
                      + ". A listpack is scanned from its front, so a HINCRBY costs more the "
                      "more fields (keys of its tag counted in the bucket) lie before its "
                      "own, up to hash-max-listpack-entries (then a hashtable: constant "
                      "time, more memory). A level's field comes early (the tag's first "
                      "call makes it), a key's anywhere."]
    b = a.get("buckets", {})
    if b.get("daily", {}).get("hashes") and b.get("hourly", {}).get("hashes"):
        d, h = b["daily"], b["hourly"]
        counted = a["keys"] + a["org_keys"]
        per_day = d["bytes_total_estimate"] / counted
        per_hour = h["bytes_total_estimate"] / counted
        days = int(on["usage_retention_days"])
        keep = days * per_day + 48 * per_hour
        lines += ["", f"Usage history in Redis with every key of the section counted today "
                  f"and this hour: {d['hashes']:,} daily bucket hashes (avg "
                  f"{d['memory_usage_avg']:.0f} bytes, {d['fields_avg']:.0f} fields, at most "
                  f"{d['fields_max']}, encodings {d['encodings']}; hash-max-listpack-entries "
                  f"{b['hash_max_listpack_entries']})"
                  + f" and {h['hashes']:,} hourly ones (avg {h['memory_usage_avg']:.0f} "
                  f"bytes, {h['fields_avg']:.0f} fields)"
                  + f": ~{per_day:.0f} bytes per key in a day's bucket, ~{per_hour:.0f} in an "
                  f"hour's, so a key active every hour holds ~{keep / 1024:.0f} KiB of history "
                  f"at the defaults ({days} days, 48 hours)."]
    lines += ["", f"Keys: the main benchmark keys (standard, nothing above them: one holder, "
              f"two buckets) and {a['org_keys']:,} keys of {a['orgs']} organizations, each "
              "minted on its organization's tag under a project, without budgets (three "
              "holders: the key, its project and its organization). The one-call check "
              "before the rounds (HINCRBY per call, on / off): "
              f"{a['one_call']['on'].get('hincrby', 0)} / "
              f"{a['one_call']['off'].get('hincrby', 0)} (standard), "
              f"{a['one_call']['org_on'].get('hincrby', 0)} / "
              f"{a['one_call']['org_off'].get('hincrby', 0)} (organization). Thresholds: "
              "the benchmark's quotas never come near one, so no XADD; a crossing appends "
              "one event, once per threshold per period. See benchmarks/alerts.py."]
    return lines


def summary_line(a: dict) -> str:
    r, spread = a["ratios"], a["ratio_spread"]
    return (f"  alerts on/off req/s {r['rps']} ({'-'.join(map(str, spread['rps'] or []))}), "
            f"first calls of the hour {r['rps_new']}, org keys {r['org_rps']} "
            f"(first calls {r['org_rps_new']})  commands/call in the script on "
            f"{a['on']['script_commands_per_call']} off {a['off']['script_commands_per_call']}"
            f"  EVALSHA/call on {a['on']['evalsha_per_call']}")
