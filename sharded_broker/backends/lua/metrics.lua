-- metrics: per-minute counts of the queue or of one key, oldest minute first.
-- ARGV: clock, metrics minutes kept, minutes asked, key ('' = the queue, else '+' .. key).
-- Answers {first minute, then per minute the counts of COUNTERS in order}.
local COUNTERS = { 'enqueued', 'delivered', 'acked', 'retried', 'dead' }
local now = clock(ARGV[1])
local count = math.min(tonumber(ARGV[2]), tonumber(ARGV[3]))
local suffix = ARGV[4] ~= '' and ('|' .. string.sub(ARGV[4], 2)) or ''
local first = minute_of(now) - (count - 1) * 60
local fields = {}
for i = 0, count - 1 do
  local minute = string.format('%d', first + i * 60)
  for _, counter in ipairs(COUNTERS) do
    fields[#fields + 1] = minute .. '|' .. counter .. suffix
  end
end
local values = redis.call('HMGET', K.metrics, unpack(fields))
local answer = { string.format('%d', first) }
for i, value in ipairs(values) do
  answer[i + 1] = tonumber(value) or 0
end
return answer
