"""The contract every storage backend keeps.

A backend stores one or more named queues. Inside a queue, messages are grouped by shard
key. The :class:`~sharded_broker.broker.Broker` validates arguments and resolves settings
before it calls a backend, so backends receive only checked values and never raise for
bad input.

The guarantees below are pinned by ``tests/test_conformance.py``, which runs against every
backend with the memory backend as the reference model. docs/design.md shows where each
is kept: the memory and SQLite backends share one implementation of these rules
(``backends/planner.py``), the Redis backend runs them in Lua.

Ordering
    Within a (queue, key), ready messages are ordered by ``(priority, seq)``: lower
    priority first, then enqueue order. ``seq`` comes from a per-queue counter: new messages
    take the next *tail* seq; ``at_head`` enqueues and head replays take the next *head*
    seq, which sorts before every tail seq. A message that goes back for retry or after a
    lease expiry keeps its seq (with ``retry_position="head"``) and so returns to its
    place ahead of everything enqueued after it; with ``"tail"`` it takes a new tail seq.
    Unkeyed messages (key ``None``) form one *unkeyed lane* per queue, ordered the same
    way, with no limit on how many are leased at once.

Holding a key
    A key holds at most ``key_concurrency`` *slots*. A lease call takes one slot per key it
    serves, for a batch of up to ``per_key`` consecutive due messages. The slot is released
    when every message of the batch is settled (acked, dead-lettered, or returned).

Delays
    A message enqueued with a delay waits outside its key's order and enters it (taking a
    fresh seq, or a head seq with ``at_head``) once due; it never blocks due messages of
    its key. Exceptions, which *hold* the key until the message is delivered: a keyed
    message enqueued ``at_head`` with a delay, and a keyed retry (nack with a delay, or
    lease expiry) with ``retry_position="head"``.

Fairness
    Each key with a deliverable head message is *ready* from a time: the latest of when it
    became eligible, its head's not-before time and its last delivery plus its interval.
    Lease serves ready keys in order of that time; a served key that is still eligible
    becomes ready again at the serving time, so it goes behind every key already waiting:
    round-robin. The unkeyed lane takes part as if each unkeyed message were its own key,
    ready from when it entered the lane.

Deliveries and dead letters
    ``attempts`` counts deliveries. When a leased message is nacked for retry or its lease
    expires and its attempts have reached ``max_deliveries``, it is dead-lettered instead
    of returned. When one message of a batch is nacked, dead-lettered or expires, every
    later unsettled message of the batch is returned too, in order, and its attempt does
    not count.

Release
    A release gives a leased message back without counting its delivery: it returns to its
    place (its seq, with no delay, whatever ``retry_position`` says), its ``attempts`` go
    back down by one and it is never dead-lettered by this. Like a nack, releasing one
    message of a batch returns every later unsettled message of the batch too, in order
    (their attempts also go down by one), and the key's slot is freed once the batch is
    settled. A release is neither counted in the metrics nor published as an event: the
    delivery that handed the message out stays counted as ``delivered`` in its minute, and
    its next delivery is counted again.

Cancel
    A waiting (ready, or a retry holding its key) or delayed message can be cancelled by
    id: it is deleted from every index and its key's count, as if it had been acked
    unleased, so its dedup entry stays exactly as an ack leaves it (with
    ``unique_while_pending`` an equal message may be enqueued again at once; otherwise
    an enqueue with its dedup id within the window still answers its id). When it was its
    key's head, the key's next message becomes the head and the key is scheduled as an
    arrival would be (it keeps its place in the ready order, except that a place the
    cancelled head held by its not-before time is given up: the key is ready from now,
    or from its new head's hold). A leased or dead message is refused (nothing changes).
    A cancel is neither counted in the metrics nor published as an event (an operator
    action, like purge) and sweeps nothing (no promotion, no lease expiry).

Refs
    A message may carry a ref (``Message.ref``, the caller's own name for it). Each queue
    indexes ref -> id of the newest message enqueued with that ref (a duplicate dropped
    by dedup is not enqueued): an older message that carried it loses it (its lease,
    ``get`` and the index no longer show it), so a ref names at most one message. The
    entry goes with its message, by every path that deletes one (ack, cancel, purge); a
    dead letter keeps it until it is purged. ``cancel`` and ``get`` take a ref instead of
    an id, looked up in the same atomic step. A message without a ref costs nothing.

Metrics
    Each operation counts, in the same atomic step, per minute of the backend's clock and
    per queue and per key: messages enqueued (duplicates dropped by dedup are not),
    delivered, acked, retried (nacked for retry, or returned when a lease expired) and
    dead-lettered. Minutes older than the ``metrics_window`` connect option (default one
    hour; per-key minutes: ``key_metrics_window``, default the same) are never reported
    and are forgotten a few at a time by later operations.

Events
    With events on, the same five steps are published to subscribers of the queue
    (:meth:`Backend.subscribe`), in the order they happened, at most once each: a
    subscriber sees the steps that happen while it is subscribed (a slow or absent
    subscriber never slows or blocks an operation).

Time
    Every time (enqueue time, not-before, deadline, interval) comes from the backend's own
    clock (:meth:`Backend.now`), never from the caller's.

Schedules
    A queue may hold recurrent messages by name (:class:`~sharded_broker.models.Schedule`).
    The engine computes every due time (``sharded_broker/recurrence.py``); a backend
    stores them and fires a schedule with a compare-and-set: :meth:`Backend.fire_schedule`
    enqueues the schedule's message only while its stored next due time is still the one
    the caller read, and advances it in the same atomic step, so however many consumers
    race to fire one period, exactly one message is enqueued for it.

Errors
    A backend raises only the project's errors (``sharded_broker.errors``), never its
    client library's: ``BackendUnavailable`` when the store cannot be reached, times out,
    is full or read-only (the call may or may not have taken effect), ``BackendError``
    for any other failure of the store, ``InvalidURL`` or ``ConfigurationError`` from
    ``from_url`` for a URL, option or store that cannot serve. Every one is a
    ``ShardedBrokerError``, which is what the command line and the Prometheus collector
    catch.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from typing import Any, Literal, Mapping, Sequence

from .errors import ConfigurationError
from .models import (
    CancelResult, DeadLetter, Event, KeyFacts, KeyInfo, Lease, LeaseResult, Message, MessageInfo, MinuteMetrics,
    QueueSettings, QueueStats, RetryPosition, Schedule,
)

KeySort = Literal["backlog", "lag"]

# Compact JSON, as json.dumps(separators=(",", ":")) writes it; built once, because
# json.dumps builds an encoder on every call given any option (half its time for a
# message's two headers). Encoding keeps no state in the encoder: threads share it.
compact_json = json.JSONEncoder(separators=(",", ":")).encode


def headers_text(headers: Mapping[str, Any] | None) -> str:
    """A message's headers as the Redis and SQLite backends store them: compact JSON."""
    if not headers:
        return "{}"
    return compact_json(headers if type(headers) is dict else dict(headers))

DEFAULT_METRICS_WINDOW = 3600.0
# Bounded cleanup: an operation forgets at most this many expired metric entries.
METRICS_SWEEP_LIMIT = 20
# key_facts reads at most this many entries of a queue's delayed (or leases) order to find
# one key's first delayed message (or its leases in flight).
WHY_READ_LIMIT = 10_000


def metrics_window_option(value: Any) -> float:
    """A checked ``metrics_window`` connect option (seconds of per-minute metrics kept)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 60 <= value <= 7 * 24 * 3600:
        raise ConfigurationError(f"metrics_window must be a number of seconds from 60 to 604800, not {value!r}")
    return float(value)


def key_metrics_window_option(value: Any, metrics_window: float) -> float:
    """A checked ``key_metrics_window`` connect option: seconds of per-key per-minute
    metrics kept (None: as long as ``metrics_window``). Never longer than
    ``metrics_window``, so a key's minutes never outlive its queue's."""
    if value is None:
        return metrics_window
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 60 <= value <= metrics_window:
        raise ConfigurationError(
            f"key_metrics_window must be a number of seconds from 60 to metrics_window ({metrics_window:g}), not {value!r}"
        )
    return float(value)


def events_option(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"events must be True or False, not {value!r}")
    return value


def minute_of(t: float) -> float:
    """The start of the minute holding ``t``."""
    return math.floor(t / 60) * 60.0


def kept_minutes(window: float) -> int:
    """How many minutes, the current one included, a window of ``window`` seconds keeps."""
    return max(1, math.ceil(window / 60))


def expired_before(now: float, window: float) -> float:
    """Metric minutes starting before this time have left the window."""
    return minute_of(now) - (kept_minutes(window) - 1) * 60


def metric_minutes(now: float, minutes: int, window: float) -> list[float]:
    """The minute starts a metrics query answers for, oldest first: the last ``minutes``
    minutes up to the current one, never older than the window."""
    current = minute_of(now)
    count = min(minutes, kept_minutes(window))
    return [current - 60 * i for i in reversed(range(count))]


class Backend(ABC):
    """Storage and the atomic operations of the engine. Thread-safe."""

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, **options: Any) -> "Backend":
        """A backend for ``url``. Unknown ``options`` raise ConfigurationError naming them."""

    @abstractmethod
    def now(self) -> float:
        """The backend's clock, seconds since the epoch."""

    @abstractmethod
    def enqueue_many(self, queue: str, messages: Sequence[Message], settings: QueueSettings) -> list[str]:
        """Store ``messages`` atomically, in order; return their ids.

        A message whose ``dedup_id`` was seen within ``settings.dedup_window`` (or, with
        ``settings.unique_while_pending``, whose earlier twin is still ready or delayed)
        is dropped and the earlier message's id is returned in its place. Ids are
        fresh unique strings chosen by the backend.
        """

    @abstractmethod
    def lease(
        self, queue: str, limit: int, per_key: int, visibility_timeout: float, settings: QueueSettings
    ) -> LeaseResult:
        """Deliver up to ``limit`` messages without waiting.

        First, due delayed messages enter their keys' order and expired leases are
        returned (or dead-lettered); then ready keys are served in fairness order, each
        giving one batch of up to ``per_key`` consecutive due messages.
        """

    @abstractmethod
    def ack_many(self, leases: Sequence[Lease]) -> list[bool]:
        """Settle leases for good. A lease whose token is not current is refused (False)."""

    @abstractmethod
    def nack(
        self, lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings
    ) -> bool:
        """Return a leased message for retry after ``delay``, or dead-letter it.

        Refused (False, nothing changed) when the token is not current.
        """

    @abstractmethod
    def release_many(self, leases: Sequence[Lease]) -> list[bool]:
        """Give leased messages back without counting their deliveries (see "Release"
        above) in one round trip, atomically per queue.

        One bool per lease: True when its token was current at the start of the call (a
        lease returned together with an earlier one of its batch in the same call counts
        as given back); False, nothing changed for it, when its token was not current.
        """

    @abstractmethod
    def extend(self, lease: Lease, visibility_timeout: float) -> float | None:
        """Move a lease's deadline to now + ``visibility_timeout``; the new deadline, or
        ``None`` when the token is not current."""

    @abstractmethod
    def extend_many(self, leases: Sequence[Lease], visibility_timeouts: Sequence[float]) -> list[float | None]:
        """``extend`` for several leases (lease i by ``visibility_timeouts[i]``) in one
        round trip: one new deadline per lease, ``None`` for a stale token."""

    @abstractmethod
    def set_interval(self, queue: str, key: str, seconds: float | None) -> None:
        """Persist a key's minimum interval between deliveries (``None``: queue default)."""

    @abstractmethod
    def set_weight(self, queue: str, key: str, weight: int | None) -> None:
        """Persist a key's weight in the fairness order (an int > 1; ``None``: weight 1).
        The key keeps its place; a round in progress ends (see planner.serve_key)."""

    @abstractmethod
    def set_paused(self, queue: str, key: str | None, paused: bool) -> None:
        """Pause or resume a key (or with ``key=None``, the whole queue). Leases held go on."""

    @abstractmethod
    def stats(self, queue: str) -> QueueStats:
        """Counts for one queue, without scanning messages."""

    @abstractmethod
    def queues(self) -> list[str]:
        """Names of the queues that have ever held a message, sorted."""

    @abstractmethod
    def dead_letters(self, queue: str, limit: int, offset: int) -> list[DeadLetter]:
        """Dead letters, oldest death first."""

    @abstractmethod
    def replay(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> int:
        """Move dead letters (all when ``ids`` is None) back into service with attempts
        reset; the number moved. At ``"head"`` they keep their relative order."""

    @abstractmethod
    def purge(self, queue: str, dead: bool) -> int:
        """Delete every ready and delayed message (``dead=True``: every dead letter); the
        number deleted. Leased messages are left to their holders."""

    @abstractmethod
    def cancel(
        self, queue: str, message_id: str | None, settings: QueueSettings, ref: str | None = None
    ) -> CancelResult:
        """Delete a waiting or delayed message (named by id, or by ref when ``message_id``
        is None) for good (see "Cancel" above), atomically; refuse a leased or dead one.
        One index lookup for the message, plus what scheduling its key reads when it was
        the head."""

    @abstractmethod
    def get(self, queue: str, message_id: str | None, ref: str | None = None) -> MessageInfo | None:
        """The message ``message_id`` (or, when None, the one ``ref`` names) of ``queue``
        and what it is doing now (None: no such message there, or acked, or cancelled). An
        index lookup by id (or ref); for a leased message
        on Redis, its lease is found among the queue's leases (at most ``WHY_READ_LIMIT``
        read)."""

    @abstractmethod
    def bind(self, exchange: str, queue: str) -> None:
        """Record that messages published to ``exchange`` go to ``queue`` (fanout routing
        shared by every process, e.g. Celery's broadcast and remote-control exchanges)."""

    @abstractmethod
    def unbind(self, exchange: str, queue: str) -> None:
        """Forget one binding; unknown bindings are ignored."""

    @abstractmethod
    def bound_queues(self, exchange: str) -> list[str]:
        """The queues bound to ``exchange``, sorted."""

    #: How late a :meth:`wait` may end after its timeout (seconds). The engine sleeps
    #: waits shorter than this itself, so a message due soon is delivered on time.
    wait_resolution: float = 0.0

    @abstractmethod
    def wait(self, queue: str, timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when work may have arrived.

        Must not busy-poll: a consumer waiting on an idle queue costs at most about ten
        backend calls a second.
        """

    def wait_any(self, queues: Sequence[str], timeout: float) -> None:
        """:meth:`wait` over several queues at once: return early when work may have
        arrived in any of them (a consumer of several queues, such as a Celery worker
        with its remote-control queue, blocks in one call).

        This default suits backends whose ``wait`` wakes on any change of the store
        (memory, SQLite); a backend that waits per queue overrides it.
        """
        if queues:
            self.wait(queues[0], timeout)

    @abstractmethod
    def metrics(self, queue: str, minutes: int, key: str | None) -> list[MinuteMetrics]:
        """Counts per minute for the queue (or one key), oldest first, one entry per minute
        (zeros included) for the last ``minutes`` minutes within the metrics window (for
        one key: the key metrics window)."""

    @abstractmethod
    def keys(self, queue: str, limit: int, sort: KeySort) -> list[KeyInfo]:
        """Up to ``limit`` keys with a backlog, largest backlog (or lag) first, ties by key.

        ``"backlog"`` reads an index ordered by backlog (no scan); ``"lag"`` looks up the
        head of every key with a backlog (one index read per key, never every message).
        """

    @abstractmethod
    def key_info(self, queue: str, key: str) -> KeyInfo:
        """One key with its head message (zeros and ``head=None`` for an unknown key)."""

    @abstractmethod
    def key_facts(self, queue: str, keys: Sequence[str]) -> list[KeyFacts]:
        """What :func:`~sharded_broker.diagnosis.diagnose` needs to say why each key is not
        moving, one :class:`KeyFacts` per key, in one consistent snapshot (one round trip).

        Per key: O(log n) index lookups for its state, head, interval and pause; when it
        holds a slot, its holds are found among the queue's leases in flight (O(L), L the
        queue's leased messages, bounded by its consumers' prefetch, not by its backlog;
        at most ``WHY_READ_LIMIT`` read); ``next_delayed`` is looked up only when nothing
        is ready, in the queue's delayed order up to the key's first delayed message (at
        most ``WHY_READ_LIMIT`` entries read, else ``None``). Unknown keys answer zeros.
        """

    @abstractmethod
    def head_times(self, queue: str, keys: Sequence[str]) -> tuple[float, list[float | None]]:
        """The backend's time, and the enqueue time of each key's head message (``None``:
        nothing ready), in one round trip: an index read or two per key, so that a scan
        for stuck keys reads in full only the keys whose head is old."""

    @abstractmethod
    def backlog_keys(self, queue: str, offset: int, count: int) -> list[str]:
        """Up to ``count`` keys with a backlog from position ``offset`` of the backlog
        order (largest backlog first, ties by key): a page of a bounded scan of every key
        (``keys --stuck``). Pages read while keys change may skip or repeat a key."""

    # -- schedules (recurrent messages; see "Schedules" above) ---------------------------

    @abstractmethod
    def put_schedule(self, queue: str, schedule: Schedule) -> Schedule:
        """Store ``schedule`` under its name, replacing one of the same name, atomically;
        the schedule as stored. A replaced schedule keeps its ``paused``, ``last_fired``
        and ``fired``, and its ``next_due`` too when its ``every`` and ``cron`` are
        unchanged (so processes declaring the same schedule at start-up never push its
        next firing back)."""

    @abstractmethod
    def schedules(self, queue: str) -> list[Schedule]:
        """Every schedule of ``queue``, by name."""

    @abstractmethod
    def due_schedules(self, queue: str, limit: int) -> tuple[float, list[Schedule]]:
        """The backend's time, and up to ``limit`` schedules of ``queue`` not paused whose
        ``next_due`` is at or before it, earliest first (equal times by name, so every
        backend fires them in one order): one index read when none is due
        (what every consumer calls about once a second)."""

    @abstractmethod
    def fire_schedule(
        self, queue: str, name: str, expected_due: float, next_due: float, message: Message, settings: QueueSettings
    ) -> str | None:
        """If schedule ``name`` exists, is not paused and its stored ``next_due`` still
        equals ``expected_due``: in one atomic step set its ``next_due`` to ``next_due``,
        its ``last_fired`` to now, count it in ``fired``, and enqueue ``message`` as
        :meth:`enqueue_many` would; the message's id. Otherwise change nothing and
        answer None (another consumer fired this period, or the schedule changed). A
        backpressure limit refuses the firing as it refuses an enqueue (QueueFull) and
        then nothing changes either: the period fires at a later look."""

    @abstractmethod
    def set_schedule_paused(self, queue: str, name: str, paused: bool, next_due: float | None) -> bool:
        """Pause or resume a schedule, and with ``next_due`` given set its next due time
        too (a resume starts from the next period after now); False for an unknown name."""

    @abstractmethod
    def remove_schedule(self, queue: str, name: str) -> bool:
        """Forget a schedule; False for an unknown name."""

    @abstractmethod
    def subscribe(self, queue: str) -> "EventSubscription":
        """Start receiving ``queue``'s events. ConfigurationError when events are off."""

    def close(self) -> None:
        """Release connections. The default does nothing."""


class EventSubscription(ABC):
    """Events of one queue from the moment of subscribing, in order."""

    @abstractmethod
    def get(self, timeout: float) -> list[Event]:
        """The events received since the last call, waiting up to ``timeout`` seconds for
        the first (an empty list when none came)."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving."""
