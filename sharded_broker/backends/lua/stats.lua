-- stats: counters of one queue, without scanning messages.
-- ARGV: clock. Answers {ready, leased, delayed, dead, keys, oldest_age, paused}.
local now = clock(ARGV[1])
local counts = redis.call('HMGET', K.meta, 'ready', 'leased', 'delayed', 'paused')
local oldest = redis.call('ZRANGE', K.readyage, 0, 0, 'WITHSCORES')[2]
local age = 0
if oldest then
  age = math.max(0, now - tonumber(oldest))
end
return {
  tonumber(counts[1]) or 0, tonumber(counts[2]) or 0, tonumber(counts[3]) or 0,
  redis.call('ZCARD', K.dead), redis.call('ZCARD', K.backlog), num(age), counts[4] == '1' and 1 or 0,
}
