-- lease: deliver up to `limit` messages, serving ready keys in fairness order.
-- args: clock, options, limit, per_key, visibility timeout.
-- Answers {retry_in ('' = nothing scheduled), lease views...}.
register('lease', function(args)
  local now = clock(args[1])
  local settings = options(args[2])
  OBSERVE.opts = settings
  local limit = tonumber(args[3])
  local per_key = tonumber(args[4])
  local vt = tonumber(args[5])
  local leased = {}
  local counts = redis.call('HMGET', K[STATE], '#paused', '#np', '#ni', '#nl')
  local paused = counts[1] == '1'
  local any_paused_key = (tonumber(counts[2]) or 0) > 0
  local any_key_interval = (tonumber(counts[3]) or 0) > 0
  local last_deliveries = tonumber(counts[4]) or 0

  local function lease_record(rec, batch_id, batch_size)
    set_state(rec, 'leased')
    rec.a = rec.a + 1
    rec.o = next_order()
    rec.tok = string.format('%x', rec.o)
    rec.dl = now + vt
    rec.b = batch_id
    rec.bn = batch_size
    redis.call('ZADD', K[LEASES], num(rec.dl), timer_member(rec))
    leased[#leased + 1] = rec
    record('delivered', rec, now)
  end

  local function lane_head()
    while true do
      local member = redis.call('ZRANGEBYLEX', K[READY], LANE_FROM, LANE_TO, 'LIMIT', '0', '1')[1]
      if not member then
        return nil
      end
      local rec = entry_record('ready', member, now)
      if rec.st ~= 'dead' then
        return rec
      end
    end
  end

  -- Keys due now, earliest first, read a few at a time: {order, key, member} each. Their
  -- ready times are in their key states.
  local due = {}
  local next_due = 1
  local function ready_key()
    while true do
      if next_due > #due then
        due, next_due = {}, 1
        local members = redis.call('ZRANGEBYSCORE', K[KEYQ], '-inf', num(now), 'LIMIT', '0',
          text(math.max(1, math.min(limit - #leased, 100))))
        for i, member in ipairs(members) do
          due[i] = { tonumber(string.sub(member, 1, 16), 16), string.sub(member, 17), member }
        end
      end
      local entry = due[next_due]
      if not entry then
        return nil
      end
      local ks = key_state(entry[2])
      if ks.at and ks.order == entry[1] then
        return entry, ks
      end
      -- An entry its key's state does not know (left by an interrupted change): drop it.
      redis.call('ZREM', K[KEYQ], entry[3])
      next_due = next_due + 1
    end
  end

  local function set_last_delivery(key, interval)
    if interval ~= 0 then
      if redis.call('HSET', K[STATE], 'l:' .. key, num(now)) == 1 then
        redis.call('HINCRBY', K[STATE], '#nl', '1')
      end
    elseif last_deliveries > 0 and redis.call('HDEL', K[STATE], 'l:' .. key) == 1 then
      redis.call('HINCRBY', K[STATE], '#nl', '-1')
    end
  end

  local function serve_key(key, count)
    local ks = key_state(key)
    if (any_paused_key and redis.call('HGET', K[STATE], 'p:' .. key) == '1')
        or ks.slots >= settings.key_concurrency then
      save_key_state(key, ks)
      return -- rescheduled on resume or when a slot frees
    end
    local interval = settings.interval
    if any_key_interval then
      interval = tonumber(redis.call('HGET', K[STATE], 'i:' .. key)) or interval
    end
    if interval ~= 0 then
      local last_delivery = tonumber(redis.call('HGET', K[STATE], 'l:' .. key))
      if last_delivery and last_delivery + interval > now then
        schedule(key, last_delivery + interval, false, nil)
        return
      end
    end
    local heads = key_heads(key, count)
    if not heads[1] or heads[1].nb > now then
      schedule(key, now, false, nil)
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
    if #batch > 1 then
      redis.call('HSET', K[STATE], 'b:' .. batch_id, cmsgpack.pack(batch))
    end
    ks.slots = ks.slots + 1
    set_last_delivery(key, interval)
    for i = 1, #batch do
      lease_record(heads[i], batch_id, #batch)
    end
    if ks.slots < settings.key_concurrency then
      schedule(key, interval == 0 and now or now + interval, false, nil)
    end
    save_key_state(key, ks)
  end

  local function retry_in()
    local first = redis.call('ZRANGE', K[KEYQ], '0', '0', 'WITHSCORES')[2]
    local delayed = redis.call('ZRANGE', K[DELAYED], '0', '0', 'WITHSCORES')[2]
    local lease = redis.call('ZRANGE', K[LEASES], '0', '0', 'WITHSCORES')[2]
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
    return math.max(0, earliest - now)
  end

  promote_due(now, settings)
  expire_leases(now, settings)
  local lane = false -- not looked up yet
  while #leased < limit and not paused do
    local entry, ks = ready_key()
    if lane == false then
      lane = lane_head()
    end
    if lane and (not entry or lane.ea < ks.at or (lane.ea == ks.at and lane.eo < entry[1])) then
      lease_record(lane, lane.id, 1)
      lane = false
    elseif not entry then
      break
    else
      next_due = next_due + 1
      unschedule(entry[2], ks)
      serve_key(entry[2], math.min(per_key, limit - #leased))
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
end, { 'allow-oom' })
