-- schedule_set_paused: pause or resume a schedule, and with next given set its next due
-- time; 1, or 0 for an unknown name.
-- args: clock, name, paused ('1'/'0'), next (us; '' = keep).
register('schedule_set_paused', function(args)
  local name = args[2]
  use_schedule_keys()
  local raw = redis.call('HGET', K[SCHEDULES], name)
  if not raw then
    return 0
  end
  local s = cmsgpack.unpack(raw)
  s.pa = args[3] == '1' or nil
  if args[4] ~= '' then
    s.nd = tonumber(args[4])
  end
  save_schedule(name, s)
  return 1
end)
