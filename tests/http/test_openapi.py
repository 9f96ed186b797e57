"""The OpenAPI document of the admin API: it validates (openapi-spec-validator), it
passes `redocly lint` (redocly.yaml) with no error and no warning, it describes every
route the server has, and a property-based run (schemathesis) against the live admin
API, valid and invalid requests alike, finds no 5xx and no answer the document does not
describe."""

from __future__ import annotations

import os
import subprocess

import orjson
import pytest
import schemathesis
from admin_helpers import Plane, module_plane, request
from conftest import ROOT, npm_tool
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

plane = module_plane("openapi")


@pytest.fixture(scope="module")
def document(plane: Plane) -> dict:
    reply = request(plane.car.admin_port, "GET", "/admin/v1/openapi.json")
    assert reply.status == 200 and reply.headers["content-type"].startswith(
        "application/json")
    return reply.body


def test_document_validates(document: dict):
    validate(document)      # raises on any violation of the OpenAPI 3.1 schema
    assert document["openapi"] == "3.1.0"
    assert document["components"]["securitySchemes"]["adminKey"]["scheme"] == "bearer"


def test_document_passes_redocly_lint(document: dict, tmp_path):
    path = tmp_path / "openapi.json"
    path.write_bytes(orjson.dumps(document))
    env = {**os.environ, "REDOCLY_TELEMETRY": "off", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true"}
    linted = subprocess.run(
        [*npm_tool("@redocly/cli/bin/cli.js"), "lint", "--config", str(ROOT / "redocly.yaml"),
         "--format", "json", "--max-problems", "1000", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    report = orjson.loads(linted.stdout)
    problems = [f"{p['severity']} {p['ruleId']}: {p['message']} at "
                f"{[loc.get('pointer') for loc in p.get('location', [])]}"
                for p in report["problems"]]
    assert report["totals"] == {"errors": 0, "warnings": 0, "ignored": 0}, "\n".join(problems)
    assert linted.returncode == 0, linted.stderr


def test_document_lists_every_resource_with_its_scope(document: dict):
    paths = set(document["paths"])
    for resource in ("organization", "members", "projects", "service_accounts", "keys",
                     "subscriptions", "audit_logs"):
        assert f"/admin/v1/{resource}" in paths
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            assert "Needs the admin scope" in op["description"], (method, path)
            assert {"401", "403", "400"} <= set(op["responses"]), (method, path)


def test_every_documented_operation_is_served(plane: Plane, document: dict):
    for path, ops in document["paths"].items():
        concrete = path.replace("{", "none_").replace("}", "")
        for method in ops:
            reply = plane.admin(method.upper(), concrete.removeprefix("/admin/v1"),
                                {} if method in ("post", "patch") else None)
            assert reply.status in (200, 400, 404), (method, path, reply.status, reply.body)


@pytest.fixture(scope="module")
def api_schema(document: dict):
    schema = schemathesis.openapi.from_dict(document)
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


# Bounded: a few examples per operation (33 operations), valid and invalid requests.
# Missing auth and undeclared methods on every route are checked in test_admin_api.py.
@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_property_based_run_finds_no_server_error(case, plane: Plane):
    response = case.call(base_url=plane.car.admin_url,
                         headers={"Authorization": f"Bearer {plane.key}"}, timeout=10)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                             content_type_conformance,
                                             response_schema_conformance])
