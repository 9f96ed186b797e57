"""Process lifecycle of `sidecar serve`: SIGTERM drains in-flight calls and exits 0,
`--workers 2` shares the port and stops every process, and the embedded default starts
and stops its own redis-server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import orjson
from conftest import start_redis, start_sidecar, stop_process, wait_for
from live import (
    alive,
    authz,
    children,
    cli,
    key_on,
    make,
    metric_value,
    socket_inodes,
    start_workers,
    tcp_inodes,
)

BODY = {"model": "gpt-x", "messages": []}


def events(log: str) -> list[str]:
    """The `event` of every JSON log line (each line must be JSON)."""
    out = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue   # the embedded default's human hint on stderr
        out.append(orjson.loads(line).get("event"))
    return out


async def test_sigterm_drains_in_flight_calls(tmp_path, http):
    redis = start_redis(tmp_path / "redis")
    car = None
    try:
        key = await key_on(redis.url)
        # Long Redis timeout: the calls wait for Redis instead of failing over to 503.
        car = start_sidecar(tmp_path / "car", redis.url, redis_timeout_ms=5000)
        assert (await authz(http, car, key=key, body=BODY)).status == 200

        redis.proc.send_signal(signal.SIGSTOP)
        calls = [asyncio.ensure_future(authz(http, car, key=key, body=BODY))
                 for _ in range(8)]
        # In flight: the sidecar holds their connections (and Redis is not answering).
        await asyncio.to_thread(
            wait_for, lambda: len(tcp_inodes(car.port, "01") & socket_inodes(car.proc.pid))
            >= 8, 10, "8 calls in flight")
        car.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_for, lambda: "draining" in car.logs(), 10, "draining")
        redis.proc.send_signal(signal.SIGCONT)

        answers = await asyncio.gather(*calls)
        assert [a.status for a in answers] == [200] * 8        # real answers, no resets
        assert await asyncio.to_thread(car.proc.wait, 20) == 0
        seen = events(car.logs())
        assert seen[0] == "start" and seen[-1] == "stopped"
        assert {"listening", "draining"} <= set(seen)
        [record] = redis.client().keys("k:*")
        assert redis.client().hget(record, "n") == "9"      # 1 + the 8 drained calls
    finally:
        if car is not None:
            stop_process(car.proc)
        stop_process(redis.proc)


def answering_pid(port: int, client_port: int, pids: list[int]) -> int | None:
    """Which process holds the server side of the connection from `client_port`."""
    ours = tcp_inodes(port, "01", remote_port=client_port)
    return next((pid for pid in pids if socket_inodes(pid) & ours), None)


async def test_two_workers_answer_aggregate_and_stop(tmp_path, redis_url, plane):
    car = start_workers(tmp_path, redis_url, 2)
    workers: list[int] = []
    try:
        workers = children(car.proc.pid)
        assert len(workers) == 2
        _, key = await make(plane, unlimited=True)
        request = (f"POST /authz/v1/chat/completions HTTP/1.1\r\nHost: s\r\n"
                   f"Authorization: Bearer {key}\r\nContent-Length: 2\r\n\r\n{{}}").encode()
        answered_by = set()
        connections = []
        try:
            for _ in range(24):   # SO_REUSEPORT spreads new connections over the workers
                conn = socket.create_connection(("127.0.0.1", car.port), timeout=5)
                connections.append(conn)
                conn.sendall(request)
                assert conn.recv(4096).startswith(b"HTTP/1.1 200 ")
                answered_by.add(answering_pid(car.port, conn.getsockname()[1], workers))
        finally:
            for conn in connections:
                conn.close()
        assert answered_by == set(workers)

        def metrics() -> str:
            import urllib.request
            with urllib.request.urlopen(car.admin_url + "/metrics", timeout=5) as resp:
                return resp.read().decode()
        # Each worker adds its tallies every metrics.FLUSH_S: all 24 show, never more.
        def counted() -> float:
            return metric_value(metrics(), "sidecar_decisions_total",
                                {"status": "200", "code": "ok"})
        await asyncio.to_thread(wait_for, lambda: counted() >= 24, 10, "24 decisions shown")
        assert await asyncio.to_thread(counted) == 24

        car.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(car.proc.wait, 30) == 0
        await asyncio.to_thread(wait_for, lambda: not any(alive(p) for p in workers), 10,
                                "workers gone")
    finally:
        stop_process(car.proc)
        for pid in workers:
            if alive(pid):   # never leave an orphan behind, even when the test failed
                os.kill(pid, signal.SIGKILL)


async def test_embedded_default_starts_and_stops_its_redis(tmp_path, http):
    state = tmp_path / "state"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
           "SIDECAR_STATE_DIR": str(state)}
    car = start_sidecar(tmp_path, None, state_dir=str(state))
    redis_pids: list[int] = []
    try:
        redis_pids = [p for p in children(car.proc.pid)
                      if Path(f"/proc/{p}/comm").read_text().strip() == "redis-server"]
        assert len(redis_pids) == 1
        assert (state / "pepper").exists()
        assert list(state.rglob("*.aof")), "AOF is on"

        made = cli("", "keys", "create", "--quota", "2", "--json", cwd=tmp_path, env=env)
        assert made.returncode == 0, made.stderr
        key = orjson.loads(made.stdout)["key"]
        statuses = [(await authz(http, car, key=key, body=BODY)).status for _ in range(3)]
        assert statuses == [200, 200, 402]
        shown = cli("", "keys", "show", orjson.loads(made.stdout)["id"], "--json",
                    cwd=tmp_path, env=env)
        assert orjson.loads(shown.stdout)["quota_used"] == 2

        car.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(car.proc.wait, 30) == 0
        assert not alive(redis_pids[0])
        seen = events(car.logs())
        assert {"start", "embedded_redis", "stopped", "embedded_redis_stopped"} <= set(seen)
    finally:
        stop_process(car.proc)
        for pid in redis_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
