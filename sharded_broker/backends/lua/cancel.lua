-- cancel: delete a waiting or delayed message for good (planner.cancel is the memory
-- model's). args: clock, options, id ('' = the message ref names), ref. Answers {state,
-- key ('' = unkeyed), id, ref ('' = none)}: state '' when the queue holds no such message,
-- 'leased' or 'dead' when it is refused (nothing changed), else the state it was cancelled
-- in ('ready' or 'delayed'). Nothing is swept, counted or published; its dedup entry
-- stays, as an ack leaves it.
-- When it was its key's head, the key moves on to its next message, scheduled as an
-- arrival would be; a place the cancelled head held by its not-before time goes with it.
register('cancel', function(args)
  local now = clock(args[1])
  local settings = options(args[2])
  local id = args[3] ~= '' and args[3] or ref_id(args[4])
  local rec = id and load(id)
  if not rec then
    return { '', '', '', '' }
  end
  local state = rec.st
  local member
  if state == 'ready' then
    -- A leased message's stored record still reads 'ready' (see load), without a ready member.
    member = ready_member(rec)
    if not redis.call('ZSCORE', K[READY], member) then
      return { 'leased', rec.k or '', rec.id, rec.rf or '' }
    end
  elseif state ~= 'delayed' then
    return { state, rec.k or '', rec.id, rec.rf or '' }
  end
  local key = rec.k
  local was_head = member ~= nil and key ~= nil and key_members(key, 1)[1] == member
  local held = rec.nb > rec.ea and rec.nb > now
  forget(rec)
  if was_head then
    schedule(key, now, not held, settings)
  end
  flush()
  if was_head then
    signal(1) -- its key may be deliverable now
  end
  return { state, key or '', rec.id, rec.rf or '' }
end, { 'allow-oom' })
