-- Shared helpers, prepended to every operation script by RedisBackend (files whose name
-- starts with "_" are not operations). Each helper mirrors the function of the same name in
-- sharded_broker/backends/memory.py, the reference model; read them side by side.
--
-- Every key of one queue comes in KEYS, in the order of QUEUE_KEYS in redis.py, all with
-- the hash tag {<queue>}; no key name is ever built here. Per-shard-key data lives inside
-- those fixed structures:
--   msgs        hash   id -> cmsgpack record (the fields listed under "record" below)
--   payloads    hash   id -> payload bytes
--   ready       zset   keyed ready messages, score 0, member key\0prio\0seq\0id (lex order)
--   lane        zset   unkeyed ready messages, score 0, member prio\0seq\0id
--   keyq        zset   ready keys, score = ready time, member order..key (order breaks ties)
--   keyentry    hash   key -> its member in keyq
--   slots       hash   key -> batches in flight
--   backlog     zset   key -> minus its live (not dead) messages, so ZRANGE lists the largest
--                      backlog first and equal backlogs by key
--   intervals   hash   key -> seconds between deliveries
--   lastdeliv   hash   key -> time of the last delivery (kept while an interval applies)
--   paused      set    paused keys
--   delayed     zset   score = due time, member order..id
--   leases      zset   score = deadline, member order..id
--   dedup       hash   dedup id -> cmsgpack {id, expires}
--   dedupexp    zset   score = expires, member dedup id
--   dead        zset   score = order of death, member id
--   batches     hash   batch id -> cmsgpack list of unsettled ids, in order
--   meta        hash   head, tail (seq counters), order, paused, ready, delayed, leased
--   readyage    zset   score = enqueued_at, member id, for ready messages (oldest age)
--   signal      list   wake-up tokens for waiting consumers
--   metrics     hash   "<minute>" (the queue) and "<minute>:<key>" (one key) -> the five
--                      counts of COUNTERS, comma-separated ("3,3,2,1,0"): one field per
--                      (key, minute), not one per counter
--   metricsidx  zset   score = the last minute that keeps the field, member = a queue
--                      field of metrics (for expiry)
--   metricskeys list   the per-key fields of metrics in the order they were created, so
--                      oldest minute first (for expiry: a list entry costs a few bytes more
--                      than its text, a zset entry about a hundred)
--   events      pub/sub channel (not a key; passed in KEYS for its hash tag, which lets
--               Redis Cluster route it with the queue)
--
-- record fields: id, k (key, absent when unkeyed), p (priority), s (seq, absent while
-- delayed without a place), t (enqueued_at), h (headers JSON), d (dedup id), ah (at_head),
-- st (state: new|ready|delayed|leased|dead), nb (not before), a (attempts), tok (lease
-- token), dl (deadline), b (batch id), o (order of its delayed/leases entry), ea and eo
-- (when it entered the unkeyed lane), r (reason), da (died at).

local K = {
  msgs = KEYS[1], payloads = KEYS[2], ready = KEYS[3], lane = KEYS[4], keyq = KEYS[5],
  keyentry = KEYS[6], slots = KEYS[7], backlog = KEYS[8], intervals = KEYS[9],
  lastdeliv = KEYS[10], paused = KEYS[11], delayed = KEYS[12], leases = KEYS[13],
  dedup = KEYS[14], dedupexp = KEYS[15], dead = KEYS[16], batches = KEYS[17], meta = KEYS[18],
  readyage = KEYS[19], signal = KEYS[20], metrics = KEYS[21], metricsidx = KEYS[22],
  events = KEYS[23], metricskeys = KEYS[24],
}

-- Tail seqs count up from here and head seqs count down, so every head seq sorts first.
local SEQ_ORIGIN = 4503599627370496 -- 2^52
local PRIORITY_OFFSET = 2147483648 -- 2^31: priorities become unsigned, fixed-width hex
-- Bounded work per call: at most this many due delayed messages promoted, expired leases
-- returned and dedup entries forgotten; the rest is due at once (retry_in 0).
local SWEEP_LIMIT = 500
local SIGNAL_TOKENS = 16
local ID_LENGTH = 32

-- Times cross into Redis as text with every digit kept (Lua's default keeps 14).
local function num(x)
  return string.format('%.17g', x)
end

-- The backend's clock: the server's TIME unless the client passed a test clock reading.
local function clock(arg)
  if arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Settings, in the order of RedisBackend._settings_args.
local function read_settings(argv, i)
  return {
    max_deliveries = tonumber(argv[i]),
    key_concurrency = tonumber(argv[i + 1]),
    interval = tonumber(argv[i + 2]),
    retry_position = argv[i + 3],
    dedup_window = tonumber(argv[i + 4]),
    unique_while_pending = argv[i + 5] == '1',
  }
end

local function next_order()
  return redis.call('HINCRBY', K.meta, 'order', 1)
end

local function order_member(order, id)
  return string.format('%016x', order) .. id
end

local function ready_member(rec)
  return rec.k .. '\0' .. string.format('%08x', rec.p + PRIORITY_OFFSET) .. '\0'
    .. string.format('%014x', rec.s) .. '\0' .. rec.id
end

local function lane_member(rec)
  return string.format('%08x', rec.p + PRIORITY_OFFSET) .. '\0' .. string.format('%014x', rec.s)
    .. '\0' .. rec.id
end

-- Records loaded in this call (false once forgotten), written back once by flush() when
-- they changed; RAW keeps what was read, so unchanged records cost no write.
local CACHE = {}
local RAW = {}

local function load(id)
  local rec = CACHE[id]
  if rec ~= nil then
    return rec or nil
  end
  local raw = redis.call('HGET', K.msgs, id)
  if not raw then
    return nil
  end
  local decoded
  decoded, rec = pcall(cmsgpack.unpack, raw)
  -- A record damaged behind the engine's back reads as missing (see entry_record).
  if not decoded or type(rec) ~= 'table' or rec.id ~= id or type(rec.st) ~= 'string'
      or type(rec.p) ~= 'number' or type(rec.t) ~= 'number' or type(rec.h) ~= 'string' then
    return nil
  end
  CACHE[id] = rec
  RAW[id] = raw
  return rec
end

local function store(rec)
  CACHE[rec.id] = rec
end

local function flush()
  for id, rec in pairs(CACHE) do
    if rec then
      local raw = cmsgpack.pack(rec)
      if raw ~= RAW[id] then
        redis.call('HSET', K.msgs, id, raw)
      end
    end
  end
end

local function signal(count)
  if count > SIGNAL_TOKENS then
    count = SIGNAL_TOKENS
  end
  for _ = 1, count do
    redis.call('LPUSH', K.signal, '1')
  end
  redis.call('LTRIM', K.signal, 0, SIGNAL_TOKENS - 1)
end

-- Remove a record from the index of its current state (the memory model skips such stale
-- heap entries lazily; here they go at once).
local function unindex(rec)
  local st = rec.st
  if st == 'ready' then
    if rec.k then
      redis.call('ZREM', K.ready, ready_member(rec))
    else
      redis.call('ZREM', K.lane, lane_member(rec))
    end
    redis.call('ZREM', K.readyage, rec.id)
  elseif st == 'delayed' then
    redis.call('ZREM', K.delayed, order_member(rec.o, rec.id))
  elseif st == 'leased' then
    redis.call('ZREM', K.leases, order_member(rec.o, rec.id))
  elseif st == 'dead' then
    redis.call('ZREM', K.dead, rec.id)
  end
end

local COUNTED = { ready = true, delayed = true, leased = true }

local function set_state(rec, state)
  unindex(rec)
  if COUNTED[rec.st] then
    redis.call('HINCRBY', K.meta, rec.st, -1)
  end
  if COUNTED[state] then
    redis.call('HINCRBY', K.meta, state, 1)
  end
  rec.st = state
end

local function slots_of(key)
  return tonumber(redis.call('HGET', K.slots, key)) or 0
end

local function drop_key(key)
  redis.call('HDEL', K.slots, key)
  local member = redis.call('HGET', K.keyentry, key)
  if member then
    redis.call('ZREM', K.keyq, member)
    redis.call('HDEL', K.keyentry, key)
  end
end

local function uncount_key(key)
  if tonumber(redis.call('ZINCRBY', K.backlog, 1, key)) >= 0 then
    redis.call('ZREM', K.backlog, key)
    if slots_of(key) == 0 then
      drop_key(key)
    end
  end
end

local function count_key(key)
  redis.call('ZINCRBY', K.backlog, -1, key)
end

-- Metrics and events of this call, written once by flush_observed(): per-minute counts
-- summed per field (a list in the order of COUNTERS), the last minute that keeps each
-- queue field (false for a per-key field), and events as lines of
-- type\0id\0(+key or nothing)\0time.
local OBSERVE = { kept = 60, key_kept = 60, publish = false, counts = {}, last_kept = {}, events = {} }
local COUNTER_INDEX = { enqueued = 1, delivered = 2, acked = 3, retried = 4, dead = 5 }

-- ARGV[i]: minutes of metrics kept, for the queue and per key ("<queue>,<key>");
-- ARGV[i + 1]: publish events ('1'/'0').
local function read_observe(argv, i)
  local kept, key_kept = string.match(argv[i], '^(%d+),(%d+)$')
  OBSERVE.kept = tonumber(kept)
  OBSERVE.key_kept = tonumber(key_kept)
  OBSERVE.publish = argv[i + 1] == '1'
end

local function minute_of(t)
  return math.floor(t / 60) * 60
end

local function bump(field, index, last_kept)
  local counts = OBSERVE.counts[field]
  if not counts then
    counts = { 0, 0, 0, 0, 0 }
    OBSERVE.counts[field] = counts
    OBSERVE.last_kept[field] = last_kept
  end
  counts[index] = counts[index] + 1
end

-- The five counts of a metrics field ("e,d,a,r,x"); zeros when absent or unreadable.
local function unpack_counts(raw)
  local counts = { 0, 0, 0, 0, 0 }
  if raw then
    local i = 1
    for n in string.gmatch(raw, '%d+') do
      if i > 5 then
        break
      end
      counts[i] = tonumber(n)
      i = i + 1
    end
  end
  return counts
end

-- Count one lifecycle step of rec (per queue, and per key when it has one) and publish it.
local function record(counter, rec, now)
  local minute = minute_of(now)
  local field = string.format('%d', minute)
  local index = COUNTER_INDEX[counter]
  bump(field, index, minute + (OBSERVE.kept - 1) * 60)
  if rec.k then
    bump(field .. ':' .. rec.k, index, false)
  end
  if OBSERVE.publish then
    OBSERVE.events[#OBSERVE.events + 1] = counter .. '\0' .. rec.id .. '\0' .. (rec.k and ('+' .. rec.k) or '')
      .. '\0' .. num(now)
  end
end

local METRICS_SWEEP_LIMIT = 20
-- At most this many fields forgotten per call, however many it created.
local METRICS_SWEEP_MAX = 1000

-- Forget up to `limit` per-key fields that left the key window, oldest first.
local function sweep_key_fields(current, limit)
  local oldest = redis.call('LRANGE', K.metricskeys, 0, limit - 1)
  local expired = 0
  for _, field in ipairs(oldest) do
    local minute = tonumber(string.match(field, '^%d+')) or 0
    if minute + (OBSERVE.key_kept - 1) * 60 >= current then
      break -- created in time order: the rest are younger
    end
    expired = expired + 1
  end
  if expired > 0 then
    redis.call('HDEL', K.metrics, unpack(oldest, 1, expired))
    redis.call('LTRIM', K.metricskeys, expired, -1)
  end
end

local function flush_observed(now)
  local created = 0
  for field, added in pairs(OBSERVE.counts) do
    local raw = redis.call('HGET', K.metrics, field)
    local counts = unpack_counts(raw)
    for i = 1, 5 do
      counts[i] = counts[i] + added[i]
    end
    redis.call('HSET', K.metrics, field, table.concat(counts, ','))
    if not raw then
      if OBSERVE.last_kept[field] then
        redis.call('ZADD', K.metricsidx, OBSERVE.last_kept[field], field)
      else
        redis.call('RPUSH', K.metricskeys, field)
      end
      created = created + 1
    end
  end
  -- Bounded cleanup of fields that left their window, only when fields were created (at
  -- least as many as were created, up to METRICS_SWEEP_MAX): the index then does not
  -- grow faster than it is cleaned, and most calls skip the lookup.
  if created > 0 then
    local limit = math.min(METRICS_SWEEP_MAX, math.max(METRICS_SWEEP_LIMIT, created))
    local current = minute_of(now)
    local old = redis.call('ZRANGEBYSCORE', K.metricsidx, '-inf', '(' .. string.format('%d', current),
      'LIMIT', 0, limit)
    if #old > 0 then
      redis.call('HDEL', K.metrics, unpack(old))
      redis.call('ZREM', K.metricsidx, unpack(old))
    end
    if limit > #old then
      sweep_key_fields(current, limit - #old)
    end
  end
  if #OBSERVE.events > 0 then
    redis.call('PUBLISH', K.events, table.concat(OBSERVE.events, '\n'))
  end
end

-- Drop a settled record (acked or purged) from every index it counts in.
local function forget(rec)
  local was = rec.st
  set_state(rec, 'gone')
  redis.call('HDEL', K.msgs, rec.id)
  redis.call('HDEL', K.payloads, rec.id)
  CACHE[rec.id] = false
  if was ~= 'dead' and rec.k then
    uncount_key(rec.k)
  end
end

-- The record an index entry names. One that cannot be read (corrupted or deleted behind
-- the engine's back) is rebuilt from what the entry says and dead-lettered with a reason,
-- so that it neither fails every later call nor blocks its key. index: ready, lane,
-- delayed, leases or dead (the KEYS it came from); now: nil reads the clock from ARGV[1]
-- (every script that schedules keys takes the clock there), and only when needed.
local function entry_record(index, member, now)
  local id = string.sub(member, -ID_LENGTH)
  local rec = load(id)
  if rec then
    return rec
  end
  now = now or clock(ARGV[1])
  rec = { id = id, p = 0, a = 0, h = '{}', t = now, nb = 0 }
  if index == 'ready' or index == 'lane' then
    -- [key \0] prio (8 hex) \0 seq (14 hex) \0 id, read from the end
    rec.p = tonumber(string.sub(member, -ID_LENGTH - 24, -ID_LENGTH - 17), 16) - PRIORITY_OFFSET
    rec.s = tonumber(string.sub(member, -ID_LENGTH - 15, -ID_LENGTH - 2), 16)
    rec.st = 'ready'
    if index == 'ready' then
      rec.k = string.sub(member, 1, -ID_LENGTH - 26)
    end
  elseif index == 'delayed' or index == 'leases' then
    -- The key of a delayed or leased message is only in its record: what that key holds
    -- (its live count, a leased slot) stays as it was.
    rec.o = tonumber(string.sub(member, 1, 16), 16)
    rec.st = index == 'delayed' and 'delayed' or 'leased'
  else
    rec.st = 'dead'
  end
  if redis.call('HEXISTS', K.payloads, id) == 0 then
    redis.call('HSET', K.payloads, id, '')
  end
  if rec.st ~= 'dead' then
    set_state(rec, 'dead')
    rec.da = now
    redis.call('ZADD', K.dead, next_order(), id)
    if rec.k then
      uncount_key(rec.k)
    end
  end
  rec.r = 'corrupted record: it could not be read from Redis, so it was dead-lettered'
  CACHE[id] = rec
  RAW[id] = nil
  return rec
end

-- The first `count` ready messages of key, in order (unreadable ones dead-lettered).
local function key_heads(key, count)
  while true do
    local members = redis.call('ZRANGEBYLEX', K.ready, '[' .. key .. '\0', '(' .. key .. '\1', 'LIMIT', 0, count)
    local heads = {}
    for i, member in ipairs(members) do
      heads[i] = entry_record('ready', member, nil)
      if heads[i].st == 'dead' then
        heads = nil
        break
      end
    end
    if heads then
      return heads
    end
  end
end

local function head(key)
  return key_heads(key, 1)[1]
end

-- Give key a ready time if its head message exists. keep_place: a key already waiting
-- keeps its earlier ready time (new arrivals must not push it to the back of the round).
local function schedule(key, now, keep_place)
  local first = head(key)
  local member = redis.call('HGET', K.keyentry, key)
  local ready_at = nil
  if member then
    ready_at = tonumber(redis.call('ZSCORE', K.keyq, member))
  end
  if not first then
    if member then
      redis.call('ZREM', K.keyq, member)
      redis.call('HDEL', K.keyentry, key)
    end
    return
  end
  local at = math.max(now, first.nb)
  if keep_place and ready_at then
    at = math.max(ready_at, first.nb)
  end
  if at == ready_at then
    return
  end
  if member then
    redis.call('ZREM', K.keyq, member)
  end
  member = order_member(next_order(), key)
  redis.call('ZADD', K.keyq, num(at), member)
  redis.call('HSET', K.keyentry, key, member)
end

-- Put a record (whose seq is set) into its key's order or the unkeyed lane.
local function place(rec, now)
  set_state(rec, 'ready')
  redis.call('ZADD', K.readyage, num(rec.t), rec.id)
  if rec.k then
    redis.call('ZADD', K.ready, 0, ready_member(rec))
  else
    rec.ea = now
    rec.eo = next_order()
    redis.call('ZADD', K.lane, 0, lane_member(rec))
  end
end

local function delay(rec, due)
  set_state(rec, 'delayed')
  rec.nb = due
  rec.o = next_order()
  redis.call('ZADD', K.delayed, num(due), order_member(rec.o, rec.id))
end

local function next_seq(at_head)
  if at_head then
    return SEQ_ORIGIN - redis.call('HINCRBY', K.meta, 'head', 1)
  end
  return SEQ_ORIGIN + redis.call('HINCRBY', K.meta, 'tail', 1)
end

local function promote_due(now)
  local due = redis.call('ZRANGEBYSCORE', K.delayed, '-inf', num(now), 'LIMIT', 0, SWEEP_LIMIT)
  for _, member in ipairs(due) do
    local rec = entry_record('delayed', member, now)
    if rec.st == 'delayed' then
      if not rec.s then
        rec.s = next_seq(rec.ah)
      end
      place(rec, now)
      if rec.k then
        schedule(rec.k, now, true)
      end
    end
  end
end

local function requeue(rec, now, after, position)
  rec.tok = nil
  if position == 'tail' then
    rec.s = nil
    rec.ah = false
  end
  if rec.k and position == 'head' then
    -- Back to its place, holding the key until it is delivered again.
    rec.nb = now + after
    place(rec, now)
  elseif after > 0 then
    delay(rec, now + after)
  else
    if not rec.s then
      rec.s = next_seq(false)
    end
    rec.nb = now
    place(rec, now)
  end
end

local function dead_letter(rec, now, reason)
  set_state(rec, 'dead')
  rec.tok = nil
  rec.r = reason
  rec.da = now
  redis.call('ZADD', K.dead, next_order(), rec.id)
  if rec.k then
    uncount_key(rec.k)
  end
end

local function get_batch(batch_id)
  local raw = redis.call('HGET', K.batches, batch_id)
  if not raw then
    return nil
  end
  return cmsgpack.unpack(raw)
end

-- Release the key's slot once the last message of a batch is settled.
local function settled(rec, now, batch)
  if #batch > 0 then
    redis.call('HSET', K.batches, rec.b, cmsgpack.pack(batch))
    return
  end
  redis.call('HDEL', K.batches, rec.b)
  if not rec.k then
    return
  end
  local left = redis.call('HINCRBY', K.slots, rec.k, -1)
  if left <= 0 then
    redis.call('HDEL', K.slots, rec.k)
    if not redis.call('ZSCORE', K.backlog, rec.k) then
      drop_key(rec.k)
      return
    end
  end
  schedule(rec.k, now, false)
end

-- Remove rec and every later message from its batch: what stays, and the later ones.
local function cut_batch(rec)
  local batch = get_batch(rec.b) or { rec.id }
  local index = #batch + 1
  for i, id in ipairs(batch) do
    if id == rec.id then
      index = i
      break
    end
  end
  local followers = {}
  for i = index + 1, #batch do
    followers[#followers + 1] = load(batch[i])
  end
  for i = #batch, index, -1 do
    batch[i] = nil
  end
  return batch, followers
end

-- Back to their places, in order; they were never processed, so their deliveries do not
-- count.
local function return_unprocessed(records, now)
  for _, other in ipairs(records) do
    other.a = other.a - 1
    requeue(other, now, 0, 'head')
  end
end

-- A leased message failed: retry or dead-letter it, and return the rest of its batch.
local function fail(rec, now, settings, after, dead_reason, why)
  local batch, followers = cut_batch(rec)
  if dead_reason then
    dead_letter(rec, now, dead_reason)
    record('dead', rec, now)
  elseif settings.max_deliveries and rec.a >= settings.max_deliveries then
    dead_letter(rec, now, string.format('%s after %d deliveries (max_deliveries=%d)', why, rec.a,
      settings.max_deliveries))
    record('dead', rec, now)
  else
    requeue(rec, now, after, settings.retry_position)
    record('retried', rec, now)
  end
  return_unprocessed(followers, now)
  settled(rec, now, batch)
end

-- Give a leased message back uncounted, with the rest of its batch.
local function release(rec, now)
  local batch, followers = cut_batch(rec)
  table.insert(followers, 1, rec)
  return_unprocessed(followers, now)
  settled(rec, now, batch)
end

local function expire_leases(now, settings)
  local expired = redis.call('ZRANGEBYSCORE', K.leases, '-inf', num(now), 'LIMIT', 0, SWEEP_LIMIT)
  for _, member in ipairs(expired) do
    local rec = entry_record('leases', member, now)
    -- An earlier expiry in this loop may have returned it with the rest of its batch.
    if rec and rec.st == 'leased' and order_member(rec.o, rec.id) == member then
      fail(rec, now, settings, 0, nil, 'lease expired')
    end
  end
end

-- The record a lease names, when the lease's token is still current.
local function current(id, token)
  local rec = load(id)
  if not rec or rec.st ~= 'leased' or rec.tok ~= token then
    return nil
  end
  return rec
end

-- An expired dedup entry is forgotten, except that with unique_while_pending a twin still
-- ready or delayed keeps its claim for another window.
local function expire_dedup(dedup_id, entry, now, settings)
  if settings.unique_while_pending then
    local rec = load(entry[1])
    if rec and (rec.st == 'ready' or rec.st == 'delayed') then
      entry[2] = now + settings.dedup_window
      redis.call('HSET', K.dedup, dedup_id, cmsgpack.pack(entry))
      redis.call('ZADD', K.dedupexp, num(entry[2]), dedup_id)
      return entry
    end
  end
  redis.call('HDEL', K.dedup, dedup_id)
  redis.call('ZREM', K.dedupexp, dedup_id)
  return nil
end

-- The id of the message an enqueue with dedup_id duplicates, or nil.
local function dedup_hit(dedup_id, now, settings)
  local expired = redis.call('ZRANGEBYSCORE', K.dedupexp, '-inf', num(now), 'LIMIT', 0, SWEEP_LIMIT)
  for _, old in ipairs(expired) do
    expire_dedup(old, cmsgpack.unpack(redis.call('HGET', K.dedup, old)), now, settings)
  end
  local raw = redis.call('HGET', K.dedup, dedup_id)
  if not raw then
    return nil
  end
  local entry = cmsgpack.unpack(raw)
  -- The bounded sweep above may have left this entry past its expiry.
  if entry[2] <= now then
    entry = expire_dedup(dedup_id, entry, now, settings)
    if not entry then
      return nil
    end
  end
  if settings.unique_while_pending then
    local rec = load(entry[1])
    if rec and (rec.st == 'ready' or rec.st == 'delayed') then
      return entry[1]
    end
    return nil
  end
  return entry[1]
end

-- A record as the client reads it (RedisBackend._lease_view; RedisBackend.dead_letters reads the last two fields too).
local function view(rec)
  return {
    rec.id, rec.k or '', redis.call('HGET', K.payloads, rec.id), rec.p, rec.a or 0, rec.h,
    rec.tok or '', num(rec.dl or 0), num(rec.t), rec.b or '', rec.d or '', rec.r or '', num(rec.da or 0),
  }
end
