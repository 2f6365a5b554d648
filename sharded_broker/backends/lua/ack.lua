-- ack_many: settle leases for good. args: clock, options, then per lease: id, token, key
-- ('' = unkeyed), batch id, ref ('' = none). Answers one 1 (settled) or 0 (token not
-- current) per lease. A lease is named by its leases member (see lease_member), so no
-- record is read; its ref comes from the client's lease.
register('ack', function(args)
  local now = clock(args[1])
  OBSERVE.opts = options(args[2])
  local results = {}
  local freed = 0
  for i = 3, #args, 5 do
    local id, token, batch = args[i], args[i + 1], args[i + 3]
    local key = args[i + 2] ~= '' and args[i + 2] or nil
    if redis.call('ZREM', K[LEASES], lease_member(token, id, key, batch)) == 1 then
      redis.call('HDEL', K[MSGS], id)
      CACHE[id] = false
      if args[i + 4] ~= '' then
        drop_ref(args[i + 4], id)
      end
      local rec = { id = id, k = key, b = #token > TOKEN and batch or nil }
      local rest = get_batch(rec)
      for j, other in ipairs(rest) do
        if other == id then
          table.remove(rest, j)
          break
        end
      end
      local live = nil
      if key then
        live = uncount_key(key)
      end
      if settled(rec, now, rest, live) then
        freed = freed + 1 -- a key is ready again: wake a waiting consumer
      end
      record('acked', id, key, now)
      results[#results + 1] = 1
    else
      results[#results + 1] = 0
    end
  end
  flush()
  flush_observed(now)
  if freed > 0 then
    signal(freed)
  end
  return results
end, { 'allow-oom' })
