-- dead_letters: a page of dead letters, oldest death first. ARGV: offset, limit.
local offset = tonumber(ARGV[1])
local ids = redis.call('ZRANGE', K.dead, offset, offset + tonumber(ARGV[2]) - 1)
local answer = {}
for i, id in ipairs(ids) do
  answer[i] = view(entry_record('dead', id, 0))
end
return answer
