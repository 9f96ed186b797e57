"""What an operator sees of control-plane records (Redis hashes with short fields)."""

from __future__ import annotations

from ..schema.record import _iso


def cycle_view(key: dict | None) -> dict:
    sub = (key or {}).get("subscription") or {}
    return {"cycle_quota": sub.get("cycle_quota", 0), "cycle_used": sub.get("cycle_used", 0),
            "cycle_remaining": sub.get("cycle_remaining", 0),
            "cycle_days": sub.get("cycle_days", 0), "renews_at": sub.get("renews_at"),
            "payg_fallback": bool(sub.get("payg_fallback")),
            "payg_used": sub.get("payg_used", 0)}


def org_view(rec: dict[str, str]) -> dict:
    return {"object": "organization", "id": rec["id"], "name": rec.get("nm", ""),
            "created_at": _iso(rec.get("ca")), "created_by": rec.get("cb") or None}


def member_view(rec: dict[str, str]) -> dict:
    return {"object": "member", "id": rec["id"], "org_id": rec.get("org"),
            "user": rec.get("user", ""), "name": rec.get("nm", ""),
            "role": rec.get("role", "member"), "created_at": _iso(rec.get("ca")),
            "created_by": rec.get("cb") or None}


def project_view(rec: dict[str, str]) -> dict:
    return {"object": "project", "id": rec["id"], "org_id": rec.get("org"),
            "name": rec.get("nm", ""), "created_at": _iso(rec.get("ca")),
            "created_by": rec.get("cb") or None}


def sa_view(rec: dict[str, str]) -> dict:
    return {"object": "service_account", "id": rec["id"], "org_id": rec.get("org"),
            "project_id": rec.get("prj"), "name": rec.get("nm", ""),
            "created_at": _iso(rec.get("ca")), "created_by": rec.get("cb") or None}


def pairs(rec: dict[str, str]) -> list[str]:
    return [x for kv in rec.items() for x in kv]


def decode(raw: dict) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
