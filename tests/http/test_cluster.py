"""A sidecar on a real 3-node Redis Cluster (redis+cluster://): keys made through the
control plane (ControlStore) on a cluster client land on different nodes, every call is
decided on the node holding its key (record and wallet share a hash tag), and the
exact-quota race holds.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import time

import aiohttp
import pytest
from conftest import PEPPER, free_port, start_redis, start_sidecar, stop_process, wait_for
from live import CLIENT_TIMEOUT, authz, balance, disable, hash_of, make
from redis.crc import key_slot

from sidecar.control.store import ControlStore
from sidecar.redis.runner import control_client, make_runner
from sidecar.schema import names
from sidecar.schema.contracts import AuthorizeArgs
from sidecar.schema.keys import KeyHasher, KeyType, shard_of
from sidecar.schema.scripts import AUTHORIZE

BODY = {"model": "gpt-x", "messages": []}


def cluster_port() -> int:
    """Redis refuses ports above 55535 in cluster mode (bus port = port + 10000)."""
    for _ in range(100):
        port = free_port()
        if port <= 55535:
            return port
    raise RuntimeError("no free port at or below 55535")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    nodes = []
    try:
        for i in range(3):
            folder = base / f"node{i}"
            nodes.append(start_redis(
                folder, "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", str(folder / "nodes.conf"),
                "--cluster-node-timeout", "2000", port=cluster_port()))
        made = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stdout + made.stderr
        wait_for(lambda: all(n.client().cluster("info")["cluster_state"] == "ok"
                             for n in nodes), 30, "cluster_state:ok")
        yield nodes
    finally:
        for node in nodes:
            stop_process(node.proc)


@pytest.fixture(scope="module")
def cluster_url(cluster) -> str:
    return f"redis+cluster://127.0.0.1:{cluster[0].port}"   # any node; the rest is found


@pytest.fixture(scope="module")
def car(cluster_url, tmp_path_factory):
    sidecar = start_sidecar(tmp_path_factory.mktemp("car"), cluster_url,
                            webhook_allowed_networks="127.0.0.0/8")   # the test receiver
    yield sidecar
    stop_process(sidecar.proc)


@pytest.fixture
async def plane(cluster_url):
    """The control plane on its cluster client (redis-py RedisCluster)."""
    client = control_client(cluster_url, 2.0, 8)
    yield ControlStore(client, KeyHasher(PEPPER))
    await client.aclose()


async def statuses(http, car, key: str, n: int, **call) -> list[int]:
    return [(await authz(http, car, key=key, body=BODY, **call)).status for _ in range(n)]


async def test_decisions_on_keys_spread_over_the_nodes(cluster, car, plane, http):
    org_id = (await plane.create_org("o1"))["id"]
    project_id = (await plane.create_project(org_id, "p1"))["id"]
    made = {
        "quota": await make(plane, quota=1),
        "models": await make(plane, unlimited=True, models=["gpt-other"]),
        "ips": await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8"]),
        "rpm": await make(plane, unlimited=True, rpm=1),
        "disabled": await make(plane, unlimited=True),
        "org": await make(plane, type=KeyType.org, unlimited=True, org=org_id,
                          project_id=project_id),
        "payg": await make(plane, type=KeyType.subscription, quota=1, account="acct_c",
                           payg_fallback=True),
    }
    made.update({f"plain{i}": await make(plane, quota=3) for i in range(8)})
    await disable(plane, made["disabled"][0])
    await plane.set_account_balance(None, "acct_c", 1)

    # The records really are spread: more than one node holds key records.
    holders = [n for n in cluster if n.client().keys("k:*")]
    assert len(holders) >= 2

    key = {name: plaintext for name, (_, plaintext) in made.items()}
    assert await statuses(http, car, key["quota"], 2) == [200, 402]
    assert await statuses(http, car, key["models"], 1) == [403]
    assert await statuses(http, car, key["ips"], 1) == [403]
    assert await statuses(http, car, key["rpm"], 2) == [200, 429]
    assert await statuses(http, car, key["disabled"], 1) == [401]
    # Subscription cycle, then the wallet (same hash tag as the record), then 402.
    assert await statuses(http, car, key["payg"], 3) == [200, 200, 402]
    assert await balance(plane, "acct_c") == 0
    org = await authz(http, car, key=key["org"], body=BODY)
    assert (org.status, org.headers["x-org-id"], org.headers["x-project-id"]) == (
        200, org_id, project_id)
    for i in range(8):
        assert await statuses(http, car, key[f"plain{i}"], 4) == [200, 200, 200, 402]
        view = await plane.key(None, made[f"plain{i}"][0])
        assert (view["quota_used"], view["quota_remaining"], view["last_model"]) == (
            3, 0, "gpt-x")

    # Revocation through the cluster client is seen on the next call.
    plain_id, plain = made["plain0"]
    await plane.set_key_quota(None, plain_id, set_to=5)
    assert await statuses(http, car, plain, 1) == [200]
    await plane.delete_key(None, plain_id)
    assert await statuses(http, car, plain, 1) == [401]
    listed = await plane.all_keys()
    assert {v["id"] for v in listed} == {i for name, (i, _) in made.items() if name != "plain0"}


async def test_scripts_are_loaded_again_after_a_flush(cluster, car, plane, http):
    _, key = await make(plane, quota=10)
    assert await statuses(http, car, key, 1) == [200]
    for node in cluster:
        node.client().script_flush()
    assert await statuses(http, car, key, 2) == [200, 200]


async def test_exact_quota_race_through_the_cluster(car, plane):
    key_id, key = await make(plane, quota=37)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100),
                                     timeout=CLIENT_TIMEOUT) as session:
        async def one() -> int:
            async with session.post(car.url + "/authz/v1/chat/completions", json=BODY,
                                    headers=headers) as resp:
                await resp.read()
                return resp.status
        counts = collections.Counter(await asyncio.gather(*(one() for _ in range(300))))
    assert counts == {200: 37, 402: 263}
    view = await plane.key(None, key_id)
    assert (view["quota_used"], view["quota_remaining"]) == (37, 0)


async def test_a_stale_slot_map_follows_moved_and_recovers(cluster_url, plane):
    """The runner's map names the wrong node (as after a resharding or a failover): that
    node answers MOVED, the runner asks the cluster again and the call is decided anyway,
    once."""
    key_id, key = await make(plane, quota=5)
    key_hash = hash_of(key)
    shard = shard_of(key_hash)
    keys = (names.record(key_hash), names.wallet(shard), names.budgets(shard),
            names.events(shard), names.usage_day(shard, 0),
            names.usage_hour(shard, 0))
    slot = key_slot(keys[0].encode())
    runner = make_runner(cluster_url, 2.0)
    try:
        argv = AuthorizeArgs(*keys, "", int(time.time() * 1000), 1, "", "", "gpt-x",
                             "chat.completions:write", "", 1, 0).argv()
        assert (await runner.run(AUTHORIZE, keys, argv))[0] == 0
        right = runner._slots[slot]
        runner._slots[slot] = next(n for n in runner._nodes.values() if n is not right)
        assert (await runner.run(AUTHORIZE, keys, argv))[0] == 0
        assert runner._slots[slot] is right
        assert (await plane.key(None, key_id))["quota_used"] == 2
    finally:
        await runner.close()


async def test_webhook_events_on_every_node_are_delivered_once(cluster_url, car, tmp_path):
    """Events in streams of tags on all three nodes, from the control plane (keys
    disabled) and as a script writes them (no ev:active: another slot), reach the
    organization's endpoint once each, across two sidecars on the cluster."""
    from redis.cluster import RedisCluster
    from webhook_receiver import Receiver, drained

    from sidecar.control.store import ControlStore
    receiver = Receiver()
    second = start_sidecar(tmp_path / "hooks", cluster_url,
                           webhook_allowed_networks="127.0.0.0/8")
    client = control_client(cluster_url, 2.0, 8)
    sync = RedisCluster.from_url(cluster_url.replace("+cluster", ""), decode_responses=True)
    try:
        control = ControlStore(client, KeyHasher(PEPPER))
        org = (await control.create_org("hooks"))["id"]
        receiver.secret = (await control.create_webhook(org, {"url": receiver.url}))["secret"]
        project = await control.create_project(org, "p")
        ids = [(await control.create_key(org, {"project_id": project["id"]}))[0]["id"]
               for _ in range(6)]
        for key_id in ids:
            await control.set_key_status(org, key_id, False)
        tags = ["000", "555", "aaa", "fff"]
        assert len({sync.nodes_manager.get_node_from_slot(key_slot(
            names.events(t).encode())).name for t in tags}) == 3
        for tag in tags:
            sync.xadd(names.events(tag), {"t": "quota.exhausted", "k": "key_" + tag,
                                          "o": org, "l": "k", "th": "0", "r": "0"})
        wait_for(lambda: len(receiver.calls) >= len(ids) + len(tags), 30, "every event")
        wait_for(lambda: drained(sync), 30, "the streams to drain")
        got = receiver.events()
        assert len(got) == len(ids) + len(tags) and all(c["valid"] for c in receiver.calls)
        assert sorted(e["data"]["key_id"] for e in got) == sorted(
            ids + ["key_" + t for t in tags])
        assert len({e["id"] for e in got}) == len(got)
    finally:
        sync.close()
        await client.aclose()
        receiver.close()
        stop_process(second.proc)


async def test_the_threshold_census_counts_the_keys_of_every_node(cluster_url, car, plane,
                                                                  http):
    """On a cluster the census reads the key index (one slot) and the records and a
    rotation's shared pool in pipelines across the three nodes; each key counted once."""
    from redis.cluster import RedisCluster

    from sidecar.runtime.census import load, store, take_census
    from sidecar.runtime.config import Settings
    settings = Settings()
    records = make_runner(cluster_url, 2.0)    # the records, per node, as serve's census
    before = (await take_census(plane.redis, records, settings, "test")).counts
    spent = [await make(plane, quota=1) for _ in range(30)]
    for _, key in spent:
        assert await statuses(http, car, key, 1) == [200]     # nothing left
    old_id, old = await make(plane, quota=2)
    assert await statuses(http, car, old, 1) == [200]
    new = (await plane.rotate_key(None, old_id, grace_s=600))["key"]
    assert await statuses(http, car, new, 2) == [200, 402]  # the pool: 0, counted once
    sync = RedisCluster.from_url(cluster_url.replace("+cluster", ""))
    try:
        assert len({sync.nodes_manager.get_node_from_slot(key_slot(
            names.record(hash_of(key)).encode())).name for _, key in spent}) == 3
    finally:
        sync.close()
    taken = await take_census(plane.redis, records, settings, "test")
    await records.close()
    assert taken.complete
    assert {k: n - before[k] for k, n in taken.counts.items()} == {
        (kind, t): 31 if kind == "quota" else 0
        for kind in ("quota", "budget") for t in ("0.2", "0.05", "0")}
    await store(plane.redis, taken)
    assert await load(plane.redis) == taken
