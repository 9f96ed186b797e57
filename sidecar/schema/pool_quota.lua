-- pool_quota.lua: move a key's remaining quota into a shared pool, atomically.
-- Used by rotation: the old key and its successor then draw on one remaining quota.
--
-- KEYS[1]  record              key record hash k:{tag}:<hash>
-- KEYS[2]  wallet              wallet hash w:{tag} (same tag: one slot)
-- ARGV[1]  pool_field          the pool's wallet field, names.pool_field(pool id)
-- ARGV[2]  pool_id             written to the record's 'qp'
--
-- Returns moved: the units moved. Quota units are integers.

local remaining = redis.call('HGET', KEYS[1], 'qr') or '0'
redis.call('HSET', KEYS[2], ARGV[1], remaining)
redis.call('HDEL', KEYS[1], 'qr')
redis.call('HSET', KEYS[1], 'qp', ARGV[2])
return tonumber(remaining)
