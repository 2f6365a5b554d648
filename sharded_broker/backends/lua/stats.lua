-- stats: counters of one queue, without scanning messages: the sizes of its indexes.
-- args: clock. Answers {ready, leased, delayed, dead, keys, oldest_age, paused}.
register('stats', function(args)
  local now = clock(args[1])
  local leased = redis.call('ZCARD', K[LEASES])
  local delayed = redis.call('ZCARD', K[DELAYED])
  local dead = redis.call('ZCARD', K[DEAD])
  local oldest = redis.call('ZRANGE', K[READYAGE], '0', '0', 'WITHSCORES')[2]
  local age = 0
  if oldest then
    age = math.max(0, now - tonumber(oldest))
  end
  return {
    redis.call('ZCARD', K[READY]), leased, delayed, dead, redis.call('ZCARD', K[BACKLOG]), age,
    redis.call('HGET', K[STATE], '#paused') == '1' and 1 or 0,
  }
end, { 'no-writes' })
