-- dead_letters: a page of dead letters, oldest death first. args: clock, offset, limit.
-- Answers per dead letter: id, key ('' = unkeyed), payload, priority, attempts, headers,
-- enqueued_at, dedup id ('' = none), reason, died_at, ref ('' = none).
register('dead_letters', function(args)
  local offset = tonumber(args[2])
  local ids = redis.call('ZRANGE', K[DEAD], offset, offset + tonumber(args[3]) - 1)
  local answer = {}
  for i, id in ipairs(ids) do
    local rec = entry_record('dead', id, 0)
    answer[i] = { rec.id, rec.k or '', rec.pl, rec.p, rec.a, rec.h, rec.t, rec.d or '', rec.r or '', rec.da or 0,
      rec.rf or '' }
  end
  return answer
end)
