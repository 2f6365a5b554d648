"""The SQLite backend's facade: options, one transaction per operation, waiting and events.

The planner (``backends/planner.py``) decides; the store (``store.py``) keeps; the
connection (``connection.py``) opens, retries and translates errors. The guarantees are
in the package docstring (``__init__.py``) and docs/design.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

from ...backend import (
    DEFAULT_METRICS_WINDOW, Backend, EventSubscription, KeySort, compact_json, events_option,
    key_metrics_window_option, metrics_window_option,
)
from ...errors import ConfigurationError, QueueFull
from ...models import (
    CancelResult, DeadLetter, Event, KeyFacts, KeyInfo, Lease, LeaseResult, Message, MessageInfo, MinuteMetrics,
    QueueSettings, QueueStats, RetryPosition, Schedule,
)
from ...urls import sqlite_file
from .. import planner
from .connection import Connection
from .sql import QUERIES
from .store import QueueStore, RowCache, Transaction

OPTIONS = ("busy_timeout", "clock", "events", "key_metrics_window", "metrics_window", "synchronous")
EVENTS_POLL = 0.05
# A purge deletes at most this many messages per transaction, so that it never holds the
# write lock for long.
PURGE_CHUNK = 1000
WAIT_FIRST_STEP = 0.005
WAIT_MAX_STEP = 0.1

T = TypeVar("T")


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


def _after_fork_in_child() -> None:
    """Locks held by another thread at fork time would never be released in the child."""
    global _WAKEUPS_LOCK
    _WAKEUPS_LOCK = threading.Lock()
    for wakeup in _WAKEUPS.values():
        wakeup.condition = threading.Condition()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
        self._metrics_window = metrics_window_option(metrics_window)
        self._key_metrics_window = key_metrics_window_option(key_metrics_window, self._metrics_window)
        self._events = events_option(events)
        with _WAKEUPS_LOCK:
            self._wakeup = _WAKEUPS.setdefault(self.path, _Wakeup())
        self._local = threading.local()  # wait backoff and last seen generation, per thread
        self._rows = RowCache()
        self._db = Connection(self.path, busy_timeout=float(busy_timeout), synchronous=synchronous)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "SQLiteBackend":
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) for sqlite://: {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
            )
        return cls(sqlite_file(url, OPTIONS), **options)

    def __repr__(self) -> str:
        return f"<SQLiteBackend sqlite:///{self.path}>"

    # -- transactions -----------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This process's sqlite3 connection (tests read the file through it)."""
        with self._db.lock:
            return self._db.get()

    def _write(self, body: Callable[[Transaction], T], *, notify: bool = False) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction, retried while busy."""

        def run(conn: sqlite3.Connection) -> T:
            try:
                self._rows.check(conn)
                tx = Transaction(conn, self._clock(), self._windows(), self._events, self._rows)
                result = body(tx)
                tx.flush()
                return result
            except BaseException:
                self._rows.forget()  # they may hold this transaction's uncommitted changes
                raise

        result = self._db.transaction(run, write=True)
        if notify:
            self._wakeup.notify()
        return result

    def _read(self, body: Callable[[Transaction], T]) -> T:
        """Run ``body`` in one read transaction (a consistent snapshot)."""
        return self._db.transaction(
            lambda conn: body(Transaction(conn, self._clock(), self._windows(), self._events)), write=False
        )

    def _windows(self) -> tuple[float, float]:
        return (self._metrics_window, self._key_metrics_window)

    @staticmethod
    def _stores(tx: Transaction) -> planner.StoreFor:
        """The store of each queue a call's leases name (None for an unknown queue)."""
        stores: dict[str, QueueStore | None] = {}

        def store_for(name: str) -> QueueStore | None:
            if name not in stores:
                stores[name] = tx.store(name)
            return stores[name]

        return store_for

    def close(self) -> None:
        self._db.close()

    # -- the contract: the planner decides, the store keeps -------------------------------

    def now(self) -> float:
        return self._read(lambda tx: tx.database_now())

    def enqueue_many(self, queue: str, messages: Sequence[Message], settings: QueueSettings) -> list[str]:
        def body(tx: Transaction) -> list[str] | QueueFull:
            s = tx.created_store(queue)
            s.q.held_messages = 1
            if len(messages) > 1:
                tx.read_keys(queue, (m.key for m in messages))
            try:
                return planner.enqueue_many(s, messages, settings)
            except QueueFull as full:
                # Nothing of the call was written; what the sweeps before the refusal did
                # (due delayed messages promoted) is committed, as the other backends keep it.
                return full

        answer = self._write(body, notify=True)
        if isinstance(answer, QueueFull):
            raise answer
        return answer

    def lease(
        self, queue: str, limit: int, per_key: int, visibility_timeout: float, settings: QueueSettings
    ) -> LeaseResult:
        self._local.seen = self._wakeup.generation
        result = self._write(
            lambda tx: planner.lease(tx.created_store(queue), limit, per_key, visibility_timeout, settings)
        )
        if result.leases:
            self._local.step = WAIT_FIRST_STEP
        return result

    def ack_many(self, leases: Sequence[Lease]) -> list[bool]:
        def body(tx: Transaction) -> list[bool]:
            if len(leases) > 1:
                for queue in {lease.queue for lease in leases}:
                    tx.read_keys(queue, (lease.key for lease in leases if lease.queue == queue))
            return planner.ack_many(self._stores(tx), leases)

        return self._write(body, notify=True)

    def nack(
        self, lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings
    ) -> bool:
        def body(tx: Transaction) -> bool:
            s = tx.store(lease.queue)
            return s is not None and planner.nack(s, lease, delay=delay, dead=dead, reason=reason, settings=settings)

        return self._write(body, notify=True)

    def release_many(self, leases: Sequence[Lease]) -> list[bool]:
        return self._write(lambda tx: planner.release_many(self._stores(tx), leases), notify=True)

    def extend(self, lease: Lease, visibility_timeout: float) -> float | None:
        return self.extend_many([lease], [visibility_timeout])[0]

    def extend_many(self, leases: Sequence[Lease], visibility_timeouts: Sequence[float]) -> list[float | None]:
        return self._write(lambda tx: planner.extend_many(self._stores(tx), leases, visibility_timeouts))

    def set_interval(self, queue: str, key: str, seconds: float | None) -> None:
        def body(tx: Transaction) -> None:
            s = tx.created_store(queue)
            tx.update_key(queue, key, interval=seconds)
            planner.reschedule(s, key)

        self._write(body, notify=True)

    def set_weight(self, queue: str, key: str, weight: int | None) -> None:
        def body(tx: Transaction) -> None:
            s = tx.created_store(queue)
            tx.update_key(queue, key, weight=weight)
            planner.set_weight(s, key)

        self._write(body)

    def set_paused(self, queue: str, key: str | None, paused: bool) -> None:
        def body(tx: Transaction) -> None:
            s = tx.created_store(queue)
            if key is None:
                s.q.paused = int(paused)
                return
            tx.update_key(queue, key, paused=int(paused))
            if not paused:
                planner.reschedule(s, key)

        self._write(body, notify=True)

    def replay(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> int:
        def body(tx: Transaction) -> int:
            s = tx.store(queue)
            return 0 if s is None else planner.replay(s, ids, position)

        return self._write(body, notify=True)

    def purge(self, queue: str, dead: bool) -> int:
        """Deletes in transactions of at most ``PURGE_CHUNK`` messages, so other
        connections write between them; each leaves the queue consistent. It deletes at
        most as many messages as were there when it started: messages enqueued meanwhile
        may be among them (in place of as many older ones)."""
        deleted, budget = 0, None
        while True:
            chunk_deleted, budget = self._write(
                functools.partial(Transaction.purge_chunk, queue=queue, dead=dead, budget=budget, chunk=PURGE_CHUNK)
            )
            deleted += chunk_deleted
            if budget <= 0 or not chunk_deleted:
                return deleted

    def cancel(
        self, queue: str, message_id: str | None, settings: QueueSettings, ref: str | None = None
    ) -> CancelResult:
        def body(tx: Transaction) -> CancelResult:
            s = tx.store(queue)
            if s is None:
                return CancelResult(queue, message_id, False, None, ref=ref)
            return planner.cancel(s, message_id, settings, ref)

        return self._write(body, notify=True)

    # -- reads ------------------------------------------------------------------------

    def get(self, queue: str, message_id: str | None, ref: str | None = None) -> MessageInfo | None:
        def body(tx: Transaction) -> MessageInfo | None:
            s = tx.store(queue)
            return None if s is None else planner.get(s, message_id, ref)

        return self._read(body)

    def stats(self, queue: str) -> QueueStats:
        return self._read(lambda tx: tx.stats(queue))

    def queues(self) -> list[str]:
        return self._read(lambda tx: [name for (name,) in tx.all("queues_held")])

    def dead_letters(self, queue: str, limit: int, offset: int) -> list[DeadLetter]:
        return self._read(lambda tx: tx.dead_letters(queue, limit, offset))

    def metrics(self, queue: str, minutes: int, key: str | None) -> list[MinuteMetrics]:
        return self._read(lambda tx: tx.metrics(queue, minutes, key))

    def keys(self, queue: str, limit: int, sort: KeySort) -> list[KeyInfo]:
        return self._read(lambda tx: tx.keys(queue, limit, sort))

    def key_info(self, queue: str, key: str) -> KeyInfo:
        return self._read(lambda tx: tx.key_info(queue, key))

    def key_facts(self, queue: str, keys: Sequence[str]) -> list[KeyFacts]:
        return self._read(lambda tx: tx.key_facts(queue, keys))

    def head_times(self, queue: str, keys: Sequence[str]) -> tuple[float, list[float | None]]:
        return self._read(lambda tx: tx.head_times(queue, keys))

    def backlog_keys(self, queue: str, offset: int, count: int) -> list[str]:
        return self._read(lambda tx: tx.backlog_keys(queue, offset, count))

    # -- bindings -----------------------------------------------------------------------

    def bind(self, exchange: str, queue: str) -> None:
        self._write(lambda tx: tx.db.execute(QUERIES["bind"], (exchange, queue)))

    def unbind(self, exchange: str, queue: str) -> None:
        self._write(lambda tx: tx.db.execute(QUERIES["unbind"], (exchange, queue)))

    def bound_queues(self, exchange: str) -> list[str]:
        return self._read(lambda tx: [name for (name,) in tx.all("bound_queues", exchange)])

    # -- schedules ----------------------------------------------------------------------

    def put_schedule(self, queue: str, schedule: Schedule) -> Schedule:
        def body(tx: Transaction) -> Schedule:
            tx.created_store(queue)
            old = tx.one("schedule", queue, schedule.name)
            stored = schedule
            if old is not None:
                old_schedule = _schedule(old)
                same_spec = (old_schedule.every, old_schedule.cron) == (schedule.every, schedule.cron)
                stored = dataclasses.replace(
                    schedule, paused=old_schedule.paused, last_fired=old_schedule.last_fired, fired=old_schedule.fired,
                    next_due=old_schedule.next_due if same_spec else schedule.next_due,
                )
            tx.db.execute(QUERIES["schedule_put"], (
                queue, stored.name, stored.payload, stored.key, stored.priority,
                compact_json(stored.headers), stored.every, stored.cron, stored.next_due,
                int(stored.paused), stored.last_fired, stored.fired,
            ))
            return stored

        return self._write(body)

    def schedules(self, queue: str) -> list[Schedule]:
        return self._read(lambda tx: [_schedule(row) for row in tx.all("schedules", queue)])

    def due_schedules(self, queue: str, limit: int) -> tuple[float, list[Schedule]]:
        def body(tx: Transaction) -> tuple[float, list[Schedule]]:
            now = tx.read_store(queue).now  # the queue's clock: never behind what it stored
            return now, [_schedule(row) for row in tx.all("schedules_due", queue, now, limit)]

        return self._read(body)

    def fire_schedule(
        self, queue: str, name: str, expected_due: float, next_due: float, message: Message, settings: QueueSettings
    ) -> str | None:
        def body(tx: Transaction) -> str | None:
            s = tx.created_store(queue)
            if not tx.db.execute(QUERIES["schedule_fired"], (next_due, s.now, queue, name, expected_due)).rowcount:
                return None
            s.q.held_messages = 1
            return planner.enqueue_many(s, [message], settings)[0]

        return self._write(body, notify=True)

    def set_schedule_paused(self, queue: str, name: str, paused: bool, next_due: float | None) -> bool:
        return self._write(
            lambda tx: bool(tx.db.execute(QUERIES["schedule_paused"], (int(paused), next_due, queue, name)).rowcount),
            notify=True,
        )

    def remove_schedule(self, queue: str, name: str) -> bool:
        return self._write(lambda tx: bool(tx.db.execute(QUERIES["schedule_delete"], (queue, name)).rowcount))

    # -- waiting and events -------------------------------------------------------------

    def subscribe(self, queue: str) -> EventSubscription:
        if not self._events:
            raise ConfigurationError("events are off for this broker; connect with events=True to subscribe")
        return _SQLiteSubscription(self, queue, self._read(lambda tx: tx.one("events_last")[0]))

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


def _schedule(row: Any) -> Schedule:
    return Schedule(
        queue=row["queue"], name=row["name"], payload=row["payload"], key=row["key"], priority=row["priority"],
        headers=json.loads(row["headers"]), every=row["every"], cron=row["cron"], next_due=row["next_due"],
        paused=bool(row["paused"]), last_fired=row["last_fired"], fired=row["fired"],
    )


class _SQLiteSubscription(EventSubscription):
    """Tails the events table from the id that was last when it subscribed."""

    def __init__(self, backend: SQLiteBackend, queue: str, last: int) -> None:
        self._backend = backend
        self._queue = queue
        self._last = last

    def get(self, timeout: float) -> list[Event]:
        give_up_at = time.monotonic() + timeout
        while True:
            rows = self._backend._read(lambda tx: tx.all("events_after", self._last, self._queue))
            if rows:
                self._last = rows[-1]["id"]
                return [Event(row["type"], self._queue, row["message_id"], row["key"], row["at"]) for row in rows]
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(EVENTS_POLL, remaining))

    def close(self) -> None:
        """Nothing to release: the subscription is only a position in the table."""
