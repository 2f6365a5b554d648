-- extend: move a lease's deadline to now + visibility timeout.
-- ARGV: clock, id, token, visibility timeout. Answers the new deadline, or false when the
-- token is not current.
local now = clock(ARGV[1])
local rec = current(ARGV[2], ARGV[3])
if not rec then
  return false
end
local deadline = now + tonumber(ARGV[4])
if deadline ~= rec.dl then
  redis.call('ZREM', K.leases, order_member(rec.o, rec.id))
  rec.dl = deadline
  rec.o = next_order()
  redis.call('ZADD', K.leases, num(deadline), order_member(rec.o, rec.id))
  flush()
end
return num(deadline)
