"""The one Lua script that commits a batch: every check first, then every write."""

from __future__ import annotations

# Checks, then writes. ARGV: maxlen ("" for none), the number of checks, each as
# (kind, key index, field, expected: "" for nil, else "=" .. value), the number of
# writes, each as an opcode with its key indices and arguments. Nothing is written unless
# every check passes; the answer is {"ok"} or {"conflict", index of the failed check}.
COMMIT = """
local maxlen = ARGV[1]
local function key(i) return KEYS[tonumber(i)] end
local function append(counter, stream, n, at)
  local id = redis.call('INCR', counter)
  local args = {'XADD', stream}
  if maxlen ~= '' then
    args[3], args[4], args[5] = 'MAXLEN', '~', maxlen
  end
  args[#args + 1] = string.format('%d-0', id)
  for f = at, at + 2 * n - 1 do
    args[#args + 1] = ARGV[f]
  end
  redis.call(unpack(args))
  return id
end
local i = 3
for c = 1, tonumber(ARGV[2]) do
  local kind, k, f = ARGV[i], key(ARGV[i + 1]), ARGV[i + 2]
  local actual
  if kind == 'h' then
    actual = redis.call('HGET', k, f)
  elseif kind == 'hx' then
    actual = tostring(redis.call('HEXISTS', k, f))
  elseif kind == 'g' then
    actual = redis.call('GET', k)
  elseif kind == 't' then
    actual = redis.call('ZREVRANGE', k, 0, 0)[1]
  elseif kind == 'sc' then
    actual = tostring(redis.call('SCARD', k))
  elseif kind == 'zc' then
    actual = tostring(redis.call('ZCARD', k))
  elseif kind == 'sm' then
    actual = tostring(redis.call('SISMEMBER', k, f))
  elseif kind == 'zm' then
    actual = redis.call('ZSCORE', k, f) and '1' or '0'
  else
    return redis.error_reply('fp-collect: unknown check ' .. kind)
  end
  if (actual and ('=' .. actual) or '') ~= ARGV[i + 3] then
    return {'conflict', c}
  end
  i = i + 4
end
local writes = tonumber(ARGV[i])
i = i + 1
for _ = 1, writes do
  local op = ARGV[i]
  if op == 'hset' then
    redis.call('HSET', key(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'set' then
    if ARGV[i + 3] == '' then
      redis.call('SET', key(ARGV[i + 1]), ARGV[i + 2])
    else
      redis.call('SET', key(ARGV[i + 1]), ARGV[i + 2], 'PX', ARGV[i + 3])
    end
    i = i + 4
  elseif op == 'sadd' then
    redis.call('SADD', key(ARGV[i + 1]), ARGV[i + 2])
    i = i + 3
  elseif op == 'zadd' then
    redis.call('ZADD', key(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'del' then
    redis.call('DEL', key(ARGV[i + 1]))
    i = i + 2
  elseif op == 'event' then
    -- counter, stream, dedup hash; messageId; field count; fields
    local n = tonumber(ARGV[i + 5])
    local id = append(key(ARGV[i + 1]), key(ARGV[i + 2]), n, i + 6)
    redis.call('HSET', key(ARGV[i + 3]), ARGV[i + 4], string.format('%d', id))
    i = i + 6 + 2 * n
  elseif op == 'rejection' then
    -- counter, stream; field count; fields
    local n = tonumber(ARGV[i + 3])
    append(key(ARGV[i + 1]), key(ARGV[i + 2]), n, i + 4)
    i = i + 4 + 2 * n
  else
    return redis.error_reply('fp-collect: unknown write ' .. op)
  end
end
return {'ok'}
"""
