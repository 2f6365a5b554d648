-- keys: keys with a backlog. ARGV: clock, what ('backlog', 'lag' or 'info'), then:
--   backlog: limit. Answers key views of the largest backlogs, ties by key.
--   lag: nothing. Answers {key, head enqueued_at ('' = nothing ready)} of every key with a
--        backlog (one index read per key); the client ranks them and asks for 'info'.
--   info: keys. Answers one key view per key.
-- A key view: {key, backlog, slots, paused, interval ('' = default), head view or {}}, where
-- a head view is {id, priority, attempts, enqueued_at, not_before, payload size}.
local now = clock(ARGV[1])

local function key_view(key)
  local backlog = -(tonumber(redis.call('ZSCORE', K.backlog, key)) or 0)
  local first = head(key)
  local head_view = {}
  if first then
    head_view = { first.id, first.p, first.a or 0, num(first.t), num(first.nb or 0),
      redis.call('HSTRLEN', K.payloads, first.id) }
  end
  return { key, backlog, slots_of(key), redis.call('SISMEMBER', K.paused, key),
    redis.call('HGET', K.intervals, key) or '', head_view }
end

local answer = {}
if ARGV[2] == 'backlog' then
  for i, key in ipairs(redis.call('ZRANGE', K.backlog, 0, tonumber(ARGV[3]) - 1)) do
    answer[i] = key_view(key)
  end
elseif ARGV[2] == 'lag' then
  for _, key in ipairs(redis.call('ZRANGE', K.backlog, 0, -1)) do
    local first = head(key)
    answer[#answer + 1] = { key, first and num(first.t) or '' }
  end
else
  for i = 3, #ARGV do
    answer[#answer + 1] = key_view(ARGV[i])
  end
end
flush()
return answer
