"""Request and response schemas of the admin API (JSON Schema, OpenAPI 3.1 dialect).

Requests are checked against these very dicts (validation.py), so the document cannot
drift from what the server accepts. Responses are described, not enforced.
"""

from __future__ import annotations

from ..control.input_limits import (
    ACCOUNT_CHARS,
    MAX_ACCOUNT,
    MAX_ACTION,
    MAX_CYCLE_DAYS,
    MAX_GRACE_S,
    MAX_ID,
    MAX_IP_TEXT,
    MAX_IPS,
    MAX_MODEL_NAME,
    MAX_MODELS,
    MAX_NAME,
    MAX_PAGE,
    MAX_QUOTA,
    MAX_SCOPE,
    MAX_SCOPES,
    MAX_USER,
    MAX_WHEN,
    MIN_SCOPE,
)
from ..control.policy import ROLES
from ..schema.events import TYPES as EVENT_TYPES
from ..schema.keys import KeyType
from ..schema.limits import MAX_CONCURRENCY, MAX_THRESHOLDS, OBSERVABLE, PERIODS
from ..schema.record import PERMISSIONS
from ..schema.webhooks import MAX_URL

ID_PATTERN = f"^[A-Za-z0-9_-]{{1,{MAX_ID}}}$"
ID = {"type": "string", "pattern": ID_PATTERN, "maxLength": MAX_ID}
TEXT = "^[^\\x00-\\x1F]*$"     # printable: no control characters
NAME = {"type": "string", "maxLength": MAX_NAME, "pattern": TEXT}
REQUIRED_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": TEXT}
REQUIRED_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": TEXT}
UNITS = {"type": "integer", "minimum": 0, "maximum": MAX_QUOTA}
WHEN = {"type": ["string", "null"], "format": "date-time", "maxLength": MAX_WHEN}
PERMISSION = {"type": "string", "enum": list(PERMISSIONS)}
KEY_TYPES = [t.value for t in KeyType]
OWNERS = ["project", "user", "service_account"]
MODELS = {"type": "array", "maxItems": MAX_MODELS,
          "items": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_NAME,
                    "pattern": "^[^,]+$"}}
IPS = {"type": "array", "maxItems": MAX_IPS,
       "items": {"type": "string", "maxLength": MAX_IP_TEXT}}
SCOPES = {"type": "array", "maxItems": MAX_SCOPES,     # resource:read|write
          "items": {"type": "string", "minLength": MIN_SCOPE, "maxLength": MAX_SCOPE,
                    "pattern": "^[^,:]+:[^,:]+$"}}
# A billing account (PAYG wallet) of the caller's organization, by the name it gives it:
# each organization has its own names, so another org's "acme" is another wallet.
ACCOUNT = {"type": "string", "pattern": f"^[{ACCOUNT_CHARS}]{{1,{MAX_ACCOUNT}}}$",
           "maxLength": MAX_ACCOUNT,
           "description": "the organization's own billing account (PAYG wallet)"}
LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}
OFFSET_CURSOR = {"type": "string", "pattern": "^[0-9]{1,12}$"}


def obj(properties: dict, required: tuple[str, ...] = (), min_properties: int = 0) -> dict:
    out: dict = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    if min_properties:
        out["minProperties"] = min_properties
    return out


# -- requests -------------------------------------------------------------------------

ORG_UPDATE = obj({"name": REQUIRED_NAME}, ("name",))
MEMBER_CREATE = obj({"user": {"type": "string", "minLength": 1, "maxLength": MAX_USER,
                              "pattern": TEXT},
                     "name": NAME, "role": {"type": "string", "enum": list(ROLES)}},
                    ("user",))
MEMBER_UPDATE = obj({"name": NAME, "role": {"type": "string", "enum": list(ROLES)}},
                    min_properties=1)
PROJECT_CREATE = obj({"name": REQUIRED_NAME}, ("name",))
SA_CREATE = obj({"project_id": ID, "name": REQUIRED_NAME}, ("project_id", "name"))
NAME_UPDATE = obj({"name": REQUIRED_NAME}, ("name",))
AMOUNT = {"type": "string", "pattern": "^[0-9]{1,10}(\\.[0-9]{1,6})?$", "maxLength": 17,
          "description": "decimal amount in the deployment's currency, e.g. \"5.00\""}
LIMIT_FIELDS = {
    "budget": {**AMOUNT, "type": ["string", "null"]},
    "budget_period": {"type": "string", "enum": list(PERIODS)},
    "max_concurrency": {"type": "integer", "minimum": 0, "maximum": MAX_CONCURRENCY},
    "observe": {"type": "array", "maxItems": len(OBSERVABLE), "uniqueItems": True,
                "items": {"type": "string", "enum": list(OBSERVABLE)}},
}
LIMITS = obj(LIMIT_FIELDS, min_properties=1)
THRESHOLDS = obj({"thresholds": {
    "type": ["array", "null"], "maxItems": MAX_THRESHOLDS,
    "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    "description": "fractions of the quota or budget left, e.g. [0.2, 0.05, 0]; [] none, "
                   "null the deployment's default (alert_thresholds)"}}, ("thresholds",))
USAGE_QUERY = obj({"since": {"type": "string", "format": "date", "maxLength": 10,
                             "description": "first day, YYYY-MM-DD"}})
KEY_CREATE = obj({
    "type": {"type": "string", "enum": ["standard", "org", "admin"], "default": "org"},
    "name": NAME,
    "owner": {"type": "string", "enum": OWNERS},
    "project_id": ID, "member_id": ID, "service_account_id": ID,
    "quota": UNITS, "unlimited": {"type": "boolean"},
    "models": MODELS, "allowed_ips": IPS, "expires_at": WHEN,
    "rpm": UNITS, "tpm": UNITS, "rpd": UNITS, "tpd": UNITS, "permission": PERMISSION,
    "scopes": SCOPES, "account": ACCOUNT, **LIMIT_FIELDS,
})
KEY_EDIT = obj({"name": NAME, "permission": PERMISSION, "scopes": SCOPES, "models": MODELS,
                "allowed_ips": IPS, "rpm": UNITS, "tpm": UNITS, "rpd": UNITS, "tpd": UNITS,
                "expires_at": WHEN},
               min_properties=1)
KEY_QUOTA = obj({"set": UNITS,
                 "add": {"type": "integer", "minimum": -MAX_QUOTA, "maximum": MAX_QUOTA},
                 "unlimited": {"type": "boolean"}}, min_properties=1)
KEY_ROTATE = obj({"grace_seconds": {"type": "integer", "minimum": 0, "maximum": MAX_GRACE_S},
                  "idempotency_key": REQUIRED_TEXT})
SUB_CREATE = obj({"account": ACCOUNT,
                  "plan": REQUIRED_NAME, "cycle_quota": UNITS,
                  "cycle_days": {"type": "integer", "minimum": 1, "maximum": MAX_CYCLE_DAYS},
                  "payg_fallback": {"type": "boolean"}, "name": NAME},
                 ("account", "plan", "cycle_quota"))
SUB_UPDATE = obj({"plan": REQUIRED_NAME, "cycle_quota": UNITS,
                  "payg_fallback": {"type": "boolean"}}, min_properties=1)

# Query strings.
WEBHOOK_CREATE = obj({
    "url": {"type": "string", "minLength": 1, "maxLength": MAX_URL,
            "description": "http:// or https://, no user:password"},
    "secret": {"type": "string", "pattern": "^whsec_[A-Za-z0-9+/]{32,88}={0,2}$",
               "description": "whsec_<base64 of 24 to 64 bytes>; default: generated"},
    "events": {"type": "array", "maxItems": len(EVENT_TYPES),
               "items": {"type": "string", "enum": [*EVENT_TYPES, "*"]},
               "description": "the event types to send; default (or ['*']): all"},
    "description": NAME}, ("url",))
PAGE = {"limit": LIMIT, "cursor": OFFSET_CURSOR}
MEMBER_QUERY = obj({"role": {"type": "string", "enum": list(ROLES)}, **PAGE})
PAGE_QUERY = obj(PAGE)
SA_QUERY = obj({"project_id": ID, **PAGE})
KEY_QUERY = obj({"type": {"type": "string", "enum": KEY_TYPES},
                 "status": {"type": "string", "enum": ["active", "disabled"]},
                 "owner": {"type": "string", "enum": OWNERS},
                 "project_id": ID, "member_id": ID, "service_account_id": ID, **PAGE})
AUDIT_QUERY = obj({"action": {"type": "string", "minLength": 1, "maxLength": MAX_ACTION,
                              "pattern": TEXT},
                   "actor_id": ID, "resource_type": {"type": "string", "enum": [
                       "organization", "member", "project", "service_account", "key",
                       "subscription"]},
                   "resource_id": ID,
                   "since": {"type": "string", "format": "date-time", "maxLength": MAX_WHEN},
                   "until": {"type": "string", "format": "date-time", "maxLength": MAX_WHEN},
                   "limit": LIMIT,
                   "cursor": {"type": "string", "pattern": "^[0-9]{1,19}-[0-9]{1,19}$"}})

# -- responses (described in the document) -----------------------------------------------

_S = {"type": "string"}
_SN = {"type": ["string", "null"]}
_I = {"type": "integer"}
_IN = {"type": ["integer", "null"]}
_B = {"type": "boolean"}
_STRS = {"type": "array", "items": _S}


def _entity(obj_name: str, **props) -> dict:
    return {"type": "object", "required": ["object", "id"],
            "properties": {"object": {"const": obj_name}, "id": _S,
                           "created_at": _SN, "created_by": _SN, **props}}


RESPONSES = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "code"],
        "properties": {"message": _S, "type": _S, "code": _SN, "param": _SN}}}},
    "Organization": _entity("organization", name=_S),
    "Member": _entity("member", org_id=_S, user=_S, name=_S,
                      role={"type": "string", "enum": list(ROLES)}),
    "Project": _entity("project", org_id=_S, name=_S),
    "ServiceAccount": _entity("service_account", org_id=_S, project_id=_S, name=_S),
    "Key": {"type": "object", "required": ["id", "type", "status"], "properties": {
        "id": _S, "type": {"type": "string", "enum": KEY_TYPES}, "name": _S,
        "status": {"type": "string", "enum": ["active", "disabled"]},
        "disabled_reason": _SN, "unlimited": _B, "quota_remaining": _IN, "quota_used": _I,
        "expires_at": _SN, "expired": _B, "models": _STRS, "allowed_ips": _STRS,
        "permission": PERMISSION,
        "scopes": _STRS, "rpm": _I, "tpm": _I, "rpd": _I, "tpd": _I, "account": _SN,
        "org_id": _SN,
        "project_id": _SN, "member_id": _SN, "service_account_id": _SN,
        "owner": {"type": ["string", "null"], "enum": [*OWNERS, None]},
        "subscription_id": _SN, "rotated_to": _SN, "rotated_from": _SN,
        "created_at": _SN, "created_by": _SN, "last_used_at": _SN, "last_ip": _SN,
        "last_model": _SN, "request_count": _I, "subscription": {"type": "object"}}},
    "KeyActivity": {"type": "object", "required": ["id"], "properties": {
        "id": _S, "last_used_at": _SN, "last_ip": _SN, "last_model": _SN,
        "request_count": _I, "quota_used": _I, "quota_remaining": _IN}},
    "Subscription": _entity("subscription", org_id=_S, account=_S, plan=_S, key_id=_S,
                            status=_S, cycle_quota=_I, cycle_used=_I, cycle_remaining=_I,
                            cycle_days=_I, renews_at=_SN, payg_fallback=_B, payg_used=_I,
                            payg_balance=_I),
    "AuditEvent": {"type": "object", "required": ["id", "action"], "properties": {
        "object": {"const": "audit_event"}, "id": _S, "time": _S, "action": _S,
        "actor": {"type": "object", "properties": {"type": _S, "id": _S,
                                                   "member_id": _SN}},
        "resource": {"type": "object", "properties": {"type": _S, "id": _S}},
        "before": {}, "after": {}}},
    "WebhookEndpoint": _entity("webhook_endpoint", org_id=_S, url=_S, events=_STRS,
                               description=_S),
    "Limits": {"type": "object", "required": ["budget", "spent", "reserved", "in_flight"],
               "properties": {"budget": _SN, "budget_period": _S, "spent": _S,
                              "reserved": _S, "remaining": _SN,
                              "max_concurrency": _IN, "in_flight": _I,
                              "observe": _STRS}},
    "Thresholds": {"type": "object", "required": ["thresholds", "default"],
                   "properties": {"thresholds": {"type": "array",
                                                 "items": {"type": "number"}},
                                  "default": _B}},
    "Usage": {"type": "object", "required": ["total", "daily", "hourly"], "properties": {
        "object": {"const": "usage"}, "key_id": _S, "project_id": _S,
        "organization_id": _S, "since": _SN,
        "total": {"$ref": "#/components/schemas/UsageRow"},
        "daily": {"type": "array", "items": {"$ref": "#/components/schemas/UsageRow"}},
        "hourly": {"type": "array", "items": {"$ref": "#/components/schemas/UsageRow"}}}},
    "UsageRow": {"type": "object", "required": ["requests", "tokens", "spend"],
                 "properties": {"date": _S, "hour": _S, "requests": _I, "tokens": _I,
                                "spend": {**_S, "description": "decimal amount"}}},
    "Deleted": {"type": "object", "required": ["id", "deleted"],
                "properties": {"id": _S, "deleted": {"const": True},
                               "disabled_keys": _STRS}},
}
RESPONSES["KeyCreated"] = {"allOf": [{"$ref": "#/components/schemas/Key"}, {
    "type": "object", "required": ["key"], "properties": {"key": {
        "type": ["string", "null"], "description": "the plaintext, shown this once"}}}]}
RESPONSES["KeyRotated"] = {"allOf": [{"$ref": "#/components/schemas/KeyCreated"}, {
    "type": "object", "required": ["replayed", "old_key"], "properties": {
        "replayed": _B, "old_key": {"$ref": "#/components/schemas/Key"}}}]}
RESPONSES["WebhookEndpointCreated"] = {"allOf": [
    {"$ref": "#/components/schemas/WebhookEndpoint"},
    {"type": "object", "required": ["secret"], "properties": {"secret": {
        "type": "string", "description": "signs every delivery; shown this once"}}}]}
RESPONSES["SubscriptionCreated"] = {"allOf": [
    {"$ref": "#/components/schemas/Subscription"},
    {"type": "object", "required": ["key"], "properties": {"key": _S}}]}
