-- settle.lua: settle one usage report against the reservation authorize.lua made,
-- atomically and at most once per request id, in one round trip.
--
-- Times are in milliseconds; reserved and actual are integer quota units; tokens are
-- counted in the key's tokens-per-minute window (window id = floor(now / 60000), the
-- same fixed windows authorize.lua reads from the record fields tw / tc).
--
-- KEYS[1]  key record hash     k:{tag}:<hash>
-- KEYS[2]  wallet hash         w:{tag}             (PAYG balances, field = account id;
--                                                  quota pools, field = 'q:' .. pool id)
-- KEYS[3]  settlement marker   u:{tag}:<hash16>:<request id>
-- ARGV[1]  now                 ms since epoch
-- ARGV[2]  reserved            units authorize reserved for this call
-- ARGV[3]  actual              units the call really cost
-- ARGV[4]  tokens              prompt + completion tokens, for tokens per minute
-- ARGV[5]  marker ttl          ms; a report retried within it is not settled again
--
-- Returns {code, delta, from_wallet}
-- code: 0 settled, 1 unknown (or deleted) key, 2 already settled (nothing written)
-- delta = actual - reserved: < 0 refunded, > 0 charged extra; from_wallet = units of an
-- extra charge taken from the PAYG wallet (subscription keys past their cycle quota).
--
-- Where the delta goes, by key type (the rule deploy/README.md documents):
-- * standard / org, own quota: qr -= delta. An overage may take qr below zero: the call
--   was served, so it is owed, and the next authorize is refused until quota is added.
-- * unlimited: no quota to move; only the used counter qu changes.
-- * subscription: the cycle is renewed first if it ended (as authorize would), then
--   cu += delta. A refund is floored at zero. An extra charge beyond the cycle quota is
--   taken from the owner's wallet when PAYG fallback is on (pu grows), else cu passes
--   cq and the next call is refused until the cycle renews.
-- Every type: qu (units used) += delta, floored at zero.

local f = redis.call('HMGET', KEYS[1],
  'id', 't', 'ul', 'qu', 'tw', 'tc',                      -- 1..6
  'cq', 'cu', 'ce', 'cp', 'pg', 'ow', 'pu', 'qp')         -- 7..14
if not f[1] then return {1} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {2} end

local now = tonumber(ARGV[1])
local delta = tonumber(ARGV[3]) - tonumber(ARGV[2])
local tokens = tonumber(ARGV[4])
local from_wallet = 0
local set = {'qu', math.max(tonumber(f[4] or '0') + delta, 0)}
local function put(k, v) set[#set + 1] = k; set[#set + 1] = v end

if tokens > 0 then
  local win = math.floor(now / 60000)
  local tc = 0
  if tonumber(f[5] or '-1') == win then tc = tonumber(f[6] or '0') end
  put('tw', win)
  put('tc', tc + tokens)
end

if f[2] == 'b' then
  local cq, cu = tonumber(f[7] or '0'), tonumber(f[8] or '0')
  local ce, cp = tonumber(f[9] or '0'), tonumber(f[10] or '0')
  if cp > 0 and now >= ce then
    ce = ce + (math.floor((now - ce) / cp) + 1) * cp
    cu = 0
    put('ce', ce)
  end
  if delta > 0 and f[11] == '1' and f[12] and cu + delta > cq then
    from_wallet = cu + delta - math.max(cq, cu)
    redis.call('HINCRBY', KEYS[2], f[12], -from_wallet)
    put('pu', tonumber(f[13] or '0') + from_wallet)
  end
  put('cu', math.max(cu + delta - from_wallet, 0))
elseif f[3] ~= '1' and delta ~= 0 then
  if f[14] then   -- a rotated key's shared quota pool (see authorize.lua)
    redis.call('HINCRBY', KEYS[2], 'q:' .. f[14], -delta)
  else
    redis.call('HINCRBY', KEYS[1], 'qr', -delta)
  end
end

redis.call('HSET', KEYS[1], unpack(set))
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[5])
return {0, delta, from_wallet}
