"""Embedded, durable backend on one SQLite file, shared by every process of one host.

``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` (as SQLAlchemy spells
them). Options: ``clock`` (a callable returning seconds since the epoch, for tests),
``busy_timeout`` (seconds a call keeps retrying while other processes hold the write
lock, default 30; after that it raises BackendUnavailable) and ``synchronous``
(``"normal"``, the default: nothing committed is lost when a process dies, the last
transactions may be lost on power failure; ``"full"``: not even then).

Guarantees, on top of the backend contract (``sharded_broker/backend.py``, with the memory
backend as the reference model):

- Every operation is one short write transaction (``BEGIN IMMEDIATE``, WAL mode), so any
  number of processes and threads may enqueue, lease and ack on the same file at once. A
  process killed at any moment (SIGKILL) loses nothing that was committed; its leases
  come back when their visibility timeout ends. ``database is locked`` never reaches the
  caller: busy transactions are retried until ``busy_timeout``.
- Batch calls (``enqueue_many``, ``lease`` with a limit, ``ack_many``, ``release_many``,
  ``extend_many``) are one transaction each. Every hot statement reads through an index (O(log n)); the heaps of
  the memory model are partial indexes here.
- One clock per database: the caller host's ``time.time()``, never allowed to run behind
  the latest time already written for the queue (kept in its row of the ``queues`` table,
  so that a transaction writes no extra row for it), so deadlines and ready times never
  go backwards when processes' clocks differ slightly.
- Thread-safe (one connection per process, behind a lock) and fork-safe (a child process
  never reuses its parent's connection; it opens its own on first use).
- ``wait`` never spins: it sleeps 5 ms, doubling to 100 ms, between polls, and wakes at
  once when this process enqueues, acks or returns a message.
- Metrics are rows per (queue, key, minute) with the five counts, summed in memory during
  a transaction and upserted at its end; a transaction that creates rows forgets at most a
  few expired ones (``metrics_window``, default 3600 seconds; per-key rows
  ``key_metrics_window``, default the same). Per-key backlogs are an index on the keys
  table, so the largest backlogs are read without a scan.
- ``purge`` deletes in transactions of at most ``PURGE_CHUNK`` (1,000) messages, so the
  write lock is never held for long; the queue is consistent after each.
- Events (``events=True``; off by default, as each one is a row written) go to an
  ``events`` table capped at ``EVENTS_KEPT`` rows (each transaction deletes as many old
  rows as it adds); subscribers tail it by polling every 50 ms, in any process. A
  subscriber further than ``EVENTS_KEPT`` events behind misses the oldest.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import sqlite3
import stat
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar
from urllib.parse import unquote, urlsplit

from ..backend import (
    DEFAULT_METRICS_WINDOW, METRICS_SWEEP_LIMIT, WHY_READ_LIMIT, Backend, EventSubscription, KeySort, events_option, expired_before,
    key_metrics_window_option, metric_minutes, metrics_window_option, minute_of,
)
from ..errors import BackendUnavailable, ConfigurationError, InvalidURL
from ..models import (
    COUNTERS, DeadLetter, Event, HeadMessage, HeldBatch, KeyFacts, KeyInfo, Lease, LeaseResult, Message, MinuteMetrics, QueueSettings,
    QueueStats, RetryPosition,
)

# Tail seqs count up from here and head seqs count down, so every head seq sorts first.
SEQ_ORIGIN = 2**52
# Version 2 added the metrics and events tables and the keys_backlog index; a version 1
# file gains them when opened. Version 3 replaced two indexes (OLD_INDEXES) by
# messages_key_order and messages_open_batches, and keeps each queue's clock floor in its
# row (queues.last_now) instead of one 'last_now' in meta, and the metrics counts of the
# current minute in the queue's and the key's rows (ADDED_COLUMNS): an older file gains
# them when opened, each queue starting from the old floor.
SCHEMA_VERSION = 3
OLD_INDEXES = ("messages_ready", "messages_batch")
_OPEN_MINUTE_COLUMNS = {"open_minute": "REAL", **{f"open_{c}": "INTEGER NOT NULL DEFAULT 0" for c in COUNTERS}}
ADDED_COLUMNS = {
    "queues": {"last_now": "REAL NOT NULL DEFAULT 0", **_OPEN_MINUTE_COLUMNS},
    "keys": _OPEN_MINUTE_COLUMNS,
}
# Pages SQLite keeps in memory per connection (negative: KiB): at a million messages the
# indexes of the hot statements stay cached instead of being read again from the file.
CACHE_KIB = 64 * 1024
# Bytes of the database file read through a memory map instead of read() calls: pages
# come from the OS page cache (shared by every process on the host) without a copy or a
# system call. At a million messages (a 340 MB file) a lease + ack then costs as much as
# at 100,000 (measured: 0.77 of the 100,000 rate without it, 1.00 with it).
MMAP_BYTES = 1024 * 1024 * 1024
# WAL pages written before a commit checkpoints them into the database (SQLite's default:
# 1,000). Each checkpoint syncs the WAL and the database file to disk, the largest cost of
# a small transaction; a larger WAL syncs ten times less often and writes each hot page
# back once per checkpoint instead of once per 1,000 frames. After a checkpoint the file
# is cut back to WAL_KEPT_BYTES.
WAL_CHECKPOINT_PAGES = 10_000
WAL_KEPT_BYTES = 64 * 1024 * 1024
OPTIONS = ("busy_timeout", "clock", "events", "key_metrics_window", "metrics_window", "synchronous")
EVENTS_KEPT = 10_000
EVENTS_POLL = 0.05
# A purge deletes at most this many messages per transaction, so that it never holds the
# write lock for long.
PURGE_CHUNK = 1000
WAIT_FIRST_STEP = 0.005
WAIT_MAX_STEP = 0.1

T = TypeVar("T")

# Adds a transaction's counts to a metrics row; answers the row's new sum of counts (equal
# to the counts added when the row was created now).
METRICS_UPSERT = (
    f"INSERT INTO metrics (queue, key, minute, {', '.join(COUNTERS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (queue, key, minute) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)
    + " RETURNING " + " + ".join(COUNTERS)
)

# The heaps of the memory model become partial indexes: each hot query names the index's
# WHERE clause literally (state = '...') so SQLite can use it.
SCHEMA = """
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
    timer_order INTEGER NOT NULL DEFAULT 0, -- tie-breaker of the delayed and lease orders
    entered_at REAL NOT NULL DEFAULT 0,    -- when it was last placed (key order or lane)
    entered_order INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    died_at REAL NOT NULL DEFAULT 0,
    dead_order INTEGER NOT NULL DEFAULT 0
);
-- not_before is in the index so that a key's next ready time is read without the table.
CREATE INDEX IF NOT EXISTS messages_key_order ON messages (queue, key, priority, seq, not_before) WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS messages_oldest ON messages (queue, enqueued_at) WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS messages_delayed ON messages (queue, not_before, timer_order) WHERE state = 'delayed';
CREATE INDEX IF NOT EXISTS messages_leased ON messages (queue, deadline, timer_order) WHERE state = 'leased';
-- Only batches of several messages: a lease of one message stores batch_id '' and needs no entry.
CREATE INDEX IF NOT EXISTS messages_open_batches ON messages (batch_id, batch_index) WHERE state = 'leased' AND batch_id <> '';
CREATE INDEX IF NOT EXISTS messages_dead ON messages (queue, dead_order) WHERE state = 'dead';
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
"""

MESSAGE_COLUMNS = (
    "id, key, payload, priority, seq, enqueued_at, headers, dedup_id, at_head, state, not_before, "
    "attempts, token, deadline, batch_id, batch_index, reason, died_at"
)

# The fixed statements of the hot paths. tests/test_sqlite_backend.py runs EXPLAIN QUERY
# PLAN on every statement a workload executes and refuses full scans and sorts.
HOT_QUERIES = {
    "key_head": f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue = ? AND key = ? AND state = 'ready' "
    "ORDER BY priority, seq LIMIT ?",
    "lane_head": f"SELECT {MESSAGE_COLUMNS}, entered_at, entered_order FROM messages "
    "WHERE queue = ? AND key IS NULL AND state = 'ready' ORDER BY priority, seq LIMIT 1",
    "ready_key": "SELECT key, ready_at, ready_order FROM keys WHERE queue = ? AND ready_at IS NOT NULL "
    "ORDER BY ready_at, ready_order LIMIT 1",
    "due_delayed": "SELECT id, key, seq, at_head FROM messages WHERE queue = ? AND state = 'delayed' "
    "AND not_before <= ? ORDER BY not_before, timer_order",
    "expired_lease": f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue = ? AND state = 'leased' "
    "AND deadline <= ? ORDER BY deadline, timer_order LIMIT 1",
    "next_delayed": "SELECT MIN(not_before) FROM messages WHERE queue = ? AND state = 'delayed'",
    "next_deadline": "SELECT MIN(deadline) FROM messages WHERE queue = ? AND state = 'leased'",
    "batch_followers": "SELECT id, seq FROM messages WHERE batch_id = ? AND state = 'leased' AND batch_id <> '' "
    "AND batch_index > ? ORDER BY batch_index",
    "batch_left": "SELECT 1 FROM messages WHERE batch_id = ? AND state = 'leased' AND batch_id <> '' LIMIT 1",
    # What settling a lease needs (not its payload and headers).
    "message": "SELECT id, key, seq, attempts, batch_id, batch_index, deadline, state, token, queue FROM messages "
    "WHERE id = ?",
    "ack": "DELETE FROM messages WHERE id = ? AND queue = ? AND state = 'leased' AND token = ? RETURNING key, batch_id",
    "key_next_time": "SELECT not_before, entered_at FROM messages WHERE queue = ? AND key = ? AND state = 'ready' "
    "ORDER BY priority, seq LIMIT 1",
    "dedup": "SELECT message_id, expires FROM dedup WHERE queue = ? AND dedup_id = ?",
    "dedup_expired": "DELETE FROM dedup WHERE queue = ? AND expires <= ?",
    # unique_while_pending: the window does not end a pending twin's claim.
    "dedup_expired_done": "DELETE FROM dedup WHERE queue = ? AND expires <= ? AND NOT EXISTS "
    "(SELECT 1 FROM messages WHERE messages.id = dedup.message_id AND messages.state IN ('ready', 'delayed'))",
    "dedup_renew_pending": "UPDATE dedup SET expires = ? WHERE queue = ? AND expires <= ?",
    "oldest_ready": "SELECT MIN(enqueued_at) FROM messages WHERE queue = ? AND state = 'ready'",
    "dead_letters": f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue = ? AND state = 'dead' "
    "ORDER BY dead_order LIMIT ? OFFSET ?",
    "metrics_expired": "DELETE FROM metrics WHERE (queue, key, minute) IN (SELECT queue, key, minute FROM metrics "
    f"WHERE queue = ? AND minute < ? LIMIT {METRICS_SWEEP_LIMIT})",
    # Per-key rows when key_metrics_window is shorter than metrics_window.
    "metrics_expired_keys": "DELETE FROM metrics WHERE (queue, key, minute) IN (SELECT queue, key, minute FROM metrics "
    f"WHERE queue = ? AND minute < ? AND key <> '' LIMIT {METRICS_SWEEP_LIMIT})",
    "events_trim": "DELETE FROM events WHERE id <= ?",
    "key_minutes_expired": "UPDATE keys SET open_minute = NULL, "
    + ", ".join(f"open_{c} = 0" for c in COUNTERS)
    + " WHERE (queue, key) IN (SELECT queue, key FROM keys WHERE queue = ? AND open_minute < ? LIMIT ?) RETURNING key",
    "keys_by_backlog": "SELECT key FROM keys WHERE queue = ? AND count > 0 ORDER BY count DESC, key LIMIT ?",
    "keys_with_backlog": "SELECT key FROM keys WHERE queue = ? AND count > 0",
    "metrics_range": "SELECT minute, enqueued, delivered, acked, retried, dead FROM metrics "
    "WHERE queue = ? AND key = ? AND minute >= ? AND minute <= ?",
    "events_after": "SELECT id, type, message_id, key, at FROM events WHERE id > ? AND queue = ? ORDER BY id LIMIT 1000",
}


# The columns of a queue's and a key's row that hold the counts of its open minute.
_OPEN_COUNTS = tuple(f"open_{counter}" for counter in COUNTERS)


@dataclass
class _QueueRow:
    """A queue's counters, read once per transaction and written back at its end."""

    name: str
    tail_seq: int = SEQ_ORIGIN
    head_seq: int = SEQ_ORIGIN
    next_order: int = 0
    next_dead: int = 0
    paused: int = 0
    ready: int = 0
    delayed: int = 0
    leased: int = 0
    dead: int = 0
    keys: int = 0
    held_messages: int = 0
    last_now: float = 0.0
    open_minute: float | None = None
    open_enqueued: int = 0
    open_delivered: int = 0
    open_acked: int = 0
    open_retried: int = 0
    open_dead: int = 0
    # Not stored: True once a lease found no unkeyed ready message, until one enters the
    # lane (the row is forgotten if another connection commits), so that leases skip
    # looking for one.
    lane_empty: bool = False

    FIELDS = (
        "tail_seq", "head_seq", "next_order", "next_dead", "paused", "ready", "delayed", "leased", "dead", "keys",
        "held_messages", "last_now", "open_minute", *_OPEN_COUNTS,
    )

    def open_counts(self) -> list[int]:
        return [getattr(self, name) for name in _OPEN_COUNTS]

    def close_minute(self) -> None:
        self.open_minute = None
        for name in _OPEN_COUNTS:
            setattr(self, name, 0)

    def order(self) -> int:
        self.next_order += 1
        return self.next_order

    def next_seq(self, at_head: bool) -> int:
        if at_head:
            self.head_seq -= 1
            return self.head_seq
        self.tail_seq += 1
        return self.tail_seq

    def count(self, state: str, change: int) -> None:
        if state in ("ready", "delayed", "leased", "dead"):
            setattr(self, state, getattr(self, state) + change)


QUEUE_VALUES = operator.attrgetter(*_QueueRow.FIELDS)
QUEUE_SELECT = f"SELECT {', '.join(_QueueRow.FIELDS)} FROM queues WHERE name = ?"
QUEUE_INSERT = f"INSERT INTO queues (name, {', '.join(_QueueRow.FIELDS)}) VALUES (?{', ?' * len(_QueueRow.FIELDS)})"
QUEUE_UPDATE = f"UPDATE queues SET {', '.join(f + ' = ?' for f in _QueueRow.FIELDS)} WHERE name = ?"


@dataclass
class _KeyRow:
    """A key's row, read at most once per transaction and written back (or deleted, once
    it holds nothing and no setting of its own) before the ready order is read and at
    the transaction's end: one read and one write per key touched, however many steps
    change it."""

    count: int = 0  # messages ready, delayed or leased
    slots: int = 0  # batches leased and not yet settled
    ready_at: float | None = None  # None: not in the ready order
    ready_order: int | None = None
    interval: float | None = None  # None: the queue's default
    last_delivery: float | None = None
    paused: int = 0
    open_minute: float | None = None  # the minute whose counts are in the row
    open_enqueued: int = 0
    open_delivered: int = 0
    open_acked: int = 0
    open_retried: int = 0
    open_dead: int = 0
    stored: bool = False  # whether the table holds the row
    changed: bool = False
    # The values the table holds: an UPDATE names only the columns that differ, as SQLite
    # rewrites the entries of every index over a column that an UPDATE names.
    stored_values: tuple = ()

    FIELDS = (
        "count", "slots", "ready_at", "ready_order", "interval", "last_delivery", "paused", "open_minute",
        *_OPEN_COUNTS,
    )

    def values(self) -> tuple:
        return _KEY_VALUES(self)

    def open_counts(self) -> list[int]:
        return [getattr(self, name) for name in _OPEN_COUNTS]

    def close_minute(self) -> None:
        self.open_minute = None
        for name in _OPEN_COUNTS:
            setattr(self, name, 0)

    def holds_nothing(self) -> bool:
        return (
            not self.count and not self.slots and self.interval is None and self.last_delivery is None
            and not self.paused
        )


_KEY_VALUES = operator.attrgetter(*_KeyRow.FIELDS)
KEY_SELECT = f"SELECT {', '.join(_KeyRow.FIELDS)} FROM keys WHERE queue = ? AND key = ?"
KEY_INSERT = f"INSERT INTO keys (queue, key, {', '.join(_KeyRow.FIELDS)}) VALUES (?, ?{', ?' * len(_KeyRow.FIELDS)})"


class _Wakeup:
    """Per process and database file: a generation count that every local change bumps,
    and a Condition that waiting consumers sleep on."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.generation = 0

    def notify(self) -> None:
        with self.condition:
            self.generation += 1
            self.condition.notify_all()


_WAKEUPS: dict[str, _Wakeup] = {}
_WAKEUPS_LOCK = threading.Lock()
# Connections inherited through fork: the child must neither use nor close them (closing
# could disturb the parent's locks and WAL state), so they are kept alive here, unused.
_INHERITED: list[sqlite3.Connection] = []
_BACKENDS: "weakref.WeakSet[SQLiteBackend]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Locks held by another thread at fork time would never be released in the child."""
    global _WAKEUPS_LOCK
    _WAKEUPS_LOCK = threading.Lock()
    for wakeup in _WAKEUPS.values():
        wakeup.condition = threading.Condition()
    for backend in list(_BACKENDS):
        backend._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _path_from_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise InvalidURL(
            f"sqlite URL takes no query string ({url!r}); pass options as keyword arguments: {', '.join(OPTIONS)}"
        )
    if parts.netloc:
        raise InvalidURL(
            f"sqlite URL {url!r} names a host; write sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if not path:
        raise InvalidURL(
            f"sqlite URL {url!r} has no file path; write sqlite:///relative.db or sqlite:////absolute/path.db "
            "(for an in-process store without a file, use memory://)"
        )
    if path == ":memory:" or path.startswith("file:"):
        raise InvalidURL(
            f"sqlite URL {url!r} must name a file; for an in-process store use memory://"
        )
    return path


class SQLiteBackend(Backend):
    """Queues in one SQLite file, shared by every process and thread that opens it."""

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] | None = None,
        busy_timeout: float = 30.0,
        synchronous: str = "normal",
        metrics_window: float = DEFAULT_METRICS_WINDOW,
        key_metrics_window: float | None = None,
        events: bool = False,
    ) -> None:
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, (int, float)) or not busy_timeout > 0:
            raise ConfigurationError(f"busy_timeout must be a number of seconds > 0, not {busy_timeout!r}")
        if synchronous not in ("normal", "full"):
            raise ConfigurationError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        if clock is not None and not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, not {clock!r}")
        self.path = os.path.abspath(path)
        self._clock = clock or time.time
        self._busy_timeout = float(busy_timeout)
        self._synchronous = synchronous
        self._metrics_window = metrics_window_option(metrics_window)
        self._key_metrics_window = key_metrics_window_option(key_metrics_window, self._metrics_window)
        self._events = events_option(events)
        with _WAKEUPS_LOCK:
            self._wakeup = _WAKEUPS.setdefault(self.path, _Wakeup())
        self._local = threading.local()  # wait backoff and last seen generation, per thread
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._rows = _RowCache()
        _BACKENDS.add(self)
        self._check_path()
        with self._lock:
            self._connection()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "SQLiteBackend":
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) for sqlite://: {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
            )
        return cls(_path_from_url(url), **options)

    def __repr__(self) -> str:
        return f"<SQLiteBackend sqlite:///{self.path}>"

    # -- connection -------------------------------------------------------------------

    def _check_path(self) -> None:
        """Refuse, before SQLite does with a vaguer message, paths that cannot work."""
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise InvalidURL(f"sqlite database {self.path}: directory {directory} does not exist")
        if os.path.isdir(self.path):
            raise InvalidURL(f"sqlite database {self.path} is a directory, not a file")
        if os.path.exists(self.path):
            mode = os.stat(self.path).st_mode
            # root may write anywhere; a file without write bits is still meant read-only.
            if not os.access(self.path, os.R_OK | os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                raise InvalidURL(
                    f"sqlite database {self.path} is read-only; the broker needs to write to it"
                )
        # WAL mode keeps its -wal and -shm files next to the database.
        if not os.access(directory, os.W_OK | os.X_OK):
            raise InvalidURL(
                f"sqlite database {self.path}: directory {directory} is not writable (WAL needs its -wal and -shm files there)"
            )

    def _connection(self) -> sqlite3.Connection:
        """This process's connection (called with the lock held)."""
        if self._pid != os.getpid():
            # Forked: the parent's connection (and maybe its lock state) must not be reused.
            if self._conn is not None:
                _INHERITED.append(self._conn)
            self._conn = None
            self._pid = os.getpid()
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=min(self._busy_timeout, 5.0), isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            self._retry_busy(lambda: self._setup(conn))
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise InvalidURL(f"sqlite database {self.path} could not switch to WAL mode (mode is {mode})")
            conn.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_KEPT_BYTES}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, 2, SCHEMA_VERSION):
                raise InvalidURL(
                    f"sqlite database {self.path} has schema version {version}; this version of sharded-broker "
                    f"reads version {SCHEMA_VERSION}"
                )
            if version != SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                for index in OLD_INDEXES:
                    conn.execute(f"DROP INDEX IF EXISTS {index}")
                # Columns first: the schema's new indexes may cover them.
                for table, columns in ADDED_COLUMNS.items():
                    present = {column[1] for column in conn.execute(f"PRAGMA table_info({table})")}
                    if not present:
                        continue  # a new file: the schema creates the table whole
                    for column, declaration in columns.items():
                        if column not in present:
                            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                    if table == "queues" and "last_now" not in present:
                        conn.execute(
                            "UPDATE queues SET last_now = COALESCE((SELECT value FROM meta WHERE name = 'last_now'), 0)"
                        )
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _error(self, exc: sqlite3.Error) -> Exception:
        """A clear error for ``exc``, naming the database file."""
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            return InvalidURL(f"{self.path} is not a SQLite database (or it is corrupt): {text}")
        if "readonly" in text or "read-only" in text:
            return InvalidURL(f"sqlite database {self.path} is read-only; the broker needs to write to it: {text}")
        if "unable to open" in text:
            return InvalidURL(f"cannot open sqlite database {self.path}: {text}")
        return BackendUnavailable(f"sqlite database {self.path}: {text}")

    @staticmethod
    def _busy(exc: sqlite3.Error) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))

    def _retry_busy(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt``, retrying while another connection holds the write lock."""
        give_up_at = time.monotonic() + self._busy_timeout
        pause = 0.001
        while True:
            try:
                return attempt()
            except sqlite3.Error as exc:
                if not self._busy(exc):
                    raise self._error(exc) from None
                if time.monotonic() >= give_up_at:
                    raise BackendUnavailable(
                        f"sqlite database {self.path} stayed locked by another connection for "
                        f"{self._busy_timeout:g}s (busy_timeout)"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def _write(self, body: Callable[["_Tx"], T], *, notify: bool = False) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction, retried while busy."""

        def attempt() -> T:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._rows.check(conn)
                tx = _Tx(conn, self._clock(), self._windows(), self._events, self._rows)
                result = body(tx)
                tx.flush()
                conn.execute("COMMIT")
                return result
            except BaseException:
                self._rows.forget()  # they may hold this transaction's uncommitted changes
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        with self._lock:
            result = self._retry_busy(attempt)
        if notify:
            self._wakeup.notify()
        return result

    def _read(self, body: Callable[["_Tx"], T]) -> T:
        """Run ``body`` in one read transaction (a consistent snapshot)."""

        def attempt() -> T:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                return body(_Tx(conn, self._clock(), self._windows(), self._events))
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

        with self._lock:
            return self._retry_busy(attempt)

    def _windows(self) -> tuple[float, float]:
        return (self._metrics_window, self._key_metrics_window)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- the contract -----------------------------------------------------------------

    def now(self) -> float:
        return self._read(lambda tx: tx.database_now())

    def enqueue_many(self, queue: str, messages: Sequence[Message], settings: QueueSettings) -> list[str]:
        return self._write(lambda tx: tx.enqueue_many(queue, messages, settings), notify=True)

    def lease(
        self, queue: str, limit: int, per_key: int, visibility_timeout: float, settings: QueueSettings
    ) -> LeaseResult:
        self._local.seen = self._wakeup.generation
        result = self._write(lambda tx: tx.lease(queue, limit, per_key, visibility_timeout, settings))
        if result.leases:
            self._local.step = WAIT_FIRST_STEP
        return result

    def ack_many(self, leases: Sequence[Lease]) -> list[bool]:
        return self._write(lambda tx: [tx.ack(lease) for lease in leases], notify=True)

    def nack(
        self, lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings
    ) -> bool:
        return self._write(
            lambda tx: tx.nack(lease, delay=delay, dead=dead, reason=reason, settings=settings), notify=True
        )

    def release_many(self, leases: Sequence[Lease]) -> list[bool]:
        return self._write(lambda tx: tx.release_many(leases), notify=True)

    def extend(self, lease: Lease, visibility_timeout: float) -> float | None:
        return self._write(lambda tx: tx.extend(lease, visibility_timeout))

    def extend_many(self, leases: Sequence[Lease], visibility_timeouts: Sequence[float]) -> list[float | None]:
        return self._write(
            lambda tx: [tx.extend(lease, timeout) for lease, timeout in zip(leases, visibility_timeouts)]
        )

    def set_interval(self, queue: str, key: str, seconds: float | None) -> None:
        self._write(lambda tx: tx.set_interval(queue, key, seconds), notify=True)

    def set_paused(self, queue: str, key: str | None, paused: bool) -> None:
        self._write(lambda tx: tx.set_paused(queue, key, paused), notify=True)

    def stats(self, queue: str) -> QueueStats:
        return self._read(lambda tx: tx.stats(queue))

    def queues(self) -> list[str]:
        return self._read(
            lambda tx: [name for (name,) in tx.db.execute("SELECT name FROM queues WHERE held_messages ORDER BY name")]
        )

    def dead_letters(self, queue: str, limit: int, offset: int) -> list[DeadLetter]:
        return self._read(lambda tx: tx.dead_letters(queue, limit, offset))

    def replay(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> int:
        return self._write(lambda tx: tx.replay(queue, ids, position), notify=True)

    def purge(self, queue: str, dead: bool) -> int:
        """Deletes in transactions of at most ``PURGE_CHUNK`` messages, so other
        connections write between them; each leaves the queue consistent. It deletes at
        most as many messages as were there when it started: messages enqueued meanwhile
        may be among them (in place of as many older ones)."""
        deleted, budget = 0, None
        while True:
            chunk_deleted, budget = self._write(
                lambda tx, budget=budget: tx.purge_chunk(queue, dead, budget, PURGE_CHUNK)
            )
            deleted += chunk_deleted
            if budget <= 0 or not chunk_deleted:
                return deleted

    def bind(self, exchange: str, queue: str) -> None:
        self._write(lambda tx: tx.db.execute("INSERT OR IGNORE INTO bindings VALUES (?, ?)", (exchange, queue)))

    def unbind(self, exchange: str, queue: str) -> None:
        self._write(lambda tx: tx.db.execute("DELETE FROM bindings WHERE exchange = ? AND queue = ?", (exchange, queue)))

    def bound_queues(self, exchange: str) -> list[str]:
        return self._read(
            lambda tx: [
                name for (name,) in tx.db.execute("SELECT queue FROM bindings WHERE exchange = ? ORDER BY queue", (exchange,))
            ]
        )

    def metrics(self, queue: str, minutes: int, key: str | None) -> list[MinuteMetrics]:
        return self._read(lambda tx: tx.metrics(queue, minutes, key))

    def keys(self, queue: str, limit: int, sort: KeySort) -> list[KeyInfo]:
        return self._read(lambda tx: tx.keys(queue, limit, sort))

    def key_info(self, queue: str, key: str) -> KeyInfo:
        return self._read(lambda tx: tx.key_info(queue, key))

    def key_facts(self, queue: str, keys: Sequence[str]) -> list[KeyFacts]:
        return self._read(lambda tx: tx.key_facts(queue, keys))

    def head_times(self, queue: str, keys: Sequence[str]) -> tuple[float, list[float | None]]:
        def read(tx: "_Tx") -> tuple[float, list[float | None]]:
            tx.queue(queue, create=False)  # the queue's clock
            times = []
            for key in keys:
                row = tx.db.execute(
                    "SELECT enqueued_at FROM messages WHERE queue = ? AND key = ? AND state = 'ready' "
                    "ORDER BY priority, seq LIMIT 1",
                    (queue, key),
                ).fetchone()
                times.append(None if row is None else row[0])
            return tx.now, times

        return self._read(read)

    def backlog_keys(self, queue: str, offset: int, count: int) -> list[str]:
        return self._read(
            lambda tx: [
                key for (key,) in tx.db.execute(
                    "SELECT key FROM keys WHERE queue = ? AND count > 0 ORDER BY count DESC, key LIMIT ? OFFSET ?",
                    (queue, count, offset),
                )
            ]
        )

    def subscribe(self, queue: str) -> EventSubscription:
        if not self._events:
            raise ConfigurationError("events are off for this broker; connect with events=True to subscribe")
        last = self._read(lambda tx: tx.db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])
        return _SQLiteSubscription(self, queue, last)

    def wait(self, queue: str, timeout: float) -> None:
        """Sleep one backoff step (5 ms doubling to 100 ms, at most ``timeout``), or until
        this process changes the database. Other processes' changes are seen at the next
        poll."""
        step = getattr(self._local, "step", WAIT_FIRST_STEP)
        seen = getattr(self._local, "seen", None)
        with self._wakeup.condition:
            if seen is None or self._wakeup.generation == seen:
                self._wakeup.condition.wait(max(0.0, min(timeout, step)))
            self._local.seen = self._wakeup.generation
        self._local.step = min(step * 2, WAIT_MAX_STEP)


class _SQLiteSubscription(EventSubscription):
    """Tails the events table from the id that was last when it subscribed."""

    def __init__(self, backend: SQLiteBackend, queue: str, last: int) -> None:
        self._backend = backend
        self._queue = queue
        self._last = last

    def get(self, timeout: float) -> list[Event]:
        give_up_at = time.monotonic() + timeout
        while True:
            rows = self._backend._read(lambda tx: tx.db.execute(HOT_QUERIES["events_after"], (self._last, self._queue)).fetchall())
            if rows:
                self._last = rows[-1]["id"]
                return [Event(row["type"], self._queue, row["message_id"], row["key"], row["at"]) for row in rows]
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(EVENTS_POLL, remaining))

    def close(self) -> None:
        """Nothing to release: the subscription is only a position in the table."""


# Statements whose columns vary, built once per set of columns (a handful of sets).
@functools.cache
def _message_update(columns: tuple[str, ...]) -> str:
    return f"UPDATE messages SET {', '.join(c + ' = ?' for c in columns)} WHERE id = ?"


@functools.cache
def _key_update(columns: tuple[str, ...]) -> str:
    return f"UPDATE keys SET {', '.join(c + ' = ?' for c in columns)} WHERE queue = ? AND key = ?"


@functools.cache
def _message_insert(extra_columns: tuple[str, ...]) -> str:
    return (
        "INSERT INTO messages (id, queue, key, payload, priority, seq, enqueued_at, headers, dedup_id, "
        f"at_head, state, not_before{''.join(', ' + c for c in extra_columns)}) "
        f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?{', ?' * len(extra_columns)})"
    )


def _message_id() -> str:
    """A fresh message id: 32 hex digits like a uuid4's, the time in milliseconds first and
    then 80 random bits, so that new ids go to the end of the id index (whose last pages
    stay cached however many messages the table holds) instead of anywhere in it."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class _RowCache:
    """Queue and key rows as this connection last committed them. The next write
    transaction reuses them instead of reading them again, unless another connection
    (of any process) committed in between, which ``PRAGMA data_version`` tells."""

    # More key rows than this and the cache starts again empty (it holds recent keys only).
    KEYS_KEPT = 10_000

    def __init__(self) -> None:
        self.queues: dict[str, _QueueRow] = {}
        self.keys: dict[tuple[str, str], _KeyRow] = {}
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None

    def check(self, conn: sqlite3.Connection) -> None:
        """Called first in a write transaction (the write lock held, so nobody else commits
        until it ends): drop every row if they may be out of date."""
        [(version,)] = conn.execute("PRAGMA data_version").fetchall()
        if conn is not self._conn or version != self._version or len(self.keys) > self.KEYS_KEPT:
            self.forget()
            self._conn, self._version = conn, version

    def forget(self) -> None:
        self.queues.clear()
        self.keys.clear()
        self._conn = self._version = None


class _Tx:
    """The engine's operations inside one open transaction, mirroring the memory model
    function by function (see sharded_broker/backends/memory.py)."""

    def __init__(
        self, db: sqlite3.Connection, now: float, windows: tuple[float, float], events: bool,
        rows: _RowCache | None = None,
    ) -> None:
        """windows: (metrics_window, key_metrics_window); rows: the rows committed by the
        last write transaction, still current (none for a read transaction)."""
        self.db = db
        self.now = now
        rows = rows or _RowCache()
        self._queues = rows.queues  # every queue row known, read now or earlier
        self._used_queues: dict[str, _QueueRow] = {}  # the ones this transaction uses (and writes)
        self._new_queues: set[str] = set()
        self._keys = rows.keys
        self._changed_keys: dict[tuple[str, str], _KeyRow] = {}
        self._metrics_window, self._key_metrics_window = windows
        self._events_on = events
        # (queue, '' or '+key', minute) -> counts in the order of COUNTERS, written by flush().
        self._counts: dict[tuple[str, str, float], list[int]] = {}
        self._events: list[tuple[str, str, str, str | None, float]] = []

    def _record(self, q: _QueueRow, counter: str, mid: str, key: str | None) -> None:
        """Count one lifecycle step of a message and, with events on, publish it."""
        minute = minute_of(self.now)
        if q.open_minute != minute:
            self._close_minute(q)
            q.open_minute = minute
        name = "open_" + counter
        setattr(q, name, getattr(q, name) + 1)
        if key is not None:
            row = self._key(q, key)
            if row.open_minute != minute:
                self._close_key_minute(q.name, key, row)
                self._update_key(q, key, open_minute=minute)
            self._update_key(q, key, **{name: getattr(row, name) + 1})
        if self._events_on:
            self._events.append((q.name, counter, mid, key, self.now))


    def _forget_key_minutes(self, queue: str, limit: int) -> None:
        """Forget the counts of up to ``limit`` keys whose open minute left the key
        metrics window (keys not touched since)."""
        stale = self.db.execute(
            HOT_QUERIES["key_minutes_expired"], (queue, expired_before(self.now, self._key_metrics_window), limit)
        ).fetchall()
        for (key,) in stale:
            row = self._keys.get((queue, key))
            if row is not None:  # the cached row must match the table again
                row.close_minute()
                row.stored_values = row.values()

    def _close_key_minute(self, queue: str, key: str, row: _KeyRow) -> None:
        """Move a key's counts of its open minute to the metrics rows written at the end of
        the transaction (the caller writes the key row)."""
        if row.open_minute is not None:
            counts = self._counts.setdefault((queue, "+" + key, row.open_minute), [0] * len(COUNTERS))
            for index, count in enumerate(row.open_counts()):
                counts[index] += count
        row.close_minute()

    def _close_minute(self, q: _QueueRow) -> None:
        """Move the queue-wide counts of its open minute to the metrics rows written at the
        end of the transaction."""
        if q.open_minute is not None:
            counts = self._counts.setdefault((q.name, "", q.open_minute), [0] * len(COUNTERS))
            for index, count in enumerate(q.open_counts()):
                counts[index] += count
        q.close_minute()

    def _one(self, name: str, *args: Any) -> tuple | None:
        return self.db.execute(HOT_QUERIES[name], args).fetchone()

    def database_now(self) -> float:
        """The clock of the whole file: never behind any queue's (a few rows: one per queue)."""
        [(latest,)] = self.db.execute("SELECT MAX(last_now) FROM queues").fetchall()
        return max(self.now, latest or 0.0)

    # -- queue rows -----------------------------------------------------------------

    def queue(self, name: str, *, create: bool) -> _QueueRow | None:
        q = self._used_queues.get(name)
        if q is not None:
            return q
        q = self._queues.get(name)
        if q is None:
            row = self.db.execute(QUEUE_SELECT, (name,)).fetchone()
            if row is not None:
                q = _QueueRow(name, *row)
            elif create:
                q = _QueueRow(name)
                self._new_queues.add(name)
            else:
                return None
            self._queues[name] = q
        # One clock per queue: never behind a time already written for it (by any
        # process, whatever its own clock says).
        self.now = max(self.now, q.last_now)
        self._used_queues[name] = q
        return q

    def flush_keys(self) -> None:
        """Write the key rows changed since the last call."""
        for (queue, key), row in self._changed_keys.items():
            row.changed = False
            if row.holds_nothing():
                self._close_key_minute(queue, key, row)  # the row goes: its counts go to the metrics table
                if row.stored:
                    self.db.execute("DELETE FROM keys WHERE queue = ? AND key = ?", (queue, key))
                    row.stored = False
            elif row.stored:
                values = row.values()
                changed = [(name, value) for name, value, old in zip(_KeyRow.FIELDS, values, row.stored_values)
                           if value != old]
                if changed:
                    self.db.execute(
                        _key_update(tuple(name for name, _ in changed)), (*(value for _, value in changed), queue, key)
                    )
                row.stored_values = values
            else:
                self.db.execute(KEY_INSERT, (queue, key, *row.values()))
                row.stored, row.stored_values = True, row.values()
        self._changed_keys.clear()

    def _ready_key(self, queue: str) -> tuple | None:
        """The key first in the ready order (key, ready_at, ready_order), or None."""
        self.flush_keys()
        return self._one("ready_key", queue)

    def flush(self) -> None:
        self.flush_keys()
        for q in self._used_queues.values():
            q.last_now = max(q.last_now, self.now)
            values = QUEUE_VALUES(q)
            if q.name in self._new_queues:
                self.db.execute(QUEUE_INSERT, (q.name, *values))
            else:
                self.db.execute(QUEUE_UPDATE, (*values, q.name))
        self._new_queues.clear()
        created: set[str] = set()
        for (queue, metric_key, minute), counts in self._counts.items():
            [(total,)] = self.db.execute(METRICS_UPSERT, (queue, metric_key, minute, *counts)).fetchall()
            if total == sum(counts):
                created.add(queue)
        # Expired rows are cleaned only when rows were created: the table then never grows
        # faster than it is cleaned, and most transactions skip the lookup.
        for queue in created:
            forgotten = self.db.execute(
                HOT_QUERIES["metrics_expired"], (queue, expired_before(self.now, self._metrics_window))
            ).rowcount
            if self._key_metrics_window < self._metrics_window:
                self.db.execute(
                    HOT_QUERIES["metrics_expired_keys"], (queue, expired_before(self.now, self._key_metrics_window))
                )
            if forgotten < METRICS_SWEEP_LIMIT:
                self._forget_key_minutes(queue, METRICS_SWEEP_LIMIT - forgotten)
        self._counts.clear()
        if self._events:
            self.db.executemany("INSERT INTO events (queue, type, message_id, key, at) VALUES (?, ?, ?, ?, ?)", self._events)
            [(last,)] = self.db.execute("SELECT last_insert_rowid()").fetchall()
            self.db.execute(HOT_QUERIES["events_trim"], (last - EVENTS_KEPT,))
            self._events.clear()

    # -- messages and keys ----------------------------------------------------------

    def _update(self, mid: str, **columns: Any) -> None:
        self.db.execute(_message_update(tuple(columns)), (*columns.values(), mid))

    def _key(self, q: _QueueRow, key: str) -> _KeyRow:
        """The key's row (an empty one, not stored, for a key without a row)."""
        row = self._keys.get((q.name, key))
        if row is None:
            found = self.db.execute(KEY_SELECT, (q.name, key)).fetchone()
            row = _KeyRow(*found, stored=True, stored_values=tuple(found)) if found is not None else _KeyRow()
            self._keys[(q.name, key)] = row
        return row

    def _update_key(self, q: _QueueRow, key: str, **columns: Any) -> _KeyRow:
        row = self._key(q, key)
        for name, value in columns.items():
            setattr(row, name, value)
        if not row.changed:
            row.changed = True
            self._changed_keys[(q.name, key)] = row
        return row

    def _count_key(self, q: _QueueRow, key: str) -> None:
        row = self._key(q, key)
        self._update_key(q, key, count=row.count + 1)
        if row.count == 1:
            q.keys += 1

    def _uncount_key(self, q: _QueueRow, key: str, by: int = 1) -> None:
        row = self._key(q, key)
        self._update_key(q, key, count=row.count - by)
        if not row.count:
            q.keys -= 1
            if not row.slots:
                self._drop_key(q, key)

    def _drop_key(self, q: _QueueRow, key: str) -> None:
        """The key has no messages and no slots: keep only what outlives it (interval,
        last delivery, pause); its row goes when it holds nothing (flush_keys)."""
        self._update_key(q, key, ready_at=None, ready_order=None)

    def _set_state(self, q: _QueueRow, old: str, new: str, mid: str, **columns: Any) -> None:
        q.count(old, -1)
        q.count(new, +1)
        self._update(mid, state=new, **columns)

    def _schedule(
        self, q: _QueueRow, key: str, now: float, *, keep_place: bool, settings: QueueSettings | None = None
    ) -> None:
        """Give ``key`` its place in the ready order if it has a head message (memory:
        ``_schedule``); ``keep_place`` keeps a waiting key's earlier time unless its head
        holds it; with ``settings``, a key not waiting whose slots are all in use, or that
        is paused, gets no place."""
        row = self._key(q, key)
        ready_at = row.ready_at
        if not row.count and not row.slots:
            return
        if settings is not None and ready_at is None and (row.slots >= settings.key_concurrency or row.paused):
            return
        head = self._one("key_next_time", q.name, key)
        if head is None:
            if ready_at is not None:
                self._update_key(q, key, ready_at=None, ready_order=None)
            return
        not_before, entered_at = head
        holds_until = not_before if not_before > entered_at else 0.0
        at = max(now, holds_until)
        if keep_place and ready_at is not None:
            at = max(ready_at, holds_until)
        if at == ready_at:
            return
        self._update_key(q, key, ready_at=at, ready_order=q.order())

    def _place(self, q: _QueueRow, old_state: str, mid: str, key: str | None, **columns: Any) -> None:
        """Put a message (whose seq is set or given) into its key's order or the lane."""
        columns["entered_at"] = self.now
        if key is None:
            columns["entered_order"] = q.order()
            q.lane_empty = False
        self._set_state(q, old_state, "ready", mid, **columns)

    def _delay(self, q: _QueueRow, old_state: str, mid: str, due: float, **columns: Any) -> None:
        self._set_state(q, old_state, "delayed", mid, not_before=due, timer_order=q.order(), **columns)

    def _promote_due(self, q: _QueueRow, settings: QueueSettings | None) -> None:
        if not q.delayed:
            return
        due = self.db.execute(HOT_QUERIES["due_delayed"], (q.name, self.now)).fetchall()
        for mid, key, seq, at_head in due:
            columns = {} if seq is not None else {"seq": q.next_seq(bool(at_head))}
            self._place(q, "delayed", mid, key, **columns)
            if key is not None:
                self._schedule(q, key, self.now, keep_place=True, settings=settings)

    def _expire_leases(self, q: _QueueRow, settings: QueueSettings) -> None:
        while q.leased:
            row = self._one("expired_lease", q.name, self.now)
            if row is None:
                return
            self._fail(q, row, settings, delay=0.0, dead_reason=None, why="lease expired")

    def _requeue(
        self, q: _QueueRow, mid: str, key: str | None, seq: int | None, delay: float, position: RetryPosition,
        **columns: Any,
    ) -> None:
        columns["token"] = ""
        if position == "tail":
            seq = None
            columns.update(seq=None, at_head=0)
        if key is not None and position == "head":
            # Back to its place, holding the key until it is delivered again.
            self._place(q, "leased", mid, key, not_before=self.now + delay, **columns)
        elif delay > 0:
            self._delay(q, "leased", mid, self.now + delay, **columns)
        else:
            if seq is None:
                columns["seq"] = q.next_seq(False)
            self._place(q, "leased", mid, key, not_before=self.now, **columns)

    def _dead_letter(self, q: _QueueRow, mid: str, key: str | None, reason: str) -> None:
        q.next_dead += 1
        self._set_state(q, "leased", "dead", mid, token="", reason=reason, died_at=self.now, dead_order=q.next_dead)
        if key is not None:
            self._uncount_key(q, key)

    def _fail(
        self, q: _QueueRow, row: tuple, settings: QueueSettings, *, delay: float, dead_reason: str | None, why: str
    ) -> None:
        """A leased message failed: retry or dead-letter it, and return the rest of its batch."""
        mid, key, seq, attempts = row["id"], row["key"], row["seq"], row["attempts"]
        batch_id, batch_index = row["batch_id"], row["batch_index"]
        followers = self._followers(batch_id, batch_index)
        if dead_reason is not None:
            self._dead_letter(q, mid, key, dead_reason)
            self._record(q, "dead", mid, key)
        elif settings.max_deliveries is not None and attempts >= settings.max_deliveries:
            self._dead_letter(
                q, mid, key, f"{why} after {attempts} deliveries (max_deliveries={settings.max_deliveries})"
            )
            self._record(q, "dead", mid, key)
        else:
            self._requeue(q, mid, key, seq, delay, settings.retry_position)
            self._record(q, "retried", mid, key)
        self._return_unprocessed(q, key, followers)
        self._settled(q, key, batch_id)

    def _release(self, q: _QueueRow, row: tuple) -> None:
        """Give a leased message back uncounted, with the rest of its batch (memory: ``_release``)."""
        batch_id, batch_index = row["batch_id"], row["batch_index"]
        followers = self._followers(batch_id, batch_index)
        self._return_unprocessed(q, row["key"], [(row["id"], row["seq"]), *followers])
        self._settled(q, row["key"], batch_id)

    def _followers(self, batch_id: str, batch_index: int) -> list[tuple[str, int]]:
        """(id, seq) of the later unsettled messages of a batch ('': a batch of one)."""
        if not batch_id:
            return []
        return self.db.execute(HOT_QUERIES["batch_followers"], (batch_id, batch_index)).fetchall()

    def _return_unprocessed(self, q: _QueueRow, key: str | None, messages: Sequence[tuple[str, int]]) -> None:
        """Back to their places, in order; they were never processed, so their deliveries
        do not count."""
        for mid, seq in messages:
            self.db.execute("UPDATE messages SET attempts = attempts - 1 WHERE id = ?", (mid,))
            self._requeue(q, mid, key, seq, 0.0, "head")

    def _settled(self, q: _QueueRow, key: str | None, batch_id: str) -> None:
        """Release the key's slot once the last message of a batch is settled."""
        if key is None or (batch_id and self._one("batch_left", batch_id) is not None):
            return
        row = self._key(q, key)
        if not row.slots:
            return
        self._update_key(q, key, slots=row.slots - 1)
        if not row.slots and not row.count:
            self._drop_key(q, key)
            return
        self._schedule(q, key, self.now, keep_place=False)

    def _current(self, lease: Lease) -> tuple | None:
        row = self._one("message", lease.id)
        if row is None or row["queue"] != lease.queue or row["state"] != "leased" or row["token"] != lease.token:
            return None
        return row

    def _lease_record(
        self, q: _QueueRow, row: tuple, vt: float, batch_id: str, batch_index: int, alone: bool = True
    ) -> Lease:
        """Lease one ready message; ``alone``: as a batch of one, stored without a batch id."""
        mid, attempts = row["id"], row["attempts"] + 1
        token = uuid.uuid4().hex
        deadline = self.now + vt
        self._set_state(
            q, "ready", "leased", mid, attempts=attempts, token=token, deadline=deadline,
            batch_id="" if alone else batch_id,
            batch_index=batch_index, timer_order=q.order(),
        )
        self._record(q, "delivered", mid, row["key"])
        return Lease(
            queue=q.name,
            id=mid,
            key=row["key"],
            payload=bytes(row["payload"]),
            priority=row["priority"],
            attempts=attempts,
            headers=json.loads(row["headers"]),
            token=token,
            deadline=deadline,
            enqueued_at=row["enqueued_at"],
            batch_id=batch_id,
            dedup_id=row["dedup_id"],
        )

    def _readable(self, q: _QueueRow, row: tuple) -> bool:
        """Whether a ready row's headers can be read. A row damaged behind the engine's
        back is dead-lettered with a reason (its headers reset) instead of failing every
        lease and blocking the queue."""
        try:
            if isinstance(json.loads(row["headers"]), dict):
                return True
        except (TypeError, ValueError):
            pass
        q.next_dead += 1
        self._set_state(
            q, "ready", "dead", row["id"], headers="{}", token="", died_at=self.now, dead_order=q.next_dead,
            reason="corrupted record: its headers could not be read, so it was dead-lettered",
        )
        if row["key"] is not None:
            self._uncount_key(q, row["key"])
        return False

    def _expire_dedup(self, q: _QueueRow, settings: QueueSettings) -> None:
        if settings.unique_while_pending:
            self.db.execute(HOT_QUERIES["dedup_expired_done"], (q.name, self.now))
            self.db.execute(HOT_QUERIES["dedup_renew_pending"], (self.now + settings.dedup_window, q.name, self.now))
        else:
            self.db.execute(HOT_QUERIES["dedup_expired"], (q.name, self.now))

    def _dedup_hit(self, q: _QueueRow, dedup_id: str, settings: QueueSettings) -> str | None:
        row = self._one("dedup", q.name, dedup_id)
        if row is None:
            return None
        first_id = row["message_id"]
        if settings.unique_while_pending:
            state = self.db.execute("SELECT state FROM messages WHERE id = ?", (first_id,)).fetchone()
            return first_id if state is not None and state["state"] in ("ready", "delayed") else None
        return first_id if row["expires"] > self.now else None

    # -- operations -----------------------------------------------------------------

    def enqueue_many(self, queue: str, messages: Sequence[Message], settings: QueueSettings) -> list[str]:
        q = self.queue(queue, create=True)
        q.held_messages = 1
        now = self.now
        # Due delayed messages entered their keys' order when they fell due: before
        # anything enqueued now.
        self._promote_due(q, settings)
        ids: list[str] = []
        if any(m.dedup_id is not None for m in messages):
            self._expire_dedup(q, settings)
        for m in messages:
            if m.dedup_id is not None:
                first = self._dedup_hit(q, m.dedup_id, settings)
                if first is not None:
                    ids.append(first)
                    continue
            mid = _message_id()
            if m.key is not None:
                self._count_key(q, m.key)
            if m.dedup_id is not None:
                self.db.execute(
                    "INSERT OR REPLACE INTO dedup (queue, dedup_id, message_id, expires) VALUES (?, ?, ?, ?)",
                    (queue, m.dedup_id, mid, now + settings.dedup_window),
                )
            holds_key = m.at_head and m.key is not None
            columns: dict[str, Any] = {}
            if m.delay > 0 and not holds_key:
                state, seq, not_before = "delayed", None, now + m.delay
                columns["timer_order"] = q.order()
            else:
                state, seq, not_before = "ready", q.next_seq(m.at_head), now + m.delay
                columns["entered_at"] = now
                if m.key is None:
                    columns["entered_order"] = q.order()
                    q.lane_empty = False
            q.count(state, +1)
            self.db.execute(
                _message_insert(tuple(columns)),
                (
                    mid, queue, m.key, m.payload, m.priority, seq, now,
                    json.dumps(dict(m.headers), separators=(",", ":")) if m.headers else "{}", m.dedup_id,
                    int(m.at_head), state, not_before, *columns.values(),
                ),
            )
            if state == "ready" and m.key is not None:
                self._schedule(q, m.key, now, keep_place=True, settings=settings)
            self._record(q, "enqueued", mid, m.key)
            ids.append(mid)
        return ids

    def lease(
        self, queue: str, limit: int, per_key: int, visibility_timeout: float, settings: QueueSettings
    ) -> LeaseResult:
        q = self.queue(queue, create=True)
        now = self.now
        self._promote_due(q, settings)
        self._expire_leases(q, settings)
        leases: list[Lease] = []
        while len(leases) < limit and not q.paused:
            entry = self._ready_key(queue)
            lane_head = None if q.lane_empty else self._one("lane_head", queue)
            q.lane_empty = lane_head is None
            key_due = entry is not None and entry["ready_at"] <= now
            if lane_head is not None and (
                not key_due
                or (lane_head["entered_at"], lane_head["entered_order"]) < (entry["ready_at"], entry["ready_order"])
            ):
                if self._readable(q, lane_head):
                    leases.append(self._lease_record(q, lane_head, visibility_timeout, lane_head["id"], 0))
                continue
            if not key_due:
                break
            leases.extend(self._serve_key(q, entry["key"], min(per_key, limit - len(leases)), visibility_timeout, settings))
        return LeaseResult(leases, None if leases else self._retry_in(q))

    def _serve_key(self, q: _QueueRow, key: str, count: int, vt: float, settings: QueueSettings) -> list[Lease]:
        now = self.now
        row = self._key(q, key)
        slots, interval, last_delivery, paused = row.slots, row.interval, row.last_delivery, row.paused
        self._update_key(q, key, ready_at=None, ready_order=None)
        if paused or slots >= settings.key_concurrency:
            return []  # rescheduled on resume or when a slot frees
        if interval is None:
            interval = settings.interval
        if last_delivery is not None and last_delivery + interval > now:
            self._schedule(q, key, last_delivery + interval, keep_place=False)
            return []
        rows = self.db.execute(HOT_QUERIES["key_head"], (q.name, key, count)).fetchall()
        if not rows or rows[0]["not_before"] > now:
            self._schedule(q, key, now, keep_place=False)
            return []
        batch = []
        for row in rows:
            if row["not_before"] > now:
                break
            if not self._readable(q, row):
                # Dead-lettered: serve the key again from its new head.
                self._schedule(q, key, now, keep_place=False)
                return []
            batch.append(row)
        batch_id = batch[0]["id"]
        alone = len(batch) == 1
        leases = [self._lease_record(q, row, vt, batch_id, index, alone) for index, row in enumerate(batch)]
        slots += 1
        self._update_key(q, key, slots=slots, last_delivery=now if interval else None)
        if slots < settings.key_concurrency:
            self._schedule(q, key, now if not interval else now + interval, keep_place=False)
        return leases

    def _retry_in(self, q: _QueueRow) -> float | None:
        if q.paused:
            return None
        ready_key = self._ready_key(q.name)
        candidates = (
            ready_key["ready_at"] if ready_key else None,
            self._one("next_delayed", q.name)[0],
            self._one("next_deadline", q.name)[0],
        )
        times = [t for t in candidates if t is not None]
        return max(0.0, min(times) - self.now) if times else None

    def ack(self, lease: Lease) -> bool:
        # The token check and the delete in one statement.
        row = self.db.execute(HOT_QUERIES["ack"], (lease.id, lease.queue, lease.token)).fetchone()
        if row is None:
            return False
        q = self.queue(lease.queue, create=False)
        mid, (key, batch_id) = lease.id, row
        q.count("leased", -1)
        if key is not None:
            self._uncount_key(q, key)
        self._settled(q, key, batch_id)
        self._record(q, "acked", mid, key)
        return True

    def nack(
        self, lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings
    ) -> bool:
        row = self._current(lease)
        if row is None:
            return False
        q = self.queue(lease.queue, create=False)
        self._promote_due(q, settings)  # before a tail retry takes its seq
        dead_reason = (reason or "rejected") if dead else None
        self._fail(q, row, settings, delay=delay, dead_reason=dead_reason, why=reason or "nacked")
        return True

    def release_many(self, leases: Sequence[Lease]) -> list[bool]:
        was_current = [self._current(lease) is not None for lease in leases]
        for lease, given in zip(leases, was_current):
            # Still current unless an earlier release of this call returned it with its batch.
            row = self._current(lease) if given else None
            if row is not None:
                self._release(self.queue(lease.queue, create=False), row)
        return was_current

    def extend(self, lease: Lease, visibility_timeout: float) -> float | None:
        row = self._current(lease)
        if row is None:
            return None
        q = self.queue(lease.queue, create=False)  # before reading the clock: the queue's floor
        deadline = self.now + visibility_timeout
        if deadline != row["deadline"]:  # an unchanged deadline keeps its place in the expiry order
            self._update(lease.id, deadline=deadline, timer_order=q.order())
        return deadline

    def set_interval(self, queue: str, key: str, seconds: float | None) -> None:
        q = self.queue(queue, create=True)
        self._update_key(q, key, interval=seconds)
        self._schedule(q, key, self.now, keep_place=False)

    def set_paused(self, queue: str, key: str | None, paused: bool) -> None:
        q = self.queue(queue, create=True)
        if key is None:
            q.paused = int(paused)
            return
        self._update_key(q, key, paused=int(paused))
        if not paused:
            self._schedule(q, key, self.now, keep_place=False)

    def stats(self, queue: str) -> QueueStats:
        q = self.queue(queue, create=False) or _QueueRow(queue)
        oldest = self._one("oldest_ready", queue)[0]
        return QueueStats(
            queue=queue,
            ready=q.ready,
            leased=q.leased,
            delayed=q.delayed,
            dead=q.dead,
            keys=q.keys,
            oldest_age=max(0.0, self.now - oldest) if oldest is not None else 0.0,
            paused=bool(q.paused),
        )

    def dead_letters(self, queue: str, limit: int, offset: int) -> list[DeadLetter]:
        rows = self.db.execute(HOT_QUERIES["dead_letters"], (queue, limit, offset)).fetchall()
        return [
            DeadLetter(
                queue=queue,
                id=row["id"],
                key=row["key"],
                payload=bytes(row["payload"]),
                priority=row["priority"],
                attempts=row["attempts"],
                headers=json.loads(row["headers"]),
                reason=row["reason"],
                enqueued_at=row["enqueued_at"],
                died_at=row["died_at"],
                dedup_id=row["dedup_id"],
            )
            for row in rows
        ]

    def _dead_rows(self, queue: str, ids: Sequence[str] | None) -> Iterator[tuple]:
        if ids is None:
            yield from self.db.execute(
                "SELECT id, key, priority, seq FROM messages WHERE queue = ? AND state = 'dead' ORDER BY dead_order",
                (queue,),
            )
            return
        for mid in dict.fromkeys(ids):
            row = self.db.execute(
                "SELECT id, key, priority, seq FROM messages WHERE id = ? AND queue = ? AND state = 'dead'",
                (mid, queue),
            ).fetchone()
            if row is not None:
                yield row

    def replay(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> int:
        q = self.queue(queue, create=False)
        if q is None:
            return 0
        self._promote_due(q, None)  # before replayed messages take their seqs
        rows = sorted(self._dead_rows(queue, ids), key=lambda r: (r["priority"], r["seq"] or 0))
        if position == "head":
            rows.reverse()  # each takes a seq ahead of the previous one
        for mid, key, _, _ in rows:
            seq = q.next_seq(position == "head")
            if key is not None:
                self._count_key(q, key)
            self._place(q, "dead", mid, key, attempts=0, reason="", seq=seq, not_before=self.now)
            if key is not None:
                self._schedule(q, key, self.now, keep_place=True)
        return len(rows)

    def purge_chunk(self, queue: str, dead: bool, budget: int | None, chunk: int) -> tuple[int, int]:
        """Delete at most ``chunk`` (and at most ``budget``; None: as many as there are
        now) ready and delayed messages, or dead letters: (how many, budget left). Keys
        whose waiting messages are all gone leave the ready order; the others keep their
        place."""
        q = self.queue(queue, create=False)
        if q is None:
            return 0, 0
        if budget is None:
            budget = q.dead if dead else q.ready + q.delayed
        room = min(budget, chunk)
        if dead:
            deleted = self.db.execute(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE queue = ? AND state = 'dead' "
                "ORDER BY dead_order LIMIT ?)",
                (queue, room),
            ).rowcount
            q.dead -= deleted
            return deleted, budget - deleted
        deleted = 0
        touched: dict[str, int] = {}
        # One state at a time, in the order of that state's partial index.
        for state, order in (("ready", "key, priority, seq"), ("delayed", "not_before, timer_order")):
            rows = self.db.execute(
                f"SELECT id, key FROM messages WHERE queue = ? AND state = '{state}' ORDER BY {order} LIMIT ?",
                (queue, room - deleted),
            ).fetchall()
            self.db.executemany("DELETE FROM messages WHERE id = ?", [(mid,) for mid, _ in rows])
            q.count(state, -len(rows))
            deleted += len(rows)
            for _, key in rows:
                if key is not None:
                    touched[key] = touched.get(key, 0) + 1
        for key, n in touched.items():
            self._uncount_key(q, key, n)
            self._schedule(q, key, self.now, keep_place=True)
        return deleted, budget - deleted

    def metrics(self, queue: str, minutes: int, key: str | None) -> list[MinuteMetrics]:
        self.queue(queue, create=False)  # the queue's clock, and its open minute
        wanted = metric_minutes(self.now, minutes, self._metrics_window if key is None else self._key_metrics_window)
        rows = self.db.execute(
            HOT_QUERIES["metrics_range"], (queue, "" if key is None else "+" + key, wanted[0], wanted[-1])
        ).fetchall()
        found = {row["minute"]: tuple(row)[1:] for row in rows}
        q = self.queue(queue, create=False)
        open_row = q if key is None else self._key(q, key) if q is not None else None
        if open_row is not None and open_row.open_minute in wanted:
            stored = found.get(open_row.open_minute, (0,) * len(COUNTERS))
            found[open_row.open_minute] = tuple(a + b for a, b in zip(stored, open_row.open_counts()))
        return [MinuteMetrics(minute, *found.get(minute, (0,) * len(COUNTERS))) for minute in wanted]

    def keys(self, queue: str, limit: int, sort: KeySort) -> list[KeyInfo]:
        if sort == "backlog":
            return [self.key_info(queue, key) for (key,) in self.db.execute(HOT_QUERIES["keys_by_backlog"], (queue, limit))]
        infos = [self.key_info(queue, key) for (key,) in self.db.execute(HOT_QUERIES["keys_with_backlog"], (queue,))]
        infos.sort(key=lambda info: (-info.lag, info.key))
        return infos[:limit]

    def key_facts(self, queue: str, keys: Sequence[str]) -> list[KeyFacts]:
        """What diagnose() needs about each key (memory: ``key_facts``); self-contained, so
        that it reads only the indexes named in its queries: per key its row and head, then
        once for all keys the queue's leases in flight (for the keys holding a slot) and its
        delayed order (for the keys with nothing ready), at most WHY_READ_LIMIT rows each."""
        q = self.queue(queue, create=False)  # the queue's clock, and its pause
        now = self.now
        rows = {
            key: self.db.execute(
                "SELECT count, slots, ready_at, interval, last_delivery, paused FROM keys WHERE queue = ? AND key = ?",
                (queue, key),
            ).fetchone()
            for key in keys
        }
        heads: dict[str, HeadMessage | None] = {}
        for key in keys:
            first = self._one("key_head", queue, key, 1)
            heads[key] = None if first is None else HeadMessage(
                first["id"], first["priority"], first["attempts"], first["enqueued_at"], first["not_before"],
                len(first["payload"]),
            )
        waiting = {key for key, head in heads.items() if head is None}
        next_delayed: dict[str, float] = {}
        if waiting:
            # The queue's delayed order (index messages_delayed) up to each key's first entry.
            for due, owner in self.db.execute(
                "SELECT not_before, key FROM messages WHERE queue = ? AND state = 'delayed' "
                "ORDER BY not_before, timer_order LIMIT ?",
                (queue, WHY_READ_LIMIT),
            ):
                if owner in waiting and owner not in next_delayed:
                    next_delayed[owner] = due
                    if len(next_delayed) == len(waiting):
                        break
        holding = {key for key, row in rows.items() if row is not None and row["slots"]}
        batches: dict[str, dict[str, list[tuple]]] = {}
        if holding:
            # The queue's leases in flight (index messages_leased), grouped by key and batch.
            for lease_row in self.db.execute(
                "SELECT id, key, token, attempts, deadline, batch_id, batch_index FROM messages "
                "WHERE queue = ? AND state = 'leased' ORDER BY deadline, timer_order LIMIT ?",
                (queue, WHY_READ_LIMIT),
            ):
                if lease_row["key"] in holding:
                    by_batch = batches.setdefault(lease_row["key"], {})
                    by_batch.setdefault(lease_row["batch_id"] or lease_row["id"], []).append(lease_row)
        facts = []
        for key in keys:
            row = rows[key]
            holds = []
            for batch_id, members in batches.get(key, {}).items():
                members.sort(key=lambda r: r["batch_index"])
                first_left = members[0]
                # Messages are settled in batch order as a rule; the batch's size is not
                # stored, so it is counted up to its last unsettled message.
                size = members[-1]["batch_index"] + 1
                holds.append(HeldBatch(
                    batch_id=batch_id, message_id=first_left["id"], token=first_left["token"],
                    attempts=first_left["attempts"], deadline=first_left["deadline"], size=size,
                    settled=size - len(members),
                ))
            holds.sort(key=lambda hold: (hold.deadline, hold.message_id))
            facts.append(KeyFacts(
                queue=queue,
                key=key,
                now=now,
                queue_paused=bool(q.paused) if q is not None else False,
                key_paused=bool(row["paused"]) if row else False,
                backlog=row["count"] if row else 0,
                slots=row["slots"] if row else 0,
                head=heads[key],
                next_delayed=next_delayed.get(key),
                ready_at=row["ready_at"] if row else None,
                last_delivery=row["last_delivery"] if row else None,
                own_interval=row["interval"] if row else None,
                holds=tuple(holds),
            ))
        return facts

    def key_info(self, queue: str, key: str) -> KeyInfo:
        self.queue(queue, create=False)  # the queue's clock
        row = self.db.execute(
            "SELECT count, slots, interval, paused FROM keys WHERE queue = ? AND key = ?", (queue, key)
        ).fetchone()
        first = self._one("key_head", queue, key, 1)
        head = None
        if first is not None:
            head = HeadMessage(
                first["id"], first["priority"], first["attempts"], first["enqueued_at"], first["not_before"],
                len(first["payload"]),
            )
        return KeyInfo(
            queue=queue,
            key=key,
            backlog=row["count"] if row else 0,
            leased=row["slots"] if row else 0,
            lag=max(0.0, self.now - head.enqueued_at) if head is not None else 0.0,
            paused=bool(row["paused"]) if row else False,
            interval=row["interval"] if row else None,
            head=head,
        )
