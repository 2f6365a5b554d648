-- extend_many: move leases' deadlines to now + their visibility timeouts.
-- args: clock, then per lease: id, token, key ('' = unkeyed), batch id, visibility timeout.
-- Answers per lease the new deadline, or '' when the token is not current.
register('extend', function(args)
  local now = clock(args[1])
  local deadlines = {}
  for i = 2, #args, 5 do
    local member = lease_member(args[i + 1], args[i], args[i + 2] ~= '' and args[i + 2] or nil, args[i + 3])
    local deadline = now + tonumber(args[i + 4])
    -- XX: only a lease that is there; CH: answers 1 for a changed deadline, so an
    -- unchanged one answers 0 and is told apart from a stale lease by ZSCORE.
    if redis.call('ZADD', K[LEASES], 'XX', 'CH', num(deadline), member) == 1
        or redis.call('ZSCORE', K[LEASES], member) then
      deadlines[#deadlines + 1] = deadline
      lower_bound('l', deadline)
    else
      deadlines[#deadlines + 1] = ''
    end
  end
  flush()
  return deadlines
end, { 'allow-oom' })
