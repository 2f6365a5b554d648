-- set_weight: persist a key's weight in the fairness order; its round in progress ends
-- (its place stays). args: clock, key, weight (an integer > 1; '' = back to weight 1).
register('set_weight', function(args)
  local key = args[2]
  set_key_setting('w:', '#nw', key, args[3] ~= '' and args[3] or nil)
  local ks = key_state(key)
  if ks.round then
    ks.round = nil
    save_key_state(key, ks)
  end
  flush()
  return 1
end)
