"""Load N benchmark keys into Redis fast, exactly as `KeyStore.create` would store them.

`KeyStore.create` makes one key per three round trips and `keys.mint` spends ~80 us per
key on `secrets.choice`: 100k keys would take minutes. Here the record comes from the same
`validate_spec` (once: every key shares the spec), the key names from `names`, the hash
from the same `KeyHasher`, and the writes go out in pipelined chunks. Only the plaintext
body is drawn differently: from one os.urandom buffer mapped onto the same alphabet.
"""

from __future__ import annotations

import os
import socket
import string
from pathlib import Path

import hiredis

from sidecar.control.key_spec import KeySpec, validate_spec
from sidecar.schema import names
from sidecar.schema.keys import BODY_LEN, PREFIX_OF, KeyHasher, KeyType, key_type, new_id

_ALPHABET = (string.ascii_letters + string.digits).encode()
# Bytes 0..247 map onto the 62 characters evenly (4 each); 248..255 are dropped (no bias).
_MAP = bytes(_ALPHABET[b % 62] for b in range(248)) + bytes(8)
_DROP = bytes(range(248, 256))

# A realistic allowed call: a standard key with a large finite quota and a requests-per-
# minute limit, so every call runs the full checks, the quota decrement and the rate
# window, and answers with the x-ratelimit-* trio like the baseline's fixed record does.
# The limit is far above what one key sees in a run, so allows stay allows.
BENCH_SPEC = KeySpec(type=KeyType.standard, name="bench", quota=10**12, rpm=1_000_000,
                     created_by="bench")


def random_bodies(count: int, length: int = BODY_LEN) -> list[str]:
    need = count * length
    chars = b""
    while len(chars) < need:
        chars += os.urandom(need - len(chars) + need // 20 + 64).translate(_MAP, _DROP)
    text = chars[:need].decode()
    return [text[i:i + length] for i in range(0, need, length)]


def load_keys(host: str, port: int, pepper: str, count: int,
              chunk: int = 5000) -> list[str]:
    """Store `count` keys (records + id index) and return their plaintexts.

    Commands are packed by hiredis and written in chunks on one plain socket (redis-py's
    pipeline spends ~40 us per key packing; this is ~10x faster, which matters at 1M).
    """
    hasher = KeyHasher(pepper)
    base = validate_spec(BENCH_SPEC).to_hash()
    fields = [x for kv in base.items() for x in kv]
    prefix = PREFIX_OF[KeyType.standard]
    keys = [prefix + body for body in random_bodies(count)]
    assert key_type(keys[0]) is KeyType.standard, "benchmark keys must be well formed"
    with socket.create_connection((host, port), timeout=30) as sock:
        reader = hiredis.Reader()
        for start in range(0, count, chunk):
            commands = []
            for key in keys[start:start + chunk]:
                key_hash, key_id = hasher(key), new_id("key")
                commands.append(hiredis.pack_command(
                    ("HSET", names.record(key_hash), "id", key_id, *fields)))
                commands.append(hiredis.pack_command(
                    ("HSET", names.KEY_INDEX, key_id, key_hash)))
            sock.sendall(b"".join(commands))
            _read_replies(sock, reader, len(commands))
    return keys


def _read_replies(sock: socket.socket, reader, count: int) -> list:
    """The next `count` replies on a pipelined socket, in order; an error reply raises."""
    got: list = []
    while len(got) < count:
        reply = reader.gets()
        if reply is False:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("redis closed the connection while loading keys")
            reader.feed(data)
            continue
        if isinstance(reply, hiredis.ReplyError):
            raise RuntimeError(f"loading keys: {reply}")
        got.append(reply)
    return got


def write_key_file(keys: list[str], path: Path) -> Path:
    path.write_text("\n".join(keys) + "\n")
    path.chmod(0o600)  # plaintext keys: readable by this user only, deleted with the run
    return path
