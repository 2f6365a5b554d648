"""The engine's decisions for the in-process backends, written once.

Every rule of the backend contract (``sharded_broker/backend.py``; the whole design in
docs/design.md) that decides *what happens* lives here: the lease loop, serving a key,
failing and requeueing, settling a batch, scheduling a key in the ready order, the
enqueue decision, replay, and the bounded sweeps of due delayed messages, expired leases
and expired dedup entries. The memory and SQLite backends are two stores (:class:`Store`):
they say *where things are* (a heap, an index) and keep their counts; they decide nothing.

The Redis backend runs the same rules in Lua (``backends/lua/_common.lua``), the one
independent implementation: its functions carry these functions' names, and
``tests/test_model.py`` compares it with the memory store.

Every function works on one queue inside one atomic step of its store (the memory
store's lock, SQLite's write transaction), at the store's ``now``. Adding an operation is
one function here plus the store reads it needs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

from ..backend import WHY_READ_LIMIT
from ..errors import QueueFull
from ..models import (
    DROPPED_REASON, CancelResult, EventType, HeadMessage, HeldBatch, KeyFacts, Lease, LeaseResult, Message, MessageInfo,
    MessageState, QueueSettings, RetryPosition,
)

# Tail seqs count up from here and head seqs count down, so every head seq sorts first.
SEQ_ORIGIN = 2**52
# Bounded work per call, as in Lua (SWEEP_LIMIT in _common.lua): at most this many due
# delayed messages promoted, expired leases returned and expired dedup entries forgotten;
# the rest is due at once (the next lease's retry_in is 0).
SWEEP_LIMIT = 500


class StoredMessage(Protocol):
    """What the planner reads of a message (a store's record, or its row)."""

    id: str
    key: str | None
    priority: int
    seq: int | None  # None while delayed without a reserved place
    at_head: bool
    state: str  # ready | delayed | leased | dead
    not_before: float
    attempts: int
    token: str
    deadline: float
    entered_at: float  # when it was last placed in its key's order (or the unkeyed lane)
    ref: str | None  # while the message's ref names it (see "Refs" in backend.py)


M = TypeVar("M", bound=StoredMessage)

#: A weighted key's round in progress (deficit round robin): (services used in the round,
#: ready time, order) -- the place in the ready order it was served from, which it keeps
#: until it has used its weight's services or has to wait.
KeyRound = tuple[int, float, int]


class SeqCounters(Protocol):
    """A queue's seq counters (both start at SEQ_ORIGIN)."""

    head_seq: int
    tail_seq: int


class Store(Protocol[M]):
    """One queue of a backend inside one atomic step.

    Message changes name the columns that change (``**changes``: ``seq``, ``not_before``,
    ``token``, ``attempts``, ``at_head``); the store applies them with the state change and
    keeps its counts (ready, delayed, leased, dead, live messages per key) and indexes.
    """

    now: float
    name: str  # the queue's

    # -- counters and queue state
    @property
    def seqs(self) -> SeqCounters: ...
    def paused(self) -> bool: ...
    def record(self, counter: EventType, message_id: str, key: str | None, /) -> None:
        """Count one lifecycle step in this minute's metrics and publish it as an event."""

    # -- messages
    def message(self, message_id: str, /) -> M | None:
        """The queue's message ``message_id`` in any state (None: no such message here)."""
    def message_by_ref(self, ref: str, /) -> M | None:
        """The message ``ref`` names (the newest enqueued with it, while it is there)."""
    def message_info(self, msg: M, /) -> MessageInfo:
        """``msg`` as :meth:`Broker.get` shows it (see :func:`describe`)."""
    def forget(self, msg: M, /) -> None:
        """Delete a waiting (ready or delayed) message from every index and count it is in
        (its key's count too, its ref's entry); its dedup entry stays, as an ack leaves it."""
    def insert(self, message: Message, /, *, state: str, seq: int | None, not_before: float) -> str:
        """Store a new message (ready, or delayed); its id. A keyed one counts in its key;
        one with a ref takes the ref's entry (an older message carrying it loses it)."""
    def place(self, msg: M, /, **changes: object) -> None:
        """Into its key's order (or the unkeyed lane) as ready, entered now. A dead letter
        placed again leaves the dead letters and counts in its key again."""
    def delay(self, msg: M, due: float, /, **changes: object) -> None:
        """Out of its key's order until ``due``."""
    def dead_letter(self, msg: M, reason: str, /) -> None:
        """Into the dead letters (no longer counted in its key)."""
    def lease_message(self, msg: M, deadline: float, batch_id: str, batch_index: int, batch_size: int, /) -> Lease:
        """Leased now until ``deadline`` with a fresh token, one more attempt, as message
        ``batch_index`` of the ``batch_size`` of batch ``batch_id``."""
    def current(self, lease: Lease, /) -> M | None:
        """The leased message ``lease`` names while its token is current."""
    def take_acked(self, lease: Lease, /) -> M | None:
        """Delete the message ``lease`` names if its token is current; the message, or None."""
    def cut_batch(self, msg: M, /) -> list[M]:
        """Take ``msg`` and every later message out of its batch; the later ones (still
        leased), in batch order."""
    def close_batch(self, msg: M, /) -> bool:
        """Whether no message of ``msg``'s batch is unsettled any more (it is then forgotten)."""
    def set_deadline(self, msg: M, deadline: float, /) -> None: ...
    def due_delayed(self, limit: int, /) -> list[M]:
        """Up to ``limit`` delayed messages due now, earliest first."""
    def next_expired_lease(self) -> M | None:
        """The leased message whose deadline passed first, or None."""
    def dead_messages(self, ids: Sequence[str] | None, /) -> Iterable[M]:
        """Dead letters by id (all, oldest death first, when ``ids`` is None)."""

    # -- keys and the ready order
    def key_exists(self, key: str, /) -> bool:
        """Whether the key has live messages or slots in use."""
    def key_count(self, key: str, /) -> int: ...
    def key_slots(self, key: str, /) -> int: ...
    def set_key_slots(self, key: str, slots: int, /) -> None: ...
    def key_paused(self, key: str, /) -> bool: ...
    def key_interval(self, key: str, /) -> float | None: ...
    def key_last_delivery(self, key: str, /) -> float | None: ...
    def set_key_last_delivery(self, key: str, at: float | None, /) -> None: ...
    def drop_key(self, key: str, /) -> None:
        """The key holds no message and no slot: it leaves the ready order."""
    def key_ready_at(self, key: str, /) -> float | None:
        """The key's time in the ready order, None when it has no place."""
    def set_ready(self, key: str, at: float | None, /, order: int | None = None) -> None:
        """Give the key a place at ``at`` in the ready order (behind every key already
        there at that time; with ``order``, that order among them: a place it had
        before), or take its place away (None)."""
    def key_weight(self, key: str, /) -> int:
        """The key's weight (1 when none is set)."""
    def key_round(self, key: str, /) -> KeyRound | None:
        """The key's round in progress: services used and the place it keeps (None: none)."""
    def set_key_round(self, key: str, round: KeyRound | None, /) -> None: ...
    def head_times(self, key: str, /) -> tuple[float, float] | None:
        """(not_before, entered_at) of the key's first ready message, or None."""
    def key_heads(self, key: str, count: int, /) -> list[M]:
        """The key's first ``count`` ready messages, in order."""
    def key_tail(self, key: str, /) -> M | None:
        """The key's last ready message in its order (the one it would deliver last)."""
    def key_waiting(self, key: str, /) -> tuple[int, int]:
        """(ready, delayed): how many of the key's messages wait for delivery."""
    def queue_waiting(self) -> int:
        """How many messages of the queue (keyed or not) are ready or delayed."""
    def first_ready_key(self) -> tuple[float, int, str] | None:
        """(ready time, order, key) first in the ready order."""
    def lane_head(self) -> tuple[M, float, int] | None:
        """The unkeyed lane's first message, with (entered_at, entered order)."""
    def next_delayed_due(self) -> float | None: ...
    def next_deadline(self) -> float | None: ...

    # -- reads for key_facts (nothing changes)
    def key_head(self, key: str, /) -> HeadMessage | None:
        """The key's first ready message, as shown to people."""
    def first_delayed(self, keys: set[str], limit: int, /) -> dict[str, float]:
        """The due time of each key's first delayed message, found in the queue's delayed
        order (at most ``limit`` entries read)."""
    def held_batches(self, keys: set[str], limit: int, /) -> dict[str, list[HeldBatch]]:
        """Each key's batches in flight, found among the queue's leases (at most ``limit``
        read)."""

    # -- dedup
    def expired_dedup(self, limit: int, /) -> list[tuple[str, str]]:
        """Up to ``limit`` (dedup id, message id) entries whose window ended, soonest first."""
    def dedup_entry(self, dedup_id: str, /) -> tuple[str, float] | None:
        """(message id, expires) of a dedup id."""
    def set_dedup(self, dedup_id: str, message_id: str, expires: float, /) -> None: ...
    def drop_dedup(self, dedup_id: str, /) -> None: ...
    def pending(self, message_id: str, /) -> bool:
        """Whether the message is still ready or delayed."""


#: The store of a queue by name (None: a queue the backend never held), for operations
#: whose leases may name several queues.
StoreFor = Callable[[str], "Store[Any] | None"]


def next_seq(s: Store[M], at_head: bool) -> int:
    """A new place in the queue's order: the next head seq (before every other) or tail seq."""
    seqs = s.seqs
    if at_head:
        seqs.head_seq -= 1
        return seqs.head_seq
    seqs.tail_seq += 1
    return seqs.tail_seq


# -- scheduling -------------------------------------------------------------------------


def schedule(s: Store[M], key: str, now: float, *, keep_place: bool, settings: QueueSettings | None = None) -> None:
    """Give ``key`` a place in the ready order if its head message exists.

    ``keep_place``: a key already waiting keeps its earlier ready time (new arrivals must
    not push a waiting key to the back of the round). Only a head that *holds* the key
    (placed with a not-before time after it was placed: a retry or an ``at_head`` delay)
    pushes a key's time later. ``settings``: when given (arrivals: enqueue and promotion),
    a key that is not waiting and whose slots are all in use, or that is paused, is left
    out (it is scheduled again when a slot frees or on resume).

    A weighted key in the middle of its round (:func:`serve_key`) whose head does not hold
    it past ``now`` gets back the place it was served from instead of the back of the
    round; one whose head holds it (a retry, an ``at_head`` delay) or that has nothing
    ready ends its round. (serve_key ends the round before it schedules a key for a later
    ``now``: an interval.)
    """
    if not s.key_exists(key):
        return
    ready_at = s.key_ready_at(key)
    if settings is not None and ready_at is None and (
        s.key_slots(key) >= settings.key_concurrency or s.key_paused(key)
    ):
        return
    head = s.head_times(key)
    if head is None:
        if ready_at is not None:
            s.set_ready(key, None)
        if s.key_round(key) is not None:
            s.set_key_round(key, None)
        return
    not_before, entered_at = head
    holds_until = not_before if not_before > entered_at else 0.0
    at = max(now, holds_until)
    if keep_place and ready_at is not None:
        at = max(ready_at, holds_until)
    elif (round_ := s.key_round(key)) is not None:
        if holds_until <= now:
            s.set_ready(key, round_[1], round_[2])
            return
        s.set_key_round(key, None)
    if at != ready_at:
        s.set_ready(key, at)


# -- sweeps -----------------------------------------------------------------------------


def promote_due(s: Store[M], settings: QueueSettings | None) -> None:
    """Due delayed messages enter their keys' order (at most SWEEP_LIMIT per call)."""
    for msg in s.due_delayed(SWEEP_LIMIT):
        if msg.seq is None:
            s.place(msg, seq=next_seq(s, msg.at_head))
        else:
            s.place(msg)
        if msg.key is not None:
            schedule(s, msg.key, s.now, keep_place=True, settings=settings)


def expire_leases(s: Store[M], settings: QueueSettings) -> None:
    """Leases whose deadline passed fail (at most SWEEP_LIMIT per call)."""
    for _ in range(SWEEP_LIMIT):
        msg = s.next_expired_lease()
        if msg is None:
            return
        fail(s, msg, settings, delay=0.0, dead_reason=None, why="lease expired")


def expire_dedup(s: Store[M], dedup_id: str, message_id: str, settings: QueueSettings) -> tuple[str, float] | None:
    """An expired dedup entry is forgotten, except that with ``unique_while_pending`` a twin
    still ready or delayed keeps its claim for another window; the entry that remains."""
    if settings.unique_while_pending and s.pending(message_id):
        expires = s.now + settings.dedup_window
        s.set_dedup(dedup_id, message_id, expires)
        return message_id, expires
    s.drop_dedup(dedup_id)
    return None


def dedup_hit(s: Store[M], dedup_id: str, settings: QueueSettings) -> str | None:
    """The id of the message an enqueue with ``dedup_id`` duplicates, or None (the bounded
    sweep of expired entries ran before, once per call)."""
    entry = s.dedup_entry(dedup_id)
    if entry is None:
        return None
    if entry[1] <= s.now:  # the bounded sweep may have left it past its expiry
        entry = expire_dedup(s, dedup_id, entry[0], settings)
        if entry is None:
            return None
    if settings.unique_while_pending:
        return entry[0] if s.pending(entry[0]) else None
    return entry[0]


# -- failing, requeueing, settling ----------------------------------------------------------


def requeue(s: Store[M], msg: M, delay: float, position: RetryPosition, **changes: object) -> None:
    changes["token"] = ""
    seq = msg.seq
    if position == "tail":
        seq = None
        changes.update(seq=None, at_head=False)
    if msg.key is not None and position == "head":
        # Back to its place, holding the key until it is delivered again.
        s.place(msg, not_before=s.now + delay, **changes)
    elif delay > 0:
        s.delay(msg, s.now + delay, **changes)
    else:
        if seq is None:
            changes["seq"] = next_seq(s, False)
        s.place(msg, not_before=s.now, **changes)


def fail(
    s: Store, msg: M, settings: QueueSettings, *, delay: float, dead_reason: str | None, why: str
) -> None:
    """A leased message failed: retry or dead-letter it, and return the rest of its batch."""
    followers = s.cut_batch(msg)
    if dead_reason is not None:
        s.dead_letter(msg, dead_reason)
        s.record("dead", msg.id, msg.key)
    elif settings.max_deliveries is not None and msg.attempts >= settings.max_deliveries:
        s.dead_letter(msg, f"{why} after {msg.attempts} deliveries (max_deliveries={settings.max_deliveries})")
        s.record("dead", msg.id, msg.key)
    else:
        requeue(s, msg, delay, settings.retry_position)
        s.record("retried", msg.id, msg.key)
    return_unprocessed(s, followers)
    settled(s, msg)


def release(s: Store[M], msg: M) -> None:
    """Give a leased message back uncounted, with the rest of its batch."""
    followers = s.cut_batch(msg)
    return_unprocessed(s, [msg, *followers])
    settled(s, msg)


def return_unprocessed(s: Store[M], messages: Sequence[M]) -> None:
    """Back to their places, in order; they were never processed, so their deliveries
    do not count."""
    for msg in messages:
        requeue(s, msg, 0.0, "head", attempts=msg.attempts - 1)


def settled(s: Store[M], msg: M) -> None:
    """Release the key's slot once the last message of a batch is settled."""
    if not s.close_batch(msg) or msg.key is None:
        return
    key = msg.key
    slots = s.key_slots(key)
    if not slots:
        return
    s.set_key_slots(key, slots - 1)
    if slots == 1 and not s.key_count(key):
        s.drop_key(key)
        return
    schedule(s, key, s.now, keep_place=False)


# -- the operations ---------------------------------------------------------------------


def plan_limits(s: Store[M], messages: Sequence[Message], settings: QueueSettings) -> QueueFull | set[int]:
    """Under the backpressure limits: why the call must be refused whole, or the indexes of
    the messages that must each drop one of their key's ready messages to go in. Nothing
    is written. The enqueue is played through on counts, in order: a duplicate (of a
    stored message or of an earlier one of the call) adds nothing; an ``at_head`` message
    (a framework's retry taking its place back) is never refused and never drops one, but
    counts; a keyed message finding its key full is refused under ``on_full="reject"``,
    else it takes the place of one of the key's ready messages (refused when there is none:
    the key's waiting messages are all delayed); ``max_pending`` refuses any message that
    would make the queue's waiting messages more than it."""
    per_key, total = settings.max_pending_per_key, settings.max_pending
    queue_waiting = s.queue_waiting() if total is not None else 0
    keys: dict[str, list[int]] = {}  # key -> [waiting, ready]
    seen: set[str] = set()
    drops: set[int] = set()
    for index, m in enumerate(messages):
        if m.dedup_id is not None:
            if m.dedup_id in seen or dedup_hit(s, m.dedup_id, settings) is not None:
                continue
            seen.add(m.dedup_id)
        becomes_ready = m.delay <= 0 or m.at_head
        grows = True
        if per_key is not None and m.key is not None:
            counts = keys.get(m.key)
            if counts is None:
                ready, delayed = s.key_waiting(m.key)
                counts = keys[m.key] = [ready + delayed, ready]
            if counts[0] >= per_key and not m.at_head:
                if settings.on_full == "reject":
                    return QueueFull(s.name, m.key, "max_pending_per_key", per_key)
                if not counts[1]:
                    return QueueFull(
                        s.name, m.key, "max_pending_per_key", per_key,
                        f"on_full={settings.on_full!r} found no ready message to drop (all are delayed)",
                    )
                counts[1] -= 1  # the dropped one
                grows = False
                drops.add(index)
            counts[0] += grows
            counts[1] += becomes_ready
        if total is not None and grows:
            if queue_waiting >= total and not m.at_head:
                return QueueFull(s.name, None, "max_pending", total)
            queue_waiting += 1
    return drops


def room_for(s: Store[M], key: str, settings: QueueSettings) -> M | None:
    """The ready message of ``key`` that a new one replaces (plan_limits found the key
    full): its first under ``drop_oldest``, its last under ``replace``."""
    if settings.on_full == "drop_oldest":
        heads = s.key_heads(key, 1)
        return heads[0] if heads else None
    return s.key_tail(key)


def enqueue_many(s: Store[M], messages: Sequence[Message], settings: QueueSettings) -> list[str]:
    # Due delayed messages entered their keys' order when they fell due: before anything
    # enqueued now.
    promote_due(s, settings)
    if any(m.dedup_id is not None for m in messages):
        for dedup_id, message_id in s.expired_dedup(SWEEP_LIMIT):
            expire_dedup(s, dedup_id, message_id, settings)
    drops: set[int] = set()
    if settings.max_pending_per_key is not None or settings.max_pending is not None:
        plan = plan_limits(s, messages, settings)
        if isinstance(plan, QueueFull):
            raise plan
        drops = plan
    ids = []
    for index, m in enumerate(messages):
        if m.dedup_id is not None:
            first = dedup_hit(s, m.dedup_id, settings)
            if first is not None:
                ids.append(first)
                continue
        # Chosen before the new message goes in: it is never the one dropped.
        dropped = room_for(s, m.key, settings) if index in drops and m.key is not None else None
        holds_key = m.at_head and m.key is not None
        if m.delay > 0 and not holds_key:
            mid = s.insert(m, state="delayed", seq=None, not_before=s.now + m.delay)
        else:
            mid = s.insert(m, state="ready", seq=next_seq(s, m.at_head), not_before=s.now + m.delay)
            if m.key is not None:
                schedule(s, m.key, s.now, keep_place=True, settings=settings)
        if m.dedup_id is not None:
            s.set_dedup(m.dedup_id, mid, s.now + settings.dedup_window)
        s.record("enqueued", mid, m.key)
        if dropped is not None and m.key is not None:
            # After the new message went in, so the key keeps its place in the round.
            s.dead_letter(dropped, DROPPED_REASON)
            s.record("dead", dropped.id, m.key)
            schedule(s, m.key, s.now, keep_place=True, settings=settings)
        ids.append(mid)
    return ids


def lease(s: Store[M], limit: int, per_key: int, visibility_timeout: float, settings: QueueSettings) -> LeaseResult:
    """Due delayed messages in, expired leases out, then ready keys (and the unkeyed lane,
    each of its messages as if its own key) served in order of their ready times."""
    promote_due(s, settings)
    expire_leases(s, settings)
    now = s.now
    leases: list[Lease] = []
    while len(leases) < limit and not s.paused():
        entry = s.first_ready_key()
        lane = s.lane_head()
        key_due = entry is not None and entry[0] <= now
        if lane is not None and (entry is None or not key_due or (lane[1], lane[2]) < (entry[0], entry[1])):
            head = lane[0]
            leases.append(s.lease_message(head, now + visibility_timeout, head.id, 0, 1))
            s.record("delivered", head.id, None)
            continue
        if entry is None or not key_due:
            break
        leases.extend(
            serve_key(s, entry[2], min(per_key, limit - len(leases)), visibility_timeout, settings, (entry[0], entry[1]))
        )
    return LeaseResult(leases, None if leases else retry_in(s))


def serve_key(
    s: Store[M], key: str, count: int, visibility_timeout: float, settings: QueueSettings, place: tuple[float, int]
) -> list[Lease]:
    """Serve one key taken from the ready order at ``place`` (its ready time and order):
    one batch of up to ``count`` consecutive due messages, unless its slots, pause,
    interval or head say it must wait.

    Weighted fairness (deficit round robin over the ready order): a key of weight w keeps
    ``place`` for up to w consecutive services (its round, see :func:`schedule`), then
    goes to the back of the round like every key of weight 1."""
    now = s.now
    slots = s.key_slots(key)
    s.set_ready(key, None)
    if s.key_paused(key) or slots >= settings.key_concurrency:
        if s.key_round(key) is not None:
            s.set_key_round(key, None)
        return []  # scheduled again on resume or when a slot frees
    interval = s.key_interval(key)
    if interval is None:
        interval = settings.interval
    last_delivery = s.key_last_delivery(key)
    if last_delivery is not None and last_delivery + interval > now:
        if s.key_round(key) is not None:
            s.set_key_round(key, None)
        schedule(s, key, last_delivery + interval, keep_place=False)
        return []
    heads = s.key_heads(key, count)
    batch = []
    for head in heads:
        if head.not_before > now:
            break
        batch.append(head)
    if not batch:
        schedule(s, key, now, keep_place=False)
        return []
    batch_id = batch[0].id
    leases = []
    for index, msg in enumerate(batch):
        leases.append(s.lease_message(msg, now + visibility_timeout, batch_id, index, len(batch)))
        s.record("delivered", msg.id, key)
    s.set_key_slots(key, slots + 1)
    s.set_key_last_delivery(key, now if interval else None)
    # A key that waits an interval between deliveries goes to the back: no round.
    weight = 1 if interval else s.key_weight(key)
    round_ = s.key_round(key)
    if weight > 1:
        turns = round_[0] + 1 if round_ is not None and (round_[1], round_[2]) == place else 1
        s.set_key_round(key, (turns, *place) if turns < weight else None)
    elif round_ is not None:
        s.set_key_round(key, None)
    if slots + 1 < settings.key_concurrency:
        schedule(s, key, now + interval if interval else now, keep_place=False)
    return leases


def retry_in(s: Store[M]) -> float | None:
    """Seconds until a lease may find work (None: nothing will come by itself)."""
    if s.paused():
        return None
    entry = s.first_ready_key()
    times = [t for t in (entry[0] if entry else None, s.next_delayed_due(), s.next_deadline()) if t is not None]
    return max(0.0, min(times) - s.now) if times else None


def ack_many(store_for: StoreFor, leases: Sequence[Lease]) -> list[bool]:
    results = []
    for lease in leases:
        s = store_for(lease.queue)
        results.append(s is not None and ack(s, lease))
    return results


def ack(s: Store[M], lease: Lease) -> bool:
    msg = s.take_acked(lease)
    if msg is None:
        return False
    settled(s, msg)
    s.record("acked", msg.id, msg.key)
    return True


def nack(s: Store[M], lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings) -> bool:
    msg = s.current(lease)
    if msg is None:
        return False
    promote_due(s, settings)  # before a tail retry takes its seq
    fail(s, msg, settings, delay=delay, dead_reason=(reason or "rejected") if dead else None, why=reason or "nacked")
    return True


def release_many(store_for: StoreFor, leases: Sequence[Lease]) -> list[bool]:
    """One bool per lease: whether its token was current at the start of the call."""
    stores = [store_for(lease.queue) for lease in leases]
    was_current = [s is not None and s.current(lease) is not None for s, lease in zip(stores, leases)]
    for s, lease, given in zip(stores, leases, was_current):
        if s is None or not given:
            continue
        # Still current unless an earlier release of this call returned it with its batch.
        msg = s.current(lease)
        if msg is not None:
            release(s, msg)
    return was_current


def extend_many(
    store_for: StoreFor, leases: Sequence[Lease], visibility_timeouts: Sequence[float]
) -> list[float | None]:
    deadlines = []
    for lease, visibility_timeout in zip(leases, visibility_timeouts):
        s = store_for(lease.queue)
        deadlines.append(None if s is None else extend(s, lease, visibility_timeout))
    return deadlines


def extend(s: Store[M], lease: Lease, visibility_timeout: float) -> float | None:
    """The lease's new deadline, None for a stale token. Among leases expiring at the same
    time, a lease keeps the place of its delivery, extended or not."""
    msg = s.current(lease)
    if msg is None:
        return None
    deadline = s.now + visibility_timeout
    if deadline != msg.deadline:
        s.set_deadline(msg, deadline)
    return deadline


def replay(s: Store[M], ids: Sequence[str] | None, position: RetryPosition) -> int:
    promote_due(s, None)  # before replayed messages take their seqs
    messages = sorted(s.dead_messages(ids), key=lambda m: (m.priority, m.seq or 0))
    if position == "head":
        messages.reverse()  # each takes a seq ahead of the previous one
    for msg in messages:
        s.place(msg, attempts=0, reason="", seq=next_seq(s, position == "head"), not_before=s.now)
        if msg.key is not None:
            schedule(s, msg.key, s.now, keep_place=True)
    return len(messages)


def cancel(s: Store[M], message_id: str | None, settings: QueueSettings, ref: str | None = None) -> CancelResult:
    """Delete a waiting or delayed message (by id, or by ref when ``message_id`` is None)
    for good; a leased or dead one is refused.

    When it was its key's head, the key moves on to its next message, scheduled as an
    arrival would be (``settings``: a key whose slots are all in use, or that is paused,
    gets no place): a waiting key keeps its place, unless that place came from the
    cancelled head's hold (a retry or an ``at_head`` delay not yet due), which goes with
    it. Nothing is swept, counted or published."""
    msg = find(s, message_id, ref)
    if msg is None:
        return CancelResult(s.name, message_id, False, None, ref=ref)
    state = PUBLIC_STATES[msg.state]
    if state in ("leased", "dead"):
        return CancelResult(s.name, msg.id, False, state, msg.key, msg.ref)
    key, ref = msg.key, msg.ref
    was_head = False
    if key is not None and msg.state == "ready":
        heads = s.key_heads(key, 1)
        was_head = bool(heads) and heads[0].id == msg.id
    held = msg.not_before > msg.entered_at and msg.not_before > s.now
    s.forget(msg)
    if was_head and key is not None:
        schedule(s, key, s.now, keep_place=not held, settings=settings)
    return CancelResult(s.name, msg.id, True, state, key, ref)


def find(s: Store[M], message_id: str | None, ref: str | None) -> M | None:
    """The message named by id, or by ref when ``message_id`` is None."""
    if message_id is not None:
        return s.message(message_id)
    return None if ref is None else s.message_by_ref(ref)


def get(s: Store[M], message_id: str | None, ref: str | None = None) -> MessageInfo | None:
    msg = find(s, message_id, ref)
    return None if msg is None else s.message_info(msg)


# A store's message states as people see them.
PUBLIC_STATES: dict[str, MessageState] = {"ready": "waiting", "delayed": "delayed", "leased": "leased", "dead": "dead"}


def describe(
    queue: str, message_id: str, key: str | None, state: str, *, priority: int, attempts: int, enqueued_at: float,
    size: int, dedup_id: str | None, not_before: float, deadline: float | None, leased_at: float | None,
    reason: str, died_at: float, ref: str | None,
) -> MessageInfo:
    """A message as :meth:`Broker.get` shows it, from what a store (or Redis) keeps: only
    the times and the reason that mean something in its state are shown."""
    public = PUBLIC_STATES[state]
    leased, dead = public == "leased", public == "dead"
    return MessageInfo(
        queue=queue, id=message_id, key=key, state=public, priority=priority, attempts=attempts,
        enqueued_at=enqueued_at, size=size, dedup_id=dedup_id,
        available_at=not_before if public in ("waiting", "delayed") else None,
        lease_deadline=deadline if leased else None,
        leased_at=(leased_at or None) if leased else None,  # 0: leased by a version that did not record it
        dead_reason=reason if dead else None,
        died_at=died_at if dead else None,
        ref=ref,
    )


def key_facts(s: Store[M], keys: Sequence[str]) -> list[KeyFacts]:
    """What :func:`sharded_broker.diagnosis.diagnose` needs about each key, read in the
    store's one atomic step: per key its counts, settings and head; then once for all the
    keys the queue's leases in flight (for the keys holding a slot) and its delayed order
    (for the keys with nothing ready), at most WHY_READ_LIMIT entries each."""
    heads = {key: s.key_head(key) for key in keys}
    waiting = {key for key, head in heads.items() if head is None}
    next_delayed = s.first_delayed(waiting, WHY_READ_LIMIT) if waiting else {}
    holding = {key for key in keys if s.key_slots(key)}
    holds = s.held_batches(holding, WHY_READ_LIMIT) if holding else {}
    queue_paused = s.paused()
    return [
        KeyFacts(
            queue=s.name,
            key=key,
            now=s.now,
            queue_paused=queue_paused,
            key_paused=s.key_paused(key),
            backlog=s.key_count(key),
            slots=s.key_slots(key),
            head=heads[key],
            next_delayed=next_delayed.get(key),
            ready_at=s.key_ready_at(key),
            last_delivery=s.key_last_delivery(key),
            own_interval=s.key_interval(key),
            weight=s.key_weight(key),
            holds=tuple(sorted(holds.get(key, ()), key=lambda hold: (hold.deadline, hold.message_id))),
        )
        for key in keys
    ]


def set_weight(s: Store[M], key: str) -> None:
    """After a key's weight changed: its round in progress ends (its place stays)."""
    if s.key_round(key) is not None:
        s.set_key_round(key, None)


def reschedule(s: Store[M], key: str) -> None:
    """After a key's own setting changed (its interval set, its pause ended): its place
    follows the new setting."""
    schedule(s, key, s.now, keep_place=False)
