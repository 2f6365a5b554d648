-- set_paused: pause or resume a key, or with key '' the whole queue.
-- args: clock, key ('' = the queue), paused ('1'/'0').
register('set_paused', function(args)
  local now = clock(args[1])
  local key = args[2]
  local paused = args[3] == '1'
  if key == '' then
    redis.call('HSET', K[STATE], '#paused', paused and '1' or '0')
  elseif paused then
    set_key_setting('p:', '#np', key, '1')
  else
    set_key_setting('p:', '#np', key, nil)
    schedule(key, now, false, nil)
  end
  flush()
  signal(1)
  return 1
end)
