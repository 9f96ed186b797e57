"""`sidecar serve`: the listeners, the worker processes, the embedded Redis, the drain.

Process model
- workers == 1: one process runs the data plane, the admin listener and (when embedded)
  supervises redis-server; it binds without SO_REUSEPORT.
- workers == N: the supervisor runs the admin listener and redis-server and starts N
  worker processes that share the data-plane port (SO_REUSEPORT, set by them alone);
  metrics are shared through PROMETHEUS_MULTIPROC_DIR. A worker that dies is started again.
- Before anything starts, `serve` holds the state folder's lock (embedded.py) and checks
  both ports with a bind that any other listener conflicts with (check_free).
SIGTERM / SIGINT: stop accepting, let in-flight calls finish (shutdown_timeout_s), close
Redis, then stop redis-server last.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from aiohttp import web

from ..dataplane.edge import EdgeServer
from ..dataplane.routes import data_plane
from . import fdlimit, logs
from .config import ConfigError, Refused, Settings, parse_hostport
from .embedded import EmbeddedRedis


def require_grpc(settings: Settings) -> None:
    """grpc_listen needs the [grpc] extra: one line at start, not a worker crash loop."""
    if settings.grpc_listen:
        try:
            from ..dataplane import grpc_authz  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"grpc_listen: needs the grpc extra "
                              f"(pip install 'llm-key-sidecar[grpc]'): {exc}") from None


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run(settings: Settings, *, data: bool, admin: bool,
              embedded: EmbeddedRedis | None = None, stop: asyncio.Event | None = None,
              worker: bool = False) -> None:
    """Serve until `stop` (default: SIGTERM/SIGINT), then drain. redis_url must be set."""
    from ..redis.runner import make_runner
    from . import metrics  # here: metrics must not load before the env is set
    from .census import run_census
    from .webhooks import run_worker

    loop = asyncio.get_running_loop()
    stop = stop or _stop_on_signals()
    open_files = fdlimit.raise_open_file_limit()   # every process, before any listener

    runner = make_runner(settings.redis_url, settings.redis_timeout_ms / 1000)
    runners: list[web.BaseRunner] = []
    edge: EdgeServer | None = None
    grpc_server = None
    if data:
        host, port = parse_hostport(settings.listen, "listen")
        edge, authorize = data_plane(settings, runner)
        # SO_REUSEPORT only among this server's own workers (`worker`: one of the N that
        # `serve --workers N` starts); one process binds without it, so nothing can share.
        with _bind_errors(settings.listen, "listen"):
            await edge.listen(host, port, reuse_port=worker)
        if settings.grpc_listen:
            # Same loop, same runner: both modes' calls share the Redis batches.
            from ..dataplane import grpc_authz
            host, port = parse_hostport(settings.grpc_listen, "grpc_listen")
            with _bind_errors(settings.grpc_listen, "grpc_listen"):
                grpc_server = await grpc_authz.start(settings, authorize, host, port,
                                                     reuse_port=worker)
        metrics.start_flushing(loop)   # the hot path's tallies reach /metrics
    if admin:  # one process (the supervisor) runs it: no SO_REUSEPORT
        runners.append(await _admin_listener(settings, runner))
    logs.event("listening", pid=os.getpid(), data=settings.listen if data else None,
               grpc=settings.grpc_listen if grpc_server else None,
               admin=settings.admin_listen if admin else None, open_files=open_files,
               max_connections=edge.max_connections if edge else None)

    # Everything this process loaded to serve (modules, settings, scripts, the app) lives
    # as long as it does: frozen out of the cyclic collector, a full collection only
    # walks what calls made since. Unfrozen, a full collection walked them all: up to ~38
    # ms with every call of the process waiting (measured under the benchmark's load).
    gc.collect()
    gc.freeze()
    watch = loop.create_task(_supervise_redis(embedded, stop)) if embedded else None
    # Beside the admin listener: one delivery worker per sidecar (sidecars on one Redis
    # share the events through a consumer group, webhooks.py) and the threshold census
    # (one sidecar of the deployment takes it at a time, every one shows it, census.py).
    background_stop = asyncio.Event()
    background = [loop.create_task(run_worker(settings, background_stop)),
                  loop.create_task(run_census(settings, background_stop))] if admin else []
    await stop.wait()
    logs.event("draining", pid=os.getpid(), timeout_s=settings.shutdown_timeout_s)
    drains = []
    if edge is not None:   # in-flight calls finish first
        drains.append(edge.shutdown(settings.shutdown_timeout_s))
    if grpc_server is not None:
        drains.append(grpc_server.stop(settings.shutdown_timeout_s))
    await asyncio.gather(*drains)
    metrics.flush()           # what the last calls tallied, before the process ends
    background_stop.set()     # deliveries under way stay pending for a takeover
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*background, return_exceptions=True), 5)
    for r in runners:
        await r.cleanup()
    if watch:
        watch.cancel()
    await runner.close()
    logs.event("stopped", pid=os.getpid())


async def _admin_listener(settings: Settings, runner) -> web.AppRunner:
    from .admin_app import admin_app
    host, port = parse_hostport(settings.admin_listen, "admin_listen")
    app_runner = web.AppRunner(await admin_app(settings, runner), handle_signals=False,
                               shutdown_timeout=settings.shutdown_timeout_s, access_log=None)
    await app_runner.setup()
    with _bind_errors(settings.admin_listen, "admin_listen"):
        await web.TCPSite(app_runner, host, port, reuse_port=False).start()
    return app_runner


def check_free(address: str, name: str) -> None:
    """Refuse a listen address another process holds, before anything starts.

    The probe binds without SO_REUSEPORT, so a listener that set it (a second sidecar, or
    anything else) still conflicts; SO_REUSEADDR only lets it past the TIME_WAIT
    connections a previous run left, never past a listener.
    """
    host, port = parse_hostport(address, name)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise Refused(f"{name}: cannot resolve {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe, _bind_errors(address, name):
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(sockaddr)


@contextlib.contextmanager
def _bind_errors(address: str, name: str):
    """A bind that fails is one line naming the setting, not a traceback."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise Refused(f"{name}: {address}: address in use (another process listens "
                          "there; stop it or choose another port)") from None
        raise Refused(f"{name}: {address}: cannot listen ({exc.strerror})") from None


async def _supervise_redis(embedded: EmbeddedRedis, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(0.5)
        if not embedded.alive() and not stop.is_set():
            logs.event("embedded_redis_restart", reason="redis-server exited")
            try:
                await asyncio.to_thread(embedded.start)
            except Exception as exc:  # keep supervising; readyz reports the outage
                logs.event("embedded_redis_failed", error=str(exc))


def serve(settings: Settings, embedded: EmbeddedRedis | None, config_path: str | None) -> int:
    """Entry of `sidecar serve` once settings are resolved. Returns the exit code."""
    logs.event("start", workers=settings.workers, listen=settings.listen,
               grpc=settings.grpc_listen, admin=settings.admin_listen,
               embedded_redis=embedded is not None, redis=_shown(settings),
               failure_mode=settings.failure_mode)
    try:
        if settings.workers == 1:
            _run_loop(run(settings, data=True, admin=True, embedded=embedded))
        else:
            _supervise_workers(settings, embedded, config_path)
    finally:
        if embedded is not None:
            embedded.stop()
            logs.event("embedded_redis_stopped")
    return 0


# The module workers are started with (`python -m WORKER_ENTRY serve --worker-process`): a
# wrapper that adds routes from outside (benchmarks/serve.py) names itself here.
WORKER_ENTRY = "sidecar"


def _supervise_workers(settings: Settings, embedded: EmbeddedRedis | None,
                       config_path: str | None) -> None:
    env = dict(os.environ, SIDECAR_REDIS_URL=settings.redis_url,
               SIDECAR_KEY_PEPPER=settings.key_pepper)
    procs: list[subprocess.Popen] = []

    def spawn() -> subprocess.Popen:
        cmd = [sys.executable, "-m", WORKER_ENTRY, "serve", "--worker-process"]
        if config_path:
            cmd += ["--config", config_path]
        return subprocess.Popen(cmd, env=env)

    procs = [spawn() for _ in range(settings.workers)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stopping = _stop_on_signals()
        admin_task = loop.create_task(run(settings, data=False, admin=True, embedded=embedded,
                                          stop=stopping))
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)
            for i, p in enumerate(procs):
                if p.poll() is not None and not stopping.is_set():
                    logs.event("worker_restart", code=p.returncode)
                    procs[i] = spawn()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_timeout_s + 5
        for p in procs:
            try:
                await asyncio.to_thread(p.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        await admin_task

    _run_loop(main())


def prepare_multiprocess_metrics(workers: int) -> None:
    """Must run before prometheus_client is imported by our metrics module."""
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sidecar-metrics-")


def _run_loop(coro) -> None:
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(coro)


def _shown(settings: Settings) -> str:
    from .config import mask_url
    return mask_url(settings.redis_url or "")
