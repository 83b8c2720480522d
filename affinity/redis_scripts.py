"""Lua for RedisState. Every script touches keys of one hash-tag slot only.

Pins: one hash per block, tagged with the request's root block so a chain's keys share
a slot; fields ``d:<domain>`` hold the expiry (ms) of that domain's cached copy, ``_n``
and ``_t`` a request count decaying with time constant ``tau`` and its time. Expiries
only grow along a chain's shallow end (every request pins its whole chain), so the
deepest live block is found by binary search.

Windows: one hash per account with per-bucket fields ``r:<e>``, ``i:<e>``, ``o:<e>``
(requests, input, output tokens of bucket epoch e), their running totals ``r``, ``i``,
``o``, and ``h``, the newest epoch rolled to; in-flight requests are a sorted set of
tickets scored by a deadline, so a crashed replica's requests age out.
"""

from __future__ import annotations

# A chain's pin keys travel as one argument, not one key each (packing and parsing 50
# keys per call was most of a request's Redis CPU): KEYS[1] is the first pin key, whose
# hash tag every other key of the chain shares (one slot), and ARGV[1] the chain's block
# hashes, 16 hex digits each; key(i) rebuilds the i-th key from them.
_CHAIN = """
local prefix = string.sub(KEYS[1], 1, -17)
local chain = ARGV[1]
local n = #chain / 16
local function key(i)
  return prefix .. string.sub(chain, i * 16 - 15, i * 16)
end
"""

_PIN_HELPERS = """
local function live(i, field, now)
  local e = redis.call('HGET', key(i), field)
  return e and tonumber(e) > now
end
local function deepest(field, now)
  if not live(1, field, now) then return 0 end
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if live(mid, field, now) then lo = mid else hi = mid - 1 end
  end
  return lo
end
"""

# KEYS: the first pin key ; ARGV: chain, now_ms, tau_ms
# -> {root rate (string), shared offset, then domain, deepest live offset for every domain
# whose copy of the root is live} (offsets 1-based, 0 none). The domains come from the root
# block's own fields, so the cost follows the few domains caching it, not the pool's size.
PINS_READ = (
    _CHAIN
    + _PIN_HELPERS
    + """
local now, tau = tonumber(ARGV[2]), tonumber(ARGV[3])
local function rate(i)
  local v = redis.call('HMGET', key(i), '_n', '_t')
  if not v[1] then return 0 end
  return tonumber(v[1]) * math.exp((tonumber(v[2]) - now) / tau)
end
local root_rate = rate(1)
local shared = 0
if root_rate > 0 then
  local lo, hi, floor = 1, n, root_rate / 2
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if rate(mid) >= floor then lo = mid else hi = mid - 1 end
  end
  shared = lo
end
local out = {string.format('%.17g', root_rate), shared}
local fields = redis.call('HGETALL', key(1))
for j = 1, #fields, 2 do
  local field = fields[j]
  if string.sub(field, 1, 2) == 'd:' and tonumber(fields[j + 1]) > now then
    out[#out + 1] = string.sub(field, 3)
    out[#out + 1] = deepest(field, now)
  end
end
return out
"""
)

# KEYS: the first pin key ; ARGV: chain, now_ms, tau_ms, domain, expires_ms
# Deepest first, like the in-process index: a shallower block never expires first.
PINS_BEGIN = (
    _CHAIN
    + """
local now, tau = tonumber(ARGV[2]), tonumber(ARGV[3])
local field, expires = 'd:' .. ARGV[4], tonumber(ARGV[5])
for i = n, 1, -1 do
  local key = key(i)
  local cur = redis.call('HMGET', key, field, '_n', '_t')
  local count = 1
  if cur[2] then
    count = tonumber(cur[2]) * math.exp((tonumber(cur[3]) - now) / tau) + 1
  end
  if not cur[1] or tonumber(cur[1]) < expires then
    redis.call('HSET', key, field, expires, '_n', string.format('%.17g', count), '_t', now)
  else
    redis.call('HSET', key, '_n', string.format('%.17g', count), '_t', now)
  end
  if redis.call('PEXPIRETIME', key) < expires then
    redis.call('PEXPIREAT', key, expires)
  end
end
return n
"""
)

# KEYS: the first pin key ; ARGV: chain, domain
PINS_DROP = (
    _CHAIN
    + """
local field = 'd:' .. ARGV[2]
for i = 1, n do
  redis.call('HDEL', key(i), field)
end
return n
"""
)

_ROLL = """
local function roll(key, epoch, slots)
  local head = tonumber(redis.call('HGET', key, 'h'))
  if head ~= nil and epoch > head then
    local first = head - slots + 1
    local last = math.min(epoch - slots, head)
    for e = first, last do
      local v = redis.call('HMGET', key, 'r:' .. e, 'i:' .. e, 'o:' .. e)
      if v[1] or v[2] or v[3] then
        redis.call('HINCRBY', key, 'r', -(tonumber(v[1]) or 0))
        redis.call('HINCRBY', key, 'i', -(tonumber(v[2]) or 0))
        redis.call('HINCRBY', key, 'o', -(tonumber(v[3]) or 0))
        redis.call('HDEL', key, 'r:' .. e, 'i:' .. e, 'o:' .. e)
      end
    end
  end
  if head == nil or epoch > head then
    redis.call('HSET', key, 'h', epoch)
  end
end
"""

# KEYS: window, in-flight ; ARGV: now_ms, bucket_ms, slots
# -> {requests, input tokens, output tokens, in flight}
WINDOW_READ = (
    _ROLL
    + """
local now = tonumber(ARGV[1])
roll(KEYS[1], math.floor(now / tonumber(ARGV[2])), tonumber(ARGV[3]))
local t = redis.call('HMGET', KEYS[1], 'r', 'i', 'o')
-- In flight: tickets whose deadline is still ahead (begins purge the others).
local flying = redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[1], '+inf')
return {tonumber(t[1]) or 0, tonumber(t[2]) or 0, tonumber(t[3]) or 0, flying}
"""
)

# KEYS: window, in-flight ; ARGV: now_ms, bucket_ms, slots, input, output, ticket, deadline_ms,
# key_ttl_ms
WINDOW_BEGIN = (
    _ROLL
    + """
local now = tonumber(ARGV[1])
local epoch = math.floor(now / tonumber(ARGV[2]))
roll(KEYS[1], epoch, tonumber(ARGV[3]))
local input, output = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HINCRBY', KEYS[1], 'r:' .. epoch, 1)
redis.call('HINCRBY', KEYS[1], 'i:' .. epoch, input)
redis.call('HINCRBY', KEYS[1], 'o:' .. epoch, output)
redis.call('HINCRBY', KEYS[1], 'r', 1)
redis.call('HINCRBY', KEYS[1], 'i', input)
redis.call('HINCRBY', KEYS[1], 'o', output)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], tonumber(ARGV[7]), ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
return 1
"""
)

# KEYS: window, in-flight ; ARGV: now_ms, bucket_ms, slots, admitted_ms, input delta,
# output delta, ticket
WINDOW_END = (
    _ROLL
    + """
local now, bucket, slots = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local epoch = math.floor(now / bucket)
roll(KEYS[1], epoch, slots)
-- Only a request whose begin reached Redis is corrected: without its ticket, a negative
-- delta would come off other requests' counts.
local begun = redis.call('ZREM', KEYS[2], ARGV[7])
local at = math.floor(tonumber(ARGV[4]) / bucket)
if begun == 1 and at > epoch - slots and at <= epoch then
  local deltas = {{'i', tonumber(ARGV[5])}, {'o', tonumber(ARGV[6])}}
  for _, d in ipairs(deltas) do
    local field = d[1] .. ':' .. at
    local have = tonumber(redis.call('HGET', KEYS[1], field) or '0')
    local delta = math.max(d[2], -have)
    if have > 0 or delta > 0 then
      redis.call('HINCRBY', KEYS[1], field, delta)
      redis.call('HINCRBY', KEYS[1], d[1], delta)
    end
  end
end
return 1
"""
)
