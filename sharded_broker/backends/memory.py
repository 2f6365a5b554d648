"""In-process backend and the executable reference model of the engine's semantics.

Plain dicts and heaps under one lock, written for clarity first; every other backend is
tested against it (see ``sharded_broker/backend.py`` for the rules it implements). Heaps
use lazy deletion: an entry whose record changed since it was pushed is skipped.

``memory://NAME`` names a store shared by every broker of the process that uses the same
name (``memory://`` is the default store), so a producer and a consumer created
separately in one process see the same queues.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from ..backend import (
    DEFAULT_METRICS_WINDOW, METRICS_SWEEP_LIMIT, WHY_READ_LIMIT, Backend, EventSubscription, KeySort, events_option,
    kept_minutes, key_metrics_window_option, metric_minutes, metrics_window_option, minute_of,
)
from ..errors import ConfigurationError
from ..models import (
    COUNTERS, DeadLetter, Event, HeadMessage, HeldBatch, KeyFacts, KeyInfo, Lease, LeaseResult, Message, MinuteMetrics,
    QueueSettings, QueueStats, RetryPosition,
)

# Tail seqs count up from here and head seqs count down, so every head seq sorts first.
SEQ_ORIGIN = 2**52


# slots: no per-instance __dict__ (about 50 bytes less per record, measured with
# tracemalloc), and attribute reads without a dict lookup.
@dataclass(eq=False, slots=True)
class _Record:
    id: str
    key: str | None
    payload: bytes
    priority: int
    seq: int | None  # None while delayed without a reserved place
    enqueued_at: float
    headers: dict[str, Any]
    dedup_id: str | None
    at_head: bool
    state: str = "ready"  # ready | delayed | leased | dead
    not_before: float = 0.0
    attempts: int = 0
    token: str = ""
    deadline: float = 0.0
    batch_id: str = ""
    entered_at: float = 0.0  # when it was last placed in its key's order or the unkeyed lane
    entered_order: int = 0
    reason: str = ""
    died_at: float = 0.0
    ready_mark: int = -1  # the order of its valid entry in the queue's ready_ages heap
    leased_at: float = 0.0  # when its current lease was delivered
    batch_size: int = 1  # how many messages its current lease's batch was delivered with


@dataclass(eq=False, slots=True)
class _Key:
    heap: list[tuple[int, int, str]] = field(default_factory=list)  # (priority, seq, id)
    slots: int = 0
    ready_at: float | None = None  # time of its valid entry in the ready heap
    version: int = -1  # entries carry versions from the store-wide counter (>= 0)


@dataclass(eq=False)
class _Queue:
    messages: dict[str, _Record] = field(default_factory=dict)
    keys: dict[str, _Key] = field(default_factory=dict)
    key_counts: dict[str, int] = field(default_factory=dict)  # live (not dead) messages per key
    intervals: dict[str, float] = field(default_factory=dict)
    # Kept apart from _Key (which goes when a key empties) so an interval spans idle gaps.
    last_delivery: dict[str, float] = field(default_factory=dict)
    paused_keys: set[str] = field(default_factory=set)
    paused: bool = False
    ready: list[tuple[float, int, str, int]] = field(default_factory=list)  # (at, order, key, version)
    lane: list[tuple[int, int, str]] = field(default_factory=list)  # (priority, seq, id)
    delayed: list[tuple[float, int, str]] = field(default_factory=list)  # (due, order, id)
    leases: list[tuple[float, int, str, str]] = field(default_factory=list)  # (deadline, order, id, token)
    dedup: dict[str, tuple[str, float]] = field(default_factory=dict)  # dedup id -> (id, expires)
    dedup_expiry: list[tuple[float, str]] = field(default_factory=list)
    dead: dict[str, None] = field(default_factory=dict)  # ids, oldest death first
    # (enqueued_at, order, id) of ready records, for the oldest ready age without a scan;
    # an entry is valid while its record is ready with that order as its ready_mark.
    ready_ages: list[tuple[float, int, str]] = field(default_factory=list)
    batches: dict[str, list[str]] = field(default_factory=dict)  # batch id -> unsettled ids in order
    tail_seq: int = SEQ_ORIGIN
    head_seq: int = SEQ_ORIGIN
    held_messages: bool = False  # listed by queues() once a message was enqueued
    counts: dict[str, int] = field(default_factory=lambda: {"ready": 0, "delayed": 0, "leased": 0})
    name: str = ""
    # (minute, key or None) -> counts in the order of COUNTERS; metrics_expiry orders them by
    # the last minute their window keeps them: (last kept minute, order, minute, key).
    metrics: dict[tuple[float, str | None], list[int]] = field(default_factory=dict)
    metrics_expiry: list[tuple[float, int, float, str | None]] = field(default_factory=list)
    subscribers: list["_Subscription"] = field(default_factory=list)


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.version = 0  # counts changes that may make work deliverable
        self.queues: dict[str, _Queue] = {}
        self.bindings: dict[str, set[str]] = {}
        self.order = itertools.count()  # tie-breaker shared by every heap of the store

    def notify_change(self) -> None:
        """Wake every waiting consumer (called with the lock held)."""
        self.version += 1
        self.changed.notify_all()


class _Subscription(EventSubscription):
    """Events appended by the operations themselves (with the store's lock held)."""

    def __init__(self, store: _Store, queue: "_Queue") -> None:
        self._store = store
        self._queue = queue
        self._events: collections.deque[Event] = collections.deque()
        self._arrived = threading.Condition(store.lock)

    def push(self, event: Event) -> None:
        self._events.append(event)
        self._arrived.notify_all()

    def get(self, timeout: float) -> list[Event]:
        with self._store.lock:
            if not self._events:
                self._arrived.wait(timeout)
            events = list(self._events)
            self._events.clear()
            return events

    def close(self) -> None:
        with self._store.lock:
            if self in self._queue.subscribers:
                self._queue.subscribers.remove(self)


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


class MemoryBackend(Backend):
    """All queues in this process's memory. Nothing survives the process."""

    def __init__(
        self,
        name: str = "",
        clock: Callable[[], float] | None = None,
        *,
        metrics_window: float = DEFAULT_METRICS_WINDOW,
        key_metrics_window: float | None = None,
        events: bool = True,
    ) -> None:
        if clock is not None and not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, not {clock!r}")
        with _STORES_LOCK:
            self._store = _STORES.setdefault(name, _Store())
        self.name = name
        self._clock = clock or time.time
        self._metrics_window = metrics_window_option(metrics_window)
        self._key_metrics_window = key_metrics_window_option(key_metrics_window, self._metrics_window)
        self._events = events_option(events)
        self._order = self._store.order
        # The store version each thread's last lease saw, so that wait() returns at once
        # for a change made between that lease and the wait.
        self._seen = threading.local()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "MemoryBackend":
        unknown = sorted(set(options) - {"clock", "metrics_window", "key_metrics_window", "events"})
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) for memory://: {', '.join(unknown)}; "
                "known: clock, events, key_metrics_window, metrics_window"
            )
        parts = urlsplit(url)
        if parts.path not in ("", "/") or parts.query:
            raise ConfigurationError(f"memory URL takes only a store name (memory://NAME), not {url!r}")
        clock = options.pop("clock", None)
        return cls(parts.netloc, clock, **options)

    def __repr__(self) -> str:
        return f"<MemoryBackend memory://{self.name}>"

    def now(self) -> float:
        return self._clock()

    # -- helpers (called with the lock held) ------------------------------------------

    def _queue(self, name: str) -> _Queue:
        queue = self._store.queues.get(name)
        if queue is None:
            queue = self._store.queues[name] = _Queue(name=name)
        return queue

    def _record(self, q: _Queue, counter: str, rec: _Record, now: float) -> None:
        """Count one lifecycle step of ``rec`` in this minute's metrics and publish it."""
        minute = minute_of(now)
        index = COUNTERS.index(counter)
        for key in (None, rec.key) if rec.key is not None else (None,):
            counts = q.metrics.get((minute, key))
            if counts is None:
                counts = q.metrics[(minute, key)] = [0] * len(COUNTERS)
                # Ordered by the last minute that keeps the entry: per-key and queue-level
                # entries may have windows of different lengths.
                window = self._metrics_window if key is None else self._key_metrics_window
                last_kept = minute + (kept_minutes(window) - 1) * 60
                heapq.heappush(q.metrics_expiry, (last_kept, next(self._order), minute, key))
            counts[index] += 1
        if self._events:
            for subscriber in q.subscribers:
                subscriber.push(Event(counter, q.name, rec.id, rec.key, now))

    def _expire_metrics(self, q: _Queue, now: float) -> None:
        """Forget a bounded number of metric entries older than the window."""
        current = minute_of(now)
        for _ in range(METRICS_SWEEP_LIMIT):
            if not q.metrics_expiry or q.metrics_expiry[0][0] >= current:
                return
            _, _, minute, key = heapq.heappop(q.metrics_expiry)
            q.metrics.pop((minute, key), None)

    def _set_state(self, q: _Queue, rec: _Record, state: str) -> None:
        if rec.state in q.counts:
            q.counts[rec.state] -= 1
        if state in q.counts:
            q.counts[state] += 1
        rec.state = state
        if state == "ready":
            rec.ready_mark = next(self._order)
            heapq.heappush(q.ready_ages, (rec.enqueued_at, rec.ready_mark, rec.id))
            if len(q.ready_ages) > 2 * q.counts["ready"] + 64:
                # Mostly stale entries (records that left the ready state since): keep the
                # valid ones. Amortised O(1): at least half the entries go each time.
                q.ready_ages = [entry for entry in q.ready_ages if self._ready_age_valid(q, entry)]
                heapq.heapify(q.ready_ages)

    @staticmethod
    def _ready_age_valid(q: _Queue, entry: tuple[float, int, str]) -> bool:
        rec = q.messages.get(entry[2])
        return rec is not None and rec.state == "ready" and rec.ready_mark == entry[1]

    def _oldest_ready(self, q: _Queue) -> float | None:
        """The enqueue time of the oldest ready message (stale heap entries dropped)."""
        while q.ready_ages and not self._ready_age_valid(q, q.ready_ages[0]):
            heapq.heappop(q.ready_ages)
        return q.ready_ages[0][0] if q.ready_ages else None

    def _forget(self, q: _Queue, rec: _Record) -> None:
        """Drop a settled record (acked or purged) from every index it counts in."""
        if rec.state in q.counts:
            q.counts[rec.state] -= 1
        del q.messages[rec.id]
        if rec.state != "dead" and rec.key is not None:
            self._uncount_key(q, rec.key)

    def _uncount_key(self, q: _Queue, key: str) -> None:
        q.key_counts[key] -= 1
        if not q.key_counts[key]:
            del q.key_counts[key]
            ks = q.keys.get(key)
            if ks is not None and not ks.slots:
                del q.keys[key]

    def _head(self, q: _Queue, ks: _Key) -> _Record | None:
        while ks.heap:
            priority, seq, mid = ks.heap[0]
            rec = q.messages.get(mid)
            if rec is not None and rec.state == "ready" and rec.seq == seq and rec.priority == priority:
                return rec
            heapq.heappop(ks.heap)
        return None

    def _schedule(
        self, q: _Queue, key: str, now: float, *, keep_place: bool, settings: QueueSettings | None = None
    ) -> None:
        """Give ``key`` a valid entry in the ready heap if its head message exists.

        ``keep_place``: a key already waiting keeps its earlier ready time (new arrivals
        must not push a waiting key to the back of the round). Only a head that *holds*
        the key (placed with a not-before time after it was placed: a retry or an
        ``at_head`` delay) pushes a key's time later. ``settings``: when given, a key that
        is not waiting and whose slots are all in use, or that is paused, is left out (it is
        scheduled again when a slot frees or on resume).
        """
        ks = q.keys.get(key)
        if ks is None:
            return
        if settings is not None and ks.ready_at is None and (
            ks.slots >= settings.key_concurrency or key in q.paused_keys
        ):
            return
        head = self._head(q, ks)
        if head is None:
            ks.version = next(self._order)
            ks.ready_at = None
            return
        holds_until = head.not_before if head.not_before > head.entered_at else 0.0
        at = max(now, holds_until)
        if keep_place and ks.ready_at is not None:
            at = max(ks.ready_at, holds_until)
        if at == ks.ready_at:
            return
        # Versions come from the store-wide counter, not from the _Key: a key that is
        # dropped and created again must not revive entries its earlier self left behind.
        ks.version = next(self._order)
        ks.ready_at = at
        heapq.heappush(q.ready, (at, next(self._order), key, ks.version))

    def _place(self, q: _Queue, rec: _Record, now: float) -> None:
        """Put a record (whose seq is set) into its key's order or the unkeyed lane."""
        self._set_state(q, rec, "ready")
        rec.entered_at = now
        if rec.key is None:
            rec.entered_order = next(self._order)
            heapq.heappush(q.lane, (rec.priority, rec.seq, rec.id))
            return
        ks = q.keys.get(rec.key)
        if ks is None:
            ks = q.keys[rec.key] = _Key()
        heapq.heappush(ks.heap, (rec.priority, rec.seq, rec.id))

    def _delay(self, q: _Queue, rec: _Record, due: float) -> None:
        self._set_state(q, rec, "delayed")
        rec.not_before = due
        heapq.heappush(q.delayed, (due, next(self._order), rec.id))

    def _next_seq(self, q: _Queue, at_head: bool) -> int:
        if at_head:
            q.head_seq -= 1
            return q.head_seq
        q.tail_seq += 1
        return q.tail_seq

    def _promote_due(self, q: _Queue, now: float, settings: QueueSettings | None) -> None:
        while q.delayed and q.delayed[0][0] <= now:
            due, _, mid = heapq.heappop(q.delayed)
            rec = q.messages.get(mid)
            if rec is None or rec.state != "delayed" or rec.not_before != due:
                continue
            if rec.seq is None:
                rec.seq = self._next_seq(q, rec.at_head)
            self._place(q, rec, now)
            if rec.key is not None:
                self._schedule(q, rec.key, now, keep_place=True, settings=settings)

    def _expire_leases(self, q: _Queue, now: float, settings: QueueSettings) -> None:
        while q.leases and q.leases[0][0] <= now:
            deadline, _, mid, token = heapq.heappop(q.leases)
            rec = q.messages.get(mid)
            if rec is None or rec.state != "leased" or rec.token != token or rec.deadline != deadline:
                continue
            self._fail(q, rec, now, settings, delay=0.0, dead_reason=None, why="lease expired")

    def _requeue(self, q: _Queue, rec: _Record, now: float, delay: float, position: RetryPosition) -> None:
        rec.token = ""
        if position == "tail":
            rec.seq = None
            rec.at_head = False
        if rec.key is not None and position == "head":
            # Back to its place, holding the key until it is delivered again.
            rec.not_before = now + delay
            self._place(q, rec, now)
        elif delay > 0:
            self._delay(q, rec, now + delay)
        else:
            if rec.seq is None:
                rec.seq = self._next_seq(q, False)
            rec.not_before = now
            self._place(q, rec, now)

    def _dead_letter(self, q: _Queue, rec: _Record, now: float, reason: str) -> None:
        self._set_state(q, rec, "dead")
        rec.token = ""
        rec.reason = reason
        rec.died_at = now
        q.dead[rec.id] = None
        if rec.key is not None:
            self._uncount_key(q, rec.key)

    def _fail(
        self,
        q: _Queue,
        rec: _Record,
        now: float,
        settings: QueueSettings,
        *,
        delay: float,
        dead_reason: str | None,
        why: str,
    ) -> None:
        """A leased message failed: retry or dead-letter it, and return the rest of its batch."""
        batch, followers = self._cut_batch(q, rec)
        if dead_reason is not None:
            self._dead_letter(q, rec, now, dead_reason)
            self._record(q, "dead", rec, now)
        elif settings.max_deliveries is not None and rec.attempts >= settings.max_deliveries:
            self._dead_letter(q, rec, now, f"{why} after {rec.attempts} deliveries (max_deliveries={settings.max_deliveries})")
            self._record(q, "dead", rec, now)
        else:
            self._requeue(q, rec, now, delay, settings.retry_position)
            self._record(q, "retried", rec, now)
        self._return_unprocessed(q, followers, now)
        self._settled(q, rec, now, batch)

    def _release(self, q: _Queue, rec: _Record, now: float) -> None:
        """Give a leased message back uncounted, with the rest of its batch."""
        batch, followers = self._cut_batch(q, rec)
        self._return_unprocessed(q, [rec, *followers], now)
        self._settled(q, rec, now, batch)

    def _cut_batch(self, q: _Queue, rec: _Record) -> tuple[list[str], list[_Record]]:
        """Remove ``rec`` and every later message from its batch: (what stays, the later ones)."""
        batch = q.batches.get(rec.batch_id, [rec.id])
        index = batch.index(rec.id)
        followers = [q.messages[mid] for mid in batch[index + 1 :]]
        del batch[index:]
        return batch, followers

    def _return_unprocessed(self, q: _Queue, records: list[_Record], now: float) -> None:
        """Back to their places, in order; they were never processed, so their deliveries
        do not count."""
        for rec in records:
            rec.attempts -= 1
            self._requeue(q, rec, now, 0.0, "head")

    def _settled(self, q: _Queue, rec: _Record, now: float, batch: list[str]) -> None:
        """Release the key's slot once the last message of a batch is settled."""
        if batch:
            return
        q.batches.pop(rec.batch_id, None)
        if rec.key is None:
            return
        ks = q.keys.get(rec.key)
        if ks is None:
            return
        ks.slots -= 1
        if not ks.slots and rec.key not in q.key_counts:
            del q.keys[rec.key]
            return
        self._schedule(q, rec.key, now, keep_place=False)

    def _current(self, q: _Queue | None, lease: Lease) -> _Record | None:
        if q is None:
            return None
        rec = q.messages.get(lease.id)
        if rec is None or rec.state != "leased" or rec.token != lease.token:
            return None
        return rec

    def _lease_record(self, q: _Queue, rec: _Record, now: float, vt: float, batch_id: str) -> Lease:
        self._set_state(q, rec, "leased")
        rec.attempts += 1
        rec.token = uuid.uuid4().hex
        rec.deadline = now + vt
        rec.leased_at = now
        rec.batch_id = batch_id
        heapq.heappush(q.leases, (rec.deadline, next(self._order), rec.id, rec.token))
        self._record(q, "delivered", rec, now)
        return Lease(
            queue="",
            id=rec.id,
            key=rec.key,
            payload=rec.payload,
            priority=rec.priority,
            attempts=rec.attempts,
            headers=dict(rec.headers),
            token=rec.token,
            deadline=rec.deadline,
            enqueued_at=rec.enqueued_at,
            batch_id=batch_id,
            dedup_id=rec.dedup_id,
        )

    def _lane_head(self, q: _Queue) -> _Record | None:
        while q.lane:
            priority, seq, mid = q.lane[0]
            rec = q.messages.get(mid)
            if rec is not None and rec.state == "ready" and rec.seq == seq and rec.priority == priority:
                return rec
            heapq.heappop(q.lane)
        return None

    def _ready_key(self, q: _Queue) -> tuple[float, int, str] | None:
        """The valid ready-heap entry with the earliest time, or None."""
        while q.ready:
            at, order, key, version = q.ready[0]
            ks = q.keys.get(key)
            if ks is not None and ks.version == version:
                return at, order, key
            heapq.heappop(q.ready)
        return None

    def _dedup_hit(self, q: _Queue, dedup_id: str, now: float, settings: QueueSettings) -> str | None:
        still_pending = []
        while q.dedup_expiry and q.dedup_expiry[0][0] <= now:
            expires, old = heapq.heappop(q.dedup_expiry)
            entry = q.dedup.get(old)
            if entry is None or entry[1] != expires:
                continue
            rec = q.messages.get(entry[0])
            if settings.unique_while_pending and rec is not None and rec.state in ("ready", "delayed"):
                still_pending.append(old)  # the window does not end a pending twin's claim
            else:
                del q.dedup[old]
        for old in still_pending:
            expires = now + settings.dedup_window
            q.dedup[old] = (q.dedup[old][0], expires)
            heapq.heappush(q.dedup_expiry, (expires, old))
        entry = q.dedup.get(dedup_id)
        if entry is None:
            return None
        first_id, expires = entry
        if settings.unique_while_pending:
            rec = q.messages.get(first_id)
            return first_id if rec is not None and rec.state in ("ready", "delayed") else None
        return first_id if expires > now else None

    # -- the contract -----------------------------------------------------------------

    def enqueue_many(self, queue: str, messages: Sequence[Message], settings: QueueSettings) -> list[str]:
        ids = []
        with self._store.lock:
            q = self._queue(queue)
            q.held_messages = True
            now = self.now()
            self._expire_metrics(q, now)
            # Due delayed messages entered their keys' order when they fell due: before
            # anything enqueued now.
            self._promote_due(q, now, settings)
            for m in messages:
                if m.dedup_id is not None:
                    first = self._dedup_hit(q, m.dedup_id, now, settings)
                    if first is not None:
                        ids.append(first)
                        continue
                rec = _Record(
                    id=uuid.uuid4().hex,
                    key=m.key,
                    payload=m.payload,
                    priority=m.priority,
                    seq=None,
                    enqueued_at=now,
                    headers=dict(m.headers or {}),
                    dedup_id=m.dedup_id,
                    at_head=m.at_head,
                    state="new",
                )
                q.messages[rec.id] = rec
                if m.key is not None:
                    q.key_counts[m.key] = q.key_counts.get(m.key, 0) + 1
                if m.dedup_id is not None:
                    expires = now + settings.dedup_window
                    q.dedup[m.dedup_id] = (rec.id, expires)
                    heapq.heappush(q.dedup_expiry, (expires, m.dedup_id))
                holds_key = m.at_head and m.key is not None
                if m.delay > 0 and not holds_key:
                    self._delay(q, rec, now + m.delay)
                else:
                    rec.seq = self._next_seq(q, m.at_head)
                    rec.not_before = now + m.delay
                    self._place(q, rec, now)
                    if m.key is not None:
                        self._schedule(q, m.key, now, keep_place=True, settings=settings)
                self._record(q, "enqueued", rec, now)
                ids.append(rec.id)
            self._store.notify_change()
        return ids

    def lease(
        self, queue: str, limit: int, per_key: int, visibility_timeout: float, settings: QueueSettings
    ) -> LeaseResult:
        with self._store.lock:
            q = self._queue(queue)
            self._seen.version = self._store.version
            now = self.now()
            self._expire_metrics(q, now)
            self._promote_due(q, now, settings)
            self._expire_leases(q, now, settings)
            leases: list[Lease] = []
            while len(leases) < limit and not q.paused:
                entry = self._ready_key(q)
                lane_head = self._lane_head(q)
                key_due = entry is not None and entry[0] <= now
                if lane_head is not None and (
                    not key_due or (lane_head.entered_at, lane_head.entered_order) < (entry[0], entry[1])
                ):
                    heapq.heappop(q.lane)
                    leases.append(self._lease_record(q, lane_head, now, visibility_timeout, lane_head.id))
                    q.batches[lane_head.id] = [lane_head.id]
                    continue
                if not key_due:
                    break
                heapq.heappop(q.ready)
                leases.extend(self._serve_key(q, entry[2], now, min(per_key, limit - len(leases)), visibility_timeout, settings))
            for lease in leases:
                lease.queue = queue
            return LeaseResult(leases, None if leases else self._retry_in(q, now))

    def _serve_key(
        self, q: _Queue, key: str, now: float, count: int, vt: float, settings: QueueSettings
    ) -> list[Lease]:
        ks = q.keys[key]
        ks.ready_at = None
        if key in q.paused_keys or ks.slots >= settings.key_concurrency:
            return []  # rescheduled on resume or when a slot frees
        interval = q.intervals.get(key, settings.interval)
        last_delivery = q.last_delivery.get(key)
        if last_delivery is not None and last_delivery + interval > now:
            self._schedule(q, key, last_delivery + interval, keep_place=False)
            return []
        head = self._head(q, ks)
        if head is None or head.not_before > now:
            self._schedule(q, key, now, keep_place=False)
            return []
        batch: list[_Record] = []
        while len(batch) < count and head is not None and head.not_before <= now:
            heapq.heappop(ks.heap)
            batch.append(head)
            head = self._head(q, ks)
        batch_id = batch[0].id
        q.batches[batch_id] = [rec.id for rec in batch]
        for rec in batch:
            rec.batch_size = len(batch)
        ks.slots += 1
        if interval:
            q.last_delivery[key] = now
        else:
            q.last_delivery.pop(key, None)
        if ks.slots < settings.key_concurrency:
            self._schedule(q, key, now if not interval else now + interval, keep_place=False)
        return [self._lease_record(q, rec, now, vt, batch_id) for rec in batch]

    def _retry_in(self, q: _Queue, now: float) -> float | None:
        if q.paused:
            return None
        times = []
        entry = self._ready_key(q)
        if entry is not None:
            times.append(entry[0])
        if q.delayed:
            times.append(q.delayed[0][0])
        if q.leases:
            times.append(q.leases[0][0])
        return max(0.0, min(times) - now) if times else None

    def ack_many(self, leases: Sequence[Lease]) -> list[bool]:
        results = []
        with self._store.lock:
            now = self.now()
            for lease in leases:
                q = self._store.queues.get(lease.queue)
                rec = self._current(q, lease)
                if rec is None:
                    results.append(False)
                    continue
                batch = q.batches.get(rec.batch_id, [])
                if rec.id in batch:
                    batch.remove(rec.id)
                self._forget(q, rec)
                self._settled(q, rec, now, batch)
                self._record(q, "acked", rec, now)
                results.append(True)
            self._store.notify_change()
        return results

    def nack(
        self, lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings
    ) -> bool:
        with self._store.lock:
            q = self._store.queues.get(lease.queue)
            rec = self._current(q, lease)
            if rec is None:
                return False
            dead_reason = (reason or "rejected") if dead else None
            now = self.now()
            self._promote_due(q, now, settings)  # before a tail retry takes its seq
            self._fail(q, rec, now, settings, delay=delay, dead_reason=dead_reason, why=reason or "nacked")
            self._store.notify_change()
            return True

    def release_many(self, leases: Sequence[Lease]) -> list[bool]:
        with self._store.lock:
            now = self.now()
            current = [self._current(self._store.queues.get(lease.queue), lease) for lease in leases]
            for lease, rec in zip(leases, current):
                # An earlier release of this call may have returned it with its batch.
                if rec is not None and rec.state == "leased" and rec.token == lease.token:
                    self._release(self._store.queues[lease.queue], rec, now)
            self._store.notify_change()
            return [rec is not None for rec in current]

    def extend(self, lease: Lease, visibility_timeout: float) -> float | None:
        return self.extend_many([lease], [visibility_timeout])[0]

    def extend_many(self, leases: Sequence[Lease], visibility_timeouts: Sequence[float]) -> list[float | None]:
        deadlines: list[float | None] = []
        with self._store.lock:
            now = self.now()
            for lease, visibility_timeout in zip(leases, visibility_timeouts):
                q = self._store.queues.get(lease.queue)
                rec = self._current(q, lease)
                if rec is None:
                    deadlines.append(None)
                    continue
                deadline = now + visibility_timeout
                if deadline != rec.deadline:
                    # An unchanged deadline keeps its place among leases expiring at the same time.
                    rec.deadline = deadline
                    heapq.heappush(q.leases, (rec.deadline, next(self._order), rec.id, rec.token))
                deadlines.append(rec.deadline)
        return deadlines

    def set_interval(self, queue: str, key: str, seconds: float | None) -> None:
        with self._store.lock:
            q = self._queue(queue)
            if seconds is None:
                q.intervals.pop(key, None)
            else:
                q.intervals[key] = seconds
            self._schedule(q, key, self.now(), keep_place=False)
            self._store.notify_change()

    def set_paused(self, queue: str, key: str | None, paused: bool) -> None:
        with self._store.lock:
            q = self._queue(queue)
            now = self.now()
            if key is None:
                q.paused = paused
            elif paused:
                q.paused_keys.add(key)
            else:
                q.paused_keys.discard(key)
                self._schedule(q, key, now, keep_place=False)
            self._store.notify_change()

    def stats(self, queue: str) -> QueueStats:
        with self._store.lock:
            q = self._store.queues.get(queue) or _Queue()
            now = self.now()
            oldest = self._oldest_ready(q)
            return QueueStats(
                queue=queue,
                ready=q.counts["ready"],
                leased=q.counts["leased"],
                delayed=q.counts["delayed"],
                dead=len(q.dead),
                keys=len(q.key_counts),
                oldest_age=max(0.0, now - oldest) if oldest is not None else 0.0,
                paused=q.paused,
            )

    def queues(self) -> list[str]:
        with self._store.lock:
            return sorted(name for name, q in self._store.queues.items() if q.held_messages)

    def dead_letters(self, queue: str, limit: int, offset: int) -> list[DeadLetter]:
        with self._store.lock:
            q = self._store.queues.get(queue)
            if q is None:
                return []
            ids = list(itertools.islice(q.dead, offset, offset + limit))
            return [self._dead_letter_view(queue, q.messages[mid]) for mid in ids]

    @staticmethod
    def _dead_letter_view(queue: str, rec: _Record) -> DeadLetter:
        return DeadLetter(
            queue=queue,
            id=rec.id,
            key=rec.key,
            payload=rec.payload,
            priority=rec.priority,
            attempts=rec.attempts,
            headers=dict(rec.headers),
            reason=rec.reason,
            enqueued_at=rec.enqueued_at,
            died_at=rec.died_at,
            dedup_id=rec.dedup_id,
        )

    def replay(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> int:
        with self._store.lock:
            q = self._store.queues.get(queue)
            if q is None:
                return 0
            chosen = [mid for mid in (q.dead if ids is None else dict.fromkeys(ids)) if mid in q.dead]
            records = sorted((q.messages[mid] for mid in chosen), key=lambda r: (r.priority, r.seq or 0))
            if position == "head":
                records.reverse()  # each takes a seq ahead of the previous one
            now = self.now()
            self._promote_due(q, now, None)  # before replayed messages take their seqs
            for rec in records:
                del q.dead[rec.id]
                rec.attempts = 0
                rec.reason = ""
                rec.seq = self._next_seq(q, position == "head")
                rec.not_before = now
                if rec.key is not None:
                    q.key_counts[rec.key] = q.key_counts.get(rec.key, 0) + 1
                self._place(q, rec, now)
                if rec.key is not None:
                    self._schedule(q, rec.key, now, keep_place=True)
            self._store.notify_change()
            return len(records)

    def purge(self, queue: str, dead: bool) -> int:
        with self._store.lock:
            q = self._store.queues.get(queue)
            if q is None:
                return 0
            states = ("dead",) if dead else ("ready", "delayed")
            doomed = [rec for rec in q.messages.values() if rec.state in states]
            for rec in doomed:
                q.dead.pop(rec.id, None)
                self._forget(q, rec)
            if not dead:
                for key, ks in list(q.keys.items()):
                    self._schedule(q, key, self.now(), keep_place=True)
            return len(doomed)

    def bind(self, exchange: str, queue: str) -> None:
        with self._store.lock:
            self._store.bindings.setdefault(exchange, set()).add(queue)

    def unbind(self, exchange: str, queue: str) -> None:
        with self._store.lock:
            self._store.bindings.get(exchange, set()).discard(queue)

    def bound_queues(self, exchange: str) -> list[str]:
        with self._store.lock:
            return sorted(self._store.bindings.get(exchange, ()))

    def wait(self, queue: str, timeout: float) -> None:
        with self._store.lock:
            if self._store.version == getattr(self._seen, "version", self._store.version):
                self._store.changed.wait(timeout)

    # -- metrics, keys and events ---------------------------------------------------------

    def metrics(self, queue: str, minutes: int, key: str | None) -> list[MinuteMetrics]:
        with self._store.lock:
            q = self._store.queues.get(queue) or _Queue(name=queue)
            answer = []
            window = self._metrics_window if key is None else self._key_metrics_window
            for minute in metric_minutes(self.now(), minutes, window):
                counts = q.metrics.get((minute, key), [0] * len(COUNTERS))
                answer.append(MinuteMetrics(minute, *counts))
            return answer

    def keys(self, queue: str, limit: int, sort: KeySort) -> list[KeyInfo]:
        with self._store.lock:
            q = self._store.queues.get(queue)
            if q is None:
                return []
            now = self.now()
            infos = [self._key_info(q, key, now) for key in q.key_counts]
            if sort == "lag":
                infos.sort(key=lambda info: (-info.lag, info.key))
            else:
                infos.sort(key=lambda info: (-info.backlog, info.key))
            return infos[:limit]

    def key_info(self, queue: str, key: str) -> KeyInfo:
        with self._store.lock:
            return self._key_info(self._store.queues.get(queue) or _Queue(name=queue), key, self.now())

    def _key_info(self, q: _Queue, key: str, now: float) -> KeyInfo:
        ks = q.keys.get(key)
        head = self._head(q, ks) if ks is not None else None
        return KeyInfo(
            queue=q.name,
            key=key,
            backlog=q.key_counts.get(key, 0),
            leased=ks.slots if ks is not None else 0,
            lag=max(0.0, now - head.enqueued_at) if head is not None else 0.0,
            paused=key in q.paused_keys,
            interval=q.intervals.get(key),
            head=None if head is None else HeadMessage(
                head.id, head.priority, head.attempts, head.enqueued_at, head.not_before, len(head.payload)
            ),
        )

    # -- why is a key not moving --------------------------------------------------------

    def key_facts(self, queue: str, keys: Sequence[str]) -> list[KeyFacts]:
        with self._store.lock:
            q = self._store.queues.get(queue) or _Queue(name=queue)
            now = self.now()
            heads = {key: self._head(q, q.keys[key]) if key in q.keys else None for key in keys}
            holding = {key for key in keys if key in q.keys and q.keys[key].slots}
            holds = self._holds(q, holding) if holding else {}
            waiting = {key for key, head in heads.items() if head is None}
            first_delayed = self._first_delayed(q, waiting) if waiting else {}
            return [
                self._key_facts(q, key, now, heads[key], holds.get(key, ()), first_delayed.get(key)) for key in keys
            ]

    def _key_facts(
        self, q: _Queue, key: str, now: float, head: _Record | None, holds: tuple[HeldBatch, ...],
        next_delayed: float | None,
    ) -> KeyFacts:
        ks = q.keys.get(key)
        return KeyFacts(
            queue=q.name,
            key=key,
            now=now,
            queue_paused=q.paused,
            key_paused=key in q.paused_keys,
            backlog=q.key_counts.get(key, 0),
            slots=ks.slots if ks is not None else 0,
            head=None if head is None else HeadMessage(
                head.id, head.priority, head.attempts, head.enqueued_at, head.not_before, len(head.payload)
            ),
            next_delayed=next_delayed,
            ready_at=ks.ready_at if ks is not None else None,
            last_delivery=q.last_delivery.get(key),
            own_interval=q.intervals.get(key),
            holds=holds,
        )

    def _first_delayed(self, q: _Queue, keys: set[str]) -> dict[str, float]:
        """The due time of each key's first delayed message, read once in the queue's
        delayed order (at most WHY_READ_LIMIT entries, stale ones included, like the other
        backends)."""
        found: dict[str, float] = {}
        for due, _, mid in heapq.nsmallest(WHY_READ_LIMIT, q.delayed):
            rec = q.messages.get(mid)
            if rec is not None and rec.key in keys and rec.key not in found and rec.state == "delayed" and rec.not_before == due:
                found[rec.key] = due
                if len(found) == len(keys):
                    break
        return found

    def _holds(self, q: _Queue, keys: set[str]) -> dict[str, tuple[HeldBatch, ...]]:
        """Each key's batches in flight, earliest deadline first, from one pass over the
        queue's batches."""
        holds: dict[str, list[HeldBatch]] = {}
        for batch_id, ids in q.batches.items():
            first = q.messages.get(ids[0]) if ids else None
            if first is None or first.key not in keys:
                continue
            holds.setdefault(first.key, []).append(HeldBatch(
                batch_id=batch_id, message_id=first.id, token=first.token, attempts=first.attempts,
                deadline=first.deadline, size=first.batch_size, settled=first.batch_size - len(ids),
                leased_at=first.leased_at,
            ))
        return {
            key: tuple(sorted(found, key=lambda hold: (hold.deadline, hold.message_id))) for key, found in holds.items()
        }

    def head_times(self, queue: str, keys: Sequence[str]) -> tuple[float, list[float | None]]:
        with self._store.lock:
            q = self._store.queues.get(queue) or _Queue(name=queue)
            heads = [self._head(q, q.keys[key]) if key in q.keys else None for key in keys]
            return self.now(), [None if head is None else head.enqueued_at for head in heads]

    def backlog_keys(self, queue: str, offset: int, count: int) -> list[str]:
        with self._store.lock:
            q = self._store.queues.get(queue)
            if q is None:
                return []
            ranked = sorted(q.key_counts.items(), key=lambda item: (-item[1], item[0]))
            return [key for key, _ in ranked[offset : offset + count]]

    def subscribe(self, queue: str) -> EventSubscription:
        if not self._events:
            raise ConfigurationError("events are off for this broker; connect with events=True to subscribe")
        with self._store.lock:
            q = self._queue(queue)
            subscription = _Subscription(self._store, q)
            q.subscribers.append(subscription)
            return subscription
