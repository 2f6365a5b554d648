-- set_interval: persist a key's minimum interval between deliveries.
-- ARGV: clock, key, seconds ('' = back to the queue default).
local now = clock(ARGV[1])
local key = ARGV[2]
if ARGV[3] == '' then
  redis.call('HDEL', K.intervals, key)
else
  redis.call('HSET', K.intervals, key, ARGV[3])
end
schedule(key, now, false)
flush()
signal(1)
return 1
