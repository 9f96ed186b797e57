"""PAYG wallets: the balance an account's subscription keys fall back to (redis-py)."""

from __future__ import annotations

from ..schema import names
from ..schema.keys import KeyHasher
from ..schema.record import MAX_QUOTA
from .key_spec import InvalidKeySpec, wallet_field


class Wallets:
    """Balances of standalone accounts and of organizations' own accounts."""

    def __init__(self, redis, hasher: KeyHasher):
        self.redis = redis
        self.hasher = hasher

    async def set_balance(self, account: str, units: int, add: bool = False,
                          org: str | None = None) -> int:
        """Set (or add to) an account's balance: a standalone account, or (org given)
        that organization's own account."""
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
