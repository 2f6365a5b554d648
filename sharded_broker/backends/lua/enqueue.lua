-- enqueue_many: store messages atomically, in order; answer their ids.
-- args: clock, options, then per message: id, key ('' = unkeyed), priority, delay,
-- dedup id ('' = none), headers JSON, at_head ('1'/'0'), payload.
register('enqueue', function(args)
  local now = clock(args[1])
  local settings = options(args[2])
  OBSERVE.opts = settings
  -- Due delayed messages entered their keys' order when they fell due: before anything
  -- enqueued now.
  promote_due(now, settings)
  local ids = {}
  local placed_count = 0
  for i = 3, #args, 8 do
    local key = args[i + 1] ~= '' and args[i + 1] or nil
    local dedup_id = args[i + 4] ~= '' and args[i + 4] or nil
    local first = dedup_id and dedup_hit(dedup_id, now, settings)
    if first then
      ids[#ids + 1] = first
    else
      local rec = {
        id = args[i], k = key, p = tonumber(args[i + 2]), t = now, h = args[i + 5], d = dedup_id,
        ah = args[i + 6] == '1', st = 'new', nb = 0, a = 0, pl = args[i + 7],
      }
      local after = tonumber(args[i + 3])
      store(rec)
      if key then
        count_key(key)
      end
      if dedup_id then
        local expires = now + settings.dedup_window
        redis.call('HSET', K[STATE], 'd:' .. dedup_id, cmsgpack.pack({ rec.id, expires }))
        redis.call('ZADD', K[DEDUPEXP], num(expires), dedup_id)
      end
      local holds_key = rec.ah and key
      if after > 0 and not holds_key then
        delay(rec, now + after)
      else
        rec.s = next_seq(rec.ah)
        rec.nb = now + after
        place(rec, now)
        if key then
          placed(rec, now, settings)
        end
        placed_count = placed_count + 1
      end
      record('enqueued', rec, now)
      ids[#ids + 1] = rec.id
    end
  end
  flush()
  flush_observed(now)
  signal(math.max(placed_count, 1))
  return ids
end)
