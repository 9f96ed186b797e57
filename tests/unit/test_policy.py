"""The authority model as a table: principal x action x resource -> allow / deny (pure).

Rows are written from the rules (README "Who may do what"), not read off the code; then
hypothesis checks the properties that must hold for every combination.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.control.errors import Forbidden, NotFound
from sidecar.control.policy import (
    ACTIONS,
    ADMIN_SCOPES,
    CLI,
    RANK,
    ROLES,
    Actor,
    Grant,
    Resource,
    check,
    decide,
    gate,
)

ORG, OTHER = "org_a", "org_b"
ALL = Grant("all")


def who(role: str | None, member: str | None = None, grant: Grant = ALL,
        org: str = ORG) -> Actor:
    return Actor("admin_key", "key_1", org=org, member=member or f"mem_{role}", role=role,
                 grant=grant)


OWNER, ADMIN, MEMBER = who("owner"), who("admin"), who("member")


def key(kind: str = "org", member: str | None = None, role: str | None = None,
        grant: Grant | None = None, org: str = ORG) -> Resource:
    return Resource("key", org, id="key_t", member=member, member_role=role,
                    key_type=kind, grant=grant)


def user_key(role: str, member: str | None = None) -> Resource:
    return key("org", member or f"mem_other_{role}", role)


def admin_key(role: str, member: str | None = None, grant: Grant = ALL) -> Resource:
    return key("admin", member or f"mem_other_{role}", role, grant)


def member(role: str, member_id: str | None = None, to: str | None = None,
           touches: tuple = ()) -> Resource:
    mid = member_id or f"mem_other_{role}"
    return Resource("member", ORG, id=mid, member=mid, member_role=role, role=to,
                    touches=touches)


PROJECT_KEY = key("org")

# (principal, action, resource, allowed, param of the refusal)
TABLE = [
    # Role escalation: an admin cannot act on an owner's admin keys, nor rotate them
    # (the successor would be tied to the owner's membership).
    (ADMIN, "key.enable", admin_key("owner"), False, "key_id"),
    (ADMIN, "key.disable", admin_key("owner"), False, "key_id"),
    (ADMIN, "key.delete", admin_key("owner"), False, "key_id"),
    (ADMIN, "key.rotate", admin_key("owner"), False, "key_id"),
    (ADMIN, "key.update", admin_key("owner"), False, "key_id"),
    (ADMIN, "key.disable", admin_key("admin"), False, "key_id"),       # equal rank
    (OWNER, "key.disable", admin_key("owner"), False, "key_id"),       # equal rank
    (OWNER, "key.disable", admin_key("admin"), True, None),
    (ADMIN, "key.disable", admin_key("member"), True, None),
    (OWNER, "key.rotate", admin_key("admin"), False, "key_id"),        # tied to its maker
    (ADMIN, "key.rotate", admin_key("admin", "mem_admin"), True, None),  # its own
    (MEMBER, "key.rotate", admin_key("member", "mem_member"), False, "key_id"),
    (MEMBER, "key.disable", admin_key("member", "mem_member"), True, None),  # give up own
    (MEMBER, "key.delete", admin_key("member", "mem_member"), True, None),
    (MEMBER, "key.enable", admin_key("member", "mem_member"), False, "key_id"),
    # Admin keys: made by owners and admins, tied to the maker, within the maker's grant.
    (OWNER, "key.create", admin_key("owner", "mem_owner"), True, None),
    (ADMIN, "key.create", admin_key("admin", "mem_admin"), True, None),
    (MEMBER, "key.create", admin_key("member", "mem_member"), False, "type"),
    (OWNER, "key.create", admin_key("admin"), False, "member_id"),
    (who("owner", grant=Grant("restricted", frozenset({"keys:write"}))), "key.create",
     admin_key("owner", "mem_owner"), False, "permission"),
    (who("owner", grant=Grant("restricted", frozenset({"keys:write"}))), "key.create",
     admin_key("owner", "mem_owner", Grant("restricted", frozenset({"keys:read"}))),
     True, None),
    (who("owner", grant=Grant("restricted", frozenset({"keys:write"}))), "key.update",
     admin_key("admin", grant=ALL), False, "permission"),
    # User keys: made and rotated only by their member; others act by rank.
    (MEMBER, "key.create", user_key("member", "mem_member"), True, None),
    (OWNER, "key.create", user_key("member"), False, "member_id"),
    (OWNER, "key.rotate", user_key("member"), False, "key_id"),
    (MEMBER, "key.rotate", user_key("member", "mem_member"), True, None),
    (MEMBER, "key.quota", user_key("member", "mem_member"), True, None),
    (OWNER, "key.disable", user_key("member"), True, None),
    (ADMIN, "key.disable", user_key("member"), True, None),
    (ADMIN, "key.disable", user_key("owner"), False, "key_id"),
    (ADMIN, "key.quota", user_key("admin"), False, "key_id"),
    (MEMBER, "key.disable", user_key("member"), False, "key_id"),
    (ADMIN, "key.disable", key("org", "mem_gone", None), True, None),   # member removed
    # Project, service-account and standard keys of the organization: owners and admins.
    (MEMBER, "key.create", PROJECT_KEY, False, "owner"),
    (MEMBER, "key.create", key("standard"), False, "owner"),
    (ADMIN, "key.create", PROJECT_KEY, True, None),
    (MEMBER, "key.disable", PROJECT_KEY, False, "key_id"),
    (MEMBER, "key.enable", key("subscription"), False, "key_id"),
    (ADMIN, "key.rotate", PROJECT_KEY, True, None),
    # Members act above their role: cascades and the organization itself.
    (MEMBER, "organization.update", Resource("organization", ORG, id=ORG), False, None),
    (ADMIN, "organization.update", Resource("organization", ORG, id=ORG), True, None),
    (MEMBER, "project.delete", Resource("project", ORG, id="prj_1"), False, "project_id"),
    (MEMBER, "service_account.delete", Resource("service_account", ORG, id="sa_1"), False,
     "service_account_id"),
    (MEMBER, "project.create", Resource("project", ORG), False, None),
    (MEMBER, "subscription.create", Resource("subscription", ORG), False, None),
    (ADMIN, "project.delete", Resource("project", ORG, id="prj_1", touches=(
        PROJECT_KEY, user_key("member"))), True, None),
    (ADMIN, "project.delete", Resource("project", ORG, id="prj_1", touches=(
        PROJECT_KEY, user_key("owner"))), False, "project_id"),
    (ADMIN, "service_account.delete", Resource("service_account", ORG, id="sa_1", touches=(
        PROJECT_KEY,)), True, None),
    # Members and roles.
    (ADMIN, "member.add", Resource("member", ORG, role="member"), True, None),
    (ADMIN, "member.add", Resource("member", ORG, role="admin"), False, "role"),
    (ADMIN, "member.add", Resource("member", ORG, role="owner"), False, "role"),
    (OWNER, "member.add", Resource("member", ORG, role="owner"), True, None),
    (MEMBER, "member.add", Resource("member", ORG, role="member"), False, "user"),
    (ADMIN, "member.update", member("admin", "mem_admin", to="owner"), False, "role"),
    (MEMBER, "member.update", member("member", "mem_member", to="admin"), False, "role"),
    (MEMBER, "member.update", member("member", "mem_member"), True, None),     # rename self
    (OWNER, "member.update", member("owner", "mem_owner", to="member"), True, None),
    (ADMIN, "member.update", member("owner", to="member"), False, "role"),
    (ADMIN, "member.update", member("admin", to="member"), False, "role"),
    (ADMIN, "member.update", member("member", to="admin"), False, "role"),
    (ADMIN, "member.update", member("member"), True, None),
    (OWNER, "member.update", member("member", to="owner"), True, None),
    (OWNER, "member.update", member("owner", to="member"), False, "role"),
    (ADMIN, "member.remove", member("owner"), False, "member_id"),
    (ADMIN, "member.remove", member("admin"), False, "member_id"),
    (ADMIN, "member.remove", member("member", touches=(user_key("member"),)), True, None),
    (OWNER, "member.remove", member("admin", touches=(admin_key("admin"),)), True, None),
    (MEMBER, "member.remove", member("member", "mem_member"), True, None),      # leave
    # Permission modes on top of roles.
    (who("owner", grant=Grant("read-only")), "key.disable", PROJECT_KEY, False, "scope"),
    (who("owner", grant=Grant("read-only")), "key.read", PROJECT_KEY, True, None),
    (who("owner", grant=Grant("restricted", frozenset({"keys:write"}))), "project.delete",
     Resource("project", ORG, id="prj_1"), False, "scope"),
    (MEMBER, "audit.read", Resource("audit", ORG), True, None),
    # A key tied to no member (made before memberships were required) only reads.
    (who(None), "project.create", Resource("project", ORG), False, "key"),
    (who(None), "project.read", Resource("project", ORG), True, None),
]


@pytest.mark.parametrize("actor,action,resource,allowed,param", TABLE,
                         ids=[f"{a.role}-{act}-{r.kind}{i}" for i, (a, act, r, *_) in
                              enumerate(TABLE)])
def test_policy_table(actor, action, resource, allowed, param):
    answer = decide(actor, action, resource)
    assert answer.allowed is allowed, answer.reason
    if not allowed:
        assert answer.reason and answer.status == 403
        assert answer.param == param, answer.reason
        with pytest.raises(Forbidden):
            check(actor, action, resource)


def test_every_action_has_a_scope():
    assert set(ACTIONS.values()) <= ADMIN_SCOPES
    assert {a.split(".")[0] for a in ACTIONS} == {
        "organization", "member", "project", "service_account", "key", "subscription",
        "audit", "webhook"}


def test_gate_is_the_permission_mode_alone():
    read_only = who("owner", grant=Grant("read-only"))
    assert gate(read_only, "key.read") and not gate(read_only, "key.create")
    writer = who("member", grant=Grant("restricted", frozenset({"projects:write"})))
    assert gate(writer, "project.delete") and gate(writer, "project.read")
    assert not gate(writer, "key.read")


# -- properties over every combination ---------------------------------------------------

roles = st.sampled_from(ROLES)
opt_roles = st.one_of(st.none(), roles)
actions = st.sampled_from(sorted(ACTIONS))
grants = st.one_of(st.just(ALL), st.just(Grant("read-only")),
                   st.frozensets(st.sampled_from(sorted(ADMIN_SCOPES)), min_size=1)
                   .map(lambda s: Grant("restricted", s)))
kinds = st.sampled_from(["organization", "member", "project", "service_account", "key",
                         "subscription", "audit"])
key_types = st.sampled_from(["standard", "subscription", "org", "admin"])
members = st.sampled_from(["mem_a", "mem_b", "mem_c", None])


@st.composite
def resources(draw, org=ORG):
    kind = draw(kinds)
    mem = draw(members)
    touches = ()
    if kind in ("project", "service_account", "member"):
        touches = tuple(draw(st.lists(st.builds(
            lambda t, m, r: Resource("key", org, id="key_c", member=m, member_role=r,
                                     key_type=t), key_types, members, opt_roles),
            max_size=3)))
    return Resource(kind, org, id="x_1", member=mem, member_role=draw(opt_roles),
                    key_type=draw(key_types) if kind == "key" else None,
                    grant=draw(st.one_of(st.none(), grants)), role=draw(opt_roles),
                    touches=touches)


actors = st.builds(lambda r, m, g: Actor("admin_key", "key_1", ORG, m, r, g),
                   opt_roles, members, grants)


@given(actors, actions, resources(org=OTHER))
def test_another_organization_is_not_found(actor, action, resource):
    answer = decide(actor, action, resource)
    assert (answer.allowed, answer.status) == (False, 404)
    assert OTHER not in answer.reason
    with pytest.raises(NotFound):
        check(actor, action, resource)


@given(actors, actions, resources())
def test_the_permission_mode_applies_on_top(actor, action, resource):
    if decide(actor, action, resource):
        assert actor.grant.allows(ACTIONS[action])


@given(actors, resources())
def test_nobody_raises_their_own_role(actor, resource):
    own = Resource("member", ORG, id=actor.member, member=actor.member,
                   member_role=actor.role, role=resource.role)
    if decide(actor, "member.update", own) and own.role is not None:
        assert RANK[own.role] <= actor.rank


@given(actors, st.sampled_from(["member.add", "member.update"]), resources())
def test_only_owners_grant_owner_or_admin(actor, action, resource):
    if resource.role in ("owner", "admin") and decide(actor, action, resource) \
            and resource.member != actor.member:
        assert actor.role == "owner"


@given(actors, actions, resources())
def test_no_action_on_equal_or_higher_rank_but_ones_own(actor, action, resource):
    if action.endswith(".read") or action == "member.add" or resource.member is None:
        return
    if resource.kind not in ("key", "member") or resource.member == actor.member:
        return
    # Only actions on that kind act on someone's key or membership (organization.update
    # paired with a key resource is no call any route makes).
    if action.partition(".")[0] != resource.kind:
        return
    if resource.member_role is not None and decide(actor, action, resource):
        assert RANK[resource.member_role] < actor.rank


@given(actors, st.sampled_from(["project.delete", "service_account.delete",
                                "member.remove"]), resources())
def test_a_cascade_needs_the_authority_over_every_key(actor, action, resource):
    if decide(actor, action, resource):
        for k in resource.touches:
            assert decide(actor, "key.disable", k)


@given(actors, resources())
def test_rotating_needs_the_authority_to_create(actor, resource):
    k = Resource("key", ORG, id="key_r", member=resource.member,
                 member_role=resource.member_role, key_type=resource.key_type or "org",
                 grant=resource.grant)
    if decide(actor, "key.rotate", k):
        assert decide(actor, "key.create", k)


@given(actors, actions, resources())
def test_members_never_manage_the_organization(actor, action, resource):
    """A member-role key acts only on itself: its own keys and membership, reads."""
    if actor.role != "member" or action.endswith(".read"):
        return
    if decide(actor, action, resource):
        assert resource.member == actor.member and resource.member is not None


@given(actions, resources(org=OTHER))
def test_the_operator_is_root(action, resource):
    assert decide(CLI, action, resource)
