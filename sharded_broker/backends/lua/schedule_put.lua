-- schedule_put: create or replace a schedule by name; answers it as stored. A replaced
-- schedule keeps its pause, last firing and count, and its next due time when its every
-- and cron are unchanged.
-- args: clock, name, the schedule (cmsgpack map pl k p h ev cr nd, packed by the client).
register('schedule_put', function(args)
  local name = args[2]
  local new = cmsgpack.unpack(args[3])
  use_schedule_keys()
  local old_raw = redis.call('HGET', K[SCHEDULES], name)
  if old_raw then
    local old = cmsgpack.unpack(old_raw)
    new.pa, new.lf, new.n = old.pa, old.lf, old.n
    if old.ev == new.ev and old.cr == new.cr then
      new.nd = old.nd
    end
  end
  return save_schedule(name, new)
end)
