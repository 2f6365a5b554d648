-- metrics: per-minute counts of the queue or of one key, oldest minute first.
-- args: clock, minutes kept (of the queue's or the key's window), minutes asked, key ('' =
-- the queue, else '+' .. key).
-- Answers {first minute, then per minute the counts of COUNTERS in order}.
register('metrics', function(args)
  local now = clock(args[1])
  local count = math.min(tonumber(args[2]), tonumber(args[3]))
  local suffix = args[4] ~= '' and (':' .. string.sub(args[4], 2)) or ''
  local first = minute_of(now) - (count - 1) * 60
  local fields = {}
  for i = 0, count - 1 do
    local minute = string.format('%d', first + i * 60)
    for _, letter in ipairs(LETTERS) do
      fields[#fields + 1] = minute .. ':' .. letter .. suffix
    end
  end
  local values = redis.call('HMGET', K[METRICS], unpack(fields))
  local answer = { string.format('%d', first) }
  for i = 1, #fields do
    answer[#answer + 1] = tonumber(values[i]) or 0
  end
  return answer
end, { 'no-writes' })
