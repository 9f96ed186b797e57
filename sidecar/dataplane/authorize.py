"""The data plane: one authorize call, top to bottom.

    extract (key, call, model, client IP, cost)   request.py, pure
    -> format check, no Redis                      schema/keys.py
    -> one script call, batched per loop tick      redis/runner.py + schema/authorize.lua
    -> answer: 200 + identity, or the denial       decision.py, pure
"""

from __future__ import annotations

import logging
import time

from ..redis.pipeline import RedisUnavailable
from ..redis.runner import ScriptRunner
from ..runtime import metrics
from ..runtime.config import Settings, price_list
from ..schema import names
from ..schema.contracts import AuthorizeArgs, AuthorizeReply
from ..schema.ips import ip_hex
from ..schema.keys import KeyHasher, key_type, new_reservation_id, shard_of
from ..schema.limits import Calendar
from ..schema.scripts import AUTHORIZE
from .decision import Code, denial_answer, identity_headers, limit_headers, observed_denials
from .http_messages import Answer, Call, error_answer
from .request import ClientIp, bearer_or_api_key, body_is_whole, classify, original_call, read_model
from .spend import Estimator

log = logging.getLogger("sidecar.authorize")
_JSON = "application/json"
# On an allow, Envoy removes the request headers named in REMOVE_HEADER before the
# upstream sees the call: the client's key never leaves the edge. NGINX and Traefik ignore
# it (their configs strip the key themselves); the gRPC mode sends it as headers_to_remove.
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
_STRIP_FROM_UPSTREAM = "authorization,x-api-key"


class Authorizer:
    def __init__(self, settings: Settings, hasher: KeyHasher, runner: ScriptRunner):
        self.runner = runner
        self.hasher = hasher
        self.client_ip = ClientIp(settings.trusted_networks(), settings.trusted_hops)
        self.default_cost = settings.default_cost
        self.model_costs = settings.model_costs
        self.cost_header = settings.cost_header
        self.fail_open = settings.failure_mode == "open"
        # With /settle on, each allowed call records its reservation for the report.
        self.reservation_ms = settings.reservation_ttl_s * 1000 \
            if settings.settlement_token else 0
        self.estimator = Estimator(price_list(settings), settings.default_max_output_tokens,
                                   settings.prompt_bytes_per_token)
        self.calendar = Calendar(settings.budget_timezone)
        self.expiry = "c" if settings.expired_reservation == "charge" else "r"
        self.concurrency_retry = str(settings.concurrency_retry_after_s)
        self.thresholds = settings.default_thresholds()
        self.usage_days = settings.usage_retention_days

    async def __call__(self, call: Call) -> Answer:
        """An authorize call on the HTTP edge: the original method, path and client IP by
        the proxies' conventions (request.py), then the decision."""
        # Forwarded metadata (original method and URI, x-model, client IP, cost) counts
        # only from a trusted proxy; from anyone else the request line and the peer decide.
        peer = call.peer_ip
        trusted = self.client_ip.trusts(peer)
        method, uri = original_call(call.method, call.target, call.headers, trusted)
        ip = self.client_ip(peer, call.headers, trusted)
        return await self.decide(call, method, uri, ip, trusted)

    async def decide(self, call: Call, method: str, uri: str, ip: str,
                     trusted: bool) -> Answer:
        """The decision, whatever the transport (HTTP edge, gRPC ext_authz): `call` gives
        the headers and body; `method`, `uri` (path and query) and `ip` are the client's
        call as the transport vouches for it; `trusted`: the caller is a trusted proxy,
        so its cost header and x-model count (read_model: the model rule)."""
        start = time.perf_counter()
        headers = call.headers
        endpoint = classify(method, uri.partition("?")[0])

        key = bearer_or_api_key(headers)
        if not key:
            return self._deny(Code.missing_api_key, endpoint.anthropic, start)
        if key_type(key) is None:
            return self._deny(Code.malformed_api_key, endpoint.anthropic, start)

        model, certain = read_model(call.body, endpoint.path,
                                    headers.get("x-model") if trusted else None,
                                    whole=body_is_whole(call.body_truncated, headers))
        cost = self._cost(model, headers, trusted)
        if cost is None:
            return error_answer(400, "bad_cost", "invalid cost header")

        key_hash = self.hasher(key)
        hexed = ip_hex(ip)
        reservation = new_reservation_id() if self.reservation_ms else ""
        shard = shard_of(key_hash)
        now = int(time.time() * 1000)
        day, month = self.calendar.numbers(now)
        # An IP header a trusted proxy filled with something else is no IP: keys with
        # an IP list are refused, and recent activity records no junk.
        keys, args = AuthorizeArgs.pack(
            names.record(key_hash), names.wallet(shard), names.budgets(shard),
            names.events(shard), names.usage_day(shard, day),
            names.usage_hour(shard, now // 3_600_000),
            reservation and names.reservation(key_hash, reservation),
            now, cost, hexed, ip if hexed else "", model, endpoint.scope, endpoint.granting,
            1 if endpoint.write else 0, 0 if certain else 1, names.POOL_PREFIX,
            self.reservation_ms, self.estimator.worst_case(model, call.body, headers, trusted),
            day, month, self.expiry, self.thresholds, self.usage_days)
        try:
            reply = AuthorizeReply.parse(await self.runner.run(AUTHORIZE, keys, args))
        except RedisUnavailable as exc:
            return self._unavailable(exc, endpoint.anthropic, start)

        code = reply.code
        if reply.observed:
            for observed in observed_denials(reply.observed):
                metrics.shadow_denial(observed)
        if code == Code.allow:
            out = identity_headers(reply, reservation)
            out.update(limit_headers(reply))
            out[REMOVE_HEADER] = _STRIP_FROM_UPSTREAM
            return self._answer(200, "ok", start, out, b"")
        answer = self._deny(Code(code), endpoint.anthropic, start, reply)
        if code == Code.concurrency_limited:
            answer.headers["Retry-After"] = self.concurrency_retry
        return answer

    def _unavailable(self, exc: Exception, anthropic: bool, start: float) -> Answer:
        """Failure policy: Redis could not decide within redis_timeout_ms. Closed (the
        default) answers 503, which proxies treat as an error, never as a business denial;
        open lets the call through unmetered and counts it, for operators who prefer
        availability over quota accuracy during an outage."""
        log.warning("redis unavailable: %s", exc)
        if self.fail_open:
            metrics.fail_open()
            return self._answer(200, "fail_open", start,
                                {REMOVE_HEADER: _STRIP_FROM_UPSTREAM}, b"")
        return self._deny(Code.unavailable, anthropic, start)

    def _cost(self, model: str, headers, trusted: bool) -> int | None:
        if self.cost_header and trusted:
            given = headers.get(self.cost_header)
            if given is not None:
                ok = given.isascii() and given.isdigit() and len(given) < 13  # not '²'
                return int(given) if ok else None
        return self.model_cost(model)

    def model_cost(self, model: str) -> int:
        """Units a call to `model` reserves when no cost header says otherwise."""
        return self.model_costs.get(model, self.default_cost)

    def _deny(self, code: Code, anthropic: bool, start: float,
              reply: AuthorizeReply | None = None) -> Answer:
        denial, headers, body = denial_answer(code, anthropic, reply)
        return self._answer(denial.status, denial.code, start, headers, body)

    @staticmethod
    def _answer(status: int, code: str, start: float, headers: dict[str, str],
                body: bytes) -> Answer:
        metrics.decision(status, code, time.perf_counter() - start)
        return Answer(status, headers, body, _JSON if body else None)
