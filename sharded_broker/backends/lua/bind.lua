-- bind: route messages published to a fanout exchange to a queue.
-- KEYS: the exchange's binding set. ARGV: queue.
return redis.call('SADD', KEYS[1], ARGV[1])
