-- limits.lua: the budget and concurrency state of one level, shared by authorize.lua,
-- settle.lua and set_limits.lua (schema/scripts.py sends it in front of each: Redis
-- scripts cannot include).
--
-- A level is the key itself or one above it (its project, organization, member). Its
-- state is one packed string (schema/limits.py is the Python side of the format):
--   '<budget> <spent> <reserved> <window> <period> <max_conc> <in_flight> <observe>
--    <thresholds> <fired> <holds>'
-- budget, spent, reserved: money in micro-units (budget 0 = none); window: the day or
-- month number the spent belongs to (0 for period t, total); period t / d / m;
-- max_conc: calls in flight at most (0 = none); observe: '-' or letters of the limits
-- only observed, never enforced: b budget, c concurrency, q quota, r requests, t tokens.
-- thresholds: the fractions of the budget left that raise an alert, highest first
-- ('0.2,0.05,0'), '-' the deployment's default (alert_thresholds, passed in ARGV), 'n'
-- none; fired: how many of them fired since the budget was last set or its period
-- rolled over.
-- holds: what the reservations not yet settled hold, grouped by when they expire:
-- '-' none, else '<end ms>:<money>:<slots>,...'; reserved and in_flight are their sums.
-- A reservation joins the hold that ends at its expiry rounded up to a grid of a
-- quarter of the reservation TTL (hold_end), so a level has about five holds at most,
-- whatever the traffic: expiry costs no command and no index of its own. When a hold
-- ends (read by lim_now), its money is charged (policy 'c') or released ('r') and its
-- slots come back.
-- Older forms read as: 8 words '- 0 -'; 10 words: their reserved and in-flight in one
-- hold that has ended (resolved by the policy at the next call).
-- The key's own state is its record's field 'lim'; a level's is a field of the tag's
-- budgets hash, named by the record's field 'lv' ('p:<id> o:<id> m:<id>').
--
-- A reservation that holds money or a slot is '<units> <source> <money> <levels>
-- <hold end>' (authorize.lua), levels = words '<flags>:<where>', flags b (money
-- reserved) and / or c (a slot taken), where = 'k' (the record's lim) or a budgets hash
-- field. Its report (settle.lua) is taken until its hold ends.

local function lim_read(v)
  if not v then return nil end
  local b, s, r, w, p, mc, fl, ob, rest = string.match(v,
    '^(%d+) (%d+) (%d+) (%d+) (%a) (%d+) (%d+) (%S+)(.*)$')
  if not b then return nil end
  local th, tf, hs = string.match(rest, '^ (%S+) (%d+) ?(%S*)$')
  -- h: the holds as stored (ends ascending), '' none.
  local l = {b = tonumber(b), s = tonumber(s), r = tonumber(r), w = tonumber(w), p = p,
             mc = tonumber(mc), fl = tonumber(fl), ob = ob, th = th or '-',
             tf = tonumber(tf or '0'), h = hs or ''}
  if l.h == '-' then
    l.h = ''
  elseif l.h == '' and (l.r > 0 or l.fl > 0) then
    l.h = '0:' .. r .. ':' .. fl   -- an older form: what it held, in a hold that has ended
  end
  return l
end

local function lim_text(l)
  return string.format('%d %d %d %d %s %d %d %s %s %d %s', l.b, l.s, l.r, l.w, l.p, l.mc,
                       l.fl, l.ob, l.th or '-', l.tf or 0, l.h ~= '' and l.h or '-')
end

-- The level as a call at `now` sees it: a new day or month starts with nothing spent
-- (and its alerts re-armed); a hold that has ended is charged (policy 'c') or released
-- ('r') into the window running now, and its slots come back. Holds end in order, so
-- only the first is looked at, mostly once.
local function lim_now(l, now, day, month, policy)
  local w = (l.p == 'd' and day) or (l.p == 'm' and month) or 0
  if l.w ~= w then l.s = 0; l.w = w; l.tf = 0 end
  while l.h ~= '' do
    local e, m, c, rest = string.match(l.h, '^(%d+):(%d+):(%d+),?(.*)$')
    if not e or tonumber(e) > now then break end
    m, c = tonumber(m), tonumber(c)
    l.r, l.fl = math.max(l.r - m, 0), math.max(l.fl - c, 0)
    if policy == 'c' then l.s = l.s + m end
    l.h = rest
  end
end

-- When the reservation of a call at `now` expires: its TTL, rounded up to a grid of a
-- quarter of the TTL (at least a second), so that the reservations of a level share
-- about five holds at most.
local function hold_end(now, ttl)
  local grid = math.max(math.ceil(ttl / 4), 1000)
  return math.ceil((now + ttl) / grid) * grid
end

-- A reservation's money and slots join the last hold when it ends at `e` or later (it
-- only ends later after reservation_ttl_s shrank: held longer, never lost), else a new
-- last hold ending at `e`.
local function hold_add(l, e, money, slots)
  l.r, l.fl = l.r + money, l.fl + slots
  local cut = string.find(l.h, ',[^,]*$') or 0   -- the comma before the last hold
  local le, lm, lc = string.match(l.h, '^(%d+):(%d+):(%d+)$', cut + 1)
  if le and tonumber(le) >= e then
    l.h = string.sub(l.h, 1, cut)
          .. string.format('%s:%d:%d', le, tonumber(lm) + money, tonumber(lc) + slots)
  else
    l.h = (l.h ~= '' and l.h .. ',' or '') .. string.format('%d:%d:%d', e, money, slots)
  end
end

-- A settled reservation leaves its hold: the first that ends at `e` or later.
local function hold_take(l, e, money, slots)
  local out, done = {}, false
  for he, hm, hc in string.gmatch(l.h, '(%d+):(%d+):(%d+)') do
    he, hm, hc = tonumber(he), tonumber(hm), tonumber(hc)
    if not done and he >= e then
      done = true
      local m, c = math.min(hm, money), math.min(hc, slots)
      hm, hc = hm - m, hc - c
      l.r, l.fl = math.max(l.r - m, 0), math.max(l.fl - c, 0)
    end
    if hm > 0 or hc > 0 then out[#out + 1] = string.format('%d:%d:%d', he, hm, hc) end
  end
  l.h = table.concat(out, ',')
end

-- Thresholds (issue 12): the list a holder uses, as text, highest first ('-' or none
-- given: `default`; 'n': none).
local function th_text(text, default)
  if not text or text == '' or text == '-' then return default end
  return text
end

-- After a call: the lowest threshold of `text` now crossed that had not fired (nil if
-- none), and how many have fired. One alert per crossing: `fired` only grows until the
-- quota or budget is raised or renewed (the writer of that resets it). Most calls are
-- above the highest threshold: one number read, the list is not parsed.
local function th_cross(text, fired, left, total)
  if not text or text == 'n' then return nil, fired end
  local top = tonumber(string.match(text, '^[^,]+'))
  if not top or left > top * total then return nil, fired end
  local n, at = 0, nil
  for t in string.gmatch(text, '[^,]+') do
    n = n + 1
    if left <= tonumber(t) * total then at = n end
  end
  if at and at > fired then
    local i = 0
    for t in string.gmatch(text, '[^,]+') do
      i = i + 1
      if i == at then return t, at end
    end
  end
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
local function lim_cross(l, text)
  if l.b <= 0 then return nil end
  local th
  th, l.tf = th_cross(text, l.tf or 0, l.b - l.s - l.r, l.b)
  if not th then return nil end
  return {tonumber(th) == 0 and 'budget.exhausted' or 'budget.low', th,
          money_text(math.max(l.b - l.s - l.r, 0)), money_text(l.b)}
end

-- The states of the levels `wheres` (words of lv) from the budgets hash, one HMGET.
local function lim_load(hash, wheres, out)
  if #wheres == 0 then return out end
  local got = redis.call('HMGET', hash, unpack(wheres))
  for i, where in ipairs(wheres) do out[where] = lim_read(got[i]) end
  return out
end

-- Those of `wheres` that `states` holds, written back to the budgets hash, one HSET.
local function lim_store(hash, wheres, states)
  local args = {}
  for _, where in ipairs(wheres) do
    if states[where] then
      args[#args + 1] = where
      args[#args + 1] = lim_text(states[where])
    end
  end
  if #args > 0 then redis.call('HSET', hash, unpack(args)) end
end
