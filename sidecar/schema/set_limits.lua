-- set_limits.lua: change one level's budget and concurrency settings, atomically, keeping
-- what the hot path counts there (spent, window, the holds of reservations; limits.lua).
--
-- KEYS[1]  holder              the hash holding the state: the key record
--                              k:{tag}:<hash>, or the budgets hash b:{tag}
-- ARGV[1]  field               'lim' in a record, else the level's field
-- ARGV[2]  budget              micro-units, 0 none; '' unchanged
-- ARGV[3]  period              t / d / m; '' unchanged
-- ARGV[4]  max_concurrency     0 none; '' unchanged
-- ARGV[5]  observe             '-' or letters (limits.lua); '' unchanged
-- ARGV[6]  thresholds          alert thresholds '0.2,0.05,0', '-' default, 'n' none;
--                              '' unchanged. A new budget or thresholds re-arm the
--                              alerts (fired = 0)
--
-- Returns state: the state as stored, packed (limits.lua; schema/limits.py Limits.unpack).

local l = lim_read(redis.call('HGET', KEYS[1], ARGV[1]))
  or {b = 0, s = 0, r = 0, w = 0, p = 't', mc = 0, fl = 0, ob = '-', th = '-', tf = 0,
      h = {}}
if ARGV[2] ~= '' or ARGV[6] ~= '' then l.tf = 0 end
if ARGV[6] ~= '' then l.th = ARGV[6] end
if ARGV[2] ~= '' then l.b = tonumber(ARGV[2]) end
if ARGV[3] ~= '' then l.p = ARGV[3] end
if ARGV[4] ~= '' then l.mc = tonumber(ARGV[4]) end
if ARGV[5] ~= '' then l.ob = ARGV[5] end
local state = lim_pack(l)
redis.call('HSET', KEYS[1], ARGV[1], state)
return state
