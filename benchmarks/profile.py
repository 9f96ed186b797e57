"""Where the sidecar's time per call goes: py-spy on a worker under the authorize load.

py-spy samples the worker's Python stacks (`record --format speedscope`; each sample pauses
the worker for a moment: `--nonblocking` read stacks mid-change and charged ~5x too much to
the frames around socket writes on this machine) while wrk drives /authz at the main
concurrency. Only the event-loop thread counts (the thread pool's idle waits are noise). Self time
per function, divided by the calls answered meanwhile, gives microseconds per call. C code
shows up as the Python frame that called it: uvloop's own loop (epoll, socket reads) as
the loop runner's self time, a `transport.write` as the caller's, and so on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from .load import Load, run_wrk

# Frames grouped by the file they live in: the first matching fragment names the area.
AREAS = (
    ("sidecar/dataplane/authorize.py", "sidecar: authorize handler"),
    ("sidecar/dataplane/request.py", "sidecar: request extraction"),
    ("sidecar/dataplane/decision.py", "sidecar: decision rendering"),
    ("sidecar/schema/keys.py", "sidecar: key format + HMAC"),
    ("sidecar/runtime/metrics.py", "sidecar: metrics"),
    ("sidecar/redis/", "sidecar: Redis pipeline"),
    ("sidecar/dataplane/routes.py", "sidecar: dispatch"),
    ("sidecar/dataplane/edge.py", "sidecar: HTTP server (edge.py)"),
    ("sidecar/dataplane/http_messages.py", "sidecar: HTTP server (edge.py)"),   # encode
    ("sidecar/dataplane/shedding.py", "sidecar: HTTP server (edge.py)"),
    ("sidecar/dataplane/stepping.py", "sidecar: HTTP server (edge.py)"),   # step()
    ("/sidecar/", "sidecar: other"),
    ("prometheus_client", "prometheus_client"),
    ("aiohttp/web_response", "aiohttp: response"),
    ("aiohttp/http_writer", "aiohttp: response writing"),
    ("aiohttp/web_protocol", "aiohttp: request handling"),
    ("aiohttp/", "aiohttp: other"),
    ("multidict", "multidict"),
    ("uvloop", "event loop (uvloop, C)"),
    ("asyncio/", "asyncio (Python)"),
    ("orjson", "orjson"),
)


# The process's start-up frames: under every synchronous callback, they say nothing.
_ENTRY = frozenset(("<module>", "main", "_serve", "serve", "_run_loop"))


def _area(path: str) -> str:
    for fragment, name in AREAS:
        if fragment in path:
            return name
    return "other"


def _short(path: str) -> str:
    for anchor in ("site-packages/", "/sidecar/", "lib/python3"):
        if anchor in path:
            tail = path.split(anchor, 1)[1]
            return ("sidecar/" + tail) if anchor == "/sidecar/" else tail
    return path


def pyspy_binary() -> str | None:
    """The [dev] extra's py-spy beside this Python (CI's PATH has no venv), else PATH's."""
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or \
        shutil.which("py-spy")


def profile_worker(pid: int, url: str, path: str, key_file: Path, load: Load,
                   out: Path, rate: int = 200) -> dict:
    """Record `pid` while wrk drives `url+path`; returns the summary (see summarise)."""
    binary = pyspy_binary()
    if binary is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    seconds = max(2, int(load.duration_s))
    result: dict = {}

    def drive() -> None:  # the load outlasts the recording by a second on each side
        result["wrk"] = run_wrk(url, path, key_file, Load(load.connections, seconds + 2,
                                                          load.threads, load.timeout_s),
                                {"sidecar": [pid]})

    driver = threading.Thread(target=drive)
    driver.start()
    time.sleep(1.0)
    spy = subprocess.run(
        [binary, "record", "--pid", str(pid), "--rate", str(rate), "--duration",
         str(seconds), "--format", "speedscope", "--output", str(out)],
        capture_output=True, text=True, timeout=seconds + 60)
    driver.join()
    if spy.returncode != 0 or not out.exists():
        return {"error": f"py-spy failed: {(spy.stderr or spy.stdout).strip()[-500:]}"}
    wrk = result["wrk"]
    # CPU per call from /proc over the whole wrk run: the sampler's own "busy" also counts
    # time the worker was runnable but waiting for a core, which a shared machine inflates.
    cpu_us = wrk["cpu_percent"]["sidecar"] / 100 * wrk["duration_s"] / wrk["requests"] * 1e6
    summary = summarise(json.loads(out.read_text()), cpu_us)
    summary.update(speedscope_file=str(out), seconds=seconds, rate_hz=rate, wrk=wrk)
    return summary


def summarise(doc: dict, cpu_us_per_call: float, top: int = 25) -> dict:
    """Self and inclusive time per function (all lines of a function together).

    py-spy's speedscope profiles weigh each sample in seconds of the thread being busy
    (idle samples are left out). A function's share of the busy samples times the
    measured CPU per call gives its microseconds per call.
    """
    frames = doc["shared"]["frames"]
    func_of = [(f.get("name", "?"), f.get("file", "")) for f in frames]
    self_s: Counter[tuple[str, str]] = Counter()
    total_s: Counter[tuple[str, str]] = Counter()
    areas: Counter[str] = Counter()
    busy = 0.0
    samples = 0
    for prof in doc["profiles"]:
        if "MainThread" not in prof.get("name", "MainThread"):
            continue
        weights = prof.get("weights") or [1.0] * len(prof["samples"])
        for stack, weight in zip(prof["samples"], weights, strict=False):
            if not stack:
                continue
            samples += 1
            busy += weight
            leaf = func_of[stack[-1]]  # speedscope stacks run root first, leaf last
            self_s[leaf] += weight
            areas[_area(leaf[1])] += weight
            for func in {func_of[i] for i in stack}:
                total_s[func] += weight

    def per_call_us(seconds: float) -> float:
        return round(seconds / busy * cpu_us_per_call, 2) if busy else 0.0

    def row(func: tuple[str, str], seconds: float) -> dict:
        return {"function": func[0], "where": _short(func[1]),
                "percent": round(100 * seconds / busy, 1) if busy else 0.0,
                "us_per_call": per_call_us(seconds)}

    return {
        "samples": samples,
        "busy_seconds": round(busy, 3),
        "cpu_us_per_call": round(cpu_us_per_call, 1),
        "by_area": [{"area": a, "percent": round(100 * n / busy, 1) if busy else 0.0,
                     "us_per_call": per_call_us(n)} for a, n in areas.most_common()],
        "top_self": [row(f, n) for f, n in self_s.most_common(top)],
        "sidecar_inclusive": [row(f, n) for f, n in total_s.most_common()
                              if "/sidecar/" in f[1] and f[0] not in _ENTRY][:top],
    }


def render_markdown(summary: dict, command: str, machine: str,
                    main: dict | None = None) -> str:
    if "error" in summary:
        return f"# Profile of the authorize path\n\nNot recorded: {summary['error']}\n"
    w = summary["wrk"]
    per_call = []
    for name, label in (("bare", "bare handler"), ("baseline", "baseline (authorize minus Redis)"),
                        ("authorize", "authorize"), ("nginx_lua", "NGINX + Lua peer")):
        run = (main or {}).get(name)
        if run and run.get("server_cpu_us_per_call") is not None:
            per_call.append(f"| {label} | {run['rps']:,.0f} | {run['server_cpu_us_per_call']} |")
    lines = [
        "# Profile of the authorize path",
        "",
        f"py-spy `record --rate {summary['rate_hz']}` (main thread) on the one sidecar worker "
        f"for {summary['seconds']} s while wrk drove `POST "
        f"{summary.get('path', '/authz/v1/chat/completions')}` "
        f"(random keys, c{w['connections']}): {w['rps']:,.0f} req/s, "
        f"{summary['samples']:,} samples. The worker's CPU per call over that run (from "
        f"/proc): **{summary['cpu_us_per_call']} µs**; a row's µs/call is its share of the "
        "samples times that.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}",
        "",
        "C code is charged to the Python frame that called it (uvloop's loop to the runner, "
        "socket writes to the caller). A coroutine's stack starts at the coroutine (a task "
        "has no caller chain), so inclusive times cover synchronous calls only. Samples are "
        "wall time while the thread is not idle, so on a contended machine frames that make "
        "syscalls (socket writes: the response, `Pipeline._send`) look heavier than their CPU "
        "(measured alone, `Pipeline._send` costs ~46 µs per 40-call batch, ~1.2 µs a call). "
        "Trust the /proc table below first, the shares second.",
        "",
        *(["## CPU per call of the serving process (same run, c"
            f"{w['connections']}, from /proc)", "",
            "| handler | req/s | µs CPU / call |", "|---|---:|---:|", *per_call, "",
            "authorize − baseline is what Redis costs the sidecar per call; baseline − bare "
            "is authorize's request work (body, key, model, headers, metrics).", ""]
          if per_call else []),
        "## By area (self time)",
        "",
        "| area | % of samples | µs/call |",
        "|---|---:|---:|",
    ]
    lines += [f"| {a['area']} | {a['percent']} | {a['us_per_call']} |"
              for a in summary["by_area"]]
    lines += ["", "## Top functions by self time", "",
              "| function | where | % | µs/call |", "|---|---|---:|---:|"]
    lines += [f"| `{r['function']}` | {r['where']} | {r['percent']} | {r['us_per_call']} |"
              for r in summary["top_self"]]
    lines += ["", "## Sidecar functions, inclusive time", "",
              "| function | where | % | µs/call |", "|---|---|---:|---:|"]
    lines += [f"| `{r['function']}` | {r['where']} | {r['percent']} | {r['us_per_call']} |"
              for r in summary["sidecar_inclusive"]]
    lines.append("")
    return "\n".join(lines)
