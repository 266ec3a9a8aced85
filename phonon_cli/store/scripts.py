"""The Lua scripts that make each check-then-act on shared state one atomic step.

Each script is a module constant, registered once (``redis.commands.core.Script``
computes its SHA and reloads it on ``NOSCRIPT``) and called with ``client=``.
Every key arrives through ``KEYS``; ARGV is documented at the top of each script.
The batched scripts take a fixed number of keys and arguments per resource, so
one call covers a whole batch. On Redis Cluster a batch is split by slot; each
resource's keys share a hash tag, so no script needs keys of two slots.

That split lives here, once: ``queue`` turns one batched call into one call per
hash slot (with the same leading arguments), the cluster pipeline sends each
node its share (written to every node before any reply is read), and ``run``
puts the replies back in the caller's order. Callers never know which store
they talk to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis.commands.core import Script
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from .. import faults, telemetry
from ..exceptions import Fenced
from . import slots
from .connection import is_cluster

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import redis
    from redis.client import Pipeline

MERGE_LUA = """
-- Shared by RELEASE and RECOVER: how a partial merges into what is cached.

local function add_sum(hash, field, inc)
  local cur = redis.call('HGET', hash, field)
  if string.find(inc, '^-?%d+$') and (not cur or string.find(cur, '^-?%d+$')) then
    redis.call('HINCRBY', hash, field, inc)
  else
    redis.call('HINCRBYFLOAT', hash, field, inc)
  end
end

-- Byte order, as Python compares str: Lua's < on strings follows the server's
-- locale (Redis sets LC_COLLATE from the environment), so ties broken with it
-- could keep different items than the Python merge does.
local function str_lt(a, b)
  if a == b then return false end
  for j = 1, math.min(#a, #b) do
    local x, y = string.byte(a, j), string.byte(b, j)
    if x ~= y then return x < y end
  end
  return #a < #b
end

local function split_first(s)
  local sp = string.find(s, ' ', 1, true)
  return tonumber(string.sub(s, 1, sp - 1)), string.sub(s, sp + 1)
end

local function list_items(s)
  local items = cjson.decode(s)
  if type(items) ~= 'table' then return {} end
  return items
end

-- distinct_count's registers (fields/hll.py), in one of two forms: sparse, "s" then
-- per register set, in index order, 3 hex digits of its index and 2 of its rank,
-- while at most HLL_SPARSE_MAX are set; else dense, 2 hex digits per register.
-- The union keeps the larger rank of each register (two lowercase hex digits
-- compare as their numbers) and is written in the form hll.encode chooses, so
-- the same registers are the same text in Redis and in Python.
local HLL_SPARSE_MAX = 409

local function hll_ranks(text, ranks)
  if string.sub(text, 1, 1) == 's' then
    for j = 2, #text, 5 do
      local i, r = tonumber(string.sub(text, j, j + 2), 16), string.sub(text, j + 3, j + 4)
      local had = ranks[i]
      if not had or r > had then ranks[i] = r end
    end
  else
    for i = 0, 1023 do
      local r = string.sub(text, 2 * i + 1, 2 * i + 2)
      local had = ranks[i]
      if r ~= '00' and (not had or r > had) then ranks[i] = r end
    end
  end
end

local function hll_union(a, b)
  local parts = {}
  if string.sub(a, 1, 1) ~= 's' and string.sub(b, 1, 1) ~= 's' then
    for j = 1, 2047, 2 do  -- both dense: pair by pair
      local x, y = string.sub(a, j, j + 1), string.sub(b, j, j + 1)
      parts[#parts + 1] = (y > x) and y or x
    end
    return table.concat(parts)
  end
  local ranks, set = {}, {}
  hll_ranks(a, ranks)
  hll_ranks(b, ranks)
  for i in pairs(ranks) do set[#set + 1] = i end
  if #set > HLL_SPARSE_MAX then
    for i = 0, 1023 do parts[i + 1] = ranks[i] or '00' end
    return table.concat(parts)
  end
  table.sort(set)
  parts[1] = 's'
  for _, i in ipairs(set) do parts[#parts + 1] = string.format('%03x', i) .. ranks[i] end
  return table.concat(parts)
end

-- "fields" partials: each hash field is "<op>[/<n>]:<name>" and says how it merges.
local function merge_field(hash, field, value)
  local cur = redis.call('HGET', hash, field)
  if not cur then
    redis.call('HSET', hash, field, value)
    return
  end
  local op, n = string.match(field, '^(%a+)/?(%d*):')
  if op == 'sum' or op == 'cnt' or op == 'msum' or op == 'mcnt' then
    add_sum(hash, field, value)
  elseif op == 'min' then
    if tonumber(value) < tonumber(cur) then redis.call('HSET', hash, field, value) end
  elseif op == 'max' then
    if tonumber(value) > tonumber(cur) then redis.call('HSET', hash, field, value) end
  elseif op == 'first' or op == 'last' then
    local tv, ev = split_first(value)
    local tc, ec = split_first(cur)
    local better
    if op == 'first' then
      better = tv < tc or (tv == tc and str_lt(ev, ec))
    else
      better = tv > tc or (tv == tc and str_lt(ec, ev))
    end
    if better then redis.call('HSET', hash, field, value) end
  elseif op == 'set' then
    local seen, members = {}, {}
    for _, source in ipairs({cur, value}) do
      for _, m in ipairs(list_items(source)) do
        if not seen[m] then
          seen[m] = true
          members[#members + 1] = m
        end
      end
    end
    table.sort(members)
    redis.call('HSET', hash, field, cjson.encode(members))
  elseif op == 'list' or op == 'top' then
    -- items are {key, encoded value}: list keys are times (keep the newest n),
    -- top keys are scores (keep the n largest); ties broken by the value.
    local items = list_items(cur)
    for _, it in ipairs(list_items(value)) do items[#items + 1] = it end
    if op == 'list' then
      table.sort(items, function(a, b)
        local x, y = tonumber(a[1]), tonumber(b[1])
        if x ~= y then return x < y end
        return str_lt(a[2], b[2])
      end)
    else
      table.sort(items, function(a, b)
        local x, y = tonumber(a[1]), tonumber(b[1])
        if x ~= y then return x > y end
        return str_lt(a[2], b[2])
      end)
    end
    local cap = tonumber(n) or 0
    if cap > 0 and #items > cap then
      local kept = {}
      local first = (op == 'list') and (#items - cap + 1) or 1
      for j = first, first + cap - 1 do kept[#kept + 1] = items[j] end
      items = kept
    end
    redis.call('HSET', hash, field, cjson.encode(items))
  elseif op == 'hll' then
    redis.call('HSET', hash, field, hll_union(cur, value))
  else
    add_sum(hash, field, value)
  end
end

local function merge_pairs(hash, kind, pairs_iter)
  for field, value in pairs_iter do
    if kind == 'fields' then merge_field(hash, field, value) else add_sum(hash, field, value) end
  end
end

local function payload_pairs(payload)
  return string.gmatch(payload, '([^\\t\\n]+)\\t([^\\n]+)')
end

-- A sum Redis cannot hold (HINCRBY past int64, HINCRBYFLOAT to an infinity) raises
-- inside the script: the resources of the batch before it are done, the rest not,
-- and the error reads like a lost store. So a deposit is checked whole first and
-- refused (the caller quarantines it) before any of it is merged.
local function int_parts(s)
  local neg = string.sub(s, 1, 1) == '-'
  local digits = (string.gsub(neg and string.sub(s, 2) or s, '^0+', ''))
  if #digits > 19 then return false end
  local hi = 0
  if #digits > 9 then hi = tonumber(string.sub(digits, 1, #digits - 9)) end
  return true, neg, hi, tonumber(string.sub(digits, -9)) or 0
end

local function int_fits(neg, hi, lo)
  -- 9223372036854775807 = 2^63 - 1, as exact halves; one more when negative
  if hi ~= 9223372036 then return hi < 9223372036 end
  return lo <= (neg and 854775808 or 854775807)
end

local function sum_refused(cur, inc)
  if string.find(inc, '^-?%d+$') and (not cur or string.find(cur, '^-?%d+$')) then
    local ok, neg, hi, lo = int_parts(inc)
    if not ok or not int_fits(neg, hi, lo) then return inc .. ' is outside int64' end
    if not cur then return nil end
    local ok2, neg2, hi2, lo2 = int_parts(cur)
    if not ok2 then return 'the cached ' .. cur .. ' is outside int64' end
    if neg ~= neg2 then return nil end
    hi, lo = hi + hi2, lo + lo2
    if lo >= 1000000000 then hi, lo = hi + 1, lo - 1000000000 end
    if not int_fits(neg, hi, lo) then return cur .. ' + ' .. inc .. ' is outside int64' end
    return nil
  end
  local a, b = tonumber(cur or '0'), tonumber(inc)
  if not a or not b then return inc .. ' is not a number' end
  local sum = a + b
  if sum ~= sum or sum == math.huge or sum == -math.huge then
    return (cur or '0') .. ' + ' .. inc .. ' is not a finite number'
  end
  return nil
end

local NOT_SUMMED = {min = 1, max = 1, first = 1, last = 1, set = 1, list = 1, top = 1, hll = 1}

local function deposit_refused(hash, kind, payload)
  if kind == 'json' then return nil end
  for field, value in payload_pairs(payload) do
    local op = (kind == 'fields') and string.match(field, '^(%a+)/?%d*:') or nil
    if not NOT_SUMMED[op or ''] then
      local err = sum_refused(redis.call('HGET', hash, field), value)
      if err then return field .. ': ' .. err end
    end
  end
  return nil
end
"""

ACQUIRE_LUA = """
-- Take references on many resources at once.
-- KEYS[1] the process registry (fencing: see FENCE), KEYS[2] the caller's held set,
--   KEYS[3] its replies (lost replies: see FENCE), then 3 per resource: nodes (hash
--   pid -> when it took the reference, epoch ms), meta (hash), partials
-- ARGV[1] process id, ARGV[2] now (epoch ms), ARGV[3] slot, ARGV[4] batch id,
--   then 2 per resource:
--   absorb: "1" to take the partials already cached (init_cache), else "0";
--   the resource's name (for the held set)
-- Returns, per resource: {} or, when absorbing, {kind, item, item, ...} where
--   items are JSON partials (kind "json") or field, value pairs (kind "sums"); all
--   of them as one JSON array (see remember).
-- On a Redis Cluster the three leading KEYS are replaced by one, the caller's replies
-- in this call's slot (see FENCE): the registry and held set are in another slot, and
-- FENCE_HELD checks the fence and fills the held set first (store/slots.py).
local pid, now = ARGV[1], ARGV[2]
local head = (string.sub(KEYS[1], -10) == ':processes') and 3 or (#KEYS % 3)
if head == 3 and not redis.call('ZSCORE', KEYS[1], pid) then
  return redis.error_reply(FENCED .. pid)
end
-- Taking references is idempotent (the same call run twice leaves the same state
-- and answers the same); only absorbing is not, so only a call that absorbs keeps
-- its reply for a resend (see FENCE): most calls save that work.
local replies = nil
for i = 0, (#KEYS - head) / 3 - 1 do
  if ARGV[5 + i * 2] == '1' then replies = replies_key(head) end
end
local again = replayed(replies)
if again then return again end
local out, held = {}, {}
for i = 0, (#KEYS - head) / 3 - 1 do
  local nodes, meta, partials = KEYS[head+i*3+1], KEYS[head+i*3+2], KEYS[head+i*3+3]
  held[i + 1] = ARGV[6 + i * 2]
  redis.call('HSET', nodes, pid, now)
  local taken = {}
  if ARGV[5 + i * 2] == '1' then
    local t = redis.call('TYPE', partials)['ok']
    if t == 'list' then
      taken = redis.call('LRANGE', partials, 0, -1)
      table.insert(taken, 1, 'json')
    elseif t == 'hash' then
      taken = redis.call('HGETALL', partials)
      table.insert(taken, 1, 'sums')
    end
    redis.call('DEL', partials)
    redis.call('HDEL', meta, 'cached_ms')
  end
  out[i + 1] = taken
end
if head == 3 then each_chunk('SADD', KEYS[2], held) end
return remember(replies, out)
"""

RELEASE_LUA = """
-- Leave many resources at once, each either depositing its partial or, for the
-- last holder, taking every partial left by the others. Leaving the nodelist and
-- depositing happen in this one script: a last holder can never execute between
-- the two and orphan the partial.
-- KEYS[1] the process registry (fencing: see FENCE), KEYS[2] the caller's held set,
--   KEYS[3] its replies (lost replies: see FENCE), KEYS[4] the highest offset any
--   deposit covers per source partition (MARKS), then 6 per resource: nodes, meta,
--   partials, exec, exec_recipe (taken partials and their recipe are kept there
--   until the write is done, so that recovery can execute them if this process
--   dies in between), seen (MARKS)
-- ARGV[1] process id, ARGV[2] now (epoch ms), ARGV[3] slot, ARGV[4] batch id,
--   then 6 per resource:
--   mode: "end"    deposit unless this is the last holder, else take
--         "force"  take even if others still hold the resource
--         "cache"  always deposit (failed execute, fast shutdown); deletes exec
--         "orphan" take only if nobody holds the resource (recovery, flush)
--   kind: "json" (payload is one JSON partial, appended to a list),
--         "sums" (payload is "field\\tincrement\\n..." added with HINCRBY[FLOAT]) or
--         "fields" (the same layout, each field merged as its name says: merge_field)
--   recipe: JSON naming the Update class and its arguments, so a survivor can
--           rebuild the partial; kept in meta
--   payload: as above; "" deposits nothing
--   resource: its name, removed from the held set unless mode is "orphan"
--   marks: "partition\\toffset\\n..." the highest offset of each replayable
--          source partition the payload covers (for a stream: per consumer, the
--          entry id), or ""
-- MARKS. A payload with marks is recorded, in this same step, as covering its
-- events: seen (hash partition -> offset, expiring) keeps the highest offset per
-- partition of the resource's events that are safe in Redis or being written,
-- and KEYS[4] the highest over all resources. A worker replaying a partition
-- from its committed offset (after a kill) skips an event of a resource at or
-- below that resource's mark: it was counted already. So that a mark never
-- covers events that could still be lost, a last holder with marks and nothing
-- to take keeps its own payload in exec too (reply {3, kind, ""}), like any
-- taken set, until its write is done.
-- Taking renames the partials to exec, with the caller's own payload added (so
-- exec holds exactly what the caller will write), and exec_recipe is
-- "kind\\nexecution id\\nrecipe": the execution id is "<pid>:<seq>" from the exec
-- key's name, the identity of this set of partials, which survives recovery.
-- Returns, per resource: {0} when deposited (or nothing to take), or
--   {1, kind, recipe, item, ...} when taken, items as in ACQUIRE (without the
--   caller's own payload); recipe is the one kept in meta for "orphan" (the
--   caller has its own otherwise: "" then); or
--   {2, reason} when the deposit was refused, nothing of it merged (a sum Redis
--   cannot hold: deposit_refused): the resource is left all the same, and the
--   caller quarantines the payload. All of them as one JSON array (see remember).
-- On a Redis Cluster the four leading KEYS are replaced by one, the caller's replies
-- in this call's slot (see FENCE): the others are in another slot, and FENCE_HELD
-- checks the fence before and empties the held set after (store/slots.py).
local pid, now = ARGV[1], ARGV[2]
local head = #KEYS % 6
if head >= 3 and not redis.call('ZSCORE', KEYS[1], pid) then
  return redis.error_reply(FENCED .. pid)
end
local replies = replies_key(head)
local again = replayed(replies)
if again then return again end
local out, leaving = {}, {}
for i = 0, (#KEYS - head) / 6 - 1 do
  local k = head + i * 6
  local nodes, meta, partials = KEYS[k+1], KEYS[k+2], KEYS[k+3]
  local exec, exec_recipe = KEYS[k+4], KEYS[k+5]
  local a = 5 + i * 6
  local mode, kind, recipe, payload = ARGV[a], ARGV[a+1], ARGV[a+2], ARGV[a+3]
  local marks = ARGV[a+5]
  if marks ~= '' and mode ~= 'orphan' then
    record_marks(KEYS[k+6], head >= 4 and KEYS[4] or nil, marks)
  end
  local left
  if mode == 'orphan' then
    left = redis.call('HLEN', nodes)
  else
    leaving[#leaving + 1] = ARGV[a+4]
    redis.call('HDEL', nodes, pid)
    left = redis.call('HLEN', nodes)
  end
  local take = (mode == 'force') or (left == 0 and (mode == 'end' or mode == 'orphan'))
  if take then
    local t = redis.call('TYPE', partials)['ok']
    local items = {}
    if t == 'list' then
      items = redis.call('LRANGE', partials, 0, -1)
      kind = 'json'
    elseif t == 'hash' then
      items = redis.call('HGETALL', partials)
    end
    -- the recipe kept in meta, read only where it is needed (a redis.call each)
    local stored = recipe
    if t ~= 'none' or mode == 'orphan' or (marks ~= '' and payload ~= '') then
      stored = redis.call('HGET', meta, 'recipe') or recipe
    end
    if mode == 'orphan' then
      recipe = stored
    end
    if t == 'hash' then
      kind = redis.call('HGET', meta, 'kind') or kind
    end
    if t ~= 'none' then
      -- (a payload that cannot be summed into them stays out: the caller's write
      -- of the whole then fails, and it is quarantined with the set)
      if mode ~= 'orphan' and payload ~= '' and not deposit_refused(partials, kind, payload) then
        if kind == 'json' then
          redis.call('RPUSH', partials, payload)
        else
          merge_pairs(partials, kind, payload_pairs(payload))
        end
      end
      local eid = string.match(exec, ':exec:([^:]+:%d+)$') or exec
      redis.call('RENAME', partials, exec)
      redis.call('SET', exec_recipe, kind .. '\\n' .. eid .. '\\n' .. stored)
    elseif marks ~= '' and mode ~= 'orphan' and payload ~= '' then
      if kind == 'json' then
        redis.call('RPUSH', exec, payload)
      else
        merge_pairs(exec, kind, payload_pairs(payload))
      end
      local eid = string.match(exec, ':exec:([^:]+:%d+)$') or exec
      redis.call('SET', exec_recipe, kind .. '\\n' .. eid .. '\\n' .. stored)
      t = 'own'
    end
    if left == 0 then
      redis.call('DEL', meta)
    else
      redis.call('HDEL', meta, 'cached_ms')
    end
    if mode == 'orphan' and t == 'none' then
      out[i + 1] = {0}
    elseif t == 'own' then
      out[i + 1] = {3, kind, ''}
    else
      local r = {1, kind, mode == 'orphan' and recipe or ''}
      for _, v in ipairs(items) do r[#r + 1] = v end
      out[i + 1] = r
    end
  else
    local refused = nil
    if payload ~= '' then
      refused = deposit_refused(partials, kind, payload)
    end
    if refused then
      out[i + 1] = {2, refused}
    elseif payload ~= '' then
      if kind == 'json' then
        redis.call('RPUSH', partials, payload)
      else
        merge_pairs(partials, kind, payload_pairs(payload))
      end
      redis.call('HSET', meta, 'recipe', recipe, 'kind', kind)
      redis.call('HSETNX', meta, 'cached_ms', now)
      redis.call('HINCRBY', meta, 'times_modified', 1)
    end
    if mode == 'cache' then
      redis.call('DEL', exec, exec_recipe)
    end
    if left == 0 and redis.call('EXISTS', partials) == 0 then
      redis.call('DEL', meta)
    end
    if not refused then out[i + 1] = {0} end
  end
end
if head >= 3 then each_chunk('SREM', KEYS[2], leaving) end
return remember(replies, out)
"""

RELEASE_ALONE_LUA = """
-- The sole holder's way out (the run loop's fast path): leave each resource that
-- nobody else holds and that holds no partial, in one step, depositing and taking
-- nothing; leave every other untouched, for RELEASE. What this caller leaves so
-- was only ever in its memory: it writes it with no execution id (RELEASE would
-- have taken an empty set, kept nothing in Redis and answered the same). Only for
-- releases with no marks to record (sources that replay nothing) and not forced.
-- It needs three keys and one argument per resource, where RELEASE needs six and
-- six, and two redis.calls where RELEASE makes four: each costs Redis more than
-- the work it does.
-- KEYS[1] the process registry (fencing: see FENCE), KEYS[2] the caller's held set,
--   KEYS[3] its replies (lost replies: see FENCE), then 3 per resource: nodes, meta,
--   partials
-- ARGV[1] process id, ARGV[2] now (epoch ms, unused), ARGV[3] slot, ARGV[4] batch
--   id, then 1 per resource: its name (for the held set)
-- Returns a JSON string of one character per resource: "1" left (alone, nothing
--   to take), "0" nothing done. Not on a Redis Cluster (whether a resource leaves
--   the held set is known only here; there FENCE_HELD keeps it).
local pid = ARGV[1]
if not redis.call('ZSCORE', KEYS[1], pid) then
  return redis.error_reply(FENCED .. pid)
end
local again = replayed(KEYS[3])
if again then return again end
local flags, gone, leaving = {}, {}, {}
for i = 0, (#KEYS - 3) / 3 - 1 do
  local k = 3 + i * 3
  local holders = redis.call('HKEYS', KEYS[k+1])
  if (#holders == 0 or (#holders == 1 and holders[1] == pid))
      and redis.call('EXISTS', KEYS[k+3]) == 0 then
    gone[#gone + 1] = KEYS[k+1]
    gone[#gone + 1] = KEYS[k+2]
    leaving[#leaving + 1] = ARGV[5 + i]
    flags[i + 1] = '1'
  else
    flags[i + 1] = '0'
  end
end
-- (deleted after the loop, a thousand a call: nothing here writes them again)
for first = 1, #gone, 1000 do
  redis.call('DEL', unpack(gone, first, math.min(first + 999, #gone)))
end
each_chunk('SREM', KEYS[2], leaving)
return remember(KEYS[3], table.concat(flags))
"""

QUARANTINE_LUA = """
-- Set aside aggregates that can never be merged or written, in the same step that
-- forgets what they were taken from: never both quarantined and still waiting.
-- KEYS[1] the process registry (fencing: see FENCE), then 6 per resource: nodes,
--   meta, partials, quarantine (list of JSON records), exec, exec_recipe (the
--   partials taken to execute, if any; deleted)
-- ARGV[1] process id, then 1 per resource: the record (JSON: kind, recipe,
--   payload, error, at_ms)
-- Returns, per resource: the number of records now in its quarantine
-- On a Redis Cluster the leading KEYS[1] is left out (another slot): FENCE_HELD
-- checks the fence first (store/slots.py).
local head = #KEYS % 6
if head == 1 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return redis.error_reply(FENCED .. ARGV[1])
end
local out = {}
for i = 0, (#KEYS - head) / 6 - 1 do
  local k = head + i * 6
  local nodes, meta, partials, quarantine = KEYS[k+1], KEYS[k+2], KEYS[k+3], KEYS[k+4]
  redis.call('RPUSH', quarantine, ARGV[i + 2])
  redis.call('DEL', KEYS[k+5], KEYS[k+6])
  if redis.call('HLEN', nodes) == 0 and redis.call('EXISTS', partials) == 0 then
    redis.call('DEL', meta)
  end
  out[i + 1] = redis.call('LLEN', quarantine)
end
return out
"""

RECOVER_LUA = """
-- Remove a dead process from resources it held, and deal with what it was executing.
-- KEYS, 7 per resource: nodes, meta, partials, exec, exec_recipe (the dead
--   process's; they exist only if it died while executing), then adopt, adopt_recipe
--   (the survivor's own exec keys, for "adopt")
-- ARGV[1] the dead process's id, ARGV[2] now (epoch ms, unused), then 1 per resource:
--   "adopt": move the dead process's exec set, whole and with its execution id,
--            to the survivor's exec keys, for the survivor to execute (it knows
--            the class): a write the dead process had made already is then
--            recognised by an idempotent sink and not made again
--   "keep":  leave it whole where it is, execution id and all (the class is
--            unknown here): the caller lists it as stranded for a process that
--            knows the class to adopt later. Merging it into the partials would
--            lose its id (a zombie and whoever executes the partials could both
--            write it) and could overflow a sum inside this script.
-- Returns, per resource: {holders left, 1 if a partial is cached else 0,
--   exec_recipe of the adopted set or "", its items...}, or with "keep"
--   {holders left, cached, "", "kept"} when a set was left in place
local dead, now = ARGV[1], ARGV[2]
local out = {}
for i = 0, #KEYS / 7 - 1 do
  local k = i * 7
  local nodes, meta, partials = KEYS[k+1], KEYS[k+2], KEYS[k+3]
  local exec, exec_recipe = KEYS[k+4], KEYS[k+5]
  local adopt, adopt_recipe = KEYS[k+6], KEYS[k+7]
  redis.call('HDEL', nodes, dead)
  local t = redis.call('TYPE', exec)['ok']
  local adopted = {}
  local kept = false
  if t ~= 'none' and ARGV[3 + i] == 'adopt' then
    local saved = redis.call('GET', exec_recipe) or ''
    if t == 'list' then
      adopted = redis.call('LRANGE', exec, 0, -1)
    else
      adopted = redis.call('HGETALL', exec)
    end
    table.insert(adopted, 1, saved)
    redis.call('RENAME', exec, adopt)
    redis.call('SET', adopt_recipe, saved)
    redis.call('DEL', exec_recipe)
  elseif t ~= 'none' then
    kept = true
  end
  local cached = redis.call('EXISTS', partials)
  if cached == 0 and redis.call('HLEN', nodes) == 0 and #adopted == 0 and not kept then
    redis.call('DEL', meta)
  end
  local r = {redis.call('HLEN', nodes), cached}
  if #adopted == 0 then r[3] = '' end
  if kept then r[4] = 'kept' end
  for _, v in ipairs(adopted) do r[#r + 1] = v end
  out[i + 1] = r
end
return out
"""

HEARTBEAT_LUA = """
-- Say a process is alive, unless it was declared dead (fencing: see FENCE).
-- KEYS[1] its alive key, KEYS[2] its hash of figures, KEYS[3] the registry (zset),
--   KEYS[4] the namespace's store id
-- ARGV[1] process id, ARGV[2] now (epoch ms), ARGV[3] alive key TTL (ms),
--   ARGV[4] "1" for the first beat of a new id (registers it), ARGV[5] a store id
--   to set if the namespace has none, then field, value pairs
-- Returns the namespace's store id (set by its first process: a process that
--   finds it gone or changed knows the store was reset), or 0 if the process is
--   no longer registered: it was declared dead and may never come back under
--   this id (nothing is written).
local pid, now = ARGV[1], ARGV[2]
if ARGV[4] ~= '1' and not redis.call('ZSCORE', KEYS[3], pid) then
  return 0
end
redis.call('SET', KEYS[1], now, 'PX', ARGV[3])
if #ARGV > 5 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 6))
end
redis.call('ZADD', KEYS[3], now, pid)
redis.call('SET', KEYS[4], ARGV[5], 'NX')
return redis.call('GET', KEYS[4])
"""

DECLARE_DEAD_LUA = """
-- Declare processes dead: the first step of recovering them, and what fences them.
-- KEYS[1] the registry (zset), KEYS[2] the set of processes declared dead whose
--   recovery is not finished, then each candidate's alive key
-- ARGV: the candidates' ids, in the order of their alive keys
-- A candidate whose alive key exists again (it beat meanwhile) is left alone.
-- Returns the ids declared dead now.
local out = {}
for i, pid in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 2]) == 0 and redis.call('ZREM', KEYS[1], pid) == 1 then
    redis.call('SADD', KEYS[2], pid)
    out[#out + 1] = pid
  end
end
return out
"""

FENCE_HELD_LUA = """
-- On a Redis Cluster, what ACQUIRE and RELEASE do with the process's own keys, which
-- live in another slot than the batch's resources (store/slots.py): sent, and
-- answered, before the batch's per-slot calls ("+") or after them ("-").
-- KEYS[1] the process registry (fencing: see FENCE), KEYS[2] the caller's held set,
--   KEYS[3] (a batch with releases) the highest mark per source partition
-- ARGV[1] process id, ARGV[2] "+" (check the fence, then add) or "-" (remove),
--   ARGV[3] the marks of the batch's releases (RELEASE's MARKS) or "", then the
--   resources
-- The partitions' highest marks are raised here, before the batch that records
-- the keys' own marks: a highest mark only says which replayed chunks to check,
-- so one raised for a batch that then never lands costs a check, nothing more.
-- Returns 1, or the FENCED error (nothing written) if "+" finds the process gone.
local pid, op = ARGV[1], ARGV[2]
if op == '+' and not redis.call('ZSCORE', KEYS[1], pid) then
  return redis.error_reply(FENCED .. pid)
end
if op == '+' and KEYS[3] and ARGV[3] ~= '' then
  record_marks(nil, KEYS[3], ARGV[3])
end
for i = 4, #ARGV do
  if op == '+' then
    redis.call('SADD', KEYS[2], ARGV[i])
  else
    redis.call('SREM', KEYS[2], ARGV[i])
  end
end
return 1
"""

UNQUARANTINE_LUA = """
-- Put a resource's quarantined aggregates back as its cached partial, for the
-- next holder, a survivor or ``phonon flush -c`` to execute (``phonon quarantine
-- retry``). A record that still cannot be summed in (deposit_refused) stays, and
-- so does one the caller holds back (a number no partial can hold exactly).
-- KEYS[1] meta, KEYS[2] partials, KEYS[3] quarantine (list of JSON records)
-- ARGV[1] now (epoch ms), then the records (as stored) to keep where they are
-- Returns {records moved, records kept, why the last one refused here was}
local meta, partials, quarantine = KEYS[1], KEYS[2], KEYS[3]
local kept, moved, reason = {}, 0, ''
local held = {}
for i = 2, #ARGV do held[ARGV[i]] = true end
for _, text in ipairs(redis.call('LRANGE', quarantine, 0, -1)) do
  local r = (not held[text]) and cjson.decode(text)
  local refused = r and deposit_refused(partials, r.kind, r.payload)
  if not r then
    kept[#kept + 1] = text
  elseif refused then
    kept[#kept + 1] = text
    reason = refused
  else
    if r.kind == 'json' then
      redis.call('RPUSH', partials, r.payload)
    else
      merge_pairs(partials, r.kind, payload_pairs(r.payload))
    end
    redis.call('HSET', meta, 'recipe', r.recipe, 'kind', r.kind)
    redis.call('HSETNX', meta, 'cached_ms', ARGV[1])
    redis.call('HINCRBY', meta, 'times_modified', 1)
    moved = moved + 1
  end
end
redis.call('DEL', quarantine)
if #kept > 0 then redis.call('RPUSH', quarantine, unpack(kept)) end
return {moved, #kept, reason}
"""

LOCK_RELEASE_LUA = """
-- Release a lock only if we own it.
-- KEYS[1] the lock; ARGV[1] our token
-- Returns 1 if released, 0 if the lock is not ours (expired or taken by another)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

LOCK_EXTEND_LUA = """
-- Extend a lock's expiry only if we own it.
-- KEYS[1] the lock; ARGV[1] our token; ARGV[2] new expiry in ms
-- Returns 1 if extended, 0 if the lock is not ours
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

LOCK_TAKE_OVER_LUA = """
-- Take a lock over from an owner that died holding it, only if it still holds it.
-- KEYS[1] the lock; ARGV[1] the dead owner's token (as read), ARGV[2] our token,
--   ARGV[3] expiry in ms
-- Returns 1 if taken, 0 if the lock changed meanwhile (released, expired, retaken)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

CLAIM_LUA = """
-- Claim a dead consumer's pending entries into one of the caller's consumers.
-- Listing them and claiming them are this one step: XCLAIM takes an entry from
-- whoever holds it, so a claimer that listed them, then stalled (a GC pause, a
-- frozen VM) while another claimed and counted them, would take them back and
-- have them counted again. Here only entries still pending on the dead consumer
-- at this instant are taken; one claimed from it since is pending elsewhere.
-- KEYS[1] the stream, KEYS[2] its lineage (hash: a consumer entries were claimed
--   into -> the one they came from), KEYS[3] the process registry (fencing: see
--   FENCE). On a Redis Cluster only KEYS[1]: the others are in other slots, and
--   the caller writes the lineage before (see stream.StreamSource._claim_from).
-- ARGV[1] the group, ARGV[2] the dead consumer, ARGV[3] the caller's consumer to
--   claim into, ARGV[4] at most so many entries, ARGV[5] the caller's process id,
--   ARGV[6] the lineage's TTL (ms)
-- Returns {0} when the dead consumer has nothing pending (it is deleted), else
--   {n listed, entry, ...} with each claimed entry as XCLAIM answers it: {id,
--   {field, value, ...}}. An entry deleted from the stream while pending is
--   acknowledged (nothing is left to count) and left out. The FENCED error
--   (nothing claimed) if the caller was declared dead.
local stream, group, dead, into = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if KEYS[3] and not redis.call('ZSCORE', KEYS[3], ARGV[5]) then
  return redis.error_reply(FENCED .. ARGV[5])
end
local pending = redis.call('XPENDING', stream, group, '-', '+', tonumber(ARGV[4]), dead)
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', stream, group, dead)
  return {0}
end
if KEYS[2] then
  redis.call('HSET', KEYS[2], into, dead)
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
local ids = {}
for i, p in ipairs(pending) do ids[i] = p[1] end
local out, found = {#pending}, {}
for _, entry in ipairs(redis.call('XCLAIM', stream, group, into, 0, unpack(ids))) do
  if type(entry) == 'table' and type(entry[2]) == 'table' then
    out[#out + 1] = entry
    found[entry[1]] = true
  end
end
-- Redis 6.2 keeps a deleted entry pending (its XCLAIM answer is nil); 7 drops it.
local gone = {}
for _, id in ipairs(ids) do
  if not found[id] then gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('XACK', stream, group, unpack(gone)) end
return out
"""

FENCE_LUA = """
-- Fencing. A process is alive while its alive key exists. Once that key has
-- expired a survivor may declare it dead (DECLARE_DEAD: out of the registry, in
-- one step that checks the key is still gone) and then recover what it held.
-- Every script that changes shared state on a process's behalf first checks,
-- in the same atomic step, that the process is still registered, and fails with
-- this error if not; HEARTBEAT never registers it again. So a paused process
-- that wakes up after being declared dead can apply nothing under its id, and
-- one that was merely late, with nobody declaring it dead, simply goes on.
local FENCED = 'PHONON_FENCED process declared dead: '

-- Lost replies. A batch whose reply is lost (the connection dropped after Redis
-- ran it) is sent again, by redis-py or by scripts.run. Each call carries its
-- batch id, and its reply is kept in the caller's hash of replies under the
-- call's slot, so the same call sent again returns the first reply and changes
-- nothing: a deposit is never made twice, a taken set never taken again.
-- KEYS[3] the caller's replies hash; ARGV[3] the call's slot, ARGV[4] its batch id.
-- On a Redis Cluster a batch is one call per hash slot (store/slots.py), and the
-- caller's replies hash is one per slot, in the call's own slot (Keys.slot_replies),
-- passed as the only leading key: each per-slot call is recognised on its own.
local function replies_key(head)
  if head >= 3 then return KEYS[3] end
  if head == 1 then return KEYS[1] end
  return nil
end

local function replayed(replies)
  if not replies then return nil end
  local prior = redis.call('HGET', replies, ARGV[3])
  local bid = ARGV[4] .. '\\n'
  if prior and string.sub(prior, 1, #bid) == bid then
    return string.sub(prior, #bid + 1)
  end
end

-- A mark is a file offset ("N") or a stream entry id ("MS-SEQ"); as two numbers
-- (N, 0) or (MS, SEQ) they order as the marks do. Streams need no highest mark:
-- only their entries claimed from a dead consumer are checked (run/loop.py).
local function mark_order(mark)
  local ms, seq = string.match(mark, '^(%d+)-(%d+)$')
  if ms then return tonumber(ms), tonumber(seq) end
  return tonumber(mark), 0
end

local function mark_after(mark, cur)
  if not cur then return true end
  local a, b = mark_order(mark)
  local c, d = mark_order(cur)
  return a > c or (a == c and b > d)
end

local function record_marks(seen, highest, marks)
  for part, offset in string.gmatch(marks, '([^\\t\\n]+)\\t([^\\n]+)') do
    if seen and mark_after(offset, redis.call('HGET', seen, part)) then
      redis.call('HSET', seen, part, offset)
    end
    if highest and not string.find(offset, '-', 1, true)
        and mark_after(offset, redis.call('HGET', highest, part)) then
      redis.call('HSET', highest, part, offset)
    end
  end
  if seen then redis.call('PEXPIRE', seen, 604800000) end
end

-- One command for many members (SADD/SREM of the held set, per batch rather than
-- per resource: a redis.call costs about as much as the work it does), in chunks
-- that Lua's unpack can take.
local function each_chunk(command, key, members)
  for first = 1, #members, 1000 do
    redis.call(command, key, unpack(members, first, math.min(first + 999, #members)))
  end
end

-- A batched script's reply is its per-resource answers as one JSON array, one bulk
-- string: Redis 6.2 writes each array nested in a script's reply with a write
-- call of its own, so a batch of 1,000 answers cost 1,000 tiny writes and reads.
-- (scripts.answers decodes it; an empty array is encoded as {}.)
local function remember(replies, out)
  local text = cjson.encode(out)
  if not replies then return text end
  redis.call('HSET', replies, ARGV[3], ARGV[4] .. '\\n' .. text)
  redis.call('PEXPIRE', replies, 3600000)
  return text
end
"""

# Scripts are passed as bytes so no client is needed to hash them; each call names its client.
ACQUIRE_LUA = FENCE_LUA + ACQUIRE_LUA
RELEASE_LUA = FENCE_LUA + MERGE_LUA + RELEASE_LUA
FENCE_HELD_LUA = FENCE_LUA + FENCE_HELD_LUA

ACQUIRE = Script(None, ACQUIRE_LUA.encode())  # type: ignore[arg-type]
RELEASE = Script(None, RELEASE_LUA.encode())  # type: ignore[arg-type]
RELEASE_ALONE = Script(None, (FENCE_LUA + RELEASE_ALONE_LUA).encode())  # type: ignore[arg-type]
RECOVER = Script(None, RECOVER_LUA.encode())  # type: ignore[arg-type]
QUARANTINE = Script(None, (FENCE_LUA + QUARANTINE_LUA).encode())  # type: ignore[arg-type]
UNQUARANTINE = Script(None, (MERGE_LUA + UNQUARANTINE_LUA).encode())  # type: ignore[arg-type]
LOCK_RELEASE = Script(None, LOCK_RELEASE_LUA.encode())  # type: ignore[arg-type]
LOCK_EXTEND = Script(None, LOCK_EXTEND_LUA.encode())  # type: ignore[arg-type]
LOCK_TAKE_OVER = Script(None, LOCK_TAKE_OVER_LUA.encode())  # type: ignore[arg-type]
HEARTBEAT = Script(None, HEARTBEAT_LUA.encode())  # type: ignore[arg-type]
DECLARE_DEAD = Script(None, DECLARE_DEAD_LUA.encode())  # type: ignore[arg-type]
FENCE_HELD = Script(None, FENCE_HELD_LUA.encode())  # type: ignore[arg-type]
CLAIM = Script(None, (FENCE_LUA + CLAIM_LUA).encode())  # type: ignore[arg-type]

ALL = (
    ACQUIRE,
    RELEASE,
    RECOVER,
    QUARANTINE,
    LOCK_RELEASE,
    LOCK_EXTEND,
    LOCK_TAKE_OVER,
    HEARTBEAT,
    DECLARE_DEAD,
    FENCE_HELD,
    CLAIM,
    RELEASE_ALONE,
)

FENCED_ERROR = "PHONON_FENCED"
"""How a fenced script's error starts (see FENCE_LUA)."""

LAYOUT: dict[str, slots.Layout] = {
    ACQUIRE.sha: slots.Layout(3, 3, 2, held=lambda a: ("+", a[1]), replies=True),
    RELEASE.sha: slots.Layout(
        4,
        6,
        6,
        held=lambda a: None if a[0] == "orphan" else ("-", a[4]),
        replies=True,
        marks=lambda a: "" if a[0] == "orphan" else str(a[5]),
    ),
    RECOVER.sha: slots.Layout(0, 7, 1),
    QUARANTINE.sha: slots.Layout(1, 6, 1),
}
"""How each batched script lays out its KEYS and ARGV, for the per-slot split on a
Redis Cluster (``slots``): the process's own keys first (for ACQUIRE and RELEASE the
registry, the held set, for RELEASE the highest marks, then the template of the
per-slot replies), then so many keys and arguments per resource, which resources
enter (+) or leave (-) the held set, and the marks a resource's release records."""


def answers(reply: Any) -> list[Any]:
    """The per-resource answers of a batched ACQUIRE or RELEASE (a JSON array: see
    FENCE_LUA's ``remember``). An empty answer reads as ``{}``, which is falsy."""
    if isinstance(reply, (str, bytes)):
        decoded = orjson.loads(reply)
        if isinstance(decoded, str):  # RELEASE_ALONE: a character per resource
            return list(decoded)
        return decoded if isinstance(decoded, list) else []
    return list(reply)


def load(pipe: Pipeline) -> None:
    """Queue SCRIPT LOAD of every script (a process does it with its first heartbeat).

    A cluster pipeline cannot route SCRIPT LOAD: it is sent to every primary at once.
    """
    if is_cluster(pipe):
        slots.load(pipe, ALL)
        return
    for script in ALL:
        pipe.script_load(script.script)


def queue(pipe: Pipeline, script: Script, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue an EVALSHA on a pipeline.

    Not ``script(client=pipe)``: redis-py then sends SCRIPT EXISTS before every
    pipeline, doubling the round trips. Scripts are loaded up front instead,
    and ``run`` reloads them if the server lost them (a restart, SCRIPT FLUSH).
    """
    if is_cluster(pipe):
        slots.queue(pipe, script, keys, args, LAYOUT.get(script.sha))
    else:
        pipe.evalsha(script.sha, len(keys), *keys, *args)


def run(
    client: redis.Redis,
    build: Callable[[Pipeline], object],
    timeout_s: float = 0.0,
    op: str = "other",
) -> list[Any]:
    """Execute the pipeline that ``build`` fills: one round trip (on a cluster, one
    per node, all nodes written before any is read).

    Each attempt is timed into ``telemetry.STORE_BATCH_SECONDS`` under ``op`` (what
    the batch does: acquire, release, finish, quarantine, recover, heartbeat).

    A dropped connection is retried, with backoff, for up to ``timeout_s``
    seconds (beyond redis-py's own few quick retries): sending the same pipeline
    again is safe on one server, as its scripts recognise a batch they already
    ran (see FENCE_LUA) and every other command in our pipelines is idempotent; on a
    cluster each per-slot call is recognised in its own slot.

    Raises:
        redis.ConnectionError, redis.TimeoutError: the store stayed unreachable.
        Fenced: this process was declared dead.
    """
    deadline = time.monotonic() + timeout_s
    pause_s = 0.1
    timer = telemetry.STORE_BATCH_SECONDS.labels(op)
    while True:
        started = time.perf_counter()
        try:
            try:
                return _run_once(client, build)
            finally:  # a failed attempt is a round trip too, and may be the slow one
                timer.observe(time.perf_counter() - started)
        except (ConnectionError, TimeoutError) as e:
            if time.monotonic() + pause_s > deadline:
                raise
            log.warning("store unreachable (%s); retrying", e)
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 2.0)


def send(
    client: redis.Redis,
    build: Callable[[Pipeline], object],
    timeout_s: float = 0.0,
    op: str = "other",
) -> Callable[[], list[Any]]:
    """``run`` in two steps: the pipeline is written now, and the function returned
    reads its replies (as ``run`` returns them). The caller does other work while
    Redis runs the batch: the run loop handles the next events.

    Call the function before sending anything that must follow the batch: a
    pipeline on another connection may run before this one. Whatever goes wrong
    (a dropped connection, scripts flushed) is handled as ``run`` does, by sending
    the whole pipeline again through ``run``: its scripts recognise a batch they
    already ran (see FENCE_LUA), so a batch is never applied twice.

    On a cluster the pipeline is run at once (one round trip per node already).
    """
    if is_cluster(client):
        done = run(client, build, timeout_s, op)
        return lambda: done
    pipe = client.pipeline(transaction=False)
    build(pipe)
    commands = [args for args, _ in pipe.command_stack]
    pool = client.connection_pool
    started = time.perf_counter()
    try:
        conn = pool.get_connection()  # connects: may fail as the store is away
    except (ConnectionError, TimeoutError):
        done = run(client, build, timeout_s, op)  # retried, with backoff
        return lambda: done
    try:
        conn.send_packed_command(conn.pack_commands(commands))  # type: ignore[no-untyped-call]
    except (ConnectionError, TimeoutError):
        conn.disconnect()  # type: ignore[no-untyped-call]
        pool.release(conn)
        done = run(client, build, timeout_s, op)
        return lambda: done

    def replies() -> list[Any]:
        answers: list[Any] = []
        try:
            for args in commands:
                try:
                    answer = client.parse_response(conn, args[0])  # type: ignore[no-untyped-call]
                    answers.append(answer)
                except ResponseError as e:
                    answers.append(e)
            faults.point("lost-reply")
        except (ConnectionError, TimeoutError) as e:
            conn.disconnect()  # type: ignore[no-untyped-call]
            log.warning("store unreachable (%s); sending the batch again", e)
            return run(client, build, timeout_s, op)
        finally:
            pool.release(conn)
            telemetry.STORE_BATCH_SECONDS.labels(op).observe(time.perf_counter() - started)
        errors = [a for a in answers if isinstance(a, ResponseError)]
        if any(isinstance(a, NoScriptError) for a in errors):
            return run(client, build, timeout_s, op)  # run loads them first
        for error in errors:
            if FENCED_ERROR in str(error):
                raise Fenced(str(error)) from None
        if errors:
            raise errors[0]
        return answers

    return replies


def _run_once(client: redis.Redis, build: Callable[[Pipeline], object]) -> list[Any]:
    # If the scripts were flushed, none of the EVALSHAs ran; the other commands
    # are idempotent, so loading the scripts and running it all again is safe. On
    # a cluster only the calls a node refused are sent again (``slots``): the
    # others did run.
    if is_cluster(client):
        try:
            replies = slots.run(client, build, ALL, FENCE_HELD)  # type: ignore[arg-type]
            faults.point("lost-reply")
            return replies
        except ResponseError as e:
            if FENCED_ERROR in str(e):
                raise Fenced(str(e)) from None
            raise
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        build(pipe)
        try:
            replies = pipe.execute()
            faults.point("lost-reply")
            return replies
        except NoScriptError:
            if attempt == 2:
                raise
            reload = client.pipeline(transaction=False)
            load(reload)
            reload.execute()
        except ResponseError as e:
            if FENCED_ERROR in str(e):
                raise Fenced(str(e)) from None
            raise
    raise AssertionError("unreachable")
