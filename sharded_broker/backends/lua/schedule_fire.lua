-- schedule_fire: fire one period of a schedule, by compare-and-set: only while it exists,
-- is not paused and its next due time is still `expected`, set that to `next`, count the
-- firing and enqueue its message, all in this call; answers the message's id, or false
-- (another consumer fired this period, or the schedule changed) with nothing changed.
-- The message is enqueued as enqueue.lua enqueues one that has no delay, no dedup id and
-- is not at_head (the planner's enqueue_many for such a message), backpressure included:
-- a limit that refuses it leaves the schedule as it was (the period fires at a later look)
-- and answers {0, key, setting, limit, note} as enqueue does; under drop_oldest or replace
-- it drops one of its key's ready messages.
-- args: clock, options, name, expected, next (us), the message's id, key ('' = unkeyed),
-- priority and envelope (k p h d ah pl, packed by the client as for enqueue).
register('schedule_fire', function(args)
  local now = clock(args[1])
  local settings = options(args[2])
  OBSERVE.opts = settings
  local name = args[3]
  use_schedule_keys()
  local raw = redis.call('HGET', K[SCHEDULES], name)
  if not raw then
    return false
  end
  local s = cmsgpack.unpack(raw)
  if s.pa or s.nd ~= tonumber(args[4]) then
    return false
  end
  -- Due delayed messages entered their keys' order when they fell due: before this one.
  promote_due(now, settings)
  local id, key, priority = args[6], args[7] ~= '' and args[7] or nil, tonumber(args[8])
  local refusal, drops = refused_by_limits({ id, key, priority, 0, nil, false }, 1, now, settings)
  if refusal then
    return refusal
  end
  s.nd, s.lf, s.n = tonumber(args[5]), now, (s.n or 0) + 1
  save_schedule(name, s)
  local rec = { id = id, k = key, p = priority, t = now, ah = false, st = 'new', nb = now, ea = now, a = 0 }
  -- Chosen before the new message goes in: it is never the one dropped.
  local dropped = drops and drops[1] and room_for(key, now, settings)
  local live = key and count_key(key)
  store(rec)
  rec.s = next_seq(false)
  local member = place(rec, now)
  if key then
    placed(rec, now, settings, live == 1 and member)
  end
  local tail
  if rec.eo then
    tail = cmsgpack.pack(now, rec.s, nil, nil, nil, nil, rec.eo)
  else
    tail = cmsgpack.pack(now, rec.s)
  end
  redis.call('HSET', K[MSGS], id, args[9] .. tail)
  rec.fresh = true
  record('enqueued', id, key, now)
  if dropped then
    drop_to_make_room(dropped, now, settings)
  end
  flush()
  flush_observed(now)
  signal(1)
  return id
end)
