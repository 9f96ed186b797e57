"""deploy/envoy/envoy.yaml against the sidecar's own settings: the values that must agree
across the two (paths, ports, timeouts, body sizes, header lists). What real Envoy does
with the file is tests/edges/test_envoy_real.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import ROOT
from proxies import ENVOY_GRPC_YAML, ENVOY_YAML, deployed_max_body

from sidecar.dataplane.request import AUTHZ_PREFIX

ENVOY = ENVOY_YAML


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


def test_both_files_settle_streams_with_the_same_lua_filter():
    """envoy.yaml and envoy-grpc.yaml carry one Lua filter (the streamed-usage report),
    between ext_authz and the router, and a `sidecar` cluster on the HTTP data port it
    POSTs /settle to."""
    codes = []
    for path in (ENVOY_YAML, ENVOY_GRPC_YAML):
        doc = load(path)
        filters = [f for f in walk(doc, "http_filters")][0]
        assert [f["name"].rsplit(".", 1)[1] for f in filters] == ["ext_authz", "lua", "router"]
        code = filters[1]["typed_config"]["default_source_code"]["inline_string"]
        assert 'httpCall("sidecar"' in code and '":path"] = "/settle"' in code
        codes.append(code)
        sidecar = next(c for c in doc["static_resources"]["clusters"]
                       if c["name"] == "sidecar")
        endpoint = sidecar["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"] == {"address": "sidecar",
                                                         "port_value": 8080}
        assert "http_protocol_options" in str(sidecar)     # HTTP/1.1, not the gRPC one
    assert codes[0] == codes[1]


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
    assert "allowed_headers" not in request           # deprecated: the filter-level one
    allowed = {p["exact"] for p in authz["allowed_headers"]["patterns"]}
    assert {"x-api-key", "content-type", "content-encoding",
            "x-envoy-auth-partial-body"} <= allowed
    # No header a client could use to choose its own IP, method or model reaches the
    # sidecar (which trusts this Envoy, so it would believe them).
    assert not allowed & {"x-client-ip", "x-envoy-external-address", "x-real-ip",
                          "x-forwarded-for", "x-model", "x-original-method",
                          "x-forwarded-method", "x-original-uri", "x-forwarded-uri"}
    assert {"key": "x-client-ip", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"} in \
        request["headers_to_add"]
    response = authz["http_service"]["authorization_response"]
    upstream = {p["exact"] for p in response["allowed_upstream_headers"]["patterns"]}
    assert upstream == {"x-key-id", "x-key-type", "x-org-id", "x-project-id",
                        "x-reservation-id"}
    client = response["allowed_client_headers"]["patterns"]
    assert {"content-type", "retry-after", "x-auth-error"} <= \
        {p.get("exact") for p in client}
    assert {"prefix": "x-ratelimit-", "ignore_case": True} in client
    vhost = load()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]
    assert {"authorization", "x-api-key"} <= set(vhost["request_headers_to_remove"])
