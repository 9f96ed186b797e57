"""Shared fixtures: real redis-server and real sidecar processes, on loopback only.

Nothing here talks to the machine's own Redis on 6379: each session starts its own
redis-server on a free port in a temp dir, and every test starts from an empty database.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_sync

PEPPER = "test-pepper-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config) -> None:
    """No test may touch this machine's own sidecar store (~/.local/state/..., or
    /var/lib/... for root): the default state folder of every process the tests start
    is a fresh temporary one."""
    import tempfile
    config._sidecar_state_home = os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(
        prefix="sidecar-test-state-")


def pytest_unconfigure(config) -> None:
    if getattr(config, "_sidecar_state_home", None):
        shutil.rmtree(config._sidecar_state_home, ignore_errors=True)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, and never handed out before in this run: a test that picks two
    or three in a row (data, admin, gRPC) cannot get the same one twice."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until it is true. An error it raises means "not yet", except an
    AssertionError: that is the predicate saying it never will be (say, the process it
    waits for has exited, with its log), and fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except AssertionError:
            raise
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def npm_tool(script: str) -> list[str]:
    """argv of a JS tool that `deploy/install.sh --dev` installs in .tools/ (pinned);
    a missing one fails the test that needs it."""
    path = ROOT / ".tools" / "node_modules" / script
    node = shutil.which("node") or "/usr/bin/node"
    assert Path(node).exists(), "node is required (deploy/install.sh --dev)"
    assert path.exists(), f"{path} is missing: run deploy/install.sh --dev"
    return [node, str(path)]


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port, decode_responses=True)

    def pause(self, seconds: float) -> None:
        """Make redis-server stall (SIGSTOP), as a hung Redis would."""
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.proc.send_signal(signal.SIGCONT)


def start_redis(tmp: Path, *extra: str, port: int | None = None) -> RedisServer:
    """A private redis-server; `port` to start one again where a stopped one was."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is required (.ci/run installs it)"
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(tmp), "--logfile", str(tmp / "redis.log"), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, proc, tmp)
    wait_for(lambda: server.client().ping(), what="redis-server")
    return server


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_process(server.proc)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
async def aredis(redis_url):
    import redis.asyncio as aioredis
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def runner(redis_url):
    """The data plane's script runner (EVALSHA, pipelined) on the test Redis."""
    from sidecar.redis.runner import make_runner
    runner = make_runner(redis_url, 2.0)
    yield runner
    await runner.close()


@pytest.fixture
async def plane(aredis):
    """The control plane on the test Redis, with the sidecar's pepper: tests make their
    data through it (live.make), under the rules an operator's call would meet."""
    from sidecar.control.store import ControlStore
    from sidecar.schema.keys import KeyHasher
    return ControlStore(aredis, KeyHasher(PEPPER))


@dataclass
class Sidecar:
    proc: subprocess.Popen
    port: int
    admin_port: int
    log: Path
    grpc_port: int | None = None     # gRPC ext_authz, when started with grpc_listen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def sidecar_env(redis_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(SIDECAR_REDIS_URL=redis_url, SIDECAR_KEY_PEPPER=PEPPER,
               SIDECAR_CONFIG=str(ROOT / "config" / "sidecar.yaml"))
    env.update({"SIDECAR_" + k.upper(): str(v) for k, v in settings.items()})
    return env


def start_sidecar(tmp: Path, redis_url: str | None, *args: str,
                  env: dict[str, str] | None = None, open_files: int | None = None,
                  **settings) -> Sidecar:
    """`python -m sidecar serve` as a real process; waits until /readyz answers 200.
    redis_url None: the embedded default, in `env` (default os.environ) + `settings`.
    `open_files`: the process's RLIMIT_NOFILE, soft and hard (so it cannot raise it)."""
    import resource
    import urllib.request
    port, admin_port = free_port(), free_port()
    settings.setdefault("listen", f"127.0.0.1:{port}")
    settings.setdefault("admin_listen", f"127.0.0.1:{admin_port}")
    port = int(settings["listen"].rpartition(":")[2])
    admin_port = int(settings["admin_listen"].rpartition(":")[2])
    env = sidecar_env(redis_url, **settings) if redis_url else {
        **(env if env is not None else
           {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}),
        **{"SIDECAR_" + k.upper(): str(v) for k, v in settings.items()}}
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / f"sidecar-{port}.log"
    limit = None if open_files is None else (
        lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files)))
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", *args], env=env,
                            cwd=tmp, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            preexec_fn=limit)
    grpc = settings.get("grpc_listen")
    car = Sidecar(proc, port, admin_port, log, int(grpc.rsplit(":", 1)[1]) if grpc else None)

    def ready() -> bool:
        assert proc.poll() is None, car.logs()
        if car.grpc_port:   # listening once a TCP connect succeeds
            socket.create_connection(("127.0.0.1", car.grpc_port), timeout=1).close()
        with urllib.request.urlopen(car.admin_url + "/readyz", timeout=1) as r:
            return r.status == 200
    wait_for(ready, 20, "sidecar /readyz")
    return car


@pytest.fixture
def sidecar(tmp_path, redis_url) -> Iterator[Sidecar]:
    car = start_sidecar(tmp_path, redis_url)
    yield car
    stop_process(car.proc)


@pytest.fixture
async def http():
    import aiohttp
    async with aiohttp.ClientSession() as session:
        yield session


def run(coro):
    return asyncio.get_event_loop().run_until_complete(coro)
