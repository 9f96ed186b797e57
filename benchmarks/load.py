"""One wrk run: the load, the latency percentiles and the CPU each process used meanwhile."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import CpuSampler, machine_cpu_busy

WRK_SCRIPT = Path(__file__).with_name("wrk_authz.lua")


@dataclass(frozen=True)
class Load:
    connections: int
    duration_s: float
    threads: int = 1
    timeout_s: float = 5.0


def wrk_binary() -> str:
    binary = shutil.which("wrk")
    if not binary:
        raise SystemExit("benchmarks: wrk is required (deploy/install.sh --dev)")
    return binary


def run_wrk(url: str, path: str, key_file: Path | None, load: Load,
            cpu_groups: dict[str, list[int]] | None = None) -> dict:
    """wrk against url+path; returns req/s, latency (ms) and per-process CPU%."""
    cmd = [wrk_binary(), f"-t{load.threads}", f"-c{max(load.connections, load.threads)}",
           f"-d{max(1, round(load.duration_s))}s", f"--timeout={max(1, round(load.timeout_s))}s",
           "-s", str(WRK_SCRIPT), url + path, "--", path,
           str(key_file) if key_file else "-"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = CpuSampler(dict(cpu_groups or {}))
    sampler.start()
    busy0, total0 = machine_cpu_busy()
    # wrk's own CPU: from the rusage of reaped children (its /proc entry is gone by then).
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out, err = proc.communicate(timeout=load.duration_s + 60)
    cpu = sampler.stop()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, total1 = machine_cpu_busy()
    wall = sampler.wall
    cpu["wrk"] = round(100 * (child1.ru_utime + child1.ru_stime - child0.ru_utime
                              - child0.ru_stime) / wall, 1)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip() or out.strip()}")
    raw = json.loads(line[len("WRK_JSON "):])
    busy = 100 * (busy1 - busy0) / max(total1 - total0, 1)
    # CPU that processes outside this benchmark took meanwhile (100 = one core): the noise.
    others = max(0.0, busy * (os.cpu_count() or 1) - sum(cpu.values()))
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    pct = lat["percentiles"]
    errors = raw["errors"]
    return {
        "connections": load.connections,
        "threads": load.threads,
        "duration_s": round(seconds, 3),
        "requests": raw["requests"],
        "rps": round(raw["requests"] / seconds, 1),
        "non_2xx": errors["status"],
        "socket_errors": errors["connect"] + errors["read"] + errors["write"]
        + errors["timeout"],
        "latency_ms": {"mean": round(lat["mean"] / 1000, 3),
                       "p50": round(pct["50"] / 1000, 3), "p75": round(pct["75"] / 1000, 3),
                       "p90": round(pct["90"] / 1000, 3), "p99": round(pct["99"] / 1000, 3),
                       "p99.9": round(pct["99.9"] / 1000, 3),
                       "max": round(lat["max"] / 1000, 3)},
        "cpu_percent": cpu,
        "machine_busy_percent": round(busy, 1),
        "other_processes_cpu_percent": round(others, 1),
    }
