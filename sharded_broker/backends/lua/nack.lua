-- nack: return a leased message for retry after a delay, or dead-letter it.
-- ARGV: clock, 6 settings, id, token, delay, dead ('1'/'0'), reason ('' = none).
-- Answers 1, or 0 when the token is not current (nothing changed).
local now = clock(ARGV[1])
local settings = read_settings(ARGV, 2)
local rec = current(ARGV[8], ARGV[9])
if not rec then
  return 0
end
local reason = ARGV[12] ~= '' and ARGV[12] or nil
local dead_reason = nil
if ARGV[11] == '1' then
  dead_reason = reason or 'rejected'
end
promote_due(now) -- before a tail retry takes its seq
fail(rec, now, settings, tonumber(ARGV[10]), dead_reason, reason or 'nacked')
flush()
signal(1)
return 1
