"""Key records on the control plane: create, read, change, delete (redis-py, not hot).

The record's fields and their short names: sidecar/schema/record.py.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..redis.runner import run_script
from ..schema import names
from ..schema.contracts import PoolQuotaArgs
from ..schema.ips import network_entry
from ..schema.keys import TYPE_CODE, TYPE_OF_CODE, KeyHasher, KeyType, mint, new_id, shard_of
from ..schema.record import (
    CASCADE_REASONS,
    DAY_MS,
    MAX_QUOTA,
    PERMISSIONS,
    RESTRICTED,
    ROTATION_COPIED,
    _iso,
    now_ms,
    permission_of,
)
from ..schema.scripts import POOL_QUOTA
from .events import key_disabled

# Editable settings: KeyStore.edit argument -> the record fields it rewrites.
EDITABLE = {"name": ("nm",), "permission": ("pm", "sc"), "scopes": ("sc",), "models": ("m",),
            "ips": ("ips",), "rpm": ("rpm",), "tpm": ("tpm",), "expires_at": ("ex",)}


class KeyError_(LookupError):
    """Unknown key id (named apart from the builtin KeyError)."""


class InvalidKeySpec(ValueError):
    """A key setting is wrong. `field` names it (KeySpec's name, or the CLI option's);
    the message reads "field: detail"."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


class KeyConflict(InvalidKeySpec):
    """The change contradicts the key's state (e.g. enabling a key whose owner is gone)."""


@dataclass
class KeySpec:
    type: KeyType = KeyType.standard
    name: str = ""
    quota: int | None = None          # None with unlimited=False: 0 units
    unlimited: bool = False
    models: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    expires_at: datetime | None = None
    rpm: int = 0
    tpm: int = 0
    permission: str = "all"
    scopes: list[str] = field(default_factory=list)
    account: str | None = None        # owner of the PAYG wallet (standard/subscription)
    cycle_days: int = 30              # subscription billing cycle
    payg_fallback: bool = False
    org: str = ""
    project: str = ""
    member: str = ""
    service_account: str = ""
    subscription: str = ""            # the plan an sk-sub- key belongs to
    created_by: str = "cli"


def validate_spec(  # noqa: C901 — a flat list, one check per field of the spec
        spec: KeySpec, now: datetime | None = None) -> dict[str, str]:
    """The record fields for a spec, or InvalidKeySpec naming the bad field. Pure."""
    now = now or datetime.now(UTC)
    if spec.quota is not None and not 0 <= spec.quota <= MAX_QUOTA:
        raise InvalidKeySpec("quota", f"must be between 0 and {MAX_QUOTA}")
    if spec.quota is not None and spec.unlimited:
        raise InvalidKeySpec("quota", "give --quota or --unlimited, not both")
    for name, value in (("rpm", spec.rpm), ("tpm", spec.tpm)):
        if not 0 <= value <= MAX_QUOTA:
            raise InvalidKeySpec(name, "must be a non-negative integer")
    if spec.expires_at is not None:
        if spec.expires_at.tzinfo is None:
            spec.expires_at = spec.expires_at.replace(tzinfo=UTC)
        if spec.expires_at <= now:
            raise InvalidKeySpec("expires", f"{spec.expires_at.isoformat()} is in the past")
    if spec.permission not in PERMISSIONS:
        raise InvalidKeySpec("permission", "one of all, restricted, read-only")
    if spec.permission == RESTRICTED and not spec.scopes:
        raise InvalidKeySpec("scopes", "a restricted key needs at least one scope")
    for model in spec.models:
        if not model or "," in model or len(model) > 256:
            raise InvalidKeySpec("models", f"{model!r} is not a model name")
    for scope in spec.scopes:
        if not scope or "," in scope or ":" not in scope:
            raise InvalidKeySpec("scopes", f"{scope!r} is not resource:read|write")
    nets = []
    for ip in spec.ips:
        try:
            nets.append(network_entry(ip))
        except ValueError:
            raise InvalidKeySpec("ips", f"{ip!r} is not an IP address or CIDR") from None
    if spec.account is not None:
        check_account(spec.account)
    if not 1 <= spec.cycle_days <= 3660:
        raise InvalidKeySpec("cycle_days", "must be between 1 and 3660")
    if len(spec.name) > 200:
        raise InvalidKeySpec("name", "at most 200 characters")

    quota = spec.quota or 0
    rec: dict[str, str] = {
        "t": TYPE_CODE[spec.type], "st": "a", "nm": spec.name,
        "ca": str(_ms(now)), "cb": spec.created_by,
        "ex": str(_ms(spec.expires_at)) if spec.expires_at else "0",
        "ul": "1" if spec.unlimited else "0", "qr": str(quota), "qu": "0",
        "pm": PERMISSIONS[spec.permission],
    }
    if spec.type is KeyType.subscription:
        rec.update(cq=str(quota), cu="0", cp=str(spec.cycle_days * DAY_MS),
                   ce=str(_ms(now) + spec.cycle_days * DAY_MS),
                   pg="1" if spec.payg_fallback else "0")
    optional = {"ips": ",".join(nets), "m": _set(spec.models), "sc": _set(spec.scopes),
                "rpm": str(spec.rpm or ""), "tpm": str(spec.tpm or ""),
                "ow": wallet_field(spec.org, spec.account), "org": spec.org, "prj": spec.project,
                "mem": spec.member, "sa": spec.service_account, "sub": spec.subscription}
    rec.update({k: v for k, v in optional.items() if v})
    return rec


_ACCOUNT = re.compile(r"[A-Za-z0-9_.@+-]{1,128}")


def check_account(account: str) -> None:
    """Account names are wallet fields; no ':' so they never collide with a quota pool
    or with another organization's accounts (names.org_account)."""
    if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
        raise InvalidKeySpec("account", f"{account!r} is not 1-128 of [A-Za-z0-9_.@+-]")


def wallet_field(org: str | None, account: str | None) -> str:
    """Where an account's balance lives: an organization's accounts are its own."""
    if not account:
        return ""
    check_account(account)
    return names.org_account(org, account) if org else account


def _account_name(rec: dict[str, str]) -> str | None:
    """The account as its organization calls it (the wallet field without the org)."""
    field_, org = rec.get("ow") or "", rec.get("org") or ""
    if org and field_.startswith(org + ":"):
        return field_[len(org) + 1:]
    return field_ or None


def view(rec: dict[str, str], now_ms: int | None = None) -> dict:
    """What an operator sees of a record: never the key or its hash."""
    now_ms = now_ms or _ms(datetime.now(UTC))
    typ = TYPE_OF_CODE.get(rec.get("t", "s"), KeyType.standard)
    out = {
        "id": rec["id"],
        "type": typ.value,
        "name": rec.get("nm", ""),
        "status": "active" if rec.get("st") == "a" else "disabled",
        "disabled_reason": rec.get("dr") or None,
        "unlimited": rec.get("ul") == "1",
        "quota_remaining": None if rec.get("ul") == "1" else int(rec.get("qr", 0)),
        "quota_used": int(rec.get("qu", 0)),
        "expires_at": _iso(rec.get("ex")),
        "expired": 0 < int(rec.get("ex") or 0) <= now_ms,
        "models": _list(rec.get("m")),
        "allowed_ips": [_cidr(n) for n in rec["ips"].split(",")] if rec.get("ips") else [],
        "permission": permission_of(rec),
        "scopes": _list(rec.get("sc")),
        "rpm": int(rec.get("rpm") or 0),
        "tpm": int(rec.get("tpm") or 0),
        "account": _account_name(rec),
        "org_id": rec.get("org") or None,
        "project_id": rec.get("prj") or None,
        "member_id": rec.get("mem") or None,
        "service_account_id": rec.get("sa") or None,
        "owner": _owner_kind(rec),
        "subscription_id": rec.get("sub") or None,
        "rotated_to": rec.get("rt") or None,
        "rotated_from": rec.get("rf") or None,
        "created_at": _iso(rec.get("ca")),
        "created_by": rec.get("cb") or None,
        "last_used_at": _iso(rec.get("la")),
        "last_ip": rec.get("lip") or None,
        "last_model": rec.get("lm") or None,
        "request_count": int(rec.get("n", 0)),
    }
    if typ is KeyType.subscription:
        cq, cu, ce, cp = (int(rec.get(f) or 0) for f in ("cq", "cu", "ce", "cp"))
        if cp and now_ms >= ce:  # the script renews lazily; show what the next call sees
            ce, cu = ce + ((now_ms - ce) // cp + 1) * cp, 0
        out["subscription"] = {"cycle_quota": cq, "cycle_used": cu,
                               "cycle_remaining": max(cq - cu, 0), "renews_at": _iso(ce),
                               "cycle_days": cp // DAY_MS, "payg_fallback": rec.get("pg") == "1",
                               "payg_used": int(rec.get("pu") or 0)}
        out["quota_remaining"] = None if out["unlimited"] else max(cq - cu, 0)
        out["quota_used"] = int(rec.get("qu", 0))
    return out


class KeyStore:
    """Key CRUD over a redis-py asyncio client (standalone, Sentinel master or Cluster)."""

    def __init__(self, redis, hasher: KeyHasher):
        self.redis = redis
        self.hasher = hasher

    async def create(self, spec: KeySpec) -> tuple[dict, str]:
        """Store a new key; returns (view, plaintext). The plaintext is not kept."""
        rec = validate_spec(spec)
        shard = self.hasher.account_tag(rec["ow"]) if rec.get("ow") else None
        plaintext, key_hash = mint(spec.type, self.hasher, shard)
        rec["id"] = new_id("key")
        # Record first, index second: an index entry never points at nothing.
        await self.redis.hset(names.record(key_hash), mapping=rec)
        await self.redis.hset(names.KEY_INDEX, rec["id"], key_hash)
        for owner in _owners(rec):
            await self.redis.sadd(names.owner_index(owner), rec["id"])
        return view(rec), plaintext

    async def _hash_of(self, key_id: str) -> str:
        key_hash = await self.redis.hget(names.KEY_INDEX, key_id)
        if not key_hash:
            raise KeyError_(f"no key with id {key_id!r}")
        return key_hash.decode() if isinstance(key_hash, bytes) else key_hash

    async def record(self, key_id: str) -> tuple[str, dict[str, str]]:
        key_hash = await self._hash_of(key_id)
        raw = await self.redis.hgetall(names.record(key_hash))
        if not raw:
            raise KeyError_(f"no key with id {key_id!r}")
        rec = {_s(k): _s(v) for k, v in raw.items()}
        if rec.get("qp"):   # a rotation's shared pool holds the remaining quota
            pooled = await self.redis.hget(names.wallet(shard_of(key_hash)),
                                           names.pool_field(rec["qp"]))
            rec["qr"] = _s(pooled or 0)
        return key_hash, rec

    async def get(self, key_id: str) -> dict:
        return view((await self.record(key_id))[1])

    async def list(self, type_: str | None = None, status: str | None = None,
                   owner: str | None = None, cursor: int = 0,
                   limit: int = 100) -> tuple[list[dict], int]:
        """One page of keys (ordered by the index scan) and the next cursor (0 = done)."""
        ids: list[str] = []
        if owner:
            ids = sorted(_s(i) for i in await self.redis.smembers(names.owner_index(owner)))
            page, cursor = ids[cursor:cursor + limit], (cursor + limit
                                                        if cursor + limit < len(ids) else 0)
            hashes = [await self.redis.hget(names.KEY_INDEX, i) for i in page]
        else:
            cursor, found = await self.redis.hscan(names.KEY_INDEX, cursor, count=limit)
            hashes = list(found.values())
        views = []
        for h in hashes:
            if not h:
                continue
            raw = await self.redis.hgetall(names.record(_s(h)))
            if raw:
                v = view({_s(k): _s(x) for k, x in raw.items()})
                if (type_ is None or v["type"] == type_) and (
                        status is None or v["status"] == status):
                    views.append(v)
        views.sort(key=lambda v: v["created_at"] or "")
        return views, int(cursor)

    async def set_status(self, key_id: str, active: bool, reason: str = "") -> dict:
        key_hash, rec = await self.record(key_id)
        if active and rec.get("dr") in CASCADE_REASONS:
            raise KeyConflict("status", f"{key_id} was disabled because {rec['dr']} "
                              "(its owner is gone); create a new key instead")
        fields = {"st": "a" if active else "d", "dr": "" if active else reason}
        await self.redis.hset(names.record(key_hash), mapping=fields)
        if not active and rec.get("st") == "a":
            await key_disabled(self.redis, key_hash, rec, reason)
        return await self.get(key_id)

    async def update(self, key_id: str, fields: dict[str, str],
                     remove: tuple[str, ...] = ()) -> dict:
        key_hash, _ = await self.record(key_id)
        if fields:
            await self.redis.hset(names.record(key_hash), mapping=fields)
        if remove:
            await self.redis.hdel(names.record(key_hash), *remove)
        return await self.get(key_id)

    async def edit(self, key_id: str, changes: dict) -> tuple[dict, dict]:
        """Change settings (keys of EDITABLE; ips as text); returns (before, after) views.

        The merged settings are validated as a whole (a restricted key keeps a scope) before
        one HSET/HDEL pair rewrites only the fields the change touches.
        """
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise InvalidKeySpec(sorted(unknown)[0], "not an editable setting")
        key_hash, rec = await self.record(key_id)
        before = view(rec)
        merged = {"name": before["name"], "permission": before["permission"],
                  "scopes": before["scopes"], "models": before["models"],
                  "ips": before["allowed_ips"], "rpm": before["rpm"], "tpm": before["tpm"],
                  "expires_at": None}
        if "permission" in changes and changes["permission"] != RESTRICTED \
                and "scopes" not in changes:
            merged["scopes"] = []   # scopes mean something only to a restricted key
        merged.update(changes)
        fields = validate_spec(KeySpec(
            type=TYPE_OF_CODE.get(rec.get("t", "s"), KeyType.standard),
            name=merged["name"], permission=merged["permission"], scopes=merged["scopes"],
            models=merged["models"], ips=merged["ips"], rpm=merged["rpm"],
            tpm=merged["tpm"], expires_at=merged["expires_at"]))
        touched = {f for name in changes for f in EDITABLE[name]}
        if "permission" in changes:
            touched.add("sc")
        put = {f: fields[f] for f in touched if fields.get(f)}
        drop = tuple(f for f in touched if not fields.get(f))
        rkey = names.record(key_hash)
        if put:
            await self.redis.hset(rkey, mapping=put)
        if drop:
            await self.redis.hdel(rkey, *drop)
        return before, await self.get(key_id)

    async def rotate(self, key_id: str, grace_ms: int, created_by: str,
                     expected_type: KeyType | None = None) -> tuple[dict, str, dict]:
        """Mint a successor with the same settings; the old key ends now or after grace_ms.

        Returns (new view, plaintext, old view). The successor is complete (record, index,
        owner sets) before the old key is touched, so a failure in between leaves the old
        key working and no half-made key reachable. During the grace window each key draws
        on its own copy of the remaining quota (the hot path reads one record only).
        """
        key_hash, rec = await self.record(key_id)
        if rec.get("st") != "a":
            raise KeyConflict("status", f"{key_id} is disabled; enable it before rotating")
        if rec.get("rt"):
            raise KeyConflict("rotated_to", f"{key_id} was already rotated into {rec['rt']}")
        now = now_ms()
        ex = int(rec.get("ex") or 0)
        if ex and ex <= now:
            raise KeyConflict("expires_at", f"{key_id} has expired")
        typ = TYPE_OF_CODE.get(rec.get("t", "s"), KeyType.standard)
        new = {f: rec[f] for f in ROTATION_COPIED if rec.get(f)}
        new.update(id=new_id("key"), st="a", ca=str(now), cb=created_by, qu="0", rf=key_id)
        # The successor shares the old key's hash tag, so both records and their shared
        # quota pool (in the tag's wallet hash) sit in one slot: during the grace window
        # the two keys draw on one remaining quota, not two copies of it.
        plaintext, new_hash = mint(typ, self.hasher, shard_of(key_hash))
        pooled = typ is not KeyType.subscription and rec.get("ul") != "1"
        if pooled:
            new["qp"] = rec.get("qp") or key_id
            new.pop("qr", None)
        await self.redis.hset(names.record(new_hash), mapping=new)
        await self.redis.hset(names.KEY_INDEX, new["id"], new_hash)
        for owner in _owners(new):
            await self.redis.sadd(names.owner_index(owner), new["id"])
        if pooled and not rec.get("qp"):  # the old key's remaining quota becomes the pool
            pool = PoolQuotaArgs(names.record(key_hash), names.wallet(shard_of(key_hash)),
                                 names.pool_field(new["qp"]), new["qp"])
            await run_script(self.redis, POOL_QUOTA, pool.keys(), pool.argv())
        old = {"rt": new["id"]}
        if grace_ms <= 0:
            old.update(st="d", dr="rotated")
        else:
            old["ex"] = str(min(ex, now + grace_ms) if ex else now + grace_ms)
        await self.redis.hset(names.record(key_hash), mapping=old)
        return view(new), plaintext, await self.get(key_id)

    async def disable_owned(self, owner: str, reason: str) -> list[str]:
        """Cascade: disable every key in an owner index ('mem:<id>', 'sa:<id>', 'prj:<id>').

        Each key's own record is written (st='d', dr=reason), because the authorize script
        reads only the record: the next call in every process sees it.
        Returns the keys it disabled; a key an earlier cascade already took keeps its
        first reason (the owner gone first is the truer story).
        """
        ids = sorted(_s(i) for i in await self.redis.smembers(names.owner_index(owner)))
        done = []
        for key_id in ids:
            key_hash = await self.redis.hget(names.KEY_INDEX, key_id)
            if not key_hash:
                continue
            rkey = names.record(_s(key_hash))
            st, dr, org, prj = (_s(v or "") for v in
                                await self.redis.hmget(rkey, "st", "dr", "org", "prj"))
            if dr in CASCADE_REASONS:
                continue
            await self.redis.hset(rkey, mapping={"st": "d", "dr": reason})
            if st == "a":
                await key_disabled(self.redis, _s(key_hash),
                                   {"id": key_id, "org": org, "prj": prj}, reason)
            done.append(key_id)
        return done

    async def set_quota(self, key_id: str, quota: int | None, add: bool = False) -> dict:
        """Set (or add to) the remaining quota; None makes the key unlimited."""
        key_hash, rec = await self.record(key_id)
        rkey = names.record(key_hash)
        if quota is None:
            await self.redis.hset(rkey, "ul", "1")
            return await self.get(key_id)
        if not (-MAX_QUOTA <= quota <= MAX_QUOTA) or (quota < 0 and not add):
            raise InvalidKeySpec("quota", f"must be between 0 and {MAX_QUOTA}")
        field_ = "cq" if rec.get("t") == "b" else "qr"
        if field_ == "qr" and rec.get("qp"):   # the rotation pool holds it
            wallet, pool = names.wallet(shard_of(key_hash)), names.pool_field(rec["qp"])
            if add:
                await self.redis.hincrby(wallet, pool, quota)
            else:
                await self.redis.hset(wallet, pool, str(quota))
            await self.redis.hset(rkey, "ul", "0")
        elif add:
            await self.redis.hincrby(rkey, field_, quota)
        else:
            await self.redis.hset(rkey, mapping={field_: str(quota), "ul": "0"})
        return await self.get(key_id)

    async def delete(self, key_id: str) -> None:
        key_hash, rec = await self.record(key_id)
        await self.redis.delete(names.record(key_hash))
        await self.redis.hdel(names.KEY_INDEX, key_id)
        for owner in _owners(rec):
            await self.redis.srem(names.owner_index(owner), key_id)

    async def set_balance(self, account: str, units: int, add: bool = False,
                          org: str | None = None) -> int:
        """PAYG balance of an account (the wallet its subscription keys fall back to):
        a standalone account, or (org given) that organization's own account."""
        field_ = wallet_field(org, account)
        if not -MAX_QUOTA <= units <= MAX_QUOTA or (units < 0 and not add):
            raise InvalidKeySpec("balance", f"must be between 0 and {MAX_QUOTA}")
        wallet = names.wallet(self.hasher.account_tag(field_))
        if add:
            return int(await self.redis.hincrby(wallet, field_, units))
        await self.redis.hset(wallet, field_, units)
        return units

    async def balance(self, account: str, org: str | None = None) -> int:
        field_ = wallet_field(org, account)
        value = await self.redis.hget(names.wallet(self.hasher.account_tag(field_)), field_)
        return int(value or 0)


def _owners(rec: dict[str, str]) -> list[str]:
    """Index entries a key belongs to: member, service account, project, account, org."""
    out = []
    for prefix, fieldname in (("mem:", "mem"), ("sa:", "sa"), ("prj:", "prj"),
                              ("acct:", "ow"), ("org:", "org")):
        if rec.get(fieldname):
            out.append(prefix + rec[fieldname])
    return out


def _owner_kind(rec: dict[str, str]) -> str | None:
    """Who owns an org key: its service account, its member (user key), or its project."""
    if rec.get("t") != "o":
        return None
    if rec.get("sa"):
        return "service_account"
    if rec.get("mem"):
        return "user"
    return "project"


def _set(items: list[str]) -> str:
    return "," + ",".join(items) + "," if items else ""


def _list(value: str | None) -> list[str]:
    return [v for v in (value or "").split(",") if v]


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def _cidr(entry: str) -> str:
    hexaddr, _, bits = entry.partition("/")
    addr = ipaddress.IPv6Address(bytes.fromhex(hexaddr))
    if addr.ipv4_mapped is not None and int(bits) >= 96:
        net = ipaddress.ip_network(f"{addr.ipv4_mapped}/{int(bits) - 96}")
    else:
        net = ipaddress.ip_network(f"{addr}/{bits}")
    return str(net.network_address) if net.num_addresses == 1 else str(net)


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


