"""The sessions' Lua scripts: each change of a session and its user's index
in one atomic step, timed by the Redis server's clock."""

from __future__ import annotations

__all__ = ["CREATE", "DELETE", "FIELDS", "GET", "REVOKE_ALL", "ROTATE", "SIGN", "UPDATE", "WRITES"]

# The scripts whose writes a cluster replicates before the answer.
WRITES = frozenset({"create", "sign", "update", "rotate", "delete", "revoke_all"})


def _now_ms_lua() -> str:
    return "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"


# KEYS: session, index. ARGV: uid, data, idle_ms, absolute_ms, ref, max per user,
# session key prefix, stamp. Past the per-user bound, the other sessions nearest
# their deadline are removed (keys and index entries); never the one being created.
CREATE = (
    _now_ms_lua()
    + """
local deadline = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'uid', ARGV[1], 'data', ARGV[2], 'ver', 1, 'created', now,
           'seen', now, 'abs', deadline, 'idle', ARGV[3], 'stamp', ARGV[8])
redis.call('PEXPIRE', KEYS[1], math.min(tonumber(ARGV[3]), deadline - now))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], deadline, ARGV[5])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if over > 0 then
  for _, ref in ipairs(redis.call('ZRANGE', KEYS[2], 0, over)) do
    if over > 0 and ref ~= ARGV[5] then
      redis.call('UNLINK', ARGV[7] .. ref)
      redis.call('ZREM', KEYS[2], ref)
      over = over - 1
    end
  end
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], tonumber(last[2]))
return {now, deadline}
"""
)

# KEYS: session. MAC: ARGV[1] the MAC. Sets it on a session that exists.
SIGN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'mac', ARGV[1])
return 1
"""

# The fields GET and listings read, in this order.
FIELDS = ("uid", "data", "ver", "created", "seen", "abs", "idle", "stamp", "mac")

# KEYS: session. ARGV: touch (0/1). Returns nil or the FIELDS.
GET = (
    _now_ms_lua()
    + """
local f = redis.call('HMGET', KEYS[1], 'uid', 'data', 'ver', 'created', 'seen', 'abs', 'idle',
                     'stamp', 'mac')
if not f[1] then return nil end
local deadline = tonumber(f[6])
if now >= deadline then redis.call('UNLINK', KEYS[1]); return nil end
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'seen', now)
  redis.call('PEXPIRE', KEYS[1], math.min(tonumber(f[7]), deadline - now))
  f[5] = tostring(now)
end
return f
"""
)

# KEYS: session. ARGV: data, expected version ('' = any). {-1} missing, {-2, ver} conflict, {ver} ok.
UPDATE = (
    _now_ms_lua()
    + """
local f = redis.call('HMGET', KEYS[1], 'ver', 'abs', 'idle')
if not f[1] then return {-1} end
local deadline = tonumber(f[2])
if now >= deadline then redis.call('UNLINK', KEYS[1]); return {-1} end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= tonumber(f[1]) then return {-2, tonumber(f[1])} end
local ver = redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'seen', now)
redis.call('PEXPIRE', KEYS[1], math.min(tonumber(f[3]), deadline - now))
return {ver}
"""
)

# KEYS: old session, new session, index. ARGV: old ref, new ref, the new MAC.
ROTATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('HINCRBY', KEYS[2], 'ver', 1)
redis.call('HSET', KEYS[2], 'mac', ARGV[3])
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if score then redis.call('ZADD', KEYS[3], score, ARGV[2]) end
return 1
"""

# KEYS: index. ARGV: session key prefix. Removes every session of the user and the index.
REVOKE_ALL = """
local refs = redis.call('ZRANGE', KEYS[1], 0, -1)
local removed = 0
for _, ref in ipairs(refs) do removed = removed + redis.call('UNLINK', ARGV[1] .. ref) end
redis.call('UNLINK', KEYS[1])
return removed
"""


# KEYS: session. ARGV: index key prefix (the user id follows), ref. Removes the
# session and its index entry; replies 1 if it existed.
DELETE = """
local uid = redis.call('HGET', KEYS[1], 'uid')
if not uid then return 0 end
redis.call('UNLINK', KEYS[1])
redis.call('ZREM', ARGV[1] .. uid, ARGV[2])
return 1
"""
