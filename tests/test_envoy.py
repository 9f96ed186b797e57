"""deploy/envoy/envoy.yaml: checked structurally (no Envoy binary here), then replayed.

The replay reads the shipped configuration and builds each authorize call exactly as
Envoy's ext_authz HTTP service would from it — original method, path_prefix + original
path with query, only the allow-listed headers (plus the ones Envoy always sends), the
headers_to_add, the body truncated at max_request_bytes with x-envoy-auth-partial-body —
sends it to a real sidecar that trusts the Envoy address, and applies Envoy's rules to the
answer (200: allowed_upstream_headers and x-envoy-auth-headers-to-remove; other non-5xx:
the denial with allowed_client_headers; 5xx: status_on_error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import yaml
from conftest import ROOT, start_sidecar, stop_process
from live import CLIENT_TIMEOUT, avoid_minute_edge

from sidecar.keys import KeyType
from sidecar.request import AUTHZ_PREFIX
from sidecar.store.keystore import KeySpec

ENVOY = ROOT / "deploy" / "envoy" / "envoy.yaml"
ALWAYS_SENT = ("host", "content-length", "authorization")   # besides :method and :path


def load(path: Path = ENVOY) -> dict:
    return yaml.safe_load(path.read_text())


def walk(node, key: str):
    """Every value stored under `key`, anywhere in the document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def ext_authz(doc: dict) -> dict:
    filters = [f for f in walk(doc, "http_filters")][0]
    return next(f["typed_config"] for f in filters if f["name"].endswith("ext_authz"))


def seconds(value: str) -> float:
    assert value.endswith("s"), value
    return float(value[:-1])


def sidecar_defaults() -> dict:
    return yaml.safe_load((ROOT / "config" / "sidecar.yaml").read_text())


def deployed_max_body() -> int:
    """The smallest max_body_bytes among the deployed sidecars (compose and k8s)."""
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    env = compose["services"]["sidecar"]["environment"]
    configmap = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    k8s = yaml.safe_load(configmap["data"]["sidecar.yaml"])
    return min(int(env["SIDECAR_MAX_BODY_BYTES"]), int(k8s["max_body_bytes"]))


# -- structure ----------------------------------------------------------------------------

def test_every_referenced_cluster_exists():
    doc = load()
    defined = {c["name"] for c in doc["static_resources"]["clusters"]}
    referenced = set(walk(doc, "cluster")) | set(walk(doc, "cluster_name"))
    assert referenced and referenced <= defined, referenced - defined
    for cluster in doc["static_resources"]["clusters"]:
        assert cluster["load_assignment"]["cluster_name"] == cluster["name"]


def test_authz_service_matches_the_sidecar_route_and_port():
    service = ext_authz(load())["http_service"]
    assert service["path_prefix"] == AUTHZ_PREFIX == "/authz"
    assert service["server_uri"]["cluster"] == "sidecar"
    port = int(service["server_uri"]["uri"].rsplit(":", 1)[1])
    sidecar = next(c for c in load()["static_resources"]["clusters"] if c["name"] == "sidecar")
    endpoint = sidecar["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == port == 8080


def test_timeouts_and_body_limits_agree_with_the_sidecar():
    doc, defaults = load(), sidecar_defaults()
    authz = ext_authz(doc)
    # Envoy waits longer than the sidecar's own bound on Redis: the sidecar answers 503.
    assert seconds(authz["http_service"]["server_uri"]["timeout"]) * 1000 > \
        defaults["redis_timeout_ms"]
    assert authz["status_on_error"]["code"] == "ServiceUnavailable"
    assert authz["failure_mode_allow"] is False
    sidecar = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "sidecar")
    options = sidecar["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    idle = seconds(options["common_http_protocol_options"]["idle_timeout"])
    assert idle < defaults["keepalive_timeout_s"]
    body = authz["with_request_body"]
    assert body["allow_partial_message"] is True
    # The sidecars the deploy files run read at least what Envoy sends.
    assert 1024 <= body["max_request_bytes"] <= deployed_max_body()


def test_headers_in_and_out():
    authz = ext_authz(load())
    request = authz["http_service"]["authorization_request"]
    allowed = {p["exact"] for p in request["allowed_headers"]["patterns"]}
    assert {"authorization", "x-api-key", "content-type", "x-model",
            "x-envoy-auth-partial-body"} <= allowed
    # No header a client could use to choose its own IP reaches the sidecar.
    assert not allowed & {"x-client-ip", "x-envoy-external-address", "x-real-ip",
                          "x-forwarded-for"}
    assert {"key": "x-client-ip", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"} in \
        request["headers_to_add"]
    response = authz["http_service"]["authorization_response"]
    upstream = {p["exact"] for p in response["allowed_upstream_headers"]["patterns"]}
    assert upstream == {"x-key-id", "x-key-type", "x-org-id", "x-project-id"}
    client = response["allowed_client_headers"]["patterns"]
    assert {"content-type", "retry-after", "x-auth-error"} <= \
        {p.get("exact") for p in client}
    assert {"prefix": "x-ratelimit-", "ignore_case": True} in client
    vhost = load()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]
    assert {"authorization", "x-api-key"} <= set(vhost["request_headers_to_remove"])


# -- what Envoy sends, replayed against a real sidecar -------------------------------------

def _matches(patterns: list[dict], name: str) -> bool:
    name = name.lower()
    for p in patterns:
        if "exact" in p and name == p["exact"].lower():
            return True
        if "prefix" in p and name.startswith(p["prefix"].lower()):
            return True
    return False


@dataclass
class Outcome:
    status: int
    client_headers: dict[str, str]           # what Envoy adds to the client's response
    body: bytes
    upstream_headers: dict[str, str] = field(default_factory=dict)  # allowed only

    @property
    def json(self) -> dict:
        return orjson.loads(self.body)


class EnvoyReplay:
    """The ext_authz HTTP client and its answer handling, driven by envoy.yaml."""

    def __init__(self, doc: dict, sidecar_url: str):
        self.cfg = ext_authz(doc)
        self.url = sidecar_url
        http = self.cfg["http_service"]
        self.prefix = http["path_prefix"]
        self.allowed = http["authorization_request"]["allowed_headers"]["patterns"]
        self.added = http["authorization_request"]["headers_to_add"]
        self.response = http["authorization_response"]
        self.max_body = self.cfg["with_request_body"]["max_request_bytes"]
        self.partial = self.cfg["with_request_body"]["allow_partial_message"]

    async def call(self, http, method: str, path: str, headers: dict[str, str],
                   body: bytes = b"", client_ip: str = "203.0.113.9") -> Outcome:
        sent = {k: v for k, v in headers.items()
                if k.lower() in ALWAYS_SENT or _matches(self.allowed, k)}
        for item in self.added:
            value = item["value"].replace("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                                          client_ip)
            sent[item["key"]] = value
        if body:
            truncated = len(body) > self.max_body
            assert self.partial or not truncated, "Envoy would answer 413 itself"
            body = body[:self.max_body]
            if _matches(self.allowed, "x-envoy-auth-partial-body"):
                sent["x-envoy-auth-partial-body"] = "true" if truncated else "false"
        async with http.request(method, self.url + self.prefix + path, headers=sent,
                                data=body or None, timeout=CLIENT_TIMEOUT) as resp:
            raw = await resp.read()
            answer = {k.lower(): v for k, v in resp.headers.items()}
            status = resp.status
        if status == 200:
            remove = {h.strip() for h in
                      answer.get("x-envoy-auth-headers-to-remove", "").split(",")}
            upstream = {k.lower(): v for k, v in headers.items() if k.lower() not in remove}
            patterns = self.response["allowed_upstream_headers"]["patterns"]
            upstream.update({k: v for k, v in answer.items() if _matches(patterns, k)})
            ok = self.response["allowed_client_headers_on_success"]["patterns"]
            return Outcome(200, {k: v for k, v in answer.items() if _matches(ok, k)}, b"",
                           upstream)
        if status >= 500:   # error: status_on_error, Envoy's own empty answer
            return Outcome(503, {}, b"")
        patterns = self.response["allowed_client_headers"]["patterns"]
        return Outcome(status, {k: v for k, v in answer.items() if _matches(patterns, k)},
                       raw)


@pytest.fixture(scope="module")
def envoy(tmp_path_factory, redis_server):
    """A sidecar set up as the deploy files run it behind this Envoy."""
    car = start_sidecar(tmp_path_factory.mktemp("envoy"), redis_server.url,
                        trusted_proxies="127.0.0.1/32", max_body_bytes=deployed_max_body(),
                        model_costs="gpt-big=10")
    yield EnvoyReplay(load(), car.url)
    stop_process(car.proc)


async def make(store, **spec) -> str:
    return (await store.create(KeySpec(**spec)))[1]


def chat(model: str, pad: int = 0) -> bytes:
    """A chat body whose model comes first, padded past Envoy's body limit if asked."""
    return orjson.dumps({"model": model, "messages": [
        {"role": "user", "content": "x" * pad}]})


def client(key: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"Host": "api.example.com", "Content-Type": "application/json",
               "User-Agent": "OpenAI/Python", "Cookie": "session=1", **extra}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


async def test_whole_body_names_the_model(envoy, store, http):
    key = await make(store, unlimited=True, models=["gpt-a"])
    big = chat("gpt-a", pad=200_000)                  # large, but under the limit
    allowed = await envoy.call(http, "POST", "/v1/chat/completions?stream=true",
                               client(key, **{"x-api-key": key}), big)
    assert allowed.status == 200
    # The upstream gets who the caller is, and never the client's key.
    assert allowed.upstream_headers["x-key-id"].startswith("key_")
    assert allowed.upstream_headers["x-key-type"] == "standard"
    assert "authorization" not in allowed.upstream_headers
    assert "x-api-key" not in allowed.upstream_headers
    denied = await envoy.call(http, "POST", "/v1/chat/completions",
                              client(key), chat("gpt-b", pad=200_000))
    assert denied.status == 403 and denied.json["error"]["code"] == "model_not_allowed"
    assert denied.client_headers["content-type"].startswith("application/json")
    assert orjson.loads(denied.client_headers["x-auth-error"]) == denied.json


async def test_truncated_body_still_names_the_model(envoy, store, http):
    """Past max_request_bytes Envoy sends a cut-off body with x-envoy-auth-partial-body:
    the model is still read (it is charged at its cost), but it is uncertain, so a key
    with a model whitelist refuses the write call rather than trust it."""
    huge = chat("gpt-big", pad=envoy.max_body + 100_000)
    assert len(huge) > envoy.max_body
    view, key = await store.create(KeySpec(quota=100))
    allowed = await envoy.call(http, "POST", "/v1/chat/completions", client(key), huge)
    assert allowed.status == 200
    assert (await store.get(view["id"]))["quota_remaining"] == 90      # gpt-big: 10
    listed = await make(store, unlimited=True, models=["gpt-big"])
    refused = await envoy.call(http, "POST", "/v1/chat/completions", client(listed), huge)
    assert refused.status == 403 and refused.json["error"]["code"] == "model_not_allowed"


async def test_forged_identity_headers_are_replaced(envoy, store, http):
    key = await make(store, unlimited=True)
    outcome = await envoy.call(http, "POST", "/v1/chat/completions",
                               client(key, **{"x-key-id": "key_forged",
                                              "x-org-id": "org_forged"}), chat("m"))
    assert outcome.status == 200
    assert outcome.upstream_headers["x-key-id"] not in ("", "key_forged")
    assert outcome.upstream_headers["x-org-id"] == ""     # sent empty: 'not set'


async def test_client_ip_comes_from_envoy_not_from_the_client(envoy, store, http):
    key = await make(store, unlimited=True, ips=["10.0.0.0/8"])
    inside = await envoy.call(http, "POST", "/v1/chat/completions", client(key),
                              chat("m"), client_ip="10.1.2.3")
    assert inside.status == 200
    forged = client(key, **{"x-client-ip": "10.9.9.9", "x-envoy-external-address": "10.9.9.9",
                            "X-Forwarded-For": "10.9.9.9", "X-Real-IP": "10.9.9.9"})
    outside = await envoy.call(http, "POST", "/v1/chat/completions", forged, chat("m"),
                               client_ip="192.0.2.1")
    assert outside.status == 403 and outside.json["error"]["code"] == "ip_not_allowed"


async def test_method_and_query_reach_the_sidecar(envoy, store, http):
    key = await make(store, unlimited=True, permission="read-only")
    listed = await envoy.call(http, "GET", "/v1/models?limit=5", client(key))
    assert listed.status == 200
    write = await envoy.call(http, "POST", "/v1/chat/completions?x=1", client(key), chat("m"))
    assert write.status == 403 and write.json["error"]["code"] == "permission_denied"


async def test_denials_keep_status_json_and_headers(envoy, store, http):
    missing = await envoy.call(http, "POST", "/v1/chat/completions", client(), chat("m"))
    assert missing.status == 401 and missing.json["error"]["code"] == "missing_api_key"
    broke = await make(store, quota=0)
    quota = await envoy.call(http, "POST", "/v1/chat/completions", client(broke), chat("m"))
    assert quota.status == 402 and quota.json["error"]["code"] == "quota_exhausted"
    anthropic_key = await make(store, quota=0)
    messages = await envoy.call(http, "POST", "/v1/messages",
                                {"x-api-key": anthropic_key, "content-type": "application/json"},
                                chat("claude"))
    assert messages.status == 402 and messages.json["error"]["type"] == "billing_error"


async def test_rate_limited_with_retry_after_and_limits(envoy, store, http):
    avoid_minute_edge()
    key = await make(store, unlimited=True, rpm=1)
    first = await envoy.call(http, "POST", "/v1/chat/completions", client(key), chat("m"))
    assert first.status == 200
    assert first.client_headers["x-ratelimit-limit-requests"] == "1"
    assert first.client_headers["x-ratelimit-remaining-requests"] == "0"
    limited = await envoy.call(http, "POST", "/v1/chat/completions", client(key), chat("m"))
    assert limited.status == 429 and limited.json["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.client_headers["retry-after"]) <= 60
    assert re.fullmatch(r"\d+(\.\d+)?m?s|\d+m\d+s",
                        limited.client_headers["x-ratelimit-reset-requests"])


async def test_org_key_identity_for_the_upstream(envoy, store, http):
    key = await make(store, type=KeyType.org, unlimited=True, org="org_1", project="prj_1")
    outcome = await envoy.call(http, "POST", "/v1/chat/completions", client(key), chat("m"))
    assert outcome.status == 200
    assert (outcome.upstream_headers["x-org-id"], outcome.upstream_headers["x-project-id"]) \
        == ("org_1", "prj_1")
