"""Exceptions raised by the engine.

Every error a caller can cause is raised *before* anything is written, so a refused call
never changes what is already queued.
"""

from __future__ import annotations


class ShardedBrokerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(ShardedBrokerError, ValueError):
    """A malformed or unsupported URL, or an unknown or invalid option."""


class InvalidURL(ConfigurationError):
    """The broker URL is malformed, or names a store that cannot serve (a SQLite file in a
    missing directory, a file that is not a database, a read-only one)."""


class InvalidArgument(ShardedBrokerError, ValueError):
    """An argument has the right type but a value the engine refuses (range, size, characters)."""


class InvalidArgumentType(ShardedBrokerError, TypeError):
    """An argument has the wrong type (a key that is not a string, a payload that is not bytes)."""


class BackendError(ShardedBrokerError):
    """The backend failed in a way no argument explains: a server-side error, a store
    changed behind the engine's back. Every backend failure is one of these (the error
    model in ``sharded_broker/backend.py``); callers that report failures (the command
    line, the Prometheus collector) catch :class:`ShardedBrokerError` and nothing else."""


class BackendUnavailable(BackendError, ConnectionError):
    """The backend could not be reached or answered with a transport error.

    The operation may or may not have taken effect; it is safe to retry an enqueue that
    carries a ``dedup_id`` and any ack, nack or extend (a repeated ack is refused, not
    doubled).
    """


class QueueFull(ShardedBrokerError):
    """An enqueue went beyond a backpressure limit: ``max_pending_per_key`` (with
    ``on_full="reject"``, or ``"drop_oldest"``/``"replace"`` when the key has no ready
    message to give way) or the queue-wide ``max_pending``. Nothing of the call was
    stored: ``enqueue_many`` refuses the whole batch.

    ``queue``, ``key`` (None for ``max_pending``), ``setting`` (the limit's name) and
    ``limit`` say which limit refused it."""

    def __init__(self, queue: str, key: str | None, setting: str, limit: int, note: str = "") -> None:
        self.queue, self.key, self.setting, self.limit, self.note = queue, key, setting, limit, note
        if key is None:
            what = f"queue {queue!r} has {limit} waiting messages"
        else:
            what = f"key {key!r} of queue {queue!r} has {limit} waiting messages"
        note = f": {note}" if note else ""
        super().__init__(f"{what} ({setting}={limit}){note}; the enqueue was refused and nothing of it stored")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.queue, self.key, self.setting, self.limit, self.note))
