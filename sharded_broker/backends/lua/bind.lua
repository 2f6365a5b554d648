-- bind: route messages published to a fanout exchange to a queue.
-- keys: the exchange's binding set. args: queue.
register('bind', function(args)
  return redis.call('SADD', K[1], args[1])
end)
