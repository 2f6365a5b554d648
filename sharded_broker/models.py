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
    ahead of everything already queued for its key; with a delay it *holds* the key until
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
