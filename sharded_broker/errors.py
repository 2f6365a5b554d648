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
