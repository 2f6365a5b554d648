-- lease: deliver up to `limit` messages, serving ready keys in fairness order.
-- args: clock, options, limit, per_key, visibility timeout.
-- Answers {retry_in ('' = nothing scheduled), then per lease: id, stored record, token,
-- deadline, batch id ('' = a batch of one)}. The record goes out as stored (the client
-- decodes it; attempts there are those before this delivery): a lease writes nothing to it.
register('lease', function(args)
  local now = clock(args[1])
  local settings = options(args[2])
  OBSERVE.opts = settings
  local limit = tonumber(args[3])
  local per_key = tonumber(args[4])
  local vt = tonumber(args[5])
  local leased = {}
  local counts = redis.call('HMGET', K[STATE], '#paused', '#np', '#ni', '#nl', '#dnext', '#lnext', '#nw')
  read_bounds(counts[5], counts[6], counts[2])
  local paused = counts[1] == '1'
  local any_key_interval = (tonumber(counts[3]) or 0) > 0
  local any_weight = (tonumber(counts[7]) or 0) > 0
  local last_deliveries = tonumber(counts[4]) or 0

  local deadline = now + vt
  local deadline_text = num(deadline)
  local answer = { '' }

  -- The stored record of a message leased now: a record this call changed (promoted, say)
  -- is written first, as it stands while ready.
  local function stored(id, raw)
    local rec = CACHE[id]
    return rec and write_back(id, rec) or raw
  end

  local function answer_lease(id, raw, token, batch)
    local n = #answer
    answer[n + 1], answer[n + 2], answer[n + 3], answer[n + 4], answer[n + 5] = id, raw, token, deadline, batch or ''
    leased[#leased + 1] = id
  end

  -- An unkeyed message, from its record.
  local function lease_record(rec)
    local raw = stored(rec.id, RAW[rec.id])
    local token = new_token(now, nil)
    unindex(rec)
    as_leased(rec, token, nil)
    redis.call('ZADD', K[LEASES], deadline_text, lease_member(token, rec.id, nil, nil))
    record('delivered', rec.id, nil, now)
    answer_lease(rec.id, raw, token, nil)
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

  -- Serve key, taken from keyq at (place_at, place_order). Weighted fairness (deficit
  -- round robin): a key of weight w keeps that place for up to w consecutive services
  -- (ks.round; see schedule), then goes to the back of the round.
  local function serve_key(key, count, place_at, place_order)
    local ks = key_state(key)
    if (may_be_paused() and redis.call('HGET', K[STATE], 'p:' .. key) == '1')
        or ks.slots >= settings.key_concurrency then
      ks.round = nil
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
        ks.round = nil
        schedule(key, last_delivery + interval, false, nil)
        return
      end
    end
    -- The key's first due messages, from their ready members: only a member marked as
    -- holding its key needs its record read (for its not-before time).
    local members, ids, raws
    while true do
      members, ids = {}, {}
      for i, member in ipairs(key_members(key, count)) do
        local nb = member_not_before(member)
        if not nb then
          members = nil -- unreadable: dead-lettered; read the key again
          break
        elseif nb > now then
          break
        end
        members[i], ids[i] = member, ready_id(member)
      end
      if members then
        if not members[1] then
          schedule(key, now, false, nil)
          return
        end
        raws = redis.call('HMGET', K[MSGS], unpack(ids))
        local all_readable = true
        for i, id in ipairs(ids) do
          if not (raws[i] and (CACHE[id] or readable(raws[i]))) then
            entry_record('ready', members[i], now) -- dead-letters it
            all_readable = false
            break
          end
        end
        if all_readable then
          break
        end
      end
    end
    local batch = #ids > 1 and ids[1] or nil
    local token = new_token(now, batch)
    if batch then
      redis.call('HSET', K[STATE], 'b:' .. batch, cmsgpack.pack(ids, #ids))
    end
    ks.slots = ks.slots + 1
    set_last_delivery(key, interval)
    -- A key that waits an interval between deliveries goes to the back: no round.
    local weight = 1
    if any_weight and interval == 0 then
      weight = tonumber(redis.call('HGET', K[STATE], 'w:' .. key)) or 1
    end
    local r = ks.round
    if weight > 1 then
      local turns = (r and r.at == place_at and r.order == place_order) and r.turns + 1 or 1
      ks.round = turns < weight and { turns = turns, at = place_at, order = place_order } or nil
    else
      ks.round = nil
    end
    local entries = {}
    for i, id in ipairs(ids) do
      entries[2 * i - 1], entries[2 * i] = deadline_text, lease_member(token, id, key, batch)
      record('delivered', id, key, now)
      answer_lease(id, stored(id, raws[i]), token, batch)
    end
    redis.call('ZREM', K[READY], unpack(members))
    redis.call('ZREM', K[READYAGE], unpack(ids))
    redis.call('ZADD', K[LEASES], unpack(entries))
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
      lane = first_ready('ZRANGEBYLEX', LANE_FROM, LANE_TO, now)
    end
    if lane and (not entry or lane.ea < ks.at or (lane.ea == ks.at and lane.eo < entry[1])) then
      lease_record(lane)
      lane = false
    elseif not entry then
      break
    else
      next_due = next_due + 1
      local place_at, place_order = ks.at, ks.order
      unschedule(entry[2], ks)
      serve_key(entry[2], math.min(per_key, limit - #leased), place_at, place_order)
      if ks.at == place_at and ks.order == place_order then
        next_due = next_due - 1 -- a weighted key kept its place: it is first again
      end
    end
  end
  if #leased > 0 then
    lower_bound('l', deadline)
  elseif not paused then
    answer[1] = retry_in()
  end
  flush()
  flush_observed(now)
  return answer
end, { 'allow-oom' })
