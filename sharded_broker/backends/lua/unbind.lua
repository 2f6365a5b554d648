-- unbind: forget one binding. keys: the exchange's binding set. args: queue.
register('unbind', function(args)
  return redis.call('SREM', K[1], args[1])
end)
