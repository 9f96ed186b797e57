"""What an operator sees of a key record: never the key or its hash. Pure."""

from __future__ import annotations

import ipaddress

from ..schema.keys import KeyType
from ..schema.record import DAY_MS, KeyRecord, _iso, now_ms


def view(rec: KeyRecord, now: int | None = None) -> dict:
    now = now or now_ms()
    out = {
        "id": rec.id,
        "type": rec.type.value,
        "name": rec.name,
        "status": "active" if rec.active else "disabled",
        "disabled_reason": rec.disabled_reason or None,
        "unlimited": bool(rec.unlimited),
        "quota_remaining": None if rec.unlimited else rec.quota_remaining or 0,
        "quota_used": rec.quota_used or 0,
        "expires_at": _iso(rec.expires_ms),
        "expired": rec.expired(now),
        "models": rec.models,
        "allowed_ips": [_cidr(n) for n in rec.networks],
        "permission": rec.permission,
        "scopes": rec.scopes,
        "rpm": rec.rpm or 0,
        "tpm": rec.tpm or 0,
        "rpd": rec.rpd or 0,
        "tpd": rec.tpd or 0,
        "account": account_name(rec),
        "org_id": rec.org or None,
        "project_id": rec.project or None,
        "member_id": rec.member or None,
        "service_account_id": rec.service_account or None,
        "owner": owner_kind(rec),
        "subscription_id": rec.subscription or None,
        "rotated_to": rec.rotated_to or None,
        "rotated_from": rec.rotated_from or None,
        "created_at": _iso(rec.created_ms),
        "created_by": rec.created_by or None,
        "last_used_at": _iso(rec.last_used_ms),
        "last_ip": rec.last_ip or None,
        "last_model": rec.last_model or None,
        "request_count": rec.requests or 0,
    }
    if rec.type is KeyType.subscription:
        out["subscription"] = cycle(rec, now)
        out["quota_remaining"] = (None if out["unlimited"] else
                                  out["subscription"]["cycle_remaining"])
    return out


def cycle(rec: KeyRecord, now: int) -> dict:
    """A subscription key's billing cycle as the next call sees it."""
    cq, cu = rec.cycle_quota or 0, rec.cycle_used or 0
    ce, cp = rec.cycle_end_ms or 0, rec.cycle_ms or 0
    if cp and now >= ce:  # the script renews lazily; show what the next call sees
        ce, cu = ce + ((now - ce) // cp + 1) * cp, 0
    return {"cycle_quota": cq, "cycle_used": cu, "cycle_remaining": max(cq - cu, 0),
            "renews_at": _iso(ce), "cycle_days": cp // DAY_MS,
            "payg_fallback": bool(rec.payg_fallback), "payg_used": rec.payg_used or 0}


def account_name(rec: KeyRecord) -> str | None:
    """The account as its organization calls it (the wallet field without the org)."""
    if rec.org and rec.wallet.startswith(rec.org + ":"):
        return rec.wallet[len(rec.org) + 1:]
    return rec.wallet or None


def owner_kind(rec: KeyRecord) -> str | None:
    """Who owns an org key: its service account, its member (user key), or its project."""
    if rec.type is not KeyType.org:
        return None
    if rec.service_account:
        return "service_account"
    if rec.member:
        return "user"
    return "project"


def _cidr(entry: str) -> str:
    hexaddr, _, bits = entry.partition("/")
    addr = ipaddress.IPv6Address(bytes.fromhex(hexaddr))
    if addr.ipv4_mapped is not None and int(bits) >= 96:
        net = ipaddress.ip_network(f"{addr.ipv4_mapped}/{int(bits) - 96}")
    else:
        net = ipaddress.ip_network(f"{addr}/{bits}")
    return str(net.network_address) if net.num_addresses == 1 else str(net)
