"""Every Redis key name the sidecar uses, in one place.

Hash tags: everything an authorize or settle script touches carries the key's shard tag
`{abc}` (the first hex digits of the key hash), so record, counters and the owner's
wallet share one Redis Cluster slot and each script call stays single-slot. Control-plane
indexes are separate keys touched only outside the scripts.
"""

from __future__ import annotations

from ..keys import shard_of


def record(key_hash: str) -> str:
    """Hash: the key's record, counters and recent activity (fields: see keystore.FIELDS)."""
    return f"k:{{{shard_of(key_hash)}}}:{key_hash}"


def wallet(shard: str) -> str:
    """Hash: PAYG balances, field = account id, for the accounts whose tag is `shard`."""
    return f"w:{{{shard}}}"


def settlement(key_hash: str, request_id: str) -> str:
    """String: marks a key's usage report as settled (idempotency), expires after a day.

    The name carries 16 hex digits of the key hash: two keys reporting the same request id
    (ids come from gateways, and a client may choose its own) never share a marker.
    """
    return f"u:{{{shard_of(key_hash)}}}:{key_hash[:16]}:{request_id}"


KEY_INDEX = "idx:keys"          # hash: key id -> key hash (admin lookups, listing)
OWNER_INDEX = "idx:owner:"      # set per owner (member, service account, project): key ids

