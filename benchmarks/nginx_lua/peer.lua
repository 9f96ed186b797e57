-- The NGINX + Lua peer: the authorize call done the way an OpenResty shop would.
--
-- Same work as the sidecar per call: the key from Authorization / x-api-key, the format
-- check, HMAC-SHA256(pepper, key) as 64 hex digits (OpenSSL's SHA-256 through LuaJIT's
-- FFI, inner/outer states precomputed like sidecar/schema/keys.py), the model from the JSON
-- body (cjson), the scope of the original call, then THE SAME sidecar/schema/authorize.lua
-- with the same KEYS/ARGV: one EVALSHA per request over lua-resty-redis, connections
-- kept in the worker's keepalive pool. Answers 200 + identity headers, or the denial
-- status with the JSON body and X-Auth-Error. No metrics (the sidecar keeps its own on).

local ffi = require "ffi"
local bit = require "bit"
local cjson = require "cjson.safe"
local ok_redis, redis = pcall(require, "resty.redis")
if not ok_redis then
  redis = require "nginx.redis"   -- Debian's lua-nginx-redis installs it under this name
end

ffi.cdef [[
typedef struct { unsigned int h[8]; unsigned int Nl, Nh; unsigned int data[16];
                 unsigned int num, md_len; } bench_sha256_ctx;
int SHA256_Init(bench_sha256_ctx *c);
int SHA256_Update(bench_sha256_ctx *c, const void *data, size_t len);
int SHA256_Final(unsigned char *md, bench_sha256_ctx *c);
]]

-- nginx itself links libcrypto, so its symbols are already in the global namespace.
local crypto = ffi.C
if not pcall(function() return crypto.SHA256_Init end) then
  crypto = ffi.load("libcrypto.so.3")
end

local M = {}
local cfg = {}
local CTX_SIZE = ffi.sizeof("bench_sha256_ctx")
local inner0, outer0 = ffi.new("bench_sha256_ctx"), ffi.new("bench_sha256_ctx")
local work = ffi.new("bench_sha256_ctx")
local digest = ffi.new("unsigned char[32]")
local hexbuf = ffi.new("char[64]")
local HEXDIGITS = ffi.new("const char[16]", "0123456789abcdef")
local SCRIPT_SRC, SCRIPT_SHA
local SHARD_HEX = 3

local function sha256_raw(data)
  crypto.SHA256_Init(work)
  crypto.SHA256_Update(work, data, #data)
  crypto.SHA256_Final(digest, work)
  return ffi.string(digest, 32)
end

local function hmac_hex(msg)
  ffi.copy(work, inner0, CTX_SIZE)
  crypto.SHA256_Update(work, msg, #msg)
  crypto.SHA256_Final(digest, work)
  ffi.copy(work, outer0, CTX_SIZE)
  crypto.SHA256_Update(work, digest, 32)
  crypto.SHA256_Final(digest, work)
  for i = 0, 31 do
    local b = digest[i]
    hexbuf[2 * i] = HEXDIGITS[bit.rshift(b, 4)]
    hexbuf[2 * i + 1] = HEXDIGITS[bit.band(b, 15)]
  end
  return ffi.string(hexbuf, 64)
end

local function sha1_hex(s)
  local raw = ngx.sha1_bin(s)
  return (raw:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- Denials, rendered once (sidecar/dataplane/decision.py's codes, statuses and messages).
local DENIALS = {
  [1] = {401, "invalid_api_key", "invalid_request_error", "authentication_error",
         "Incorrect API key provided."},
  [2] = {401, "key_disabled", "invalid_request_error", "authentication_error",
         "This API key has been disabled."},
  [3] = {401, "key_expired", "invalid_request_error", "authentication_error",
         "This API key has expired."},
  [4] = {403, "admin_key_not_allowed", "permission_error", "permission_error",
         "Admin keys cannot be used for inference requests."},
  [5] = {403, "ip_not_allowed", "permission_error", "permission_error",
         "This API key is not allowed from your IP address."},
  [6] = {403, "model_not_allowed", "permission_error", "permission_error",
         "This API key does not have access to the requested model."},
  [7] = {403, "permission_denied", "permission_error", "permission_error",
         "This API key does not have permission for this operation."},
  [8] = {402, "quota_exhausted", "insufficient_quota", "billing_error",
         "You exceeded your current quota. Add more quota or enable PAYG fallback."},
  [9] = {429, "rate_limited", "rate_limit_error", "rate_limit_error",
         "Rate limit reached for requests per minute."},
  [10] = {429, "rate_limited", "rate_limit_error", "rate_limit_error",
          "Rate limit reached for tokens per minute."},
  [20] = {401, "missing_api_key", "invalid_request_error", "authentication_error",
          "No API key provided. Send it as 'Authorization: Bearer <key>' or "
          .. "'x-api-key: <key>'."},
  [21] = {401, "invalid_api_key", "invalid_request_error", "authentication_error",
          "Incorrect API key provided."},
  [30] = {503, "service_unavailable", "server_error", "api_error",
          "The authorization service is temporarily unavailable."},
}
local RENDERED = {}
local KEY_TYPES   -- the record's type letter -> x-key-type: cfg.key_types (run.py fills
                  -- it from sidecar/schema/keys.py's TYPE_CODE)
local READ_METHODS = {GET = true, HEAD = true, OPTIONS = true}
local ID_PARENTS = {models = true, files = true, batches = true, assistants = true,
                    threads = true, fine_tuning = true, jobs = true, vector_stores = true,
                    responses = true}

function M.init(opts)
  cfg = opts
  KEY_TYPES = opts.key_types
  local secret = opts.pepper
  if #secret > 64 then secret = sha256_raw(secret) end
  secret = secret .. string.rep("\0", 64 - #secret)
  local ipad, opad = {}, {}
  for i = 1, 64 do
    local b = secret:byte(i)
    ipad[i] = string.char(bit.bxor(b, 0x36))
    opad[i] = string.char(bit.bxor(b, 0x5c))
  end
  crypto.SHA256_Init(inner0)
  crypto.SHA256_Update(inner0, table.concat(ipad), 64)
  crypto.SHA256_Init(outer0)
  crypto.SHA256_Update(outer0, table.concat(opad), 64)

  local f = assert(io.open(opts.script, "rb"))
  SCRIPT_SRC = f:read("*a")
  f:close()
  SCRIPT_SHA = sha1_hex(SCRIPT_SRC)

  for code, d in pairs(DENIALS) do
    local openai = cjson.encode({error = {message = d[5], type = d[3], param = cjson.null,
                                          code = d[2]}})
    local anthropic = cjson.encode({type = "error", error = {type = d[4], message = d[5]}})
    RENDERED[code] = {[false] = openai, [true] = anthropic}
  end
end

-- request.py's classify(): the scope `<resource>:read|write` of the original call.
local scopes = {}
local function classify(method, path)
  local cache_key = method .. " " .. path
  local hit = scopes[cache_key]
  if hit then return hit end
  local parts = {}
  for p in path:gmatch("[^/]+") do parts[#parts + 1] = p end
  local first = 1
  if parts[1] and (parts[1]:match("^v%d+$") or parts[1]:match("^v%d+alpha%d*$")
                   or parts[1]:match("^v%d+beta%d*$")) then
    first = 2
  end
  local res = {}
  for i = first, #parts do
    local part = parts[i]
    if i > first and ID_PARENTS[parts[i - 1]] then
      local action = part:match(":(.+)$")
      if action then res[#res + 1] = action end
    else
      res[#res + 1] = part
    end
  end
  local resource = #res > 0 and table.concat(res, ".") or "root"
  local write = not READ_METHODS[method]
  hit = {resource .. (write and ":write" or ":read"), write and "" or resource .. ":write",
         write and "1" or "0", path:sub(1, 12) == "/v1/messages"}
  scopes[cache_key] = hit
  return hit
end

local ip_hexes = {}
local function ip_hex(ip)
  local hit = ip_hexes[ip]
  if hit then return hit end
  local a, b, c, d = ip:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if a then
    hit = string.format("00000000000000000000ffff%02x%02x%02x%02x", a, b, c, d)
  else
    hit = ""  -- IPv6 peers: not needed on the loopback benchmark
  end
  ip_hexes[ip] = hit
  return hit
end

local function well_formed(key)
  local body
  if key:sub(1, 9) == "sk-admin_" then body = key:sub(10)
  elseif key:sub(1, 7) == "sk-org_" then body = key:sub(8)
  elseif key:sub(1, 7) == "sk-sub-" then body = key:sub(8)
  elseif key:sub(1, 3) == "sk-" then body = key:sub(4)
  else return false end
  return #body >= 32 and #body <= 256 and not body:find("[^%w]")
end

local function model_of(body, path)
  if body and #body > 0 then
    local doc = cjson.decode(body)
    local model
    if type(doc) == "table" then
      model = doc.model
    else  -- a truncated body: the top-level-looking "model" is still readable
      model = body:match('"model"%s*:%s*"([^"]+)"')
    end
    if type(model) == "string" and #model > 0 then return model:sub(1, 256) end
  end
  local header = ngx.var.http_x_model
  if header and #header > 0 then return header:sub(1, 256) end
  return path:match("/models/([^/:?#]+)") or ""
end

local function deny(code, anthropic, extra)
  local d = DENIALS[code]
  local body = RENDERED[code][anthropic]
  ngx.status = d[1]
  ngx.header["Content-Type"] = "application/json"
  ngx.header["X-Auth-Error"] = body
  if d[1] == 401 then ngx.header["WWW-Authenticate"] = 'Bearer realm="api"' end
  if extra then
    for k, v in pairs(extra) do ngx.header[k] = v end
  end
  ngx.header["Content-Length"] = #body
  ngx.print(body)
  return ngx.exit(ngx.HTTP_OK)  -- the status is set above; this only ends the request
end

local function duration(ms)
  if ms < 1000 then return ms .. "ms" end
  local s = ms / 1000
  if s < 60 then return string.format("%g", s) .. "s" end
  return string.format("%dm%ds", math.floor(s / 60), math.floor(s) % 60)
end

local function limit_headers(reply, out)
  local rpm, tpm = tonumber(reply[6]) or 0, tonumber(reply[8]) or 0
  if rpm > 0 then
    out["x-ratelimit-limit-requests"] = rpm
    out["x-ratelimit-remaining-requests"] = reply[7]
    out["x-ratelimit-reset-requests"] = duration(tonumber(reply[10]) or 0)
  end
  if tpm > 0 then
    out["x-ratelimit-limit-tokens"] = tpm
    out["x-ratelimit-remaining-tokens"] = reply[9]
    out["x-ratelimit-reset-tokens"] = duration(tonumber(reply[11]) or 0)
  end
  return out
end

local function evalsha(red, ...)   -- the 6 KEYS, then ARGV
  local reply, err = red:evalsha(SCRIPT_SHA, 6, ...)
  if not reply and err and err:find("NOSCRIPT", 1, true) then
    red:script("load", SCRIPT_SRC)
    reply, err = red:evalsha(SCRIPT_SHA, 6, ...)
  end
  return reply, err
end

function M.authorize()
  local var = ngx.var
  local method = var.http_x_original_method or var.http_x_forwarded_method
                 or ngx.req.get_method()
  local uri = var.http_x_original_uri or var.http_x_forwarded_uri
  if not uri then
    uri = var.request_uri:sub(7)
    if uri == "" then uri = "/" end
  end
  local path = uri:match("^[^?]*")
  local call = classify(method:upper(), path)

  local key
  local auth = var.http_authorization
  if auth then
    local scheme, value = auth:match("^%s*(%S+)%s+(.-)%s*$")
    if scheme and scheme:lower() == "bearer" then key = value else key = auth end
  else
    key = var.http_x_api_key
  end
  if not key or key == "" or not well_formed(key) then
    ngx.req.discard_body()  -- answered before reading the body, as the sidecar does
    return deny((not key or key == "") and 20 or 21, call[4])
  end

  ngx.req.read_body()
  local model = model_of(ngx.req.get_body_data(), path)
  local ip = var.remote_addr
  local key_hash = hmac_hex(key)
  local shard = key_hash:sub(1, SHARD_HEX)

  local red = redis:new()
  red:set_timeouts(cfg.timeout_ms, cfg.timeout_ms, cfg.timeout_ms)
  local ok, err = red:connect(cfg.redis_host, cfg.redis_port)
  local reply
  if ok then
    -- KEYS and ARGV as sidecar/dataplane/authorize.py sends them (no /settle, no price:
    -- the benchmark's keys have no budget).
    local now = math.floor(ngx.now() * 1000)
    local tag = "{" .. shard .. "}"
    -- Alerts and usage history as the sidecar's defaults (alert_thresholds,
    -- usage_retention_days), unless run.py's options say otherwise.
    local day = math.floor(now / 86400000)
    reply, err = evalsha(red, "k:" .. tag .. ":" .. key_hash, "w:" .. tag, "b:" .. tag,
                         "ev:" .. tag, "u:" .. tag .. ":d:" .. day,
                         "u:" .. tag .. ":h:" .. math.floor(now / 3600000),
                         now, cfg.cost, ip_hex(ip), ip, model,
                         call[1], call[2], call[3], "0", cfg.pool_prefix, 0, -1,
                         day, 0, "c", cfg.thresholds or "0.2,0.05,0",
                         cfg.usage_days or 90)
  end
  if not reply then
    ngx.log(ngx.WARN, "redis unavailable: ", err)
    red:close()
    return deny(30, call[4])
  end
  red:set_keepalive(cfg.keepalive_ms, cfg.pool_size)

  local code = tonumber(reply[1])
  if code == 0 then
    ngx.header["x-key-id"] = reply[2]
    ngx.header["x-key-type"] = KEY_TYPES[reply[3]] or ""
    ngx.header["x-org-id"] = reply[4]
    ngx.header["x-project-id"] = reply[5]
    for k, v in pairs(limit_headers(reply, {})) do ngx.header[k] = v end
    ngx.header["Content-Length"] = 0
    return ngx.exit(ngx.HTTP_OK)
  end
  local extra = #reply > 1 and limit_headers(reply, {}) or nil
  if code == 9 or code == 10 then
    extra["Retry-After"] = tostring(math.max(1, math.ceil((tonumber(reply[12]) or 0) / 1000)))
  end
  return deny(code, call[4], extra)
end

return M
