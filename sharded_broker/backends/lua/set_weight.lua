-- set_weight: persist a key's weight in the fairness order; its round in progress ends
-- (its place stays). args: clock, key, weight (an integer > 1; '' = back to weight 1).
register('set_weight', function(args)
  local key = args[2]
  if args[3] == '' then
    if redis.call('HDEL', K[STATE], 'w:' .. key) == 1 then
      redis.call('HINCRBY', K[STATE], '#nw', '-1')
    end
  elseif redis.call('HSET', K[STATE], 'w:' .. key, args[3]) == 1 then
    redis.call('HINCRBY', K[STATE], '#nw', '1')
  end
  local ks = key_state(key)
  if ks.round then
    ks.round = nil
    save_key_state(key, ks)
  end
  flush()
  return 1
end)
