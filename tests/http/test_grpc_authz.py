"""gRPC ext_authz (Check) against a running sidecar: what only this transport has.

The decision table itself runs over both transports in test_http_authorize.py. Here: who
is believed about the client (the trusted-proxy rule on attributes.source, headers never
choosing the IP, Envoy's method and path winning over X-Original-* headers, the cost
header), Redis trouble answered as a DeniedHttpResponse 503 with the JSON, bounded
bodies, --workers N serving Check on one port, and both modes sharing one Redis pipeline.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import grpc
import pytest
from conftest import free_port, start_redis, start_sidecar, stop_process, wait_for
from live import (
    CHAT,
    MESSAGES,
    authz,
    check,
    children,
    key_on,
    make,
    socket_inodes,
    start_workers,
    tcp_inodes,
)

BODY = {"model": "gpt-x", "messages": []}


@pytest.fixture(scope="module")
def trusted(tmp_path_factory, redis_server):
    """Envoy (here: the test, 127.0.0.1) is a trusted proxy; it may give the cost."""
    car = start_sidecar(tmp_path_factory.mktemp("trusted"), redis_server.url,
                        trusted_proxies="127.0.0.1/32", cost_header="x-cost",
                        grpc_listen=f"127.0.0.1:{free_port()}")
    yield car
    stop_process(car.proc)


@pytest.fixture(scope="module")
def untrusted(tmp_path_factory, redis_server):
    car = start_sidecar(tmp_path_factory.mktemp("untrusted"), redis_server.url,
                        cost_header="x-cost", max_body_bytes=1024,
                        grpc_listen=f"127.0.0.1:{free_port()}")
    yield car
    stop_process(car.proc)


def channel(car):
    return grpc.aio.insecure_channel(f"127.0.0.1:{car.grpc_port}")


async def test_client_ip_is_the_source_a_trusted_envoy_saw(trusted, untrusted, plane):
    _, key = await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8"])
    async with channel(trusted) as ch:
        ok = await check(ch, key=key, body=BODY, source="10.1.2.3")
        assert ok.status == 200
        # Headers never choose the IP, even through a trusted Envoy: it passes them on as
        # the client sent them.
        for name in ("x-envoy-external-address", "x-client-ip", "x-real-ip",
                     "x-forwarded-for"):
            denied = await check(ch, key=key, body=BODY, source="192.168.1.1",
                                 headers={name: "10.1.2.3"}, ip_headers_as_source=False)
            assert (denied.status, denied.json["error"]["code"]) == (403, "ip_not_allowed")
    async with channel(untrusted) as ch:
        # From an untrusted gRPC peer the source is not believed: the peer is the client.
        denied = await check(ch, key=key, body=BODY, source="10.1.2.3")
        assert (denied.status, denied.json["error"]["code"]) == (403, "ip_not_allowed")
    key_id, local = await make(plane, unlimited=True, allowed_ips=["127.0.0.1"])
    async with channel(untrusted) as ch:
        assert (await check(ch, key=local, body=BODY, source="10.1.2.3")).status == 200
    assert (await plane.key(None, key_id))["last_ip"] == "127.0.0.1"


async def test_method_and_path_are_envoys_not_the_clients(trusted, plane):
    key_id, reader = await make(plane, unlimited=True, permission="read-only")
    renamed = {"x-original-method": "GET", "x-original-uri": "/v1/models",
               "x-forwarded-method": "GET", "x-forwarded-uri": "/v1/models"}
    async with channel(trusted) as ch:
        denied = await check(ch, CHAT, key=reader, body=BODY, headers=renamed)
        assert (denied.status, denied.json["error"]["code"]) == (403, "permission_denied")
        anthropic = await check(ch, MESSAGES, api_key=reader, body=BODY, headers=renamed)
        assert anthropic.status == 403 and anthropic.json["type"] == "error"
        assert (await check(ch, "/v1/models", method="GET", key=reader)).status == 200


async def test_cost_header_counts_only_from_a_trusted_envoy(trusted, untrusted, plane):
    key_id, key = await make(plane, quota=100)
    async with channel(trusted) as ch:
        assert (await check(ch, key=key, body=BODY, headers={"x-cost": "7"})).status == 200
    assert (await plane.key(None, key_id))["quota_remaining"] == 93
    async with channel(untrusted) as ch:
        assert (await check(ch, key=key, body=BODY, headers={"x-cost": "7"})).status == 200
    assert (await plane.key(None, key_id))["quota_remaining"] == 92     # the default cost, 1
    async with channel(trusted) as ch:
        bad = await check(ch, key=key, body=BODY, headers={"x-cost": "²"})
    assert (bad.status, bad.json["error"]["code"]) == (400, "bad_cost")


async def test_bodies_are_bounded_like_on_the_http_edge(untrusted, plane, http):
    """max_body_bytes 1024: a model named before the cut is read but uncertain."""
    _, listed = await make(plane, unlimited=True, models=["gpt-x"])
    key_id, free = await make(plane, unlimited=True)
    long = b'{"model": "gpt-x", "messages": [{"role": "user", "content": "' + \
        b"x" * 4000 + b'"}]}'
    async with channel(untrusted) as ch:
        denied = await check(ch, key=listed, body=long)
        assert (denied.status, denied.json["error"]["code"]) == (403, "model_not_allowed")
        assert (await check(ch, key=free, body=long)).status == 200
    assert (await plane.key(None, key_id))["last_model"] == "gpt-x"
    over_http = await authz(http, untrusted, key=listed, body=long)
    assert over_http.status == denied.status and over_http.raw == denied.raw


async def test_malformed_checks_get_a_denial_not_an_error(untrusted):
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
    async with channel(untrusted) as ch:
        stub = pb_grpc.AuthorizationStub(ch)
        empty = await stub.Check(pb.CheckRequest(), timeout=10)
        assert empty.denied_response.status.code == 401
        assert b"missing_api_key" in empty.denied_response.body.encode()
        with pytest.raises(grpc.aio.AioRpcError) as err:   # beyond max_body + headroom
            request = pb.CheckRequest()
            request.attributes.request.http.raw_body = b"x" * (2 * 1024 * 1024)
            await stub.Check(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_transport_refuses_what_is_not_one_plain_check(untrusted):
    """grpc_server.py over a real socket, as a gRPC client sees it: another method is
    UNIMPLEMENTED, a compressed message UNIMPLEMENTED (none is accepted), a message that
    is not a CheckRequest INTERNAL; the connection keeps serving Checks after each."""
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
    async with channel(untrusted) as ch:
        stub = pb_grpc.AuthorizationStub(ch)
        other = ch.unary_unary("/envoy.service.auth.v3.Authorization/Other",
                               request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
        raw = ch.unary_unary("/envoy.service.auth.v3.Authorization/Check",
                             request_serializer=lambda b: b,
                             response_deserializer=lambda b: b)
        compressible = pb.CheckRequest()   # grpcio sends what gzip cannot shrink plain
        compressible.attributes.request.http.raw_body = b"x" * 4000
        for call, expected in (
                (other(b"", timeout=10), grpc.StatusCode.UNIMPLEMENTED),
                (stub.Check(compressible, timeout=10, compression=grpc.Compression.Gzip),
                 grpc.StatusCode.UNIMPLEMENTED),
                (raw(b"\xff\xff\xff", timeout=10), grpc.StatusCode.INTERNAL)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == expected
            still = await stub.Check(pb.CheckRequest(), timeout=10)
            assert still.denied_response.status.code == 401


async def test_checks_multiplexed_on_one_connection_all_get_their_own_answer(untrusted,
                                                                           plane):
    """200 Checks at once on one HTTP/2 connection, keys of two kinds interleaved: each
    stream gets the answer of its own request."""
    _, listed = await make(plane, unlimited=True, models=["gpt-x"])
    _, other = await make(plane, unlimited=True, models=["gpt-y"])
    async with channel(untrusted) as ch:
        answers = await asyncio.gather(*(
            check(ch, key=listed if i % 2 else other, body=BODY) for i in range(200)))
    assert [a.status for a in answers] == [200 if i % 2 else 403 for i in range(200)]


async def test_bytes_that_are_not_http2_close_only_their_connection(untrusted):
    """Garbage on the gRPC port: that connection is closed; others are served."""
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
    reader, writer = await asyncio.open_connection("127.0.0.1", untrusted.grpc_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
    await writer.drain()
    got = await asyncio.wait_for(reader.read(), 10)    # until the server closes
    assert b"HTTP/1.1 200" not in got
    writer.close()
    async with channel(untrusted) as ch:
        answer = await pb_grpc.AuthorizationStub(ch).Check(pb.CheckRequest(), timeout=10)
    assert answer.denied_response.status.code == 401


async def test_stalled_redis_is_a_json_503_envoy_passes_on(tmp_path):
    redis = start_redis(tmp_path / "redis")
    car = start_sidecar(tmp_path / "car", redis.url, redis_timeout_ms=150,
                        grpc_listen=f"127.0.0.1:{free_port()}")
    try:
        redis.proc.send_signal(signal.SIGSTOP)
        async with channel(car) as ch:
            for path, anthropic in ((CHAT, False), (MESSAGES, True)):
                answer = await check(ch, path, key="sk-" + "A" * 40, body=BODY)
                assert answer.status == 503
                assert answer.headers["content-type"] == "application/json"
                if anthropic:
                    assert answer.json["error"]["type"] == "api_error"
                else:
                    assert answer.json["error"]["code"] == "service_unavailable"
    finally:
        stop_process(car.proc)
        stop_process(redis.proc)


async def test_sigterm_answers_the_checks_in_flight_then_exits(tmp_path, plane):
    """SIGTERM with Checks waiting on a stopped Redis: the server says GOAWAY, takes no
    new stream, answers those in flight once Redis is back, and exits 0."""
    redis = start_redis(tmp_path / "redis")
    car = None
    try:
        key = await key_on(redis.url)
        car = start_sidecar(tmp_path / "car", redis.url, redis_timeout_ms=5000,
                            grpc_listen=f"127.0.0.1:{free_port()}")
        async with channel(car) as ch:
            assert (await check(ch, key=key, body=BODY)).status == 200
            redis.proc.send_signal(signal.SIGSTOP)
            calls = [asyncio.ensure_future(check(ch, key=key, body=BODY)) for _ in range(8)]
            await asyncio.sleep(0.5)            # sent, waiting on Redis
            car.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for, lambda: "draining" in car.logs(), 10,
                                    "draining")
            redis.proc.send_signal(signal.SIGCONT)
            answers = await asyncio.gather(*calls)
        assert [a.status for a in answers] == [200] * 8
        assert await asyncio.to_thread(car.proc.wait, 20) == 0
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        if car:
            stop_process(car.proc)
        stop_process(redis.proc)


def test_checks_of_reset_streams_still_count_against_the_bound(tmp_path):
    """The "rapid reset" flood: a client sends Checks and resets each stream at once, so
    HTTP/2's own stream count frees them while their decisions still run (here: wait on
    a stopped Redis). Once MAX_STREAMS are in flight, the next Check is refused at once
    with RESOURCE_EXHAUSTED instead of adding work without bound."""
    import socket

    import h2.config
    import h2.connection
    import h2.events
    from envoy.service.auth.v3 import external_auth_pb2 as pb

    from sidecar.dataplane.grpc_server import CHECK_PATH, MAX_STREAMS

    redis = start_redis(tmp_path / "redis")
    car = None
    try:
        key = asyncio.run(key_on(redis.url))
        car = start_sidecar(tmp_path / "car", redis.url, redis_timeout_ms=10_000,
                            grpc_listen=f"127.0.0.1:{free_port()}")
        request = pb.CheckRequest()
        http = request.attributes.request.http
        http.method, http.path = "POST", "/v1/chat/completions"
        http.headers["authorization"] = f"Bearer {key}"
        http.raw_body = b'{"model": "gpt-x", "messages": []}'
        message = request.SerializeToString()
        framed = b"\0" + len(message).to_bytes(4, "big") + message
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", CHECK_PATH),
                   (b":authority", b"sidecar"), (b"content-type", b"application/grpc"),
                   (b"te", b"trailers")]
        client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        with socket.create_connection(("127.0.0.1", car.grpc_port), timeout=20) as sock:
            client.initiate_connection()
            sock.sendall(client.data_to_send())
            client.receive_data(sock.recv(65536))        # the server's SETTINGS
            redis.proc.send_signal(signal.SIGSTOP)
            for _ in range(MAX_STREAMS):
                stream = client.get_next_available_stream_id()
                client.send_headers(stream, headers)
                client.send_data(stream, framed, end_stream=True)
                client.reset_stream(stream)
                sock.sendall(client.data_to_send())
            last = client.get_next_available_stream_id()
            client.send_headers(last, headers)
            client.send_data(last, framed, end_stream=True)
            sock.sendall(client.data_to_send())
            status = None
            while status is None:
                data = sock.recv(65536)
                assert data, "the server closed the connection"
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived) and \
                            event.stream_id == last:
                        status = dict(event.headers).get(b"grpc-status", b"")
                sock.sendall(client.data_to_send())
        assert status == b"8"          # RESOURCE_EXHAUSTED, answered while Redis is stopped
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        if car:
            stop_process(car.proc)
        stop_process(redis.proc)


async def test_workers_serve_check_on_one_port(tmp_path, redis_url, plane):
    grpc_port = free_port()
    car = start_workers(tmp_path, redis_url, 2, grpc_listen=f"127.0.0.1:{grpc_port}")
    try:
        def both_listening() -> bool:
            listening = tcp_inodes(grpc_port, "0A")
            return all(socket_inodes(p) & listening for p in children(car.proc.pid))
        wait_for(both_listening, 20, "both workers listening on the gRPC port")
        _, key = await make(plane, quota=20)
        async with channel(car) as ch:
            answers = await asyncio.gather(*(check(ch, key=key, body=BODY) for _ in range(25)))
        assert sorted(a.status for a in answers) == [200] * 20 + [402] * 5
    finally:
        stop_process(car.proc)


async def test_both_modes_share_one_redis_pipeline(tmp_path, redis_server, plane, http):
    """The calls of both transports go out on the worker's one hot-path connection, so
    they are batched together (a tick's calls share one write)."""
    car = start_sidecar(tmp_path, redis_server.url, grpc_listen=f"127.0.0.1:{free_port()}")
    try:
        _, key = await make(plane, unlimited=True)
        assert (await authz(http, car, key=key, body=BODY)).status == 200   # connected
        seen: list[str] = []
        stop = threading.Event()

        def watch() -> None:
            with redis_server.client().monitor() as monitor:
                for event in monitor.listen():
                    if event["command"].startswith("EVALSHA"):
                        seen.append(event["client_address"] + ":" + event["client_port"])
                    if stop.is_set() or len(seen) >= 40:
                        return
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        await asyncio.sleep(0.3)   # MONITOR is on before the calls (not a timed assertion)
        async with channel(car) as ch:
            calls = [authz(http, car, key=key, body=BODY) for _ in range(20)] + \
                [check(ch, key=key, body=BODY) for _ in range(20)]
            assert {a.status for a in await asyncio.gather(*calls)} == {200}
        await asyncio.to_thread(watcher.join, 10)
        stop.set()
        assert len(seen) == 40 and len(set(seen)) == 1, seen
    finally:
        stop_process(car.proc)


# -- the shipped Envoy gRPC config agrees with the sidecar (it runs for real in
#    test_envoy_real.py) ---------------------------------------------------------------

def test_shipped_grpc_config_agrees_with_the_sidecar():
    import yaml
    from conftest import ROOT
    from proxies import ENVOY_GRPC_YAML, deployed_max_body

    doc = yaml.safe_load(ENVOY_GRPC_YAML.read_text())
    defaults = yaml.safe_load((ROOT / "config" / "sidecar.yaml").read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    authz = next(f["typed_config"] for f in hcm["http_filters"]
                 if f["name"] == "envoy.filters.http.ext_authz")
    # Envoy waits longer than the sidecar's own bound on Redis: the sidecar answers 503.
    assert float(authz["grpc_service"]["timeout"].rstrip("s")) * 1000 > \
        defaults["redis_timeout_ms"]
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"]["code"] == "ServiceUnavailable"
    body = authz["with_request_body"]
    assert body["pack_as_bytes"] is True and body["allow_partial_message"] is True
    assert 1024 <= body["max_request_bytes"] <= deployed_max_body()
    sent = {p["exact"] for p in authz["allowed_headers"]["patterns"]}
    assert {"authorization", "x-api-key", "content-type", "content-encoding"} <= sent
    # Nothing a client could use to rename its call or pick its model or IP.
    assert not sent & {"x-model", "x-original-method", "x-original-uri",
                       "x-forwarded-method", "x-forwarded-uri", "x-forwarded-for",
                       "x-real-ip", "x-client-ip", "x-envoy-external-address"}
    cluster = next(c for c in doc["static_resources"]["clusters"]
                   if c["name"] == authz["grpc_service"]["envoy_grpc"]["cluster_name"])
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]    # gRPC
