"""Who may do what: admin-key grants, member roles, the ownership rules. Pure.

Admin scopes are `<resource>:read|write`; a write scope also grants reading the same
resource. Permission modes (from the vendor page): all; read-only = every read scope;
restricted = the listed scopes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Forbidden, Invalid

RESOURCES = ("orgs", "members", "projects", "service_accounts", "keys", "subscriptions",
             "audit")
ADMIN_SCOPES = frozenset(f"{r}:{a}" for r in RESOURCES for a in ("read", "write")
                         if (r, a) != ("audit", "write"))
READ_SCOPES = frozenset(s for s in ADMIN_SCOPES if s.endswith(":read"))

ROLES = ("owner", "admin", "member")
# What a role lets its member do through an admin key, beyond the key's own grant.
# Every member may create their own user keys.
ROLE_CAN = {"owner": frozenset({"manage_keys", "admin_keys"}),
            "admin": frozenset({"manage_keys", "admin_keys"}),
            "member": frozenset()}


@dataclass(frozen=True)
class Grant:
    permission: str = "all"                      # all | restricted | read-only
    scopes: frozenset[str] = frozenset()

    def effective(self) -> frozenset[str]:
        if self.permission == "all":
            return ADMIN_SCOPES
        if self.permission == "read-only":
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
    """Who makes a change: an admin key (with its org, member and grant) or the CLI."""
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

    def can(self, capability: str) -> bool:
        # The CLI runs with the server's own credentials; an admin key made by an operator
        # (no membership) acts for the organization as a whole.
        if self.operator or self.role is None:
            return True
        return capability in ROLE_CAN.get(self.role, frozenset())


CLI = Actor(kind="cli", id="cli")


def require(actor: Actor, capability: str, what: str, param: str | None = None) -> None:
    if not actor.can(capability):
        raise Forbidden(f"{what} needs an owner or admin member (your role: {actor.role})",
                        param)


def check_user_key_owner(actor: Actor, member_id: str) -> None:
    """The page: a user key can be created only by the member who owns it."""
    if actor.operator:
        return
    if actor.member is None or actor.member != member_id:
        raise Forbidden("member_id: a user key can be created only by the member who owns "
                        "it; an admin key cannot create one for another member", "member_id")


def check_admin_grant(actor: Actor, grant: Grant) -> None:
    """An admin key may create or widen admin keys only up to its own grant."""
    bad = sorted(grant.scopes - ADMIN_SCOPES) if grant.permission == "restricted" else []
    if bad:
        raise Invalid(f"scopes: {bad[0]!r} is not an admin scope (one of "
                      f"{', '.join(sorted(ADMIN_SCOPES))})", "scopes")
    if not actor.operator and not actor.grant.covers(grant):
        raise Forbidden("permission: an admin key cannot grant more than it holds", "permission")
