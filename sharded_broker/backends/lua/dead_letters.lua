-- dead_letters: a page of dead letters, oldest death first. args: clock, offset, limit.
register('dead_letters', function(args)
  local offset = tonumber(args[2])
  local ids = redis.call('ZRANGE', K[DEAD], offset, offset + tonumber(args[3]) - 1)
  local answer = {}
  for i, id in ipairs(ids) do
    answer[i] = view(entry_record('dead', id, 0))
  end
  return answer
end)
