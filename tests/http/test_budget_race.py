"""Budget and concurrency races: hundreds of calls at once over two sidecar processes,
on one Redis and on a real 3-node Redis Cluster. Many keys of one project draw on the
project's budget; many calls of one key race for its concurrency slots. Exactly the
allowed amount passes, never more: every level is checked and reserved inside one
script call, on one slot (the organization's tag).
"""

from __future__ import annotations

import collections
import json

import pytest
from conftest import PEPPER, start_sidecar, stop_process
from test_cluster import cluster, cluster_url  # noqa: F401 — the real 3-node cluster
from test_race import spread

from sidecar.control.store import ControlStore
from sidecar.redis.runner import control_client
from sidecar.schema.keys import KeyHasher

TOKEN = "budget-race-token-0123456789"
PRICES = json.dumps({"gpt-r": {"input": "1.00", "output": "10.00"}})
# x-prompt-tokens 0 (trusted) and max_tokens 100: each call reserves exactly 0.001.
BODY = json.dumps({"model": "gpt-r", "max_tokens": 100, "messages": []}).encode()
CALLS = 400


def sidecars(tmp_path_factory, url: str, n: int = 2) -> list:
    return [start_sidecar(tmp_path_factory.mktemp(f"budget-race{i}"), url,
                          settlement_token=TOKEN, prices=PRICES,
                          trusted_proxies="127.0.0.1/32") for i in range(n)]


@pytest.fixture(scope="module")
def two_sidecars(tmp_path_factory, redis_server):
    cars = sidecars(tmp_path_factory, redis_server.url)
    yield cars
    for car in cars:
        stop_process(car.proc)


@pytest.fixture(scope="module")
def cluster_sidecars(tmp_path_factory, cluster_url):  # noqa: F811
    cars = sidecars(tmp_path_factory, cluster_url)
    yield cars
    for car in cars:
        stop_process(car.proc)


async def race(cars, keys: list[str]) -> collections.Counter:
    requests = [("/authz/v1/chat/completions",
                 {"Authorization": f"Bearer {keys[i % len(keys)]}", "x-prompt-tokens": "0",
                  "Content-Type": "application/json"}, BODY) for i in range(CALLS)]
    answers = await spread(cars, requests)
    return collections.Counter(status for status, _ in answers)


async def project_budget_race(cars, plane: ControlStore) -> None:
    org = (await plane.create_org("racers"))["id"]
    project = (await plane.create_project(org, "shared"))["id"]
    await plane.set_project_limits(org, project, {"budget": "0.037"})
    keys = [(await plane.create_key(org, {"owner": "project", "project_id": project,
                                          "unlimited": True}))[1] for _ in range(20)]
    counts = await race(cars, keys)
    assert counts == {200: 37, 402: CALLS - 37}
    shown = await plane.project_limits(org, project)
    assert (shown["reserved"], shown["remaining"]) == ("0.037", "0.00")


async def concurrency_race(cars, plane: ControlStore) -> None:
    org = (await plane.create_org("busy"))["id"]
    project = (await plane.create_project(org, "p"))["id"]
    _, key = await plane.create_key(org, {"owner": "project", "project_id": project,
                                          "unlimited": True, "max_concurrency": 7})
    counts = await race(cars, [key])
    assert counts == {200: 7, 429: CALLS - 7}


@pytest.fixture
async def plane(redis_url):
    client = control_client(redis_url, 2.0, 8)
    yield ControlStore(client, KeyHasher(PEPPER))
    await client.aclose()


@pytest.fixture
async def cluster_plane(cluster_url):  # noqa: F811
    client = control_client(cluster_url, 2.0, 8)
    yield ControlStore(client, KeyHasher(PEPPER))
    await client.aclose()


async def test_many_keys_against_a_project_budget_over_two_processes(two_sidecars, plane):
    await project_budget_race(two_sidecars, plane)


async def test_many_calls_against_a_concurrency_limit_over_two_processes(two_sidecars,
                                                                          plane):
    await concurrency_race(two_sidecars, plane)


async def test_a_project_budget_race_on_a_redis_cluster(cluster_sidecars, cluster_plane):
    await project_budget_race(cluster_sidecars, cluster_plane)


async def test_a_concurrency_race_on_a_redis_cluster(cluster_sidecars, cluster_plane):
    await concurrency_race(cluster_sidecars, cluster_plane)
