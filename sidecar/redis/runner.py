"""Script runners: how a script call reaches Redis, by deployment shape.

- `PipelineRunner`: one server (redis://, rediss://, unix://) or a Sentinel-managed master
  (redis+sentinel://). Calls of a tick share one write on one connection (pipeline.py).
- `ClusterRunner`: Redis Cluster (redis+cluster://). One such pipeline per primary; a
  call goes to the node of its slot (every script call names all its keys in KEYS and
  they share a hash tag, so each call is single-slot), and MOVED refreshes the map.

Both raise `RedisUnavailable` for anything that means "Redis cannot decide now".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import NoScriptError

from ..runtime import metrics
from ..schema.scripts import ALL, Script
from .pipeline import Pipeline, RedisEndpoint, RedisUnavailable


class ScriptRunner(Protocol):
    async def run(self, script: Script, keys: tuple[str, ...], args: list) -> list: ...
    async def commands(self, calls: list[tuple[str, tuple]]) -> list: ...
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

    async def commands(self, calls: list[tuple[str, tuple]]) -> list:
        """Plain commands off the hot path (the census), `calls` = (key, args): packed in
        C and sent in this tick's batches like scripts, the replies in order. The key
        names the slot on a cluster (ClusterRunner); one server ignores it."""
        return await self.pipeline.calls([args for _, args in calls])

    async def ping(self) -> bool:
        try:
            return await self.pipeline.call("PING") in (b"PONG", "PONG")
        except RedisUnavailable:
            return False

    async def close(self) -> None:
        await self.pipeline.close()


class ClusterRunner:
    """Redis Cluster: one `Pipeline` per primary, each call sent to the node of its slot.

    A call's keys share one hash tag (names.py), hence one slot, so each call goes whole
    to one node, and a node's calls of a tick share its write, as with one server. The
    slot map comes from CLUSTER SLOTS; a MOVED reply (resharding, failover) refreshes it
    and the call is retried once on the new owner; a node that cannot be reached fails
    its calls over to the failure policy and makes the next call refresh the map.
    """

    def __init__(self, seeds: list[RedisEndpoint], timeout: float, on_connect: list[tuple]):
        self.seeds = seeds
        self.timeout = timeout
        self._on_connect = on_connect
        self._slots: list[PipelineRunner | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._nodes: dict[tuple[str, int], PipelineRunner] = {}
        self._refreshing: asyncio.Task | None = None
        self._stale = True
        self._loop = asyncio.get_event_loop()

    async def run(self, script: Script, keys: tuple[str, ...], args: list) -> list:
        # _node_of and _retried written out: this is every decision's path, and the
        # closure and two more awaits per call would cost it for nothing.
        slot = key_slot(keys[0].encode())
        for attempt in (1, 2):
            if self._stale or self._slots[slot] is None:
                await self._refresh()
            node = self._slots[slot]
            if node is None:
                raise RedisUnavailable(f"no cluster node serves slot {slot}")
            try:
                return await node.run(script, keys, args)
            except RedisUnavailable as exc:
                self._stale = True   # MOVED, ASK or a node gone: ask the cluster again
                if attempt == 2 or "MOVED" not in str(exc):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def commands(self, calls: list[tuple[str, tuple]]) -> list:
        """PipelineRunner.commands, each call on the node of its key's slot (one batch
        per node, the nodes at once)."""
        async def once() -> list:
            groups: dict[int, tuple[PipelineRunner, list[int]]] = {}
            for i, (key, _) in enumerate(calls):
                node = await self._node_of(key)
                groups.setdefault(id(node), (node, []))[1].append(i)
            parts = await asyncio.gather(*(node.commands([calls[i] for i in where])
                                           for node, where in groups.values()))
            replies: list = [None] * len(calls)
            for (_, where), got in zip(groups.values(), parts, strict=True):
                for i, reply in zip(where, got, strict=True):
                    replies[i] = reply
            return replies
        return await self._retried(once)

    async def _node_of(self, key: str) -> PipelineRunner:
        """The primary of `key`'s slot, the slot map refreshed first when it is stale."""
        slot = key_slot(key.encode())
        if self._stale or self._slots[slot] is None:
            await self._refresh()
        node = self._slots[slot]
        if node is None:
            raise RedisUnavailable(f"no cluster node serves slot {slot}")
        return node

    async def _retried(self, once):
        """once(); after a MOVED (resharding, failover) once more on a new slot map."""
        for attempt in (1, 2):
            try:
                return await once()
            except RedisUnavailable as exc:
                self._stale = True   # MOVED, ASK or a node gone: ask the cluster again
                if attempt == 2 or "MOVED" not in str(exc):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _refresh(self) -> None:
        """One CLUSTER SLOTS at a time, shared by every call that needs it."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self._loop.create_task(self._load_slots())
        await self._refreshing

    async def _load_slots(self) -> None:
        known = [r.pipeline.endpoint for r in self._nodes.values()]
        last: Exception | None = None
        for endpoint in [*known, *self.seeds]:
            try:
                slots = await self._node(endpoint).pipeline.call("CLUSTER", "SLOTS")
            except RedisUnavailable as exc:
                last = exc
                continue
            table: list[PipelineRunner | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            for start, end, primary, *_ in slots:
                host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
                node = self._node(replace(endpoint, host=host or endpoint.host,
                                          port=int(primary[1])))
                table[start:end + 1] = [node] * (end - start + 1)
            self._slots, self._stale = table, False
            return
        metrics.redis_error("cluster")
        raise RedisUnavailable(f"no cluster node answered CLUSTER SLOTS: {last}")

    def _node(self, endpoint: RedisEndpoint) -> PipelineRunner:
        runner = self._nodes.get((endpoint.host, endpoint.port))
        if runner is None:
            runner = PipelineRunner(Pipeline(endpoint, self.timeout, self._on_connect))
            self._nodes[(endpoint.host, endpoint.port)] = runner
        return runner

    async def ping(self) -> bool:
        try:
            if self._stale:
                await self._refresh()
        except RedisUnavailable:
            return False
        nodes = {id(n): n for n in self._slots if n is not None}.values()
        return bool(nodes) and all([await n.ping() for n in nodes])

    async def close(self) -> None:
        for runner in self._nodes.values():
            await runner.close()


@dataclass(frozen=True)
class _SentinelUrl:
    hosts: list[tuple[str, int]]
    service: str
    db: int
    password: str | None


def _sentinel_url(url: str) -> _SentinelUrl:
    """redis+sentinel://[:password@]host[:port][,host[:port]]/service_name[/db]"""
    parts = urlsplit(url)
    hosts = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.rpartition(":")
        hosts.append((host or item, int(port) if port.isdigit() else 26379))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("redis+sentinel URL needs the service name as its path")
    return _SentinelUrl(hosts, path[0], int(path[1]) if len(path) > 1 else 0, parts.password)


def _sentinel_source(url: str, timeout: float):
    """A coroutine function finding the current master, for the hot-path Pipeline."""
    found = _sentinel_url(url)
    sentinel = Sentinel(found.hosts, socket_timeout=timeout)

    async def current_master() -> RedisEndpoint:
        host, port = await sentinel.discover_master(found.service)
        return RedisEndpoint(host=host, port=port, password=found.password, db=found.db)

    return current_master


def _cluster_seeds(url: str) -> list[RedisEndpoint]:
    """redis+cluster://[:password@]host:port[,host:port...] -> one RedisEndpoint per seed."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    scheme = parts.scheme.replace("+cluster", "")
    auth = userinfo + "@" if userinfo else ""
    return [replace(RedisEndpoint.from_url(f"{scheme}://{auth}{host}"), db=0)
            for host in hosts.split(",") if host]


def make_runner(url: str, timeout_s: float) -> ScriptRunner:
    """The hot-path runner for a Redis URL (see the module docstring)."""
    scheme = urlsplit(url).scheme
    load = [("SCRIPT", "LOAD", s.source) for s in ALL]
    if scheme.endswith("+cluster"):
        return ClusterRunner(_cluster_seeds(url), timeout_s, load)
    if scheme == "redis+sentinel":
        return PipelineRunner(Pipeline(_sentinel_source(url, timeout_s), timeout_s, load))
    return PipelineRunner(Pipeline(RedisEndpoint.from_url(url), timeout_s, load))


async def run_script(client, script: Script, keys: tuple, argv: tuple):
    """A script call through a redis-py client (control plane, webhook worker), by the same
    rule as the hot path: EVALSHA, and EVAL (which also caches it) when the server does not
    have the script yet. RedisCluster routes it by its keys (one hash tag: one slot)."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *argv)
    except NoScriptError:
        return await client.eval(script.source, len(keys), *keys, *argv)


def control_client(url: str, timeout_s: float, pool_size: int):
    """redis-py client for the control plane (admin API, CLI): a sized, blocking pool."""
    scheme = urlsplit(url).scheme
    if scheme.endswith("+cluster"):
        return RedisCluster.from_url(url.replace("+cluster", "", 1), socket_timeout=timeout_s,
                                     max_connections=pool_size)
    if scheme == "redis+sentinel":
        found = _sentinel_url(url)
        return Sentinel(found.hosts, socket_timeout=timeout_s).master_for(
            found.service, password=found.password, db=found.db, socket_timeout=timeout_s)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=timeout_s * 4,
        socket_timeout=timeout_s * 4, socket_connect_timeout=timeout_s * 4)
    return aioredis.Redis(connection_pool=pool)
