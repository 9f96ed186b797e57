-- retire_tag.lua: drop a tag from the active-streams set, unless it was written since.
-- The delivery worker calls it once the tag's stream is empty. Writers bump the tag's
-- score (ZINCRBY 1) after each XADD, so a score other than the one the worker read means
-- a new entry may be there: the tag stays. One key: single-slot on Redis Cluster.
--
-- KEYS[1]  active              names.EVENTS_ACTIVE (sorted set: tag -> write counter)
-- ARGV[1]  tag                 the tag
-- ARGV[2]  score               the score the worker read
--
-- Returns removed: 1 when removed, 0 when kept.

local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
