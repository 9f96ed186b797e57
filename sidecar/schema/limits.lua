-- limits.lua: the budget and concurrency state of one level, shared by authorize.lua and
-- settle.lua (schema/scripts.py sends it in front of each: Redis scripts cannot include).
--
-- A level is the key itself or one above it (its project, organization, member). Its
-- state is one packed string (schema/limits.py is the Python side of the format):
--   '<budget> <spent> <reserved> <window> <period> <max_conc> <in_flight> <observe>
--    <thresholds> <fired>'
-- budget, spent, reserved: money in micro-units (budget 0 = none); window: the day or
-- month number the spent belongs to (0 for period t, total); period t / d / m;
-- max_conc: calls in flight at most (0 = none); observe: '-' or letters of the limits
-- only observed, never enforced: b budget, c concurrency, q quota, r requests, t tokens.
-- thresholds: the fractions of the budget left that raise an alert, highest first
-- ('0.2,0.05,0'), '-' the deployment's default (alert_thresholds, passed in ARGV), 'n'
-- none; fired: how many of them fired since the budget was last set or its period
-- rolled over (a state of 8 words, written before thresholds existed, reads '- 0').
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
  local b, s, r, w, p, mc, fl, ob, rest = string.match(v,
    '^(%d+) (%d+) (%d+) (%d+) (%a) (%d+) (%d+) (%S+)(.*)$')
  if not b then return nil end
  local th, tf = string.match(rest, '^ (%S+) (%d+)$')
  return {b = tonumber(b), s = tonumber(s), r = tonumber(r), w = tonumber(w), p = p,
          mc = tonumber(mc), fl = tonumber(fl), ob = ob, th = th or '-',
          tf = tonumber(tf or '0')}
end

local function lim_text(l)
  return string.format('%d %d %d %d %s %d %d %s %s %d', l.b, l.s, l.r, l.w, l.p, l.mc,
                       l.fl, l.ob, l.th or '-', l.tf or 0)
end

local function lim_roll(l, day, month)   -- a new day or month starts with nothing spent
  local w = (l.p == 'd' and day) or (l.p == 'm' and month) or 0
  if l.w ~= w then l.s = 0; l.w = w; l.tf = 0 end   -- and its alerts re-armed
end

-- Thresholds (issue 12): the list of a text ('-' = `default`, 'n' = none), highest first.
local function th_list(text, default)
  if not text or text == '' or text == '-' then text = default end
  local out = {}
  if text == 'n' then return out end
  for t in string.gmatch(text or '', '[^,]+') do out[#out + 1] = t end
  return out
end

-- After a call: the lowest threshold now crossed that had not fired (nil if none), and
-- how many have fired. One alert per crossing: `fired` only grows until the quota or
-- budget is raised or renewed (the writer of that resets it).
local function th_cross(ths, fired, left, total)
  local n = 0
  for i, t in ipairs(ths) do
    if left <= tonumber(t) * total then n = i end
  end
  if n > fired then return ths[n], n end
  return nil, fired
end

-- Money in micro-units as schema/money.format_amount writes it ("5.00", "0.000125").
local function money_text(micro)
  local sign = micro < 0 and '-' or ''
  micro = math.abs(micro)
  local frac = string.format('%06d', micro % 1000000):gsub('0+$', '')
  if #frac < 2 then frac = frac .. string.rep('0', 2 - #frac) end
  return string.format('%s%d.%s', sign, math.floor(micro / 1000000), frac)
end

-- A level's budget crossing after `l` changed: the alert's fields, or nil; l.tf updated.
local function lim_cross(l, ths)
  if l.b <= 0 then return nil end
  local th
  th, l.tf = th_cross(ths, l.tf or 0, l.b - l.s - l.r, l.b)
  if not th then return nil end
  return {tonumber(th) == 0 and 'budget.exhausted' or 'budget.low', th,
          money_text(math.max(l.b - l.s - l.r, 0)), money_text(l.b)}
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
-- window running now), each slot is given back. alert (optional): called with (where,
-- l) for each level whose money moved, before it is stored (settle.lua's crossings).
local function lim_release(rec, hash, levels, reserved, actual, day, month, alert)
  for flags, where in string.gmatch(levels, '(%a+):(%S+)') do
    local l = lim_load(rec, hash, where)
    if l then
      lim_roll(l, day, month)
      if string.find(flags, 'b', 1, true) then
        l.r = math.max(l.r - reserved, 0)
        l.s = l.s + actual
        if alert then alert(where, l) end
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

