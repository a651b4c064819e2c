"""The Lua scripts beside the run and slot steps (scripts.py): webhook deliveries, log lines, events and
Idempotency-Keys, each one atomic step across replicas with its KEYS and ARGV.

redis-py sends a command again when its connection drops or times out, possibly while the first copy still runs.
The events writer's script applies each call once by its sequence number; the Idempotency-Key steps find their own
earlier write; a webhook claim that runs twice answers what it claimed the first time, and a report that runs twice
answers 0 the second time.
"""


# Webhook deliveries (webhooks.py): ``webhooks`` is a zset of run ids by due time (ms, Redis's clock, so
# replicas' clocks never matter), ``webhook:<id>`` a hash (url, body, attempt, lease, and the delivery's webhook-id), ``webhooks:bytes`` the
# bytes of the owed bodies (FINISH bounds them; a delivery that ends gives its bytes back). Claiming a due
# delivery moves its due time past the lease, so no other replica sees it due while the claimer's attempt
# can last; a claimer that dies leaves it due again once the lease ends.
# Each claim has a token of its own (the lease's), and leaves what it did under <webhooks>:claim:<token> for the
# lease's time: a copy of the call (redis-py sends it again when the reply was lost) answers the same, and changes
# nothing.
# KEYS: webhooks. ARGV: lease_ms, lease token, webhook key prefix, max attempts.
# Returns {1, id, attempt, url, body, webhook-id (absent when none was stored)} claimed, {2, id, attempts} given
# up (the last claimer died mid-attempt), {0, ms until the next is due or -1} nothing due.
CLAIM_WEBHOOK_SCRIPT = """
local function claimed(id, key, attempt)
  return {1, id, attempt, redis.call('HGET', key, 'url'), redis.call('HGET', key, 'body'), redis.call('HGET', key, 'id')}
end
local marker = KEYS[1] .. ':claim:' .. ARGV[2]
local done = redis.call('GET', marker)
if done then
  local made, gone = string.match(done, '^gave up (%d+) (.*)$')
  if made then return {2, gone, tonumber(made)} end
  local key = ARGV[3] .. done
  if redis.call('HGET', key, 'lease') ~= ARGV[2] then return {0, 0} end  -- taken over since: claim again
  return claimed(done, key, tonumber(redis.call('HGET', key, 'attempt')))
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then
  local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #next == 0 then return {0, -1} end
  return {0, tonumber(next[2]) - now}
end
local id = due[1]
local key = ARGV[3] .. id
local made = tonumber(redis.call('HGET', key, 'attempt') or '-1')
if made < 0 then
  redis.call('ZREM', KEYS[1], id)
  return {0, 0}
end
if made >= tonumber(ARGV[4]) then
  redis.call('ZREM', KEYS[1], id)
  if redis.call('DECRBY', KEYS[1] .. ':bytes', redis.call('HSTRLEN', key, 'body')) < 0 then
    redis.call('SET', KEYS[1] .. ':bytes', 0)  -- owed by a version that did not count them
  end
  redis.call('DEL', key)
  redis.call('SET', marker, 'gave up ' .. made .. ' ' .. id, 'PX', ARGV[1])
  return {2, id, made}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
redis.call('HSET', key, 'attempt', made + 1, 'lease', ARGV[2])
redis.call('SET', marker, id, 'PX', ARGV[1])
return claimed(id, key, made + 1)
"""

# Record an attempt's outcome, only while the lease is still the caller's: ARGV[2] 'done' ends the delivery,
# else it is due again in ARGV[2] ms. KEYS: webhooks, webhook. ARGV: lease token, 'done' or delay_ms, run_id.
# Returns 1, or 0 when the lease had passed to another replica (the outcome is theirs to record).
REPORT_WEBHOOK_SCRIPT = """
if redis.call('HGET', KEYS[2], 'lease') ~= ARGV[1] then return 0 end
if ARGV[2] == 'done' then
  if redis.call('DECRBY', KEYS[1] .. ':bytes', redis.call('HSTRLEN', KEYS[2], 'body')) < 0 then
    redis.call('SET', KEYS[1] .. ':bytes', 0)  -- owed by a version that did not count them
  end
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[3])
  return 1
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2]), ARGV[3])
redis.call('HDEL', KEYS[2], 'lease')
return 1
"""

# A Lua function for the scripts that append events (WRITE_SCRIPT below; scripts.HANDOFF_SCRIPT for the runs it ends
# and starts): one event (kind, run_id, state, data) to the stream of all events (the id is made here), to the
# stream of run events (a run event only) and to its run's stream, under the same id; each stream is capped by
# entries and by bytes (a companion key <stream>:bytes), the oldest dropped first. The run's stream expires caps[7] s
# after its last event (and goes with the run at retention). caps: all n, all bytes, runs n, runs bytes, run n, run
# bytes, run ttl. Returns the id, or nil when the event could not be added.
APPEND_EVENT = """
local function append_event(all, runs, run, kind, run_id, state, data, caps)
  local function add(key, id, n, b, by_xdel)
    -- Past the entries' cap, the oldest go with the add itself (XADD's exact MAXLEN), their bytes counted out in
    -- the same INCRBY as the new entry's; then the oldest go one by one (XDEL) while the bytes are past theirs.
    -- A run's stream (by_xdel) drops each with XDEL, also past the entries' cap: XDEL, not a trim, moves the
    -- stream's max-deleted-entry-id, which tells a reader its backlog is no longer whole (events.py, _whole).
    local len, delta, gone = redis.call('XLEN', key) + 1, #data, {}
    local over = math.min(len - tonumber(n), len - 1)  -- the new entry stays
    if over > 0 and not by_xdel then gone = redis.call('XRANGE', key, '-', '+', 'COUNT', over) end
    local added = redis.pcall('XADD', key, 'MAXLEN', len - #gone, id, 'k', kind, 'r', run_id, 's', state, 'd', data)
    if type(added) == 'table' and added.err then return nil end
    for _, entry in ipairs(gone) do delta = delta - #entry[2][8] end
    len = len - #gone
    local bytes_key = key .. ':bytes'
    local size = redis.call('INCRBY', bytes_key, delta)
    while len > 1 and (len > tonumber(n) or size > tonumber(b)) do
      local oldest = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
      redis.call('XDEL', key, oldest[1])
      size = redis.call('INCRBY', bytes_key, -#oldest[2][8])
      len = len - 1
    end
    return added
  end
  local id = add(all, '*', caps[1], caps[2])
  if not id then return nil end
  if kind == 'run' then add(runs, id, caps[3], caps[4]) end
  add(run, id, caps[5], caps[6], true)
  redis.call('EXPIRE', run, caps[7])
  redis.call('EXPIRE', run .. ':bytes', caps[7])
  return id
end
"""

# Append one event (APPEND_EVENT), and before it (for a log line, if the run is still stored) the line itself, so a
# line is never kept after its event (GET /agents/logs relies on it). A run keeps at most ARGV[14] lines and ARGV[15]
# bytes of them, the oldest dropped first; a finished run's counted size follows.
# Each call carries its writer's sequence number (ARGV[12]); the writer's mark (KEYS[4], one SET, expiring
# ARGV[13] s after the last call) holds the highest one applied, and a call at or below it writes nothing: the
# copy of a pipeline that redis-py sends again after a timeout, while the first copy still runs, stores nothing
# twice, and the calls apply in the writer's order whichever copy they come from.
# KEYS: all, runs, run, writer mark, log, logbytes, sizes, bytes, run record. ARGV: kind, run_id, state, data,
# all n, all bytes, runs n, runs bytes, run n, run bytes, run ttl, seq, mark ttl, max lines, max log bytes.
# Returns the id, or nil when the call was applied before (or the event could not be added).
WRITE_SCRIPT = APPEND_EVENT + """
local seq = tonumber(ARGV[12])
local last = tonumber(redis.call('SET', KEYS[4], seq, 'GET', 'EX', ARGV[13]) or '0')
if last >= seq then
  redis.call('SET', KEYS[4], last, 'EX', ARGV[13])
  return nil
end
if ARGV[1] == 'log' and redis.call('EXISTS', KEYS[9]) == 1 then
  redis.call('RPUSH', KEYS[5], ARGV[4])
  local delta = #ARGV[4]
  local total = redis.call('HINCRBY', KEYS[6], ARGV[2], delta)
  while redis.call('LLEN', KEYS[5]) > tonumber(ARGV[14]) or total > tonumber(ARGV[15]) do
    local old = redis.call('LPOP', KEYS[5])
    if not old then break end
    total = redis.call('HINCRBY', KEYS[6], ARGV[2], -#old)
    delta = delta - #old
  end
  if delta ~= 0 and redis.call('HEXISTS', KEYS[7], ARGV[2]) == 1 then
    redis.call('HINCRBY', KEYS[7], ARGV[2], delta)
    redis.call('INCRBY', KEYS[8], delta)
  end
end
return append_event(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                    {ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]})
"""


# Idempotency-Keys (idempotency.py). Claim a key. KEYS: the key's hash. ARGV: fingerprint, run_id, pending_ms
# (how long a pending claim lives), stale_ms, run key prefix. A pending entry whose run does not exist and that
# is older than stale_ms is taken over. Safe to retry after a lost reply: an entry already holding ARGV[2] is this
# request's own claim.
IDEMPOTENCY_CLAIM_SCRIPT = """
local entry = redis.call('HMGET', KEYS[1], 'fingerprint', 'run_id', 'state')
if entry[1] and entry[2] ~= ARGV[2] then
  local admitted = entry[3] == 'accepted' or redis.call('EXISTS', ARGV[5] .. entry[2]) == 1
  local age = tonumber(ARGV[3]) - redis.call('PTTL', KEYS[1])
  if admitted or age < tonumber(ARGV[4]) then
    if entry[1] ~= ARGV[1] then return {'mismatch', entry[2]} end
    if admitted then return {'accepted', entry[2]} end
    return {'pending', entry[2]}
  end
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'run_id', ARGV[2], 'state', 'pending')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'new', ARGV[2]}
"""

# The run was admitted: the key is accepted for the TTL, unless another request holds it now.
# KEYS: the key's hash. ARGV: fingerprint, run_id, ttl_ms.
IDEMPOTENCY_ACCEPT_SCRIPT = """
local holder = redis.call('HGET', KEYS[1], 'run_id')
if holder and holder ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'run_id', ARGV[2], 'state', 'accepted')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# The request was refused: delete the key if it is still its pending claim. KEYS: the key's hash. ARGV: run_id.
IDEMPOTENCY_RELEASE_SCRIPT = """
local entry = redis.call('HMGET', KEYS[1], 'run_id', 'state')
if entry[1] == ARGV[1] and entry[2] == 'pending' then return redis.call('DEL', KEYS[1]) end
return 0
"""
