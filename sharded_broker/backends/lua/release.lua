-- release_many: give leased messages back without counting their deliveries.
-- ARGV: clock, then per lease: id, token.
-- Answers one 1 (token current when the call started) or 0 (stale, nothing changed) per
-- lease; a lease that an earlier one of its batch returned in this call answers 1.
local now = clock(ARGV[1])
local was_current = {}
for i = 2, #ARGV, 2 do
  was_current[#was_current + 1] = current(ARGV[i], ARGV[i + 1]) ~= nil
end
local results = {}
local released = 0
for n, given in ipairs(was_current) do
  -- Still current unless an earlier release of this call returned it with its batch.
  local rec = given and current(ARGV[2 * n], ARGV[2 * n + 1])
  if rec then
    release(rec, now)
    released = released + 1
  end
  results[n] = given and 1 or 0
end
flush()
if released > 0 then
  signal(released)
end
return results
