"""What both adapters need, written once: shard keys from users' values and task arguments,
the lease heartbeat of a worker process, how a batch handler reports a failure, and cancel
and get by the framework's own message id (the engine's ref, from any process).

Imports neither Celery, kombu nor Dramatiq: each adapter passes in what differs (its
error classes, its logger, how it finds the leases it holds). Dead-letter reasons are
not cut here: the engine bounds them (``validation.MAX_REASON_LENGTH``, one limit for
every caller), so an adapter hands over the whole reason.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

from sharded_broker import validation
from sharded_broker.broker import Broker
from sharded_broker.errors import BackendUnavailable, InvalidArgument, InvalidArgumentType
from sharded_broker.heartbeat import extend_before_deadline
from sharded_broker.models import CancelResult, Lease, MessageInfo

__all__ = [
    "ArgumentKey", "BatchFailed", "LeaseHeartbeat", "cancel_by_ref", "coerce_key", "framework_ref", "get_by_ref",
    "queues_to_search",
]

_MISSING = object()


def coerce_key(
    value: Any,
    where: str,
    *,
    error: type[InvalidArgument] = InvalidArgument,
    type_error: type[InvalidArgumentType] = InvalidArgumentType,
) -> Optional[str]:
    """The engine shard key for a user's ``value`` (``None`` stays ``None``: unkeyed).

    A ``str`` is checked as it is; an ``int`` becomes its decimal text, because ids usually
    are ints (``user_id=42`` gives the key ``"42"``). Anything else, ``bool`` and ``float``
    included on purpose (``1.0`` and ``True`` would silently share the key ``"1"``), raises
    ``type_error``; a text the engine refuses (empty, too long, control characters) raises
    ``error``. Both messages begin with ``where``, which names the task and the source.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise type_error(f"{where} must be a str or an int, not {type(value).__name__} ({value!r:.80})")
    try:
        return validation.shard_key(value if isinstance(value, str) else str(value))
    except InvalidArgument as exc:
        raise error(f"{where}: {exc}") from None


class ArgumentKey:
    """Reads a shard key from one named argument of a task function, as a call binds it:
    by keyword, else by position, else the parameter's default.

    The function's signature is read once, here, not at every message. Without it (no
    function, or one Python cannot inspect) only a keyword argument can be read.
    """

    def __init__(
        self,
        owner: str,
        argument: str,
        function: Optional[Callable[..., Any]],
        *,
        error: type[InvalidArgument] = InvalidArgument,
    ) -> None:
        self.owner = owner  # "actor 'notify'", "task 'tasks.notify'": for error messages
        self.argument = argument
        self.error = error
        self.position: Optional[int] = None
        self.default: Any = _MISSING
        try:
            parameters = list(inspect.signature(function).parameters.values()) if function is not None else []
        except (TypeError, ValueError):
            parameters = []
        for index, parameter in enumerate(parameters):
            if parameter.name == argument:
                if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                    self.position = index
                if parameter.default is not parameter.empty:
                    self.default = parameter.default
                break

    def __call__(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if self.argument in kwargs:
            return kwargs[self.argument]
        if self.position is not None and self.position < len(args):
            return args[self.position]
        if self.default is _MISSING:
            raise self.error(
                f"{self.owner} takes its shard key from argument {self.argument!r}, but the message "
                f"does not give it (args={tuple(args)!r:.200}, kwargs={kwargs!r:.200})"
            )
        return self.default


class BatchFailed(Exception):
    """Raised by a batch handler (a Dramatiq batch actor, a Celery ``BatchTask``): the
    message at ``index`` of its batch failed with ``error``.

    As the contract's ordered batches: the messages before ``index`` are acked, the one at
    ``index`` is retried at the head of its key after the handler's retry delay, or
    dead-lettered once it reached the queue's ``max_deliveries`` (or when the framework
    says the failure is final); the messages after it go back unprocessed, in order,
    their delivery not counted. Any other exception fails the batch at index 0.
    Picklable (a Celery prefork pool sends it back to the worker's main process) when
    ``error`` is.
    """

    def __init__(self, index: int, error: Optional[BaseException] = None) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidArgumentType(f"BatchFailed index must be an int, not {type(index).__name__}")
        super().__init__(index, error)
        self.index = index
        self.error = error

    def __str__(self) -> str:
        return f"message {self.index} of the batch failed: {self.error!r}"


Owner = TypeVar("Owner")


class LeaseHeartbeat(threading.Thread, Generic[Owner]):
    """The heartbeat of one worker process: a daemon thread that extends every lease the
    process holds, in one backend round trip per beat, until ``stopped`` is set.

    ``held()`` answers the leases to extend now, each with its owner (whatever the adapter
    needs to settle it: a channel, or nothing); ``expired(owner, lease)`` is called for a
    lease the engine refused to extend (settled since ``held()`` answered, or expired and
    delivered again: the adapter tells which). ``interval()`` is the time between beats and
    ``visibility_timeout()`` the shortest lease in use, both read at each beat. A failed
    extension is retried at once, with backoff, until the leases' deadline
    (:func:`sharded_broker.heartbeat.extend_before_deadline`).
    """

    def __init__(
        self,
        broker: Broker,
        *,
        held: Callable[[], Sequence[tuple[Owner, Lease]]],
        expired: Callable[[Owner, Lease], None],
        interval: Callable[[], float],
        visibility_timeout: Callable[[], float],
        logger: logging.Logger,
        name: str = "sharded-broker-lease-heartbeat",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.broker = broker
        self.held = held
        self.expired = expired
        self.interval = interval
        self.visibility_timeout = visibility_timeout
        self.logger = logger
        self.stopped = threading.Event()

    def run(self) -> None:
        # Every held lease lasts at least visibility_timeout from extended_at on: it was
        # either extended by the try that began then, or leased after it.
        extended_at = time.monotonic()
        while not self.stopped.wait(self.interval()):
            held = list(self.held())
            if self.stopped.is_set():  # held() may have let the last lease go and stopped us
                break
            if not held:
                extended_at = time.monotonic()
                continue
            try:
                extended, started = extend_before_deadline(
                    self.broker, [lease for _, lease in held], extended_at + self.visibility_timeout(),
                    self.stopped, self._unavailable,
                )
            except Exception:
                self.logger.exception("Unexpected failure extending %d lease(s).", len(held))
                continue
            if extended is None:
                if not self.stopped.is_set():
                    self.logger.warning(
                        "Could not extend %d lease(s) before their deadline: their messages may be "
                        "delivered again. Will keep trying.", len(held),
                    )
                continue
            extended_at = started
            for (owner, lease), alive in zip(held, extended):
                if not alive:
                    self.expired(owner, lease)

    def _unavailable(self, error: BackendUnavailable, failures: int) -> None:
        if failures == 1:
            self.logger.warning("Could not extend leases (retrying until they expire): %s", error)
        else:
            self.logger.debug("Lease extension try %d failed: %s", failures, error)


def framework_ref(message_id: Any) -> Optional[str]:
    """The engine ref for a framework's message id (Celery's task id, Dramatiq's message
    id): the id itself, or None (no ref: the message is then found by engine id only) for
    one the engine would refuse as a ref, so that publishing never fails for it."""
    try:
        return validation.ref(message_id) if isinstance(message_id, str) else None
    except InvalidArgument:
        return None


def queues_to_search(broker: Broker, first: Sequence[str]) -> list[str]:
    """Where a framework's message may be: the queues named in ``first`` (in that order),
    then every other queue the engine holds (``Broker.queues``)."""
    return list(dict.fromkeys([*first, *broker.queues()]))


def cancel_by_ref(broker: Broker, ref: str, queues: Sequence[str]) -> CancelResult:
    """Cancel the message named by ``ref`` (a framework's message id, stored as the
    engine's ref) in the first of ``queues`` that holds it; when none does, the answer of
    the first queue (``state=None``)."""
    first: Optional[CancelResult] = None
    for queue in queues:
        result = broker.cancel(queue, ref=ref)
        if result.state is not None:
            return result
        if first is None:
            first = result
    return first if first is not None else CancelResult(queues[0] if queues else "", None, False, None, ref=ref)


def get_by_ref(broker: Broker, ref: str, queues: Sequence[str]) -> Optional[MessageInfo]:
    """The message named by ``ref`` in the first of ``queues`` that holds it, or None."""
    for queue in queues:
        info = broker.get(queue, ref=ref)
        if info is not None:
            return info
    return None
