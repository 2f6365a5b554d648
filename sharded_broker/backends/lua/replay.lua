-- replay: move dead letters back into service with attempts reset.
-- args: clock, position ('head'/'tail'), all ('1'/'0'), then the chosen ids.
-- Answers how many moved.
register('replay', function(args)
  local now = clock(args[1])
  local at_head = args[2] == 'head'
  local chosen = {}
  if args[3] == '1' then
    chosen = redis.call('ZRANGE', K[DEAD], 0, -1)
  else
    local seen = {}
    for i = 4, #args do
      if not seen[args[i]] then
        seen[args[i]] = true
        chosen[#chosen + 1] = args[i]
      end
    end
  end
  local records = {}
  for _, id in ipairs(chosen) do
    local rec = load(id)
    if rec and rec.st == 'dead' then
      records[#records + 1] = rec
    end
  end
  -- (priority, seq) is unique, so the unstable sort is deterministic.
  table.sort(records, function(a, b)
    if a.p ~= b.p then
      return a.p < b.p
    end
    return (a.s or 0) < (b.s or 0)
  end)
  promote_due(now, nil) -- before replayed messages take their seqs
  local first, last, step = 1, #records, 1
  if at_head then
    first, last, step = #records, 1, -1 -- each takes a seq ahead of the previous one
  end
  for i = first, last, step do
    local rec = records[i]
    rec.a = 0
    rec.r = nil
    rec.s = next_seq(at_head)
    rec.nb = now
    if rec.k then
      count_key(rec.k)
    end
    place(rec, now)
    if rec.k then
      placed(rec, now, nil)
    end
  end
  flush()
  if #records > 0 then
    signal(#records)
  end
  return #records
end)
