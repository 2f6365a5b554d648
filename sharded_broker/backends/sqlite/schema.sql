-- The SQLite backend's tables and indexes, run by sql.py (docs/design.md, "SQLite",
-- describes the layout). The heaps of the memory store become partial indexes: each hot query names the index's WHERE clause literally
-- (state = '...') so SQLite can use it. Every statement is idempotent (IF NOT EXISTS):
-- opening a file runs them all when its schema version is older than sql.SCHEMA_VERSION.
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    tail_seq INTEGER NOT NULL,
    head_seq INTEGER NOT NULL,
    next_order INTEGER NOT NULL,
    next_dead INTEGER NOT NULL,
    paused INTEGER NOT NULL,
    ready INTEGER NOT NULL,
    delayed INTEGER NOT NULL,
    leased INTEGER NOT NULL,
    dead INTEGER NOT NULL,
    keys INTEGER NOT NULL,
    held_messages INTEGER NOT NULL,        -- listed by queues() once a message was enqueued
    last_now REAL NOT NULL DEFAULT 0,      -- the latest time written for the queue (its clock's floor)
    -- The queue-wide counts of the minute open_minute, kept here until a later minute's
    -- first count moves them to the metrics table: most transactions write no metrics row
    -- for the whole queue (its row is written anyway).
    open_minute REAL,
    open_enqueued INTEGER NOT NULL DEFAULT 0,
    open_delivered INTEGER NOT NULL DEFAULT 0,
    open_acked INTEGER NOT NULL DEFAULT 0,
    open_retried INTEGER NOT NULL DEFAULT 0,
    open_dead INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 0,      -- messages ready, delayed or leased
    slots INTEGER NOT NULL DEFAULT 0,      -- batches leased and not yet settled
    ready_at REAL,                         -- NULL: not in the ready order
    ready_order INTEGER,
    interval REAL,                         -- NULL: the queue's default
    last_delivery REAL,
    paused INTEGER NOT NULL DEFAULT 0,
    -- The key's metrics counts of the minute open_minute, as in the queues table.
    open_minute REAL,
    open_enqueued INTEGER NOT NULL DEFAULT 0,
    open_delivered INTEGER NOT NULL DEFAULT 0,
    open_acked INTEGER NOT NULL DEFAULT 0,
    open_retried INTEGER NOT NULL DEFAULT 0,
    open_dead INTEGER NOT NULL DEFAULT 0,
    weight INTEGER,                        -- NULL: weight 1
    -- A weighted key's round in progress: services used, and the place it keeps.
    round_turns INTEGER NOT NULL DEFAULT 0,
    round_at REAL,
    round_order INTEGER,
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_open_minute ON keys (queue, open_minute) WHERE open_minute IS NOT NULL;
CREATE INDEX IF NOT EXISTS keys_ready ON keys (queue, ready_at, ready_order) WHERE ready_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS keys_backlog ON keys (queue, count DESC, key) WHERE count > 0;
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    key TEXT,
    payload BLOB NOT NULL,
    priority INTEGER NOT NULL,
    seq INTEGER,                           -- NULL while delayed without a reserved place
    enqueued_at REAL NOT NULL,
    headers TEXT NOT NULL,
    dedup_id TEXT,
    at_head INTEGER NOT NULL,
    state TEXT NOT NULL,                   -- ready | delayed | leased | dead
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    token TEXT NOT NULL DEFAULT '',
    deadline REAL NOT NULL DEFAULT 0,
    batch_id TEXT NOT NULL DEFAULT '',
    batch_index INTEGER NOT NULL DEFAULT 0,
    batch_size INTEGER NOT NULL DEFAULT 0, -- of the batch it is leased in
    leased_at REAL NOT NULL DEFAULT 0,     -- when its current lease was delivered
    timer_order INTEGER NOT NULL DEFAULT 0, -- tie-breaker of the delayed and lease orders
    entered_at REAL NOT NULL DEFAULT 0,    -- when it was last placed (key order or lane)
    entered_order INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    died_at REAL NOT NULL DEFAULT 0,
    dead_order INTEGER NOT NULL DEFAULT 0,
    ref TEXT                               -- the caller's name for it, while it names this message
);
-- not_before is in the index so that a key's next ready time is read without the table.
CREATE INDEX IF NOT EXISTS messages_key_order ON messages (queue, key, priority, seq, not_before) WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS messages_oldest ON messages (queue, enqueued_at) WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS messages_delayed ON messages (queue, not_before, timer_order) WHERE state = 'delayed';
-- A key's delayed messages, counted for max_pending_per_key (the ready ones: messages_key_order).
CREATE INDEX IF NOT EXISTS messages_key_delayed ON messages (queue, key) WHERE state = 'delayed';
CREATE INDEX IF NOT EXISTS messages_leased ON messages (queue, deadline, timer_order) WHERE state = 'leased';
-- Only batches of several messages: a lease of one message stores batch_id '' and needs no entry.
CREATE INDEX IF NOT EXISTS messages_open_batches ON messages (batch_id, batch_index) WHERE state = 'leased' AND batch_id <> '';
CREATE INDEX IF NOT EXISTS messages_dead ON messages (queue, dead_order) WHERE state = 'dead';
-- cancel and get by ref; only messages carrying one have an entry, and it goes with the row.
CREATE UNIQUE INDEX IF NOT EXISTS messages_ref ON messages (queue, ref) WHERE ref IS NOT NULL;
CREATE TABLE IF NOT EXISTS dedup (
    queue TEXT NOT NULL,
    dedup_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (queue, dedup_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup (queue, expires);
CREATE TABLE IF NOT EXISTS metrics (
    queue TEXT NOT NULL,
    key TEXT NOT NULL,                     -- '' for the whole queue, '+' || key for one key
    minute REAL NOT NULL,
    enqueued INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    retried INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, key, minute)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS metrics_expiry ON metrics (queue, minute);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so tailers can resume after an id
    queue TEXT NOT NULL,
    type TEXT NOT NULL,
    message_id TEXT NOT NULL,
    key TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bindings (
    exchange TEXT NOT NULL,
    queue TEXT NOT NULL,
    PRIMARY KEY (exchange, queue)
) WITHOUT ROWID;
-- Recurrent messages (schema version 5): one row per schedule; every is seconds (NULL
-- for a cron schedule), cron the spec (NULL for an every schedule). schedules_due orders
-- the schedules that may come due, for the look each consumer takes about once a second.
CREATE TABLE IF NOT EXISTS schedules (
    queue TEXT NOT NULL,
    name TEXT NOT NULL,
    payload BLOB NOT NULL,
    key TEXT,
    priority INTEGER NOT NULL,
    headers TEXT NOT NULL,
    every REAL,
    cron TEXT,
    next_due REAL NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    last_fired REAL,
    fired INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS schedules_due ON schedules (queue, next_due) WHERE paused = 0;
