"""deploy/traefik/: checked structurally (no Traefik binary here), then replayed.

The replay reads dynamic.yml and builds each forwardAuth call exactly as Traefik's
forward.go does from it — a GET to the fixed address, only authRequestHeaders copied,
X-Forwarded-Method/-Proto/-Host/-Uri/-For written by Traefik (trustForwardHeader: false
overwrites whatever the client sent), the body with forwardBody — sends it to a real
sidecar that trusts the Traefik address, and applies Traefik's rules to the answer
(non-2xx: to the client as it is; 2xx: authResponseHeaders replace the client's, then
the strip-client-key headers middleware).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson
import pytest
import yaml
from conftest import ROOT, start_sidecar, stop_process
from live import CLIENT_TIMEOUT, avoid_minute_edge

from sidecar.decision import identity_headers
from sidecar.request import AUTHZ_PREFIX
from sidecar.store.keystore import KeySpec

TRAEFIK = ROOT / "deploy" / "traefik"
HOP_HEADERS = {"connection", "keep-alive", "te", "trailers", "transfer-encoding", "upgrade"}
IDENTITY = set(identity_headers([0, b"k", b"s", b"", b""]))


def dynamic() -> dict:
    return yaml.safe_load((TRAEFIK / "dynamic.yml").read_text())


def static() -> dict:
    return yaml.safe_load((TRAEFIK / "traefik.yml").read_text())


def forward_auth(doc: dict | None = None) -> dict:
    return (doc or dynamic())["http"]["middlewares"]["sidecar-auth"]["forwardAuth"]


# -- structure ----------------------------------------------------------------------------

def test_static_config_loads_the_dynamic_file_and_names_the_entry_point():
    conf = static()
    assert conf["providers"]["file"]["filename"].endswith("/dynamic.yml")
    router = dynamic()["http"]["routers"]["llm-api"]
    assert set(router["entryPoints"]) <= set(conf["entryPoints"])
    assert conf["entryPoints"]["web"]["forwardedHeaders"]["insecure"] is False


def test_router_chain_and_service_exist():
    doc = dynamic()
    router = doc["http"]["routers"]["llm-api"]
    assert router["middlewares"] == ["sidecar-auth", "strip-client-key"]
    assert all(m in doc["http"]["middlewares"] for m in router["middlewares"])
    assert router["service"] in doc["http"]["services"]
    strip = doc["http"]["middlewares"]["strip-client-key"]["headers"]["customRequestHeaders"]
    assert strip == {"Authorization": "", "X-Api-Key": ""}


def test_forward_auth_settings():
    fa = forward_auth()
    address = urlsplit(fa["address"])
    assert (address.hostname, address.port, address.path) == ("sidecar", 8080, AUTHZ_PREFIX)
    assert fa["trustForwardHeader"] is False
    assert {h.lower() for h in fa["authResponseHeaders"]} == IDENTITY
    sent = {h.lower() for h in fa["authRequestHeaders"]}
    assert {"authorization", "x-api-key"} <= sent
    assert not sent & {"x-client-ip", "x-envoy-external-address", "x-real-ip",
                       "x-forwarded-for", "x-original-uri", "x-original-method"}
    assert fa["forwardBody"] is True and fa["maxBodySize"] >= 1 << 20


# -- what Traefik sends, replayed against a real sidecar ---------------------------------

@dataclass
class Outcome:
    status: int
    headers: dict[str, str]
    body: bytes
    upstream_headers: dict[str, str] = field(default_factory=dict)

    @property
    def json(self) -> dict:
        return orjson.loads(self.body)


class TraefikReplay:
    def __init__(self, doc: dict, sidecar_url: str):
        self.fa = forward_auth(doc)
        self.strip = doc["http"]["middlewares"]["strip-client-key"]["headers"][
            "customRequestHeaders"]
        # The address's host is the compose service name; here it is the test sidecar.
        self.url = sidecar_url + urlsplit(self.fa["address"]).path

    async def call(self, http, method: str, uri: str, headers: dict[str, str],
                   body: bytes = b"", remote: str = "203.0.113.7") -> Outcome:
        sent = {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
        allowed = {h.lower() for h in self.fa.get("authRequestHeaders") or []}
        if allowed:
            sent = {k: v for k, v in sent.items() if k.lower() in allowed}
        trust = self.fa["trustForwardHeader"]
        given = {k.lower(): v for k, v in headers.items()}
        client_ip = remote
        if trust and "x-forwarded-for" in given:
            client_ip = given["x-forwarded-for"] + ", " + remote
        sent["X-Forwarded-For"] = client_ip
        sent["X-Forwarded-Method"] = (given.get("x-forwarded-method") if trust else None) \
            or method
        sent["X-Forwarded-Proto"] = "http"
        sent["X-Forwarded-Host"] = given.get("host", "api.example.com")
        sent["X-Forwarded-Uri"] = (given.get("x-forwarded-uri") if trust else None) or uri
        data = body if self.fa.get("forwardBody") else None
        if data is not None and len(data) > self.fa["maxBodySize"]:
            return Outcome(401, {}, b"")
        async with http.get(self.url, headers=sent, data=data or None,
                            timeout=CLIENT_TIMEOUT) as resp:
            raw = await resp.read()
            answer = {k.lower(): v for k, v in resp.headers.items()}
            status = resp.status
        if not 200 <= status < 300:
            return Outcome(status, {k: v for k, v in answer.items() if k not in HOP_HEADERS},
                           raw)
        upstream = {k.lower(): v for k, v in headers.items()}
        for name in self.fa["authResponseHeaders"]:
            upstream.pop(name.lower(), None)
            if name.lower() in answer:
                upstream[name.lower()] = answer[name.lower()]
        for name, value in self.strip.items():
            upstream.pop(name.lower(), None)
            if value:
                upstream[name.lower()] = value
        return Outcome(status, {}, raw, upstream)


@pytest.fixture(scope="module")
def traefik(tmp_path_factory, redis_server):
    car = start_sidecar(tmp_path_factory.mktemp("traefik"), redis_server.url,
                        trusted_proxies="127.0.0.1/32")
    yield TraefikReplay(dynamic(), car.url)
    stop_process(car.proc)


async def make(store, **spec) -> str:
    return (await store.create(KeySpec(**spec)))[1]


def client(key: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"Host": "api.example.com", "Content-Type": "application/json",
               "Cookie": "session=1", **extra}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def chat(model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})


async def test_allowed_call_gets_identity_and_loses_the_key(traefik, store, http):
    key = await make(store, unlimited=True, models=["gpt-a"])
    outcome = await traefik.call(http, "POST", "/v1/chat/completions?stream=true",
                                 client(key, **{"x-api-key": key, "X-Key-Id": "key_forged",
                                                "X-Org-Id": "org_forged"}), chat("gpt-a"))
    assert outcome.status == 200
    up = outcome.upstream_headers
    assert up["x-key-id"].startswith("key_") and up["x-key-id"] != "key_forged"
    assert up["x-key-type"] == "standard" and up["x-org-id"] == ""
    assert "authorization" not in up and "x-api-key" not in up


async def test_model_whitelist_reads_the_forwarded_body(traefik, store, http):
    key = await make(store, unlimited=True, models=["gpt-a"])
    denied = await traefik.call(http, "POST", "/v1/chat/completions", client(key),
                                chat("gpt-b"))
    assert denied.status == 403 and denied.json["error"]["code"] == "model_not_allowed"
    assert denied.headers["content-type"].startswith("application/json")


async def test_client_cannot_forge_method_or_uri(traefik, store, http):
    key = await make(store, unlimited=True, permission="read-only")
    forged = client(key, **{"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/v1/models",
                            "X-Original-Method": "GET", "X-Original-URI": "/v1/models"})
    outcome = await traefik.call(http, "POST", "/v1/chat/completions", forged, chat("m"))
    assert outcome.status == 403 and outcome.json["error"]["code"] == "permission_denied"
    assert (await traefik.call(http, "GET", "/v1/models?limit=2", client(key))).status == 200


async def test_client_ip_is_traefiks_peer(traefik, store, http):
    key = await make(store, unlimited=True, ips=["10.0.0.0/8"])
    inside = await traefik.call(http, "POST", "/v1/chat/completions", client(key),
                                chat("m"), remote="10.1.2.3")
    assert inside.status == 200
    forged = client(key, **{"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3",
                            "x-client-ip": "10.1.2.3"})
    outside = await traefik.call(http, "POST", "/v1/chat/completions", forged, chat("m"),
                                 remote="192.0.2.1")
    assert outside.status == 403 and outside.json["error"]["code"] == "ip_not_allowed"


async def test_forwarded_for_is_counted_from_the_right(traefik, store, http):
    """Even a Traefik that appends to a client's X-Forwarded-For (trustForwardHeader:
    true behind a load balancer) cannot be fooled by the entries a client prepends."""
    key = await make(store, unlimited=True, ips=["10.0.0.0/8"])
    trusting = TraefikReplay(dynamic(), "")
    trusting.fa = {**trusting.fa, "trustForwardHeader": True}
    trusting.url = traefik.url
    spoofed = await trusting.call(http, "POST", "/v1/chat/completions",
                                  client(key, **{"X-Forwarded-For": "10.9.9.9"}), chat("m"),
                                  remote="192.0.2.1")
    assert spoofed.status == 403 and spoofed.json["error"]["code"] == "ip_not_allowed"
    real = await trusting.call(http, "POST", "/v1/chat/completions",
                               client(key, **{"X-Forwarded-For": "192.0.2.1"}), chat("m"),
                               remote="10.4.4.4")
    assert real.status == 200


async def test_denials_pass_unchanged_with_their_headers(traefik, store, http):
    avoid_minute_edge()
    broke = await make(store, quota=0)
    quota = await traefik.call(http, "POST", "/v1/chat/completions", client(broke),
                               chat("m"))
    assert quota.status == 402 and quota.json["error"]["code"] == "quota_exhausted"
    key = await make(store, unlimited=True, rpm=1)
    assert (await traefik.call(http, "POST", "/v1/chat/completions", client(key),
                               chat("m"))).status == 200
    limited = await traefik.call(http, "POST", "/v1/chat/completions", client(key),
                                 chat("m"))
    assert limited.status == 429 and limited.json["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"[0-9.]+m?s|\d+m\d+s", limited.headers["x-ratelimit-reset-requests"])
    missing = await traefik.call(http, "POST", "/v1/messages",
                                 {"content-type": "application/json"}, chat("claude"))
    assert missing.status == 401 and missing.json["error"]["type"] == "authentication_error"
    assert missing.headers["www-authenticate"].startswith("Bearer")
