"""The authority model: who may do what to which resource. Pure: no I/O.

`decide(principal, action, resource)` answers every admin API route and every CLI
command that acts in an organization; the control plane loads the facts the answer
needs (the target's organization, its member and that member's role, the keys a cascade
disables), asks, and writes nothing when the answer is no.

The rules (from the vendor page, in our words):
- tenancy: an admin key sees only its own organization; anything else is not found (404,
  the same answer as for an id that never existed);
- the admin key's permission mode applies to every action: all; read-only = every read
  scope; restricted = the listed `<resource>:read|write` scopes (write implies read);
- ranks: owner > admin > member. Nobody raises their own role, and nobody acts on the
  keys, the membership or the role of another member of equal or higher rank;
- only owners grant the owner or admin role;
- managing the organization's structure and shared keys (rename it, projects, service
  accounts, members, project and service-account keys, subscriptions) needs an owner or
  admin; admin keys are made by owners and admins, each tied to its maker;
- a user key is made (and so rotated) only by the member who owns it; rotating any key
  needs the authority to create it (the successor is tied to the same member);
- a cascade (deleting a project or a service account, removing a member) needs the
  authority to disable every key it disables;
- nobody hands out more than they hold: an admin key creates, widens, enables or rotates
  admin keys only within its own grant.

The operator (the `sidecar` CLI on the server's own Redis credentials) is the root
principal: every rule above allows it; the invariants that hold for everybody (an
organization keeps an owner, ...) are the control plane's, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schema.record import ALL, READ_ONLY, RESTRICTED
from .errors import ControlError, Forbidden, Invalid, NotFound

RESOURCES = ("orgs", "members", "projects", "service_accounts", "keys", "subscriptions",
             "audit")
ADMIN_SCOPES = frozenset(f"{r}:{a}" for r in RESOURCES for a in ("read", "write")
                         if (r, a) != ("audit", "write"))
READ_SCOPES = frozenset(s for s in ADMIN_SCOPES if s.endswith(":read"))

ROLES = ("owner", "admin", "member")
RANK = {"owner": 3, "admin": 2, "member": 1}
# Roles that manage the organization: its structure, shared keys, members, admin keys.
MANAGERS = frozenset({"owner", "admin"})
GRANTS_ROLES = frozenset({"owner"})            # who may grant owner or admin

# Every action the control plane performs -> the admin scope it needs.
ACTIONS: dict[str, str] = {
    "organization.read": "orgs:read", "organization.update": "orgs:write",
    "member.read": "members:read", "member.add": "members:write",
    "member.update": "members:write", "member.remove": "members:write",
    "project.read": "projects:read", "project.create": "projects:write",
    "project.update": "projects:write", "project.delete": "projects:write",
    "service_account.read": "service_accounts:read",
    "service_account.create": "service_accounts:write",
    "service_account.update": "service_accounts:write",
    "service_account.delete": "service_accounts:write",
    "key.read": "keys:read", "key.create": "keys:write", "key.update": "keys:write",
    "key.enable": "keys:write", "key.disable": "keys:write", "key.delete": "keys:write",
    "key.quota": "keys:write", "key.rotate": "keys:write", "key.limits": "keys:write",
    "organization.limits": "orgs:write", "project.limits": "projects:write",
    "member.limits": "members:write",
    "subscription.read": "subscriptions:read", "subscription.create": "subscriptions:write",
    "subscription.update": "subscriptions:write",
    "subscription.cancel": "subscriptions:write",
    "audit.read": "audit:read",
    # webhook endpoints are settings of the organization: its scopes
    "webhook.read": "orgs:read", "webhook.create": "orgs:write",
    "webhook.delete": "orgs:write",
}
# What each action is called in a refusal.
_WHAT = {"organization.update": "renaming the organization",
         "member.add": "adding a member", "member.update": "changing a member",
         "member.remove": "removing a member", "project.create": "creating a project",
         "project.update": "renaming a project", "project.delete": "deleting a project",
         "service_account.create": "creating a service account",
         "service_account.update": "renaming a service account",
         "service_account.delete": "deleting a service account",
         "subscription.create": "creating a subscription",
         "subscription.update": "changing a subscription",
         "subscription.cancel": "cancelling a subscription",
         "webhook.create": "adding a webhook endpoint",
         "webhook.delete": "deleting a webhook endpoint",
         "organization.limits": "changing the organization's budget or limits",
         "project.limits": "changing a project's budget or limits",
         "member.limits": "changing a member's budget or limits"}
_KEY_VERB = {"key.update": "change", "key.enable": "enable", "key.disable": "disable",
             "key.delete": "delete", "key.quota": "change the quota of",
             "key.rotate": "rotate", "key.create": "create",
             "key.limits": "change the budget or limits of"}
_KEY_DOING = {"key.update": "changing", "key.enable": "enabling", "key.disable": "disabling",
              "key.delete": "deleting", "key.quota": "changing the quota of",
              "key.rotate": "rotating", "key.create": "creating",
              "key.limits": "changing the budget or limits of"}


@dataclass(frozen=True)
class Grant:
    permission: str = ALL                        # all | restricted | read-only
    scopes: frozenset[str] = frozenset()

    def effective(self) -> frozenset[str]:
        if self.permission == ALL:
            return ADMIN_SCOPES
        if self.permission == READ_ONLY:
            return READ_SCOPES
        implied = {s.replace(":write", ":read") for s in self.scopes if s.endswith(":write")}
        return frozenset(self.scopes | implied) & ADMIN_SCOPES

    def allows(self, scope: str) -> bool:
        return scope in self.effective()

    def covers(self, other: Grant) -> bool:
        """No escalation: a key may hand out only what it holds itself."""
        return other.effective() <= self.effective()


@dataclass(frozen=True)
class Actor:
    """The principal: an admin key (its org, its member and that member's role now, its
    grant) or the operator CLI."""
    kind: str                                    # admin_key | cli
    id: str
    org: str | None = None
    member: str | None = None                    # the admin key's creating member
    role: str | None = None
    grant: Grant = field(default_factory=Grant)

    @property
    def operator(self) -> bool:
        return self.kind == "cli"

    @property
    def created_by(self) -> str:
        """What a new record's created-by says: the member behind the key, else the key."""
        return self.member or self.id

    @property
    def rank(self) -> int:
        return RANK.get(self.role or "", 0)


Principal = Actor
CLI = Actor(kind="cli", id="cli")


@dataclass(frozen=True)
class Resource:
    """What an action is on, with the facts the rules need (loaded by the caller)."""
    kind: str                          # organization, member, project, service_account,
    org: str | None = None             #   key, subscription, audit
    id: str | None = None
    member: str | None = None          # the member it is (a member) or is tied to (a key)
    member_role: str | None = None     # that member's role now (None: the member is gone)
    key_type: str | None = None        # keys: standard | subscription | org | admin
    grant: Grant | None = None         # admin keys: the grant the action leaves it with
    role: str | None = None            # members: the role the action gives
    touches: tuple[Resource, ...] = () # cascades: the keys the action disables

    @property
    def rank(self) -> int:
        return RANK.get(self.member_role or "", 0)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""
    param: str | None = None
    status: int = 403                  # of a refusal: 403, or 404 for another tenant's id

    def __bool__(self) -> bool:
        return self.allowed

    def error(self) -> ControlError:
        return (NotFound if self.status == 404 else Forbidden)(self.reason, self.param)


ALLOW = Decision(True)


def _deny(reason: str, param: str | None = None) -> Decision:
    return Decision(False, reason, param)


def gate(actor: Actor, action: str) -> Decision:
    """The permission mode alone: what the admin API checks before reading anything."""
    scope = ACTIONS[action]
    if actor.operator or actor.grant.allows(scope):
        return ALLOW
    if actor.grant.permission == READ_ONLY:
        return _deny("a read-only admin key cannot make changes", "scope")
    return _deny(f"this admin key lacks the scope {scope}", "scope")


def decide(actor: Actor, action: str, resource: Resource) -> Decision:
    """Allow, or deny with the reason and the request field it is about."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if actor.operator:
        return ALLOW
    if resource.org != actor.org:              # another tenant's: as if it did not exist
        return Decision(False, f"no {resource.kind.replace('_', ' ')} with id "
                               f"{resource.id!r}", _PARAM.get(resource.kind), 404)
    allowed = gate(actor, action)
    if not allowed:
        return allowed
    if action.endswith(".read"):
        return ALLOW
    if actor.role is None:
        return _deny("this admin key is tied to no member; make one with "
                     "`sidecar admin create-key --member`", "key")
    if action == "key.limits" and actor.role not in MANAGERS:
        # Budgets and concurrency limits are what managers hold members to: a member may
        # set them on a key they create, never change them after, even on their own key.
        return _deny(f"budgets and concurrency limits of keys are changed by owners and "
                     f"admins (your role: {actor.role})", "key_id")
    if action.startswith("key."):
        return _key_rule(actor, action, resource)
    if action.startswith("member.") and action != "member.limits":
        return _member_rule(actor, action, resource)
    manage = _manage(actor, _WHAT[action], _PARAM.get(resource.kind) if resource.id else None)
    return _cascade(actor, resource) if manage else manage


def check(actor: Actor, action: str, resource: Resource) -> None:
    """decide(), raising the refusal as a control error (403 or 404)."""
    answer = decide(actor, action, resource)
    if not answer:
        raise answer.error()


_PARAM = {"member": "member_id", "project": "project_id", "key": "key_id",
          "service_account": "service_account_id", "subscription": "subscription_id",
          "webhook": "webhook_id"}


def _manage(actor: Actor, what: str, param: str | None = None) -> Decision:
    if actor.role in MANAGERS:
        return ALLOW
    return _deny(f"{what} needs an owner or admin member (your role: {actor.role})", param)


def _cascade(actor: Actor, resource: Resource) -> Decision:
    """Every key the action disables must be one the actor may disable itself."""
    for key in resource.touches:
        answer = decide(actor, "key.disable", key)
        if not answer:
            return _deny(f"it would disable key {key.id}, which you cannot: "
                         f"{answer.reason}", "member_id" if resource.kind == "member"
                         else _PARAM.get(resource.kind))
    return ALLOW


def _member_rule(actor: Actor, action: str, m: Resource) -> Decision:
    param = "role" if action != "member.remove" else "member_id"
    given = m.role
    if given is not None and given not in RANK:
        return _deny(f"role: one of {', '.join(ROLES)}", "role")
    if action == "member.add":
        if given in ("owner", "admin") and actor.role not in GRANTS_ROLES:
            return _deny(f"only an owner grants the {given} role (your role: "
                         f"{actor.role})", "role")
        return _manage(actor, "adding a member", "user")
    if m.member is not None and m.member == actor.member:   # oneself: leave, step down
        if given is not None and RANK[given] > actor.rank:
            return _deny(f"nobody raises their own role ({actor.role} -> {given})", "role")
        return _cascade(actor, m)
    manage = _manage(actor, _WHAT[action], param)
    if not manage:
        return manage
    if m.rank >= actor.rank:
        return _deny(f"{m.id} is {_a(m.member_role)}: you cannot change or remove a member "
                     f"of equal or higher rank (your role: {actor.role})", param)
    if given in ("owner", "admin") and actor.role not in GRANTS_ROLES:
        return _deny(f"only an owner grants the {given} role (your role: {actor.role})",
                     "role")
    return _cascade(actor, m)


def _key_rule(actor: Actor, action: str, k: Resource) -> Decision:
    admin = k.key_type == "admin"
    if action in ("key.create", "key.rotate", "key.enable") and admin and k.grant \
            and not actor.grant.covers(k.grant):
        return _deny("permission: an admin key cannot grant more than it holds",
                     "permission")
    if action == "key.update" and admin and k.grant and not actor.grant.covers(k.grant):
        return _deny("permission: an admin key cannot grant more than it holds",
                     "permission")
    if action == "key.create":
        return _create_rule(actor, k)
    if action == "key.rotate":                 # the successor is a new key of the same owner
        made = _create_rule(actor, k)
        if not made:
            return _deny(f"rotating mints a successor tied to the same owner, which you "
                         f"may not create: {made.reason}", "key_id")
    own = k.member is not None and k.member == actor.member
    if admin:
        if own and action in ("key.disable", "key.delete"):
            return ALLOW                       # giving up one's own access
        if actor.role not in MANAGERS:
            return _deny(f"admin keys are managed by owners and admins (your role: "
                         f"{actor.role})", "key_id")
    elif k.member is None:                     # project, service-account, standard, sub
        return _manage(actor, f"{_KEY_DOING[action]} {_owner_word(k)} key", "key_id")
    if own:
        return ALLOW
    if k.member_role is not None and k.rank >= actor.rank:
        return _deny(f"key {k.id} belongs to {k.member}, {_a(k.member_role)}: you cannot "
                     f"{_KEY_VERB[action]} the keys of a member of equal or higher rank "
                     f"(your role: {actor.role})", "key_id")
    return _manage(actor, f"{_KEY_DOING[action]} another member's key", "key_id")


def _create_rule(actor: Actor, k: Resource) -> Decision:
    if k.key_type == "admin":
        if actor.role not in MANAGERS:
            return _deny(f"creating an admin key needs an owner or admin member (your "
                         f"role: {actor.role})", "type")
        if k.member != actor.member:
            return _deny("member_id: an admin key is tied to the membership of the member "
                         "who creates it", "member_id")
        return ALLOW
    if k.member is not None:                   # a user key
        if k.member != actor.member:
            return _deny("member_id: a user key can be created only by the member who "
                         "owns it; an admin key cannot create one for another member",
                         "member_id")
        return ALLOW
    return _manage(actor, f"creating {_owner_word(k)} key", "owner")


def _owner_word(k: Resource) -> str:
    return {"org": "a project or service-account", "admin": "an admin"}.get(
        k.key_type or "org", f"a {k.key_type}")


def _a(role: str | None) -> str:
    return f"an {role}" if role in ("owner", "admin") else f"a {role}"


def check_admin_scopes(grant: Grant) -> None:
    """A restricted grant lists admin scopes only (an input check, for every caller)."""
    bad = sorted(grant.scopes - ADMIN_SCOPES) if grant.permission == RESTRICTED else []
    if bad:
        raise Invalid(f"scopes: {bad[0]!r} is not an admin scope (one of "
                      f"{', '.join(sorted(ADMIN_SCOPES))})", "scopes")
