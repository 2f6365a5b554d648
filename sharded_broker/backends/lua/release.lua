-- release_many: give leased messages back without counting their deliveries.
-- args: clock, options, then per lease: id, token, key ('' = unkeyed), batch id.
-- Answers one 1 (token current when the call started) or 0 (stale, nothing changed) per
-- lease; a lease that an earlier one of its batch returned in this call answers 1.
register('release', function(args)
  local now = clock(args[1])
  OBSERVE.opts = options(args[2])
  local function lease_current(n)
    local i = 4 * n - 1
    return current(args[i], args[i + 1], args[i + 2] ~= '' and args[i + 2] or nil, args[i + 3])
  end
  local was_current = {}
  for n = 1, (#args - 2) / 4 do
    was_current[n] = lease_current(n) ~= nil
  end
  local results = {}
  local released = 0
  for n, given in ipairs(was_current) do
    -- Still current unless an earlier release of this call returned it with its batch.
    local rec = given and lease_current(n)
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
