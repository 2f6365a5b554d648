-- get: one message of the queue by id and what it is doing now (planner.get is the
-- memory model's). Reads only. args: clock, id ('' = the message ref names), ref. Answers
-- {} when the queue holds no such message, else {state, key ('' = unkeyed), priority,
-- attempts, enqueued_at, payload size, dedup id ('' = none), not before, lease deadline,
-- leased at, reason, died at, id, ref ('' = none)},
-- state one of ready, delayed, leased, dead; lease deadline and leased at are '' unless
-- leased and found. A leased message's lease is named by its token, which only its
-- holder knows: it is looked up among the queue's leases, in pages, at most
-- WHY_READ_LIMIT entries (the same in backend.py).
local GET_READ_LIMIT = 10000
local GET_PAGE = 500

register('get', function(args)
  local id = args[2] ~= '' and args[2] or ref_id(args[3])
  local rec = id and load(id)
  if not rec then
    return {}
  end
  local state, attempts = rec.st, rec.a
  local deadline, leased_at = '', ''
  -- A leased message's stored record still reads 'ready' (see load), without a ready member.
  if state == 'ready' and not redis.call('ZSCORE', K[READY], ready_member(rec)) then
    state = 'leased'
    attempts = attempts + 1
    local found = false
    for start = 0, GET_READ_LIMIT - 1, GET_PAGE do
      local page = redis.call('ZRANGE', K[LEASES], text(start), text(start + GET_PAGE - 1), 'WITHSCORES')
      for i = 1, #page, 2 do
        local token, lease_id = lease_parts(page[i])
        if lease_id == id then
          deadline, leased_at = tonumber(page[i + 1]), token_time(token)
          found = true
          break
        end
      end
      if found or #page < 2 * GET_PAGE then
        break
      end
    end
  end
  return { state, rec.k or '', rec.p, attempts, rec.t, #rec.pl, rec.d or '', rec.nb, deadline, leased_at, rec.r or '',
    rec.da or 0, id, rec.rf or '' }
end, { 'no-writes' })
