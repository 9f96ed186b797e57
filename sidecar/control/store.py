"""ControlStore: organizations and what they hold, on Redis, with the page's rules.

It is assembled from small services, each owning one part and given what it needs:
  keystore       key records (keystore.py; wallets.py for the PAYG balances)
  entities       organizations, members, projects, service accounts (entities.py)
  keys           who may do what to which key; rotation (key_ops.py, key_rotation.py)
  subscriptions  plans, their keys, an organization's billing accounts (subscriptions.py)
  webhooks       an organization's webhook endpoints (webhooks.py)
  audit          the per-organization log (audit.py)
The admin API and the CLI call the operations by the names below, whichever service
serves them.

Write order, so that a failure never leaves something half-made:
- every check (fields, ids, rules) runs before the first write;
- a created thing is complete before anything points at it (record, then index);
- a removal takes effect first (keys disabled), then the entity and its indexes go in one
  MULTI/EXEC on the org's slot. A retry after a failure finishes the job.
"""

from __future__ import annotations

from ..schema import names
from ..schema.keys import KeyHasher
from ..schema.limits import parse_thresholds
from .admin_keys import AdminKeys
from .audit import AuditLog
from .budgets import Budgets
from .checks import parse_when
from .entities import DEFAULT, Entities
from .errors import Conflict, NotFound
from .input_limits import MAX_PAGE
from .key_ops import KeyOps
from .key_resources import KeyResources
from .keystore import KeyStore
from .limit_rules import LimitRules
from .subscriptions import Subscriptions
from .usage import UsageHistory
from .views import text
from .webhooks import Webhooks

__all__ = ["ControlStore", "parse_when"]


class _Op:
    """A ControlStore operation that one of its services serves (same name, same call)."""

    def __init__(self, service: str):
        self.service = service

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, store, owner=None):
        if store is None:        # on the class: the descriptor itself
            return self
        return getattr(getattr(store, self.service), self.name)


class ControlStore:
    def __init__(self, redis, hasher: KeyHasher, budget_timezone: str = "UTC"):
        self.redis = redis
        self.audit = AuditLog(redis)
        self.keystore = KeyStore(redis, hasher)
        resources = KeyResources(redis, self.keystore)
        self.entities = Entities(redis, self.audit, self.keystore, resources)
        self.keys = KeyOps(redis, self.audit, self.keystore, self.entities, resources)
        self.subscriptions = Subscriptions(redis, self.audit, self.keystore, self.entities)
        self.webhooks = Webhooks(redis, self.audit, self.entities)
        self.limits = LimitRules(self, Budgets(redis, hasher, budget_timezone),
                                 UsageHistory(redis, hasher, budget_timezone))
        self.admin_keys = AdminKeys(redis, hasher, self.entities)

    def configure(self, settings) -> None:
        """The deployment's settings the control plane applies (runtime/config.Settings):
        webhook networks, default alert thresholds, days of usage history."""
        self.webhooks.webhook_networks = settings.webhook_networks()
        self.limits.budgets.default_thresholds = parse_thresholds(
            ",".join(settings.alert_thresholds))
        self.limits.usage.retention_days = settings.usage_retention_days
        self.limits.budgets.charge_expired = settings.expired_reservation == "charge"

    # -- budgets and concurrency limits, every level --------------------------------------
    key_limits = _Op("limits")
    set_key_limits = _Op("limits")
    project_limits = _Op("limits")
    set_project_limits = _Op("limits")
    member_limits = _Op("limits")
    set_member_limits = _Op("limits")
    org_limits = _Op("limits")
    set_org_limits = _Op("limits")

    # -- alert thresholds and usage history (issue 12) -------------------------------------
    thresholds_of_key = _Op("limits")
    thresholds_of = _Op("limits")
    set_key_thresholds = _Op("limits")
    set_thresholds = _Op("limits")
    usage_of_key = _Op("limits")
    usage_of = _Op("limits")

    # -- who calls the admin API -----------------------------------------------------------
    authenticate = _Op("admin_keys")

    # -- organizations, members, projects, service accounts ------------------------------
    create_org = _Op("entities")
    ensure_default = _Op("entities")
    resolve_org = _Op("entities")
    org = _Op("entities")
    list_orgs = _Op("entities")
    update_org = _Op("entities")
    add_member = _Op("entities")
    member = _Op("entities")
    list_members = _Op("entities")
    update_member = _Op("entities")
    remove_member = _Op("entities")
    create_project = _Op("entities")
    project = _Op("entities")
    list_projects = _Op("entities")
    update_project = _Op("entities")
    delete_project = _Op("entities")
    create_service_account = _Op("entities")
    service_account = _Op("entities")
    list_service_accounts = _Op("entities")
    update_service_account = _Op("entities")
    delete_service_account = _Op("entities")

    # -- keys ------------------------------------------------------------------------------
    create_key = _Op("keys")
    create_standalone_key = _Op("keys")
    key = _Op("keys")
    list_keys = _Op("keys")
    all_keys = _Op("keys")
    edit_key = _Op("keys")
    set_key_status = _Op("keys")
    delete_key = _Op("keys")
    set_key_quota = _Op("keys")
    rotate_key = _Op("keys")

    # -- subscriptions and billing accounts ------------------------------------------------
    create_subscription = _Op("subscriptions")
    subscription = _Op("subscriptions")
    list_subscriptions = _Op("subscriptions")
    update_subscription = _Op("subscriptions")
    cancel_subscription = _Op("subscriptions")
    account = _Op("subscriptions")
    set_account_balance = _Op("subscriptions")

    # -- webhook endpoints -----------------------------------------------------------------
    create_webhook = _Op("webhooks")
    webhook = _Op("webhooks")
    list_webhooks = _Op("webhooks")
    delete_webhook = _Op("webhooks")
    webhook_endpoints = _Op("webhooks")

    # -- bootstrap -----------------------------------------------------------------------

    async def bootstrap(self, org_name: str | None = None, user: str = "owner") -> dict:
        """The organization (if missing), an owner member, and a first admin key (all);
        nothing when the organization already has an active admin key."""
        if org_name is None or org_name == DEFAULT:
            org_id = await self.resolve_org(DEFAULT)
        else:
            try:
                org_id = await self.resolve_org(org_name)
            except NotFound:
                org_id = (await self.create_org(org_name))["id"]
        # Idempotent: an organization that already has a working admin key is bootstrapped;
        # a second run changes nothing (no second owner, no second key) and says so.
        cursor = 0
        while True:
            found, cursor = await self.list_keys(org_id, type_="admin", status="active",
                                                 limit=MAX_PAGE, cursor=cursor)
            if found:
                return {"organization": await self.org(org_id), "changed": False,
                        "admin_key": found[0]}
            if not cursor:
                break
        held = await self.redis.hget(names.org_users(org_id), user)
        if held:
            member = await self.member(org_id, text(held))
            if member["role"] != "owner":
                raise Conflict(f"user: {user!r} is a {member['role']}, not an owner", "user")
        else:
            member = await self.add_member(org_id, user, "owner")
        key, plaintext = await self.create_key(org_id, {
            "type": "admin", "name": "bootstrap", "member_id": member["id"]})
        return {"organization": await self.org(org_id), "changed": True, "member": member,
                "admin_key": key, "key": plaintext}
