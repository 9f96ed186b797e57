-- create_unique.lua: create an entity and index it, unless its unique name is taken.
-- One organization's keys share a hash tag, so this stays single-slot on Redis Cluster.
--
-- KEYS[1]  unique              unique index hash, name -> id (e.g. user -> member id)
-- KEYS[2]  entity              entity hash
-- KEYS[3]  ids                 set of ids; optional
-- ARGV[1]  name                the unique name
-- ARGV[2]  new_id              the new id
-- ARGV[3..] fields             entity hash fields and values, in pairs
--
-- Returns held: the id holding the name, ARGV[2] when created, the other id when it was
-- taken. Nothing is written when the name is taken.

local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then return held end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
if KEYS[3] then redis.call('SADD', KEYS[3], ARGV[2]) end
return ARGV[2]
