-- nack: return a leased message for retry after a delay, or dead-letter it.
-- args: clock, options, id, token, key ('' = unkeyed), batch id, delay, dead ('1'/'0'),
-- reason ('' = none).
-- Answers 1, or 0 when the token is not current (nothing changed).
register('nack', function(args)
  local now = clock(args[1])
  local settings = options(args[2])
  OBSERVE.opts = settings
  local rec = current(args[3], args[4], args[5] ~= '' and args[5] or nil, args[6])
  if not rec then
    return 0
  end
  local reason = args[9] ~= '' and args[9] or nil
  local dead_reason = nil
  if args[8] == '1' then
    dead_reason = reason or 'rejected'
  end
  promote_due(now, settings) -- before a tail retry takes its seq
  fail(rec, now, settings, tonumber(args[7]), dead_reason, reason or 'nacked')
  flush()
  flush_observed(now)
  signal(1)
  return 1
end, { 'allow-oom' })
