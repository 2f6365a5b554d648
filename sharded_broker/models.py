"""The values that cross the engine's API: messages in, leases out, settings and stats."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

RetryPosition = Literal["head", "tail"]
OnFull = Literal["reject", "drop_oldest", "replace"]
# The reason of a message that max_pending_per_key dropped (drop_oldest, replace) to make
# room: it goes to the dead letters with this reason, so it is counted and can be replayed.
DROPPED_REASON = "dropped: max_pending_per_key"


@dataclass
class Message:
    """A message to enqueue. Only ``payload`` is required.

    ``key`` is the shard key (``None``: unkeyed, no ordering constraint). Lower
    ``priority`` numbers are delivered first within a key (and within the unkeyed lane).
    ``delay`` is seconds before the message enters its key's order. ``at_head`` places it
    ahead of everything of its priority already queued for its key (a lower priority
    number still comes first); with a delay it *holds* the key until
    it is delivered (what framework-level retries use to keep a key's order).
    ``ref`` is the caller's own name for the message (a Celery task id, a Dramatiq message
    id): :meth:`~sharded_broker.broker.Broker.cancel` and
    :meth:`~sharded_broker.broker.Broker.get` find it by that name from any process. It
    need not be unique: a ref names the newest message of the queue enqueued with it,
    while that message is there (an older one carrying it loses it).
    """

    payload: bytes
    key: str | None = None
    priority: int = 0
    delay: float = 0.0
    dedup_id: str | None = None
    headers: Mapping[str, Any] | None = None
    at_head: bool = False
    ref: str | None = None


@dataclass
class Lease:
    """A delivered, not yet acknowledged message.

    ``token`` proves who holds it: ack, nack and extend with a token that is no longer
    current (the lease expired and the message was delivered again) are refused.
    ``deadline`` is in the backend's clock (seconds since the epoch).
    ``batch_id`` is shared by the messages of one ordered per-key batch.
    """

    queue: str
    id: str
    key: str | None
    payload: bytes
    priority: int
    attempts: int
    headers: dict[str, Any]
    token: str
    deadline: float
    enqueued_at: float
    batch_id: str
    dedup_id: str | None = None
    ref: str | None = None  # the message's ref while it names this message (see Message)


@dataclass(frozen=True)
class QueueSettings:
    """Per-queue behaviour. Every process using a queue should use the same settings."""

    max_deliveries: int | None = 5
    key_concurrency: int = 1
    interval: float = 0.0
    retry_position: RetryPosition = "head"
    dedup_window: float = 300.0
    unique_while_pending: bool = False
    visibility_timeout: float = 30.0
    # Backpressure (docs/operations.md): at most this many waiting (ready or delayed, not
    # leased) messages per shard key / in the whole queue; None: unlimited.
    max_pending_per_key: int | None = None
    max_pending: int | None = None
    on_full: OnFull = "reject"

    def replace(self, **changes: Any) -> "QueueSettings":
        return dataclasses.replace(self, **changes)


QUEUE_SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(QueueSettings))


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of one queue.

    ``ready`` counts messages in their keys' order (including retries that hold their key
    until a not-before time), ``delayed`` those waiting to enter it, ``leased`` those
    delivered and not yet settled, ``dead`` the dead-letter list. ``keys`` is the number of
    shard keys with at least one message ready, delayed or leased. ``oldest_age`` is the
    age in seconds of the oldest ready message (0 when none).
    """

    queue: str
    ready: int
    leased: int
    delayed: int
    dead: int
    keys: int
    oldest_age: float
    paused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DeadLetter:
    """A message removed from service, with why and when; ``ref`` is its ref (see
    :class:`Message`) while it names this message."""

    queue: str
    id: str
    key: str | None
    payload: bytes
    priority: int
    attempts: int
    headers: dict[str, Any]
    reason: str
    enqueued_at: float
    died_at: float
    dedup_id: str | None = None
    ref: str | None = None


@dataclass
class LeaseResult:
    """What a backend's ``lease`` returns: the leases, and when more may be due.

    ``retry_in`` is the number of seconds until the earliest known future event that may
    make a message deliverable (a delay ending, an interval passing, a lease expiring),
    or ``None`` when nothing is scheduled. Consumers sleep at most that long.
    """

    leases: list[Lease] = field(default_factory=list)
    retry_in: float | None = None


# What a message is doing now, as Broker.get shows it: "waiting" in its key's order (or the
# unkeyed lane; a retry holding its key until available_at too), "delayed" outside it until
# available_at, "leased" to a consumer, "dead" in the dead-letter list.
MessageState = Literal["waiting", "delayed", "leased", "dead"]


@dataclass(frozen=True)
class MessageInfo:
    """One message by id (:meth:`~sharded_broker.broker.Broker.get`), in the backend's clock.

    ``attempts`` counts its deliveries (a leased message's current one included).
    ``available_at`` is when a waiting or delayed message may be delivered (its not-before
    time: in the past for a waiting message that is due; ``None`` while leased or dead).
    ``lease_deadline`` and ``leased_at`` are those of its current lease (``None`` unless
    leased; on Redis they are found among the queue's leases, at most ``WHY_READ_LIMIT``
    read, else ``None``). ``dead_reason`` and ``died_at`` are set for a dead letter.
    ``ref`` is the message's ref (see :class:`Message`) while it names this message.
    An acked (done) or cancelled message is forgotten by every backend: ``get`` answers
    ``None`` for it, as for an id that never existed.
    """

    queue: str
    id: str
    key: str | None
    state: MessageState
    priority: int
    attempts: int
    enqueued_at: float
    size: int
    dedup_id: str | None = None
    available_at: float | None = None
    lease_deadline: float | None = None
    leased_at: float | None = None
    dead_reason: str | None = None
    died_at: float | None = None
    ref: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CancelResult:
    """What :meth:`~sharded_broker.broker.Broker.cancel` did with one message (asked for by
    id, or by ``ref``: then ``id`` is the message's id, ``None`` when no message of the
    queue carries that ref).

    ``cancelled`` is True when the message was waiting or delayed and is gone for good (it
    never runs). Otherwise nothing changed and ``state`` says why: ``"leased"`` (a consumer
    is running it: it cannot be taken back; ack, nack or release settle it), ``"dead"`` (it
    is in the dead-letter list already: purge or replay handle those), or ``None`` (no such
    message in the queue: never enqueued there, already acked, or already cancelled).
    ``state`` of a cancelled message is the state it was cancelled in. Truthy exactly when
    cancelled.
    """

    queue: str
    id: str | None
    cancelled: bool
    state: MessageState | None
    key: str | None = None
    ref: str | None = None

    def __bool__(self) -> bool:
        return self.cancelled

    @property
    def summary(self) -> str:
        """One sentence for people (the command line prints it)."""
        name = f"message {self.id}" if self.id is not None else f"message with ref {self.ref!r}"
        if self.id is not None and self.ref is not None:
            name += f" (ref {self.ref!r})"
        if self.cancelled:
            return f"cancelled {name} of queue {self.queue!r} (it was {self.state}); it will never run"
        if self.state == "leased":
            return (
                f"{name} of queue {self.queue!r} is leased (a consumer is running it) and cannot be "
                "cancelled; it is settled by its ack, nack or release"
            )
        if self.state == "dead":
            return (
                f"{name} of queue {self.queue!r} is a dead letter, not waiting: nothing cancelled "
                "(purge or replay handle dead letters)"
            )
        return (
            f"no {name} in queue {self.queue!r} (never enqueued there, already acked or already "
            "cancelled): nothing cancelled"
        )

    def as_dict(self) -> dict[str, Any]:
        answer = dataclasses.asdict(self)
        answer["summary"] = self.summary
        return answer


# The lifecycle steps a backend counts per minute and publishes as events, in this order.
COUNTERS = ("enqueued", "delivered", "acked", "retried", "dead")
EventType = Literal["enqueued", "delivered", "acked", "retried", "dead"]


@dataclass(frozen=True)
class MinuteMetrics:
    """What happened to a queue (or one of its keys) in one minute.

    ``minute`` is the minute's start (seconds since the epoch, a multiple of 60, in the
    backend's clock). ``retried`` counts messages returned for another delivery (a nack
    for retry, or a lease that expired); ``dead`` those dead-lettered. Messages of a batch
    returned only because an earlier message of the batch failed are not counted, nor are
    replays and purges (operator actions, not message lifecycle steps).
    """

    minute: float
    enqueued: int = 0
    delivered: int = 0
    acked: int = 0
    retried: int = 0
    dead: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HeadMessage:
    """The next message a key will deliver (its first ready message in key order)."""

    id: str
    priority: int
    attempts: int
    enqueued_at: float
    not_before: float
    size: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KeyInfo:
    """One shard key of a queue.

    ``backlog`` counts its messages ready, delayed or leased. ``leased`` counts its batches
    leased and not yet settled (the key's slots in use; with ``per_key=1``, messages).
    ``lag`` is the age in seconds of its head message (0 when nothing is ready).
    ``interval`` is the key's own rate interval (``None``: the queue's default).
    ``weight`` is its weight in the fairness order (see ``Broker.set_weight``).
    """

    queue: str
    key: str
    backlog: int
    leased: int
    lag: float
    paused: bool
    interval: float | None
    head: HeadMessage | None = None
    weight: int = 1

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Event:
    """One lifecycle step of one message: ``type`` is one of :data:`COUNTERS`; ``at`` is
    the backend's time of the step."""

    type: EventType
    queue: str
    id: str
    key: str | None
    at: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Why a key's next message is not delivered now (see sharded_broker/diagnosis.py).
WhyReason = Literal["paused", "leased", "key_concurrency", "interval", "retry", "delayed", "ready", "empty"]


@dataclass(frozen=True)
class HeldBatch:
    """One slot of a key in use: a lease of one message, or an ordered batch.

    ``message_id``, ``token``, ``attempts`` and ``deadline`` are those of the batch's first
    unsettled message (the lease an operator releases); ``size`` is how many messages the
    batch was delivered with and ``settled`` how many of them are acked or dead-lettered
    already. ``leased_at`` is when it was delivered (``None`` for a lease made by a version
    that did not record it).
    """

    batch_id: str
    message_id: str
    token: str
    attempts: int
    deadline: float
    size: int
    settled: int
    leased_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KeyFacts:
    """What a backend reads about one key, in one consistent snapshot, to say why it is
    not moving: every index read is one lookup in an ordered index (see
    :meth:`~sharded_broker.backend.Backend.key_facts`). Times are the backend's clock.

    ``head`` is the key's first message in key order (None when nothing is ready);
    ``next_delayed`` the earliest not-before time of its delayed messages (None: none,
    or not looked up because a head exists); ``ready_at`` its time in the fairness order
    (None: not waiting to be served); ``last_delivery`` its last delivery while a rate
    interval applies; ``own_interval`` its own interval (None: the queue's default);
    ``weight`` its weight in the fairness order.
    """

    queue: str
    key: str
    now: float
    queue_paused: bool
    key_paused: bool
    backlog: int
    slots: int
    head: HeadMessage | None
    next_delayed: float | None
    ready_at: float | None
    last_delivery: float | None
    own_interval: float | None
    holds: tuple[HeldBatch, ...] = ()
    weight: int = 1


@dataclass(frozen=True)
class KeyDiagnosis:
    """The one reason a key's next message is not delivered now, and until when.

    ``reason`` is one of :data:`WhyReason`: ``paused`` (``paused_scope`` says whether the
    key or the whole queue), ``leased`` (its one slot is held: ``holds``),
    ``key_concurrency`` (all ``key_concurrency`` slots held), ``interval`` (its rate
    interval has not passed since its last delivery), ``retry`` (its head is a retry, or
    an ``at_head`` delay, holding the key), ``delayed`` (nothing ready; its first delayed
    message is due at ``until``), ``ready`` (deliverable now: waiting for a consumer) or
    ``empty`` (no message waiting). ``until`` is when the reason ends by itself (``None``:
    until someone acts, e.g. a resume). ``last_delivered_minute`` is, for ``ready``, the
    latest minute in which any consumer took a message of the queue (``None``: none in
    the metrics window, so no consumer seems to be running). ``weight`` is the key's
    weight in the fairness order. ``summary`` says it all in one sentence.
    """

    queue: str
    key: str
    reason: WhyReason
    until: float | None
    summary: str
    now: float
    backlog: int
    head: HeadMessage | None
    holds: tuple[HeldBatch, ...]
    interval: float
    paused_scope: Literal["key", "queue"] | None = None
    ready_since: float | None = None
    last_delivered_minute: float | None = None
    weight: int = 1

    @property
    def waited(self) -> float:
        """How long the head message has waited since it was enqueued (0 without one)."""
        return max(0.0, self.now - self.head.enqueued_at) if self.head is not None else 0.0

    def as_dict(self) -> dict[str, Any]:
        answer = dataclasses.asdict(self)
        answer["waited"] = self.waited
        return answer


@dataclass(frozen=True)
class Schedule:
    """A recurrent message stored in the broker (:meth:`Broker.schedule`).

    Each period, the first consumer of ``queue`` to see it due enqueues one message
    (``payload``, ``key``, ``priority``, ``headers`` plus ``{"schedule": name}``).
    Exactly one of ``every`` (seconds) and ``cron`` (a crontab spec, UTC) is set; see
    ``sharded_broker/recurrence.py``. ``next_due`` is in the backend's clock;
    ``last_fired`` is when it last enqueued a message (``None``: never) and ``fired`` how
    many it enqueued. A paused schedule enqueues nothing until it is resumed.
    """

    queue: str
    name: str
    payload: bytes
    key: str | None
    priority: int
    headers: dict[str, Any]
    every: float | None
    cron: str | None
    next_due: float
    paused: bool = False
    last_fired: float | None = None
    fired: int = 0

    @property
    def spec(self) -> str:
        """``every 300s`` or ``cron */5 * * * *``."""
        return f"every {self.every:g}s" if self.every is not None else f"cron {self.cron}"

    def as_dict(self) -> dict[str, Any]:
        """As JSON shows it (the payload's size, not its bytes)."""
        answer = dataclasses.asdict(self)
        answer["payload_size"] = len(answer.pop("payload"))
        answer["spec"] = self.spec
        return answer
