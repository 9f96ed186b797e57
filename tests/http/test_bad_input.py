"""Bad headers and bodies get a 4xx from the running sidecar, never a 5xx, and malformed
keys never reach Redis. Requests go out as raw bytes over a socket, so nothing in an HTTP
client library cleans them up first.
"""

from __future__ import annotations

import asyncio
import json
import string

import orjson
import pytest
from conftest import start_sidecar, stop_process
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from live import evalsha_calls, make, send

from sidecar.schema.keys import KeyType

MAX_BODY = 4096     # the sidecar below reads at most this much of a body
VALID_LOOKING = "sk-" + "Q" * 40     # well-formed, unknown


@pytest.fixture(scope="module")
def car(tmp_path_factory, redis_server):
    """Trusts 127.0.0.1 as its proxy (so IP and cost headers are read), small body limit."""
    sidecar = start_sidecar(tmp_path_factory.mktemp("bad"), redis_server.url,
                            trusted_proxies="127.0.0.1/32", cost_header="x-cost",
                            max_body_bytes=MAX_BODY)
    yield sidecar
    stop_process(sidecar.proc)


def post(path: str = "/v1/chat/completions", headers: dict[str, str] | None = None,
         body: bytes = b"", extra: bytes = b"") -> bytes:
    lines = [f"POST /authz{path} HTTP/1.1", "Host: sidecar"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body and not any(k.lower() in ("content-length", "transfer-encoding")
                        for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n" + extra + \
        b"\r\n" + body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


MALFORMED = {
    "too short": "Bearer sk-abc",
    "bad chars": "Bearer sk-" + "a" * 30 + "!@#$%^&*",
    "dash inside": "Bearer sk-" + "a" * 20 + "-" + "a" * 20,
    "unknown prefix": "Bearer pk-" + "a" * 40,
    "other vendor": "Bearer AIza" + "a" * 35,
    "prefix only": "Bearer sk-org_",
    "unicode": "Bearer sk-" + "é" * 40,
    "unicode digits": "Bearer sk-" + "٣" * 40,
    "very long": "Bearer sk-" + "a" * 7000,
    "empty bearer": "Bearer ",
    "bearer only": "Bearer",
    "basic": "Basic xxx",
    "basic base64": "Basic c2stYWJjOmRlZg==",
    "two keys": f"Bearer {VALID_LOOKING} {VALID_LOOKING}",
    "nul escaped": "Bearer sk-\\x00" + "a" * 40,
    "spaces": "Bearer    ",
}


@pytest.mark.parametrize("value", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_keys_are_401_without_touching_redis(car, redis_server, redis_url,
                                                             value):
    before = evalsha_calls(redis_server.client())
    for path in ("/v1/chat/completions", "/v1/messages"):
        status, head, body = await send(car, post(path, {"Authorization": value},
                                                  b'{"model":"m"}'))
        assert status == 401, head
        doc = orjson.loads(body)
        if path == "/v1/messages":
            assert doc["error"]["type"] == "authentication_error"
        else:
            assert doc["error"]["code"] in ("invalid_api_key", "missing_api_key")
    # x-api-key takes the same path (without a scheme).
    status, _, _ = await send(car, post(headers={"x-api-key": value.removeprefix("Bearer ")}))
    assert status == 401
    assert evalsha_calls(redis_server.client()) == before


async def test_a_batch_of_malformed_keys_makes_no_redis_call(car, redis_server, plane):
    _, key = await make(plane, unlimited=True)
    client = redis_server.client()
    before = evalsha_calls(client)
    answers = await asyncio.gather(*(send(car, post(headers={"Authorization": v}))
                                     for v in list(MALFORMED.values()) * 4))
    assert {status for status, _, _ in answers} == {401}
    assert evalsha_calls(client) == before
    # ...while a well-formed key is looked up: the counter does move (the check can fail).
    assert (await send(car, post(headers=bearer(key), body=b'{"model":"m"}')))[0] == 200
    assert evalsha_calls(client) == before + 1


BODIES = {
    "not json": b"model=gpt-x&messages=",
    "truncated": b'{"model": "gpt-x", "messages": [{"role": "us',
    "truncated in model": b'{"model": "gpt-',
    "array": b'[{"model": "gpt-x"}]',
    "model number": b'{"model": 12}',
    "model object": b'{"model": {"name": "gpt-x"}}',
    "model null": b'{"model": null}',
    "model list": b'{"model": ["gpt-x"]}',
    "model empty": b'{"model": ""}',
    "model huge": b'{"model": "' + b"x" * 5000 + b'"}',
    "model with comma": b'{"model": "gpt-x,gpt-y"}',
    "invalid utf-8": b'{"model": "gpt-\xff\xfe"}',
    "nul bytes": b"\x00" * 64,
    "deep nesting": b"[" * 5000 + b"]" * 5000,
    "json string": b'"gpt-x"',
    "escaped quote": b'{"x": "\\"model\\": \\"gpt-x\\"", "model": "gpt-y"}',
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
async def test_bad_bodies_are_decided_not_errors(car, plane, body):
    """A whitelisted key: whatever the body, the answer is 200 or the model denial."""
    _, key = await make(plane, unlimited=True, models=["gpt-x", "gpt-y"])
    status, head, doc = await send(car, post(headers={**bearer(key),
                                                      "Content-Type": "application/json"},
                                             body=body))
    assert status in (200, 403), head
    if status == 403:
        assert orjson.loads(doc)["error"]["code"] == "model_not_allowed"


async def test_truncated_body_still_yields_the_model(car, plane):
    key_id, key = await make(plane, unlimited=True)
    assert (await send(car, post(headers=bearer(key), body=BODIES["truncated"])))[0] == 200
    assert (await plane.key(None, key_id))["last_model"] == "gpt-x"
    # Whitelisted keys refuse models they cannot be sure of, or that are not listed.
    _, listed = await make(plane, unlimited=True, models=["gpt-x"])
    for name in ("truncated", "model with comma", "escaped quote", "model number", "array"):
        denied = await send(car, post(headers=bearer(listed), body=BODIES[name]))
        assert denied[0] == 403, name


async def test_huge_bodies_are_answered(car, plane):
    key_id, key = await make(plane, unlimited=True)
    huge = b'{"model": "gpt-x", "input": "' + b"a" * 2_000_000 + b'"}'
    assert (await send(car, post(headers=bearer(key), body=huge)))[0] == 200
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(huge), huge)
    answer = await send(car, post(headers={**bearer(key), "Transfer-Encoding": "chunked"},
                                  body=chunked))
    assert answer[0] == 200
    view = await plane.key(None, key_id)
    assert (view["request_count"], view["last_model"]) == (2, "gpt-x")
    # Only a prefix is read: a whitelisted key cannot trust the model of a huge body.
    _, listed = await make(plane, unlimited=True, models=["gpt-x"])
    assert (await send(car, post(headers=bearer(listed), body=huge)))[0] == 403
    small = b'{"model": "gpt-x", "input": "abc"}'
    assert (await send(car, post(headers=bearer(listed), body=small)))[0] == 200


BAD_FRAMING = {
    "content-length letters": ({"Content-Length": "abc"}, b""),
    "content-length negative": ({"Content-Length": "-1"}, b""),
    "content-length twice": ({"Content-Length": "2\r\nContent-Length: 3"}, b"{}x"),
    "content-length and chunked": ({"Content-Length": "5", "Transfer-Encoding": "chunked"},
                                   b"0\r\n\r\n"),
    "content-length too small": ({"Content-Length": "2"}, b'{}GET / HTTP/1.1\r\n\r\n'),
    "bad chunk size": ({"Transfer-Encoding": "chunked"}, b"zz\r\nabc\r\n0\r\n\r\n"),
    "unknown transfer-encoding": ({"Transfer-Encoding": "gzip"}, b"abc"),
    "bad gzip": ({"Content-Encoding": "gzip", "Content-Length": "12"}, b"not gzip at all"),
    "bad deflate": ({"Content-Encoding": "deflate", "Content-Length": "5"}, b"nope!"),
    "unknown encoding": ({"Content-Encoding": "zstd-ish", "Content-Length": "2"}, b"{}"),
}


@pytest.mark.parametrize("headers,body", BAD_FRAMING.values(), ids=BAD_FRAMING.keys())
async def test_bad_framing_is_4xx(car, plane, headers, body):
    _, key = await make(plane, unlimited=True)
    status, head, _ = await send(car, post(headers={**bearer(key), **headers}, body=body))
    assert 200 <= status < 500, head
    assert status in (200, 400, 401, 403, 413), head


async def test_body_shorter_than_content_length_then_eof(car, plane):
    _, key = await make(plane, unlimited=True)
    request = post(headers={**bearer(key), "Content-Length": "100"}, body=b'{"model":')
    try:
        status, head, _ = await send(car, request, shut_write=True)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass   # the client went away mid-body: closing is a fine answer, a 5xx is not
    else:
        assert status < 500, head
    assert (await send(car, post(headers=bearer(key), body=b"{}")))[0] == 200


async def test_expect_100_continue_gets_the_go_ahead(car, plane):
    """A client that waits for `100 Continue` before its body is not left waiting."""
    key_id, key = await make(plane, unlimited=True)
    body = b'{"model": "gpt-x"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", car.port)
    try:
        writer.write(post(headers={**bearer(key), "Expect": "100-continue",
                                   "Content-Length": str(len(body))}))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert (await plane.key(None, key_id))["last_model"] == "gpt-x"


BAD_IPS = ["not-an-ip", "999.1.1.1", "10.0.0.1.5", "", " , ,", "10.0.0.0/8", "1.2.3.4:80",
           "[::1]", "::ffff:zz", "unknown", "1" * 3000, "10.1.2.3\tx", "\udcff\udcfe"]


@pytest.mark.parametrize("value", BAD_IPS)
@pytest.mark.parametrize("header", ["X-Real-IP", "X-Forwarded-For", "x-client-ip",
                                    "x-envoy-external-address"])
async def test_invalid_ip_headers_from_a_trusted_proxy(car, plane, header, value):
    restricted_id, restricted = await make(plane, unlimited=True, allowed_ips=["10.0.0.0/8"])
    open_id, unrestricted = await make(plane, unlimited=True)
    body = b'{"model":"m"}'
    status, head, doc = await send(car, post(headers={**bearer(restricted), header: value},
                                             body=body))
    # Junk is no address (and an empty list leaves the peer, 127.0.0.1): refused.
    assert status == 403 and orjson.loads(doc)["error"]["code"] == "ip_not_allowed", head
    status, head, _ = await send(car, post(headers={**bearer(unrestricted), header: value},
                                           body=body))
    assert status == 200, head
    last_ip = (await plane.key(None, open_id))["last_ip"]
    assert last_ip in (None, "127.0.0.1")   # junk is not recorded as an address
    assert (await plane.key(None, restricted_id))["request_count"] == 0


async def test_headers_that_are_not_utf8(car, plane):
    key_id, key = await make(plane, unlimited=True, models=["gpt-x"])
    for name in ("x-model", "X-Original-URI", "X-Forwarded-Uri", "X-Original-Method"):
        request = post(headers={**bearer(key), name: "gpt-\udcff\udcfe"})
        status, head, _ = await send(car, request)
        assert 400 <= status < 500, (name, head)
    raw_line = b"GET /authz/v1/models/gpt-\xff HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer " + \
        key.encode() + b"\r\n\r\n"
    status, head, _ = await send(car, raw_line)
    assert 400 <= status < 500, head
    assert (await plane.key(None, key_id))["request_count"] == 0


@pytest.mark.parametrize("cost", ["abc", "-1", "1.5", "²", "١", "9" * 40, ""])
async def test_bad_cost_header_from_a_trusted_proxy(car, plane, cost):
    key_id, key = await make(plane, quota=100)
    status, head, _ = await send(car, post(headers={**bearer(key), "x-cost": cost},
                                           body=b'{"model":"m"}'))
    assert status == 400, head
    assert (await plane.key(None, key_id))["quota_remaining"] == 100


@pytest.mark.parametrize("request_line", [
    b"GET /nope HTTP/1.1", b"POST /v1/chat/completions HTTP/1.1", b"GET /authzx HTTP/1.1",
    b"GET /metrics HTTP/1.1", b"OPTIONS * HTTP/1.1", b"GET /admin/v1/keys HTTP/1.1"])
async def test_unknown_data_plane_paths_are_404_json(car, request_line):
    status, head, body = await send(car, request_line + b"\r\nHost: s\r\n\r\n")
    assert status == 404, head
    assert b"application/json" in head.lower()
    assert "error" in orjson.loads(body)


async def test_garbage_requests_are_4xx(car):
    for raw in (b"FOO BAR BAZ\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                b"GET /authz HTTP/9.9\r\nHost: s\r\n\r\n",
                b"GET /authz HTTP/1.1\r\nHost: s\r\nBad Header Name: x\r\n\r\n",
                b"GET /authz HTTP/1.1\r\nHost: s\r\nx-model: a\x01b\r\n\r\n",
                b"GET /authz HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 70_000 + b"\r\n\r\n"):
        status, head, _ = await send(car, raw)
        assert 400 <= status < 500, (raw[:40], head)


# -- random input ----------------------------------------------------------------------

HEADER_NAMES = ["Authorization", "x-api-key", "X-Forwarded-For", "X-Real-IP", "x-client-ip",
                "x-envoy-external-address", "x-model", "X-Original-URI", "X-Original-Method",
                "X-Forwarded-Method", "X-Forwarded-Uri", "Content-Type", "x-cost",
                "x-envoy-auth-partial-body", "Content-Encoding"]
header_text = st.text(st.characters(exclude_characters="\r\n\x00",
                                    exclude_categories=("Cs",)), max_size=80)
key_like = st.one_of(
    st.sampled_from(["sk-", "sk-sub-", "sk-org_", "sk-admin_", "Bearer sk-", "pk-", ""]).flatmap(
        lambda p: st.text(string.ascii_letters + string.digits + "-_é", min_size=0,
                          max_size=60).map(lambda s: p + s)),
    header_text)
bodies = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["model", "messages", "stream", "max_tokens"]),
                    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                 lambda c: st.lists(c, max_size=3), max_leaves=5),
                    max_size=4).map(lambda d: json.dumps(d).encode()),
    st.builds(lambda d, n: json.dumps(d).encode()[:n],
              st.fixed_dictionaries({"model": st.text(max_size=30)}), st.integers(0, 40)))
paths = st.lists(st.text(string.ascii_letters + string.digits + ":._-%?=&", max_size=12),
                 max_size=4).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=150, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],   # no shrinking: it could run for minutes
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
       path=paths,
       headers=st.dictionaries(st.sampled_from(HEADER_NAMES),
                               st.one_of(header_text, key_like), max_size=6),
       body=bodies, live_key=st.booleans())
async def test_random_requests_never_get_a_5xx(car, live_keys, method, path, headers, body,
                                              live_key):
    if live_key:
        headers = {**headers, "Authorization": f"Bearer {live_keys[len(path) % 2]}"}
    lines = [f"{method} /authz{path} HTTP/1.1", "Host: sidecar",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = "\r\n".join(lines).encode() + b"\r\n\r\n" + body
    status, head, _ = await send(car, request)
    assert status < 500, head


@pytest.fixture
async def live_keys(plane) -> list[str]:
    """Two real keys, so random requests also reach the script: one open, one strict."""
    org = (await plane.create_org("o"))["id"]
    _, open_key = await make(plane, unlimited=True)
    _, strict = await make(plane, type=KeyType.org, unlimited=True, org=org,
                           models=["gpt-x"], allowed_ips=["10.0.0.0/8"],
                           permission="restricted", scopes=["chat.completions:write"],
                           rpm=1000)
    return [open_key, strict]
