-- why: what RedisBackend.key_facts needs to say why keys are not moving (the memory
-- model: MemoryBackend._key_facts). Reads only; an unreadable head record is
-- dead-lettered, as everywhere (see entry_record). args: clock, then keys.
-- Answers {now, queue paused (1/0), then per key: {key, paused, backlog, slots, ready_at,
-- last delivery, own interval, head view or {}, next delayed, holds}}, '' for a time or
-- interval that is not set; a head view is {id, priority, attempts, enqueued_at,
-- not_before, payload size}; holds: {batch id, id, token, attempts, deadline, size,
-- settled} per batch in flight, first unsettled message first.
-- At most WHY_SCAN entries of the delayed (and of the leases) order are read per key:
-- WHY_SCAN_LIMIT in backend.py.
local WHY_SCAN = 10000
local WHY_PAGE = 500

register('why', function(args)
  local now = clock(args[1])

  -- The members of a timer index (delayed or leases: order..id\0key) that belong to key,
  -- in score order, with their scores; stops after the first one unless `all`.
  local function timer_entries(index, key, all)
    local suffix = '\0' .. key
    local found = {}
    for start = 0, WHY_SCAN - 1, WHY_PAGE do
      local page = redis.call('ZRANGE', K[index], text(start), text(start + WHY_PAGE - 1), 'WITHSCORES')
      for i = 1, #page, 2 do
        local member = page[i]
        if string.sub(member, -#suffix) == suffix then
          found[#found + 1] = { member, tonumber(page[i + 1]) }
          if not all then
            return found
          end
        end
      end
      if #page < 2 * WHY_PAGE then
        break
      end
    end
    return found
  end

  local function holds_of(key)
    local holds, seen = {}, {}
    for _, entry in ipairs(timer_entries(LEASES, key, true)) do
      local rec = entry_record('leases', entry[1], now)
      if rec.st == 'leased' and not seen[rec.b] then
        seen[rec.b] = true
        local unsettled = get_batch(rec)
        local first = load(unsettled[1]) or rec
        local size = rec.bn or 1
        holds[#holds + 1] = { rec.b or rec.id, first.id, first.tok or '', first.a or 0, first.dl or 0, size,
          size - #unsettled }
      end
    end
    return holds
  end

  local function facts(key)
    local ks = key_state(key)
    local first = key_heads(key, 1)[1]
    local head_view, next_delayed = {}, ''
    if first then
      head_view = { first.id, first.p, first.a or 0, first.t, first.nb or 0, #first.pl }
    else
      local delayed = timer_entries(DELAYED, key, false)[1]
      if delayed then
        next_delayed = delayed[2]
      end
    end
    local state = redis.call('HMGET', K[STATE], 'p:' .. key, 'l:' .. key, 'i:' .. key)
    return {
      key, state[1] == '1' and 1 or 0, -(tonumber(redis.call('ZSCORE', K[BACKLOG], key)) or 0), ks.slots,
      ks.at or '', state[2] or '', state[3] or '', head_view, next_delayed,
      ks.slots > 0 and holds_of(key) or {},
    }
  end

  local answer = { now, redis.call('HGET', K[STATE], '#paused') == '1' and 1 or 0 }
  for i = 2, #args do
    answer[#answer + 1] = facts(args[i])
  end
  flush()
  return answer
end)
