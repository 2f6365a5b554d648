-- set_interval: persist a key's minimum interval between deliveries.
-- args: clock, key, seconds ('' = back to the queue default).
register('set_interval', function(args)
  local now = clock(args[1])
  local key = args[2]
  if args[3] == '' then
    if redis.call('HDEL', K[STATE], 'i:' .. key) == 1 then
      redis.call('HINCRBY', K[STATE], '#ni', '-1')
    end
  elseif redis.call('HSET', K[STATE], 'i:' .. key, args[3]) == 1 then
    redis.call('HINCRBY', K[STATE], '#ni', '1')
  end
  schedule(key, now, false, nil)
  flush()
  signal(1)
  return 1
end)
