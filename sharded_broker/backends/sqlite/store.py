"""The SQLite backend's store: one write or read transaction (:class:`Transaction`), and
each queue in it as the planner's store (:class:`QueueStore`, ``planner.Store``).

Queue and key rows are read at most once per transaction and written back at its end (and
kept for the next transaction of this connection while no other connection commits);
metrics counts are summed in memory and upserted at the end. docs/design.md ("SQLite")
describes the tables.
"""

from __future__ import annotations

import json
import operator
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from ...backend import METRICS_SWEEP_LIMIT, KeySort, expired_before, headers_text, metric_minutes, minute_of
from ...models import (
    COUNTERS, DeadLetter, HeadMessage, HeldBatch, KeyFacts, KeyInfo, Lease, Message, MessageInfo, MinuteMetrics,
    QueueStats,
)
from .. import planner
from ..planner import SEQ_ORIGIN
from . import sql
from .sql import OPEN_COUNTS, QUERIES

EVENTS_KEPT = 10_000
# Key rows read by one statement of Transaction.read_keys (a power of two).
KEYS_READ = 512


class _OpenMinute:
    """The metrics counts of one open minute, kept in a queue's or a key's row."""

    open_minute: float | None

    def open_counts(self) -> list[int]:
        return [getattr(self, name) for name in OPEN_COUNTS]

    def close_minute(self) -> None:
        self.open_minute = None
        for name in OPEN_COUNTS:
            setattr(self, name, 0)


@dataclass
class _QueueRow(_OpenMinute):
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
    # The values the table holds (empty: no row yet): an UPDATE names only the columns
    # that differ, so SQLite binds and writes fewer values.
    stored_values: tuple[Any, ...] = ()

    def order(self) -> int:
        self.next_order += 1
        return self.next_order

    def count(self, state: str, change: int) -> None:
        if state in ("ready", "delayed", "leased", "dead"):
            setattr(self, state, getattr(self, state) + change)


QUEUE_VALUES = operator.attrgetter(*sql.QUEUE_FIELDS)


@dataclass
class _KeyRow(_OpenMinute):
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
    weight: int | None = None  # None: weight 1
    round_turns: int = 0  # a weighted key's round in progress (round_at None: none)
    round_at: float | None = None
    round_order: int | None = None
    stored: bool = False  # whether the table holds the row
    changed: bool = False
    # The values the table holds: an UPDATE names only the columns that differ, as SQLite
    # rewrites the entries of every index over a column that an UPDATE names.
    stored_values: tuple[Any, ...] = ()

    def values(self) -> tuple[Any, ...]:
        return _KEY_VALUES(self)

    def holds_nothing(self) -> bool:
        return (
            not self.count and not self.slots and self.interval is None and self.last_delivery is None
            and not self.paused and self.weight is None
        )


_KEY_VALUES = operator.attrgetter(*sql.KEY_FIELDS)


def _key_row(found: Sequence[Any] | None) -> _KeyRow:
    """A key's row from its KEY_FIELDS as read (None: an empty row, not stored)."""
    if found is None:
        return _KeyRow()
    row = _KeyRow(*found)
    row.stored, row.stored_values = True, tuple(found)
    return row


class _Message:
    """A message row as the planner reads it (``planner.StoredMessage``); rows read for a
    lease carry what the lease hands out too."""

    __slots__ = (
        "id", "key", "priority", "seq", "at_head", "state", "not_before", "attempts", "token", "deadline",
        "batch_id", "batch_index", "payload", "headers", "enqueued_at", "dedup_id", "entered_at", "entered_order",
        "ref",
    )

    def __init__(
        self, id: str, key: str | None, priority: int, seq: int | None, at_head: bool, state: str,
        not_before: float, attempts: int, token: str, deadline: float, batch_id: str, batch_index: int,
        payload: bytes = b"", headers: str = "{}", enqueued_at: float = 0.0, dedup_id: str | None = None,
        entered_at: float = 0.0, entered_order: int = 0, ref: str | None = None,
    ) -> None:
        self.id, self.key, self.priority, self.seq, self.at_head, self.state = id, key, priority, seq, at_head, state
        self.not_before, self.attempts, self.token, self.deadline = not_before, attempts, token, deadline
        self.batch_id, self.batch_index, self.payload, self.headers = batch_id, batch_index, payload, headers
        self.enqueued_at, self.dedup_id, self.entered_at, self.entered_order = enqueued_at, dedup_id, entered_at, entered_order
        self.ref = ref


def _head_message(row: Any) -> HeadMessage | None:
    """A key_head row as shown to people."""
    if row is None:
        return None
    return HeadMessage(
        row["id"], row["priority"], row["attempts"], row["enqueued_at"], row["not_before"], len(row["payload"])
    )


def _message_id() -> str:
    """A fresh message id: 32 hex digits like a uuid4's, the time in milliseconds first and
    then 80 random bits, so that new ids go to the end of the id index (whose last pages
    stay cached however many messages the table holds) instead of anywhere in it."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def _update_changed(
    db: sqlite3.Connection, statement: Callable[[tuple[int, ...]], str], values: tuple[Any, ...],
    stored: tuple[Any, ...], where: tuple[Any, ...],
) -> None:
    """UPDATE a queue's or a key's row with the fields whose values differ from the stored
    ones (none: no statement), by their positions in sql.QUEUE_FIELDS or sql.KEY_FIELDS."""
    changed = [index for index, (value, old) in enumerate(zip(values, stored)) if value != old]
    if changed:
        db.execute(statement(tuple(changed)), (*[values[index] for index in changed], *where))


class RowCache:
    """Queue and key rows as this connection last committed them. The next write
    transaction reuses them instead of reading them again, unless another connection
    (of any process) committed in between, which ``PRAGMA data_version`` tells."""

    # More key rows than this and the key rows start again empty (recent keys only).
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
        if conn is not self._conn or version != self._version:
            self.forget()
            self._conn, self._version = conn, version
        elif len(self.keys) > self.KEYS_KEPT:
            self.keys.clear()  # the queue rows stay: a few, and read by every transaction

    def forget(self) -> None:
        self.queues.clear()
        self.keys.clear()
        self._conn = self._version = None


class Transaction:
    """One open transaction: the rows it uses, its metrics counts and events, written by
    :meth:`flush` before it commits."""

    def __init__(
        self, db: sqlite3.Connection, now: float, windows: tuple[float, float], events: bool,
        rows: RowCache | None = None,
    ) -> None:
        """windows: (metrics_window, key_metrics_window); rows: the rows committed by the
        last write transaction, still current (none for a read transaction)."""
        self.db = db
        self.now = now
        rows = rows or RowCache()
        self._queues = rows.queues  # every queue row known, read now or earlier
        self._used_queues: dict[str, _QueueRow] = {}  # the ones this transaction uses (and writes)
        self._new_queues: set[str] = set()
        self._keys = self.key_rows = rows.keys  # every key row known, read now or earlier
        self._changed_keys: dict[tuple[str, str], _KeyRow] = {}
        self._metrics_window, self._key_metrics_window = windows
        self._events_on = events
        # (queue, '' or '+key', minute) -> counts in the order of COUNTERS, written by flush().
        self._counts: dict[tuple[str, str, float], list[int]] = {}
        self._events: list[tuple[str, str, str, str | None, float]] = []

    def one(self, name: str, *args: Any) -> Any:
        return self.db.execute(QUERIES[name], args).fetchone()

    def all(self, name: str, *args: Any) -> list[Any]:
        return self.db.execute(QUERIES[name], args).fetchall()

    def database_now(self) -> float:
        """The clock of the whole file: never behind any queue's (a few rows: one per queue)."""
        latest = self.one("database_now")[0]
        return max(self.now, latest or 0.0)

    # -- queue and key rows -----------------------------------------------------------

    def queue(self, name: str) -> _QueueRow | None:
        """The queue's row (None for a queue without one)."""
        q = self._known_queue(name)
        return None if q is None else self._use(q)

    def store(self, name: str) -> "QueueStore | None":
        """Queue ``name`` as the planner's store (None: a queue without a row)."""
        q = self.queue(name)
        return QueueStore(self, q) if q is not None else None

    def read_store(self, name: str) -> "QueueStore":
        """Queue ``name`` as the planner's store for reading: an empty one for a queue
        without a row (nothing is written for it)."""
        return self.store(name) or QueueStore(self, _QueueRow(name))

    def created_store(self, name: str) -> "QueueStore":
        """Queue ``name`` as the planner's store, its row created if it has none."""
        return QueueStore(self, self._use(self._known_queue(name) or self._new_queue(name)))

    def _known_queue(self, name: str) -> _QueueRow | None:
        q = self._used_queues.get(name) or self._queues.get(name)
        if q is None:
            row = self.db.execute(sql.QUEUE_SELECT, (name,)).fetchone()
            if row is not None:
                q = self._queues[name] = _QueueRow(name, *row)
                q.stored_values = tuple(row)
        return q

    def _new_queue(self, name: str) -> _QueueRow:
        q = self._queues[name] = _QueueRow(name)
        self._new_queues.add(name)
        return q

    def _use(self, q: _QueueRow) -> _QueueRow:
        if q.name not in self._used_queues:
            # One clock per queue: never behind a time already written for it (by any
            # process, whatever its own clock says).
            self.now = max(self.now, q.last_now)
            self._used_queues[q.name] = q
        return q

    def key(self, queue: str, key: str) -> _KeyRow:
        """The key's row (an empty one, not stored, for a key without a row)."""
        row = self._keys.get((queue, key))
        if row is None:
            found = self.db.execute(sql.KEY_SELECT, (queue, key)).fetchone()
            row = self._keys[(queue, key)] = _key_row(found)
        return row

    def read_keys(self, queue: str, keys: Iterable[str | None]) -> None:
        """Read the rows of the keys a batch call will use, those not known yet, in one
        statement per KEYS_READ keys instead of one each (with more keys than the row cache
        holds, most are not known)."""
        missing = [key for key in dict.fromkeys(keys) if key is not None and (queue, key) not in self._keys]
        if len(missing) < 2:
            return  # key() reads one as cheaply
        for start in range(0, len(missing), KEYS_READ):
            chunk = missing[start:start + KEYS_READ]
            # Padded (with its last key again) to a power of two: a handful of statements.
            count = 1 << (len(chunk) - 1).bit_length()
            wanted = (queue, *chunk, *[chunk[-1]] * (count - len(chunk)))
            found = {row[0]: row[1:] for row in self.db.execute(sql.keys_select(count), wanted)}
            for key in chunk:
                self._keys[(queue, key)] = _key_row(found.get(key))

    def changed_key(self, queue: str, key: str) -> _KeyRow:
        """The key's row, written back by :meth:`flush_keys` (the caller sets its fields)."""
        row = self._keys.get((queue, key)) or self.key(queue, key)
        if not row.changed:
            row.changed = True
            self._changed_keys[(queue, key)] = row
        return row

    def update_key(self, queue: str, key: str, **columns: Any) -> _KeyRow:
        row = self.changed_key(queue, key)
        for name, value in columns.items():
            setattr(row, name, value)
        return row

    def flush_keys(self) -> None:
        """Write the key rows changed since the last call."""
        for (queue, key), row in self._changed_keys.items():
            row.changed = False
            if row.holds_nothing():
                self._close_key_minute(queue, key, row)  # the row goes: its counts go to the metrics table
                if row.stored:
                    self.db.execute(QUERIES["key_delete"], (queue, key))
                    row.stored = False
            elif row.stored:
                values = row.values()
                _update_changed(self.db, sql.key_update, values, row.stored_values, (queue, key))
                row.stored_values = values
            else:
                self.db.execute(sql.KEY_INSERT, (queue, key, *row.values()))
                row.stored, row.stored_values = True, row.values()
        self._changed_keys.clear()

    def flush(self) -> None:
        self.flush_keys()
        for q in self._used_queues.values():
            q.last_now = max(q.last_now, self.now)
            values = QUEUE_VALUES(q)
            if q.name in self._new_queues:
                self.db.execute(sql.QUEUE_INSERT, (q.name, *values))
            else:
                _update_changed(self.db, sql.queue_update, values, q.stored_values, (q.name,))
            q.stored_values = values
        self._new_queues.clear()
        created: set[str] = set()
        for (queue, metric_key, minute), counts in self._counts.items():
            [(total,)] = self.db.execute(sql.METRICS_UPSERT, (queue, metric_key, minute, *counts)).fetchall()
            if total == sum(counts):
                created.add(queue)
        # Expired rows are cleaned only when rows were created: the table then never grows
        # faster than it is cleaned, and most transactions skip the lookup.
        for queue in created:
            forgotten = self.db.execute(
                QUERIES["metrics_expired"],
                (queue, expired_before(self.now, self._metrics_window), METRICS_SWEEP_LIMIT),
            ).rowcount
            if self._key_metrics_window < self._metrics_window:
                self.db.execute(
                    QUERIES["metrics_expired_keys"],
                    (queue, expired_before(self.now, self._key_metrics_window), METRICS_SWEEP_LIMIT),
                )
            if forgotten < METRICS_SWEEP_LIMIT:
                self._forget_key_minutes(queue, METRICS_SWEEP_LIMIT - forgotten)
        self._counts.clear()
        if self._events:
            self.db.executemany(QUERIES["events_insert"], self._events)
            [(last,)] = self.db.execute("SELECT last_insert_rowid()").fetchall()
            self.db.execute(QUERIES["events_trim"], (last - EVENTS_KEPT,))
            self._events.clear()

    # -- metrics and events -----------------------------------------------------------

    def record(self, q: _QueueRow, counter: str, mid: str, key: str | None) -> None:
        """Count one lifecycle step of a message and, with events on, publish it."""
        minute = minute_of(self.now)
        if q.open_minute != minute:
            self._close_minute(q)
            q.open_minute = minute
        name = "open_" + counter
        setattr(q, name, getattr(q, name) + 1)
        if key is not None:
            row = self.changed_key(q.name, key)
            if row.open_minute != minute:
                self._close_key_minute(q.name, key, row)
                row.open_minute = minute
            setattr(row, name, getattr(row, name) + 1)
        if self._events_on:
            self._events.append((q.name, counter, mid, key, self.now))

    def _forget_key_minutes(self, queue: str, limit: int) -> None:
        """Forget the counts of up to ``limit`` keys whose open minute left the key
        metrics window (keys not touched since)."""
        stale = self.all("key_minutes_expired", queue, expired_before(self.now, self._key_metrics_window), limit)
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

    # -- reads ------------------------------------------------------------------------

    def stats(self, queue: str) -> QueueStats:
        q = self.queue(queue) or _QueueRow(queue)
        oldest = self.one("oldest_ready", queue)[0]
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
                ref=row["ref"],
            )
            for row in self.all("dead_letters", queue, limit, offset)
        ]

    def metrics(self, queue: str, minutes: int, key: str | None) -> list[MinuteMetrics]:
        q = self.queue(queue)  # the queue's clock, and its open minute
        wanted = metric_minutes(self.now, minutes, self._metrics_window if key is None else self._key_metrics_window)
        rows = self.all("metrics_range", queue, "" if key is None else "+" + key, wanted[0], wanted[-1])
        found = {row["minute"]: tuple(row)[1:] for row in rows}
        open_row = q if key is None else self.key(queue, key) if q is not None else None
        if open_row is not None and open_row.open_minute in wanted:
            stored = found.get(open_row.open_minute, (0,) * len(COUNTERS))
            found[open_row.open_minute] = tuple(a + b for a, b in zip(stored, open_row.open_counts()))
        return [MinuteMetrics(minute, *found.get(minute, (0,) * len(COUNTERS))) for minute in wanted]

    def keys(self, queue: str, limit: int, sort: KeySort) -> list[KeyInfo]:
        if sort == "backlog":
            return [self.key_info(queue, key) for (key,) in self.all("keys_by_backlog", queue, limit)]
        infos = [self.key_info(queue, key) for (key,) in self.all("keys_with_backlog", queue)]
        infos.sort(key=lambda info: (-info.lag, info.key))
        return infos[:limit]

    def key_info(self, queue: str, key: str) -> KeyInfo:
        self.queue(queue)  # the queue's clock
        row = self.one("key_settings", queue, key)
        head = _head_message(self.one("key_head", queue, key, 1))
        return KeyInfo(
            queue=queue,
            key=key,
            backlog=row["count"] if row else 0,
            leased=row["slots"] if row else 0,
            lag=max(0.0, self.now - head.enqueued_at) if head is not None else 0.0,
            paused=bool(row["paused"]) if row else False,
            interval=row["interval"] if row else None,
            head=head,
            weight=(row["weight"] or 1) if row else 1,
        )

    def key_facts(self, queue: str, keys: Sequence[str]) -> list[KeyFacts]:
        return planner.key_facts(self.read_store(queue), keys)

    def head_times(self, queue: str, keys: Sequence[str]) -> tuple[float, list[float | None]]:
        self.queue(queue)  # the queue's clock
        heads = [self.one("key_head_enqueued_at", queue, key) for key in keys]
        return self.now, [None if head is None else head[0] for head in heads]

    def backlog_keys(self, queue: str, offset: int, count: int) -> list[str]:
        return [key for (key,) in self.all("keys_by_backlog_page", queue, count, offset)]

    def purge_chunk(self, queue: str, dead: bool, budget: int | None, chunk: int) -> tuple[int, int]:
        """Delete at most ``chunk`` (and at most ``budget``; None: as many as there are
        now) ready and delayed messages, or dead letters: (how many, budget left). Keys
        whose waiting messages are all gone leave the ready order; the others keep their
        place."""
        s = self.store(queue)
        if s is None:
            return 0, 0
        q = s.q
        if budget is None:
            budget = q.dead if dead else q.ready + q.delayed
        room = min(budget, chunk)
        if dead:
            deleted = self.db.execute(QUERIES["purge_dead"], (queue, room)).rowcount
            q.dead -= deleted
            return deleted, budget - deleted
        deleted = 0
        touched: dict[str, int] = {}
        for state, query in (("ready", "purge_ready"), ("delayed", "purge_delayed")):
            rows = self.all(query, queue, room - deleted)
            self.db.executemany(QUERIES["message_delete"], [(mid,) for mid, _ in rows])
            q.count(state, -len(rows))
            deleted += len(rows)
            for _, key in rows:
                if key is not None:
                    touched[key] = touched.get(key, 0) + 1
        for key, n in touched.items():
            s.uncount_key(key, n)
            planner.schedule(s, key, s.now, keep_place=True)
        return deleted, budget - deleted


class QueueStore:
    """One queue of a transaction as the planner's store (``planner.Store``)."""

    def __init__(self, tx: Transaction, q: _QueueRow) -> None:
        self.tx = tx
        self.q = self.seqs = q
        self.name = q.name
        self.now = tx.now
        self._db = tx.db
        self._keys = tx.key_rows

    def _key(self, key: str) -> _KeyRow:
        return self._keys.get((self.name, key)) or self.tx.key(self.name, key)

    def _changed_key(self, key: str) -> _KeyRow:
        return self.tx.changed_key(self.name, key)

    def _messages(self, name: str, *args: Any) -> list[_Message]:
        return [_Message(*row) for row in self._db.execute(QUERIES[name], args)]

    def _message(self, name: str, *args: Any) -> _Message | None:
        row = self.tx.one(name, *args)
        return _Message(*row) if row is not None else None

    def _update(self, mid: str, **columns: Any) -> None:
        self._db.execute(sql.message_update(tuple(columns)), (*columns.values(), mid))

    def _set_state(self, msg: _Message, state: str, **columns: Any) -> None:
        self.q.count(msg.state, -1)
        self.q.count(state, +1)
        self._update(msg.id, state=state, **columns)
        msg.state = state

    # -- counters and queue state

    def paused(self) -> bool:
        return bool(self.q.paused)

    def record(self, counter: str, message_id: str, key: str | None) -> None:
        self.tx.record(self.q, counter, message_id, key)

    # -- messages

    def count_key(self, key: str) -> None:
        row = self._changed_key(key)
        row.count += 1
        if row.count == 1:
            self.q.keys += 1

    def uncount_key(self, key: str, by: int = 1) -> None:
        row = self._changed_key(key)
        row.count -= by
        if not row.count:
            self.q.keys -= 1
            if not row.slots:
                self.drop_key(key)

    def message(self, message_id: str) -> _Message | None:
        return self._message("message_any", message_id, self.q.name)

    def message_by_ref(self, ref: str) -> _Message | None:
        return self._message("message_by_ref", self.q.name, ref)

    def message_info(self, msg: _Message) -> MessageInfo:
        leased_at, reason, died_at = self.tx.one("message_outcome", msg.id)
        return planner.describe(
            self.q.name, msg.id, msg.key, msg.state, priority=msg.priority, attempts=msg.attempts,
            enqueued_at=msg.enqueued_at, size=len(msg.payload), dedup_id=msg.dedup_id, not_before=msg.not_before,
            deadline=msg.deadline, leased_at=leased_at, reason=reason, died_at=died_at, ref=msg.ref,
        )

    def forget(self, msg: _Message) -> None:
        self._db.execute(QUERIES["message_delete"], (msg.id,))
        self.q.count(msg.state, -1)
        if msg.key is not None:
            self.uncount_key(msg.key)

    def insert(self, message: Message, *, state: str, seq: int | None, not_before: float) -> str:
        q, now = self.q, self.now
        mid = _message_id()
        if message.key is not None:
            self.count_key(message.key)
        columns: dict[str, Any] = {}
        if state == "delayed":
            columns["timer_order"] = q.order()
        else:
            columns["entered_at"] = now
            if message.key is None:
                columns["entered_order"] = q.order()
                q.lane_empty = False
        if message.ref is not None:
            self._db.execute(QUERIES["ref_taken"], (q.name, message.ref))
            columns["ref"] = message.ref
        q.count(state, +1)
        headers = headers_text(message.headers)
        self._db.execute(
            sql.message_insert(tuple(columns)),
            (
                mid, q.name, message.key, message.payload, message.priority, seq, now, headers, message.dedup_id,
                int(message.at_head), state, not_before, *columns.values(),
            ),
        )
        return mid

    def place(self, msg: _Message, /, **changes: Any) -> None:
        if msg.state == "dead" and msg.key is not None:
            self.count_key(msg.key)  # a replayed dead letter counts in its key again
        changes["entered_at"] = self.now
        if msg.key is None:
            changes["entered_order"] = self.q.order()
            self.q.lane_empty = False
        self._set_state(msg, "ready", **changes)

    def delay(self, msg: _Message, due: float, /, **changes: Any) -> None:
        self._set_state(msg, "delayed", not_before=due, timer_order=self.q.order(), **changes)

    def dead_letter(self, msg: _Message, reason: str, /, **changes: Any) -> None:
        self.q.next_dead += 1
        self._set_state(
            msg, "dead", token="", reason=reason, died_at=self.now, dead_order=self.q.next_dead, **changes
        )
        if msg.key is not None:
            self.uncount_key(msg.key)

    def lease_message(self, msg: _Message, deadline: float, batch_id: str, batch_index: int, batch_size: int) -> Lease:
        attempts = msg.attempts + 1
        token = os.urandom(16).hex()  # 128 random bits (a uuid4 has 122), without building a UUID
        # A batch of one is stored without a batch id: it needs no open-batch index entry.
        self._set_state(
            msg, "leased", attempts=attempts, token=token, deadline=deadline,
            batch_id="" if batch_size == 1 else batch_id, batch_index=batch_index, batch_size=batch_size,
            leased_at=self.now, timer_order=self.q.order(),
        )
        return Lease(
            queue=self.q.name,
            id=msg.id,
            key=msg.key,
            payload=bytes(msg.payload),
            priority=msg.priority,
            attempts=attempts,
            headers=json.loads(msg.headers),
            token=token,
            deadline=deadline,
            enqueued_at=msg.enqueued_at,
            batch_id=batch_id,
            dedup_id=msg.dedup_id,
            ref=msg.ref,
        )

    def set_deadline(self, msg: _Message, deadline: float) -> None:
        self._update(msg.id, deadline=deadline)  # its place among equal deadlines stays its lease's

    def current(self, lease: Lease) -> _Message | None:
        msg = self._message("message", lease.id, lease.queue)
        if msg is None or msg.state != "leased" or msg.token != lease.token:
            return None
        return msg

    def take_acked(self, lease: Lease) -> _Message | None:
        row = self.tx.one("ack", lease.id, lease.queue, lease.token)
        if row is None:
            return None
        key, batch_id = row
        self.q.count("leased", -1)
        if key is not None:
            self.uncount_key(key)
        return _Message(
            lease.id, key, lease.priority, None, False, "gone", 0.0, lease.attempts, lease.token, lease.deadline,
            batch_id, 0,
        )

    def cut_batch(self, msg: _Message) -> list[_Message]:
        """The later messages of its batch (they leave it as the planner returns them)."""
        if not msg.batch_id:
            return []
        return self._messages("batch_followers", msg.batch_id, msg.batch_index)

    def close_batch(self, msg: _Message) -> bool:
        return not msg.batch_id or self.tx.one("batch_left", msg.batch_id) is None

    def due_delayed(self, limit: int) -> list[_Message]:
        if not self.q.delayed:
            return []
        return self._messages("due_delayed", self.q.name, self.now, limit)

    def next_expired_lease(self) -> _Message | None:
        if not self.q.leased:
            return None
        return self._message("expired_lease", self.q.name, self.now)

    def dead_messages(self, ids: Sequence[str] | None) -> Iterator[_Message]:
        if ids is None:
            yield from self._messages("dead_all", self.q.name)
            return
        for mid in dict.fromkeys(ids):
            yield from self._messages("dead_one", mid, self.q.name)

    def _readable(self, msg: _Message) -> bool:
        """Whether a ready row's headers can be read. A row damaged behind the engine's
        back is dead-lettered with a reason (its headers reset) instead of failing every
        lease and blocking the queue."""
        try:
            if isinstance(json.loads(msg.headers), dict):
                return True
        except (TypeError, ValueError):
            pass
        self.dead_letter(msg, "corrupted record: its headers could not be read, so it was dead-lettered", headers="{}")
        return False

    # -- keys and the ready order

    def key_exists(self, key: str) -> bool:
        row = self._key(key)
        return bool(row.count or row.slots)

    def key_count(self, key: str) -> int:
        return self._key(key).count

    def key_slots(self, key: str) -> int:
        return self._key(key).slots

    def set_key_slots(self, key: str, slots: int) -> None:
        self._changed_key(key).slots = slots

    def key_paused(self, key: str) -> bool:
        return bool(self._key(key).paused)

    def key_interval(self, key: str) -> float | None:
        return self._key(key).interval

    def key_last_delivery(self, key: str) -> float | None:
        return self._key(key).last_delivery

    def set_key_last_delivery(self, key: str, at: float | None) -> None:
        self._changed_key(key).last_delivery = at

    def drop_key(self, key: str) -> None:
        """Only what outlives it stays (interval, last delivery, pause, weight); its row
        goes once it holds nothing (flush_keys)."""
        row = self._changed_key(key)
        row.ready_at = row.ready_order = row.round_at = row.round_order = None
        row.round_turns = 0

    def key_ready_at(self, key: str) -> float | None:
        return self._key(key).ready_at

    def set_ready(self, key: str, at: float | None, order: int | None = None) -> None:
        if at is not None and order is None:
            order = self.q.order()
        row = self._changed_key(key)
        row.ready_at, row.ready_order = at, None if at is None else order

    def key_weight(self, key: str) -> int:
        return self._key(key).weight or 1

    def key_round(self, key: str) -> planner.KeyRound | None:
        row = self._key(key)
        if row.round_at is None or row.round_order is None:
            return None
        return row.round_turns, row.round_at, row.round_order

    def set_key_round(self, key: str, round: planner.KeyRound | None) -> None:
        turns, at, order = round if round is not None else (0, None, None)
        row = self._changed_key(key)
        row.round_turns, row.round_at, row.round_order = turns, at, order

    def head_times(self, key: str) -> tuple[float, float] | None:
        row = self.tx.one("key_next_time", self.q.name, key)
        return (row[0], row[1]) if row is not None else None

    def key_heads(self, key: str, count: int) -> list[_Message]:
        while True:
            heads = self._messages("key_head", self.q.name, key, count)
            if all(self._readable(msg) for msg in heads):
                return heads

    def key_tail(self, key: str) -> _Message | None:
        while True:
            tail = self._message("key_tail", self.q.name, key)
            if tail is None or self._readable(tail):
                return tail

    def key_waiting(self, key: str) -> tuple[int, int]:
        # Counted in the key's index entries: the limit being set keeps them few.
        ready = self.tx.one("key_ready_count", self.q.name, key)[0]
        delayed = self.tx.one("key_delayed_count", self.q.name, key)[0]
        return ready, delayed

    def queue_waiting(self) -> int:
        return self.q.ready + self.q.delayed

    def first_ready_key(self) -> tuple[float, int, str] | None:
        self.tx.flush_keys()
        row = self.tx.one("ready_key", self.q.name)
        return (row["ready_at"], row["ready_order"], row["key"]) if row is not None else None

    def lane_head(self) -> tuple[_Message, float, int] | None:
        while not self.q.lane_empty:
            msg = self._message("lane_head", self.q.name)
            if msg is None:
                self.q.lane_empty = True
            elif self._readable(msg):
                return msg, msg.entered_at, msg.entered_order
        return None

    def next_delayed_due(self) -> float | None:
        return self.tx.one("next_delayed", self.q.name)[0]

    def next_deadline(self) -> float | None:
        return self.tx.one("next_deadline", self.q.name)[0]

    # -- reads for key_facts

    def key_head(self, key: str) -> HeadMessage | None:
        return _head_message(self.tx.one("key_head", self.q.name, key, 1))

    def first_delayed(self, keys: set[str], limit: int) -> dict[str, float]:
        found: dict[str, float] = {}
        for due, owner in self.tx.all("delayed_order", self.q.name, limit):
            if owner in keys and owner not in found:
                found[owner] = due
                if len(found) == len(keys):
                    break
        return found

    def held_batches(self, keys: set[str], limit: int) -> dict[str, list[HeldBatch]]:
        batches: dict[str, dict[str, list[Any]]] = {}
        for row in self.tx.all("leases_in_flight", self.q.name, limit):
            if row["key"] in keys:
                batches.setdefault(row["key"], {}).setdefault(row["batch_id"] or row["id"], []).append(row)
        holds: dict[str, list[HeldBatch]] = {}
        for key, by_batch in batches.items():
            for batch_id, members in by_batch.items():
                members.sort(key=lambda member: member["batch_index"])
                first = members[0]
                size = max(first["batch_size"], 1)  # 0: leased by a version that did not store it
                holds.setdefault(key, []).append(HeldBatch(
                    batch_id=batch_id, message_id=first["id"], token=first["token"], attempts=first["attempts"],
                    deadline=first["deadline"], size=size, settled=size - len(members),
                    leased_at=first["leased_at"] or None,
                ))
        return holds

    # -- dedup

    def expired_dedup(self, limit: int) -> list[tuple[str, str]]:
        return [(row[0], row[1]) for row in self.tx.all("dedup_expired", self.q.name, self.now, limit)]

    def dedup_entry(self, dedup_id: str) -> tuple[str, float] | None:
        row = self.tx.one("dedup", self.q.name, dedup_id)
        return (row[0], row[1]) if row is not None else None

    def set_dedup(self, dedup_id: str, message_id: str, expires: float) -> None:
        self._db.execute(QUERIES["dedup_set"], (self.q.name, dedup_id, message_id, expires))

    def drop_dedup(self, dedup_id: str) -> None:
        self._db.execute(QUERIES["dedup_drop"], (self.q.name, dedup_id))

    def pending(self, message_id: str) -> bool:
        row = self.tx.one("message_state", message_id)
        return row is not None and row[0] in ("ready", "delayed")
