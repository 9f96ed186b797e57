-- authorize.lua: the whole decision for one call, atomically, in one round trip.
--
-- Times are in milliseconds (rate limit state in microseconds, see below); quota and
-- cost are integer units; rate limits are per minute, by GCRA.
--
-- KEYS[1]  record              key record hash k:{tag}:<hash>
-- KEYS[2]  wallet              wallet hash w:{tag} (PAYG balances, field = account id;
--                              and quota pools, field = ARGV[10] .. pool id)
-- KEYS[3]  reservation         r:{tag}:<hash16>:<reservation id>; only when /settle is
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
-- ARGV[11] reservation_ttl     ms (only with KEYS[3])
--
-- Returns {code, key_id, type, org, project, rpm, rpm_remaining, tpm, tpm_remaining,
--          rpm_reset_ms, tpm_reset_ms, retry_ms}
-- ({code} alone for codes 1..7: refused before the limits are read)
-- reset: until the limit is whole again; retry (429 only): until the next call fits.
-- code: 0 allow, 1 unknown key, 2 disabled, 3 expired, 4 admin key, 5 ip, 6 model,
--       7 permission, 8 quota, 9 requests/min, 10 tokens/min.  Order = the contract's table.
-- Nothing is written unless the code is 0. An allowed call with KEYS[3] also records its
-- reservation there, '<units> <source>', for settle.lua: source 'q' the key's quota (own
-- or shared pool), 'u' nothing (unlimited), 'c<cycle end ms>' a subscription cycle,
-- 'w' the PAYG wallet.

local f = redis.call('HMGET', KEYS[1],
  'id', 't', 'st', 'ex', 'ips', 'm', 'pm', 'sc',          -- 1..8
  'ul', 'qr', 'rpm', 'ra', 'tpm', 'ta',                  -- 9..14
  'cq', 'cu', 'ce', 'cp', 'pg', 'ow', 'org', 'prj',      -- 15..22
  'qu', 'n', 'pu', 'qp')                                  -- 23..26
local id = f[1]
if not id then return {1} end
local now = tonumber(ARGV[1])

if f[3] ~= 'a' then return {2} end
local ex = tonumber(f[4] or '0')
if ex > 0 and now >= ex then return {3} end
if f[2] == 'a' then return {4} end

-- Allowed networks: 'hex/bits,...'; compare whole hex digits, then the leftover bits.
local ips = f[5]
if ips then
  local ip, ok = ARGV[3], false
  if ip ~= '' then
    for net, bits in string.gmatch(ips, '(%x+)/(%d+)') do
      bits = tonumber(bits)
      local whole = math.floor(bits / 4)
      if string.sub(ip, 1, whole) == string.sub(net, 1, whole) then
        local rest = bits - whole * 4
        if rest == 0 then ok = true break end
        local div = 2 ^ (4 - rest)
        local a = tonumber(string.sub(ip, whole + 1, whole + 1), 16)
        local b = tonumber(string.sub(net, whole + 1, whole + 1), 16)
        if math.floor(a / div) == math.floor(b / div) then ok = true break end
      end
    end
  end
  if not ok then return {5} end
end

-- Model whitelist ',a,b,'; a read call may name no model, a write call must. A model
-- with a comma would match across entries ('a,b' in ',a,b,'): no listed model has one.
local models, model, write = f[6], ARGV[5], ARGV[8] == '1'
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
local pm = f[7]
if pm == 'ro' and write then return {7} end
if pm == 'r' then
  local sc = f[8] or ''
  if string.find(ARGV[6], ',', 1, true)   -- a path with a comma, as with models above
      or not (string.find(sc, ',' .. ARGV[6] .. ',', 1, true)
      or (ARGV[7] ~= '' and string.find(sc, ',' .. ARGV[7] .. ',', 1, true))) then
    return {7}
  end
end

-- Rate limits by GCRA (generic cell rate algorithm): per limit one stored number, the
-- theoretical arrival time (tat, in µs) at which the key's use so far has drained. A
-- limit of L a minute lets one unit (a request, a token) through every step = 60 s / L
-- and at most L at once: a unit fits while tat - now <= (L - 1) * step. So no clock
-- boundary lets a burst exceed L; in any d seconds at most L + d * L / 60 units pass.
-- µs keep it exact in doubles (now * 1000 < 2^53 until the year 2255); the step is
-- rounded up to a whole µs, so the burst is exactly L and the rate at most L a minute.
local now_us = now * 1000
local function gcra(limit, tat)   -- step, level (µs still draining), units left, wait µs
  if limit <= 0 then return 0, 0, 0, 0 end
  local step = math.ceil(60000000 / limit)
  local level = math.max(tonumber(tat or '0') - now_us, 0)
  local room = limit * step - level
  return step, level, math.max(math.floor(room / step), 0), step - room
end
local rpm, tpm = tonumber(f[11] or '0'), tonumber(f[13] or '0')
local r_step, r_level, r_left, r_wait = gcra(rpm, f[12])
local _, t_level, t_left, t_wait = gcra(tpm, f[14])
local function ms(us) return math.ceil(us / 1000) end
local function answer(code, used, wait)   -- used: 1 when this call takes a request
  return {code, id, f[2], f[21] or '', f[22] or '', rpm, math.max(r_left - used, 0),
          tpm, t_left, ms(r_level + used * r_step), ms(t_level), ms(wait or 0)}
end

-- Quota: subscription cycle (renewed here, atomically), PAYG fallback, or own quota.
local cost, typ = tonumber(ARGV[2]), f[2]
-- A rotated key and its successor share one quota pool in the wallet hash (same tag),
-- so the grace window does not double the remaining quota.
local pool = f[26] and (ARGV[10] .. f[26])
local qr = tonumber((pool and redis.call('HGET', KEYS[2], pool)) or f[10] or '0')
local cq, cu = tonumber(f[15] or '0'), tonumber(f[16] or '0')
local ce, cp = tonumber(f[17] or '0'), tonumber(f[18] or '0')
local pay_wallet = false
if typ == 'b' then
  if cp > 0 and now >= ce then   -- the cycle renewed: skip whole periods, start at zero
    ce = ce + (math.floor((now - ce) / cp) + 1) * cp
    cu = 0
  end
  if f[9] ~= '1' and cu + cost > cq then   -- an unlimited key only counts its use
    local balance = 0
    if f[19] == '1' and f[20] then
      balance = tonumber(redis.call('HGET', KEYS[2], f[20]) or '0')
    end
    if balance < cost then return answer(8, 0) end
    pay_wallet = true
  end
elseif f[9] ~= '1' and qr < cost then
  return answer(8, 0)
end

-- Retry after: when the next call would be allowed, so past both limits' waits.
if rpm > 0 and r_wait > 0 then return answer(9, 0, math.max(r_wait, t_wait)) end
if tpm > 0 and t_wait > 0 then return answer(10, 0, t_wait) end

-- Allowed: reserve, count, record recent activity, all in one HSET. Tokens are counted
-- when the call's usage is reported (settle.lua moves ta).
local set = {'la', ARGV[1], 'lip', ARGV[4], 'lm', model,
             'qu', tonumber(f[23] or '0') + cost, 'n', tonumber(f[24] or '0') + 1}
local function put(k, v) set[#set + 1] = k; set[#set + 1] = v end
if rpm > 0 then put('ra', now_us + r_level + r_step) end
if typ == 'b' then
  put('ce', ce)
  if pay_wallet then
    redis.call('HINCRBY', KEYS[2], f[20], -cost)
    put('cu', cu)
    put('pu', tonumber(f[25] or '0') + cost)
  else
    put('cu', cu + cost)
  end
elseif f[9] ~= '1' then
  if pool then
    redis.call('HINCRBY', KEYS[2], pool, -cost)
  else
    put('qr', qr - cost)
  end
end
redis.call('HSET', KEYS[1], unpack(set))
if KEYS[3] then
  local source = (typ ~= 'b' and (f[9] == '1' and 'u' or 'q'))
                 or (pay_wallet and 'w') or ('c' .. ce)
  redis.call('SET', KEYS[3], ARGV[2] .. ' ' .. source, 'PX', ARGV[11])
end
return answer(0, 1)
