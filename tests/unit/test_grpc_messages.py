"""grpc_authz.to_response builds the CheckResponse in place (repeated fields' add()):
the bytes must be those of the message made the plain way, field by field."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from sidecar.dataplane.authorize import REMOVE_HEADER
from sidecar.dataplane.grpc_authz import to_response
from sidecar.dataplane.http_messages import Answer

SET = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def option(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value),
                                      append_action=SET)


ALLOW = Answer(200, {"x-key-id": "key_1", "x-key-type": "standard", "x-org-id": "org_1",
                     "x-project-id": "", "x-reservation-id": "",
                     "x-ratelimit-limit-requests": "10",
                     "x-ratelimit-remaining-requests": "9",
                     REMOVE_HEADER: "authorization,x-api-key"}, b"")
REFERENCE_ALLOW = pb.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK),
    ok_response=pb.OkHttpResponse(
        headers=[option("x-key-id", "key_1"), option("x-key-type", "standard"),
                 option("x-org-id", "org_1"), option("x-project-id", ""),
                 option("x-reservation-id", "")],
        headers_to_remove=["authorization", "x-api-key"],
        response_headers_to_add=[option("x-ratelimit-limit-requests", "10"),
                                 option("x-ratelimit-remaining-requests", "9")]))
DENY = Answer(429, {"Retry-After": "3"}, '{"error":{"message":"é"}}'.encode(),
              "application/json")
REFERENCE_DENY = pb.CheckResponse(
    status=status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED),
    denied_response=pb.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=429), body='{"error":{"message":"é"}}',
        headers=[option("Retry-After", "3"), option("content-type", "application/json")]))


@pytest.mark.parametrize("answer, reference", [(ALLOW, REFERENCE_ALLOW),
                                               (DENY, REFERENCE_DENY)])
def test_the_response_is_the_message_built_field_by_field(answer, reference):
    assert to_response(answer).SerializeToString() == reference.SerializeToString()
    assert to_response(answer) == reference
