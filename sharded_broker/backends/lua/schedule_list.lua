-- schedule_list: every schedule of the queue, as name, schedule, name, schedule...
-- args: clock.
register('schedule_list', function(args)
  use_schedule_keys()
  return redis.call('HGETALL', K[SCHEDULES])
end, { 'no-writes' })
