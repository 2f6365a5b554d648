-- purge: delete ready and delayed messages, or (dead = '1') dead letters, one bounded chunk
-- per call (the client calls again until done), so Redis serves other clients between
-- chunks. Leased messages are left to their holders.
-- ARGV: clock, dead ('1'/'0'), budget ('' on the first call: as many as are there now),
-- chunk (most messages deleted by this call).
-- Answers {how many this call deleted, budget left}. After every call the queue is
-- consistent: a key whose waiting messages are all gone leaves the ready order, a key with
-- messages left keeps its place in it.
local now = clock(ARGV[1])
local dead = ARGV[2] == '1'
local budget = tonumber(ARGV[3])
if not budget then
  if dead then
    budget = redis.call('ZCARD', K.dead)
  else
    budget = redis.call('ZCARD', K.ready) + redis.call('ZCARD', K.lane) + redis.call('ZCARD', K.delayed)
  end
end
local room = math.min(budget, tonumber(ARGV[4]))
local parts = dead and { 'dead' } or { 'ready', 'lane', 'delayed' }

local function first_members(index, count)
  if index == 'ready' then
    return redis.call('ZRANGE', K.ready, 0, count - 1)
  elseif index == 'lane' then
    return redis.call('ZRANGE', K.lane, 0, count - 1)
  elseif index == 'delayed' then
    return redis.call('ZRANGE', K.delayed, 0, count - 1)
  end
  return redis.call('ZRANGE', K.dead, 0, count - 1)
end

local touched = {}
local deleted = 0
for _, index in ipairs(parts) do
  if room - deleted <= 0 then
    break
  end
  for _, member in ipairs(first_members(index, room - deleted)) do
    local rec = entry_record(index, member, now)
    if rec.k and not dead then
      touched[rec.k] = true
    end
    forget(rec)
    deleted = deleted + 1
  end
end
for key in pairs(touched) do
  schedule(key, now, true)
end
flush()
return { deleted, budget - deleted }
