-- metrics: per-minute counts of the queue or of one key, oldest minute first.
-- args: clock, minutes kept (of the queue's or the key's window), minutes asked, key ('' =
-- the queue, else '+' .. key).
-- Answers {first minute, then per minute the counts of COUNTERS in order}.
register('metrics', function(args)
  local now = clock(args[1])
  local kept = tonumber(args[2])
  local count = math.min(kept, tonumber(args[3]))
  local key = args[4] ~= '' and string.sub(args[4], 2) or nil
  local first = minute_of(now) - (count - 1) * 60
  local answer = { num(first) }
  for i = 0, count - 1 do
    local minute = first + i * 60
    local fields = {}
    for j, letter in ipairs(LETTERS) do
      fields[j] = num(minute) .. ':' .. letter .. (key and (':' .. key) or '')
    end
    local index = key and key_metrics_slot(minute, kept) or METRICS
    local values = redis.call('HMGET', K[index], unpack(fields))
    for j = 1, #fields do
      answer[#answer + 1] = tonumber(values[j]) or 0
    end
  end
  return answer
end, { 'no-writes' })
