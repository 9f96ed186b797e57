"""Webhooks over real sockets (issue 12): a local HTTP receiver that checks every
signature the Standard Webhooks way, sidecar processes on one Redis, the CLI.

- an event (a key disabled) reaches the receiver once, across two sidecars;
- a receiver answering 500 gets retries, then the event is a dead letter that
  `sidecar webhooks dead-letters` lists and `sidecar webhooks replay` delivers;
- nothing happening sends nothing;
- an organization's endpoints (admin API) get its events, signed with their own secret.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from admin_helpers import cli, cli_json, request
from conftest import PEPPER, start_sidecar, stop_process, wait_for
from live import metric_value
from webhook_receiver import SECRET, Receiver, drained, endpoints

from sidecar.control.store import ControlStore
from sidecar.schema import names
from sidecar.schema.keys import KeyHasher


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


async def make_key(aredis, org_name: str = "acme") -> tuple[ControlStore, str, dict]:
    control = ControlStore(aredis, KeyHasher(PEPPER))
    org = await control.create_org(org_name)
    project = await control.create_project(org["id"], "alerts")
    view, _ = await control.create_key(org["id"], {"project_id": project["id"],
                                                   "quota": 100})
    return control, org["id"], view


async def test_a_disabled_key_is_delivered_once_across_two_sidecars(
        tmp_path, redis_server, redis_url, aredis, receiver):
    cars = [start_sidecar(tmp_path / f"car{i}", redis_url, webhooks=endpoints(receiver))
            for i in range(2)]
    try:
        control, org, key = await make_key(aredis)
        await control.set_key_status(org, key["id"], False)
        wait_for(lambda: receiver.calls, 15, "the webhook")
        wait_for(lambda: drained(redis_server.client()), 15, "the streams to drain")
        assert len(receiver.calls) == 1
        call = receiver.calls[0]
        assert call["valid"] and call["status"] == 200
        event = json.loads(call["body"])
        assert call["headers"]["webhook-id"] == event["id"]
        assert call["headers"]["content-type"] == "application/json"
        assert event["type"] == "key.disabled" and event["object"] == "event"
        assert event["data"]["key_id"] == key["id"]
        assert event["data"]["organization_id"] == org
        assert event["data"]["project_id"] == key["project_id"]
        assert event["data"]["level"] == "key" and event["data"]["reason"] == "disabled by cli"
        # Disabling it again is no new event; the next key's disable is one more.
        await control.set_key_status(org, key["id"], False)
        key2 = (await control.create_key(org, {"project_id": key["project_id"]}))[0]
        await control.set_key_status(org, key2["id"], False)
        wait_for(lambda: len(receiver.calls) == 2, 15, "the second webhook")
        wait_for(lambda: drained(redis_server.client()), 15, "the streams to drain")
        assert [e["data"]["key_id"] for e in receiver.events()] == [key["id"], key2["id"]]
        for car in cars:
            assert "not-for-logs" not in car.logs() and SECRET not in car.logs()
    finally:
        for car in cars:
            stop_process(car.proc)


async def test_a_failing_receiver_gets_retries_then_a_dead_letter_and_a_replay(
        tmp_path, redis_server, redis_url, aredis, receiver):
    receiver.status = 500
    car = start_sidecar(tmp_path / "car", redis_url, webhooks=endpoints(receiver),
                        webhook_retry_window_s=1.5, webhook_backoff_s=0.1,
                        webhook_backoff_max_s=0.4)
    try:
        control, org, key = await make_key(aredis)
        await control.set_key_status(org, key["id"], False)
        client = redis_server.client()
        wait_for(lambda: client.xlen(names.DEAD_LETTERS) == 1, 15, "the dead letter")
        attempts = list(receiver.calls)
        assert len(attempts) >= 2
        assert all(a["valid"] and a["status"] == 500 for a in attempts)
        event_id = attempts[0]["headers"]["webhook-id"]
        assert {a["headers"]["webhook-id"] for a in attempts} == {event_id}
        wait_for(lambda: drained(redis_server.client()), 15, "the stream to drain")
        assert len(receiver.calls) == len(attempts)   # no attempt after the dead letter

        letters = cli_json(redis_url, "webhooks", "dead-letters")
        assert [(d["event_id"], d["type"], d["attempts"]) for d in letters] == [
            (event_id, "key.disabled", len(attempts))]
        assert letters[0]["url"] == receiver.url.partition("?")[0]   # no query shown
        assert letters[0]["last_error"] == "HTTP 500"
        human = cli(redis_url, "webhooks", "dead-letters")
        assert human.returncode == 0 and event_id in human.stdout

        receiver.status = 200
        done = cli(redis_url, "webhooks", "replay", event_id)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: receiver.calls[-1]["status"] == 200, 15, "the replay")
        wait_for(lambda: drained(redis_server.client()), 15, "the stream to drain")
        replayed = [c for c in receiver.calls if c["status"] == 200]
        assert len(replayed) == 1 and replayed[0]["valid"]
        assert replayed[0]["headers"]["webhook-id"] == event_id
        assert json.loads(replayed[0]["body"]) == json.loads(attempts[0]["body"])
        assert cli_json(redis_url, "webhooks", "dead-letters") == []
        assert "not-for-logs" not in car.logs() and SECRET not in car.logs()
        shown = urllib.request.urlopen(car.admin_url + "/metrics", timeout=5).read().decode()
        outcome = "sidecar_webhook_deliveries_total"
        assert metric_value(shown, outcome, {"outcome": "failed"}) == len(attempts)
        assert metric_value(shown, outcome, {"outcome": "dead_letter"}) == 1
        assert metric_value(shown, outcome, {"outcome": "delivered"}) == 1
        assert metric_value(shown, "sidecar_webhook_dead_letters_total") == 1
        assert metric_value(shown, "sidecar_webhook_delivery_lag_seconds_count") == 1
        assert "key_" not in "".join(line for line in shown.splitlines()
                                     if line.startswith("sidecar_webhook"))
    finally:
        stop_process(car.proc)


def test_replay_of_nothing_is_one_error_line(redis_url):
    for args in (("replay", "evt_nothing"), ("replay", "--all")):
        done = cli(redis_url, "webhooks", *args)
        if args[-1] == "--all":
            assert done.returncode == 0 and "0 " in done.stdout
        else:
            assert done.returncode == 1
            assert done.stderr.strip().count("\n") == 0 and "evt_nothing" in done.stderr
    done = cli(redis_url, "webhooks", "replay")
    assert done.returncode == 2 and "Traceback" not in done.stderr


async def test_nothing_happening_sends_nothing(tmp_path, redis_server, redis_url, aredis,
                                               receiver):
    car = start_sidecar(tmp_path / "car", redis_url, webhooks=endpoints(receiver))
    try:
        control, org, key = await make_key(aredis)
        await control.edit_key(org, key["id"], {"name": "renamed"})
        await control.set_key_status(org, key["id"], True)        # active already
        await control.set_key_quota(org, key["id"], add=5)
        answer = request(car.port, "POST", "/authz/v1/chat/completions",
                         {"model": "gpt-x", "messages": []}, "sk-" + "x" * 40)
        assert answer.status == 401
        # Then one thing happens: once the streams are drained it is all that came.
        await control.set_key_status(org, key["id"], False)
        wait_for(lambda: receiver.calls, 15, "the webhook")
        wait_for(lambda: drained(redis_server.client()), 15, "the streams to drain")
        assert [e["type"] for e in receiver.events()] == ["key.disabled"]
    finally:
        stop_process(car.proc)


async def test_an_organizations_endpoint_gets_its_events_signed_with_its_secret(
        tmp_path, redis_server, redis_url, aredis, receiver):
    car = start_sidecar(tmp_path / "car", redis_url,           # no global endpoint; the
                        webhook_allowed_networks="127.0.0.0/8")  # receiver is on loopback
    theirs = Receiver()
    try:
        boot = cli_json(redis_url, "admin", "bootstrap", "--org", "acme", "--user",
                        "owner@example.com")
        admin, org = boot["key"], boot["organization"]["id"]
        hooks = "/admin/v1/webhooks"
        made = request(car.admin_port, "POST", hooks, {"url": receiver.url,
                                                      "events": ["key.disabled"]}, admin)
        assert made.status == 201, made.body
        assert made.body["secret"].startswith("whsec_") and made.body["events"] == [
            "key.disabled"]
        receiver.secret = made.body["secret"]
        listed = request(car.admin_port, "GET", hooks, key=admin).body["data"]
        assert [w["id"] for w in listed] == [made.body["id"]]
        assert "secret" not in listed[0]
        for bad in ({"url": "ftp://example.com/x"}, {"url": "https://u:p@example.com/"},
                    {"url": receiver.url, "secret": "not-a-secret"},
                    {"url": receiver.url, "events": ["quota.gone"]}, {"url": 5},
                    {"url": "http://169.254.169.254/latest/meta-data/"},
                    {"url": "http://10.1.2.3:8081/admin/v1/keys"},
                    {"url": "http://[::ffff:10.1.2.3]/"}):
            answer = request(car.admin_port, "POST", hooks, bad, admin)
            assert answer.status == 400 and answer.body["error"]["param"] in (
                "url", "secret", "events[0]"), (bad, answer.body)
        # Another organization's endpoint and keys are not this one's.
        other = cli_json(redis_url, "admin", "bootstrap", "--org", "beta", "--user",
                         "b@example.com")
        mine = request(car.admin_port, "POST", hooks, {"url": theirs.url}, other["key"])
        theirs.secret = mine.body["secret"]
        assert request(car.admin_port, "GET", f"{hooks}/{mine.body['id']}",
                       key=admin).status == 404
        assert request(car.admin_port, "DELETE", f"{hooks}/{mine.body['id']}",
                       key=admin).status == 404

        control = ControlStore(aredis, KeyHasher(PEPPER))
        project = await control.create_project(org, "p")
        key, _ = await control.create_key(org, {"project_id": project["id"]})
        assert request(car.admin_port, "POST", f"/admin/v1/keys/{key['id']}/disable",
                       {}, admin).status == 200
        wait_for(lambda: receiver.calls, 15, "the webhook")
        wait_for(lambda: drained(redis_server.client()), 15, "the streams to drain")
        assert len(receiver.calls) == 1 and receiver.calls[0]["valid"]
        assert receiver.events()[0]["data"]["key_id"] == key["id"]
        assert theirs.calls == []
        assert request(car.admin_port, "DELETE", f"{hooks}/{made.body['id']}",
                       key=admin).status == 200
        assert request(car.admin_port, "GET", hooks, key=admin).body["data"] == []
    finally:
        theirs.close()
        stop_process(car.proc)


async def test_an_entry_written_as_a_script_writes_it_is_found_and_delivered(
        tmp_path, redis_server, redis_url, aredis, receiver):
    """The scripts' contract (schema/events.py): flat fields in the key's tag stream, no
    id, no ev:active (as on Redis Cluster); the worker's sweep finds it."""
    car = start_sidecar(tmp_path / "car", redis_url, webhooks=endpoints(receiver))
    try:
        client = redis_server.client()
        entry = client.xadd(names.events("abc"), {"t": "quota.low", "k": "key_1",
                                                  "o": "org_1", "l": "k", "th": "0.2",
                                                  "r": "19", "lim": "100"})
        client.xadd(names.events("abd"), {"t": "not.an.event", "k": "key_2"})
        assert not client.exists(names.EVENTS_ACTIVE)
        wait_for(lambda: receiver.calls, 20, "the swept event")
        wait_for(lambda: drained(client), 15, "the streams to drain")
        assert len(receiver.calls) == 1 and receiver.calls[0]["valid"]
        event = receiver.events()[0]
        assert event["id"] == f"evt_abc_{entry}"
        assert (event["type"], event["data"]["threshold"], event["data"]["remaining"],
                event["data"]["limit"], event["data"]["level"]) == (
            "quota.low", 0.2, 19, 100, "key")
    finally:
        stop_process(car.proc)


async def test_the_worker_outlives_a_redis_outage(tmp_path, receiver):
    import redis.asyncio as aioredis
    from conftest import start_redis
    server = start_redis(tmp_path / "redis")
    car = start_sidecar(tmp_path / "car", server.url, webhooks=endpoints(receiver))
    try:
        port = server.port
        stop_process(server.proc)
        wait_for(lambda: "webhooks_redis_error" in car.logs(), 15, "the outage seen")
        server = start_redis(tmp_path / "redis", port=port)
        client = aioredis.from_url(server.url)
        try:
            control, org, key = await make_key(client)
            await control.set_key_status(org, key["id"], False)
        finally:
            await client.aclose()
        wait_for(lambda: receiver.calls, 15, "the webhook after the outage")
        assert receiver.events()[0]["data"]["key_id"] == key["id"]
        assert car.proc.poll() is None
    finally:
        stop_process(car.proc)
        stop_process(server.proc)


def test_cli_manages_an_organizations_endpoints(redis_url):
    cli_json(redis_url, "orgs", "create", "acme")
    added = cli(redis_url, "webhooks", "add", "https://hooks.example/a?t=1", "--org", "acme",
                "--events", "quota.low,key.disabled")
    assert added.returncode == 0, added.stderr
    secret = added.stdout.split()[-1]
    assert secret.startswith("whsec_") and "shown once" in added.stdout
    listed = cli_json(redis_url, "webhooks", "endpoints", "--org", "acme")
    assert [(w["url"], w["events"]) for w in listed] == [
        ("https://hooks.example/a?t=1", ["quota.low", "key.disabled"])]
    assert secret not in json.dumps(listed)
    for bad, field in ((("ftp://hooks.example/",), "url"),
                       (("https://u:p@hooks.example/",), "url"),
                       (("https://hooks.example/b", "--events", "nope"), "events"),
                       (("https://hooks.example/b", "--secret", "whsec_x"), "secret")):
        done = cli(redis_url, "webhooks", "add", *bad, "--org", "acme")
        assert done.returncode == 2 and done.stderr.startswith(f"sidecar: error: {field}")
        assert done.stderr.count("\n") == 1 and "u:p" not in done.stderr
    removed = cli(redis_url, "webhooks", "remove", listed[0]["id"], "--org", "acme")
    assert removed.returncode == 0 and "Deleted" in removed.stdout
    again = cli(redis_url, "webhooks", "remove", listed[0]["id"], "--org", "acme")
    assert again.returncode == 1 and again.stderr.count("\n") == 1


async def test_an_organizations_endpoint_never_reaches_a_private_address(
        tmp_path, redis_server, redis_url, aredis, receiver):
    """Made past the configuration check (the control plane alone, which cannot know the
    settings): the delivery refuses loopback by name and by address, and sends nothing."""
    car = start_sidecar(tmp_path / "car", redis_url, webhook_retry_window_s=0.5,
                        webhook_backoff_s=0.1, webhook_backoff_max_s=0.2)
    try:
        control, org, key = await make_key(aredis)
        for url in (f"http://localhost:{receiver.port}/hook",
                    f"http://127.0.0.1:{receiver.port}/hook"):
            await control.create_webhook(org, {"url": url})
        await control.set_key_status(org, key["id"], False)
        client = redis_server.client()
        wait_for(lambda: client.xlen(names.DEAD_LETTERS) == 2, 15, "two dead letters")
        letters = cli_json(redis_url, "webhooks", "dead-letters")
        assert sorted(d["url"] for d in letters) == sorted([
            f"http://localhost:{receiver.port}/hook", f"http://127.0.0.1:{receiver.port}/hook"])
        assert all("refused" in d["last_error"] for d in letters), letters
        assert receiver.calls == []
    finally:
        stop_process(car.proc)


async def test_serve_with_workers_delivers_once_and_counts_it(tmp_path, redis_server,
                                                              redis_url, aredis, receiver):
    """--workers 2: the supervisor runs the one delivery worker; /metrics aggregates."""
    from live import start_workers
    car = start_workers(tmp_path / "car", redis_url, 2, webhooks=endpoints(receiver))
    try:
        control, org, key = await make_key(aredis)
        await control.set_key_status(org, key["id"], False)
        wait_for(lambda: receiver.calls, 15, "the webhook")
        wait_for(lambda: drained(redis_server.client()), 15, "the streams to drain")
        assert len(receiver.calls) == 1 and receiver.calls[0]["valid"]
        shown = urllib.request.urlopen(car.admin_url + "/metrics", timeout=5).read().decode()
        assert metric_value(shown, "sidecar_webhook_deliveries_total",
                            {"outcome": "delivered"}) == 1
    finally:
        stop_process(car.proc)


async def test_an_event_a_dead_sidecar_took_is_taken_over(tmp_path, redis_server, redis_url,
                                                          aredis, receiver):
    """A consumer of the group reads an event and dies before delivering it: after the
    claim time (4 x webhook_timeout_s + 1 s) a live sidecar takes it (XAUTOCLAIM)."""
    client = redis_server.client()
    control, org, key = await make_key(aredis)
    await control.set_key_status(org, key["id"], False)
    (tag,) = [t for t, _ in client.zrange(names.EVENTS_ACTIVE, 0, -1, withscores=True)]
    stream = names.events(tag)
    client.xgroup_create(stream, names.EVENT_GROUP, id="0")
    taken = client.xreadgroup(names.EVENT_GROUP, "dead-sidecar", {stream: ">"})
    assert len(taken[0][1]) == 1                       # pending on the dead consumer
    car = start_sidecar(tmp_path / "car", redis_url, webhooks=endpoints(receiver),
                        webhook_timeout_s=0.5)
    try:
        wait_for(lambda: receiver.calls, 20, "the taken-over event")
        wait_for(lambda: drained(client), 15, "the stream to drain")
        assert len(receiver.calls) == 1 and receiver.calls[0]["valid"]
        assert receiver.events()[0]["data"]["key_id"] == key["id"]
    finally:
        stop_process(car.proc)
