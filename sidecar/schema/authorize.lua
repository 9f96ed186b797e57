-- authorize.lua: the whole decision for one call, atomically, in one round trip.
--
-- Times are in milliseconds (rate limit state in microseconds, see below); quota and
-- cost are integer units; rate limits are per minute, by GCRA.
--
-- KEYS[1]  record              key record hash k:{tag}:<hash>
-- KEYS[2]  wallet              wallet hash w:{tag} (PAYG balances, field = account id;
--                              and quota pools, field = ARGV[10] .. pool id)
-- KEYS[3]  budgets             budgets hash b:{tag}: the limits.lua state of the levels
--                              above the key, field = a word of the record's lv
-- KEYS[4]  events              stream ev:{tag}: threshold crossings and key.expired
--                              (schema/events.py), appended only when one happens
-- KEYS[5]  usage_day           hash u:{tag}:d:<day>: usage history, field '<who>:n'
--                              requests (who = key id or a word of the record's lv)
-- KEYS[6]  usage_hour          hash u:{tag}:h:<hour>: the same per hour
-- KEYS[7]  reservation         r:{tag}:<hash16>:<reservation id>; only when /settle is
--                              on (without it, no reservation is kept)
-- ARGV[1]  now                 ms since epoch
-- ARGV[2]  cost                units this call reserves
-- ARGV[3]  ip_hex              client ip, 32 hex digits (IPv4 mapped into IPv6), ''
--                              if unknown
-- ARGV[4]  ip                  client ip, printable, for recent activity
-- ARGV[5]  model               '' when the call names none
-- ARGV[6]  scope               e.g. chat.completions:write
-- ARGV[7]  granting            a scope that also grants ARGV[6] ('' if none)
-- ARGV[8]  write               '1' for a write call
-- ARGV[9]  uncertain           '1': the model's sources disagree or the body could not
--                              be read whole (request.py read_model)
-- ARGV[10] pool_prefix         names.POOL_PREFIX: the wallet field of the record's
--                              quota pool 'qp' is ARGV[10] .. qp (names.pool_field)
-- ARGV[11] reservation_ttl     ms a reservation (KEYS[7]) awaits its report; 0 without
-- ARGV[12] money               micro-units the call may cost at most; -1: the model has
--                              no price (refused where a budget applies)
-- ARGV[13] day                 number of the budget day now (budget_timezone)
-- ARGV[14] month               number of the budget month now
-- ARGV[15] expiry              'c' charge / 'r' release an expired reservation
-- ARGV[16] thresholds          the default alert thresholds ('0.2,0.05,0', 'n' none):
--                              for a key or level whose own are '-' (limits.lua)
-- ARGV[17] usage_days          days of usage history kept; 0: none is written
--
-- Returns {code, key_id, type, org, project, rpm, rpm_remaining, tpm, tpm_remaining,
--          rpm_reset_ms, tpm_reset_ms, retry_ms, level, observed}
-- ({code} alone for codes 1..7: refused before the limits are read)
-- reset: until the limit is whole again; retry (429 only): until the next call fits.
-- The request and token limits shown (rpm..tpm_reset_ms) are the tightest of the
-- per-minute and per-day ones. level: where a budget or concurrency denial comes from
-- ('k' the key, else its budgets hash field). observed: ',<code>,...' of the denials an
-- observe-only limit would have made ('' none).
-- code: 0 allow, 1 unknown key, 2 disabled, 3 expired, 4 admin key, 5 ip, 6 model,
--       7 permission, 8 quota, 9 requests/min, 10 tokens/min, 11 budget,
--       12 concurrency, 13 model not priced, 14 requests/day, 15 tokens/day.
-- Nothing is written unless the code is 0, except alerts: the first refusal of an expired
-- key appends key.expired and marks the record (xn = the expiry it was noticed for).
-- An allowed call that makes the key's quota (left = qr or its pool, of qr + qu; a
-- subscription's cq - cu of cq) or a budget (left = budget - spent - reserved) cross a
-- threshold appends one event (quota.low / quota.exhausted, budget.low / .exhausted).
-- An allowed call with KEYS[7] also records its
-- reservation there, '<units> <source>' (limits.lua: more when it holds money or a
-- slot), for settle.lua: source 'q' the key's quota (own or shared pool), 'u' nothing
-- (unlimited), 'c<cycle end ms>' a subscription cycle, 'w' the PAYG wallet.

-- Library functions as locals (a global's lookup costs more than a local's). Numbers
-- the scripts wrote (the record's, the sidecar's ARGV) are read as `(v or 0) + 0`, 0 when
-- absent: Lua's tonumber() parses a string twice (lua_isnumber, then lua_tonumber: two
-- strtod), arithmetic once, and inline, not in a function of ours (a Lua call costs
-- more than the arithmetic). Numbers go to redis.call as int(n) (limits.lua).
local tonumber, max, floor, ceil = tonumber, math.max, math.floor, math.ceil

-- The record whole, one pass over its hash: a small hash is a listpack, where each field
-- an HMGET asks for (present or not) is a scan of it.
-- Sized once for a record's usual fields (a constructor's named slots size the table;
-- filled field by field, it would be rebuilt at 1, 2, 4, 8 and 16 entries).
local f = {id = nil, st = nil, t = nil, ex = nil, ul = nil, qr = nil, qu = nil, pm = nil,
           rpm = nil, n = nil, la = nil, lip = nil, lm = nil, ra = nil, nm = nil,
           ca = nil, cb = nil, org = nil, prj = nil, lv = nil, lim = nil}
do
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do f[all[i]] = all[i + 1] end
end
local id = f.id
if not id then return {1} end
local now = ARGV[1] + 0

if f.st ~= 'a' then return {2} end
local ex = (f.ex or 0) + 0
local function alert(typ, level, fields)   -- one event on the tag's stream
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 't', typ, 'k', id,
             'o', f.org or '', 'p', f.prj or '', 'l', level, unpack(fields or {}))
end
if ex > 0 and now >= ex then
  if f.xn ~= f.ex then   -- noticed once per expiry: a small write on the first refusal
    redis.call('HSET', KEYS[1], 'xn', f.ex)
    alert('key.expired', 'k', {'why', 'expired'})
  end
  return {3}
end
if f.t == 'a' then return {4} end

-- Allowed networks: 'hex/bits,...'; compare whole hex digits, then the leftover bits.
local ips = f.ips
if ips then
  local ip, ok = ARGV[3], false
  if ip ~= '' then
    for net, bits in string.gmatch(ips, '(%x+)/(%d+)') do
      bits = tonumber(bits)
      local whole = floor(bits / 4)
      if string.sub(ip, 1, whole) == string.sub(net, 1, whole) then
        local rest = bits - whole * 4
        if rest == 0 then ok = true break end
        local div = 2 ^ (4 - rest)
        local a = tonumber(string.sub(ip, whole + 1, whole + 1), 16)
        local b = tonumber(string.sub(net, whole + 1, whole + 1), 16)
        if floor(a / div) == floor(b / div) then ok = true break end
      end
    end
  end
  if not ok then return {5} end
end

-- Model whitelist ',a,b,'; a read call may name no model, a write call must. A model
-- with a comma would match across entries ('a,b' in ',a,b,'): no listed model has one.
local models, model, write = f.m, ARGV[5], ARGV[8] == '1'
if models then
  if model == '' then
    if write then return {6} end
  elseif string.find(model, ',', 1, true)
      or not string.find(models, ',' .. model .. ',', 1, true)
      or (write and ARGV[9] == '1') then
    return {6}
  end
end

-- Permission modes: 'ro' read only, 'r' restricted to scopes ',s1,s2,'.
local pm = f.pm
if pm == 'ro' and write then return {7} end
if pm == 'r' then
  local sc = f.sc or ''
  if string.find(ARGV[6], ',', 1, true)   -- a path with a comma, as with models above
      or not (string.find(sc, ',' .. ARGV[6] .. ',', 1, true)
      or (ARGV[7] ~= '' and string.find(sc, ',' .. ARGV[7] .. ',', 1, true))) then
    return {7}
  end
end

-- Observe-only limits (limits.lua): a denial they would make is reported, not made.
local own = lim_read(f.lim)
local observe = own and own.ob or '-'
local observed = ''
local function enforced(code, letter, ob)   -- false: only observed (and reported)
  if string.find(ob or observe, letter, 1, true) then
    observed = observed .. ',' .. code
    return false
  end
  return true
end

-- Rate limits by GCRA (generic cell rate algorithm): per limit one stored number, the
-- theoretical arrival time (tat, in µs) at which the key's use so far has drained. A
-- limit of L a period lets one unit (a request, a token) through every step = period / L
-- and at most L at once: a unit fits while tat - now <= (L - 1) * step. So no clock
-- boundary lets a burst exceed L; in any d seconds at most L + d * L / period units pass.
-- µs keep it exact in doubles (now * 1000 < 2^53 until the year 2255); the step is
-- rounded up to a whole µs, so the burst is exactly L and the rate at most L a period.
local MINUTE, DAY = 60000000, 86400000000
local now_us = now * 1000
local function gcra(limit, tat, period, at)   -- step, level (µs draining), units left, wait µs
  if limit <= 0 then return 0, 0, 0, 0 end
  local step = ceil(period / limit)
  local level = max((tat or 0) - at, 0)
  local room = limit * step - level
  return step, level, max(floor(room / step), 0), step - room
end
local rpm, tpm = (f.rpm or 0) + 0, (f.tpm or 0) + 0
local rpd, tpd = (f.rpd or 0) + 0, (f.tpd or 0) + 0
local r_step, r_level, r_left, r_wait = gcra(rpm, f.ra, MINUTE, now_us)
local _, t_level, t_left, t_wait = gcra(tpm, f.ta, MINUTE, now_us)
local rd_step, rd_level, rd_left, rd_wait = gcra(rpd, f.rd, DAY, now_us)
local _, td_level, td_left, td_wait = gcra(tpd, f.td, DAY, now_us)
-- The limits shown, per limit kind the one with the least left: limit, left, reset µs
-- (and the request limit's step, which a call that takes a request adds to its reset).
-- Chosen here, not in answer(): a local a function uses is an object Redis's Lua
-- allocates on every call of the script (an upvalue, ~800 instructions), so answer()
-- uses these seven, not the sixteen they come from.
local rl, rleft, rreset, rstep = rpm, r_left, r_level, r_step
if rpd > 0 and (rpm <= 0 or rd_left < r_left) then
  rl, rleft, rreset, rstep = rpd, rd_left, rd_level, rd_step
end
local tl, tleft, treset = tpm, t_left, t_level
if tpd > 0 and (tpm <= 0 or td_left < t_left) then tl, tleft, treset = tpd, td_left, td_level end
local level = ''
local function answer(code, used, wait)   -- used: 1 when this call takes a request
  return {code, id, f.t, f.org or '', f.prj or '', rl, max(rleft - used, 0), tl, tleft,
          ceil((rreset + used * rstep) / 1000), ceil(treset / 1000),
          ceil((wait or 0) / 1000), level, observed}
end

-- Quota: subscription cycle (renewed here, atomically), PAYG fallback, or own quota.
local cost, typ = ARGV[2] + 0, f.t
-- A rotated key and its successor share one quota pool in the wallet hash (same tag),
-- so the grace window does not double the remaining quota.
local pool = f.qp and (ARGV[10] .. f.qp)
local qr = ((pool and redis.call('HGET', KEYS[2], pool)) or f.qr or 0) + 0
local cq, cu = (f.cq or 0) + 0, (f.cu or 0) + 0
local ce, cp = (f.ce or 0) + 0, (f.cp or 0) + 0
local pay_wallet = false
local qf = (f.qf or 0) + 0   -- quota thresholds fired (re-armed when raised)
if typ == 'b' then
  if cp > 0 and now >= ce then   -- the cycle renewed: skip whole periods, start at zero
    ce = ce + (floor((now - ce) / cp) + 1) * cp
    cu = 0
    qf = 0
  end
  if f.ul ~= '1' and cu + cost > cq then   -- an unlimited key only counts its use
    local balance = 0
    if f.pg == '1' and f.ow then
      balance = (redis.call('HGET', KEYS[2], f.ow) or 0) + 0
    end
    if balance < cost then
      if enforced(8, 'q') then return answer(8, 0) end
    else
      pay_wallet = true
    end
  end
elseif f.ul ~= '1' and qr < cost and enforced(8, 'q') then
  return answer(8, 0)
end

-- Retry after: when the next call would be allowed, so past every limit's wait.
local wait_all = max(0, r_wait, t_wait, rd_wait, td_wait)
if rpm > 0 and r_wait > 0 and enforced(9, 'r') then return answer(9, 0, wait_all) end
if rpd > 0 and rd_wait > 0 and enforced(14, 'r') then return answer(14, 0, wait_all) end
if tpm > 0 and t_wait > 0 and enforced(10, 't') then return answer(10, 0, wait_all) end
if tpd > 0 and td_wait > 0 and enforced(15, 't') then return answer(15, 0, wait_all) end

-- Budgets and concurrency, at the key and every level above it (limits.lua): all are
-- checked before anything is written, so a refused call reserves nothing anywhere.
-- Concurrency is counted only with a reservation (KEYS[7]): its settle ends the call.
local money, day, month = ARGV[12] + 0, ARGV[13] + 0, ARGV[14] + 0
local held = {}                       -- {where, state} of the levels with limits
local above = {}                      -- the words of lv: the levels above the key
if f.lv then
  for where in string.gmatch(f.lv, '%S+') do above[#above + 1] = where end
end
if own then held[1] = {'k', own} end
-- The levels' states; a key with no level above it reads and writes no budgets hash
-- (`above` is empty then, and so are the states).
local states = above
if #above > 0 then states = lim_load(KEYS[3], above, {}) end
for i = 1, #above do
  local where = above[i]
  if states[where] then held[#held + 1] = {where, states[where]} end
end
local slots = KEYS[7] ~= nil
local default_th = ARGV[16]
local key_th = th_text(f.th, default_th)
for i = 1, #held do
  local h = held[i]
  local l = h[2]
  lim_now(l, now, day, month, ARGV[15])
  level = h[1]
  if l.b > 0 and money < 0 and enforced(13, 'b', l.ob) then return answer(13, 0) end
  if l.b > 0 and money > 0 and l.s + l.r + money > l.b and enforced(11, 'b', l.ob) then
    return answer(11, 0)
  end
  if slots and l.mc > 0 and l.fl >= l.mc and enforced(12, 'c', l.ob) then
    return answer(12, 0)
  end
end
level = ''

-- Allowed: reserve, count, record recent activity, all in one HSET. Tokens are counted
-- when the call's usage is reported (settle.lua moves ta and td). Recent activity is
-- written when it changes, its time to the second: a busy key's calls leave it alone.
local set = {'qu', int((f.qu or 0) + cost), 'n', int((f.n or 0) + 1)}
local function put(k, v) set[#set + 1] = k; set[#set + 1] = v end
if now - (f.la or 0) >= 1000 then put('la', ARGV[1]) end
if f.lip ~= ARGV[4] then put('lip', ARGV[4]) end
if f.lm ~= model then put('lm', model) end
if rpm > 0 then put('ra', int(now_us + r_level + r_step)) end
if rpd > 0 then put('rd', int(now_us + rd_level + rd_step)) end
local q_left, q_total   -- the quota after this call, for its thresholds
if typ == 'b' then
  put('ce', int(ce))
  if not pay_wallet and f.ul ~= '1' then q_left, q_total = cq - cu - cost, cq end
  if pay_wallet then
    redis.call('HINCRBY', KEYS[2], f.ow, int(-cost))
    put('cu', int(cu))
    put('pu', int((f.pu or 0) + cost))
  else
    put('cu', int(cu + cost))
  end
elseif f.ul ~= '1' then
  if pool then
    redis.call('HINCRBY', KEYS[2], pool, int(-cost))
  else
    put('qr', int(qr - cost))
  end
  q_left, q_total = qr - cost, qr + (f.qu or 0)
end
if q_left and q_total > 0 then
  local th
  th, qf = th_cross(key_th, qf, q_left, q_total)
  if th then
    alert(tonumber(th) == 0 and 'quota.exhausted' or 'quota.low', 'k',
          {'th', th, 'r', int(max(q_left, 0)), 'lim', int(q_total)})
  end
  if qf ~= (f.qf or 0) + 0 then put('qf', int(qf)) end
end
-- Usage history: one HINCRBY per bucket and holder (the key, each level above it);
-- a bucket's time to live is set when this key first counts in it.
local usage_days = (ARGV[17] or 0) + 0   -- a caller of the 15-ARGV form: off
if usage_days > 0 then
  local requests = id .. ':n'
  for i = 5, 6 do   -- the day's bucket (kept usage_days), the hour's (48 hours)
    local bucket = KEYS[i]
    if redis.call('HINCRBY', bucket, requests, '1') == 1 then
      redis.call('EXPIRE', bucket, i == 5 and int((usage_days + 1) * 86400) or '176400')
    end
    for j = 1, #above do redis.call('HINCRBY', bucket, above[j] .. ':n', '1') end
  end
end
-- Each level with limits holds the money (spent at once without a reservation to
-- settle) and a slot, in the hold its reservation expires with (limits.lua); the
-- reservation names what it holds and where, for settle.
local ttl = ARGV[11] + 0
local hold = slots and hold_end(now, ttl)
local words = {}
for i = 1, #held do
  local h = held[i]
  local where, l = h[1], h[2]
  local b = (l.b > 0 and money > 0) and money or 0
  local c = (slots and l.mc > 0) and 1 or 0
  if slots and (b > 0 or c > 0) then
    hold_add(l, hold, b, c)
    words[#words + 1] = (b > 0 and 'b' or '') .. (c > 0 and 'c' or '') .. ':' .. where
  elseif not slots then
    l.s = l.s + b
  end
  local crossed = lim_cross(l, where == 'k' and key_th or th_text(l.th, default_th))
  if crossed then
    alert(crossed[1], string.sub(where, 1, 1),
          {'th', crossed[2], 'r', crossed[3], 'lim', crossed[4]})
  end
  if where == 'k' then put('lim', lim_pack(l)) end
end
if #above > 0 then lim_store(KEYS[3], above, states) end
redis.call('HSET', KEYS[1], unpack(set))
if slots then
  local source = (typ ~= 'b' and (f.ul == '1' and 'u' or 'q'))
                 or (pay_wallet and 'w') or ('c' .. ce)
  if #words > 0 then   -- it holds money or a slot until settled or its hold ends
    redis.call('SET', KEYS[7], table.concat({ARGV[2], source, int(max(money, 0)),
               int(hold), table.concat(words, ' ')}, ' '), 'PX', int(hold - now + ttl))
  else
    redis.call('SET', KEYS[7], ARGV[2] .. ' ' .. source, 'PX', ARGV[11])
  end
end
return answer(0, 1)
