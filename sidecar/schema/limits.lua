-- limits.lua: the budget and concurrency state of one level, shared by authorize.lua and
-- settle.lua (schema/scripts.py sends it in front of each: Redis scripts cannot include).
--
-- A level is the key itself or one above it (its project, organization, member). Its
-- state is one packed string (schema/limits.py is the Python side of the format):
--   '<budget> <spent> <reserved> <window> <period> <max_conc> <in_flight> <observe>'
-- budget, spent, reserved: money in micro-units (budget 0 = none); window: the day or
-- month number the spent belongs to (0 for period t, total); period t / d / m;
-- max_conc: calls in flight at most (0 = none); observe: '-' or letters of the limits
-- only observed, never enforced: b budget, c concurrency, q quota, r requests, t tokens.
-- The key's own state is its record's field 'lim'; a level's is a field of the tag's
-- budgets hash, named by the record's field 'lv' ('p:<id> o:<id> m:<id>').
--
-- A reservation of budget or a concurrency slot is '<units> <source> <money> <record>
-- <levels>' (authorize.lua), levels = words '<flags>:<where>', flags b (money reserved)
-- and / or c (a slot taken), where = 'k' (the record's lim) or a budgets hash field.
-- Its lease (the leases sorted set, score = when it expires) ends at settle, or when it
-- expires: then it is charged what it reserved (policy 'c') or released ('r').

local function lim_read(v)
  if not v then return nil end
  local b, s, r, w, p, mc, fl, ob = string.match(v,
    '^(%d+) (%d+) (%d+) (%d+) (%a) (%d+) (%d+) (%S+)$')
  if not b then return nil end
  return {b = tonumber(b), s = tonumber(s), r = tonumber(r), w = tonumber(w), p = p,
          mc = tonumber(mc), fl = tonumber(fl), ob = ob}
end

local function lim_text(l)
  return string.format('%d %d %d %d %s %d %d %s', l.b, l.s, l.r, l.w, l.p, l.mc, l.fl, l.ob)
end

local function lim_roll(l, day, month)   -- a new day or month starts with nothing spent
  local w = (l.p == 'd' and day) or (l.p == 'm' and month) or 0
  if l.w ~= w then l.s = 0; l.w = w end
end

local function lim_load(rec, hash, where)
  if where == 'k' then return lim_read(redis.call('HGET', rec, 'lim')) end
  return lim_read(redis.call('HGET', hash, where))
end

local function lim_store(rec, hash, where, l)
  if where == 'k' then redis.call('HSET', rec, 'lim', lim_text(l))
  else redis.call('HSET', hash, where, lim_text(l)) end
end

-- End a reservation's hold on its levels: reserved money becomes `actual` spent (in the
-- window running now), each slot is given back.
local function lim_release(rec, hash, levels, reserved, actual, day, month)
  for flags, where in string.gmatch(levels, '(%a+):(%S+)') do
    local l = lim_load(rec, hash, where)
    if l then
      lim_roll(l, day, month)
      if string.find(flags, 'b', 1, true) then
        l.r = math.max(l.r - reserved, 0)
        l.s = l.s + actual
      end
      if string.find(flags, 'c', 1, true) then l.fl = math.max(l.fl - 1, 0) end
      lim_store(rec, hash, where, l)
    end
  end
end

-- An expired lease: its reservation is charged or released by the policy, then marked
-- 'x' (its report gets 'no such reservation'), and leaves the leases set.
local function lim_expire(leases, hash, name, policy, day, month, marked_ms)
  local held = redis.call('GET', name)
  local money, rec, levels
  if held then money, rec, levels = string.match(held, '^%d+ %S+ (%d+) (%S+) (.*)$') end
  if money then
    money = tonumber(money)
    lim_release(rec, hash, levels, money, policy == 'c' and money or 0, day, month)
    redis.call('SET', name, 'x', 'PX', marked_ms)
  end
  redis.call('ZREM', leases, name)
end

-- A few expired leases of this tag per call: bounded work, and a level whose calls
-- never settle gets its slots back on its next call.
local function lim_sweep(leases, hash, now, policy, day, month, marked_ms)
  local due = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 4)
  for _, name in ipairs(due) do
    lim_expire(leases, hash, name, policy, day, month, marked_ms)
  end
end

