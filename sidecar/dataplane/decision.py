"""The answer to an authorize call, as a pure function of the verdict. No I/O.

Verdicts come from two places, in the contract's table order: the checks that need no
Redis (missing / malformed key) are made here in Python; every check that needs the key
record runs inside authorize.lua, atomically with the quota reservation, and comes back
as a numeric code (the `Code` values below are the script's return codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import orjson

from ..schema.contracts import AuthorizeReply
from ..schema.keys import TYPE_OF_CODE
from ..schema.names import level_of


class Code(IntEnum):
    """authorize.lua return codes, plus the ones decided before Redis."""

    allow = 0
    invalid_api_key = 1
    key_disabled = 2
    key_expired = 3
    admin_key_not_allowed = 4
    ip_not_allowed = 5
    model_not_allowed = 6
    permission_denied = 7
    quota_exhausted = 8
    rate_limited = 9            # requests per minute
    rate_limited_tokens = 10    # tokens per minute
    budget_exhausted = 11       # a level's budget (money) cannot cover the worst case
    concurrency_limited = 12    # a level's calls in flight are at its limit
    model_not_priced = 13       # a budget applies, and the model has no price
    rate_limited_day = 14       # requests per day
    rate_limited_tokens_day = 15  # tokens per day
    missing_api_key = 20
    malformed_api_key = 21      # answered as invalid_api_key, counted apart
    unavailable = 30            # Redis cannot answer: fail closed


@dataclass(frozen=True, slots=True)
class Denial:
    status: int
    code: str                  # the OpenAI-style `code` of the contract's table
    openai_type: str
    anthropic_type: str
    message: str


DENIALS: dict[Code, Denial] = {
    Code.missing_api_key: Denial(401, "missing_api_key", "invalid_request_error",
                                 "authentication_error",
                                 "No API key provided. Send it as 'Authorization: Bearer "
                                 "<key>' or 'x-api-key: <key>'."),
    Code.invalid_api_key: Denial(401, "invalid_api_key", "invalid_request_error",
                                 "authentication_error", "Incorrect API key provided."),
    Code.malformed_api_key: Denial(401, "invalid_api_key", "invalid_request_error",
                                   "authentication_error", "Incorrect API key provided."),
    Code.key_disabled: Denial(401, "key_disabled", "invalid_request_error",
                              "authentication_error", "This API key has been disabled."),
    Code.key_expired: Denial(401, "key_expired", "invalid_request_error",
                             "authentication_error", "This API key has expired."),
    Code.admin_key_not_allowed: Denial(403, "admin_key_not_allowed", "permission_error",
                                       "permission_error",
                                       "Admin keys cannot be used for inference requests."),
    Code.ip_not_allowed: Denial(403, "ip_not_allowed", "permission_error", "permission_error",
                                "This API key is not allowed from your IP address."),
    Code.model_not_allowed: Denial(403, "model_not_allowed", "permission_error",
                                   "permission_error",
                                   "This API key does not have access to the requested "
                                   "model."),
    Code.permission_denied: Denial(403, "permission_denied", "permission_error",
                                   "permission_error",
                                   "This API key does not have permission for this "
                                   "operation."),
    Code.quota_exhausted: Denial(402, "quota_exhausted", "insufficient_quota", "billing_error",
                                 "You exceeded your current quota. Add more quota to this "
                                 "API key."),
    Code.rate_limited: Denial(429, "rate_limited", "rate_limit_error", "rate_limit_error",
                              "Rate limit reached for requests per minute."),
    Code.rate_limited_tokens: Denial(429, "rate_limited", "rate_limit_error",
                                     "rate_limit_error",
                                     "Rate limit reached for tokens per minute."),
    Code.rate_limited_day: Denial(429, "rate_limited", "rate_limit_error", "rate_limit_error",
                                  "Rate limit reached for requests per day."),
    Code.rate_limited_tokens_day: Denial(429, "rate_limited", "rate_limit_error",
                                         "rate_limit_error",
                                         "Rate limit reached for tokens per day."),
    Code.budget_exhausted: Denial(402, "budget_exhausted", "insufficient_quota",
                                  "billing_error",
                                  "What is left of the {level}'s budget cannot cover this "
                                  "request's worst-case cost. Raise the budget, wait for "
                                  "its next period, or ask for fewer output tokens."),
    Code.concurrency_limited: Denial(429, "concurrency_limited", "rate_limit_error",
                                     "rate_limit_error",
                                     "Too many requests of this {level} are in flight; "
                                     "retry when one has finished."),
    Code.model_not_priced: Denial(400, "model_not_priced", "invalid_request_error",
                                  "invalid_request_error",
                                  "A budget applies to this key, and the requested model "
                                  "has no price in this deployment."),
    Code.unavailable: Denial(503, "service_unavailable", "server_error", "api_error",
                             "The authorization service is temporarily unavailable."),
}

RATE_CODES = frozenset({Code.rate_limited, Code.rate_limited_tokens, Code.rate_limited_day,
                        Code.rate_limited_tokens_day})
# The record's one-letter type code -> the x-key-type header value (schema/keys.py map).
KEY_TYPES = {code: typ.value for code, typ in TYPE_OF_CODE.items()}

# A denial worded for one key type, by (code, the script's type letter): only subscription
# keys have a billing cycle and a PAYG fallback to suggest.
BY_KEY_TYPE: dict[tuple[Code, str], Denial] = {
    (Code.quota_exhausted, "b"): Denial(
        402, "quota_exhausted", "insufficient_quota", "billing_error",
        "You exceeded this billing cycle's quota, and the account's pay-as-you-go balance "
        "(if PAYG fallback is on) cannot cover the request. Wait for the next cycle, raise "
        "the plan's quota, top up the balance or enable PAYG fallback."),
}


# Denials that name the level they come from (key, project, organization, member):
# the JSON's `param`, and the message's {level}.
BY_LEVEL = frozenset({Code.budget_exhausted, Code.concurrency_limited})
LEVEL_WORDS = {"key": "key", "project": "project", "organization": "organization",
               "member": "member"}


def error_body(denial: Denial, anthropic: bool, level: str | None = None) -> bytes:
    """The JSON error in the dialect the client's SDK parses."""
    message = denial.message.replace("{level}", level or "key")
    if anthropic:
        return orjson.dumps({"type": "error",
                             "error": {"type": denial.anthropic_type, "message": message}})
    return orjson.dumps({"error": {"message": message, "type": denial.openai_type,
                                   "param": level, "code": denial.code}})


# Bodies and header values are the same for every denial of a kind: build them once.
_RENDERED: dict[tuple[Code, bool, str, str | None], tuple[Denial, bytes, str]] = {}


def rendered_denial(code: Code, anthropic: bool, key_type: str = "",
                    level: str | None = None) -> tuple[Denial, bytes, str]:
    """(denial, body, X-Auth-Error header value) for a denial code; `key_type` is the
    script's type letter, for the denials worded per key type; `level` the level a
    budget or concurrency denial comes from."""
    if (code, key_type) not in BY_KEY_TYPE:
        key_type = ""                    # the one wording for every other type
    level = LEVEL_WORDS.get(level or "", "key") if code in BY_LEVEL else None
    cached = _RENDERED.get((code, anthropic, key_type, level))
    if cached is None:
        denial = BY_KEY_TYPE.get((code, key_type)) or DENIALS[code]
        body = error_body(denial, anthropic, level)
        cached = _RENDERED[(code, anthropic, key_type, level)] = (denial, body,
                                                                  body.decode())
    return cached


def denial_answer(code: Code, anthropic: bool,
                  reply: AuthorizeReply | None = None
                  ) -> tuple[Denial, dict[str, str], bytes]:
    """(denial, headers, body) of a denial. The JSON is copied into X-Auth-Error because
    NGINX drops auth bodies; 401 names its scheme; 503 says when to retry; a script reply
    adds x-ratelimit-* for the limits that apply, and Retry-After on a 429; it also names
    the key's type, for a message that says only what applies to it."""
    key_type = reply.type if reply is not None else ""
    level = level_of(reply.level) if reply is not None and reply.level else None
    denial, body, header = rendered_denial(code, anthropic, key_type, level)
    headers = {"X-Auth-Error": header}
    if denial.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="api"'
    elif code == Code.unavailable:   # an outage: the SDKs back off and retry
        headers["Retry-After"] = "1"
    if reply is not None and reply.limits_known:
        headers.update(limit_headers(reply))
        if code in RATE_CODES:
            headers["Retry-After"] = retry_after(reply)
    return denial, headers, body


def duration(ms: int) -> str:
    """OpenAI's reset format: '1s', '6m0s', '250ms'."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"


def limit_headers(reply: AuthorizeReply) -> dict[str, str]:
    """x-ratelimit-* from the script's reply, for the limits that apply to the key: the
    limit, what is left of it now, and how long until it is whole again."""
    headers: dict[str, str] = {}
    if reply.rpm:
        headers["x-ratelimit-limit-requests"] = str(reply.rpm)
        headers["x-ratelimit-remaining-requests"] = str(reply.rpm_remaining)
        headers["x-ratelimit-reset-requests"] = duration(reply.rpm_reset_ms)
    if reply.tpm:
        headers["x-ratelimit-limit-tokens"] = str(reply.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(reply.tpm_remaining)
        headers["x-ratelimit-reset-tokens"] = duration(reply.tpm_reset_ms)
    return headers


def identity_headers(reply: AuthorizeReply, reservation_id: str = "") -> dict[str, str]:
    """Who the caller is, for the upstream, and the reservation its usage report settles
    (empty when /settle is off). Always all five, so a proxy that copies them overwrites
    anything a client forged (an empty value means 'not set')."""
    return {
        "x-key-id": reply.key_id,
        "x-key-type": KEY_TYPES.get(reply.type, ""),
        "x-org-id": reply.org,
        "x-project-id": reply.project,
        "x-reservation-id": reservation_id,
    }


def retry_after(reply: AuthorizeReply) -> str:
    """Seconds until the next call would be allowed (the script's wait for every limit
    that refuses it), rounded up: Retry-After takes whole seconds, and a client that
    waits that long is let through."""
    return str(max(1, -(-int(reply.retry_ms) // 1000)))


def observed_denials(observed: str) -> list[str]:
    """The contract codes of the denials observe-only limits would have made, from the
    script's ',<code>,...'."""
    found = []
    for part in observed.split(","):
        if part.isdigit() and int(part) in Code._value2member_map_:
            denial = DENIALS.get(Code(int(part)))
            if denial:
                found.append(denial.code)
    return found
