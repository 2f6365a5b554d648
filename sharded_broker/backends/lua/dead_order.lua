-- dead_order: where dead letters go when replayed, so that a replay done in chunks puts
-- them in the same order as one done at once. args: clock, then ids.
-- Answers {id, priority, seq (0 when it never had one)} per id that is still dead.
register('dead_order', function(args)
  local answer = {}
  for i = 2, #args do
    local rec = load(args[i])
    if rec and rec.st == 'dead' then
      answer[#answer + 1] = { rec.id, rec.p, rec.s or 0 }
    end
  end
  return answer
end, { 'no-writes' })
