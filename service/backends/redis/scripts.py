"""The Lua scripts of Redis mode, all of them: each step that must be atomic across replicas runs as one script.

Each is safe to run again after its reply was lost (redis-py retries a
command whose connection dropped, and the runner retries a terminal write).
"""

from service.backends.redis.side_scripts import APPEND_EVENT

# What the steps of one script call tell each other (HANDOFF_SCRIPT runs FINISH, then TAKE), so the second does not
# ask Redis again: the generation key's value (generation_in: read once; FENCE writes it when it makes a new one) and
# the slot key FINISH let go of (free now); HANDOFF_SCRIPT's FINISH leaves its message to the end (ended_now). Every
# script of the steps below starts with it.
STEP_STATE = """
local generation_read, generation_known, released_slot = false, false, false
local ended_now = false  -- FINISH stored the end without its "finished" message: HANDOFF_SCRIPT sends one after TAKE
local function generation_in(key)
  if not generation_known then generation_read, generation_known = redis.call('GET', key), true end
  return generation_read
end
"""

# A Lua function for the scripts that give out slots: whether they may. Every replica writes the generation key as
# it starts (SET NX); Redis without it has lost its data (FLUSHALL, a restart without persistence, a failover), and
# with it the slot keys of runs that may still be going. The first script to see that makes a new generation and
# the fence, a key that lives one lock TTL: no slot is given out while it stands, and every live holder renews
# (RENEW_SCRIPT takes its slot back) well within it. Returns whether slots may be given out, 1 when this call
# found the loss (for the caller to log), else 0, and the generation now in Redis.
FENCE = """
local function fence_open(generation, fence, new_generation, ttl_ms)
  local current = generation_in(generation)
  if not current then
    redis.call('SET', generation, new_generation)
    redis.call('SET', fence, new_generation, 'PX', ttl_ms)
    generation_read = new_generation
    return false, 1, new_generation
  end
  return redis.call('EXISTS', fence) == 0, 0, current
end
"""

MINT = """
-- Fencing tokens: a slot given out mints one, the larger of the counter plus one, Redis's clock in microseconds
-- and the caller's floor (the highest token its replica has seen) plus one. So each is above every token minted
-- before it, also after Redis lost the counter (the clock and the floors keep above the old ones). It goes into
-- the run's record, whose JSON ends with its fencing_token field: with_token writes it there, token_of reads it.
local function mint(counter, floor)
  local t = redis.call('TIME')
  local token = math.max(t[1] * 1000000 + t[2], tonumber(floor) + 1)
  local before = tonumber(redis.call('SET', counter, string.format('%.0f', token), 'GET') or '0')
  if before >= token then  -- the counter is ahead (mints within one microsecond, a clock set back): above it
    token = before + 1
    redis.call('SET', counter, string.format('%.0f', token))
  end
  return token
end
local function with_token(record, token)
  local field = '"fencing_token":' .. string.format('%.0f', token) .. '}'
  local tail = string.sub(record, -40)
  local at = string.find(tail, '"fencing_token":[%dnul]+}$')
  if at then return string.sub(record, 1, #record - #tail + at - 1) .. field end
  return string.sub(record, 1, -2) .. ',' .. field  -- a record of a version without tokens
end
local function token_of(record)
  return tonumber(string.match(string.sub(record or '', -40), '"fencing_token":(%d+)}$')) or 0
end
"""

# A Lua function for the scripts that give out slots: whether a run may have been left behind by a holder that
# is gone (ORPHANS_SCRIPT would find it), told in O(slots): more unfinished runs than slots held. The run starting
# on the slot just given out then looks for orphans before it records RUNNING, so an orphan's RUNNING record and the
# new run's are never both shown; when there is none to suspect, that look (a scan of the unfinished index) is
# left to the periodic one. Slots are KEYS[first..last] of the caller, the first ``known`` of them (0 when absent)
# known to be held (the caller tried them in order and found them taken, or took the last): only the others are
# looked at (``keys``: the caller's KEYS). unfinished_count is the unfinished index's size after the caller's writes, read (HLEN) before any of
# them, so a failure of that read (a missing ACL permission) leaves nothing half written. Returns the flag (1 or 0)
# and the number of those slots held.
ORPHANS_SUSPECT = """
local function orphans_suspect(keys, unfinished_count, first, last, known)
  local held = known or 0
  for i = first + held, last do held = held + redis.call('EXISTS', keys[i]) end
  return unfinished_count > held and 1 or 0, held
end
"""

# Admit a run in one step: on a free slot when nobody waits (the record, its index and its holder written
# with it), else into the queue when ARGV[4] allows and there is room. A retry whose first reply was lost
# answers what the first call did (a queued run that has left the queue since: {2, 0}; never busy, as the run
# was accepted). With an Idempotency-Key (ARGV[10], its hash, or ''), the run is admitted
# only while the key is still this request's claim (its run_id is ARGV[3]: not expired, not taken over), and the
# key is marked accepted for ARGV[12] ms in the same step.
# ARGV: json now, json queued, run_id, on_busy, queue_max, token, ttl_ms, n, channel, key hash, fingerprint,
# key ttl_ms, new generation, token floor (MINT). KEYS: queue, run, runs, seq, unfinished, slot 0..n-1, generation,
# fence, fencing counter. Returns {outcome, value, generation, lost, fencing token, suspect}: {1, slot} started (under that
# generation, its token minted and in the record), {2, position} queued, {0, 0} busy, {-1, 0} queue full, {-2, 0}
# the key's claim was lost; lost is 1 when this call found that Redis lost its data (FENCE). The generation is
# the one in Redis (the new one, when this call made it: a re-run after a lost reply still shows it as this
# call's). While the fence stands it answers as if every slot were taken: busy, or queued. suspect: as in
# TAKE_SCRIPT (ORPHANS_SUSPECT), on a started run.
ADMIT_SCRIPT = STEP_STATE + FENCE + MINT + ORPHANS_SUSPECT + """
local unfinished_count = redis.call('HLEN', KEYS[5])
local n = tonumber(ARGV[8])
if redis.call('EXISTS', KEYS[2]) == 1 then
  for i = 1, n do
    if redis.call('GET', KEYS[5 + i]) == ARGV[6] then
      return {1, i - 1, redis.call('GET', KEYS[6 + n]) or '', 0, token_of(redis.call('GET', KEYS[2])),
              (orphans_suspect(KEYS, unfinished_count, 6, 5 + n))}
    end
  end
  local pos = redis.call('LPOS', KEYS[1], ARGV[3])
  return {2, pos and pos + 1 or 0, redis.call('GET', KEYS[6 + n]) or '', 0}
end
if ARGV[10] ~= '' and redis.call('HGET', ARGV[10], 'run_id') ~= ARGV[3] then return {-2, 0, '', 0} end
local function accept_key()
  if ARGV[10] == '' then return end
  redis.call('HSET', ARGV[10], 'fingerprint', ARGV[11], 'run_id', ARGV[3], 'state', 'accepted')
  redis.call('PEXPIRE', ARGV[10], ARGV[12])
end
local open, lost, generation = fence_open(KEYS[6 + n], KEYS[7 + n], ARGV[13], ARGV[7])
local waiting = redis.call('LLEN', KEYS[1])
if waiting == 0 and open then
  for i = 1, n do
    if redis.call('SET', KEYS[5 + i], ARGV[6], 'NX', 'PX', ARGV[7]) then
      local token = mint(KEYS[8 + n], ARGV[14])
      redis.call('SET', KEYS[2], with_token(ARGV[1], token))
      redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[4]), ARGV[3])
      redis.call('HSET', KEYS[5], ARGV[3], ARGV[6])
      accept_key()
      return {1, i - 1, generation, 0, token, (orphans_suspect(KEYS, unfinished_count + 1, 6, 5 + n, i))}
    end
  end
end
if ARGV[4] == 'reject' then return {0, 0, generation, lost} end
if waiting >= tonumber(ARGV[5]) then return {-1, 0, generation, lost} end
redis.call('SET', KEYS[2], ARGV[2])
accept_key()
redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[4]), ARGV[3])
local position = 1
if ARGV[4] == 'interrupt' then redis.call('LPUSH', KEYS[1], ARGV[3]) else position = redis.call('RPUSH', KEYS[1], ARGV[3]) end
redis.call('PUBLISH', ARGV[9], ARGV[3])
return {2, position, generation, lost}
"""

# A Lua function for the scripts below: the set of tokens that the slot keys KEYS[first..] hold.
LIVE_TOKENS = """
local function live_tokens(first)
  local live = {}
  for i = first, #KEYS do
    local token = redis.call('GET', KEYS[i])
    if token then live[token] = true end
  end
  return live
end
"""

# Claim the unfinished runs whose holder token no longer holds any slot (their replica died or lost its lock)
# for the claim token ARGV[1], in one step: they pass to that token in the unfinished index, and the claim key
# (KEYS[2]) marks it alive for ARGV[2] ms, while the caller records them (FINISH takes them out). So no live
# run is taken for one, no orphan is claimed by two live callers, a retry after a lost reply answers them
# again, and if the caller dies before recording them its claim expires and they are orphans again. A token
# is alive if it holds a slot, is one of the caller's (ARGV[4..]: its runs end by its own hand, lock_lost), or
# has a claim key (ARGV[3] .. token). KEYS: unfinished, claim key, slot 0..n-1.
# ARGV: claim token, claim ttl_ms, claim key prefix, the caller's tokens. Returns {run_id, token, ...}.
ORPHANS_SCRIPT = LIVE_TOKENS + """
local live = live_tokens(3)
for i = 4, #ARGV do live[ARGV[i]] = true end
local entries = redis.call('HGETALL', KEYS[1])
local orphans = {}
for i = 1, #entries, 2 do
  local id, token = entries[i], entries[i + 1]
  local mine = token == ARGV[1]
  if mine or (not live[token] and redis.call('EXISTS', ARGV[3] .. token) == 0) then
    if not mine then redis.call('HSET', KEYS[1], id, ARGV[1]) end
    table.insert(orphans, id)
    table.insert(orphans, token)
  end
end
if #orphans > 0 then redis.call('SET', KEYS[2], 1, 'PX', ARGV[2]) end
return orphans
"""

# Ask the oldest run that holds a live slot and is not stopping yet (no cancel flag, not in ARGV[4..]: runs the
# caller's replica is stopping already) to stop for the interrupting run ARGV[2] (flag and message), in one
# step, so two interrupts never pick the same run and none picks itself. A retry whose first reply was lost
# answers the run it picked. KEYS: unfinished, runs, slot 0..n-1. ARGV: cancel key prefix, interrupting run,
# cancel channel, run ids to skip. Returns the run id, or nil when no run can be interrupted.
INTERRUPT_SCRIPT = LIVE_TOKENS + """
local live, skip = live_tokens(3), {[ARGV[2]] = true}
for i = 4, #ARGV do skip[ARGV[i]] = true end
local entries = redis.call('HGETALL', KEYS[1])
local oldest, best
for i = 1, #entries, 2 do
  local id = entries[i]
  local flag = redis.call('GET', ARGV[1] .. id)
  if flag == ARGV[2] then return id end
  if live[entries[i + 1]] and not skip[id] and not flag then
    local score = tonumber(redis.call('ZSCORE', KEYS[2], id))
    if score and (best == nil or score < best) then oldest, best = id, score end
  end
end
if oldest == nil then return nil end
redis.call('SET', ARGV[1] .. oldest, ARGV[2], 'EX', 3600)
redis.call('PUBLISH', ARGV[3], oldest .. ' ' .. ARGV[2])
return oldest
"""

# A Lua function for the takes that store a run RUNNING (TAKE): the record as admission queued it, with its state,
# start time and queue position changed. The record's own state field is the last ',"state":"PENDING","result":null,'
# in it: after it come only strings (their quotes escaped), numbers and nulls, while the input object before it may
# hold any text. Returns nil for a record the patterns do not fit (the runner then stores RUNNING itself).
MARK_RUNNING = """
local function mark_running(record, started)
  local at, from = nil, 1
  while true do
    local found = string.find(record, ',"state":"PENDING","result":null,', from, true)
    if not found then break end
    at, from = found, found + 1
  end
  if not at then return nil end
  local tail = string.gsub(string.sub(record, at), '^,"state":"PENDING"', ',"state":"RUNNING"')
  local starts, positions
  tail, starts = string.gsub(tail, '"started_at":null,', '"started_at":"' .. started .. '",', 1)
  tail, positions = string.gsub(tail, '"queue_position":%d+,', '"queue_position":null,', 1)
  if starts ~= 1 or positions ~= 1 then return nil end
  return string.sub(record, 1, at - 1) .. tail
end
"""

# Take the head of the queue and a free slot in one step. A take whose answer was lost is asked again with the
# same token (by redis-py, or by the next dispatch with ARGV[4] = '1'): it answers the run that token took, on
# its slot, or on a free one if that slot expired meanwhile (no other replica touches a run while its token is
# in the unfinished index), so the head of the line is never skipped nor left holding a slot for nothing.
# No slot is given out while the fence stands (FENCE). A slot given out mints a fencing token (MINT), written into
# the run's record; the answer to a take whose slot it still holds repeats the token. When every slot is held by
# other tokens (and it is no retry), it answers at once, with the generation and without looking for a loss: the
# fence and the queue are not read (the other replicas' takes after a run ended elsewhere cost three commands).
# With a start time (ARGV[8]), a run taken from the queue is stored RUNNING in the same step (MARK_RUNNING), so the
# runner's own write of it is saved, unless there is a reason to write it from the runner: an orphan may stand
# beside it (suspect: the runner claims it first), or a cancel was asked while it waited (the runner reads the flag as
# it stores RUNNING). A retry answers the record as stored (RUNNING or not): it is never marked twice.
# KEYS: queue, unfinished, slot 0..n-1, generation, fence, fencing counter. ARGV: token, ttl_ms, n, retry, new
# generation, token floor, run key prefix (<prefix>:run:), start time ('' or absent: not stored RUNNING here).
# Returns {run_id, slot, generation, lost, fencing token, suspect, again, record, waiting, event}, run_id '' (and slot
# -1) when none was taken; generation and lost as in ADMIT_SCRIPT; suspect (ORPHANS_SUSPECT): 1 when a run may have
# been left behind; again: 1 when another take could start a run now (a run waits and a slot is free), else 0 (no
# take is asked for until something changes: a run queued, a slot freed); record: the taken run's record as stored,
# its token (and RUNNING, when stored so) in it (nil when it is missing), so the caller needs no read of its own;
# waiting: the queue's length after the take; event: for a run this token took before and still holds the slot of
# (a retry), the id of its RUNNING event when its stream ends with it (a handoff's take, given up on and asked again
# by dispatch, appended it), else false (also when the slot expired: the token minted again is not in that event).
# TAKE is the step as a function of its keys and arguments (HANDOFF_SCRIPT runs it after FINISH).
TAKE = """
local marked_now = false  -- this call stored the run it took RUNNING: HANDOFF_SCRIPT
local function cancel_key(run_prefix, id)  -- <prefix>:cancel:<id>, beside <prefix>:run:<id>
  return string.sub(run_prefix, 1, -5) .. 'cancel:' .. id
end
local function running_event(run_prefix, id)  -- the id of the run's RUNNING event, when its stream ends with it
  local stream = string.sub(run_prefix, 1, -5) .. 'events:run:' .. id
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if newest and newest[2][6] == 'RUNNING' then return newest[1] end
  return false
end
local function take(K, A)
  local n = tonumber(A[3])
  local held, free
  for i = 1, n do
    local holder = K[2 + i] ~= released_slot and redis.call('GET', K[2 + i])
    if holder == A[1] then held = i elseif not holder then free = true end
  end
  if not held and not free and A[4] ~= '1' then  -- every slot held by others: nothing to take, nothing to check
    return {'', -1, generation_in(K[3 + n]) or '', 0}
  end
  local unfinished_count = redis.call('HLEN', K[2])
  local open, lost, generation = fence_open(K[3 + n], K[4 + n], A[5], A[2])
  local function taken(id, slot, found_lost, record, token, added, waiting, retried)
    local known = token == nil and slot + 1 or 0  -- just taken, trying the slots in order: those before it are held
    local suspect, held = orphans_suspect(K, unfinished_count + (added or 0), 3, 2 + n, known)
    if token == nil then
      token = mint(K[5 + n], A[6])
      if record then
        record = with_token(record, token)
        if added and (A[8] or '') ~= '' and suspect == 0 and redis.call('EXISTS', cancel_key(A[7], id)) == 0 then
          local marked = mark_running(record, A[8])
          marked_now, record = marked ~= nil, marked or record
        end
        redis.call('SET', A[7] .. id, record)
      end
    end
    waiting = waiting or redis.call('LLEN', K[1])
    local event = retried and running_event(A[7], id) or false
    return {id, slot, generation, found_lost, token, suspect, (open and held < n and waiting > 0) and 1 or 0,
            record or false, waiting, event}
  end
  if held or A[4] == '1' then
    local entries = redis.call('HGETALL', K[2])
    for i = 1, #entries, 2 do
      if entries[i + 1] == A[1] then
        local record = redis.call('GET', A[7] .. entries[i])
        if held then return taken(entries[i], held - 1, lost, record, token_of(record), nil, nil, true) end
        for s = 1, open and n or 0 do  -- its slot expired: a new token goes into the record (and its RUNNING event)
          if redis.call('SET', K[2 + s], A[1], 'NX', 'PX', A[2]) then
            return taken(entries[i], s - 1, 0, record)
          end
        end
        return {'', -1, generation, lost}
      end
    end
  end
  local waiting = open and redis.call('LLEN', K[1]) or 0
  if waiting == 0 then return {'', -1, generation, lost} end
  for i = 1, n do
    if redis.call('SET', K[2 + i], A[1], 'NX', 'PX', A[2]) then
      local id = redis.call('LPOP', K[1])
      redis.call('HSET', K[2], id, A[1])
      return taken(id, i - 1, 0, redis.call('GET', A[7] .. id), nil, 1, waiting - 1)
    end
  end
  return {'', -1, generation, 0}
end
"""
TAKE_SCRIPT = STEP_STATE + FENCE + MINT + ORPHANS_SUSPECT + MARK_RUNNING + TAKE + "return take(KEYS, ARGV)\n"

# A Lua function for the scripts that keep retention (TRIM_SCRIPT, and FINISH for the run it stores): drop the
# oldest finished runs while more than ``retention`` of them, or more than ``retention_bytes`` bytes, are kept, at
# most ``limit`` of them, each whole (record, size, log lines, event backlog and its bytes). Keys: the finished
# index, the runs index, the sizes, the finished bytes, the log bytes; then the key prefixes of runs, of log lines
# and of run event streams; ``total``: the finished bytes, when the caller knows them (nil: read); ``keep``: a run
# not to drop (FINISH's own: past the bytes alone, it is dropped by the trim call after the answer, so that a copy
# of the call sent again still finds it, and nothing appended after it in the same script outlives it). Returns the
# number dropped, and the finished runs and bytes kept after it.
DROP_OLDEST = """
local function drop_oldest(finished, runs, sizes, bytes, logbytes, retention, retention_bytes, run_prefix,
                           log_prefix, events_prefix, limit, total, keep)
  local dropped = 0
  local count = redis.call('ZCARD', finished)
  total = total or tonumber(redis.call('GET', bytes) or '0')
  while dropped < limit and (count > tonumber(retention) or total > tonumber(retention_bytes)) do
    local oldest = redis.call('ZPOPMIN', finished)
    if #oldest == 0 then break end
    local id = oldest[1]
    if id == keep then
      redis.call('ZADD', finished, oldest[2], id)
      break
    end
    total = redis.call('DECRBY', bytes, tonumber(redis.call('HGET', sizes, id) or '0'))
    redis.call('HDEL', sizes, id)
    redis.call('DEL', run_prefix .. id, log_prefix .. id, events_prefix .. id, events_prefix .. id .. ':bytes')
    redis.call('HDEL', logbytes, id)
    redis.call('ZREM', runs, id)
    dropped, count = dropped + 1, count - 1
  end
  return dropped, count, total
end
"""

# Store a terminal state: record, indexes, size, cancel flag, lock release (if the token still holds it),
# the webhook delivery it owes (ARGV[6], the URL, or '') and the finished message in one step. Safe to run
# twice: a retry after a lost reply counts the size once and owes the delivery once, and when retention dropped
# the run since the first call landed (a record exists from admission until it is dropped) it writes nothing
# back: no record, no size, no second delivery; it still releases the lock.
# The size counted is the run's plus its log lines' (logbytes) plus its event stream's (for Last-Event-ID, kept
# with the run: events:run:<id>:bytes).
# Deliveries owed at once are bounded (ARGV[7] of them, ARGV[8] bytes of bodies, counted in <webhooks>:bytes):
# past either, the delivery is not owed and the reply says so, for the caller to log and count.
# When the generation is no longer the one the run's holder knows (ARGV[9]; '' or absent: not known), Redis lost
# its data since: a record missing was lost with it, not dropped by retention, and is written back and listed.
# The write is the holder's only (ARGV[10], the token the run is held under in the unfinished index; '' for a run
# that never held a slot): once the index names another token (an orphan claim) or none (the run is terminal),
# it is refused and changes nothing but the release of the caller's slot, unless the record stored is this very
# write (a retry after a lost reply; or retention dropped it since) or Redis lost its data (the generation changed
# and the index with it).
# The delivery owed keeps its webhook-id (ARGV[11]; '' or absent: none, its run's id stands in), so every attempt,
# whichever replica makes it, sends the same one.
# KEYS: run, finished, unfinished, cancel, sizes, bytes, seq, lock, logbytes, webhooks, webhook, run events bytes,
# generation, runs. ARGV: json, run_id, channel, token, size, webhook url, max owed, max owed bytes, generation,
# holder, delivery id, retention, retention bytes ('' or absent: none), and (HANDOFF_SCRIPT's own) 'handoff': the
# message is left to it (ended_now).
# Past retention (ARGV[12] runs, ARGV[13] bytes), a stored end drops the oldest finished runs itself, two at most and
# never its own run (DROP_OLDEST): once retention is full each end drops one, with no trim call after it.
# TRIM_SCRIPT drops the rest.
# Returns {finished runs, their bytes, owed}, the runs and bytes as kept after it: owed 1 (a delivery is owed now),
# -1 (refused: past the bound), 0, or -2: the write was refused.
FINISH = """
local finished_now = false  -- this call stored the end (not a retry that found it stored): HANDOFF_SCRIPT
local function finish(K, A)
  local holder = A[10] or ''
  local data_lost = (A[9] or '') ~= '' and generation_in(K[13]) ~= A[9]
  local held = false  -- the holder's in the unfinished index: its record is there (retention drops finished runs only)
  if holder ~= '' then
    local owner = redis.call('HGET', K[3], A[2])
    if owner ~= holder and (owner or not data_lost) then
      if A[4] ~= '' and redis.call('GET', K[8]) == A[4] then redis.call('DEL', K[8]) end
      local stored = redis.call('GET', K[1])
      if stored and stored ~= A[1] then return {0, 0, -2} end
      return {redis.call('ZCARD', K[2]), tonumber(redis.call('GET', K[6]) or '0'), 0}
    end
    held = owner == holder
  end
  local stored = held or redis.call('EXISTS', K[1]) == 1
  if data_lost then
    stored = true
    if not redis.call('ZSCORE', K[14], A[2]) then
      redis.call('ZADD', K[14], redis.call('INCR', K[7]), A[2])
    end
  end
  local owed = 0
  local total  -- the finished runs' bytes, when this call counts them in
  local size = tonumber(A[5]) + tonumber(redis.call('HGET', K[9], A[2]) or '0')
    + tonumber(redis.call('GET', K[12]) or '0')
  redis.call('HDEL', K[3], A[2])
  redis.call('DEL', K[4])
  if stored then redis.call('SET', K[1], A[1]) end
  finished_now = stored
  if stored and redis.call('HSETNX', K[5], A[2], size) == 1 then
    redis.call('ZADD', K[2], redis.call('INCR', K[7]), A[2])
    total = redis.call('INCRBY', K[6], size)
    if A[6] ~= '' then
      local owed_bytes = K[10] .. ':bytes'
      if redis.call('ZCARD', K[10]) >= tonumber(A[7])
          or tonumber(redis.call('GET', owed_bytes) or '0') + #A[1] > tonumber(A[8]) then
        owed = -1
      else
        local now = redis.call('TIME')
        redis.call('HSET', K[11], 'url', A[6], 'body', A[1], 'attempt', 0)
        if (A[11] or '') ~= '' then redis.call('HSET', K[11], 'id', A[11]) end
        redis.call('ZADD', K[10], now[1] * 1000 + math.floor(now[2] / 1000), A[2])
        redis.call('INCRBY', owed_bytes, #A[1])
        owed = 1
      end
    end
  end
  if A[4] ~= '' and redis.call('GET', K[8]) == A[4] then
    redis.call('DEL', K[8])
    released_slot = K[8]
  end
  if A[14] == 'handoff' then ended_now = true else redis.call('PUBLISH', A[3], A[2]) end
  if (A[12] or '') == '' then  -- no retention given: nothing dropped here
    return {redis.call('ZCARD', K[2]), total or tonumber(redis.call('GET', K[6]) or '0'), owed}
  end
  local base = string.sub(K[1], 1, #K[1] - #A[2] - 4)  -- "<prefix>:" of "<prefix>:run:<id>"
  local _, count, kept = drop_oldest(K[2], K[14], K[5], K[6], K[9], A[12], A[13], base .. 'run:', base .. 'log:',
                                     base .. 'events:run:', 2, total, A[2])
  return {count, kept, owed}
end
"""
FINISH_SCRIPT = STEP_STATE + DROP_OLDEST + FINISH + "return finish(KEYS, ARGV)\n"

# Cancel a run still waiting in the queue: take it out and store its terminal state (FINISH_SCRIPT) in one step,
# so a run never leaves the line without an end. A retry whose first reply was lost finds the record it stored.
# KEYS: FINISH_SCRIPT's, then queue. ARGV: FINISH_SCRIPT's (holder ''). Returns FINISH_SCRIPT's answer, or nil
# when the run no longer waits (taken, or cancelled by another request).
CANCEL_WAITING_SCRIPT = STEP_STATE + DROP_OLDEST + FINISH + """
if redis.call('LREM', KEYS[15], 1, ARGV[2]) == 0 and redis.call('GET', KEYS[1]) ~= ARGV[1] then return nil end
return finish(KEYS, ARGV)
"""


# A run's end and the next run's start in one step, by the replica whose run ended (runs.Runner.finish_run): FINISH
# with its slot released, then TAKE (with a start time: the run taken is stored RUNNING). Saves the round trips of
# a dispatcher waking to take and of the runner storing RUNNING. A refused FINISH takes nothing. Safe to run again
# after a lost reply as each of its two steps is (a retry sends TAKE's retry flag).
# With ARGV[22] = '1' (the replica's events writer has nothing waiting: every event published before is in Redis),
# it also appends the events of the two changes (APPEND_EVENT): the ended run's (its public JSON, ARGV[32], and
# state, ARGV[24]) when this call stored the end, and the taken run's RUNNING when this call stored it so (its
# record without the trace field) and the run's stream has its first event already. A retry appends nothing again.
# The ids answered are those of the two events when they are in Redis (appended by this call or by the call it
# retries), else false: the runner sends those itself.
# FINISH's message goes out after TAKE: on FINISH's channel (ARGV[3], "finished") when nothing was taken, so every
# replica's dispatch looks at the queue; else on ARGV[33] ("ended": the queue moved) and ARGV[33]:<run_id> (for the
# run's waiters), which replicas follow only while they have clients of queue positions or waiters of that run: a
# slot handed on wakes no dispatcher anywhere (listener.py).
# KEYS: FINISH's 14, then TAKE's, then the streams of all events and of run events. ARGV: FINISH's 13, TAKE's 8,
# events ('1' or ''), run stream key prefix, state, caps (APPEND_EVENT's 7), the ended run's public JSON, the
# channel of runs that ended in a handoff.
# Returns {FINISH's answer, TAKE's answer, {the ended run's event id, the taken run's}} (an id: false when none
# was appended; TAKE's answer and the ids left out when FINISH was refused).
HANDOFF_SCRIPT = (STEP_STATE + FENCE + MINT + ORPHANS_SUSPECT + MARK_RUNNING + DROP_OLDEST + FINISH + TAKE
                  + APPEND_EVENT) + """
local function public_of(record)  -- a record without its trace field, which comes last but for fencing_token
  local at = string.find(record, ',"trace":"[%w%- ]*","fencing_token":[%dnul]+}$')
  if not at then return record end
  return string.sub(record, 1, at - 1) .. string.sub(record, (string.find(record, ',"fencing_token":', at, true)))
end
local finish_args = {unpack(ARGV, 1, 13)}
finish_args[14] = 'handoff'
local finished = finish({unpack(KEYS, 1, 14)}, finish_args)
if finished[3] == -2 then return {finished} end
local took = take({unpack(KEYS, 15, #KEYS - 2)}, {unpack(ARGV, 14, 21)})
if ended_now and took[1] == '' then  -- a slot freed: "finished", for every replica's dispatch too
  redis.call('PUBLISH', ARGV[3], ARGV[2])
elseif ended_now then  -- handed on: for the clients of queue positions, and for the run's waiters
  redis.call('PUBLISH', ARGV[33], ARGV[2])
  redis.call('PUBLISH', ARGV[33] .. ':' .. ARGV[2], ARGV[2])
end
local function appended(stream, state)  -- the stream's newest event, when it is the run's change to state
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if newest and newest[2][6] == state then return newest[1] end
  return false
end
local ids = {false, false}
if ARGV[22] == '1' then
  local all, runs, caps = KEYS[#KEYS - 1], KEYS[#KEYS], {unpack(ARGV, 25, 31)}
  local ended, started = ARGV[23] .. ARGV[2], ARGV[23] .. took[1]
  if finished_now then
    ids[1] = append_event(all, runs, ended, 'run', ARGV[2], ARGV[24], ARGV[32], caps) or false
  else  -- a retry: the call it retries appended it, if it stored the end
    ids[1] = appended(ended, ARGV[24])
  end
  if marked_now then  -- after the run's first event only (its replica may not have sent that one yet)
    if redis.call('EXISTS', started) == 1 then
      ids[2] = append_event(all, runs, started, 'run', took[1], 'RUNNING', public_of(took[8]), caps) or false
    end
  elseif took[1] ~= '' then  -- a retry: TAKE tells whether the call it retries appended it
    ids[2] = took[10] or false
  end
end
return {finished, took, ids}
"""

# Drop the oldest finished runs while more than ARGV[1] of them, or more than ARGV[2] bytes, are kept
# (at most 1000 per call), with their log lines and event backlog (DROP_OLDEST).
# KEYS: finished, runs, sizes, bytes, logbytes. ARGV: retention, bytes, run key prefix, log key prefix,
# run events key prefix.
TRIM_SCRIPT = DROP_OLDEST + """
return (drop_oldest(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 1000))
"""


# Renew a slot (lock.RedisRunLock.renew): reset its TTL while it still holds the token. A slot key that is gone (not
# taken by another token) is taken back, so the fence (FENCE, above) keeps others out until every live
# holder has its slot again. When the generation is still the one the holder knows, only the key went (deleted,
# or lost in a failover), and it is taken back while the run is still the holder's in the unfinished index (not
# claimed as an orphan, not finished); when the generation changed or is gone, Redis lost its data, and the
# run's record, its index entries and the slot are written back (the generation and fence made if nobody has
# yet). ARGV[6] is the record: '-' when not sent (the answer 3 asks for it), '' when there is none to write back
# (the run is finished).
# KEYS: slot, generation, fence, unfinished, run, runs, seq. ARGV: token, ttl_ms, known generation, new generation,
# run_id, record. Returns {outcome, generation, lost}: outcome 1 renewed, 2 taken back, 3 send the record,
# 0 lost (held by another token, or the run is no longer the holder's); generation: the one in Redis (a re-run
# after a lost reply must not leave its caller with an old one); lost: 1 when this call found the data lost.
RENEW_SCRIPT = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, redis.call('GET', KEYS[2]) or ARGV[3], 0}
end
if held then return {0, '', 0} end
local owner = redis.call('HGET', KEYS[4], ARGV[5])
if owner and owner ~= ARGV[1] then return {0, '', 0} end
local generation, lost = redis.call('GET', KEYS[2]), 0
if generation == ARGV[3] then
  if not owner then return {0, '', 0} end
else
  if not generation then
    generation, lost = ARGV[4], 1
    redis.call('SET', KEYS[2], generation)
    redis.call('SET', KEYS[3], generation, 'PX', ARGV[2])
  end
  if ARGV[6] == '-' then return {3, generation, lost} end
  if ARGV[6] ~= '' then
    redis.call('SET', KEYS[5], ARGV[6])
    if not redis.call('ZSCORE', KEYS[6], ARGV[5]) then
      redis.call('ZADD', KEYS[6], redis.call('INCR', KEYS[7]), ARGV[5])
    end
    redis.call('HSET', KEYS[4], ARGV[5], ARGV[1])
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {2, generation, lost}
"""


# Store a change of a run that is not terminal (RUNNING, progress) only while the run is still the writer's: its
# holder token (ARGV[3]) is the run's in the unfinished index. Refused once the index names another token (an
# orphan claim) or none (the run was stored terminal), unless Redis lost its data since the holder's generation
# (ARGV[4]) and the index with it: then it is written, and the holder's renewal writes the index back.
# KEYS: run, unfinished, generation. ARGV: json, run_id, holder token, generation. Returns 1 written, 0 refused.
SAVE_SCRIPT = """
local owner = redis.call('HGET', KEYS[2], ARGV[2])
if owner == ARGV[3] or (not owner and ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# Whether a run still holds its slot right now (BaseAgent.ensure_lease): the slot key holds its token, with time
# left, and the unfinished index still names that token (no orphan claim, not terminal).
# KEYS: slot, unfinished. ARGV: token, run_id. Returns the milliseconds left on the lease, or 0 when it is lost.
LEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[1] then return 0 end
return math.max(redis.call('PTTL', KEYS[1]), 0)
"""
