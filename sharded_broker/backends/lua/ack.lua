-- ack_many: settle leases for good. args: clock, options, then per lease: id, token.
-- Answers one 1 (settled) or 0 (token not current) per lease.
register('ack', function(args)
  local now = clock(args[1])
  OBSERVE.opts = options(args[2])
  local results = {}
  for i = 3, #args, 2 do
    local rec = current(args[i], args[i + 1])
    if rec then
      local batch = get_batch(rec)
      for j, id in ipairs(batch) do
        if id == rec.id then
          table.remove(batch, j)
          break
        end
      end
      forget(rec)
      settled(rec, now, batch)
      record('acked', rec, now)
      results[#results + 1] = 1
    else
      results[#results + 1] = 0
    end
  end
  flush()
  flush_observed(now)
  signal(1)
  return results
end, { 'allow-oom' })
