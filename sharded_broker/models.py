"""The values that cross the engine's API: messages in, leases out, settings and stats."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

RetryPosition = Literal["head", "tail"]


@dataclass
class Message:
    """A message to enqueue. Only ``payload`` is required.

    ``key`` is the shard key (``None``: unkeyed, no ordering constraint). Lower
    ``priority`` numbers are delivered first within a key (and within the unkeyed lane).
    ``delay`` is seconds before the message enters its key's order. ``at_head`` places it
    ahead of everything of its priority already queued for its key (a lower priority
    number still comes first); with a delay it *holds* the key until
    it is delivered (what framework-level retries use to keep a key's order).
    """

    payload: bytes
    key: str | None = None
    priority: int = 0
    delay: float = 0.0
    dedup_id: str | None = None
    headers: Mapping[str, Any] | None = None
    at_head: bool = False


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
    """A message removed from service, with why and when."""

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


@dataclass
class LeaseResult:
    """What a backend's ``lease`` returns: the leases, and when more may be due.

    ``retry_in`` is the number of seconds until the earliest known future event that may
    make a message deliverable (a delay ending, an interval passing, a lease expiring),
    or ``None`` when nothing is scheduled. Consumers sleep at most that long.
    """

    leases: list[Lease] = field(default_factory=list)
    retry_in: float | None = None


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
    """

    queue: str
    key: str
    backlog: int
    leased: int
    lag: float
    paused: bool
    interval: float | None
    head: HeadMessage | None = None

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
