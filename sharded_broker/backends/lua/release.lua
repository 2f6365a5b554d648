-- release_many: give leased messages back without counting their deliveries.
-- args: clock, options, then per lease: id, token.
-- Answers one 1 (token current when the call started) or 0 (stale, nothing changed) per
-- lease; a lease that an earlier one of its batch returned in this call answers 1.
register('release', function(args)
  local now = clock(args[1])
  OBSERVE.opts = options(args[2])
  local was_current = {}
  for i = 3, #args, 2 do
    was_current[#was_current + 1] = current(args[i], args[i + 1]) ~= nil
  end
  local results = {}
  local released = 0
  for n, given in ipairs(was_current) do
    -- Still current unless an earlier release of this call returned it with its batch.
    local rec = given and current(args[2 * n + 1], args[2 * n + 2])
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
end, { 'allow-oom' })
