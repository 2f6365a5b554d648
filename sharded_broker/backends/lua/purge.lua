-- purge: delete ready and delayed messages, or (dead = '1') dead letters, one bounded chunk
-- per call (the client calls again until done), so Redis serves other clients between
-- chunks. Leased messages are left to their holders.
-- args: clock, dead ('1'/'0'), budget ('' on the first call: as many as are there now),
-- chunk (most messages deleted by this call).
-- Answers {how many this call deleted, budget left}. After every call the queue is
-- consistent: a key whose waiting messages are all gone leaves the ready order, a key with
-- messages left keeps its place in it.
register('purge', function(args)
  local now = clock(args[1])
  local dead = args[2] == '1'
  local budget = tonumber(args[3])
  if not budget then
    if dead then
      budget = redis.call('ZCARD', K[DEAD])
    else
      budget = redis.call('ZCARD', K[READY]) + redis.call('ZCARD', K[DELAYED])
    end
  end
  local room = math.min(budget, tonumber(args[4]))
  local parts = dead and { DEAD } or { READY, DELAYED }
  local names = { [DEAD] = 'dead', [READY] = 'ready', [DELAYED] = 'delayed' }

  local touched = {}
  local deleted = 0
  for _, index in ipairs(parts) do
    if room - deleted <= 0 then
      break
    end
    for _, member in ipairs(redis.call('ZRANGE', K[index], 0, room - deleted - 1)) do
      local rec = entry_record(names[index], member, now)
      if rec.k and not dead then
        touched[rec.k] = true
      end
      forget(rec)
      deleted = deleted + 1
    end
  end
  for key in pairs(touched) do
    schedule(key, now, true, nil)
  end
  flush()
  return { deleted, budget - deleted }
end, { 'allow-oom' })
