-- dead_order: where dead letters go when replayed, so that a replay done in chunks puts
-- them in the same order as one done at once. ARGV: ids.
-- Answers {id, priority, seq (0 when it never had one)} per id that is still dead.
local answer = {}
for i = 1, #ARGV do
  local rec = load(ARGV[i])
  if rec and rec.st == 'dead' then
    answer[#answer + 1] = { rec.id, rec.p, rec.s or 0 }
  end
end
return answer
