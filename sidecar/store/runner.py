"""Script runners: how a script call reaches Redis, by deployment shape.

- `PipelineRunner`: one server (redis://, rediss://, unix://) or a Sentinel-managed master
  (redis+sentinel://). Calls of a tick share one write on one connection (pipeline.py).
- `ClusterRunner`: Redis Cluster (redis+cluster://). Calls of a tick go out as one
  redis-py cluster pipeline, which groups them by node; every script call names all its
  keys in KEYS and they share a hash tag, so each call is single-slot.

Both raise `RedisUnavailable` for anything that means "Redis cannot decide now".
"""

from __future__ import annotations

import asyncio
from typing import Protocol
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoScriptError, RedisError

from .. import metrics
from .pipeline import Endpoint, Pipeline, RedisUnavailable
from .scripts import ALL, Script


class ScriptRunner(Protocol):
    async def run(self, script: Script, keys: tuple[str, ...], args: list) -> list: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


class PipelineRunner:
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    async def run(self, script: Script, keys: tuple[str, ...], args: list) -> list:
        command = hiredis.pack_command((b"EVALSHA", script.sha, len(keys), *keys, *args))
        future, index = self.pipeline.submit(command)
        reply = (await future)[index]
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("NOSCRIPT"):
                # Scripts are loaded on every new connection; this only happens after a
                # SCRIPT FLUSH on a live connection. Load again and retry once.
                await self.pipeline.call("SCRIPT", "LOAD", script.source)
                future, index = self.pipeline.submit(command)
                reply = (await future)[index]
            if isinstance(reply, hiredis.ReplyError):
                metrics.redis_error("reply")
                raise RedisUnavailable(f"{script.name}: {reply}")
        return reply

    async def ping(self) -> bool:
        try:
            return await self.pipeline.call("PING") in (b"PONG", "PONG")
        except RedisUnavailable:
            return False

    async def close(self) -> None:
        await self.pipeline.close()


class ClusterRunner:
    def __init__(self, cluster: RedisCluster, timeout: float):
        self.cluster = cluster
        self.timeout = timeout
        self._pending: list[tuple[Script, tuple[str, ...], list, asyncio.Future]] = []
        self._loop = asyncio.get_event_loop()

    async def run(self, script: Script, keys: tuple[str, ...], args: list) -> list:
        future = self._loop.create_future()
        if not self._pending:
            self._loop.call_soon(lambda: self._loop.create_task(self._flush()))
        self._pending.append((script, keys, args, future))
        return await future

    async def _flush(self) -> None:
        calls, self._pending = self._pending, []
        metrics.redis_batch(len(calls))
        try:
            replies = await asyncio.wait_for(self._execute(calls), self.timeout)
            again = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if again:
                # A node lost its script cache (restart, failover, SCRIPT FLUSH): load the
                # scripts on every primary, then retry only those calls, once.
                await asyncio.wait_for(self._load_scripts(), self.timeout)
                retried = await asyncio.wait_for(
                    self._execute([calls[i] for i in again]), self.timeout)
                for i, reply in zip(again, retried, strict=True):
                    replies[i] = reply
        except Exception as exc:  # noqa: BLE001 - every caller must get an answer
            # Timeouts, connection and cluster errors (RedisClusterException is not a
            # RedisError), and anything unforeseen: a future left pending would hang the
            # proxy's call, so each one fails over to the failure policy instead.
            metrics.redis_error("cluster")
            for *_, future in calls:
                if not future.done():
                    future.set_exception(RedisUnavailable(str(exc) or type(exc).__name__))
            return
        for (*_, future), reply in zip(calls, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                metrics.redis_error("reply")
                future.set_exception(RedisUnavailable(str(reply)))
            else:
                future.set_result(reply)

    async def _execute(self, calls: list) -> list:
        """One cluster pipeline (redis-py groups it by node). `pipe.evalsha` is blocked in
        cluster pipelines; the raw command routes by its keys, which share one slot."""
        pipe = self.cluster.pipeline(transaction=False)
        for script, keys, args, _ in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    async def _load_scripts(self) -> None:
        for script in ALL:
            await self.cluster.script_load(script.source)   # sent to every primary

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.cluster.ping(), self.timeout))
        except (TimeoutError, RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.cluster.aclose()


def _sentinel_source(url: str, timeout: float):
    """redis+sentinel://[:password@]host:port[,host:port]/service_name[/db]"""
    parts = urlsplit(url)
    hosts = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.rpartition(":")
        hosts.append((host or item, int(port) if port.isdigit() else 26379))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("redis+sentinel URL needs the service name as its path")
    service, db = path[0], int(path[1]) if len(path) > 1 else 0
    sentinel = Sentinel(hosts, socket_timeout=timeout)

    async def current_master() -> Endpoint:
        host, port = await sentinel.discover_master(service)
        return Endpoint(host=host, port=port, password=parts.password, db=db)

    return current_master


def make_runner(url: str, timeout_s: float) -> ScriptRunner:
    """The hot-path runner for a Redis URL (see the module docstring)."""
    scheme = urlsplit(url).scheme
    load = [("SCRIPT", "LOAD", s.source) for s in ALL]
    if scheme.endswith("+cluster"):
        plain = url.replace("+cluster", "", 1)
        cluster = RedisCluster.from_url(plain, socket_timeout=timeout_s,
                                        socket_connect_timeout=timeout_s)
        return ClusterRunner(cluster, timeout_s)
    if scheme == "redis+sentinel":
        return PipelineRunner(Pipeline(_sentinel_source(url, timeout_s), timeout_s, load))
    return PipelineRunner(Pipeline(Endpoint.from_url(url), timeout_s, load))


def control_client(url: str, timeout_s: float, pool_size: int):
    """redis-py client for the control plane (admin API, CLI): a sized, blocking pool."""
    scheme = urlsplit(url).scheme
    if scheme.endswith("+cluster"):
        return RedisCluster.from_url(url.replace("+cluster", "", 1), socket_timeout=timeout_s,
                                     max_connections=pool_size)
    if scheme == "redis+sentinel":
        parts = urlsplit(url)
        hosts = [(h.rpartition(":")[0], int(h.rpartition(":")[2]))
                 for h in parts.netloc.rsplit("@", 1)[-1].split(",")]
        service = [p for p in parts.path.split("/") if p][0]
        return Sentinel(hosts, socket_timeout=timeout_s).master_for(
            service, password=parts.password, socket_timeout=timeout_s)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=timeout_s * 4,
        socket_timeout=timeout_s * 4, socket_connect_timeout=timeout_s * 4)
    return aioredis.Redis(connection_pool=pool)
