-- keys: keys with a backlog. args: clock, what ('backlog', 'lag' or 'info'), then:
--   backlog: limit. Answers key views of the largest backlogs, ties by key.
--   lag: nothing. Answers {key, head enqueued_at ('' = nothing ready)} of every key with a
--        backlog (one index read per key); the client ranks them and asks for 'info'.
--   info: keys. Answers one key view per key.
-- A key view: {key, backlog, slots, paused, interval ('' = default), head view or {}, weight
-- ('' = 1)}, where
-- a head view is {id, priority, attempts, enqueued_at, not_before, payload size}.
register('keys', function(args)
  local what = args[2]

  local function head(key)
    return key_heads(key, 1)[1]
  end

  local function key_view(key)
    local backlog = -(tonumber(redis.call('ZSCORE', K[BACKLOG], key)) or 0)
    local first = head(key)
    local head_view = {}
    if first then
      head_view = { first.id, first.p, first.a or 0, first.t, first.nb or 0, #first.pl }
    end
    local state = redis.call('HMGET', K[STATE], 'p:' .. key, 'i:' .. key, 'w:' .. key)
    return { key, backlog, key_state(key).slots, state[1] == '1' and 1 or 0, state[2] or '', head_view, state[3] or '' }
  end

  local answer = {}
  if what == 'backlog' then
    for i, key in ipairs(redis.call('ZRANGE', K[BACKLOG], 0, tonumber(args[3]) - 1)) do
      answer[i] = key_view(key)
    end
  elseif what == 'lag' then
    for _, key in ipairs(redis.call('ZRANGE', K[BACKLOG], 0, -1)) do
      local first = head(key)
      answer[#answer + 1] = { key, first and first.t or '' }
    end
  else
    for i = 3, #args do
      answer[#answer + 1] = key_view(args[i])
    end
  end
  flush()
  return answer
end)
