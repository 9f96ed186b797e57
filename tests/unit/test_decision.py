"""Pure tier: the answer for every row of the contract's decision table, and the pure
extraction helpers behind it (request.py, keys.py). No Redis, no sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json

import anthropic
import httpx2
import openai
import pytest
from conftest import PEPPER
from multidict import CIMultiDict

from sidecar.dataplane.decision import (
    Code,
    denial_answer,
    duration,
    identity_headers,
    limit_headers,
    retry_after,
)
from sidecar.dataplane.request import (
    ClientIp,
    bearer_or_api_key,
    classify,
    model_of,
    original_call,
    read_model,
)
from sidecar.schema.contracts import AuthorizeReply
from sidecar.schema.ips import ip_hex, network_entry
from sidecar.schema.keys import PREFIX_OF, SHARD_HEX, KeyHasher, KeyType, key_type, mint, shard_of

# -- the decision table ------------------------------------------------------------------

# (code, status, OpenAI `code`, OpenAI error type, Anthropic error type), table order.
ROWS = [
    (Code.missing_api_key, 401, "missing_api_key", "invalid_request_error",
     "authentication_error"),
    (Code.malformed_api_key, 401, "invalid_api_key", "invalid_request_error",
     "authentication_error"),
    (Code.invalid_api_key, 401, "invalid_api_key", "invalid_request_error",
     "authentication_error"),
    (Code.key_disabled, 401, "key_disabled", "invalid_request_error", "authentication_error"),
    (Code.key_expired, 401, "key_expired", "invalid_request_error", "authentication_error"),
    (Code.admin_key_not_allowed, 403, "admin_key_not_allowed", "permission_error",
     "permission_error"),
    (Code.ip_not_allowed, 403, "ip_not_allowed", "permission_error", "permission_error"),
    (Code.model_not_allowed, 403, "model_not_allowed", "permission_error", "permission_error"),
    (Code.permission_denied, 403, "permission_denied", "permission_error", "permission_error"),
    (Code.quota_exhausted, 402, "quota_exhausted", "insufficient_quota", "billing_error"),
    (Code.rate_limited, 429, "rate_limited", "rate_limit_error", "rate_limit_error"),
    (Code.rate_limited_tokens, 429, "rate_limited", "rate_limit_error", "rate_limit_error"),
    (Code.unavailable, 503, "service_unavailable", "server_error", "api_error"),
]
ROW_IDS = [row[0].name for row in ROWS]

# A script reply: code, id, type, org, project, rpm, rpm left, tpm, tpm left,
# rpm reset ms, tpm reset ms, retry ms.
LUA_CODES = {Code.invalid_api_key, Code.key_disabled, Code.key_expired,
             Code.admin_key_not_allowed, Code.ip_not_allowed, Code.model_not_allowed,
             Code.permission_denied, Code.quota_exhausted, Code.rate_limited,
             Code.rate_limited_tokens}


def script_reply(code: Code) -> AuthorizeReply | None:
    """What authorize.lua returns for a code: the short form before the key's limits are
    known (codes 1-7), the full form from the quota check on."""
    if code not in LUA_CODES:
        return None
    if code < Code.quota_exhausted:
        return AuthorizeReply.parse([int(code)])
    return AuthorizeReply.parse([int(code), b"key_1", b"s", b"", b"", 60, 0, 1000, 0, 60_000,
                                 30_000, 12_345, b"", b""])


def test_script_codes_are_the_contract_order():
    # authorize.lua returns these numbers; the table's first-match order is theirs.
    assert [int(c) for c in (Code.allow, Code.invalid_api_key, Code.key_disabled,
                             Code.key_expired, Code.admin_key_not_allowed,
                             Code.ip_not_allowed, Code.model_not_allowed,
                             Code.permission_denied, Code.quota_exhausted,
                             Code.rate_limited, Code.rate_limited_tokens)] == list(range(11))


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_openai_dialect(row):
    code, status, code_str, openai_type, _ = row
    denial, headers, body = denial_answer(code, False, script_reply(code))
    assert denial.status == status
    doc = json.loads(body)
    assert doc["error"]["code"] == code_str
    assert doc["error"]["type"] == openai_type
    assert doc["error"]["message"]
    _check_common_headers(status, headers, body, script_reply(code))


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_anthropic_dialect(row):
    code, status, _, _, anthropic_type = row
    denial, headers, body = denial_answer(code, True, script_reply(code))
    assert denial.status == status
    doc = json.loads(body)
    assert doc == {"type": "error",
                   "error": {"type": anthropic_type, "message": doc["error"]["message"]}}
    assert doc["error"]["message"]
    _check_common_headers(status, headers, body, script_reply(code))


@pytest.mark.parametrize("letter", ["s", "o", "b"])
def test_quota_denial_says_only_what_applies_to_the_key_type(letter):
    reply = AuthorizeReply.parse([int(Code.quota_exhausted), b"key_1", letter.encode(), b"",
                                  b"", 0, 0, 0, 0, 1, 0, 0, b"", b""])
    for dialect in (False, True):
        denial, headers, body = denial_answer(Code.quota_exhausted, dialect, reply)
        message = json.loads(body)["error"]["message"]
        assert denial.status == 402 and denial.code == "quota_exhausted"
        assert ("PAYG" in message) == (letter == "b"), message
        assert json.loads(headers["X-Auth-Error"]) == json.loads(body)


def _check_common_headers(status: int, headers: dict[str, str], body: bytes,
                          reply: AuthorizeReply | None) -> None:
    # NGINX drops the auth body: the header is the same JSON, on one line.
    copy = headers["X-Auth-Error"]
    assert "\n" not in copy and "\r" not in copy
    assert json.loads(copy) == json.loads(body)
    assert ("WWW-Authenticate" in headers) == (status == 401)
    if status == 401:
        assert headers["WWW-Authenticate"].startswith("Bearer")
    if status == 429:
        assert headers["Retry-After"] == "13"                 # 12 345 ms, rounded up
        assert headers["x-ratelimit-remaining-requests"] == "0"
    elif status == 503:                                       # an outage: retry soon
        assert headers["Retry-After"] == "1"
    else:
        assert "Retry-After" not in headers
    if reply is not None and reply.limits_known:                  # the quota check was reached
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-limit-tokens"] == "1000"
    else:
        assert not any(h.startswith("x-ratelimit") for h in headers)


def test_allow_row_headers():
    reply = AuthorizeReply.parse([0, b"key_abc", b"o", b"org_1", b"prj_1", 60, 59, 0, 0, 1500,
                                  0, 0, b"", b""])
    assert identity_headers(reply, "rsv_" + "a" * 32) == {
        "x-key-id": "key_abc", "x-key-type": "org", "x-org-id": "org_1",
        "x-project-id": "prj_1", "x-reservation-id": "rsv_" + "a" * 32}
    # No tpm limit: only the request trio.
    assert limit_headers(reply) == {"x-ratelimit-limit-requests": "60",
                                    "x-ratelimit-remaining-requests": "59",
                                    "x-ratelimit-reset-requests": "1.5s"}


def test_allow_without_limits_still_overwrites_identity():
    reply = AuthorizeReply.parse([0, b"key_abc", b"s", b"", b"", 0, 0, 0, 0, 0, 0, 0, b"",
                                  b""])
    # Empty values, present: a proxy copying them replaces a client-forged x-org-id (and
    # x-reservation-id, empty when /settle is off).
    assert identity_headers(reply) == {"x-key-id": "key_abc", "x-key-type": "standard",
                                       "x-org-id": "", "x-project-id": "",
                                       "x-reservation-id": ""}
    assert limit_headers(reply) == {}


@pytest.mark.parametrize("ms,text", [(250, "250ms"), (1000, "1s"), (1500, "1.5s"),
                                     (60_000, "1m0s"), (360_000, "6m0s")])
def test_reset_duration_format(ms, text):
    assert duration(ms) == text


@pytest.mark.parametrize("ms,seconds", [(1, "1"), (999, "1"), (1000, "1"), (1001, "2"),
                                        (60_000, "60")])
def test_retry_after_rounds_up_to_whole_seconds(ms, seconds):
    reply = AuthorizeReply.parse([9, b"k", b"s", b"", b"", 1, 0, 0, 0, 60_000, 0, ms, b"",
                                  b""])
    assert retry_after(reply) == seconds


def test_each_limit_has_its_own_reset():
    reply = AuthorizeReply.parse([0, b"k", b"s", b"", b"", 30, 29, 1000, 400, 2000, 36_000, 0,
                                  b"", b""])
    headers = limit_headers(reply)
    assert (headers["x-ratelimit-reset-requests"], headers["x-ratelimit-reset-tokens"]) == (
        "2s", "36s")


# -- the SDKs raise their own classes for each denial ------------------------------------

OPENAI_CLASSES = {401: openai.AuthenticationError, 402: openai.APIStatusError,
                  403: openai.PermissionDeniedError, 429: openai.RateLimitError,
                  503: openai.InternalServerError}
ANTHROPIC_CLASSES = {401: anthropic.AuthenticationError, 402: anthropic.PaymentRequiredError,
                     403: anthropic.PermissionDeniedError, 429: anthropic.RateLimitError,
                     503: anthropic.ServiceUnavailableError}


def _transport(code: Code, anthropic_shape: bool) -> httpx2.MockTransport:
    denial, headers, body = denial_answer(code, anthropic_shape, script_reply(code))
    headers = {**headers, "content-type": "application/json"}
    return httpx2.MockTransport(lambda _: httpx2.Response(denial.status, headers=headers,
                                                          content=body))


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_openai_sdk_raises_its_class(row):
    code, status, code_str, openai_type, _ = row
    client = openai.OpenAI(api_key="sk-x", base_url="http://sidecar.test/v1", max_retries=0,
                           http_client=httpx2.Client(transport=_transport(code, False)))
    with pytest.raises(OPENAI_CLASSES[status]) as caught:
        client.chat.completions.create(model="gpt-5.5", messages=[])
    assert caught.value.status_code == status
    assert caught.value.code == code_str
    assert caught.value.type == openai_type


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_anthropic_sdk_raises_its_class(row):
    code, status, _, _, anthropic_type = row
    client = anthropic.Anthropic(api_key="sk-x", base_url="http://sidecar.test",
                                 max_retries=0,
                                 http_client=httpx2.Client(transport=_transport(code, True)))
    with pytest.raises(ANTHROPIC_CLASSES[status]) as caught:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=1, messages=[])
    assert caught.value.status_code == status
    assert caught.value.body["error"]["type"] == anthropic_type


# -- request.py: the key ------------------------------------------------------------------

KEY = "sk-" + "a" * 32
OTHER = "sk-" + "b" * 32


@pytest.mark.parametrize("headers,expected", [
    ({"Authorization": f"Bearer {KEY}"}, KEY),
    ({"authorization": f"bearer {KEY}"}, KEY),
    ({"Authorization": f"BEARER   {KEY}  "}, KEY),
    ({"x-api-key": KEY}, KEY),
    ({"X-Api-Key": f" {KEY} "}, KEY),
    ({"Authorization": f"Bearer {KEY}", "x-api-key": OTHER}, KEY),   # Authorization wins
    ({"Authorization": KEY}, KEY),               # no scheme: still the key that was sent
    ({"Authorization": f"Basic {KEY}"}, f"Basic {KEY}"),   # -> malformed, 401
    ({}, None),
    ({"x-api-key": ""}, None),
])
def test_key_extraction(headers, expected):
    assert bearer_or_api_key(CIMultiDict(headers)) == expected


def test_bearer_without_value_is_missing_key():
    assert not bearer_or_api_key(CIMultiDict({"Authorization": "Bearer "}))


# -- request.py: the original call, per proxy ---------------------------------------------

@pytest.mark.parametrize("method,raw_path,headers,expected", [
    # Envoy: original method, /authz before the original path, query kept.
    ("POST", "/authz/v1/chat/completions?stream=true", {},
     ("POST", "/v1/chat/completions?stream=true")),
    ("GET", "/authz", {}, ("GET", "/")),
    ("get", "/authz/v1/models", {}, ("GET", "/v1/models")),
    # NGINX: a GET subrequest, the original in X-Original-*.
    ("GET", "/authz", {"X-Original-Method": "POST", "X-Original-URI": "/v1/messages?beta=1"},
     ("POST", "/v1/messages?beta=1")),
    # Traefik: a GET to the fixed address, the original in X-Forwarded-*.
    ("GET", "/authz", {"X-Forwarded-Method": "DELETE", "X-Forwarded-Uri": "/v1/files/f1"},
     ("DELETE", "/v1/files/f1")),
])
def test_original_call(method, raw_path, headers, expected):
    assert original_call(method, raw_path, CIMultiDict(headers), True) == expected


@pytest.mark.parametrize("headers", [
    {"X-Original-Method": "GET", "X-Original-URI": "/v1/models"},
    {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/v1/models"},
])
def test_forwarded_call_headers_from_an_untrusted_peer_are_ignored(headers):
    call = original_call("POST", "/authz/v1/chat/completions", CIMultiDict(headers), False)
    assert call == ("POST", "/v1/chat/completions")


# -- request.py: the model ---------------------------------------------------------------

CHAT_PATH = "/v1/chat/completions"
GEMINI = "/v1beta/models/gemini-2.5-pro:generateContent"


@pytest.mark.parametrize("body,relayed,path,expected", [
    (b'{"model": "gpt-5.5", "messages": []}', None, CHAT_PATH, "gpt-5.5"),
    (b'{"messages": [], "model": "claude-sonnet-4-6"}', None, "/v1/messages",
     "claude-sonnet-4-6"),
    # Envoy's partial body: not JSON, the model is still read from what arrived.
    (b'{"model": "gpt-5.5", "messages": [{"role": "user", "content": "Hel', None,
     CHAT_PATH, "gpt-5.5"),
    (b'{"stream": true, "model":"gpt-4o-mini", "input": "abc', None, "/v1/responses",
     "gpt-4o-mini"),
    # The path first (what the upstream serves), then the body, then x-model.
    (b'{"model": "gpt-5.5"}', "other", "/v1/models/third", "third"),
    (b'{"model": "gpt-5.5"}', "other", CHAT_PATH, "gpt-5.5"),
    (b"", "o3", "/v1/models/third", "third"),
    (b"", "o3", CHAT_PATH, "o3"),
    (b'{"contents": []}', "gemini-flash", GEMINI, "gemini-2.5-pro"),
    (b"", None, GEMINI, "gemini-2.5-pro"),
    (b"", None, "/v1/models/gpt-5.5", "gpt-5.5"),
    (b"", None, "/v1/models", ""),
    (b'{"model": 5}', None, CHAT_PATH, ""),
    (b"[1, 2]", None, CHAT_PATH, ""),
    (b"not json at all", None, CHAT_PATH, ""),
    # A "model" inside a string value is not the top-level field.
    (b'{"messages": [{"content": "say \\"model\\": \\"x\\""}], "mod', None, CHAT_PATH, ""),
])
def test_model(body, relayed, path, expected):
    assert model_of(body, path, relayed) == expected


@pytest.mark.parametrize("body,relayed,path,whole", [
    # Cut off: the "model" seen may be nested, or a later one (past the cut) may win.
    (b'{"metadata": {"model": "gpt-5.5"}, "model": "o3", "messages": [{"content": "x', None,
     CHAT_PATH, True),
    (b'{"model": "gpt-5.5", "messages": [{"role": "user", "content": "Hel', None, CHAT_PATH,
     True),
    # Valid JSON, but the edge cut it at max_body_bytes, or it is compressed.
    (b'{"model": "gpt-5.5"}', None, CHAT_PATH, False),
    # Not JSON to a strict parser (NaN), multipart, a JSON array, a model not a string.
    (b'{"metadata": {"model": "gpt-5.5"}, "t": NaN, "model": "o3"}', None, CHAT_PATH, True),
    (b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b--', None,
     "/v1/audio/transcriptions", True),
    (b'[{"model": "gpt-5.5"}]', None, CHAT_PATH, True),
    (b'{"model": null}', "gpt-5.5", CHAT_PATH, True),
    (b'{"model": ["gpt-5.5"]}', None, CHAT_PATH, True),
    # Two top-level "model" keys: orjson keeps the last, other parsers the first.
    (b'{"model": "gpt-5.5", "messages": [], "model": "o3"}', None, CHAT_PATH, True),
    (b'{"mod\\u0065l": "o3", "model": "gpt-5.5"}', None, CHAT_PATH, True),
    (b'{"\\u006d\\u006F\\u0064\\u0065\\u006c": "o3", "model": "gpt-5.5"}', None, CHAT_PATH,
     True),
    # Sources that disagree.
    (b'{"model": "gpt-5.5"}', "o3", CHAT_PATH, True),
    (b'{"model": "gpt-5.5"}', None, "/v1beta/models/o3:generateContent", True),
    (b"", "o3", GEMINI, True),
    # x-model alone while the body (which names no model) was sent.
    (b'{"messages": []}', "gpt-5.5", CHAT_PATH, True),
    # A path an upstream may decode or normalise into another model.
    (b"", None, "/v1beta/models/gemini%2Dpro:generateContent", True),
    (b"", None, "/v1beta/models/a/../../v1beta/models/b:generateContent", True),
    # Longer than any listed name can be: its prefix could equal one.
    (b'{"model": "' + b"m" * 300 + b'"}', None, CHAT_PATH, True),
    (b"", None, "/v1beta/models/" + "m" * 300 + ":generateContent", True),
])
def test_uncertain_models(body, relayed, path, whole):
    assert read_model(body, path, relayed, whole)[1] is False


@pytest.mark.parametrize("body,relayed,path", [
    (b'{"model": "gpt-5.5", "messages": []}', None, CHAT_PATH),
    (b'{"model": "gpt-5.5", "messages": []}', "gpt-5.5", CHAT_PATH),
    (b"", "gpt-5.5", CHAT_PATH),                        # NGINX: njs relays the body's model
    (b"", None, GEMINI),
    (b'{"contents": [{"parts": [{"text": "hi"}]}]}', None, GEMINI),
    (b'{"contents": []}', "gemini-2.5-pro", GEMINI),
    (b"", None, CHAT_PATH),                             # no model at all: '' is certain
    # "model" elsewhere: nested, as a value, inside a string.
    (b'{"tools": [{"model": "x"}], "model": "gpt-5.5", "metadata": {"model": "y"}}', None,
     CHAT_PATH),
    (b'{"model": "model"}', None, CHAT_PATH),
    (b'{"x": "\\"model\\": \\"y\\"", "model": "gpt-5.5"}', None, CHAT_PATH),
    (b'{"text": "caf\\u00e9", "model": "gpt-5.5"}', None, CHAT_PATH),
    (b'{"model": "gpt-3.5-turbo"}', None, "/v1/./chat/completions"),
])
def test_certain_models(body, relayed, path):
    assert read_model(body, path, relayed)[1] is True


def test_duplicate_model_keys_are_read_as_the_last_but_uncertain():
    model, certain = read_model(b'{"model": "a", "model": "b"}', CHAT_PATH)
    assert (model, certain) == ("b", False)


# -- request.py: scope classification ---------------------------------------------------

@pytest.mark.parametrize("method,path,scope,granting,write,anthropic_shape", [
    ("POST", "/v1/chat/completions", "chat.completions:write", "", True, False),
    ("GET", "/v1/models", "models:read", "models:write", False, False),
    ("GET", "/v1/models/gpt-5.5", "models:read", "models:write", False, False),
    ("HEAD", "/v1/models", "models:read", "models:write", False, False),
    ("POST", "/v1/messages", "messages:write", "", True, True),
    ("POST", "/v1/messages/count_tokens", "messages.count_tokens:write", "", True, True),
    ("POST", "/v1beta/models/gemini-2.5-pro:generateContent", "models.generateContent:write",
     "", True, False),
    ("DELETE", "/v1/files/file-abc", "files:write", "", True, False),
    ("POST", "/v1/embeddings", "embeddings:write", "", True, False),
    ("GET", "/", "root:read", "root:write", False, False),
])
def test_classify(method, path, scope, granting, write, anthropic_shape):
    endpoint = classify(method, path)
    assert (endpoint.scope, endpoint.granting, endpoint.write, endpoint.anthropic) == (
        scope, granting, write, anthropic_shape)


# -- request.py: addresses ----------------------------------------------------------------

V4_PREFIX = "00000000000000000000ffff"


@pytest.mark.parametrize("ip,expected", [
    ("10.1.2.3", V4_PREFIX + "0a010203"),
    ("::ffff:10.1.2.3", V4_PREFIX + "0a010203"),          # the same client either way
    ("2001:db8::1", "20010db8000000000000000000000001"),
    ("fe80::1%eth0", "fe800000000000000000000000000001"),
    ("not-an-ip", ""),
    ("", ""),
    ("10.1.2.3:443", ""),
])
def test_ip_hex(ip, expected):
    assert ip_hex(ip) == expected


@pytest.mark.parametrize("cidr,expected", [
    ("10.0.0.0/8", V4_PREFIX + "0a000000/104"),
    ("10.1.2.3", V4_PREFIX + "0a010203/128"),
    ("192.168.1.77/24", V4_PREFIX + "c0a80100/120"),        # host bits dropped
    ("2001:db8::/61", "20010db8000000000000000000000000/61"),
    ("::ffff:10.0.0.0/104", V4_PREFIX + "0a000000/104"),
    ("::/0", "0" * 32 + "/0"),
])
def test_network_entry(cidr, expected):
    assert network_entry(cidr) == expected


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.1.1", "2001:db8::/129", "abc", ""])
def test_network_entry_rejects(bad):
    with pytest.raises(ValueError):
        network_entry(bad)


# -- request.py: the client IP and the trusted-proxy rule --------------------------------

PROXY_NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def test_no_trusted_proxy_means_the_peer():
    client_ip = ClientIp(())
    forged = CIMultiDict({"X-Real-IP": "1.1.1.1", "X-Forwarded-For": "1.1.1.1",
                          "x-envoy-external-address": "1.1.1.1", "x-client-ip": "1.1.1.1"})
    assert client_ip("203.0.113.9", forged) == "203.0.113.9"


def test_untrusted_peer_headers_ignored():
    client_ip = ClientIp(PROXY_NETS)
    forged = CIMultiDict({"X-Real-IP": "10.9.9.9", "X-Forwarded-For": "10.9.9.9"})
    assert client_ip("203.0.113.9", forged) == "203.0.113.9"
    assert not client_ip.trusts("203.0.113.9")


@pytest.mark.parametrize("header", ["x-envoy-external-address", "x-client-ip", "X-Real-IP"])
def test_trusted_proxy_header(header):
    client_ip = ClientIp(PROXY_NETS)
    assert client_ip("10.0.0.2", CIMultiDict({header: " 198.51.100.7 "})) == "198.51.100.7"


def test_trusted_ipv4_mapped_and_ipv6_peers():
    client_ip = ClientIp(PROXY_NETS)
    headers = CIMultiDict({"X-Real-IP": "198.51.100.7"})
    assert client_ip("::ffff:10.0.0.2", headers) == "198.51.100.7"
    assert client_ip("fd00::5", headers) == "198.51.100.7"


@pytest.mark.parametrize("hops,xff,expected", [
    # The client prepends whatever it likes; the trusted proxies append to the right.
    (1, "6.6.6.6, 198.51.100.7", "198.51.100.7"),
    (1, "198.51.100.7", "198.51.100.7"),
    (2, "6.6.6.6, 198.51.100.7, 10.0.0.3", "198.51.100.7"),
    (2, "198.51.100.7", "198.51.100.7"),
    (1, " , 198.51.100.7 ,", "198.51.100.7"),
])
def test_xff_counted_from_the_right(hops, xff, expected):
    client_ip = ClientIp(PROXY_NETS, hops)
    assert client_ip("10.0.0.2", CIMultiDict({"X-Forwarded-For": xff})) == expected


def test_trusted_proxy_without_headers_is_the_peer():
    assert ClientIp(PROXY_NETS)("10.0.0.2", CIMultiDict()) == "10.0.0.2"
    assert ClientIp(PROXY_NETS)(None, CIMultiDict({"X-Real-IP": "1.1.1.1"})) == ""


# -- keys.py --------------------------------------------------------------------------

BODY32 = "Ab3" * 10 + "Zz"


@pytest.mark.parametrize("key,typ", [
    ("sk-" + BODY32, KeyType.standard),
    ("sk-sub-" + BODY32, KeyType.subscription),
    ("sk-org_" + BODY32, KeyType.org),
    ("sk-admin_" + BODY32, KeyType.admin),
    ("sk-" + BODY32 + "x" * 60, KeyType.standard),
    # 'sub' etc. after plain sk- with no separator is an ordinary standard key body.
    ("sk-sub" + BODY32, KeyType.standard),
])
def test_valid_formats(key, typ):
    assert len(BODY32) == 32
    assert key_type(key) is typ


@pytest.mark.parametrize("key", [
    "sk-" + BODY32[:31],                  # 31 characters
    "sk-sub-" + BODY32[:31],
    "sk-org_" + BODY32[:31],
    "sk-admin_" + BODY32[:31],
    "sk-" + BODY32[:31] + "-",            # bad characters
    "sk-" + BODY32[:31] + "_",
    "sk-" + BODY32 + " ",
    "sk-" + BODY32[:16] + "é" + BODY32[:16],
    "sk-sub_" + BODY32,                   # a prefix that does not exist
    "sk-admin-" + BODY32,
    "SK-" + BODY32,
    "pk-" + BODY32,
    BODY32,
    "",
])
def test_invalid_formats(key):
    assert key_type(key) is None


@pytest.mark.parametrize("typ", list(KeyType))
def test_mint_makes_valid_keys_of_the_type(typ):
    hasher = KeyHasher(PEPPER)
    key, digest = mint(typ, hasher)
    assert key.startswith(PREFIX_OF[typ])
    assert key_type(key) is typ
    assert digest == hasher(key)


def test_mint_with_shard_tag():
    hasher = KeyHasher(PEPPER)
    tag = hasher.account_tag("acct-42")
    assert len(tag) == SHARD_HEX
    key, digest = mint(KeyType.subscription, hasher, tag)
    assert shard_of(digest) == tag
    assert digest == hasher(key)
    assert tag == KeyHasher(PEPPER).account_tag("acct-42")        # stable


@pytest.mark.parametrize("pepper", [PEPPER, PEPPER.encode(), "p" * 64, "q" * 200])
def test_hmac_is_rfc2104_sha256(pepper):
    hasher = KeyHasher(pepper)
    raw = pepper.encode() if isinstance(pepper, str) else pepper
    for key in ("sk-" + BODY32, "sk-admin_" + BODY32 * 3):
        assert hasher(key) == hmac.new(raw, key.encode(), hashlib.sha256).hexdigest()
    assert KeyHasher("other-pepper-0123456789")("sk-" + BODY32) != hasher("sk-" + BODY32)
