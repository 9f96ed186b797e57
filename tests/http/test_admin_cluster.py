"""The control plane on a real Redis Cluster (three masters): the admin API of a sidecar
started with a redis+cluster:// URL and the CLI do their multi-key work without a
CROSSSLOT error, because an organization's keys share its hash tag and each key record
is written on its own."""

from __future__ import annotations

import pytest
from admin_helpers import Plane, cli_json
from conftest import free_port, start_redis, start_sidecar, stop_process, wait_for

SLOTS = 16384


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    nodes = []
    try:
        bus = []
        for i in range(3):    # the bus port is given: port + 10000 may not exist
            bus.append(free_port())
            nodes.append(start_redis(tmp / f"n{i}", "--cluster-enabled", "yes",
                                     "--cluster-config-file", str(tmp / f"n{i}.conf"),
                                     "--cluster-port", str(bus[i])))
        for i, node in enumerate(nodes):
            first, last = i * SLOTS // 3, (i + 1) * SLOTS // 3 - 1
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for i, node in enumerate(nodes[1:], 1):
            nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port,
                                              bus[i])
        wait_for(lambda: all(n.client().cluster("info")["cluster_state"] == "ok"
                             for n in nodes), 20, "cluster_state:ok")
        yield f"redis+cluster://127.0.0.1:{nodes[0].port}"
    finally:
        for node in nodes:
            stop_process(node.proc)


@pytest.fixture(scope="module")
def plane(cluster, tmp_path_factory):
    boot = cli_json(cluster, "admin", "bootstrap", "--org", "clustered", "--user", "o@x.io")
    car = start_sidecar(tmp_path_factory.mktemp("cluster-sidecar"), cluster)
    yield Plane(None, car, boot["organization"]["id"], boot["member"]["id"], boot["key"])
    stop_process(car.proc)


def test_every_resource_and_cascade_on_a_cluster(plane: Plane, cluster: str):
    prj = plane.ok("POST", "/projects", {"name": "p"})
    sa = plane.ok("POST", "/service_accounts", {"project_id": prj["id"], "name": "s"})
    member = plane.ok("POST", "/members", {"user": "m@x.io", "role": "admin"})
    sa_key = plane.ok("POST", "/keys", {"service_account_id": sa["id"], "unlimited": True})
    prj_key = plane.ok("POST", "/keys", {"project_id": prj["id"], "unlimited": True})
    sub = plane.ok("POST", "/subscriptions", {"account": "a", "plan": "p", "cycle_quota": 5})
    assert plane.ok("PATCH", f"/subscriptions/{sub['id']}", {"payg_fallback": True})[
        "payg_fallback"] is True

    headers = {"Idempotency-Key": "cluster-1"}
    rotated = plane.ok("POST", f"/keys/{prj_key['id']}/rotate", {"grace_seconds": 60},
                       headers=headers)
    again = plane.admin("POST", f"/keys/{prj_key['id']}/rotate", {"grace_seconds": 60},
                        headers=headers)
    assert (again.status, again.body["id"]) == (200, rotated["id"])

    assert plane.ok("DELETE", f"/service_accounts/{sa['id']}")["disabled_keys"] == [
        sa_key["id"]]
    assert plane.ok("DELETE", f"/members/{member['id']}")["deleted"] is True
    gone = plane.ok("DELETE", f"/projects/{prj['id']}")
    assert set(gone["disabled_keys"]) == {prj_key["id"], rotated["id"]}
    for key_id, reason in ((sa_key["id"], "service_account_deleted"),
                           (rotated["id"], "project_deleted")):
        assert plane.ok("GET", f"/keys/{key_id}")["disabled_reason"] == reason
    actions = [e["action"] for e in plane.ok("GET", "/audit_logs?limit=4")["data"]]
    assert actions == ["project.deleted", "member.removed", "service_account.deleted",
                       "key.rotated"]
    listed = cli_json(cluster, "keys", "list", "--type", "org")
    assert {prj_key["id"], rotated["id"], sa_key["id"]} <= {k["id"] for k in listed}
