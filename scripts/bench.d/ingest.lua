-- SDK-shaped ingestion requests for wrk (LuaJIT), with a fresh $insert_id in
-- every event so that the server never takes a dedupe shortcut.
--
--   wrk -t1 -c50 -d5s --latency -s scripts/bench.d/ingest.lua URL -- WORKLOAD
--
-- WORKLOAD is one of:
--   single   GET /track/?data=<base64 of one event>&ip=1&_=...  (browser SDK); answer 1
--   batch50  POST /track/?ip=1&verbose=1, form body data=<JSON array of 50 events>
--            (the SDKs' batch size); answer {"status":1,...}
--   engage   GET /engage/?data=<base64 of a $set>&ip=1 (browser people.set); answer 1
--   mixed    a replay cycling through: 3 browser single GETs, a browser batch of 10,
--            a Python-SDK form POST, a Node-SDK unescaped-base64 POST, an engage GET,
--            a groups GET and an /import of 5 (JSON body, Basic auth as "secret:")
--
-- Only the 36 bytes of the $insert_id are encoded per request: each template
-- puts the id at an offset that is a multiple of 3 (padding the JSON with
-- spaces), so base64(prefix .. id .. suffix) = base64(prefix) .. base64(id) ..
-- base64(suffix) and the rest is encoded once.
--
-- Every answer is checked (status 200 and an answer meaning "stored"); done()
-- prints one line "BENCH {json}" with the counts and latency percentiles.

local bit = require("bit")

local ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64 = {}
for i = 1, 64 do B64[i - 1] = ALPHABET:sub(i, i) end

local function base64(s)
  local out, n = {}, #s
  local i = 1
  while i + 2 <= n do
    local a, b, c = s:byte(i, i + 2)
    local v = bit.bor(bit.lshift(a, 16), bit.lshift(b, 8), c)
    out[#out + 1] = B64[bit.rshift(v, 18)] .. B64[bit.band(bit.rshift(v, 12), 63)]
      .. B64[bit.band(bit.rshift(v, 6), 63)] .. B64[bit.band(v, 63)]
    i = i + 3
  end
  local rest = n - i + 1
  if rest == 1 then
    local v = bit.lshift(s:byte(i), 16)
    out[#out + 1] = B64[bit.rshift(v, 18)] .. B64[bit.band(bit.rshift(v, 12), 63)] .. "=="
  elseif rest == 2 then
    local a, b = s:byte(i, i + 1)
    local v = bit.bor(bit.lshift(a, 16), bit.lshift(b, 8))
    out[#out + 1] = B64[bit.rshift(v, 18)] .. B64[bit.band(bit.rshift(v, 12), 63)]
      .. B64[bit.band(bit.rshift(v, 6), 63)] .. "="
  end
  return table.concat(out)
end

local function pct(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

-- 36-character ids: 16 random hex digits from /dev/urandom, "-", a counter.
local idPrefix
local counter = 0
local function nextId()
  counter = counter + 1
  return idPrefix .. string.format("%019.0f", counter)
end

local function seedIds()
  local f = io.open("/dev/urandom", "rb")
  local raw = f:read(8)
  f:close()
  idPrefix = raw:gsub(".", function(c) return string.format("%02x", c:byte()) end) .. "-"
end

-- An event JSON split around its $insert_id, the prefix padded to a multiple of 3.
local function eventParts(name, withTime)
  local prefix = '{"event":"' .. name .. '","properties":{"token":"bench-token",'
    .. '"distinct_id":"user-4242",' .. (withTime or '"time":1718000000123,')
    .. '"$browser":"Chrome","$os":"Linux","$current_url":"https://example.com/signup?ref=bench",'
    .. '"mp_lib":"web","$lib_version":"2.55.0","plan":"pro",'
  while (#prefix + #'"$insert_id":"') % 3 ~= 0 do prefix = prefix .. " " end
  return prefix .. '"$insert_id":"', '"}}'
end

-- A function returning pct(base64(prefix .. id .. suffix)) for a fresh id.
local function base64Template(prefix, suffix, escape)
  assert(#prefix % 3 == 0)
  local enc = escape and pct or function(s) return s end
  local head, tail = enc(base64(prefix)), enc(base64(suffix))
  return function()
    return head .. enc(base64(nextId())) .. tail
  end
end

local function jsonArrayTemplate(prefix, suffix, count)
  -- pct-encoded JSON array of `count` events: the ids need no escaping.
  local head, tail = pct(prefix), pct(suffix)
  return function()
    local parts = {}
    for i = 1, count do parts[i] = head .. nextId() .. tail end
    return "%5B" .. table.concat(parts, "%2C") .. "%5D", count
  end
end

-- pct(base64(JSON array of `count` events)): "[" or "," plus the prefix, the
-- id and the 3-byte suffix '"}}' are each a multiple of 3 bytes long.
local function base64ArrayTemplate(name, count)
  local prefix, suffix = eventParts(name)
  prefix = prefix:gsub(' +"%$insert_id":"$', '"$insert_id":"')
  local function aligned(s)
    local head = s:sub(1, -#'"$insert_id":"' - 1)
    while (#s) % 3 ~= 0 do
      head = head .. " "
      s = head .. '"$insert_id":"'
    end
    return s
  end
  assert(#suffix == 3)
  local open, sep = pct(base64(aligned("[" .. prefix))), pct(base64(aligned("," .. prefix)))
  local tail, close = pct(base64(suffix)), pct(base64("]"))
  return function()
    local parts = {}
    for i = 1, count do
      parts[i] = (i == 1 and open or sep) .. pct(base64(nextId())) .. tail
    end
    return table.concat(parts) .. close, count
  end
end

local FORM = { ["Content-Type"] = "application/x-www-form-urlencoded" }
local BUSTER = "_=1718000000123"

local builders = {}

function builders.single()
  local p, s = eventParts("Signed Up")
  local data = base64Template(p, s, true)
  return function()
    return wrk.format("GET", "/track/?data=" .. data() .. "&ip=1&" .. BUSTER), 1
  end
end

local function batch(count)
  local data = base64ArrayTemplate("Page View", count)
  return function()
    local body, n = data()
    return wrk.format("POST", "/track/?ip=1&verbose=1&" .. BUSTER, FORM, "data=" .. body), n
  end
end

function builders.batch50() return batch(50) end

function builders.engage()
  local p = '{"$token":"bench-token","$set":{"$name":"Ada","plan":"pro","$email":"ada@example.com"},'
  while (#p + #'"$distinct_id":"') % 3 ~= 0 do p = p .. " " end
  local data = base64Template(p .. '"$distinct_id":"', '"}', true)
  return function()
    return wrk.format("GET", "/engage/?data=" .. data() .. "&ip=1&" .. BUSTER), 1
  end
end

function builders.mixed()
  local single = builders.single()
  local batch10 = batch(10)
  local engage = builders.engage()
  local p, s = eventParts("Purchase")
  local pyJSON = jsonArrayTemplate(p, s, 1)
  local python = function()
    local body = pyJSON()
    body = body:sub(4, -4) -- one object, not an array
    return wrk.format("POST", "/track", FORM, "data=" .. body .. "&verbose=1&ip=0"), 1
  end
  local nodeData = base64Template(p, s, false) -- the Node SDK posts base64 unescaped
  local node = function()
    return wrk.format("POST", "/track?ip=0&verbose=1", FORM, "data=" .. nodeData()), 1
  end
  local groupData = base64(
    '{"$token":"bench-token","$group_key":"company","$group_id":"acme","$set":{"seats":42}}'
  )
  local groups = function()
    return wrk.format("GET", "/groups/?data=" .. pct(groupData) .. "&" .. BUSTER), 1
  end
  local ip, is = eventParts("Imported", '"time":1718000000,')
  local importJSON = jsonArrayTemplate(ip, is, 5)
  local importHeaders = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Basic " .. base64("bench-secret:"),
  }
  local import = function()
    local body = importJSON()
    body = body:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
    return wrk.format("POST", "/import?strict=1", importHeaders, body), 5
  end
  local cycle = { single, batch10, single, python, engage, single, node, groups, import }
  local i = 0
  return function()
    i = i % #cycle + 1
    return cycle[i]()
  end
end

-- Events per request on average, for events/s (mixed: 3+10+1+1+1+1+5 over 9).
EVENTS_PER_REQUEST = { single = 1, batch50 = 50, engage = 1, mixed = 22 / 9 }

local build
bad = 0
badSample = ""

function init(args)
  local workload = args[1] or "single"
  assert(builders[workload], "unknown workload " .. workload)
  seedIds()
  build = builders[workload]()
  if args[2] == "nocheck" then response = nil end
end

function request()
  return (build())
end

function response(status, headers, body)
  if status ~= 200 or not (body == "1" or body:sub(1, 11) == '{"status":1'
      or body:sub(1, 11) == '{"code":200') then
    bad = bad + 1
    if badSample == "" then badSample = status .. " " .. body:sub(1, 200) end
  end
end

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

local function quote(s)
  return '"' .. s:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

function done(summary, latency, requests)
  local badCount, sample = 0, ""
  for _, t in ipairs(threads) do
    badCount = badCount + (t:get("bad") or 0)
    if sample == "" then sample = t:get("badSample") or "" end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
      .. '"status":%d,"timeout":%d,"bad":%d,"bad_sample":%s,"p50_us":%d,"p90_us":%d,'
      .. '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, badCount, quote(sample), latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
