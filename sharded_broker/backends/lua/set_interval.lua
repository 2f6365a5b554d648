-- set_interval: persist a key's minimum interval between deliveries.
-- args: clock, key, seconds ('' = back to the queue default).
register('set_interval', function(args)
  local now = clock(args[1])
  local key = args[2]
  set_key_setting('i:', '#ni', key, args[3] ~= '' and args[3] or nil)
  schedule(key, now, false, nil)
  flush()
  signal(1)
  return 1
end)
