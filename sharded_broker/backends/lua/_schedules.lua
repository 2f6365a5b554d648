-- Shared by the schedule_*.lua operations (recurrent messages, Backend.put_schedule and the
-- others). Their keys are the queue's keys (QUEUE_KEYS) followed by two more, last in
-- `keys` whatever QUEUE_KEYS holds:
--   schedules   hash   name -> cmsgpack map of the schedule: pl (payload), k (key, absent
--                      when unkeyed), p (priority), h (headers JSON), ev (every, us;
--                      absent for cron), cr (cron spec; absent for every), nd (next due,
--                      us), pa (true while paused), lf (last fired, us), n (times fired)
--   schedq      zset   name, score = next due, for the schedules not paused
-- Every time is whole microseconds, as everywhere in the library. The engine computes
-- due times (sharded_broker/recurrence.py); these functions only store them and fire by
-- compare-and-set on nd.

-- Where in K the two schedule keys are: set by use_schedule_keys() at the start of
-- every schedule operation (they come after however many keys QUEUE_KEYS names).
local SCHEDULES, SCHEDQ

local function use_schedule_keys()
  SCHEDULES, SCHEDQ = #K - 1, #K
end

-- Store a schedule and keep its place in schedq (none while paused).
local function save_schedule(name, s)
  local raw = cmsgpack.pack(s)
  redis.call('HSET', K[SCHEDULES], name, raw)
  if s.pa then
    redis.call('ZREM', K[SCHEDQ], name)
  else
    redis.call('ZADD', K[SCHEDQ], num(s.nd), name)
  end
  return raw
end
