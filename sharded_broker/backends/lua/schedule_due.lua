-- schedule_due: the server's time, then up to limit schedules not paused that are due
-- (name, schedule, ...), earliest first and equal times by name (the sorted set's order):
-- one ZRANGEBYSCORE when none is.
-- args: clock, limit.
register('schedule_due', function(args)
  local now = clock(args[1])
  use_schedule_keys()
  local names = redis.call('ZRANGEBYSCORE', K[SCHEDQ], '-inf', num(now), 'LIMIT', '0', args[2])
  local answer = { now }
  if #names > 0 then
    local raws = redis.call('HMGET', K[SCHEDULES], unpack(names))
    for i, name in ipairs(names) do
      if raws[i] then
        answer[#answer + 1] = name
        answer[#answer + 1] = raws[i]
      end
    end
  end
  return answer
end, { 'no-writes' })
