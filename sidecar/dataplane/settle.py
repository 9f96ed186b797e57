"""Usage settlement: `POST /settle` on the data plane, top to bottom.

    authenticate the gateway (settlement_token, constant-time compare)
    -> parse the report                            parse_report, pure
    -> find the key: hash the client's key, or look its key id up in the index
    -> price it: actual = the reported cost, else tokens x token_costs, else what the
       call reserved
    -> one script call: settle.lua (the reservation authorize.lua recorded for the call,
       by the id the upstream got in x-reservation-id: refund at most what it reserved,
       or charge the overage; tokens per minute; the reservation settled once, atomically)

A report that cannot be settled (bad token, bad JSON, unknown key, no such reservation,
negative tokens) gets a 4xx and changes nothing. A reservation is settled once: a second
report of it answers 409 `already_settled` and changes nothing, so a gateway may retry
a report whose answer it did not get.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from dataclasses import dataclass

import orjson
from redis.exceptions import RedisError

from ..redis.pipeline import RedisUnavailable
from ..redis.runner import ScriptRunner, control_client
from ..runtime import metrics
from ..runtime.config import Settings, price_list
from ..schema import names
from ..schema.contracts import SettleArgs, SettleReply
from ..schema.keys import RESERVATION_ID, KeyHasher, key_type, shard_of
from ..schema.limits import Calendar
from ..schema.money import PriceList, Usage, format_amount
from ..schema.money import cost as money_cost
from ..schema.record import MAX_QUOTA
from ..schema.scripts import SETTLE
from .http_messages import Answer, Call, json_answer
from .spend import usage_of

log = logging.getLogger("sidecar.settle")

MAX_REPORT_BYTES = 16_384
MAX_TOKENS = 10**9
SETTLED_TTL_MS = 600_000        # a settled reservation answers 409, not 404, this long
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

class BadReport(ValueError):
    """The report is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Report:
    reservation_id: str      # from the authorize answer's x-reservation-id
    key: str | None          # the client's key (hashed at once, never kept) ...
    key_id: str | None       # ... or its id, as the sidecar told the upstream (x-key-id)
    model: str
    tokens: int              # prompt + completion
    cost: int | None         # units the call really cost, when the gateway knows
    usage: Usage | None = None   # the tokens by kind, for the money it cost


def actual_money(report: Report, prices: PriceList) -> int | None:
    """Micro-units the call really cost: its usage at the model's price; None (what it
    reserved is charged) when the report gives no usage or the model has no price."""
    price = prices.of(report.model) if prices and report.model else None
    if price is None or report.usage is None:
        return None
    return money_cost(price, report.usage)


def parse_report(body: bytes) -> Report:
    """The report in a /settle body, or BadReport naming the bad field. Pure."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadReport("body: not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadReport("body: expected a JSON object")
    reservation_id = doc.get("reservation_id")
    # Exactly the form the sidecar gives out: no case or padding variants of one id.
    if not isinstance(reservation_id, str) or not RESERVATION_ID.fullmatch(reservation_id):
        raise BadReport("reservation_id: required, the x-reservation-id of the allowed call "
                        "(rsv_ and 32 lower-case hex digits)")
    if "reserved" in doc:
        raise BadReport("reserved: not accepted; the reservation says what was reserved")
    key, key_id = doc.get("key"), doc.get("key_id")
    if (key is None) == (key_id is None):
        raise BadReport("key / key_id: give exactly one")
    if key is not None and not (isinstance(key, str) and key_type(key)):
        raise BadReport("key: not a well-formed API key")
    if key_id is not None and not (isinstance(key_id, str) and _KEY_ID.fullmatch(key_id)):
        raise BadReport("key_id: not a key id")
    model = doc.get("model", "")
    if not isinstance(model, str) or len(model) > 256:
        raise BadReport("model: a string of at most 256 characters")
    usage = doc.get("usage")      # the upstream's own usage object, as it answered
    if usage is not None and not isinstance(usage, dict):
        raise BadReport("usage: an object (the upstream's usage)")
    try:
        tokens = usage_of(usage if usage is not None else doc)
    except ValueError as exc:
        raise BadReport(("usage." if usage is not None else "") + str(exc)) from None
    cost = doc.get("cost")
    if cost is not None and not _whole(cost, MAX_QUOTA):
        raise BadReport(f"cost: whole quota units between 0 and {MAX_QUOTA}")
    return Report(reservation_id, key, key_id, model,
                  tokens.input + tokens.output if tokens else 0, cost, tokens)


def actual_cost(report: Report, token_costs: dict[str, int]) -> int | None:
    """Units the call really cost: the reported cost, else its tokens priced per 1000 for
    the model (rounded up), else None: what the call reserved (only its tokens count).
    Pure."""
    if report.cost is not None:
        return report.cost
    per_1k = token_costs.get(report.model)
    if per_1k is not None:
        return -(-report.tokens * per_1k // 1000)
    return None


def _whole(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


class Settler:
    def __init__(self, settings: Settings, hasher: KeyHasher, runner: ScriptRunner):
        assert settings.settlement_token, "the endpoint is off without a token"
        self.runner = runner
        self.hasher = hasher
        self.token_costs = settings.token_costs
        self.prices = price_list(settings)
        self.calendar = Calendar(settings.budget_timezone)
        self.expiry = "c" if settings.expired_reservation == "charge" else "r"
        self.thresholds = settings.default_thresholds()
        self.usage_days = settings.usage_retention_days
        self._token = ("Bearer " + settings.settlement_token).encode()
        self._redis_url = settings.redis_url
        self._timeout = settings.redis_timeout_ms / 1000
        self._index = None      # control client, only for reports that give a key id

    async def __call__(self, call: Call) -> Answer:
        if call.method != "POST":
            return _error(405, "method_not_allowed", "Use POST.", {"Allow": "POST"})
        given = call.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._token):
            metrics.settlement("unauthorized")
            return _error(401, "invalid_settlement_token",
                          "Send the settlement token as 'Authorization: Bearer <token>'.",
                          {"WWW-Authenticate": 'Bearer realm="settle"'})
        body = call.body
        if call.body_truncated or len(body) > MAX_REPORT_BYTES:
            metrics.settlement("rejected")
            return _error(413, "report_too_large", f"At most {MAX_REPORT_BYTES} bytes.")
        try:
            report = parse_report(body)
        except BadReport as exc:
            metrics.settlement("rejected")
            return _error(400, "invalid_report", str(exc))
        try:
            return await self._settle(report)
        except (RedisUnavailable, RedisError, OSError, TimeoutError) as exc:
            # Nothing was settled: the gateway should retry the same report later; the
            # reservation keeps a retry from settling twice.
            log.warning("settlement not applied, redis unavailable: %s", exc)
            metrics.settlement("unavailable")
            return _error(503, "service_unavailable", "Usage could not be settled now; "
                          "retry the same report.")

    async def _settle(self, report: Report) -> Answer:
        key_hash = self.hasher(report.key) if report.key else await self._hash_of(report.key_id)
        if key_hash is None:
            return self._unknown()
        actual = actual_cost(report, self.token_costs)
        money = actual_money(report, self.prices)
        shard = shard_of(key_hash)
        now = int(time.time() * 1000)
        day, month = self.calendar.numbers(now)
        args = SettleArgs(names.record(key_hash), names.wallet(shard), names.budgets(shard),
                          names.reservation(key_hash, report.reservation_id),
                          names.events(shard), names.usage_day(shard, day),
                          names.usage_hour(shard, now // 3_600_000), now,
                          "" if actual is None else actual, report.tokens, SETTLED_TTL_MS,
                          names.POOL_PREFIX, "" if money is None else money, day, month,
                          self.expiry, self.thresholds, self.usage_days)
        reply = SettleReply.parse(await self.runner.run(SETTLE, args.keys(), args.argv()))
        rid = report.reservation_id
        if reply.code == SettleReply.UNKNOWN_KEY:
            return self._unknown()
        if reply.code == SettleReply.NO_RESERVATION:
            metrics.settlement("unknown_reservation")
            return _error(404, "unknown_reservation",
                          f"No reservation {rid} for this key: it was never made, has "
                          "expired (reservation_ttl_s), or belongs to another key.")
        if reply.code == SettleReply.ALREADY_SETTLED:
            metrics.settlement("duplicate")
            return _error(409, "already_settled",
                          f"Reservation {rid} has already been settled; nothing changed.")
        reserved, delta, from_wallet = reply.reserved, reply.delta, reply.from_wallet
        held, spent = reply.money_reserved, reply.money_actual
        metrics.settlement("refund" if delta < 0 else "charge" if delta > 0 else "exact")
        out = {"reservation_id": rid, "status": "settled", "reserved": reserved,
               "actual": reserved + delta, "delta": delta, "from_wallet": from_wallet,
               "tokens": report.tokens}
        if held or spent:
            out["money"] = {"reserved": format_amount(held), "charged": format_amount(spent)}
        return _json(200, out)

    async def _hash_of(self, key_id: str) -> str | None:
        if self._index is None:
            self._index = control_client(self._redis_url, self._timeout, 4)
        found = await self._index.hget(names.KEY_INDEX, key_id)
        return found.decode() if isinstance(found, bytes) else found

    @staticmethod
    def _unknown() -> Answer:
        metrics.settlement("unknown_key")
        return _error(422, "unknown_key", "No such key (unknown, or deleted).")


_json = json_answer


def _error(status: int, code: str, message: str,
           headers: dict[str, str] | None = None) -> Answer:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error",
                                    "code": code}}, headers)
