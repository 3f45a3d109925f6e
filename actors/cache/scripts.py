"""The cache's Lua scripts: a set with its tags in one atomic step, and
the invalidation of a tag."""

from __future__ import annotations

__all__ = ["INVALIDATE_TAG", "TAGGED_SET", "TAG_ADD"]

# Each tag set lives at least as long as its longest-lived key (never shortened
# to the last key's TTL); a key without a TTL makes its tag sets persistent.
ADD_TAG = """
local function add_tag(tag, member, key_ttl)
  local existed = redis.call('EXISTS', tag)
  redis.call('SADD', tag, member)
  local cur = redis.call('PTTL', tag)
  if key_ttl < 0 then
    if existed == 1 and cur >= 0 then redis.call('PERSIST', tag) end
  elseif existed == 0 or (cur >= 0 and cur < key_ttl) then
    redis.call('PEXPIRE', tag, key_ttl)
  end
end
"""

# KEYS[1] = key, KEYS[2..] = tag sets. ARGV: value, ttl_ms (0 = none), mode, keepttl,
# default ttl_ms (for a key KEEPTTL finds without one).
# Value, mode, TTL and tag membership in one atomic step. Replies the key's TTL
# in ms (-1: none), or nil when NX/XX refused the write.
TAGGED_SET = (
    ADD_TAG
    + """
local args = {KEYS[1], ARGV[1]}
local ttl = tonumber(ARGV[2])
if ARGV[4] == '1' then table.insert(args, 'KEEPTTL') elseif ttl > 0 then
  table.insert(args, 'PX'); table.insert(args, ttl) end
if ARGV[3] ~= '' then table.insert(args, ARGV[3]) end
if not redis.call('SET', unpack(args)) then return nil end
local key_ttl = redis.call('PTTL', KEYS[1])
if key_ttl == -1 and ARGV[4] == '1' then
  -- KEEPTTL on a key that had none (a new key): it gets the default TTL.
  redis.call('PEXPIRE', KEYS[1], ARGV[5]); key_ttl = tonumber(ARGV[5])
end
for i = 2, #KEYS do add_tag(KEYS[i], KEYS[1], key_ttl) end
return key_ttl
"""
)

# On a cluster, a key and its tag sets sit in different slots: after the key's
# own TAGGED_SET, each tag set gets it here. KEYS[1] = tag set. ARGV: key, its TTL.
TAG_ADD = ADD_TAG + "add_tag(KEYS[1], ARGV[1], tonumber(ARGV[2]))\nreturn 1\n"

# KEYS[1] = tag set. ARGV[1] = the namespace's key prefix: members outside it are
# never deleted. Replies how many member keys were still present and removed.
INVALIDATE_TAG = """
local members = redis.call('SMEMBERS', KEYS[1])
local removed, batch = 0, {}
local plen = string.len(ARGV[1])
for _, m in ipairs(members) do
  if string.sub(m, 1, plen) == ARGV[1] then
    table.insert(batch, m)
    if #batch == 1000 then removed = removed + redis.call('UNLINK', unpack(batch)); batch = {} end
  end
end
if #batch > 0 then removed = removed + redis.call('UNLINK', unpack(batch)) end
redis.call('UNLINK', KEYS[1])
return removed
"""
