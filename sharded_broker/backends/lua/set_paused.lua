-- set_paused: pause or resume a key, or with key '' the whole queue.
-- ARGV: clock, key ('' = the queue), paused ('1'/'0').
local now = clock(ARGV[1])
local key = ARGV[2]
local paused = ARGV[3] == '1'
if key == '' then
  redis.call('HSET', K.meta, 'paused', paused and '1' or '0')
elseif paused then
  redis.call('SADD', K.paused, key)
else
  redis.call('SREM', K.paused, key)
  schedule(key, now, false)
end
flush()
signal(1)
return 1
