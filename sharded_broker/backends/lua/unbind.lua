-- unbind: forget one binding. KEYS: the exchange's binding set. ARGV: queue.
return redis.call('SREM', KEYS[1], ARGV[1])
