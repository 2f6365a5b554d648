-- ack_many: settle leases for good. ARGV: clock, metrics minutes kept ("<queue>,<key>"), publish events (1/0),
-- then per lease: id, token.
-- Answers one 1 (settled) or 0 (token not current) per lease.
local now = clock(ARGV[1])
read_observe(ARGV, 2)
local results = {}
for i = 4, #ARGV, 2 do
  local rec = current(ARGV[i], ARGV[i + 1])
  if rec then
    local batch = get_batch(rec.b) or {}
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
