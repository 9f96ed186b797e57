-- wrk script: a realistic authorize call per request, with a key drawn at random.
--
-- wrk ... -s wrk_authz.lua <url> -- <path> <key file>
--   path      request path, e.g. /authz/v1/chat/completions, /bench/baseline/..., /bench/bare
--   key file  one plaintext key per line ('-' for none: no Authorization header)
--
-- Every request is the same POST with a small chat JSON body; only the Bearer key
-- changes. The request is three pre-built strings concatenated, so wrk's own cost per
-- request stays small next to the server's. done() prints one JSON line (prefixed
-- WRK_JSON) with the summary and the latency percentiles in microseconds.

local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

local keys, nkeys, head, tail

function init(args)
  local path, keyfile = args[1] or "/authz/v1/chat/completions", args[2] or "-"
  math.randomseed(os.time() * 1000 + (id or 0))
  keys, nkeys = {}, 0
  if keyfile ~= "-" then
    for line in io.lines(keyfile) do
      if #line > 0 then
        nkeys = nkeys + 1
        keys[nkeys] = line
      end
    end
  end
  local body = '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a '
    .. 'helpful assistant."},{"role":"user","content":"Summarise the attached meeting '
    .. 'notes in three bullet points."}],"temperature":0.2,"max_tokens":256,"stream":false}'
  local host = wrk.headers["Host"] or (wrk.host .. ":" .. tostring(wrk.port))
  head = "POST " .. path .. " HTTP/1.1\r\n"
    .. "Host: " .. host .. "\r\n"
    .. "User-Agent: OpenAI/Python 1.54.0\r\n"
    .. "Accept: application/json\r\n"
    .. "Content-Type: application/json\r\n"
    .. "Content-Length: " .. #body .. "\r\n"
  if nkeys > 0 then
    head = head .. "Authorization: Bearer "
    tail = "\r\n\r\n" .. body
  else
    tail = "\r\n" .. body
  end
end

function request()
  if nkeys > 0 then
    return head .. keys[math.random(nkeys)] .. tail
  end
  return head .. tail
end

function done(summary, latency, requests)
  local e = summary.errors
  local p = {}
  for _, q in ipairs({50, 75, 90, 99, 99.9}) do
    p[#p + 1] = string.format('"%s":%d', tostring(q), latency:percentile(q))
  end
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,'
    .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
    .. '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"min":%d,"percentiles":{%s}}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max, latency.min, table.concat(p, ",")))
end
