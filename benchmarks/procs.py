"""The processes a benchmark run starts, and what /proc says about them.

Everything runs on loopback, on free ports, in a temp dir; every process started here is
stopped by the `Processes` context manager, even when the run fails half way.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what} ({last})")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- /proc ------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields_ = stat.rpartition(")")[2].split()
    return (int(fields_[11]) + int(fields_[12])) / _TICK  # utime, stime


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


class CpuSampler:
    """CPU% of named process groups between start() and stop() (100% = one core)."""

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups
        self._t0 = 0.0
        self._c0: dict[str, float] = {}
        self.wall = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._c0 = {g: sum(cpu_seconds(p) for p in pids) for g, pids in self.groups.items()}

    def stop(self) -> dict[str, float]:
        wall = self.wall = max(time.monotonic() - self._t0, 1e-6)
        return {g: round(100 * (sum(cpu_seconds(p) for p in pids) - self._c0[g]) / wall, 1)
                for g, pids in self.groups.items()}


def machine_cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


# -- processes --------------------------------------------------------------------------
def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Redis:
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, decode: bool = True):
        """decode=False for the budgets hash, whose levels are packed binary."""
        import redis
        return redis.Redis(port=self.port, decode_responses=decode)


@dataclass
class Sidecar:
    proc: subprocess.Popen
    port: int
    admin_port: int
    workers: int
    log: Path
    grpc_port: int | None = None      # gRPC ext_authz listener, when started with grpc=True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The processes that serve the data plane (the supervisor's children with N>1)."""
        return [self.proc.pid] if self.workers == 1 else children(self.proc.pid)

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.admin_port}/metrics", 5)[1].decode()


@dataclass
class Nginx:
    proc: subprocess.Popen
    ports: dict[str, int]
    prefix: Path

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid)


@dataclass
class Processes:
    """Starts what a run needs; `with Processes(tmp) as p:` stops all of it at the end."""

    tmp: Path
    started: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def log_tails(self, chars: int = 1500) -> str:
        """The end of every server log, for an error message (the temp dir goes away)."""
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            out.append(f"--- {log.name}\n{text[-chars:]}")
        return "\n".join(out)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.started):
            stop_process(proc)

    def stop(self, proc: subprocess.Popen) -> None:
        stop_process(proc)
        if proc in self.started:
            self.started.remove(proc)

    def redis(self) -> Redis:
        binary = shutil.which("redis-server")
        if not binary:
            raise SystemExit("benchmarks: redis-server is required (deploy/install.sh --dev)")
        port = free_port()
        data = self.tmp / "redis"
        data.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(data), "--logfile", str(data / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started.append(proc)
        server = Redis(port, proc)
        wait_for(lambda: server.client().ping(), 10, "redis-server")
        return server

    def sidecar(self, redis_url: str, pepper: str, workers: int = 1, grpc: bool = False,
                **settings: str) -> Sidecar:
        port, admin_port = free_port(), free_port()
        grpc_port = free_port() if grpc else None
        if grpc_port:
            settings["grpc_listen"] = f"127.0.0.1:{grpc_port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SIDECAR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(SIDECAR_REDIS_URL=redis_url, SIDECAR_KEY_PEPPER=pepper,
                   SIDECAR_LOG_LEVEL="warning",
                   SIDECAR_CONFIG=str(ROOT / "config" / "sidecar.yaml"),
                   SIDECAR_LISTEN=f"127.0.0.1:{port}",
                   SIDECAR_ADMIN_LISTEN=f"127.0.0.1:{admin_port}")
        env.update({"SIDECAR_" + k.upper(): str(v) for k, v in settings.items()})
        # The sidecar of this tree, whatever `pip install -e` points at.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        log = self.tmp / f"sidecar-{port}.log"
        self.logs.append(log)
        proc = subprocess.Popen(
            # benchmarks/serve.py: `sidecar serve` with the /bench/* routes added.
            [sys.executable, "-m", "benchmarks.serve", "serve", "--workers", str(workers)],
            env=env, cwd=self.tmp, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.started.append(proc)
        car = Sidecar(proc, port, admin_port, workers, log, grpc_port)

        def ready() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"benchmarks: sidecar exited:\n{log.read_text()}")
            ok = http_get(f"http://127.0.0.1:{admin_port}/readyz", 1)[0] == 200
            # With N workers the admin listener is up before every worker listens.
            return ok and http_get(car.url + "/healthz", 1)[0] == 200 and \
                len(car.worker_pids()) == workers
        wait_for(ready, 30, "sidecar /readyz")
        return car

    def nginx(self, name: str, template: Path, values: dict[str, str],
              ports: dict[str, int]) -> Nginx:
        """A foreground nginx with its own prefix; `template` uses ${NAME} placeholders."""
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        prefix = self.tmp / name
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = template.read_text()
        for key, value in {**values, **{k.upper() + "_PORT": str(v)
                                        for k, v in ports.items()},
                           "PREFIX": str(prefix)}.items():
            conf = conf.replace("${" + key + "}", value)
        missing = re.search(r"\$\{[A-Z_]+\}", conf)
        if missing:
            raise ValueError(f"{template}: no value for {missing.group(0)}")
        (prefix / "nginx.conf").write_text(conf)
        self.logs.append(prefix / "logs" / "error.log")
        proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                 "-e", str(prefix / "logs" / "error.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.started.append(proc)
        server = Nginx(proc, ports, prefix)

        def up() -> bool:
            if proc.poll() is not None:
                log = (prefix / "logs" / "error.log")
                raise SystemExit(f"benchmarks: nginx {name} exited:\n"
                                 f"{log.read_text() if log.exists() else ''}")
            for port in ports.values():
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
            return True
        wait_for(up, 15, f"nginx {name}")
        return server
