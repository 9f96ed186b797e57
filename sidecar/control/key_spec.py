"""A new key's settings (KeySpec) and their one check, validate_spec -> KeyRecord. Pure.

The errors name the setting they are about (InvalidKeySpec.field); control/errors.py
turns them into the API's param.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..schema import names
from ..schema.ips import network_entry
from ..schema.keys import KeyType
from ..schema.record import ALL, DAY_MS, MAX_QUOTA, PERMISSIONS, RESTRICTED, KeyRecord
from .input_limits import ACCOUNT_CHARS, MAX_ACCOUNT, MAX_CYCLE_DAYS, MAX_MODEL_NAME, MAX_NAME

# Editable settings: KeyStore.edit argument -> the KeyRecord attributes it rewrites.
EDITABLE = {"name": ("name",), "permission": ("permission", "scopes"),
            "scopes": ("scopes",), "models": ("models",), "ips": ("networks",),
            "rpm": ("rpm",), "tpm": ("tpm",), "rpd": ("rpd",), "tpd": ("tpd",),
            "expires_at": ("expires_ms",)}


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
    rpd: int = 0
    tpd: int = 0
    limits: bytes = b""               # the key's own budget and concurrency, packed
    permission: str = ALL
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


def validate_spec(spec: KeySpec, now: datetime | None = None) -> KeyRecord:
    """The record for a spec (no id yet), or InvalidKeySpec naming the bad field."""
    now = now or datetime.now(UTC)
    nets = _check_spec(spec, now)
    quota, created = spec.quota or 0, ms(now)
    rec = KeyRecord(
        type=spec.type, active=True, name=spec.name, created_ms=created,
        created_by=spec.created_by, expires_ms=ms(spec.expires_at) if spec.expires_at else 0,
        unlimited=spec.unlimited, quota_remaining=quota, quota_used=0,
        permission=spec.permission, networks=nets, models=list(spec.models),
        scopes=list(spec.scopes), rpm=spec.rpm or None, tpm=spec.tpm or None,
        rpd=spec.rpd or None, tpd=spec.tpd or None, limits=spec.limits,
        wallet=wallet_field(spec.org, spec.account), org=spec.org, project=spec.project,
        member=spec.member, service_account=spec.service_account,
        subscription=spec.subscription)
    if spec.type is KeyType.subscription:
        rec.cycle_quota, rec.cycle_used = quota, 0
        rec.cycle_ms = spec.cycle_days * DAY_MS
        rec.cycle_end_ms = created + spec.cycle_days * DAY_MS
        rec.payg_fallback = spec.payg_fallback
    return rec


def _check_spec(  # noqa: C901 — a flat list, one check per field of the spec
        spec: KeySpec, now: datetime) -> list[str]:
    """Every setting checked; returns the networks in the record's form."""
    if spec.quota is not None and not 0 <= spec.quota <= MAX_QUOTA:
        raise InvalidKeySpec("quota", f"must be between 0 and {MAX_QUOTA}")
    if spec.quota is not None and spec.unlimited:
        raise InvalidKeySpec("quota", "give --quota or --unlimited, not both")
    for name, value in (("rpm", spec.rpm), ("tpm", spec.tpm), ("rpd", spec.rpd),
                        ("tpd", spec.tpd)):
        if not 0 <= value <= MAX_QUOTA:
            raise InvalidKeySpec(name, "must be a non-negative integer")
    if spec.expires_at is not None:
        if spec.expires_at.tzinfo is None:
            spec.expires_at = spec.expires_at.replace(tzinfo=UTC)
        if spec.expires_at <= now:
            raise InvalidKeySpec("expires", f"{spec.expires_at.isoformat()} is in the past")
    if spec.permission not in PERMISSIONS:
        raise InvalidKeySpec("permission", "one of " + ", ".join(PERMISSIONS))
    if spec.permission == RESTRICTED and not spec.scopes:
        raise InvalidKeySpec("scopes", "a restricted key needs at least one scope")
    for model in spec.models:
        if not model or "," in model or len(model) > MAX_MODEL_NAME:
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
    if not 1 <= spec.cycle_days <= MAX_CYCLE_DAYS:
        raise InvalidKeySpec("cycle_days", f"must be between 1 and {MAX_CYCLE_DAYS}")
    if len(spec.name) > MAX_NAME:
        raise InvalidKeySpec("name", f"at most {MAX_NAME} characters")
    return nets


_ACCOUNT = re.compile(f"[{ACCOUNT_CHARS}]{{1,{MAX_ACCOUNT}}}")


def check_account(account: str) -> None:
    """Account names are wallet fields; no ':' so they never collide with a quota pool
    or with another organization's accounts (names.org_account)."""
    if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
        raise InvalidKeySpec("account",
                             f"{account!r} is not 1-{MAX_ACCOUNT} of [{ACCOUNT_CHARS}]")


def wallet_field(org: str | None, account: str | None) -> str:
    """Where an account's balance lives: an organization's accounts are its own."""
    if not account:
        return ""
    check_account(account)
    return names.org_account(org, account) if org else account


def ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)
