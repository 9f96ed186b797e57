"""Every Redis key name the sidecar uses, in one place.

Hash tags: everything an authorize or settle script touches carries the key's shard tag
`{abc}` (the first hex digits of the key hash), so record, counters and the owner's
wallet share one Redis Cluster slot and each script call stays single-slot. Control-plane
indexes are separate keys touched only outside the scripts.
"""

from __future__ import annotations

from .keys import SHARD_HEX, shard_of


def record(key_hash: str) -> str:
    """Hash: the key's record, counters and recent activity (fields: see record.py)."""
    return f"k:{{{shard_of(key_hash)}}}:{key_hash}"


def wallet(shard: str) -> str:
    """Hash: PAYG balances, field = account id, for the accounts whose tag is `shard`;
    and quota pools shared by a rotated key and its successor, field = pool_field(id)."""
    return f"w:{{{shard}}}"


def org_account(org_id: str, account: str) -> str:
    """Wallet field of an organization's billing account: each organization has its own
    name space, so org B's "acme" is not org A's. Standalone account names (the CLI's
    `accounts`, keys outside any organization) cannot contain ':', so never collide."""
    return f"{org_id}:{account}"


POOL_PREFIX = "q:"   # authorize.lua and settle.lua get it in ARGV: the one spelling


def pool_field(pool_id: str) -> str:
    """Wallet field of a shared quota pool. Account ids cannot contain ':' (keystore)."""
    return POOL_PREFIX + pool_id


def budgets(shard: str) -> str:
    """Hash: the budget and concurrency state (limits.lua) of the levels above the keys
    whose tag is `shard` (keys of an organization are minted on its tag, so its projects,
    members and itself share one slot with them); field = level_field(...)."""
    return f"b:{{{shard}}}"


LEVEL_PREFIX = {"project": "p:", "organization": "o:", "member": "m:"}
LEVEL_OF_PREFIX = {v: k for k, v in LEVEL_PREFIX.items()}


def level_field(level: str, entity_id: str) -> str:
    """Field of the budgets hash for a project, organization or member."""
    return LEVEL_PREFIX[level] + entity_id


def level_of(where: str) -> str:
    """The level a script names ('k' or a budgets field): key, project, organization,
    member."""
    return "key" if where == "k" else LEVEL_OF_PREFIX.get(where[:2], "key")


def reservation(key_hash: str, reservation_id: str) -> str:
    """String: what one allowed call reserved, '<units> <source>' (authorize.lua writes
    it, with a TTL of reservation_ttl_s; more when it holds money or a concurrency slot:
    limits.lua), until settle.lua replaces it by 's' (settled).

    The name carries 16 hex digits of the key hash, so a key's report finds only its own
    reservations; the id is a keys.RESERVATION_ID (random, no ':' or braces).
    """
    return f"r:{{{shard_of(key_hash)}}}:{key_hash[:16]}:{reservation_id}"


KEY_INDEX = "idx:keys"          # hash: key id -> key hash (admin lookups, listing)
OWNER_INDEX = "idx:owner:"      # prefix; use owner_index(owner)


def owner_index(owner: str) -> str:
    """Set per owner (member, service account, project): its key ids."""
    return OWNER_INDEX + owner



# Control plane (organizations and what they hold). Everything of one organization shares
# the hash tag `{<org id>}`, so an entity and the org's indexes change together in one
# MULTI/EXEC (or one script) even on Redis Cluster. Ids are generated ([a-z0-9_]) or the
# built-in `default`, so they never contain a brace.
ORG_INDEX = "idx:orgs"          # hash: org id -> name (listing)
ORG_NAMES = "idx:org-names"     # hash: org name -> org id (names are unique)


def org(org_id: str) -> str:
    """Hash: the organization (id, nm name, ca created ms, cb created by)."""
    return f"o:{{{org_id}}}"


def org_members(org_id: str) -> str:
    """Set: member ids of the organization."""
    return f"o:{{{org_id}}}:members"


def org_users(org_id: str) -> str:
    """Hash: user (e-mail or login) -> member id; one membership per user and org."""
    return f"o:{{{org_id}}}:users"


def member(org_id: str, member_id: str) -> str:
    """Hash: a membership (id, org, user, nm, role, ca, cb)."""
    return f"o:{{{org_id}}}:mem:{member_id}"


def org_projects(org_id: str) -> str:
    """Set: project ids of the organization."""
    return f"o:{{{org_id}}}:projects"


def project(org_id: str, project_id: str) -> str:
    """Hash: a project (id, org, nm, ca, cb)."""
    return f"o:{{{org_id}}}:prj:{project_id}"


def org_service_accounts(org_id: str) -> str:
    """Set: service account ids of the organization (each names its project)."""
    return f"o:{{{org_id}}}:sas"


def service_account(org_id: str, sa_id: str) -> str:
    """Hash: a service account (id, org, prj, nm, ca, cb)."""
    return f"o:{{{org_id}}}:sa:{sa_id}"


def org_subscriptions(org_id: str) -> str:
    """Hash: account -> subscription id (one subscription per account and org)."""
    return f"o:{{{org_id}}}:subs"


def subscription(org_id: str, sub_id: str) -> str:
    """Hash: a subscription plan (id, org, acct, plan, key = its sk-sub- key id, ca, cb)."""
    return f"o:{{{org_id}}}:sub:{sub_id}"


def audit(org_id: str) -> str:
    """Stream: the organization's audit log (XADD MAXLEN ~, read with XREVRANGE)."""
    return f"o:{{{org_id}}}:audit"


def idempotency(org_id: str, digest: str) -> str:
    """String: a rotation request's result by the sha256 of its Idempotency-Key (1 day)."""
    return f"o:{{{org_id}}}:idem:{digest}"


def org_webhooks(org_id: str) -> str:
    """Hash: the organization's webhook endpoints, endpoint id -> JSON (url, secret,
    events, ca, cb); control/webhooks.py writes it, the delivery worker reads it."""
    return f"o:{{{org_id}}}:webhooks"


# Events (issue 12): what webhooks deliver. One stream per shard tag, `ev:{<tag>}`, so a
# script that notices a threshold crossing XADDs into a stream of its own key's slot
# (single-slot on Redis Cluster, no extra round trip); the control plane writes to the
# stream of the key's tag too, so one key's events are in one stream, in order.
# Entries are flat fields (schema/events.py); the worker reads them with the consumer
# group EVENT_GROUP, XACKs and XDELs each once delivered or dead-lettered, so a stream
# holds only what is not done yet.
#
# Finding the non-empty streams without scanning the keyspace: EVENTS_ACTIVE is a sorted
# set, member = tag, score = a counter every writer outside the scripts bumps (ZINCRBY 1)
# after its XADD. The worker drops a tag once its stream is empty, only if the score is
# still the one it read (a write in between keeps it). A script on Redis Cluster cannot
# touch EVENTS_ACTIVE (another slot), so the worker also sweeps every tag's stream
# (EXISTS over ALL_TAGS, pipelined, one sweeper per deployment at a time through the
# EVENTS_SWEEP lock) and adds what it finds. On one Redis (no Cluster) a script may
# ZINCRBY EVENTS_ACTIVE itself, passed as one more KEY, and its events go out at once.
EVENT_GROUP = "webhooks"        # consumer group on every ev:{tag}
EVENTS_ACTIVE = "ev:active"     # sorted set: tags whose stream may hold entries
EVENTS_SWEEP = "ev:sweep"       # string: held (SET NX PX) by the worker sweeping now
DEAD_LETTERS = "ev:dead"        # stream: deliveries that failed for the whole retry window
ALL_TAGS = tuple(f"{i:0{SHARD_HEX}x}" for i in range(16 ** SHARD_HEX))


def events(tag: str) -> str:
    """Stream: the undelivered events of shard tag `tag` (fields: schema/events.py)."""
    return f"ev:{{{tag}}}"


# Usage history (issue 12): per shard tag, one hash per day and one per hour, written by
# authorize.lua (requests) and settle.lua (tokens, money) of the keys of that tag. Field
# '<who>:<n|t|m>', who = the key id or a level field of the record's lv (level_field:
# 'p:<project>', 'o:<org>', 'm:<member>'), so an organization's keys (minted on its tag)
# add up per project and organization in one slot. Day = the budget day number
# (limits.Calendar, budget_timezone); hour = hours since the epoch (UTC).
USAGE_KINDS = {"n": "requests", "t": "tokens", "m": "spend"}


def usage_day(tag: str, day: int) -> str:
    """Hash: one day's usage of the keys of tag `tag` (kept usage_retention_days)."""
    return f"u:{{{tag}}}:d:{day}"


def usage_hour(tag: str, hour: int) -> str:
    """Hash: one hour's usage of the keys of tag `tag` (kept 49 hours)."""
    return f"u:{{{tag}}}:h:{hour}"


def usage_field(who: str, kind: str) -> str:
    """Field of a usage bucket: who (key id or level field) and kind (USAGE_KINDS)."""
    return f"{who}:{kind}"


# Threshold census (issue 12): how many keys are at or below each default alert
# threshold, for the metrics (runtime/census.py; the counting: schema/remaining.py). One
# sidecar of the deployment at a time takes it, holding THRESHOLD_CENSUS_LOCK (SET NX PX
# threshold_census_interval_s: so one census per interval), reads the keys through
# KEY_INDEX (one hash: no keyspace SCAN, on Redis Cluster no per-node SCAN) and writes
# the result whole to THRESHOLD_CENSUS, which every sidecar reads for its /metrics.
THRESHOLD_CENSUS = "census:thresholds"        # hash: remaining.Census.to_hash()
THRESHOLD_CENSUS_LOCK = "census:thresholds:lock"   # string: the census taker's id
