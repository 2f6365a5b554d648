-- metrics: per-minute counts of the queue or of one key, oldest minute first.
-- ARGV: clock, minutes kept (of the queue's or the key's window), minutes asked, key ('' =
-- the queue, else '+' .. key).
-- Answers {first minute, then per minute the counts of COUNTERS in order}.
local now = clock(ARGV[1])
local count = math.min(tonumber(ARGV[2]), tonumber(ARGV[3]))
local suffix = ARGV[4] ~= '' and (':' .. string.sub(ARGV[4], 2)) or ''
local first = minute_of(now) - (count - 1) * 60
local fields = {}
for i = 0, count - 1 do
  fields[#fields + 1] = string.format('%d', first + i * 60) .. suffix
end
local values = redis.call('HMGET', K.metrics, unpack(fields))
local answer = { string.format('%d', first) }
for i = 1, count do
  local counts = unpack_counts(values[i])
  for j = 1, 5 do
    answer[#answer + 1] = counts[j]
  end
end
return answer
