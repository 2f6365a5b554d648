-- schedule_remove: forget a schedule; 1, or 0 for an unknown name.
-- args: clock, name.
register('schedule_remove', function(args)
  use_schedule_keys()
  redis.call('ZREM', K[SCHEDQ], args[2])
  return redis.call('HDEL', K[SCHEDULES], args[2])
end)
