"""In-process backend and the executable reference model of the engine's semantics.

Plain dicts and heaps under one lock, written for clarity first; every other backend is
tested against it. The engine's decisions are the planner's (``backends/planner.py``, the
same code the SQLite backend runs); this module is the store they run on: where each
message and key is, and the counts. Heaps use lazy deletion: an entry whose record
changed since it was pushed is skipped. docs/design.md ("Data layout") describes the
structures.

``memory://NAME`` names a store shared by every broker of the process that uses the same
name (``memory://`` is the default store), so a producer and a consumer created
separately in one process see the same queues.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from ..backend import (
    DEFAULT_METRICS_WINDOW, METRICS_SWEEP_LIMIT, Backend, EventSubscription, KeySort, events_option,
    kept_minutes, key_metrics_window_option, metric_minutes, metrics_window_option, minute_of,
)
from ..errors import ConfigurationError
from ..models import (
    COUNTERS, CancelResult, DeadLetter, Event, EventType, HeadMessage, HeldBatch, KeyFacts, KeyInfo, Lease,
    LeaseResult, Message, MessageInfo, MinuteMetrics, QueueSettings, QueueStats, RetryPosition, Schedule,
)
from . import planner
from .planner import SEQ_ORIGIN


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
    leased_at: float = 0.0  # when its current lease was delivered (an extension keeps it)
    lease_order: int = 0  # its lease's place among leases expiring at the same time
    ref: str | None = None  # while q.refs names it by that ref


@dataclass(eq=False, slots=True)
class _Key:
    heap: list[tuple[int, int, str]] = field(default_factory=list)  # (priority, seq, id)
    slots: int = 0
    ready_at: float | None = None  # time of its valid entry in the ready heap
    version: int = -1  # entries carry versions from the store-wide counter (>= 0)
    round: planner.KeyRound | None = None  # a weighted key's round in progress


@dataclass(eq=False)
class _Queue:
    messages: dict[str, _Record] = field(default_factory=dict)
    keys: dict[str, _Key] = field(default_factory=dict)
    key_counts: dict[str, int] = field(default_factory=dict)  # live (not dead) messages per key
    # [ready, delayed] messages per key (max_pending_per_key), while it has either
    key_waiting: dict[str, list[int]] = field(default_factory=dict)
    intervals: dict[str, float] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)  # keys of weight > 1 (kept while idle)
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
    refs: dict[str, str] = field(default_factory=dict)  # ref -> id of the newest message enqueued with it
    dead: dict[str, None] = field(default_factory=dict)  # ids, oldest death first
    # (enqueued_at, order, id) of ready records, for the oldest ready age without a scan;
    # an entry is valid while its record is ready with that order as its ready_mark.
    ready_ages: list[tuple[float, int, str]] = field(default_factory=list)
    batches: dict[str, list[str]] = field(default_factory=dict)  # batch id -> unsettled ids in order
    batch_sizes: dict[str, int] = field(default_factory=dict)  # batch id -> how many it was delivered with
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
    schedules: dict[str, Schedule] = field(default_factory=dict)
    # (next due, name) of schedules not paused, so that equal due times go by name as on
    # every backend; an entry is valid while its schedule is there, not paused, with that
    # next due time (a schedule may have two equal valid entries: read once).
    schedules_due: list[tuple[float, str]] = field(default_factory=list)


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


class _QueueStore:
    """One queue of a memory space as the planner's store (``planner.Store``), used with
    the space's lock held."""

    def __init__(self, backend: "MemoryBackend", q: _Queue, now: float) -> None:
        self.q = self.seqs = q
        self.name = q.name
        self.now = now
        self._backend = backend
        self._order = backend._order

    # -- counters, metrics and events

    def paused(self) -> bool:
        return self.q.paused

    def record(self, counter: EventType, message_id: str, key: str | None) -> None:
        q, now = self.q, self.now
        minute = minute_of(now)
        index = COUNTERS.index(counter)
        for scope in (None, key) if key is not None else (None,):
            counts = q.metrics.get((minute, scope))
            if counts is None:
                counts = q.metrics[(minute, scope)] = [0] * len(COUNTERS)
                # Ordered by the last minute that keeps the entry: per-key and queue-level
                # entries may have windows of different lengths.
                window = self._backend._metrics_window if scope is None else self._backend._key_metrics_window
                last_kept = minute + (kept_minutes(window) - 1) * 60
                heapq.heappush(q.metrics_expiry, (last_kept, next(self._order), minute, scope))
            counts[index] += 1
        if self._backend._events:
            for subscriber in q.subscribers:
                subscriber.push(Event(counter, q.name, message_id, key, now))

    # -- message states

    def _count_waiting(self, rec: _Record, state: str, change: int) -> None:
        """Count ``rec`` in (+1) or out of (-1) its key's waiting messages as ``state``."""
        index = _WAITING_INDEX.get(state)
        if rec.key is None or index is None:
            return
        waiting = self.q.key_waiting.get(rec.key)
        if waiting is None:
            waiting = self.q.key_waiting[rec.key] = [0, 0]
        waiting[index] += change
        if not any(waiting):
            del self.q.key_waiting[rec.key]

    def _set_state(self, rec: _Record, state: str) -> None:
        q = self.q
        if rec.state in q.counts:
            q.counts[rec.state] -= 1
        if state in q.counts:
            q.counts[state] += 1
        self._count_waiting(rec, rec.state, -1)
        self._count_waiting(rec, state, +1)
        rec.state = state
        if state == "ready":
            rec.ready_mark = next(self._order)
            heapq.heappush(q.ready_ages, (rec.enqueued_at, rec.ready_mark, rec.id))
            if len(q.ready_ages) > 2 * q.counts["ready"] + 64:
                # Mostly stale entries (records that left the ready state since): keep the
                # valid ones. Amortised O(1): at least half the entries go each time.
                q.ready_ages = [entry for entry in q.ready_ages if _ready_age_valid(q, entry)]
                heapq.heapify(q.ready_ages)

    def message(self, message_id: str) -> _Record | None:
        return self.q.messages.get(message_id)

    def message_info(self, rec: _Record) -> MessageInfo:
        return planner.describe(
            self.q.name, rec.id, rec.key, rec.state, priority=rec.priority, attempts=rec.attempts,
            enqueued_at=rec.enqueued_at, size=len(rec.payload), dedup_id=rec.dedup_id, not_before=rec.not_before,
            deadline=rec.deadline, leased_at=rec.leased_at, reason=rec.reason, died_at=rec.died_at, ref=rec.ref,
        )

    def message_by_ref(self, ref: str) -> _Record | None:
        message_id = self.q.refs.get(ref)
        return None if message_id is None else self.q.messages[message_id]

    def insert(self, message: Message, *, state: str, seq: int | None, not_before: float) -> str:
        q = self.q
        rec = _Record(
            id=uuid.uuid4().hex,
            key=message.key,
            payload=message.payload,
            priority=message.priority,
            seq=seq,
            enqueued_at=self.now,
            headers=dict(message.headers or {}),
            dedup_id=message.dedup_id,
            at_head=message.at_head,
            state="new",
            ref=message.ref,
        )
        q.messages[rec.id] = rec
        if rec.ref is not None:
            older = q.refs.get(rec.ref)
            if older is not None:
                q.messages[older].ref = None
            q.refs[rec.ref] = rec.id
        if rec.key is not None:
            q.key_counts[rec.key] = q.key_counts.get(rec.key, 0) + 1
        if state == "delayed":
            self.delay(rec, not_before)
        else:
            self.place(rec, not_before=not_before)
        return rec.id

    def place(self, rec: _Record, /, **changes: Any) -> None:
        q = self.q
        if rec.state == "dead":
            del q.dead[rec.id]
            if rec.key is not None:
                q.key_counts[rec.key] = q.key_counts.get(rec.key, 0) + 1
        for name, value in changes.items():
            setattr(rec, name, value)
        self._set_state(rec, "ready")
        rec.entered_at = self.now
        if rec.key is None:
            rec.entered_order = next(self._order)
            heapq.heappush(q.lane, _order_entry(rec))
            return
        ks = q.keys.get(rec.key)
        if ks is None:
            ks = q.keys[rec.key] = _Key()
        heapq.heappush(ks.heap, _order_entry(rec))

    def delay(self, rec: _Record, due: float, /, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(rec, name, value)
        self._set_state(rec, "delayed")
        rec.not_before = due
        heapq.heappush(self.q.delayed, (due, next(self._order), rec.id))

    def dead_letter(self, rec: _Record, reason: str) -> None:
        if rec.state == "ready" and rec.key is not None:
            # A ready message dies only to make room (max_pending_per_key): its entry leaves
            # its key's order now, so that replacing messages of a key with no consumer
            # cannot pile up stale entries there.
            heap = self.q.keys[rec.key].heap
            heap.remove(_order_entry(rec))
            heapq.heapify(heap)
        self._set_state(rec, "dead")
        rec.token = ""
        rec.reason = reason
        rec.died_at = self.now
        self.q.dead[rec.id] = None
        if rec.key is not None:
            self._uncount_key(rec.key)

    def lease_message(self, rec: _Record, deadline: float, batch_id: str, batch_index: int, batch_size: int) -> Lease:
        q = self.q
        # The planner leases heads in order: rec is the first valid entry of its heap.
        heap = q.lane if rec.key is None else q.keys[rec.key].heap
        _top(q, heap)
        heapq.heappop(heap)
        if batch_index == 0:
            q.batches[batch_id] = []
        q.batches[batch_id].append(rec.id)
        q.batch_sizes[batch_id] = batch_size
        self._set_state(rec, "leased")
        rec.attempts += 1
        rec.token = uuid.uuid4().hex
        rec.deadline = deadline
        rec.leased_at = self.now
        rec.batch_id = batch_id
        rec.lease_order = next(self._order)
        heapq.heappush(q.leases, (deadline, rec.lease_order, rec.id, rec.token))
        return Lease(
            queue=q.name,
            id=rec.id,
            key=rec.key,
            payload=rec.payload,
            priority=rec.priority,
            attempts=rec.attempts,
            headers=dict(rec.headers),
            token=rec.token,
            deadline=deadline,
            enqueued_at=rec.enqueued_at,
            batch_id=batch_id,
            dedup_id=rec.dedup_id,
            ref=rec.ref,
        )

    def set_deadline(self, rec: _Record, deadline: float) -> None:
        rec.deadline = deadline
        heapq.heappush(self.q.leases, (deadline, rec.lease_order, rec.id, rec.token))

    def current(self, lease: Lease) -> _Record | None:
        rec = self.q.messages.get(lease.id)
        if rec is None or rec.state != "leased" or rec.token != lease.token:
            return None
        return rec

    def take_acked(self, lease: Lease) -> _Record | None:
        rec = self.current(lease)
        if rec is not None:
            batch = self.q.batches.get(rec.batch_id, [])
            if rec.id in batch:
                batch.remove(rec.id)
            self.forget(rec)
        return rec

    def forget(self, rec: _Record) -> None:
        """Drop a settled record (acked or purged) from every index it counts in."""
        q = self.q
        if rec.state in q.counts:
            q.counts[rec.state] -= 1
        self._count_waiting(rec, rec.state, -1)
        del q.messages[rec.id]
        if rec.ref is not None:
            del q.refs[rec.ref]
        if rec.state != "dead" and rec.key is not None:
            self._uncount_key(rec.key)

    def _uncount_key(self, key: str) -> None:
        q = self.q
        q.key_counts[key] -= 1
        if not q.key_counts[key]:
            del q.key_counts[key]
            ks = q.keys.get(key)
            if ks is not None and not ks.slots:
                del q.keys[key]

    def cut_batch(self, rec: _Record) -> list[_Record]:
        batch = self.q.batches.get(rec.batch_id, [rec.id])
        index = batch.index(rec.id)
        followers = [self.q.messages[mid] for mid in batch[index + 1 :]]
        del batch[index:]
        return followers

    def close_batch(self, rec: _Record) -> bool:
        if self.q.batches.get(rec.batch_id):
            return False
        self.q.batches.pop(rec.batch_id, None)
        self.q.batch_sizes.pop(rec.batch_id, None)
        return True

    def due_delayed(self, limit: int) -> list[_Record]:
        q, due = self.q, list[_Record]()
        while q.delayed and q.delayed[0][0] <= self.now and len(due) < limit:
            at, _, mid = heapq.heappop(q.delayed)
            rec = q.messages.get(mid)
            if rec is not None and rec.state == "delayed" and rec.not_before == at:
                due.append(rec)
        return due

    def next_expired_lease(self) -> _Record | None:
        q = self.q
        while q.leases and q.leases[0][0] <= self.now:
            deadline, _, mid, token = heapq.heappop(q.leases)
            rec = q.messages.get(mid)
            if rec is not None and rec.state == "leased" and rec.token == token and rec.deadline == deadline:
                return rec
        return None

    def dead_messages(self, ids: Sequence[str] | None) -> list[_Record]:
        q = self.q
        return [q.messages[mid] for mid in (q.dead if ids is None else dict.fromkeys(ids)) if mid in q.dead]

    # -- keys and the ready order

    def key_exists(self, key: str) -> bool:
        return key in self.q.keys

    def key_count(self, key: str) -> int:
        return self.q.key_counts.get(key, 0)

    def key_slots(self, key: str) -> int:
        ks = self.q.keys.get(key)
        return ks.slots if ks is not None else 0

    def set_key_slots(self, key: str, slots: int) -> None:
        self.q.keys[key].slots = slots

    def key_paused(self, key: str) -> bool:
        return key in self.q.paused_keys

    def key_interval(self, key: str) -> float | None:
        return self.q.intervals.get(key)

    def key_last_delivery(self, key: str) -> float | None:
        return self.q.last_delivery.get(key)

    def set_key_last_delivery(self, key: str, at: float | None) -> None:
        # Kept apart from _Key (which goes when a key empties) so an interval spans idle gaps.
        if at is None:
            self.q.last_delivery.pop(key, None)
        else:
            self.q.last_delivery[key] = at

    def drop_key(self, key: str) -> None:
        del self.q.keys[key]

    def key_ready_at(self, key: str) -> float | None:
        ks = self.q.keys.get(key)
        return ks.ready_at if ks is not None else None

    def set_ready(self, key: str, at: float | None, order: int | None = None) -> None:
        ks = self.q.keys[key]
        # Versions come from the store-wide counter, not from the _Key: a key that is
        # dropped and created again must not revive entries its earlier self left behind.
        ks.version = next(self._order)
        ks.ready_at = at
        if at is not None:
            heapq.heappush(self.q.ready, (at, next(self._order) if order is None else order, key, ks.version))

    def key_weight(self, key: str) -> int:
        return self.q.weights.get(key, 1)

    def key_round(self, key: str) -> planner.KeyRound | None:
        ks = self.q.keys.get(key)
        return ks.round if ks is not None else None

    def set_key_round(self, key: str, round: planner.KeyRound | None) -> None:
        self.q.keys[key].round = round

    def head_times(self, key: str) -> tuple[float, float] | None:
        ks = self.q.keys.get(key)
        head = _top(self.q, ks.heap) if ks is not None else None
        return (head.not_before, head.entered_at) if head is not None else None

    def key_heads(self, key: str, count: int) -> list[_Record]:
        ks = self.q.keys.get(key)
        if ks is None:
            return []
        heads: list[_Record] = []
        while len(heads) < count and (head := _top(self.q, ks.heap)) is not None:
            heads.append(head)
            heapq.heappop(ks.heap)
        for rec in heads:  # they stay in the key's order until leased
            heapq.heappush(ks.heap, _order_entry(rec))
        return heads

    def key_tail(self, key: str) -> _Record | None:
        # The largest valid entry: a scan of the key's order, which max_pending_per_key
        # (the one caller) keeps short.
        ks = self.q.keys.get(key)
        if ks is None:
            return None
        valid = [entry for entry in ks.heap if _entry_valid(self.q, entry)]
        return self.q.messages[max(valid)[2]] if valid else None

    def key_waiting(self, key: str) -> tuple[int, int]:
        ready, delayed = self.q.key_waiting.get(key, (0, 0))
        return ready, delayed

    def queue_waiting(self) -> int:
        return self.q.counts["ready"] + self.q.counts["delayed"]

    def first_ready_key(self) -> tuple[float, int, str] | None:
        q = self.q
        while q.ready:
            at, order, key, version = q.ready[0]
            ks = q.keys.get(key)
            if ks is not None and ks.version == version:
                return at, order, key
            heapq.heappop(q.ready)
        return None

    def lane_head(self) -> tuple[_Record, float, int] | None:
        rec = _top(self.q, self.q.lane)
        return (rec, rec.entered_at, rec.entered_order) if rec is not None else None

    def next_delayed_due(self) -> float | None:
        q = self.q
        while q.delayed:  # entries of messages purged or cancelled since are dropped
            due, _, mid = q.delayed[0]
            rec = q.messages.get(mid)
            if rec is not None and rec.state == "delayed" and rec.not_before == due:
                return due
            heapq.heappop(q.delayed)
        return None

    def next_deadline(self) -> float | None:
        return self.q.leases[0][0] if self.q.leases else None

    # -- reads for key_facts

    def key_head(self, key: str) -> HeadMessage | None:
        ks = self.q.keys.get(key)
        head = _top(self.q, ks.heap) if ks is not None else None
        return _head_message(head) if head is not None else None

    def first_delayed(self, keys: set[str], limit: int) -> dict[str, float]:
        """Stale entries count among the ``limit`` read, as in the other backends' orders."""
        found: dict[str, float] = {}
        for due, _, mid in heapq.nsmallest(limit, self.q.delayed):
            rec = self.q.messages.get(mid)
            if rec is None or rec.key not in keys or rec.key in found or rec.state != "delayed" or rec.not_before != due:
                continue
            found[rec.key] = due
            if len(found) == len(keys):
                break
        return found

    def held_batches(self, keys: set[str], limit: int) -> dict[str, list[HeldBatch]]:
        """From the queue's open batches (one per slot in use, so never more than its leases)."""
        q, holds = self.q, dict[str, list[HeldBatch]]()
        for batch_id, ids in itertools.islice(q.batches.items(), limit):
            first = q.messages.get(ids[0]) if ids else None
            if first is None or first.key not in keys:
                continue
            size = q.batch_sizes.get(batch_id, len(ids))
            holds.setdefault(first.key, []).append(HeldBatch(
                batch_id=batch_id, message_id=first.id, token=first.token, attempts=first.attempts,
                deadline=first.deadline, size=size, settled=size - len(ids), leased_at=first.leased_at,
            ))
        return holds

    # -- dedup

    def expired_dedup(self, limit: int) -> list[tuple[str, str]]:
        q, expired = self.q, list[tuple[str, str]]()
        while q.dedup_expiry and q.dedup_expiry[0][0] <= self.now and len(expired) < limit:
            expires, dedup_id = heapq.heappop(q.dedup_expiry)
            entry = q.dedup.get(dedup_id)
            if entry is not None and entry[1] == expires:
                expired.append((dedup_id, entry[0]))
        return expired

    def dedup_entry(self, dedup_id: str) -> tuple[str, float] | None:
        return self.q.dedup.get(dedup_id)

    def set_dedup(self, dedup_id: str, message_id: str, expires: float) -> None:
        self.q.dedup[dedup_id] = (message_id, expires)
        heapq.heappush(self.q.dedup_expiry, (expires, dedup_id))

    def drop_dedup(self, dedup_id: str) -> None:
        self.q.dedup.pop(dedup_id, None)

    def pending(self, message_id: str) -> bool:
        rec = self.q.messages.get(message_id)
        return rec is not None and rec.state in ("ready", "delayed")


def _head_message(rec: _Record) -> HeadMessage:
    return HeadMessage(rec.id, rec.priority, rec.attempts, rec.enqueued_at, rec.not_before, len(rec.payload))


def _order_entry(rec: _Record) -> tuple[int, int, str]:
    """A placed record's entry in its key's order or the lane: (priority, seq, id)."""
    assert rec.seq is not None, "a record is placed with its seq"
    return rec.priority, rec.seq, rec.id


def _ready_age_valid(q: _Queue, entry: tuple[float, int, str]) -> bool:
    rec = q.messages.get(entry[2])
    return rec is not None and rec.state == "ready" and rec.ready_mark == entry[1]


def _entry_valid(q: _Queue, entry: tuple[int, int, str]) -> bool:
    """Whether an entry of a key's order (or the lane) names a record ready at that place."""
    priority, seq, mid = entry
    rec = q.messages.get(mid)
    return rec is not None and rec.state == "ready" and rec.seq == seq and rec.priority == priority


def _top(q: _Queue, heap: list[tuple[int, int, str]]) -> _Record | None:
    """The first valid entry's record of a key's order (or the lane), stale entries dropped."""
    while heap:
        if _entry_valid(q, heap[0]):
            return q.messages[heap[0][2]]
        heapq.heappop(heap)
    return None


# Where a state counts in _Queue.key_waiting's [ready, delayed].
_WAITING_INDEX = {"ready": 0, "delayed": 1}

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

    def _existing_stores(self, now: float) -> planner.StoreFor:
        """The store of a queue that exists (leases name queues; an unknown one holds no lease)."""
        stores: dict[str, _QueueStore] = {}

        def store_for(name: str) -> _QueueStore | None:
            if name not in stores:
                q = self._store.queues.get(name)
                if q is None:
                    return None
                stores[name] = _QueueStore(self, q, now)
            return stores[name]

        return store_for

    def _expire_metrics(self, q: _Queue, now: float) -> None:
        """Forget a bounded number of metric entries older than the window."""
        current = minute_of(now)
        for _ in range(METRICS_SWEEP_LIMIT):
            if not q.metrics_expiry or q.metrics_expiry[0][0] >= current:
                return
            _, _, minute, key = heapq.heappop(q.metrics_expiry)
            q.metrics.pop((minute, key), None)

    def _oldest_ready(self, q: _Queue) -> float | None:
        """The enqueue time of the oldest ready message (stale heap entries dropped)."""
        while q.ready_ages and not _ready_age_valid(q, q.ready_ages[0]):
            heapq.heappop(q.ready_ages)
        return q.ready_ages[0][0] if q.ready_ages else None

    # -- the contract: the planner decides, _QueueStore keeps -----------------------------

    def enqueue_many(self, queue: str, messages: Sequence[Message], settings: QueueSettings) -> list[str]:
        with self._store.lock:
            q = self._queue(queue)
            q.held_messages = True
            now = self.now()
            self._expire_metrics(q, now)
            ids = planner.enqueue_many(_QueueStore(self, q, now), messages, settings)
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
            return planner.lease(_QueueStore(self, q, now), limit, per_key, visibility_timeout, settings)

    def ack_many(self, leases: Sequence[Lease]) -> list[bool]:
        with self._store.lock:
            results = planner.ack_many(self._existing_stores(self.now()), leases)
            self._store.notify_change()
        return results

    def nack(
        self, lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings
    ) -> bool:
        with self._store.lock:
            s = self._existing_stores(self.now())(lease.queue)
            done = s is not None and planner.nack(s, lease, delay=delay, dead=dead, reason=reason, settings=settings)
            self._store.notify_change()
            return done

    def release_many(self, leases: Sequence[Lease]) -> list[bool]:
        with self._store.lock:
            results = planner.release_many(self._existing_stores(self.now()), leases)
            self._store.notify_change()
            return results

    def extend(self, lease: Lease, visibility_timeout: float) -> float | None:
        return self.extend_many([lease], [visibility_timeout])[0]

    def extend_many(self, leases: Sequence[Lease], visibility_timeouts: Sequence[float]) -> list[float | None]:
        with self._store.lock:
            return planner.extend_many(self._existing_stores(self.now()), leases, visibility_timeouts)

    def set_interval(self, queue: str, key: str, seconds: float | None) -> None:
        with self._store.lock:
            q = self._queue(queue)
            if seconds is None:
                q.intervals.pop(key, None)
            else:
                q.intervals[key] = seconds
            planner.reschedule(_QueueStore(self, q, self.now()), key)
            self._store.notify_change()

    def set_weight(self, queue: str, key: str, weight: int | None) -> None:
        with self._store.lock:
            q = self._queue(queue)
            if weight is None:
                q.weights.pop(key, None)
            else:
                q.weights[key] = weight
            if key in q.keys:
                planner.set_weight(_QueueStore(self, q, self.now()), key)

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
                planner.reschedule(_QueueStore(self, q, now), key)
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
            ref=rec.ref,
        )

    def replay(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> int:
        with self._store.lock:
            q = self._store.queues.get(queue)
            if q is None:
                return 0
            replayed = planner.replay(_QueueStore(self, q, self.now()), ids, position)
            self._store.notify_change()
            return replayed

    def purge(self, queue: str, dead: bool) -> int:
        with self._store.lock:
            q = self._store.queues.get(queue)
            if q is None:
                return 0
            s = _QueueStore(self, q, self.now())
            states = ("dead",) if dead else ("ready", "delayed")
            doomed = [rec for rec in q.messages.values() if rec.state in states]
            for rec in doomed:
                q.dead.pop(rec.id, None)
                s.forget(rec)
            if not dead:
                for key in list(q.keys):
                    planner.schedule(s, key, s.now, keep_place=True)
            return len(doomed)

    def cancel(
        self, queue: str, message_id: str | None, settings: QueueSettings, ref: str | None = None
    ) -> CancelResult:
        with self._store.lock:
            q = self._store.queues.get(queue)
            if q is None:
                return CancelResult(queue, message_id, False, None, ref=ref)
            result = planner.cancel(_QueueStore(self, q, self.now()), message_id, settings, ref)
            if result.cancelled:
                self._store.notify_change()  # its key may be deliverable now
            return result

    def get(self, queue: str, message_id: str | None, ref: str | None = None) -> MessageInfo | None:
        with self._store.lock:
            q = self._store.queues.get(queue)
            return None if q is None else planner.get(_QueueStore(self, q, self.now()), message_id, ref)

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
        head = _top(q, ks.heap) if ks is not None else None
        return KeyInfo(
            queue=q.name,
            key=key,
            backlog=q.key_counts.get(key, 0),
            leased=ks.slots if ks is not None else 0,
            lag=max(0.0, now - head.enqueued_at) if head is not None else 0.0,
            paused=key in q.paused_keys,
            interval=q.intervals.get(key),
            head=None if head is None else _head_message(head),
            weight=q.weights.get(key, 1),
        )

    # -- why is a key not moving ----------------------------------------------------------

    def key_facts(self, queue: str, keys: Sequence[str]) -> list[KeyFacts]:
        with self._store.lock:
            q = self._store.queues.get(queue) or _Queue(name=queue)
            return planner.key_facts(_QueueStore(self, q, self.now()), keys)

    def head_times(self, queue: str, keys: Sequence[str]) -> tuple[float, list[float | None]]:
        with self._store.lock:
            q = self._store.queues.get(queue) or _Queue(name=queue)
            heads = [_top(q, q.keys[key].heap) if key in q.keys else None for key in keys]
            return self.now(), [None if head is None else head.enqueued_at for head in heads]

    def backlog_keys(self, queue: str, offset: int, count: int) -> list[str]:
        with self._store.lock:
            q = self._store.queues.get(queue)
            if q is None:
                return []
            ranked = sorted(q.key_counts.items(), key=lambda item: (-item[1], item[0]))
            return [key for key, _ in ranked[offset : offset + count]]

    # -- schedules ------------------------------------------------------------------------

    def _keep_schedule(self, q: _Queue, schedule: Schedule) -> Schedule:
        """Store ``schedule`` (with the lock held) and index it when it may come due."""
        q.schedules[schedule.name] = schedule
        if not schedule.paused:
            heapq.heappush(q.schedules_due, (schedule.next_due, schedule.name))
        return schedule

    def put_schedule(self, queue: str, schedule: Schedule) -> Schedule:
        with self._store.lock:
            q = self._queue(queue)
            old = q.schedules.get(schedule.name)
            if old is not None:
                schedule = dataclasses.replace(
                    schedule, paused=old.paused, last_fired=old.last_fired, fired=old.fired,
                    next_due=old.next_due if (old.every, old.cron) == (schedule.every, schedule.cron) else schedule.next_due,
                )
            return self._keep_schedule(q, schedule)

    def schedules(self, queue: str) -> list[Schedule]:
        with self._store.lock:
            q = self._store.queues.get(queue)
            return [] if q is None else [q.schedules[name] for name in sorted(q.schedules)]

    def due_schedules(self, queue: str, limit: int) -> tuple[float, list[Schedule]]:
        with self._store.lock:
            now = self.now()
            q = self._store.queues.get(queue)
            due: list[Schedule] = []
            if q is None:
                return now, due
            kept: list[tuple[float, str]] = []  # valid entries looked at, pushed back: firing (not this read) moves them
            while q.schedules_due and q.schedules_due[0][0] <= now and len(due) < limit:
                entry = heapq.heappop(q.schedules_due)
                schedule = q.schedules.get(entry[1])
                if schedule is None or schedule.paused or schedule.next_due != entry[0]:
                    continue
                if not kept or kept[-1] != entry:  # equal entries pop one after another
                    due.append(schedule)
                    kept.append(entry)
            for entry in kept:
                heapq.heappush(q.schedules_due, entry)
            return now, due

    def fire_schedule(
        self, queue: str, name: str, expected_due: float, next_due: float, message: Message, settings: QueueSettings
    ) -> str | None:
        with self._store.lock:
            q = self._store.queues.get(queue)
            schedule = None if q is None else q.schedules.get(name)
            if q is None or schedule is None or schedule.paused or schedule.next_due != expected_due:
                return None
            now = self.now()
            q.held_messages = True
            self._expire_metrics(q, now)
            # First: a backpressure limit that refuses the message (QueueFull) changes
            # nothing, so the period fires at a later look.
            [mid] = planner.enqueue_many(_QueueStore(self, q, now), [message], settings)
            self._keep_schedule(
                q, dataclasses.replace(schedule, next_due=next_due, last_fired=now, fired=schedule.fired + 1)
            )
            self._store.notify_change()
            return mid

    def set_schedule_paused(self, queue: str, name: str, paused: bool, next_due: float | None) -> bool:
        with self._store.lock:
            q = self._store.queues.get(queue)
            schedule = None if q is None else q.schedules.get(name)
            if q is None or schedule is None:
                return False
            changes: dict[str, Any] = {"paused": paused}
            if next_due is not None:
                changes["next_due"] = next_due
            self._keep_schedule(q, dataclasses.replace(schedule, **changes))
            return True

    def remove_schedule(self, queue: str, name: str) -> bool:
        with self._store.lock:
            q = self._store.queues.get(queue)
            return q is not None and q.schedules.pop(name, None) is not None

    def subscribe(self, queue: str) -> EventSubscription:
        if not self._events:
            raise ConfigurationError("events are off for this broker; connect with events=True to subscribe")
        with self._store.lock:
            q = self._queue(queue)
            subscription = _Subscription(self._store, q)
            q.subscribers.append(subscription)
            return subscription
