-- purge: delete every ready and delayed message, or (dead = '1') every dead letter.
-- Leased messages are left to their holders. ARGV: dead ('1'/'0'). Answers how many.
-- Not a hot path: it visits every message it deletes.
local members = {}
if ARGV[1] == '1' then
  for _, member in ipairs(redis.call('ZRANGE', K.dead, 0, -1)) do
    members[#members + 1] = { 'dead', member }
  end
else
  for _, part in ipairs({ { 'ready', redis.call('ZRANGE', K.ready, 0, -1) },
    { 'lane', redis.call('ZRANGE', K.lane, 0, -1) }, { 'delayed', redis.call('ZRANGE', K.delayed, 0, -1) } }) do
    for _, member in ipairs(part[2]) do
      members[#members + 1] = { part[1], member }
    end
  end
end
for _, entry in ipairs(members) do
  forget(entry_record(entry[1], entry[2], 0))
end
if ARGV[1] ~= '1' then
  -- No message is ready any more, so no key has a ready time.
  redis.call('DEL', K.keyq, K.keyentry)
end
flush()
return #members
