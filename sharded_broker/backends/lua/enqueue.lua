-- enqueue_many: store messages atomically, in order; answer their ids.
-- ARGV: clock, metrics minutes kept ("<queue>,<key>"), publish events (1/0), 6 settings, then per message: id, key ('' = unkeyed), priority, delay,
-- dedup id ('' = none), headers JSON, at_head ('1'/'0'), payload.
local now = clock(ARGV[1])
read_observe(ARGV, 2)
local settings = read_settings(ARGV, 4)
-- Due delayed messages entered their keys' order when they fell due: before anything
-- enqueued now.
promote_due(now)
local ids = {}
local placed = 0
for i = 10, #ARGV, 8 do
  local key = ARGV[i + 1] ~= '' and ARGV[i + 1] or nil
  local dedup_id = ARGV[i + 4] ~= '' and ARGV[i + 4] or nil
  local first = dedup_id and dedup_hit(dedup_id, now, settings)
  if first then
    ids[#ids + 1] = first
  else
    local rec = {
      id = ARGV[i], k = key, p = tonumber(ARGV[i + 2]), t = now, h = ARGV[i + 5], d = dedup_id,
      ah = ARGV[i + 6] == '1', st = 'new', nb = 0, a = 0,
    }
    local after = tonumber(ARGV[i + 3])
    store(rec)
    redis.call('HSET', K.payloads, rec.id, ARGV[i + 7])
    if key then
      count_key(key)
    end
    if dedup_id then
      local expires = now + settings.dedup_window
      redis.call('HSET', K.dedup, dedup_id, cmsgpack.pack({ rec.id, expires }))
      redis.call('ZADD', K.dedupexp, num(expires), dedup_id)
    end
    local holds_key = rec.ah and key
    if after > 0 and not holds_key then
      delay(rec, now + after)
    else
      rec.s = next_seq(rec.ah)
      rec.nb = now + after
      place(rec, now)
      if key then
        schedule(key, now, true)
      end
      placed = placed + 1
    end
    record('enqueued', rec, now)
    ids[#ids + 1] = rec.id
  end
end
flush()
flush_observed(now)
signal(math.max(placed, 1))
return ids
