-- why: what RedisBackend.key_facts needs to say why keys are not moving (the memory
-- model: MemoryBackend.key_facts). Reads only; an unreadable record is dead-lettered, as
-- everywhere (see entry_record). args: clock, what ('facts' or 'heads'), then keys.
-- heads answers {now, then per key its head's enqueued_at ('' = nothing ready)}: two index
-- reads per key, no record read (keys --stuck skips keys whose head is young with it).
-- facts answers {now, queue paused (1/0), then per key: {key, paused, backlog, slots, ready_at,
-- last delivery, own interval, head view or {}, next delayed, holds, weight}}, '' for a time,
-- interval or weight that is not set; a head view is {id, priority, attempts, enqueued_at,
-- not_before, payload size}; holds: {batch id, id, token, attempts, deadline, size,
-- settled, leased at} per batch in flight, first unsettled message first.
-- The leases order is read once for every key that holds a slot, and the delayed order
-- once for every key with nothing ready, each at most WHY_READ_LIMIT entries (the same in
-- backend.py), in pages.
local WHY_READ_LIMIT = 10000
local WHY_PAGE = 500

-- The key of a delayed member (order..id\0key), nil for an unkeyed message.
local function timer_key(member)
  local at = string.find(member, '\0', 17, true)
  return at and string.sub(member, at + 1) or nil
end

-- Calls visit(member, score) for the entries of a timer index in score order, at most
-- WHY_READ_LIMIT of them, until visit answers true.
local function scan_timer(index, visit)
  for start = 0, WHY_READ_LIMIT - 1, WHY_PAGE do
    local page = redis.call('ZRANGE', K[index], text(start), text(start + WHY_PAGE - 1), 'WITHSCORES')
    for i = 1, #page, 2 do
      if visit(page[i], tonumber(page[i + 1])) then
        return
      end
    end
    if #page < 2 * WHY_PAGE then
      return
    end
  end
end

register('why', function(args)
  local now = clock(args[1])
  if args[2] == 'heads' then
    local heads = { now }
    for i = 3, #args do
      local member = key_members(args[i], 1)[1]
      local enqueued_at = ''
      if member then
        local id = ready_id(member)
        -- A ready message without its readyage entry (damaged): 0, so the caller reads it in full.
        enqueued_at = tonumber(redis.call('ZSCORE', K[READYAGE], id)) or 0
      end
      heads[#heads + 1] = enqueued_at
    end
    return heads
  end
  local answer = { now, redis.call('HGET', K[STATE], '#paused') == '1' and 1 or 0 }
  local holding, waiting, waiting_count = {}, {}, 0

  for i = 3, #args do
    local key = args[i]
    local ks = key_state(key)
    local first = key_heads(key, 1)[1]
    local head_view = {}
    if first then
      head_view = { first.id, first.p, first.a or 0, first.t, first.nb or 0, #first.pl }
    end
    local state = redis.call('HMGET', K[STATE], 'p:' .. key, 'l:' .. key, 'i:' .. key, 'w:' .. key)
    local row = {
      key, state[1] == '1' and 1 or 0, -(tonumber(redis.call('ZSCORE', K[BACKLOG], key)) or 0), ks.slots,
      ks.at or '', state[2] or '', state[3] or '', head_view, '', {}, state[4] or '',
    }
    answer[#answer + 1] = row
    if ks.slots > 0 then
      holding[key] = { row = row, seen = {} }
    end
    if not first and not waiting[key] then
      waiting[key] = row
      waiting_count = waiting_count + 1
    end
  end

  if next(holding) then
    scan_timer(LEASES, function(member)
      local token, _, key, batch = lease_parts(member)
      local entry = holding[key or '']
      if not entry then
        return false
      end
      local rec = entry_record('leases', member, now)
      if rec.st == 'leased' and not entry.seen[rec.b or rec.id] then
        entry.seen[rec.b or rec.id] = true
        local unsettled = get_batch(rec) -- sets rec.bn, a batch's size
        local first = rec
        if unsettled[1] ~= rec.id then
          first = load(unsettled[1])
          first = first and as_leased(first, token, batch) or rec
        end
        local size = rec.bn or 1
        local deadline = redis.call('ZSCORE', K[LEASES], lease_member(token, first.id, key, batch))
        local holds = entry.row[10]
        holds[#holds + 1] = { rec.b or rec.id, first.id, token, first.a, tonumber(deadline) or 0, size,
          size - #unsettled, token_time(token) }
      end
      return false
    end)
  end

  if waiting_count > 0 then
    scan_timer(DELAYED, function(member, due)
      local key = timer_key(member)
      local row = key and waiting[key]
      if row then
        row[9] = due
        waiting[key] = nil
        waiting_count = waiting_count - 1
      end
      return waiting_count == 0
    end)
  end

  flush()
  return answer
end)
