-- enqueue_many: store messages atomically, in order; answer their ids.
-- args: clock, options, the messages' fields packed by the client (one msgpack array:
-- per message id, key (nil = unkeyed), priority, delay, dedup id (nil = none), at_head),
-- then, only when some message has one, per message its ref (nil = none); then per
-- message its envelope (k p h d ah pl, packed by the client: the start of its stored
-- record, see load()).
-- Answers the ids, or, when a backpressure limit refuses the call (nothing of it stored),
-- {0, key ('' for max_pending), setting, limit, note}.
register('enqueue', function(args)
  local now = clock(args[1])
  local settings = options(args[2])
  OBSERVE.opts = settings
  local fields = cmsgpack.unpack(args[3])
  -- This very call ran already when its first message is stored: the client's retry of a
  -- call whose reply was lost (the connection dropped after the server ran it). Its ids
  -- were made by the client and a call stores all its messages or none, so the first
  -- tells; the retry stores nothing twice.
  if redis.call('HEXISTS', K[MSGS], fields[1]) == 1 then
    local ids = {}
    for n = 1, #args - 3 do
      ids[n] = fields[6 * (n - 1) + 1]
    end
    return ids
  end
  -- Due delayed messages entered their keys' order when they fell due: before anything
  -- enqueued now.
  promote_due(now, settings)
  local refusal, drops = refused_by_limits(fields, #args - 3, now, settings)
  if refusal then
    return refusal
  end
  local ids = {}
  local placed_count = 0
  for n = 1, #args - 3 do
    local f = 6 * (n - 1)
    local id, key, dedup_id = fields[f + 1], fields[f + 2], fields[f + 5]
    local first = dedup_id and dedup_hit(dedup_id, now, settings)
    if first then
      ids[n] = first
    else
      local envelope = args[n + 3]
      local rec = {
        id = id, k = key, p = fields[f + 3], t = now, d = dedup_id, ah = fields[f + 6], st = 'new', nb = now,
        ea = now, a = 0,
      }
      local ref = fields[6 * (#args - 3) + n]
      if ref then
        rec.rf = ref
        take_ref(rec)
      end
      local after = fields[f + 4]
      -- Chosen before the new message goes in: it is never the one dropped.
      local dropped = drops and drops[n] and room_for(key, now, settings)
      local live = key and count_key(key)
      if dedup_id then
        local expires = now + settings.dedup_window
        redis.call('HSET', K[STATE], 'd:' .. dedup_id, cmsgpack.pack({ id, expires }))
        redis.call('ZADD', K[DEDUPEXP], num(expires), dedup_id)
      end
      if after > 0 and not (rec.ah and key) then
        -- Delayed: the whole record is packed by flush().
        local decoded = decode(id, envelope .. cmsgpack.pack(now))
        rec.h, rec.pl = decoded.h, decoded.pl
        store(rec)
        delay(rec, now + after)
      else
        store(rec)
        rec.s = next_seq(rec.ah)
        rec.nb = now + after -- a message placed at the head holds its key until then
        local member = place(rec, now)
        if key then
          placed(rec, now, settings, live == 1 and member)
        end
        placed_count = placed_count + 1
        -- The record as the client packed it, and t s (eo for an unkeyed one, nb for one
        -- holding its key): the other fields have their defaults.
        local tail
        if rec.rf then
          tail = ref_tail(rec, now)
        elseif rec.eo then
          tail = cmsgpack.pack(now, rec.s, nil, nil, nil, nil, rec.eo)
        elseif rec.nb ~= now then
          tail = cmsgpack.pack(now, rec.s, nil, nil, rec.nb)
        else
          tail = cmsgpack.pack(now, rec.s)
        end
        redis.call('HSET', K[MSGS], id, envelope .. tail)
        rec.fresh = true
      end
      record('enqueued', id, key, now)
      if dropped then
        drop_to_make_room(dropped, now, settings)
      end
      ids[n] = id
    end
  end
  flush()
  flush_observed(now)
  signal(math.max(placed_count, 1))
  return ids
end)
