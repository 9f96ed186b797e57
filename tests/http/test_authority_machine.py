"""Random sequences of admin actions against a running sidecar, checked after every step.

Two organizations, each with an owner, an admin and a member, every one of them holding
an admin key (permission all); a project with a service account, and project,
service-account and user keys. Hypothesis drives the real admin API over HTTP with
random principals (any org) on random targets (any org): create / rotate / disable /
enable / delete keys, role changes, and the cascades (remove a member, delete a project
or a service account). After every step:

- a refused request changed nothing, in either organization;
- no organization's resources change by another organization's key (and that key gets
  404 for them);
- no principal gains rank: a role only rises by an owner's change to someone else, and
  every admin key a principal obtains (made or rotated) is tied to its own membership;
- acting on another member's keys, role or membership succeeds only from a higher rank;
- each key is where the model of the successful steps says it is, and the data plane
  says so on the next call: a disabled or deleted key is refused (401), an active one
  passes (200; an admin key: 403 admin_key_not_allowed).

The organizations are set up by the operator in-process (the ControlStore the CLI runs);
the ground truth after each step is read from Redis the same way.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from admin_helpers import start_plane, stop_plane
from conftest import PEPPER
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from sidecar.control.store import ControlStore
from sidecar.schema.keys import KeyHasher

RANK = {"owner": 3, "admin": 2, "member": 1}
ROLES = list(RANK)
SETTINGS = settings(max_examples=8, stateful_step_count=14, deadline=None,
                    derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
_names = itertools.count()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import redis.asyncio as aredis

    plane = start_plane(tmp_path_factory.mktemp("authority-machine"))
    loop = asyncio.new_event_loop()
    client = aredis.Redis.from_url(plane.redis.url)
    store = ControlStore(client, KeyHasher(PEPPER))
    try:
        yield plane, store, loop.run_until_complete
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        stop_plane(plane)


async def make_org(store: ControlStore) -> dict:
    """As the operator: an org, its three members with admin keys, a project, a service
    account, and a project, a service-account and a user key for each member."""
    org = (await store.create_org(f"m{next(_names)}"))["id"]
    prj = (await store.create_project(org, "p"))["id"]
    sa = (await store.create_service_account(org, prj, "s"))["id"]
    out = {"org": org, "project": prj, "sa": sa, "members": {}, "keys": {},
           "principals": []}

    def keep(view, plaintext, kind):
        out["keys"][view["id"]] = {"plain": plaintext, "org": org, "admin": kind == "admin",
                                   "member": view["member_id"], "project": view["project_id"],
                                   "sa": view["service_account_id"], "state": "active",
                                   "final": False}

    for role in ROLES:
        member = await store.add_member(org, f"{role}@{org}", role)
        out["members"][member["id"]] = role
        view, plain = await store.create_key(org, {"type": "admin",
                                                   "member_id": member["id"]})
        keep(view, plain, "admin")
        out["principals"].append({"member": member["id"], "org": org, "key": plain})
        view, plain = await store.create_key(org, {"owner": "user", "member_id": member["id"],
                                                   "project_id": prj, "unlimited": True})
        keep(view, plain, "user")
    for body in ({"project_id": prj, "unlimited": True},
                 {"service_account_id": sa, "unlimited": True}):
        view, plain = await store.create_key(org, body)
        keep(view, plain, "org")
    return out


async def snapshot(store: ControlStore, org: str) -> dict:
    """An organization's state as it is in Redis (not what the API says)."""
    keys, cursor = {}, 0
    while True:
        page, cursor = await store.list_keys(org, limit=500, cursor=cursor)
        keys.update({v["id"]: (v["status"], v["disabled_reason"], v["rotated_to"],
                               v["member_id"], v["permission"]) for v in page})
        if not cursor:
            break
    return {"org": await store.org(org),
            "members": {m["id"]: m["role"] for m in await store.list_members(org)},
            "projects": sorted(p["id"] for p in await store.list_projects(org)),
            "sas": sorted(s["id"] for s in await store.list_service_accounts(org)),
            "keys": keys}


def test_random_admin_sequences_keep_the_authority_model(world):  # noqa: C901 — the rules of one state machine
    plane, store, run = world
    seen: dict[str, int] = {}           # what the runs exercised (the test is not vacuous)

    class Machine(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            self.orgs = [run(make_org(store)), run(make_org(store))]
            self.members = {m: {"org": o["org"], "role": r}
                            for o in self.orgs for m, r in o["members"].items()}
            self.keys = {k: v for o in self.orgs for k, v in o["keys"].items()}
            self.principals = [p for o in self.orgs for p in o["principals"]]
            self.projects = {o["project"]: o["org"] for o in self.orgs}
            self.sas = {o["sa"]: (o["org"], o["project"]) for o in self.orgs}
            self.steps = 0
            self.truth = None            # Redis after the last step: {org: snapshot}
            self.checked = {}            # key id -> the state the data plane last showed

        # -- the step frame: send, then compare the world before and after ------------

        def act(self, who: dict, method: str, path: str, body=None, target_org=None,
                role_change: tuple[str, str] | None = None):
            before = {o["org"]: run(snapshot(store, o["org"])) for o in self.orgs}
            reply = plane.admin(method, path, body, key=who["key"])
            after = {o["org"]: run(snapshot(store, o["org"])) for o in self.orgs}
            self.truth = after
            self.steps += 1
            outcome = "cross-org" if target_org not in (None, who["org"]) else (
                "ok" if reply.status < 400 else f"refused {reply.status}")
            parts = path.strip("/").split("/")
            name = " ".join([method, parts[0], *parts[2:3], outcome])  # "POST keys rotate ok"
            seen[name] = seen.get(name, 0) + 1
            for org in before:           # another org's key changes nothing of this org
                if org != who["org"]:
                    assert before[org] == after[org], (method, path, reply.status)
            if target_org is not None and target_org != who["org"]:
                assert reply.status in (401, 404), (method, path, reply.body)
            if reply.status >= 400:      # a refusal leaves nothing behind
                assert reply.status in (401, 403, 404, 409), (method, path, reply.body)
                assert before == after, (method, path, reply.body)
                return None
            org_before = before[who["org"]]["members"]
            for member, role in after[who["org"]]["members"].items():
                old = org_before.get(member)
                if old is not None and RANK[role] > RANK[old]:   # a rank rose: by whom?
                    assert role_change == (member, role), (member, old, role)
                    assert member != who["member"], "a principal raised its own role"
                    assert org_before.get(who["member"]) == "owner", \
                        f"{org_before.get(who['member'])} granted {role}"
            return reply.body

        def outranks(self, who: dict, member: str | None) -> None:
            """A successful act on another member's key or membership: the actor's member
            ranked strictly above that member (the model's roles, before the step)."""
            if member is None or member == who["member"] or member not in self.members:
                return
            mine = self.members[who["member"]]["role"]
            theirs = self.members[member]["role"]
            assert RANK[mine] > RANK[theirs], f"{mine} acted on {theirs} {member}"

        def actor(self, data) -> dict:
            return data.draw(st.sampled_from(self.principals), label="actor")

        def target(self, data, who: dict, things: dict, org_of, label: str):
            """Mostly one of the actor's own org, sometimes another org's. Drawn by
            position in creation order (ids are random; positions repeat per seed)."""
            own = data.draw(st.sampled_from([True, True, True, False]), label="own org")
            pool = [t for t in things if (org_of(things[t]) == who["org"]) == own]
            return data.draw(st.sampled_from(pool), label=label) if pool else None

        def held(self, who: dict, view: dict, plaintext: str) -> None:
            """A key the principal now holds: admin keys only ever of its own member."""
            if view["type"] == "admin":
                assert view["member_id"] == who["member"], "rank gained through a key"
                self.principals.append({"member": who["member"], "org": who["org"],
                                        "key": plaintext})
            self.keys[view["id"]] = {"plain": plaintext, "org": who["org"],
                                     "admin": view["type"] == "admin",
                                     "member": view["member_id"],
                                     "project": view["project_id"],
                                     "sa": view["service_account_id"], "state": "active",
                                     "final": False}

        def cascade(self, who: dict, match, body: dict) -> None:
            """The keys a successful cascade disabled: all it should, each one the actor
            may disable itself."""
            hit = {k for k, v in self.keys.items() if v["state"] == "active" or (
                v["state"] == "disabled" and not v["final"])}
            hit = {k for k in hit if match(self.keys[k])}
            for k in hit:
                self.outranks(who, self.keys[k]["member"])
            assert hit <= set(body["disabled_keys"]) | {
                k for k in hit if self.keys[k]["state"] != "active"}, body
            for k in hit:
                self.keys[k].update(state="disabled", final=True)

        # -- rules ----------------------------------------------------------------------

        @rule(data=st.data())
        def rotate_a_key_of_ones_own(self, data):
            """The rotations that can succeed (a key of the actor's own member) are rare
            at random: a second way in."""
            who = self.actor(data)
            mine = [k for k, v in self.keys.items()
                    if v["member"] == who["member"] and v["state"] == "active"]
            if mine:
                self.key_action_on(data, "rotate", who,
                                   data.draw(st.sampled_from(mine), label="key"))

        @rule(data=st.data(), op=st.sampled_from(["disable", "enable", "delete", "rotate"]))
        def key_action(self, data, op):
            who = self.actor(data)
            mine = [k for k, v in self.keys.items() if v["member"] == who["member"]]
            if mine and data.draw(st.booleans(), label="one of its own member's keys"):
                key_id = data.draw(st.sampled_from(mine), label="key")
            else:
                key_id = self.target(data, who, self.keys, lambda k: k["org"], "key")
            if key_id is not None:
                self.key_action_on(data, op, who, key_id)

        def key_action_on(self, data, op: str, who: dict, key_id: str) -> None:
            k = self.keys[key_id]
            method, path = ("DELETE", f"/keys/{key_id}") if op == "delete" else (
                "POST", f"/keys/{key_id}/{op}")
            body = self.act(who, method, path, target_org=k["org"])
            if body is None:
                return
            self.outranks(who, k["member"])
            if op == "delete":
                k["state"] = "deleted"
            elif op == "disable":
                k["state"] = "disabled"
            elif op == "enable":
                assert not k["final"], "a cascade-disabled key came back"
                k["state"] = "active"
            else:
                k["state"] = "disabled"          # grace 0: the old key ends now
                self.held(who, body, body["key"])

        @rule(data=st.data(), role=st.sampled_from(ROLES))
        def change_role(self, data, role):
            self.role_change(data, role, self.actor(data))

        @rule(data=st.data(), role=st.sampled_from(ROLES))
        def change_role_by_a_live_owner_or_admin(self, data, role):
            """Role changes that can succeed are rare at random: give them a second way
            in, by a principal whose member is still there with rank."""
            live = [p for p in self.principals if self.members.get(p["member"], {}).get(
                "role") in ("owner", "admin")]
            if live:
                self.role_change(data, role, data.draw(st.sampled_from(live), label="actor"))

        def role_change(self, data, role, who):
            member = self.target(data, who, self.members, lambda m: m["org"], "member")
            if member is None:
                return
            body = self.act(who, "PATCH", f"/members/{member}", {"role": role},
                            target_org=self.members[member]["org"],
                            role_change=(member, role))
            if body is not None:
                self.outranks(who, member)
                self.members[member]["role"] = role

        @rule(data=st.data())
        def remove_member(self, data):
            who = self.actor(data)
            member = self.target(data, who, self.members, lambda m: m["org"], "member")
            if member is None:
                return
            body = self.act(who, "DELETE", f"/members/{member}",
                            target_org=self.members[member]["org"])
            if body is not None:
                self.outranks(who, member)
                del self.members[member]
                self.cascade(who, lambda k: k["member"] == member, body)

        @rule(data=st.data())
        def delete_project(self, data):
            who = self.actor(data)
            prj = self.target(data, who, self.projects, lambda o: o, "project")
            if prj is None:
                return
            body = self.act(who, "DELETE", f"/projects/{prj}", target_org=self.projects[prj])
            if body is not None:
                del self.projects[prj]
                self.cascade(who, lambda k: k["project"] == prj, body)
                for sa in [s for s, (_, p) in self.sas.items() if p == prj]:
                    del self.sas[sa]

        @rule(data=st.data())
        def delete_service_account(self, data):
            who = self.actor(data)
            sa = self.target(data, who, self.sas, lambda v: v[0], "service account")
            if sa is None:
                return
            body = self.act(who, "DELETE", f"/service_accounts/{sa}",
                            target_org=self.sas[sa][0])
            if body is not None:
                del self.sas[sa]
                self.cascade(who, lambda k: k["sa"] == sa, body)

        @rule(data=st.data(), kind=st.sampled_from(["admin", "user", "project"]))
        def create_key(self, data, kind):
            who = self.actor(data)
            request = {"admin": {"type": "admin"},
                       "user": {"owner": "user", "unlimited": True}}.get(kind)
            target = who["org"]
            if request is None:
                prj = self.target(data, who, self.projects, lambda o: o, "project")
                if prj is None:
                    return
                request, target = {"project_id": prj, "unlimited": True}, self.projects[prj]
            body = self.act(who, "POST", "/keys", request, target_org=target)
            if body is not None:
                self.held(who, body, body["key"])

        # -- after every step -------------------------------------------------------------

        @invariant()
        def keys_are_where_the_model_says_and_the_data_plane_agrees(self):
            """Every key's state in Redis is the model's; each key whose state changed
            (or that is new) is asked of the data plane on its very next call."""
            if getattr(self, "truth", None) is None:
                return
            truth = {k: v for snap in self.truth.values() for k, v in snap["keys"].items()}
            for key_id, k in self.keys.items():
                shown = truth.get(key_id)
                if k["state"] == "deleted":
                    assert shown is None, key_id
                else:
                    assert shown is not None and shown[0] == k["state"], (key_id, k, shown)
                if self.checked.get(key_id) == k["state"]:
                    continue
                answer = plane.authz(k["plain"])
                if k["state"] == "active":
                    expected = (403, "admin_key_not_allowed") if k["admin"] else (200, None)
                else:
                    expected = (401, "invalid_api_key" if k["state"] == "deleted"
                                else "key_disabled")
                assert (answer.status, answer.code) == expected, (key_id, k, answer.body)
                self.checked[key_id] = k["state"]

        @invariant()
        def roles_are_the_models(self):
            if getattr(self, "truth", None) is None:
                return
            for org, snap in self.truth.items():
                assert snap["members"] == {m: v["role"] for m, v in self.members.items()
                                           if v["org"] == org}

    run_state_machine_as_test(Machine, settings=SETTINGS)
    print(sorted(seen.items()))
    for outcome in ("ok", "cross-org", "refused 403"):
        assert any(name.endswith(outcome) for name in seen), (outcome, seen)
    for done in ("PATCH members ok", "POST keys ok", "POST keys rotate ok"):
        assert seen.get(done), (done, seen)
    assert any(seen.get(f"DELETE {what} ok") for what in (
        "members", "projects", "service_accounts")), ("no cascade", seen)
