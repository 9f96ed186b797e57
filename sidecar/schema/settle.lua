-- settle.lua: settle one usage report against the reservation authorize.lua recorded for
-- the call, atomically and at most once, in one round trip.
--
-- Times are in milliseconds; reserved and actual are integer quota units; tokens are
-- counted against the key's tokens-per-minute limit as authorize.lua reads it: GCRA,
-- the record field ta = the µs time at which the tokens reported so far have drained.
--
-- KEYS[1]  record              key record hash k:{tag}:<hash>
-- KEYS[2]  wallet              wallet hash w:{tag} (PAYG balances, field = account id;
--                              quota pools, field = ARGV[5] .. pool id)
-- KEYS[3]  budgets             budgets hash b:{tag} (the levels' limits.lua state)
-- KEYS[4]  reservation         r:{tag}:<hash16>:<reservation id>  as authorize.lua wrote
--                              it, 's' once settled
-- KEYS[5]  events              stream ev:{tag} (see authorize.lua KEYS[4])
-- KEYS[6]  usage_day           hash u:{tag}:d:<day>: fields '<who>:t' tokens and
--                              '<who>:m' money (micro-units) of the settled calls
-- KEYS[7]  usage_hour          hash u:{tag}:h:<hour>: the same per hour
-- ARGV[1]  now                 ms since epoch
-- ARGV[2]  actual              units the call really cost; '' = what it reserved
-- ARGV[3]  tokens              prompt + completion tokens, for tokens per minute / day
-- ARGV[4]  settled_ttl         ms a settled reservation still answers 'already settled'
-- ARGV[5]  pool_prefix         names.POOL_PREFIX (see authorize.lua ARGV[10])
-- ARGV[6]  money               micro-units the call really cost; '' = what it reserved
-- ARGV[7]  day                 number of the budget day now (budget_timezone)
-- ARGV[8]  month               number of the budget month now
-- ARGV[9]  expiry              'c' charge / 'r' release an expired reservation
-- ARGV[10] thresholds          the default alert thresholds (authorize.lua ARGV[16])
-- ARGV[11] usage_days          days of usage history kept; 0: none is written
--
-- Returns {code, reserved, delta, from_wallet, money_reserved, money_actual}
-- code: 0 settled, 1 unknown (or deleted) key, 2 already settled, 3 no such reservation
-- for this key (never made, expired, or another key's). Codes 1-3 write nothing: an
-- expired reservation's money and slots are the expiry policy's (limits.lua lim_now).
-- money_*: what the call held at its levels and what it is charged there (limits.lua).
-- delta = actual - reserved: < 0 refunded (at most what was reserved), > 0 charged extra;
-- from_wallet = units of an extra charge taken from the PAYG wallet.
--
-- Where the delta goes (the rule deploy/README.md documents):
-- * a refund goes back where the reservation was taken from: the key's quota (own, or
--   the shared pool of a rotated key), the subscription cycle if that cycle is still
--   running (a renewed cycle starts at zero: the old one's units are gone), or the PAYG
--   wallet (pu shrinks). An unlimited key's reservation took nothing: nothing goes back.
-- * an extra charge goes where the key's quota is now: standard / org keys qr -= delta,
--   and qr may go below zero (the call was served, so it is owed: the next authorize is
--   refused until quota is added); unlimited keys nothing; subscription keys the cycle
--   (renewed first if it ended, as authorize would), the part beyond the cycle quota
--   from the owner's wallet when PAYG fallback is on (pu grows), else cu passes cq and
--   the next call is refused until the cycle renews.
-- Every type: qu (units used) += delta, floored at zero.
-- An extra charge that makes the quota or a budget cross a threshold appends one event,
-- as authorize.lua does; a refund re-arms nothing (only raising or renewing does).

-- The record whole, one pass over its hash: a small hash is a listpack, where each field
-- an HMGET asks for (present or not) is a scan of it. Sized once for the fields read
-- here (as in authorize.lua), and numbers this code wrote are read as `(v or 0) + 0`.
local f = {id = nil, t = nil, qu = nil, qr = nil, qp = nil, ul = nil, tpm = nil, ta = nil,
           tpd = nil, td = nil, lim = nil, lv = nil, th = nil, org = nil, prj = nil,
           cq = nil, cu = nil, ce = nil, cp = nil, pg = nil, ow = nil, pu = nil, qf = nil}
do
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do f[all[i]] = all[i + 1] end
end
if not f.id then return {1} end
local now, day, month = ARGV[1] + 0, ARGV[7] + 0, ARGV[8] + 0
local held = redis.call('GET', KEYS[4])
if not held or held == 'x' then return {3} end   -- ('x': expired, as older versions wrote)
if held == 's' then return {2} end
-- What it holds at its levels, until its hold ends (then it is the expiry policy's):
-- '<units> <source> <money> <hold end> <levels>' (limits.lua), or '<units> <source>'.
local reserved, source, held_money, hold, levels = string.match(held,
  '^(%d+) (%S+) (%d+) (%d+) (.+)$')
if not reserved then
  local rest
  reserved, source, rest = string.match(held, '^(%d+) (%S+)(.*)$')
  if rest ~= '' then   -- the order older versions wrote: the hold's end last
    held_money, levels, hold = string.match(rest, '^ (%d+) (.-) (%d+)$')
    if not hold then return {3} end
  end
end
reserved = reserved + 0
if hold and now >= hold + 0 then return {3} end

local actual = ARGV[2] == '' and reserved or ARGV[2] + 0
local delta = actual - reserved
local refund = math.max(-delta, 0)
local tokens = ARGV[3] + 0
local from_wallet = 0
local qu = math.max((f.qu or 0) + delta, 0)
local set = {'qu', int(qu)}
local function put(k, v) set[#set + 1] = k; set[#set + 1] = v end

-- Each token takes one step of a tokens limit (see authorize.lua); what is over the
-- limit is owed, and keeps calls refused until it drains. The bound only keeps the sum
-- an exact double (31 years of debt).
local now_us = now * 1000
local function owe(field, limit, tat, period)
  limit = (limit or 0) + 0
  if tokens > 0 and limit > 0 then
    tat = math.max((tat or 0) + 0, now_us) + tokens * math.ceil(period / limit)
    put(field, int(math.min(tat, now_us + 1e15)))
  end
end
owe('ta', f.tpm, f.ta, 60000000)       -- tokens per minute
owe('td', f.tpd, f.td, 86400000000)    -- tokens per day

-- Money held at the key's levels (limits.lua): the reserved amount is released and
-- the actual one spent, in the window running now; slots are given back.
local function alert(typ, level, fields)   -- one event on the tag's stream
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*', 't', typ, 'k', f.id,
             'o', f.org or '', 'p', f.prj or '', 'l', level, unpack(fields))
end
local default_th = ARGV[10]
local key_th = th_text(f.th, default_th)
local money_reserved, money_actual = 0, 0
if held_money then
  money_reserved = held_money + 0
  money_actual = ARGV[6] == '' and money_reserved or ARGV[6] + 0
  local states, above, words = {k = lim_read(f.lim)}, {}, {}
  for flags, where in string.gmatch(levels, '(%a+):(%S+)') do
    words[#words + 1] = {flags, where}
    if where ~= 'k' then above[#above + 1] = where end
  end
  lim_load(KEYS[3], above, states)
  for _, word in ipairs(words) do
    local flags, where = word[1], word[2]
    local l = states[where]
    if l then   -- (a level whose limits were removed since holds nothing any more)
      lim_now(l, now, day, month, ARGV[9])
      local b = string.find(flags, 'b', 1, true) and money_reserved or 0
      hold_take(l, hold + 0, b, string.find(flags, 'c', 1, true) and 1 or 0)
      if b > 0 then
        l.s = l.s + money_actual
        local crossed = lim_cross(l, where == 'k' and key_th or th_text(l.th, default_th))
        if crossed then
          alert(crossed[1], string.sub(where, 1, 1),
                {'th', crossed[2], 'r', crossed[3], 'lim', crossed[4]})
        end
      end
      if where == 'k' then put('lim', lim_pack(l)) end
    end
  end
  lim_store(KEYS[3], above, states)
end

local q_left, q_total   -- the quota after an extra charge, for its thresholds
local qf = (f.qf or 0) + 0
if f.t == 'b' then
  local cq, cu = (f.cq or 0) + 0, (f.cu or 0) + 0
  local ce, cp = (f.ce or 0) + 0, (f.cp or 0) + 0
  local same_cycle = source == 'c' .. ce
  if cp > 0 and now >= ce then
    ce = ce + (math.floor((now - ce) / cp) + 1) * cp
    cu = 0
    qf = 0
    same_cycle = false
    put('ce', int(ce))
  end
  if delta > 0 then
    if f.pg == '1' and f.ow and cu + delta > cq then
      from_wallet = cu + delta - math.max(cq, cu)
      redis.call('HINCRBY', KEYS[2], f.ow, int(-from_wallet))
      put('pu', int((f.pu or 0) + from_wallet))
    end
    cu = cu + delta - from_wallet
    if f.ul ~= '1' then q_left, q_total = cq - cu, cq end
  elseif source == 'w' and f.ow then
    redis.call('HINCRBY', KEYS[2], f.ow, int(refund))
    put('pu', int(math.max((f.pu or 0) - refund, 0)))
  elseif same_cycle then
    cu = math.max(cu - refund, 0)
  end
  put('cu', int(cu))
elseif f.ul ~= '1' and (delta > 0 or (refund > 0 and source == 'q')) then
  local left
  if f.qp then   -- a rotated key's shared quota pool (see authorize.lua)
    left = redis.call('HINCRBY', KEYS[2], ARGV[5] .. f.qp, int(-delta))
  else
    left = redis.call('HINCRBY', KEYS[1], 'qr', int(-delta))
  end
  if delta > 0 then q_left, q_total = left, left + qu end
end
if q_left and q_total > 0 then
  local th
  th, qf = th_cross(key_th, qf, q_left, q_total)
  if th then
    alert(tonumber(th) == 0 and 'quota.exhausted' or 'quota.low', 'k',
          {'th', th, 'r', int(math.max(q_left, 0)), 'lim', int(q_total)})
  end
end
if qf ~= (f.qf or 0) + 0 then put('qf', int(qf)) end

-- Usage history (authorize.lua counts the requests): tokens and money, per bucket and
-- holder; a bucket this call is the first to write gets its time to live here.
local usage_days = ARGV[11] + 0
local spend = ARGV[6] == '' and money_actual or ARGV[6] + 0
if usage_days > 0 and (tokens > 0 or spend > 0) then
  local holders = {f.id}
  for where in string.gmatch(f.lv or '', '%S+') do holders[#holders + 1] = where end
  local tokens_text, spend_text = int(tokens), int(spend)
  for i = 6, 7 do   -- the day's bucket (kept usage_days), the hour's (48 hours)
    local bucket = KEYS[i]
    for j = 1, #holders do
      local who = holders[j]
      if tokens > 0 then redis.call('HINCRBY', bucket, who .. ':t', tokens_text) end
      if spend > 0 then redis.call('HINCRBY', bucket, who .. ':m', spend_text) end
    end
    if redis.call('TTL', bucket) == -1 then
      redis.call('EXPIRE', bucket, i == 6 and int((usage_days + 1) * 86400) or '176400')
    end
  end
end

redis.call('HSET', KEYS[1], unpack(set))
redis.call('SET', KEYS[4], 's', 'PX', ARGV[4])
return {0, reserved, delta, from_wallet, money_reserved, money_actual}
