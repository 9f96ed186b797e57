-- limits.lua: the budget and concurrency state of one level, shared by authorize.lua,
-- settle.lua and set_limits.lua (schema/scripts.py sends it in front of each: Redis
-- scripts cannot include).
--
-- A level is the key itself or one above it (its project, organization, member). Its
-- state, in words (schema/limits.py is the Python side of both forms below):
--   budget, spent, reserved: money in micro-units (budget 0 = none); window: the day or
--   month number the spent belongs to (0 for period t, total); period t / d / m;
--   max_conc: calls in flight at most (0 = none); in_flight; observe: '-' or letters of
--   the limits only observed, never enforced: b budget, c concurrency, q quota,
--   r requests, t tokens; thresholds: the fractions of the budget left that raise an
--   alert, highest first ('0.2,0.05,0'), '-' the deployment's default
--   (alert_thresholds, passed in ARGV), 'n' none; fired: how many of them fired since
--   the budget was last set or its period rolled over; holds: what the reservations not
--   yet settled hold, grouped by when they expire, (end ms, money, slots) ends
--   ascending; reserved and in_flight are their sums.
-- Stored packed, the key's own in its record's field 'lim', a level above it in its field
-- of the tag's budgets hash (named by the record's 'lv': 'p:<id> o:<id> m:<id>'); both
-- are read and written by every call of the key: struct LIM_PACKED, then the holds as
-- LIM_HOLD each. Lua patterns and string.format made a text form cost ~40k instructions
-- a call for the key's own state (callgrind); struct reads and writes it in C. It
-- starts with the byte 1. States written before were text, and are read as such until
-- their next write packs them: '<budget> <spent> <reserved> <window> <period>
-- <max_conc> <in_flight> <observe> <thresholds> <fired> <holds>', holds '-' none, else
-- '<end ms>:<money>:<slots>,...'; older still, 8 words read as '- 0 -', 10 words hold
-- their reserved and in-flight in one hold that has ended (resolved by the policy at
-- the next call).
-- In Lua a state is a table, its holds a flat array {end, money, slots, end, ...}.
-- A reservation joins the hold that ends at its expiry rounded up to a grid of a
-- quarter of the reservation TTL (hold_end), so a level has about five holds at most,
-- whatever the traffic: expiry costs no command and no index of its own. When a hold
-- ends (read by lim_now), its money is charged (policy 'c') or released ('r') and its
-- slots come back.
--
-- A reservation that holds money or a slot is '<units> <source> <money> <hold end>
-- <levels>' (authorize.lua), levels = words '<flags>:<where>', flags b (money reserved)
-- and / or c (a slot taken), where = 'k' (the record's lim) or a budgets hash field (older
-- versions wrote the hold's end last: settle.lua reads both). Its report (settle.lua) is
-- taken until its hold ends.

-- A whole number as the text redis.call is given (every script here): redis.call turns
-- a Lua number into text with printf's '%.17g', ~2,700 instructions a number (callgrind);
-- '%d' costs a fraction of that.
local function int(n) return string.format('%d', n) end

local LIM_PACKED = '<Bi8i8i8i4c1i4i4BHss'   -- 1, b, s, r, w, p, mc, fl, tf, #holds, ob, th
local LIM_HOLD = 'i8i8i4'                   -- end ms, money, slots

local function lim_read(v)
  if not v then return nil end
  if string.byte(v, 1) == 1 then
    -- A cut value makes struct raise: read as none, as unreadable text is (pcall).
    local ok, _, b, s, r, w, p, mc, fl, tf, n, ob, th, at = pcall(struct.unpack,
                                                                 LIM_PACKED, v)
    if not ok or #v ~= at - 1 + n * 20 then return nil end   -- 20: LIM_HOLD's bytes
    local h = {}
    if n > 0 then
      h = {struct.unpack('<' .. string.rep(LIM_HOLD, n), v, at)}
      h[#h] = nil   -- unpack's last value: the position after
    end
    return {b = b, s = s, r = r, w = w, p = p, mc = mc, fl = fl, ob = ob, th = th,
            tf = tf, h = h}
  end
  local b, s, r, w, p, mc, fl, ob, rest = string.match(v,
    '^(%d+) (%d+) (%d+) (%d+) (%a) (%d+) (%d+) (%S+)(.*)$')
  if not b then return nil end
  local th, tf, hs = string.match(rest, '^ (%S+) (%d+) ?(%S*)$')
  local l = {b = tonumber(b), s = tonumber(s), r = tonumber(r), w = tonumber(w), p = p,
             mc = tonumber(mc), fl = tonumber(fl), ob = ob, th = th or '-',
             tf = tonumber(tf or '0'), h = {}}
  if hs and hs ~= '' and hs ~= '-' then
    for e, m, c in string.gmatch(hs, '(%d+):(%d+):(%d+)') do
      local h = l.h
      h[#h + 1] = tonumber(e); h[#h + 1] = tonumber(m); h[#h + 1] = tonumber(c)
    end
  elseif (not hs or hs == '') and (l.r > 0 or l.fl > 0) then
    l.h = {0, l.r, l.fl}   -- an older form: what it held, in a hold that has ended
  end
  return l
end

-- The stored form.
local function lim_pack(l)
  local h = l.h
  return struct.pack(LIM_PACKED .. string.rep(LIM_HOLD, #h / 3), 1, l.b, l.s, l.r, l.w,
                     l.p, l.mc, l.fl, l.tf or 0, #h / 3, l.ob, l.th or '-', unpack(h))
end

-- The level as a call at `now` sees it: a new day or month starts with nothing spent
-- (and its alerts re-armed); a hold that has ended is charged (policy 'c') or released
-- ('r') into the window running now, and its slots come back. Holds end in order, so
-- only the first is looked at, mostly once.
local function lim_now(l, now, day, month, policy)
  local w = (l.p == 'd' and day) or (l.p == 'm' and month) or 0
  if l.w ~= w then l.s = 0; l.w = w; l.tf = 0 end
  local h = l.h
  if h[1] == nil or h[1] > now then return end
  local i = 1
  while h[i] ~= nil and h[i] <= now do
    local m, c = h[i + 1], h[i + 2]
    l.r, l.fl = math.max(l.r - m, 0), math.max(l.fl - c, 0)
    if policy == 'c' then l.s = l.s + m end
    i = i + 3
  end
  local left = {}
  for j = i, #h do left[#left + 1] = h[j] end
  l.h = left
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
  local h = l.h
  local n = #h
  if n > 0 and h[n - 2] >= e then
    h[n - 1], h[n] = h[n - 1] + money, h[n] + slots
  else
    h[n + 1], h[n + 2], h[n + 3] = e, money, slots
  end
end

-- A settled reservation leaves its hold: the first that ends at `e` or later.
local function hold_take(l, e, money, slots)
  local h = l.h
  for i = 1, #h, 3 do
    if h[i] >= e then
      local m, c = math.min(h[i + 1], money), math.min(h[i + 2], slots)
      h[i + 1], h[i + 2] = h[i + 1] - m, h[i + 2] - c
      l.r, l.fl = math.max(l.r - m, 0), math.max(l.fl - c, 0)
      if h[i + 1] == 0 and h[i + 2] == 0 then   -- an empty hold is dropped
        table.remove(h, i + 2); table.remove(h, i + 1); table.remove(h, i)
      end
      return
    end
  end
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
      args[#args + 1] = lim_pack(states[where])
    end
  end
  if #args > 0 then redis.call('HSET', hash, unpack(args)) end
end
