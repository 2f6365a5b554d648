-- nack: return a leased message for retry after a delay, or dead-letter it.
-- ARGV: clock, metrics minutes kept ("<queue>,<key>"), publish events (1/0), 6 settings, id, token, delay,
-- dead ('1'/'0'), reason ('' = none).
-- Answers 1, or 0 when the token is not current (nothing changed).
local now = clock(ARGV[1])
read_observe(ARGV, 2)
local settings = read_settings(ARGV, 4)
local rec = current(ARGV[10], ARGV[11])
if not rec then
  return 0
end
local reason = ARGV[14] ~= '' and ARGV[14] or nil
local dead_reason = nil
if ARGV[13] == '1' then
  dead_reason = reason or 'rejected'
end
promote_due(now) -- before a tail retry takes its seq
fail(rec, now, settings, tonumber(ARGV[12]), dead_reason, reason or 'nacked')
flush()
flush_observed(now)
signal(1)
return 1
