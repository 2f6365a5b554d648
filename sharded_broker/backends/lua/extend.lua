-- extend_many: move leases' deadlines to now + their visibility timeouts.
-- args: clock, then per lease: id, token, visibility timeout. Answers per lease the new
-- deadline, or '' when the token is not current.
register('extend', function(args)
  local now = clock(args[1])
  local deadlines = {}
  for i = 2, #args, 3 do
    local rec = current(args[i], args[i + 1])
    if not rec then
      deadlines[#deadlines + 1] = ''
    else
      local deadline = now + tonumber(args[i + 2])
      if deadline ~= rec.dl then
        -- An unchanged deadline keeps its place among leases expiring at the same time.
        redis.call('ZREM', K[LEASES], timer_member(rec))
        rec.dl = deadline
        rec.o = next_order()
        redis.call('ZADD', K[LEASES], num(deadline), timer_member(rec))
      end
      deadlines[#deadlines + 1] = deadline
    end
  end
  flush()
  return deadlines
end, { 'allow-oom' })
