-- lease: deliver up to `limit` messages, serving ready keys in fairness order.
-- ARGV: clock, metrics minutes kept ("<queue>,<key>"), publish events (1/0), 6 settings, limit, per_key,
-- visibility timeout.
-- Answers {retry_in ('' = nothing scheduled), lease views...}.
local now = clock(ARGV[1])
read_observe(ARGV, 2)
local settings = read_settings(ARGV, 4)
local limit = tonumber(ARGV[10])
local per_key = tonumber(ARGV[11])
local vt = tonumber(ARGV[12])

local leased = {}

local function lease_record(rec, batch_id)
  set_state(rec, 'leased')
  rec.a = rec.a + 1
  rec.o = next_order()
  rec.tok = string.format('%x', rec.o)
  rec.dl = now + vt
  rec.b = batch_id
  redis.call('ZADD', K.leases, num(rec.dl), order_member(rec.o, rec.id))
  leased[#leased + 1] = rec
  record('delivered', rec, now)
end

local function lane_head()
  while true do
    local member = redis.call('ZRANGE', K.lane, 0, 0)[1]
    if not member then
      return nil
    end
    local rec = entry_record('lane', member, now)
    if rec.st ~= 'dead' then
      return rec
    end
  end
end

-- The earliest ready key: {at, order, key, member}, or nil.
local function ready_key()
  local first = redis.call('ZRANGE', K.keyq, 0, 0, 'WITHSCORES')
  if not first[1] then
    return nil
  end
  local member = first[1]
  return { tonumber(first[2]), tonumber(string.sub(member, 1, 16), 16), string.sub(member, 17), member }
end

local function serve_key(key, count)
  if redis.call('SISMEMBER', K.paused, key) == 1 or slots_of(key) >= settings.key_concurrency then
    return -- rescheduled on resume or when a slot frees
  end
  local interval = tonumber(redis.call('HGET', K.intervals, key)) or settings.interval
  local last_delivery = tonumber(redis.call('HGET', K.lastdeliv, key))
  if last_delivery and last_delivery + interval > now then
    schedule(key, last_delivery + interval, false)
    return
  end
  local heads = key_heads(key, count)
  if not heads[1] or heads[1].nb > now then
    schedule(key, now, false)
    return
  end
  local batch = {}
  for _, rec in ipairs(heads) do
    if rec.nb > now then
      break
    end
    batch[#batch + 1] = rec.id
  end
  local batch_id = batch[1]
  redis.call('HSET', K.batches, batch_id, cmsgpack.pack(batch))
  local slots = redis.call('HINCRBY', K.slots, key, 1)
  if interval ~= 0 then
    redis.call('HSET', K.lastdeliv, key, num(now))
  else
    redis.call('HDEL', K.lastdeliv, key)
  end
  for i = 1, #batch do
    lease_record(heads[i], batch_id)
  end
  if slots < settings.key_concurrency then
    schedule(key, interval == 0 and now or now + interval, false)
  end
end

local function retry_in()
  local times = {}
  local first = redis.call('ZRANGE', K.keyq, 0, 0, 'WITHSCORES')[2]
  local delayed = redis.call('ZRANGE', K.delayed, 0, 0, 'WITHSCORES')[2]
  local lease = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')[2]
  local earliest = nil
  for _, at in ipairs({ first or false, delayed or false, lease or false }) do
    if at then
      at = tonumber(at)
      if not earliest or at < earliest then
        earliest = at
      end
    end
  end
  if not earliest then
    return ''
  end
  return num(math.max(0, earliest - now))
end

promote_due(now)
expire_leases(now, settings)
local paused = redis.call('HGET', K.meta, 'paused') == '1'
while #leased < limit and not paused do
  local entry = ready_key()
  local lane = lane_head()
  local key_due = entry ~= nil and entry[1] <= now
  if lane and (not key_due or lane.ea < entry[1] or (lane.ea == entry[1] and lane.eo < entry[2])) then
    lease_record(lane, lane.id)
    redis.call('HSET', K.batches, lane.id, cmsgpack.pack({ lane.id }))
  elseif not key_due then
    break
  else
    redis.call('ZREM', K.keyq, entry[4])
    redis.call('HDEL', K.keyentry, entry[3])
    serve_key(entry[3], math.min(per_key, limit - #leased))
  end
end
local answer = { '' }
if #leased == 0 and not paused then
  answer[1] = retry_in()
end
for _, rec in ipairs(leased) do
  answer[#answer + 1] = view(rec)
end
flush()
flush_observed(now)
return answer
