-- The SQLite backend's fixed statements, each under "-- name: NAME" and loaded by that name
-- (sql.py: QUERIES). tests/test_sqlite_backend.py runs EXPLAIN QUERY PLAN on every
-- statement a workload executes and refuses full scans and sorts.
--
-- Column lists: a message as the planner reads it (id, key, priority, seq, at_head, state,
-- not_before, attempts, token, deadline, batch_id, batch_index), with what a lease hands
-- out after it (payload, headers, enqueued_at, dedup_id, entered_at, entered_order, ref).

-- name: key_head
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index,
       payload, headers, enqueued_at, dedup_id, entered_at, entered_order, ref
FROM messages WHERE queue = ? AND key = ? AND state = 'ready' ORDER BY priority, seq LIMIT ?;

-- name: key_tail
-- max_pending_per_key with on_full = 'replace': the key's last ready message.
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index,
       payload, headers, enqueued_at, dedup_id, entered_at, entered_order, ref
FROM messages WHERE queue = ? AND key = ? AND state = 'ready' ORDER BY priority DESC, seq DESC LIMIT 1;

-- name: key_ready_count
SELECT COUNT(*) FROM messages WHERE queue = ? AND key = ? AND state = 'ready';

-- name: key_delayed_count
SELECT COUNT(*) FROM messages WHERE queue = ? AND key = ? AND state = 'delayed';

-- name: lane_head
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index,
       payload, headers, enqueued_at, dedup_id, entered_at, entered_order, ref
FROM messages WHERE queue = ? AND key IS NULL AND state = 'ready' ORDER BY priority, seq LIMIT 1;

-- name: ready_key
SELECT key, ready_at, ready_order FROM keys WHERE queue = ? AND ready_at IS NOT NULL
ORDER BY ready_at, ready_order LIMIT 1;

-- name: due_delayed
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index
FROM messages WHERE queue = ? AND state = 'delayed' AND not_before <= ? ORDER BY not_before, timer_order LIMIT ?;

-- name: expired_lease
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index
FROM messages WHERE queue = ? AND state = 'leased' AND deadline <= ? ORDER BY deadline, timer_order LIMIT 1;

-- name: next_delayed
SELECT MIN(not_before) FROM messages WHERE queue = ? AND state = 'delayed';

-- name: next_deadline
SELECT MIN(deadline) FROM messages WHERE queue = ? AND state = 'leased';

-- name: batch_followers
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index
FROM messages WHERE batch_id = ? AND state = 'leased' AND batch_id <> '' AND batch_index > ? ORDER BY batch_index;

-- name: batch_left
SELECT 1 FROM messages WHERE batch_id = ? AND state = 'leased' AND batch_id <> '' LIMIT 1;

-- name: message
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index
FROM messages WHERE id = ? AND queue = ?;

-- name: message_any
-- cancel and get: one message of the queue by id, in any state.
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index,
       payload, headers, enqueued_at, dedup_id, entered_at, entered_order, ref
FROM messages WHERE id = ? AND queue = ?;

-- name: message_by_ref
-- cancel and get by ref: the one message of the queue carrying it (messages_ref).
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index,
       payload, headers, enqueued_at, dedup_id, entered_at, entered_order, ref
FROM messages WHERE queue = ? AND ref = ?;

-- name: ref_taken
-- An enqueue with a ref: the older message carrying it loses it (a ref names one message).
UPDATE messages SET ref = NULL WHERE queue = ? AND ref = ?;

-- name: message_outcome
-- get: what a message's lease or death recorded.
SELECT leased_at, reason, died_at FROM messages WHERE id = ?;

-- name: message_state
SELECT state FROM messages WHERE id = ?;

-- name: ack
-- The token check and the delete in one statement.
DELETE FROM messages WHERE id = ? AND queue = ? AND state = 'leased' AND token = ? RETURNING key, batch_id;

-- name: key_next_time
SELECT not_before, entered_at FROM messages WHERE queue = ? AND key = ? AND state = 'ready'
ORDER BY priority, seq LIMIT 1;

-- name: key_head_enqueued_at
SELECT enqueued_at FROM messages WHERE queue = ? AND key = ? AND state = 'ready' ORDER BY priority, seq LIMIT 1;

-- name: delayed_order
-- key_facts: the queue's delayed order, read up to each waiting key's first entry.
SELECT not_before, key FROM messages WHERE queue = ? AND state = 'delayed' ORDER BY not_before, timer_order LIMIT ?;

-- name: leases_in_flight
-- key_facts: the queue's leases, grouped by key and batch by the reader.
SELECT id, key, token, attempts, deadline, batch_id, batch_index, batch_size, leased_at FROM messages
WHERE queue = ? AND state = 'leased' ORDER BY deadline, timer_order LIMIT ?;

-- name: key_settings
SELECT count, slots, interval, paused, weight FROM keys WHERE queue = ? AND key = ?;

-- name: key_delete
DELETE FROM keys WHERE queue = ? AND key = ?;

-- name: dedup
SELECT message_id, expires FROM dedup WHERE queue = ? AND dedup_id = ?;

-- name: dedup_expired
SELECT dedup_id, message_id FROM dedup WHERE queue = ? AND expires <= ? ORDER BY expires LIMIT ?;

-- name: dedup_set
INSERT OR REPLACE INTO dedup (queue, dedup_id, message_id, expires) VALUES (?, ?, ?, ?);

-- name: dedup_drop
DELETE FROM dedup WHERE queue = ? AND dedup_id = ?;

-- name: oldest_ready
SELECT MIN(enqueued_at) FROM messages WHERE queue = ? AND state = 'ready';

-- name: dead_letters
SELECT id, key, payload, priority, attempts, headers, reason, enqueued_at, died_at, dedup_id, ref
FROM messages WHERE queue = ? AND state = 'dead' ORDER BY dead_order LIMIT ? OFFSET ?;

-- name: dead_all
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index
FROM messages WHERE queue = ? AND state = 'dead' ORDER BY dead_order;

-- name: dead_one
SELECT id, key, priority, seq, at_head, state, not_before, attempts, token, deadline, batch_id, batch_index
FROM messages WHERE id = ? AND queue = ? AND state = 'dead';

-- name: purge_dead
DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE queue = ? AND state = 'dead' ORDER BY dead_order LIMIT ?);

-- name: purge_ready
-- One state at a time, in the order of that state's partial index.
SELECT id, key FROM messages WHERE queue = ? AND state = 'ready' ORDER BY key, priority, seq LIMIT ?;

-- name: purge_delayed
SELECT id, key FROM messages WHERE queue = ? AND state = 'delayed' ORDER BY not_before, timer_order LIMIT ?;

-- name: message_delete
DELETE FROM messages WHERE id = ?;

-- name: metrics_expired
DELETE FROM metrics WHERE (queue, key, minute) IN
(SELECT queue, key, minute FROM metrics WHERE queue = ? AND minute < ? LIMIT ?);

-- name: metrics_expired_keys
-- Per-key rows when key_metrics_window is shorter than metrics_window.
DELETE FROM metrics WHERE (queue, key, minute) IN
(SELECT queue, key, minute FROM metrics WHERE queue = ? AND minute < ? AND key <> '' LIMIT ?);

-- name: key_minutes_expired
UPDATE keys SET open_minute = NULL, open_enqueued = 0, open_delivered = 0, open_acked = 0, open_retried = 0,
open_dead = 0 WHERE (queue, key) IN (SELECT queue, key FROM keys WHERE queue = ? AND open_minute < ? LIMIT ?)
RETURNING key;

-- name: metrics_range
SELECT minute, enqueued, delivered, acked, retried, dead FROM metrics
WHERE queue = ? AND key = ? AND minute >= ? AND minute <= ?;

-- name: keys_by_backlog
SELECT key FROM keys WHERE queue = ? AND count > 0 ORDER BY count DESC, key LIMIT ?;

-- name: keys_by_backlog_page
SELECT key FROM keys WHERE queue = ? AND count > 0 ORDER BY count DESC, key LIMIT ? OFFSET ?;

-- name: keys_with_backlog
SELECT key FROM keys WHERE queue = ? AND count > 0;

-- name: events_insert
INSERT INTO events (queue, type, message_id, key, at) VALUES (?, ?, ?, ?, ?);

-- name: events_trim
DELETE FROM events WHERE id <= ?;

-- name: events_after
SELECT id, type, message_id, key, at FROM events WHERE id > ? AND queue = ? ORDER BY id LIMIT 1000;

-- name: events_last
SELECT COALESCE(MAX(id), 0) FROM events;

-- name: queues_held
SELECT name FROM queues WHERE held_messages ORDER BY name;

-- name: database_now
SELECT MAX(last_now) FROM queues;

-- name: bind
INSERT OR IGNORE INTO bindings VALUES (?, ?);

-- name: unbind
DELETE FROM bindings WHERE exchange = ? AND queue = ?;

-- name: bound_queues
SELECT queue FROM bindings WHERE exchange = ? ORDER BY queue;

-- name: schedule
SELECT queue, name, payload, key, priority, headers, every, cron, next_due, paused, last_fired, fired
FROM schedules WHERE queue = ? AND name = ?;

-- name: schedules
SELECT queue, name, payload, key, priority, headers, every, cron, next_due, paused, last_fired, fired
FROM schedules WHERE queue = ? ORDER BY name;

-- name: schedules_due
SELECT queue, name, payload, key, priority, headers, every, cron, next_due, paused, last_fired, fired
FROM schedules WHERE queue = ? AND paused = 0 AND next_due <= ? ORDER BY next_due, name LIMIT ?;

-- name: schedule_put
INSERT OR REPLACE INTO schedules (queue, name, payload, key, priority, headers, every, cron, next_due, paused,
                                  last_fired, fired)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: schedule_fired
-- The compare-and-set of a firing: only while the stored next due time is the one read.
UPDATE schedules SET next_due = ?, last_fired = ?, fired = fired + 1
WHERE queue = ? AND name = ? AND paused = 0 AND next_due = ?;

-- name: schedule_paused
UPDATE schedules SET paused = ?, next_due = COALESCE(?, next_due) WHERE queue = ? AND name = ?;

-- name: schedule_delete
DELETE FROM schedules WHERE queue = ? AND name = ?;
