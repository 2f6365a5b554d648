-- Shared helpers of the sharded-broker Redis Functions library. RedisBackend loads the
-- library once per server (FUNCTION LOAD) as: a header naming it (`#!lua name=...` and
-- `local LIB = '...'`), this file, then every operation file (files whose name starts
-- with "_" are not operations); each operation registers one function with register().
-- Helpers are created once, when the library loads, not on every call.
--
-- Each helper mirrors the function of the same name in sharded_broker/backends/planner.py
-- (the decisions the memory model and SQLite share); read them side by side.
--
-- Every key of one queue comes in `keys`, in the order of QUEUE_KEYS in redis.py, all
-- with the hash tag {<queue>}; no key name is ever built here. Per-shard-key data lives
-- inside those fixed structures:
--   msgs        hash   id -> record (see load(): the client's envelope, then t s, then the
--                      fields that differ from their defaults)
--   ready       zset   ready messages, score 0, in lex order: keyed ones as
--                      key \0 prio(8 hex) seq(14 hex) hold(1) id, unkeyed ones (the
--                      unkeyed lane) as \1 prio(8 hex) seq(14 hex) id. hold is '1' when the
--                      message was placed with a not-before time in the future (a retry
--                      holding its key), so only those records are read to schedule a key.
--   keyq        zset   keys ready to be served, score = ready time, member order(16 hex)..key
--                      (the order breaks ties)
--   state       hash   per-queue counters and per-key state, one field each:
--                        #order #head #tail   counters (order: ties, tokens; seqs)
--                        #paused              '1' while the whole queue is paused
--                        #np #ni              how many keys are paused / have an interval
--                        #qlast               the last minute a queue metrics field was made
--                        #kspan               the span of the per-key metrics hash in use
--                        #dnext #lnext        lower bounds of the first score in delayed and
--                                             leases ('none': empty; see lower_bound)
--                        #encoding            keeps the hash a hashtable (HASHTABLE_FIELD)
--                        k:<key>  "slots,ready_at,order,head"  a key with slots in use or a
--                                 place in keyq (ready_at '' when not in keyq; head: the
--                                 ready member of its head when it got that place); a
--                                 weighted key in a round has "slots:turns:at:order" as its
--                                 first field (services used, the place it keeps)
--                        w:<key>  the key's weight (> 1)    #nw  how many keys have one
--                        l:<key>  time of the key's last delivery (while an interval applies)
--                        i:<key>  the key's own interval     p:<key>  '1': the key is paused
--                        b:<id>   cmsgpack list of the unsettled ids of a batch of 2 or more,
--                                 then the batch's size (a one-message batch has no entry)
--                        d:<dedup id>  cmsgpack {id, expires}
--                        dl:<key> how many delayed messages the key has (max_pending_per_key;
--                                 absent: none)
--                        r:<ref>  the id of the newest message enqueued with that ref (see
--                                 "Refs" in backend.py; only messages with a ref touch these)
--   backlog     zset   key -> minus its live (not dead) messages, so ZRANGE lists the largest
--                      backlog first and equal backlogs by key
--   delayed     zset   score = due time, member order..id
--   leases      zset   score = deadline, member token..id[\0 key[\0 batch]] (lease_member)
--   dedupexp    zset   score = expires, member dedup id
--   dead        zset   score = order of death, member id
--   readyage    zset   score = enqueued_at, member id, for ready messages (oldest age)
--   metrics     hash   "<minute>:<c>" (the queue) -> count, c one of e d a r x (enqueued
--                      delivered acked retried dead): HINCRBY; old minutes go when a new
--                      minute starts
--   signal      list   wake-up tokens for waiting consumers
--   events      pub/sub channel (not a key; passed in keys for its hash tag, which lets
--               Redis Cluster route it with the queue)
--   kmetrics0..2 hash  "<minute>:<c>:<key>" (one shard key) -> count, in the hash of the
--                      minute's span (see key_span)
-- Counts (ready, leased, delayed, dead) are not stored: they are the sizes of the indexes.
--
-- record fields: k (key, absent when unkeyed), p (priority), s (seq, absent while delayed
-- without a place), t (enqueued_at), h (headers JSON), d (dedup id), ah (at_head), st
-- (state: new|ready|delayed|leased|dead), nb (not before), a (attempts: completed
-- deliveries), o (order of its delayed entry), ea and eo (when it entered the ready order,
-- eo for the unkeyed lane), r (reason), da (died at), pl (payload), rf (ref, while its r:<ref>
-- field names this message; absent, not even nil, when none). While leased (see
-- as_leased, never stored): tok (lease token), b (batch id, for a batch of 2 or more).

local MSGS, READY, KEYQ, STATE, BACKLOG, DELAYED, LEASES, DEDUPEXP, DEAD, READYAGE, METRICS,
  SIGNAL, EVENTS, KMETRICS0, KMETRICS1, KMETRICS2 = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16

-- Tail seqs count up from here and head seqs count down, so every head seq sorts first.
local SEQ_ORIGIN = 4503599627370496 -- 2^52
local PRIORITY_OFFSET = 2147483648 -- 2^31: priorities become unsigned, fixed-width hex
-- Bounded work per call: at most this many due delayed messages promoted, expired leases
-- returned and dedup entries forgotten; the rest is due at once (retry_in 0). As text: it
-- is only ever a LIMIT argument.
local SWEEP_LIMIT = '500'
local SIGNAL_TOKENS = 16
-- Counters are reserved from the state hash in blocks: one HINCRBY per call in the
-- common case. Unused numbers of a block are skipped; only their order matters.
local BLOCK = 64
local BLOCK_TEXT = '64'
local COUNTER_LETTERS = { enqueued = 'e', delivered = 'd', acked = 'a', retried = 'r', dead = 'x' }
local LETTERS = { 'e', 'd', 'a', 'r', 'x' }
-- Per-key metrics hashes taking turns (see key_span), by slot number from 0.
local KMETRICS = { [0] = KMETRICS0, KMETRICS1, KMETRICS2 }
local KMETRICS_SLOTS = 3

-- Numbers given to redis.call are turned into text by Redis with a float format (slow):
-- small counts go as text from this table, made once when the library loads.
-- (Filled on first use: the string library is not there while the library loads.)
local TEXT = {}
local function text(n)
  local t = TEXT[n]
  if not t then
    t = string.format('%d', n)
    if n >= -1 and n <= 1000 then
      TEXT[n] = t
    end
  end
  return t
end

-- Redis keeps a hash of up to hash-max-listpack-entries (128 to 512) short fields in a
-- listpack, where every lookup is a linear scan: the state and metrics hashes get one
-- value longer than hash-max-listpack-value (64) when they are made, which keeps them in
-- hashtable encoding (a hash never goes back), so a lookup costs the same at 10 keys as at
-- 100,000.
local HASHTABLE_FIELD = '#encoding'
local HASHTABLE_VALUE = 'this value is longer than hash-max-listpack-value: it keeps the hash a hashtable'

-- Per-call state, reset by begin() (the library's locals outlive a call).
local K, NOW_ARG, CACHE, RAW, OBSERVE, BLOCKS, KEYSTATE, BOUNDS

-- Every time and duration is a whole number of microseconds (exact in a Lua number), so
-- that scores are integers (stored as such in small sorted sets, never parsed back) and
-- answers are integer replies; the client converts to and from seconds.
local function num(us)
  return string.format('%d', us)
end

-- The backend's clock: the server's TIME unless the client passed a test clock reading.
local function clock(arg)
  if arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The start of the minute holding `now`, in seconds (metrics fields are named by it).
local function minute_of(now)
  return math.floor(now / 60000000) * 60
end

-- The call's options: a MessagePack map by name, packed by RedisBackend._options_arg
-- (max_deliveries absent when unlimited; interval and dedup_window in microseconds; kept
-- and key_kept in minutes; publish: events on, true for PUBLISH, 'shard' for SPUBLISH), decoded once per distinct text.
local PARSED = {}
local PARSED_COUNT = 0

local function options(text)
  local parsed = PARSED[text]
  if parsed then
    return parsed
  end
  parsed = cmsgpack.unpack(text)
  if PARSED_COUNT >= 64 then
    PARSED, PARSED_COUNT = {}, 0
  end
  PARSED[text] = parsed
  PARSED_COUNT = PARSED_COUNT + 1
  return parsed
end

-- OBSERVE.opts is set by the operations that count metrics, from their options argument.
local function begin(keys)
  K = keys
  CACHE, RAW, BLOCKS, KEYSTATE, BOUNDS = {}, {}, {}, {}, { dirty = {} }
  OBSERVE = { opts = nil, counts = {}, keys = {}, events = {} }
end

-- The next number of a state counter ('#order', '#head', '#tail'), from this call's block.
local function next_count(name)
  local block = BLOCKS[name]
  if not block or block[1] > block[2] then
    local last = redis.call('HINCRBY', K[STATE], name, BLOCK_TEXT)
    if last == BLOCK then -- a new counter: the state hash may be new too
      redis.call('HSET', K[STATE], HASHTABLE_FIELD, HASHTABLE_VALUE)
    end
    block = { last - BLOCK + 1, last }
    BLOCKS[name] = block
  end
  local n = block[1]
  block[1] = n + 1
  return n
end

local function next_order()
  return next_count('#order')
end

local function next_seq(at_head)
  if at_head then
    return SEQ_ORIGIN - next_count('#head')
  end
  return SEQ_ORIGIN + next_count('#tail')
end

-- A delayed member: the order of its entry, the id and, for a keyed message, its key, so
-- that a message whose record was destroyed still releases what its key holds.
local function timer_member(rec)
  local member = string.format('%016x', rec.o) .. rec.id
  if rec.k then
    return member .. '\0' .. rec.k
  end
  return member
end

-- A lease token: 30 hex digits, the lease's order (16, shared by the messages of one
-- batch) and when it was delivered (14), then 'b' for a batch of two or more.
local TOKEN = 30

local function new_token(now, batch)
  return string.format('%016x%014x', next_order(), now) .. (batch and 'b' or '')
end

-- When the lease a token names was delivered.
local function token_time(token)
  return tonumber(string.sub(token, 17, TOKEN), 16)
end

-- A leases member: the token's digits, the id, and for a keyed message its key and, in a
-- batch of two or more, the batch id. So a client holding (id, token, key, batch) names
-- its lease without reading the record, and a lease whose record was destroyed still
-- names what it holds.
local function lease_member(token, id, key, batch)
  local member = string.sub(token, 1, TOKEN) .. id
  if key then
    member = member .. '\0' .. key
    if #token > TOKEN then
      member = member .. '\0' .. batch
    end
  end
  return member
end

-- The parts of a leases member: token, id, key, batch (nil when single).
local function lease_parts(member)
  local token = string.sub(member, 1, TOKEN)
  local at = string.find(member, '\0', TOKEN + 1, true)
  if not at then
    return token, string.sub(member, TOKEN + 1), nil, nil
  end
  local id = string.sub(member, TOKEN + 1, at - 1)
  local at2 = string.find(member, '\0', at + 1, true)
  if not at2 then
    return token, id, string.sub(member, at + 1), nil
  end
  return token .. 'b', id, string.sub(member, at + 1, at2 - 1), string.sub(member, at2 + 1)
end

-- The id a ready member names.
local function ready_id(member)
  if string.byte(member, 1) == 1 then
    return string.sub(member, 24)
  end
  return string.sub(member, string.find(member, '\0', 1, true) + 24)
end

local function ready_member(rec)
  local prio_seq = string.format('%08x%014x', rec.p + PRIORITY_OFFSET, rec.s)
  if rec.k then
    return rec.k .. '\0' .. prio_seq .. ((rec.nb > rec.ea) and '1' or '0') .. rec.id
  end
  return '\1' .. prio_seq .. rec.id
end

-- Lex bounds of one key's members, and of the unkeyed lane's.
local function key_range(key)
  return '[' .. key .. '\0', '(' .. key .. '\1'
end
local LANE_FROM, LANE_TO = '[\1', '(\2'

-- Records loaded in this call (false once forgotten), written back once by flush() when
-- they changed; RAW keeps what was read, so unchanged records cost no write. A stored
-- record is consecutive msgpack values: the envelope the client packed at enqueue (k p h d
-- ah pl), then t s, then the fields that differ from their defaults (st a nb ea eo o r da),
-- trailing ones left out. A leased message's stored record is the one it had while ready:
-- what its lease changes (state, attempts + 1, token, deadline, batch) is in its leases
-- member and score (as_leased() lays it over the record), so lease and ack write nothing
-- to it. Records marked fresh were written by this call already.
-- A record damaged behind the engine's back reads as missing (see entry_record).
local function valid(decoded, p, h, pl, t)
  return decoded and type(p) == 'number' and type(t) == 'number' and type(h) == 'string' and type(pl) == 'string'
end

-- Whether a stored record can be read, without building it.
local function readable(raw)
  local decoded, _, p, h, _, _, pl, t = pcall(cmsgpack.unpack, raw)
  return valid(decoded, p, h, pl, t)
end

local function decode(id, raw)
  local decoded, k, p, h, d, ah, pl, t, s, st, a, nb, ea, eo, o, r, da, rf = pcall(cmsgpack.unpack, raw)
  if not valid(decoded, p, h, pl, t) then
    return nil
  end
  return {
    id = id, k = k, p = p, h = h, d = d, ah = ah, pl = pl, t = t, s = s, st = st or 'ready', a = a or 0,
    nb = nb or t, ea = ea or t, eo = eo, o = o, r = r, da = da, rf = rf,
  }
end

local function load(id)
  local rec = CACHE[id]
  if rec ~= nil then
    return rec or nil
  end
  local raw = redis.call('HGET', K[MSGS], id)
  if not raw then
    return nil
  end
  rec = decode(id, raw)
  if rec then
    CACHE[id] = rec
    RAW[id] = raw
  end
  return rec
end

local function store(rec)
  CACHE[rec.id] = rec
end

local function packed(rec)
  local st = rec.st ~= 'ready' and rec.st or nil
  local a = rec.a ~= 0 and rec.a or nil
  local nb = rec.nb ~= rec.t and rec.nb or nil
  local ea = rec.ea ~= rec.t and rec.ea or nil
  if rec.rf then
    return cmsgpack.pack(rec.k, rec.p, rec.h, rec.d, rec.ah, rec.pl, rec.t, rec.s, st, a, nb, ea, rec.eo, rec.o,
      rec.r, rec.da, rec.rf)
  end
  return cmsgpack.pack(rec.k, rec.p, rec.h, rec.d, rec.ah, rec.pl, rec.t, rec.s, st, a, nb, ea, rec.eo, rec.o,
    rec.r, rec.da)
end

-- Lower bounds of the earliest due time in delayed ('#dnext') and the earliest deadline in
-- leases ('#lnext'), kept in the state hash, so a call sweeps those indexes only when
-- something may be due there: every entry added lowers its bound, removals leave it (a
-- bound only has to be low enough), a sweep sets it to the index's first score. 'none':
-- the index is empty; no field: not known, sweep. In BOUNDS: a number, math.huge (none)
-- or false (not known), under 'd' and 'l'.
local BOUND_FIELDS = { d = '#dnext', l = '#lnext' }

local function parse_bound(value)
  if not value then
    return false
  end
  return value == 'none' and math.huge or tonumber(value)
end

-- The bounds from their state fields as read by the caller (lease reads them with its
-- other state fields), or read now; with them, how many keys are paused ('#np').
local function read_bounds(dnext, lnext, paused_keys)
  if BOUNDS.d == nil then
    if dnext == nil then
      dnext, lnext, paused_keys = unpack(redis.call('HMGET', K[STATE], '#dnext', '#lnext', '#np'))
    end
    BOUNDS.d, BOUNDS.l = parse_bound(dnext), parse_bound(lnext)
    BOUNDS.np = tonumber(paused_keys) or 0
  end
end

-- Whether a key may be paused (only then is its flag read).
local function may_be_paused()
  read_bounds()
  return BOUNDS.np > 0
end

-- An entry due at `at` was added to delayed ('d') or leases ('l').
local function lower_bound(name, at)
  read_bounds()
  local bound = BOUNDS[name]
  if bound and at < bound then
    BOUNDS[name] = at
    BOUNDS.dirty[name] = true
  end
end

-- Whether an entry of delayed ('d') or leases ('l') may be due at `now`.
local function may_be_due(name, now)
  read_bounds()
  local bound = BOUNDS[name]
  return bound == false or bound <= now
end

-- After a sweep of an index: its bound is its first score now.
local function reset_bound(name, index)
  local first = redis.call('ZRANGE', K[index], '0', '0', 'WITHSCORES')[2]
  BOUNDS[name] = first and tonumber(first) or math.huge
  BOUNDS.dirty[name] = true
end

local function flush_bounds()
  for name in pairs(BOUNDS.dirty) do
    local bound = BOUNDS[name]
    redis.call('HSET', K[STATE], BOUND_FIELDS[name], bound == math.huge and 'none' or num(bound))
  end
end

-- Store rec if this call changed it; answers the stored record.
local function write_back(id, rec)
  local raw = packed(rec)
  if raw ~= RAW[id] then
    redis.call('HSET', K[MSGS], id, raw)
    RAW[id] = raw
  end
  return raw
end

local function flush_key_states()
  for key, ks in pairs(KEYSTATE) do
    if ks.dirty then
      local raw = false
      if ks.slots > 0 or ks.at then
        local slots = text(ks.slots)
        local r = ks.round
        if r then
          slots = slots .. ':' .. text(r.turns) .. ':' .. num(r.at) .. ':' .. num(r.order)
        end
        raw = slots .. ',' .. (ks.at and num(ks.at) or '') .. ',' .. (ks.order and num(ks.order) or '')
          .. ',' .. (ks.head or '')
      end
      if raw ~= ks.raw then
        if raw then
          redis.call('HSET', K[STATE], 'k:' .. key, raw)
        else
          redis.call('HDEL', K[STATE], 'k:' .. key)
        end
        ks.raw = raw
      end
      ks.dirty = false
    end
  end
end

local function flush()
  flush_bounds()
  flush_key_states()
  for id, rec in pairs(CACHE) do
    if rec and rec.st ~= 'leased' and not rec.fresh then
      write_back(id, rec)
    end
  end
end

-- A record as its lease makes it (see load): delivered once more, under token.
local function as_leased(rec, token, batch)
  if rec.st ~= 'leased' then
    rec.st = 'leased'
    rec.a = rec.a + 1
  end
  rec.tok = token
  rec.b = batch
  return rec
end

local function signal(count)
  if count > SIGNAL_TOKENS then
    count = SIGNAL_TOKENS
  end
  -- Tokens already waiting wake the next waiters anyway: top up only what is missing.
  local missing = count - redis.call('LLEN', K[SIGNAL])
  if missing > 0 then
    local tokens = {}
    for i = 1, missing do
      tokens[i] = '1'
    end
    redis.call('LPUSH', K[SIGNAL], unpack(tokens))
  end
end

-- Per-key state "slots,ready_at,order,head" (see state k:<key>), read once per call.
local function key_state(key)
  local ks = KEYSTATE[key]
  if ks then
    return ks
  end
  local raw = redis.call('HGET', K[STATE], 'k:' .. key)
  ks = { slots = 0, raw = raw or false }
  if raw then
    local slots, at, order, first = string.match(raw, '^([%d:]+),([^,]*),([^,]*),(.*)$')
    local plain, turns, round_at, round_order = string.match(slots or '', '^(%d+):(%d+):(%d+):(%d+)$')
    if plain then
      slots = plain
      ks.round = { turns = tonumber(turns), at = tonumber(round_at), order = tonumber(round_order) }
    end
    ks.slots = tonumber(slots) or 0
    if at ~= '' and order ~= '' then
      ks.at = tonumber(at)
      ks.order = tonumber(order)
      ks.head = first
    end
  end
  KEYSTATE[key] = ks
  return ks
end

-- Written once, by flush(), however often the call changed it.
local function save_key_state(key, ks)
  ks.dirty = true
end

local function keyq_member(ks, key)
  return string.format('%016x', ks.order) .. key
end

-- Take key out of keyq (it keeps its slots).
local function unschedule(key, ks)
  if ks.at then
    redis.call('ZREM', K[KEYQ], keyq_member(ks, key))
    ks.at, ks.order, ks.head = nil, nil, nil
  end
end

-- Remove a record from the index of its current state (the memory model skips such stale
-- heap entries lazily; here they go at once).
local function unindex(rec)
  local st = rec.st
  if st == 'ready' then
    redis.call('ZREM', K[READY], ready_member(rec))
    redis.call('ZREM', K[READYAGE], rec.id)
  elseif st == 'delayed' then
    redis.call('ZREM', K[DELAYED], timer_member(rec))
  elseif st == 'leased' then
    redis.call('ZREM', K[LEASES], lease_member(rec.tok, rec.id, rec.k, rec.b))
  elseif st == 'dead' then
    redis.call('ZREM', K[DEAD], rec.id)
  end
end

local function set_state(rec, state)
  unindex(rec)
  if rec.k and (rec.st == 'delayed') ~= (state == 'delayed') then
    -- Each key's delayed messages are counted ('dl:<key>' in state) for max_pending_per_key:
    -- one HINCRBY where a keyed message enters or leaves the delayed state, nothing else.
    local field = 'dl:' .. rec.k
    if state == 'delayed' then
      redis.call('HINCRBY', K[STATE], field, 1)
    elseif redis.call('HINCRBY', K[STATE], field, -1) <= 0 then
      redis.call('HDEL', K[STATE], field)
    end
  end
  rec.st = state
end

-- One live message of key more; answers how many it has now.
local function count_key(key)
  return -tonumber(redis.call('ZINCRBY', K[BACKLOG], '-1', key))
end

-- One live message of key fewer; a key with no live message and no slot in use is
-- forgotten.
local function uncount_key(key)
  local live = -tonumber(redis.call('ZINCRBY', K[BACKLOG], '1', key))
  if live <= 0 then
    redis.call('ZREM', K[BACKLOG], key)
    local ks = key_state(key)
    if ks.slots == 0 then
      unschedule(key, ks)
      ks.round = nil
      save_key_state(key, ks)
    end
  end
  return math.max(live, 0)
end

-- Count one lifecycle step of rec (per queue, and per key when it has one) and publish it.
-- Counts are summed per call and written by flush_observed().
local function record(counter, id, key, now)
  local letter = COUNTER_LETTERS[counter]
  local counts = OBSERVE.counts
  counts[letter] = (counts[letter] or 0) + 1
  if key then
    local per_key = OBSERVE.keys[letter]
    if not per_key then
      per_key = {}
      OBSERVE.keys[letter] = per_key
    end
    per_key[key] = (per_key[key] or 0) + 1
  end
  if OBSERVE.opts.publish then
    OBSERVE.events[#OBSERVE.events + 1] = counter .. '\0' .. id .. '\0' .. (key and ('+' .. key) or '') .. '\0'
      .. num(now)
  end
end

-- Per-key fields live in KMETRICS_SLOTS hashes that take turns: the minutes of span n (a
-- span is ceil(key_kept / (KMETRICS_SLOTS - 1)) minutes) go to slot n % KMETRICS_SLOTS, so
-- the slots hold at least the last key_kept minutes; when a new span starts, its slot
-- (which holds a span that has left the window) is dropped whole (UNLINK: freed off the
-- main thread), so no field needs an expiry entry of its own.
local function key_span(minute, key_kept)
  return math.floor(minute / 60 / math.ceil(key_kept / (KMETRICS_SLOTS - 1)))
end

-- The index (in K) of the hash holding the per-key fields of a minute.
local function key_metrics_slot(minute, key_kept)
  return KMETRICS[key_span(minute, key_kept) % KMETRICS_SLOTS]
end

-- Runs when a call makes a queue field of a new minute (the first call of each minute
-- that counts anything): forget the queue's minutes that left the window (they all lie in
-- (last - kept minutes, last], so the work is bounded) and start the key span.
local function new_minute(minute)
  local last, span_text = unpack(redis.call('HMGET', K[STATE], '#qlast', '#kspan'))
  last = tonumber(last)
  local span, old_span = key_span(minute, OBSERVE.opts.key_kept), tonumber(span_text)
  if old_span == nil or span > old_span then
    if old_span then
      for n = old_span + 1, math.min(span, old_span + KMETRICS_SLOTS) do
        local index = KMETRICS[n % KMETRICS_SLOTS]
        redis.call('UNLINK', K[index])
      end
    end
    local index = KMETRICS[span % KMETRICS_SLOTS]
    redis.call('HSET', K[index], HASHTABLE_FIELD, HASHTABLE_VALUE)
    redis.call('HSET', K[STATE], '#kspan', text(span))
  end
  if last and last >= minute then
    return
  end
  redis.call('HSET', K[STATE], '#qlast', num(minute))
  if not last then
    redis.call('HSET', K[METRICS], HASHTABLE_FIELD, HASHTABLE_VALUE)
    return
  end
  local kept = OBSERVE.opts.kept
  local first = math.max(last - (kept - 1) * 60, 0)
  local stop = math.min(last, minute - kept * 60)
  local fields = {}
  for m = first, stop, 60 do
    local prefix = num(m) .. ':'
    for _, letter in ipairs(LETTERS) do
      fields[#fields + 1] = prefix .. letter
    end
  end
  if #fields > 0 then
    redis.call('HDEL', K[METRICS], unpack(fields))
  end
end

local function flush_observed(now)
  if next(OBSERVE.counts) == nil then
    return -- nothing counted, so no event either
  end
  local minute = minute_of(now)
  local prefix = num(minute) .. ':'
  local fresh = false
  for letter, added in pairs(OBSERVE.counts) do
    if redis.call('HINCRBY', K[METRICS], prefix .. letter, text(added)) == added then
      fresh = true -- a field made by this call: a new minute for this counter
    end
  end
  if fresh then
    new_minute(minute)
  end
  local index = key_metrics_slot(minute, OBSERVE.opts.key_kept)
  for letter, per_key in pairs(OBSERVE.keys) do
    local field_prefix = prefix .. letter .. ':'
    for key, added in pairs(per_key) do
      redis.call('HINCRBY', K[index], field_prefix .. key, text(added))
    end
  end
  if #OBSERVE.events > 0 then
    -- 'shard' (a cluster): the queue's shard channel, kept on its slot's master and
    -- replicas, where PUBLISH would be broadcast over the cluster bus to every node
    redis.call(OBSERVE.opts.publish == 'shard' and 'SPUBLISH' or 'PUBLISH', K[EVENTS], table.concat(OBSERVE.events, '\n'))
  end
end

-- Refs (see "Refs" in backend.py): state field r:<ref> names the newest message enqueued
-- with the ref, whose record carries it (rf). Messages without a ref never come here.

-- The new record rec (rec.rf set) takes its ref's field; an older message carrying the ref
-- loses it (its record is written back by flush()).
local function take_ref(rec)
  local field = 'r:' .. rec.rf
  local older = redis.call('HGET', K[STATE], field)
  if older then
    local old = load(older)
    if old then
      if old.fresh then
        -- Enqueued ready by this very call, its record written whole already: rewritten.
        local whole = decode(older, redis.call('HGET', K[MSGS], older))
        whole.rf = nil
        redis.call('HSET', K[MSGS], older, packed(whole))
      end
      old.rf = nil
    end
  end
  redis.call('HSET', K[STATE], field, rec.id)
end

-- The message `id` is settled without its record being read (ack: the client's lease
-- names its ref): the ref's field goes if it still names that message.
local function drop_ref(ref, id)
  local field = 'r:' .. ref
  if redis.call('HGET', K[STATE], field) == id then
    redis.call('HDEL', K[STATE], field)
  end
end

-- The id of the message a ref names, or nil.
local function ref_id(ref)
  return redis.call('HGET', K[STATE], 'r:' .. ref) or nil
end

-- The stored record's values after the client's envelope for a message that enqueue
-- places ready at once and that carries a ref (rf comes after every other field).
local function ref_tail(rec, now)
  return cmsgpack.pack(now, rec.s, nil, nil, rec.nb ~= now and rec.nb or nil, nil, rec.eo, nil, nil, nil, rec.rf)
end

-- Drop a settled record (acked or purged) from every index it counts in.
local function forget(rec)
  local was = rec.st
  set_state(rec, 'gone')
  redis.call('HDEL', K[MSGS], rec.id)
  if rec.rf then
    redis.call('HDEL', K[STATE], 'r:' .. rec.rf)
  end
  CACHE[rec.id] = false
  if was ~= 'dead' and rec.k then
    uncount_key(rec.k)
  end
end

local function dead_letter(rec, now, reason)
  set_state(rec, 'dead')
  rec.r = reason
  rec.da = now
  redis.call('ZADD', K[DEAD], num(next_order()), rec.id)
  if rec.k then
    uncount_key(rec.k)
  end
end

-- Defined below (it schedules keys), used by entry_record too.
local settled

-- The record an index entry names. One that cannot be read (corrupted or deleted behind
-- the engine's back) is rebuilt from what the entry says and dead-lettered with a reason,
-- so that it neither fails every later call nor blocks its key. index: ready, delayed,
-- leases or dead (the structure it came from); now: nil reads the clock from NOW_ARG,
-- and only when needed. A record named by a leases member comes as its lease makes it.
local function entry_record(index, member, now)
  local id, rec, token, key, batch
  if index == 'leases' then
    token, id, key, batch = lease_parts(member)
  elseif index == 'ready' then
    id = ready_id(member)
  elseif index == 'delayed' then
    id = string.sub(member, 17, (string.find(member, '\0', 17, true) or 0) - 1)
  else
    id = member
  end
  rec = load(id)
  if rec then
    if token then
      as_leased(rec, token, batch)
    end
    return rec
  end
  now = now or clock(NOW_ARG)
  rec = { id = id, p = 0, a = 0, h = '{}', t = now, nb = 0, pl = '' }
  if index == 'ready' then
    local at = 2
    if string.byte(member, 1) ~= 1 then
      at = string.find(member, '\0', 1, true)
      rec.k = string.sub(member, 1, at - 1)
      at = at + 1
    end
    rec.p = tonumber(string.sub(member, at, at + 7), 16) - PRIORITY_OFFSET
    rec.s = tonumber(string.sub(member, at + 8, at + 21), 16)
    rec.ea = 0
    if rec.k and string.sub(member, at + 22, at + 22) == '1' then
      rec.nb = 1 -- so that ready_member(rec) gives back this member
    end
    rec.st = 'ready'
  elseif index == 'delayed' then
    rec.o = tonumber(string.sub(member, 1, 16), 16)
    local at = string.find(member, '\0', 17, true)
    if at then
      rec.k = string.sub(member, at + 1)
    end
    rec.st = 'delayed'
  elseif index == 'leases' then
    rec.k, rec.tok, rec.b, rec.st = key, token, batch, 'leased'
  else
    rec.st = 'dead'
  end
  local was = rec.st
  rec.r = 'corrupted record: it could not be read from Redis, so it was dead-lettered'
  CACHE[id] = rec
  RAW[id] = nil
  if was ~= 'dead' then
    set_state(rec, 'dead')
    rec.da = now
    redis.call('ZADD', K[DEAD], num(next_order()), id)
    if rec.k then
      uncount_key(rec.k)
    end
    if was == 'leased' then
      settled(rec, now, {}) -- its key's slot is free again (the rest of its batch, if any, expires on its own)
    end
  end
  return rec
end

-- The record of the first readable ready member between two lex bounds, in the order
-- `command` reads them (ZRANGEBYLEX: first; ZREVRANGEBYLEX, bounds swapped: last); an
-- unreadable one is dead-lettered on the way. nil when there is none.
local function first_ready(command, from, to, now)
  while true do
    local member = redis.call(command, K[READY], from, to, 'LIMIT', '0', '1')[1]
    if not member then
      return nil
    end
    local rec = entry_record('ready', member, now)
    if rec.st ~= 'dead' then
      return rec
    end
  end
end

-- The first `count` ready members of key, in order.
local function key_members(key, count)
  local from, to = key_range(key)
  return redis.call('ZRANGEBYLEX', K[READY], from, to, 'LIMIT', '0', text(count))
end

-- The first `count` ready messages of key, in order (unreadable ones dead-lettered).
local function key_heads(key, count)
  while true do
    local heads = {}
    for i, member in ipairs(key_members(key, count)) do
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

-- Until when the message a ready member names holds its key: its not-before time when it
-- was placed holding the key (its record is read then; an unreadable one is dead-lettered
-- and nil answered), else 0.
local function member_not_before(member)
  local at = string.find(member, '\0', 1, true)
  if string.sub(member, at + 23, at + 23) == '0' then
    return 0
  end
  local rec = entry_record('ready', member, nil)
  if rec.st == 'dead' then
    return nil
  end
  return rec.nb
end

-- The key's head: its first ready member and that message's not-before time, or nil.
local function head_of(key)
  while true do
    local member = key_members(key, 1)[1]
    if not member then
      return nil
    end
    local nb = member_not_before(member)
    if nb then
      return member, nb
    end
  end
end

-- Give key a place in keyq if its head message exists. keep_place: a key already waiting
-- keeps its earlier ready time (new arrivals must not push it to the back of the round).
-- settings: when given, a key whose slots are all in use or that is paused gets no place
-- (it is scheduled again when a slot frees or on resume). A weighted key in a round
-- (ks.round, see serve_key) whose head does not hold it past now gets back the place it
-- was served from; one whose head holds it, or that has nothing ready, ends its round.
-- member, nb: the key's head and its not-before time (see head_of) when the caller knows
-- them (nil: read).
local function schedule(key, now, keep_place, settings, member, nb)
  local ks = key_state(key)
  if settings and not ks.at then
    if ks.slots >= settings.key_concurrency
        or (may_be_paused() and redis.call('HGET', K[STATE], 'p:' .. key) == '1') then
      return
    end
  end
  if not member then
    member, nb = head_of(key)
  end
  if not member then
    unschedule(key, ks)
    ks.round = nil
    save_key_state(key, ks)
    return
  end
  local at = math.max(now, nb)
  if keep_place and ks.at then
    at = math.max(ks.at, nb)
  elseif ks.round then
    local r = ks.round
    if nb <= now then
      if ks.at ~= r.at or ks.order ~= r.order then
        unschedule(key, ks)
        ks.at, ks.order = r.at, r.order
        redis.call('ZADD', K[KEYQ], num(r.at), keyq_member(ks, key))
      end
      ks.head = member
      save_key_state(key, ks)
      return
    end
    ks.round = nil
  end
  if at == ks.at then
    if ks.head ~= member then
      ks.head = member
      save_key_state(key, ks)
    end
    return
  end
  unschedule(key, ks)
  ks.at, ks.order, ks.head = at, next_order(), member
  redis.call('ZADD', K[KEYQ], num(at), keyq_member(ks, key))
  save_key_state(key, ks)
end

-- After rec (keyed, just placed with `now`) entered its key's order: keep the key's place
-- up to date. alone_member: rec's ready member when rec is the key's only live message
-- (so its head). Mirrors
-- schedule(key, now, true, settings), reading only what can change:
-- a waiting key whose recorded head still comes first keeps its place and head.
local function placed(rec, now, settings, alone_member)
  if alone_member then
    schedule(rec.k, now, true, settings, alone_member, rec.nb > rec.ea and rec.nb or 0)
    return
  end
  local ks = key_state(rec.k)
  if ks.at and ks.head then
    -- (priority, seq) of the recorded head, from its member (numbers, not a string
    -- comparison: Lua compares strings by the server's locale).
    local at = string.find(ks.head, '\0', 1, true)
    if at then
      local p = tonumber(string.sub(ks.head, at + 1, at + 8), 16) - PRIORITY_OFFSET
      local s = tonumber(string.sub(ks.head, at + 9, at + 22), 16)
      if rec.p > p or (rec.p == p and rec.s > s) then
        return -- not the new head: nothing changes (the place was computed from the head)
      end
    end
  end
  schedule(rec.k, now, true, settings)
end

-- Put a record (whose seq is set) into its key's order or the unkeyed lane; answers its
-- ready member.
local function place(rec, now)
  set_state(rec, 'ready')
  rec.ea = now
  if not rec.k then
    rec.eo = next_order()
  end
  local member = ready_member(rec)
  redis.call('ZADD', K[READYAGE], num(rec.t), rec.id)
  redis.call('ZADD', K[READY], '0', member)
  return member
end

local function delay(rec, due)
  set_state(rec, 'delayed')
  rec.nb = due
  rec.o = next_order()
  redis.call('ZADD', K[DELAYED], num(due), timer_member(rec))
  lower_bound('d', due)
end

local function promote_due(now, settings)
  if not may_be_due('d', now) then
    return
  end
  local due = redis.call('ZRANGEBYSCORE', K[DELAYED], '-inf', num(now), 'LIMIT', '0', SWEEP_LIMIT)
  for _, member in ipairs(due) do
    local rec = entry_record('delayed', member, now)
    if rec.st == 'delayed' then
      if not rec.s then
        rec.s = next_seq(rec.ah)
      end
      place(rec, now)
      if rec.k then
        placed(rec, now, settings)
      end
    end
  end
  reset_bound('d', DELAYED)
end

local function requeue(rec, now, after, position)
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

local function get_batch(rec)
  if not rec.b then
    return { rec.id }
  end
  local raw = redis.call('HGET', K[STATE], 'b:' .. rec.b)
  if not raw then
    return { rec.id }
  end
  local unsettled, size = cmsgpack.unpack(raw)
  rec.bn = size
  return unsettled
end

-- Release the key's slot once the last message of a batch is settled. Answers true when
-- that gave the key a place among the ready keys.
-- live: how many live messages the key has, when the caller just counted them.
function settled(rec, now, batch, live)
  local multi = rec.b ~= nil
  if #batch > 0 then
    if multi then
      redis.call('HSET', K[STATE], 'b:' .. rec.b, cmsgpack.pack(batch, rec.bn))
    end
    return
  end
  if multi then
    redis.call('HDEL', K[STATE], 'b:' .. rec.b)
  end
  if not rec.k then
    return
  end
  local ks = key_state(rec.k)
  ks.slots = math.max(ks.slots - 1, 0)
  if ks.slots == 0 and (live == 0 or (live == nil and not redis.call('ZSCORE', K[BACKLOG], rec.k))) then
    unschedule(rec.k, ks)
    ks.round = nil
    save_key_state(rec.k, ks)
    return
  end
  schedule(rec.k, now, false, nil)
  save_key_state(rec.k, ks)
  return ks.at ~= nil
end

-- Remove rec and every later message from its batch: what stays, and the later ones.
local function cut_batch(rec)
  local batch = get_batch(rec)
  local index = #batch + 1
  for i, id in ipairs(batch) do
    if id == rec.id then
      index = i
      break
    end
  end
  local followers = {}
  for i = index + 1, #batch do
    local follower = load(batch[i])
    if follower then
      followers[#followers + 1] = as_leased(follower, rec.tok, rec.b)
    end
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
    record('dead', rec.id, rec.k, now)
  elseif settings.max_deliveries and rec.a >= settings.max_deliveries then
    dead_letter(rec, now, string.format('%s after %d deliveries (max_deliveries=%d)', why, rec.a,
      settings.max_deliveries))
    record('dead', rec.id, rec.k, now)
  else
    requeue(rec, now, after, settings.retry_position)
    record('retried', rec.id, rec.k, now)
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
  if not may_be_due('l', now) then
    return
  end
  local expired = redis.call('ZRANGEBYSCORE', K[LEASES], '-inf', num(now), 'WITHSCORES', 'LIMIT', '0', SWEEP_LIMIT)
  for i = 1, #expired, 2 do
    local member = expired[i]
    -- An earlier expiry in this loop may have returned it with the rest of its batch.
    if i == 1 or redis.call('ZSCORE', K[LEASES], member) then
      local rec = entry_record('leases', member, now)
      if rec.st == 'leased' and rec.b then
        -- Members of one batch share a token, so equal deadlines sort by id: the batch's
        -- first message with this deadline fails, as the one delivered first.
        for _, id in ipairs(get_batch(rec)) do
          if id == rec.id then
            break
          end
          if redis.call('ZSCORE', K[LEASES], lease_member(rec.tok, id, rec.k, rec.b)) == expired[i + 1] then
            local first = load(id)
            if first then
              rec = as_leased(first, rec.tok, rec.b)
              break
            end
          end
        end
      end
      if rec.st == 'leased' then
        fail(rec, now, settings, 0, nil, 'lease expired')
      end
    end
  end
  reset_bound('l', LEASES)
end

-- The record a lease names (id, token, key or nil, batch id), when the lease's token is
-- still current.
local function current(id, token, key, batch)
  local member = lease_member(token, id, key, batch)
  if not redis.call('ZSCORE', K[LEASES], member) then
    return nil
  end
  local rec = entry_record('leases', member, nil)
  if rec.st ~= 'leased' then
    return nil -- unreadable: dead-lettered just now
  end
  return rec
end

-- Whether rec waits for delivery (ready or delayed): a leased message's stored record
-- still reads 'ready' (see load), but its ready member is gone.
local function waiting(rec)
  if rec.st == 'delayed' then
    return true
  end
  return rec.st == 'ready' and redis.call('ZSCORE', K[READY], ready_member(rec)) ~= false
end

-- An expired dedup entry is forgotten, except that with unique_while_pending a twin still
-- ready or delayed keeps its claim for another window.
local function expire_dedup(dedup_id, entry, now, settings)
  if entry and settings.unique_while_pending then
    local rec = load(entry[1])
    if rec and waiting(rec) then
      entry[2] = now + settings.dedup_window
      redis.call('HSET', K[STATE], 'd:' .. dedup_id, cmsgpack.pack(entry))
      redis.call('ZADD', K[DEDUPEXP], num(entry[2]), dedup_id)
      return entry
    end
  end
  redis.call('HDEL', K[STATE], 'd:' .. dedup_id)
  redis.call('ZREM', K[DEDUPEXP], dedup_id)
  return nil
end

local function dedup_entry(dedup_id)
  local raw = redis.call('HGET', K[STATE], 'd:' .. dedup_id)
  return raw and cmsgpack.unpack(raw) or nil
end

-- The id of the message an enqueue with dedup_id duplicates, or nil.
local function dedup_hit(dedup_id, now, settings)
  local expired = redis.call('ZRANGEBYSCORE', K[DEDUPEXP], '-inf', num(now), 'LIMIT', '0', SWEEP_LIMIT)
  for _, old in ipairs(expired) do
    expire_dedup(old, dedup_entry(old), now, settings)
  end
  local entry = dedup_entry(dedup_id)
  if not entry then
    return nil
  end
  -- The bounded sweep above may have left this entry past its expiry.
  if entry[2] <= now then
    entry = expire_dedup(dedup_id, entry, now, settings)
    if not entry then
      return nil
    end
  end
  if settings.unique_while_pending then
    local rec = load(entry[1])
    if rec and waiting(rec) then
      return entry[1]
    end
    return nil
  end
  return entry[1]
end

-- Set (value) or remove (nil) a key's own setting, the state field prefix .. key, keeping
-- count_field (how many keys of the queue have one: '#ni', '#np', '#nw') right, so hot
-- paths read the field only when some key has one.
local function set_key_setting(prefix, count_field, key, value)
  if value == nil then
    if redis.call('HDEL', K[STATE], prefix .. key) == 1 then
      redis.call('HINCRBY', K[STATE], count_field, '-1')
    end
  elseif redis.call('HSET', K[STATE], prefix .. key, value) == 1 then
    redis.call('HINCRBY', K[STATE], count_field, '1')
  end
end

-- Register one operation: fn(args) runs with this call's keys bound. Operations that
-- drain or settle (lease, ack, nack, release, extend, purge) are flagged allow-oom: a
-- server at maxmemory refuses new messages (enqueue is refused before it runs) but keeps
-- letting consumers take and settle what is queued, which frees memory.
local function register(name, fn, flags)
  redis.register_function({
    function_name = LIB .. '_' .. name,
    callback = function(keys, args)
      NOW_ARG = args[1]
      begin(keys)
      return fn(args)
    end,
    flags = flags,
  })
end

-- Backpressure (max_pending_per_key, max_pending, on_full), mirroring plan_limits and
-- room_for in planner.py. Used only when one of the limits is set.

-- (ready, delayed): how many of key's messages wait for delivery.
local function key_waiting(key)
  local from, to = key_range(key)
  return redis.call('ZLEXCOUNT', K[READY], from, to), tonumber(redis.call('HGET', K[STATE], 'dl:' .. key) or '0')
end

-- Under the limits: why enqueue must refuse the whole call ({key or '', setting, limit,
-- note}), or nil and the set of message numbers that each drop one of their key's ready
-- messages to go in. fields: the call's packed message fields (6 per message, see
-- enqueue.lua).
local function plan_limits(fields, count, now, settings)
  local per_key, total = settings.max_pending_per_key, settings.max_pending
  local queue_waiting = 0
  if total then
    queue_waiting = redis.call('ZCARD', K[READY]) + redis.call('ZCARD', K[DELAYED])
  end
  local keys, seen, drops = {}, {}, {}
  for n = 1, count do
    local f = 6 * (n - 1)
    local key, after, dedup_id, at_head = fields[f + 2], fields[f + 4], fields[f + 5], fields[f + 6]
    local counted = true
    if dedup_id then
      if seen[dedup_id] or dedup_hit(dedup_id, now, settings) then
        counted = false
      end
      seen[dedup_id] = true
    end
    if counted then
      local grows = true
      if per_key and key then
        local counts = keys[key]
        if not counts then
          local ready, delayed = key_waiting(key)
          counts = { ready + delayed, ready }
          keys[key] = counts
        end
        if counts[1] >= per_key and not at_head then
          if settings.on_full == 'reject' then
            return { key, 'max_pending_per_key', per_key, '' }
          end
          if counts[2] == 0 then
            return { key, 'max_pending_per_key', per_key,
              "on_full='" .. settings.on_full .. "' found no ready message to drop (all are delayed)" }
          end
          counts[2] = counts[2] - 1 -- the dropped one
          grows = false
          drops[n] = true
        end
        if grows then
          counts[1] = counts[1] + 1
        end
        if after <= 0 or at_head then
          counts[2] = counts[2] + 1
        end
      end
      if total and grows then
        if queue_waiting >= total and not at_head then
          return { '', 'max_pending', total, '' }
        end
        queue_waiting = queue_waiting + 1
      end
    end
  end
  return nil, drops
end

-- The backpressure limits over an enqueue of `count` messages (`fields` as plan_limits
-- reads them): the answer that refuses it ({0, key or '', setting, limit, note}: a number
-- first, where an enqueue answers string ids; nothing of it stored, what the call swept
-- before written), or nil and the message numbers that drop one of their key's ready
-- messages to go in (nil: no limit set).
local function refused_by_limits(fields, count, now, settings)
  if not (settings.max_pending_per_key or settings.max_pending) then
    return nil, nil
  end
  local refusal, drops = plan_limits(fields, count, now, settings)
  if refusal then
    flush()
    return { 0, unpack(refusal) }, nil
  end
  return nil, drops
end

-- The ready message of key that a new one replaces (plan_limits found the key full): its
-- first under drop_oldest, its last under replace.
local function room_for(key, now, settings)
  if settings.on_full == 'drop_oldest' then
    return key_heads(key, 1)[1]
  end
  local from, to = key_range(key)
  return first_ready('ZREVRANGEBYLEX', to, from, now)
end

-- Dead-letter the message room_for chose, after the new one of its key went in (so the
-- key keeps its place in the round).
local function drop_to_make_room(rec, now, settings)
  if rec.fresh then
    -- Enqueued earlier in this call: its stored record is the client's envelope, which
    -- flush() must now write back whole.
    local stored = decode(rec.id, redis.call('HGET', K[MSGS], rec.id))
    rec.h, rec.pl, rec.fresh = stored.h, stored.pl, nil
  end
  dead_letter(rec, now, 'dropped: max_pending_per_key')
  record('dead', rec.id, rec.k, now)
  schedule(rec.k, now, true, settings)
end
