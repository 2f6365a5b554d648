"""Dramatiq broker over the sharded-broker engine: per-key FIFO for Dramatiq actors.

Switch the broker and name a shard key on the actors that need order::

    import dramatiq
    from sharded_broker.integrations.dramatiq import ShardedBroker

    dramatiq.set_broker(ShardedBroker(url="redis://localhost:6379/0"))

    @dramatiq.actor(shard_key="user_id")
    def notify(user_id, text): ...

    notify.send(42, "hi")                                              # key "42"
    notify.send_with_options(args=(42, "hi"), shard_key="user-42")     # key "user-42"

Messages of one shard key run one at a time and in order, across every worker process
and thread; messages of different keys (and unkeyed messages) run in parallel.

What this broker guarantees on top of Dramatiq's Broker contract:

* **Keys are checked when sending.** A ``shard_key`` that names an argument the actor
  does not have, a missing argument value, or a key of the wrong type raises
  :class:`ShardKeyError` from ``send``; no message is stored. (A :class:`ShardKeyError`
  is a ``MiddlewareError``, so Dramatiq propagates it from any hook.)
* **Retries keep order.** When a middleware re-enqueues the message a worker is still
  holding (the ``Retries`` backoff does), the retry goes back to the *head* of its key
  and holds the key until it runs (with the queue setting ``retry_position="tail"`` it
  goes to the tail instead, leaving the key free).
* **Failures are dead letters.** A message the worker rejects (retries exhausted,
  ``throws``, ``AgeLimit``, unknown actor, undecodable payload) moves to the engine's
  dead-letter list with its reason; see :attr:`ShardedBroker.dead_messages`.
* **StubBroker's test contract.** ``join(queue, fail_fast=...)`` re-raises an actor's
  own exception (default ``fail_fast_default``: True on Dramatiq 2, False on 1.x, as
  ``StubBroker``), ``dead_letters`` and ``dead_letters_by_queue`` list message proxies
  equal to the messages sent, and ``flush``/``flush_all`` empty queues, so a test suite
  switches from ``StubBroker()`` to ``ShardedBroker(url="memory://")`` unchanged.
* **Delays live in the broker.** ``delay`` is stored in the engine, not in a worker's
  memory; delivered messages never carry an ``eta`` option (which would make the
  Worker hold them in memory and re-enqueue them at the tail).
* **Leases are kept alive.** While a worker process holds a message (prefetched or
  running) a heartbeat extends its lease every ``visibility_timeout / 3`` seconds (one
  backend round trip for all of them), so a long task is never delivered twice, and the
  messages of a killed process are delivered again, at the head of their keys, about
  ``visibility_timeout`` seconds after it died. A failed extension is retried at once,
  with backoff, so a broker outage shorter than ``2/3 * visibility_timeout - 0.5 s``
  expires no lease (see :mod:`sharded_broker.heartbeat`).
* **Schedules live in the broker.** An actor declared with ``every=`` (seconds or a
  ``timedelta``) or ``cron=`` (crontab's five fields, UTC) is scheduled when it is
  declared (:class:`ActorSchedules`; :meth:`ShardedBroker.schedule_actor` for arguments
  or several schedules per actor): the running workers enqueue one message per period
  between them, with no scheduler process; each delivery gets a message id and
  timestamp of its own.
* **Giving back is free.** Messages a worker prefetched but never ran (a graceful stop,
  a consumer restart after a connection error) are *released*: back to their places at
  the head of their keys, their delivery not counted toward ``max_deliveries``, so
  restarting workers never dead-letters a message that never ran.
"""

from __future__ import annotations

import collections
import datetime
import inspect
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import dramatiq
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.errors import ConnectionClosed, DramatiqError, QueueJoinTimeout, QueueNotFound
from dramatiq.logging import get_logger
from dramatiq.middleware import Middleware, MiddlewareError

import sharded_broker
from sharded_broker import validation
from sharded_broker.broker import MAX_LEASE_LIMIT, SCHEDULE_HEADER
from sharded_broker import environment
from sharded_broker.urls import relative_path_warning
from sharded_broker.errors import (
    BackendUnavailable, ConfigurationError, InvalidArgument, InvalidArgumentType, ShardedBrokerError,
)
from sharded_broker.group_commit import AckGroup

from .support import ArgumentKey, LeaseHeartbeat, coerce_key

__all__ = [
    "ActorSchedules",
    "DeadLetterMessage",
    "DeadMessage",
    "MessageDeadLettered",
    "ScheduleError",
    "ShardKeyError",
    "ShardKeyTypeError",
    "ShardKeys",
    "ShardedBroker",
]

#: What an actor's ``shard_key`` option may be: an argument name, or a callable that
#: takes the message's ``args`` tuple and ``kwargs`` dict and returns the key (or
#: ``None`` for an unkeyed message).
ShardKeySource = Union[str, Callable[[tuple, dict], Union[str, int, None]]]

_DRAMATIQ_MAJOR = int(dramatiq.__version__.split(".")[0])
JOIN_POLL_INTERVAL = 0.05


class ShardKeyError(MiddlewareError, InvalidArgument):
    """A message's shard key cannot be determined or is not a valid key. Nothing was
    enqueued."""


class ShardKeyTypeError(ShardKeyError, InvalidArgumentType):
    """A shard key of the wrong type (only ``str`` and ``int`` are keys)."""


class ScheduleError(MiddlewareError, InvalidArgument):
    """An actor's ``every``/``cron`` schedule could not be stored (a bad period or spec,
    an actor whose shard key needs arguments, an unreachable broker)."""


class MessageDeadLettered(DramatiqError):
    """Raised by ``join(fail_fast=True)`` for a dead letter whose exception this process
    did not see (it died in another worker process)."""


@dataclass(frozen=True)
class DeadMessage:
    """A dead-lettered Dramatiq message and why it died.

    ``message`` is ``None`` when the stored payload could not be decoded. ``attempts``
    counts the engine's deliveries of this copy of the message (a Dramatiq retry is a new
    copy). ``id`` is the engine's message id, for ``broker.engine.replay(queue, [id])``.
    """

    id: str
    queue_name: str
    shard_key: Optional[str]
    message: Optional[dramatiq.Message]
    reason: str
    attempts: int
    died_at: float


# Broker URLs this process has announced it consumes from (ShardedBroker.consume).
_ANNOUNCED_URLS: set[str] = set()
_ANNOUNCED_LOCK = threading.Lock()


class DeadLetterMessage(dramatiq.MessageProxy):
    """A dead letter as ``StubBroker.dead_letters`` lists it: a message proxy equal to the
    message that was sent (``dead_letters == [message]``), its attributes read through
    (``.args``, ``.options``), ``failed`` set, and ``_exception`` the actor's exception when
    this process holds it for :meth:`ShardedBroker.join`. ``dead`` is the engine's view
    (reason, attempts, time of death, engine id).

    The message is the one stored when it was last enqueued: options a middleware changed
    in memory during its last attempt (``Retries`` counts ``retries`` and writes
    ``traceback``) are not in it; the dead letter's ``reason`` names the retries.
    """

    def __init__(self, message: dramatiq.Message, dead: DeadMessage, exception: Optional[BaseException]) -> None:
        super().__init__(message)
        self.failed = True
        self.dead = dead
        self._exception = exception


class ShardKeys(Middleware):
    """Declares the ``shard_key`` actor option and checks it when an actor is declared.

    :class:`ShardedBroker` adds this middleware itself; Dramatiq's own validation keeps
    rejecting every other unknown actor option.
    """

    @property
    def actor_options(self) -> set[str]:
        return {"shard_key"}

    def before_declare_actor(self, broker: dramatiq.Broker, actor: dramatiq.Actor) -> None:
        source = actor.options.get("shard_key")
        if source is None or callable(source):
            return
        if not isinstance(source, str) or not source.isidentifier():
            raise ShardKeyError(
                f"shard_key of actor {actor.actor_name!r} must be an argument name or a "
                f"callable(args, kwargs), not {source!r}"
            )
        parameters = _parameters(actor)
        if parameters is None or source in parameters:
            return
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return  # the key may arrive through **kwargs; checked when sending
        raise ShardKeyError(
            f"actor {actor.actor_name!r} has no argument {source!r} to take its shard key from; "
            f"its arguments are: {', '.join(parameters) or '(none)'}"
        )


class ActorSchedules(Middleware):
    """Declares the ``every`` and ``cron`` actor options: an actor declared with one of
    them is scheduled (:meth:`ShardedBroker.schedule_actor`, the schedule named after the
    actor, without arguments) in the broker when it is declared, in every process that
    imports it. Declaring it again (each worker's start) keeps the schedule's next due
    time while its period is unchanged. Removing the option does not remove the stored
    schedule: ``sharded-broker schedules QUEUE --remove NAME`` does.

    :class:`ShardedBroker` adds this middleware itself.
    """

    @property
    def actor_options(self) -> set[str]:
        return {"every", "cron"}

    # Before, not after: Dramatiq logs and swallows what an after_ hook raises, and a
    # schedule that could not be stored must fail the declaration.
    def before_declare_actor(self, broker: dramatiq.Broker, actor: dramatiq.Actor) -> None:
        every, cron = actor.options.get("every"), actor.options.get("cron")
        if every is None and cron is None:
            return
        if not isinstance(broker, ShardedBroker):
            raise ScheduleError(f"actor {actor.actor_name!r} has every=/cron=, which need a ShardedBroker")
        broker.schedule_actor(actor, every=every, cron=cron)


class ShardedBroker(dramatiq.Broker):
    """A Dramatiq broker with per-key FIFO sharding, over any engine URL.

    Parameters:
      url: ``redis://...``, ``rediss://...``, ``sqlite:///path.db`` or ``memory://``
        (in-process only: workers in other processes cannot see it). None (the default):
        ``SHARDED_BROKER_URL``; a ConfigurationError when that is unset too.
      visibility_timeout: seconds a delivered message stays leased without a heartbeat.
        None (the default): ``SHARDED_BROKER_VISIBILITY_TIMEOUT``, else 30.
        Workers extend the leases of the messages they hold every third of it, so it
        bounds how long the messages of a dead worker wait, not how long a task may run.
      middleware: as for :class:`dramatiq.Broker`; :class:`ShardKeys` is always added.
      fail_fast_default: what :meth:`join` does without ``fail_fast``, as on
        ``StubBroker``; ``None`` (the default) follows the installed Dramatiq: True from
        2.0, False before.
      **engine_options: queue settings and backend options passed to
        :func:`sharded_broker.connect` (``max_deliveries``, ``key_concurrency``,
        ``interval``, ``retry_position``, ``queues={name: {...}}``, ...); each one left
        out may come from its ``SHARDED_BROKER_<OPTION>`` variable (docs/operations.md).

    Dramatiq's ``priority`` keeps its meaning (lower numbers run first): within a key,
    messages of a lower-priority-number actor are delivered first. Every queue has its
    ``.DQ`` name declared (``get_declared_delay_queues()``, as Dramatiq's brokers do), but
    delayed messages wait inside the engine, in their own queue: a consumer of a ``.DQ``
    name never delivers anything. ``engine`` is the underlying
    :class:`sharded_broker.Broker`, for stats, pause/resume, intervals and replay.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        visibility_timeout: Optional[float] = None,
        middleware: Optional[list[Middleware]] = None,
        fail_fast_default: Optional[bool] = None,
        **engine_options: Any,
    ) -> None:
        url = environment.url(url)
        if url is None:
            raise ConfigurationError(f"no broker URL: pass ShardedBroker(url=...) or set {environment.URL_VARIABLE}")
        if visibility_timeout is not None:
            engine_options["visibility_timeout"] = visibility_timeout
        self.engine = sharded_broker.connect(url, **engine_options)
        super().__init__(middleware=middleware)
        self.url = url
        self.queues: set[str] = set()
        self._leases = _LeaseKeeper(self)
        # Worker threads ack concurrently: acks arriving while one is in flight go together.
        self._acks = AckGroup(self.engine)
        if fail_fast_default is None:
            fail_fast_default = _DRAMATIQ_MAJOR >= 2
        elif not isinstance(fail_fast_default, bool):
            raise ConfigurationError(f"fail_fast_default must be True, False or None, not {fail_fast_default!r}")
        self.fail_fast_default: bool = fail_fast_default
        # The exception of the oldest dead letter this process made in each queue, with
        # its engine id, for join(fail_fast=True) to re-raise. A join only ever raises for
        # a queue's oldest dead letter, so one per queue is all it can want: kept while
        # the queue has dead letters, dropped by flush_all, never one per failure (each
        # holds a traceback and its frames, in worker processes that never join).
        self._join_failures: dict[str, tuple[str, BaseException]] = {}
        self._failures_lock = threading.Lock()
        if not any(isinstance(m, ShardKeys) for m in self.middleware):
            self.add_middleware(ShardKeys())
        if not any(isinstance(m, ActorSchedules) for m in self.middleware):
            self.add_middleware(ActorSchedules())

    def __repr__(self) -> str:
        return f"<ShardedBroker {sharded_broker.redact_url(self.url)}>"

    # -- declaring ------------------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        """Declare a queue (idempotent). Its name must also be a valid engine queue name."""
        if queue_name in self.queues:
            return
        validation.queue_name(queue_name)
        self.emit_before("declare_queue", queue_name)
        self.queues.add(queue_name)
        self.emit_after("declare_queue", queue_name)
        delay_queue_name = dq_name(queue_name)
        self.delay_queues.add(delay_queue_name)
        self.emit_after("declare_delay_queue", delay_queue_name)

    def get_declared_queues(self) -> set[str]:
        return self.queues.copy()

    # -- producing ------------------------------------------------------------------

    def enqueue(self, message: dramatiq.Message, *, delay: Optional[int] = None) -> dramatiq.Message:
        """Store a message in its actor's queue and shard key; return the stored copy.

        ``delay`` is in milliseconds, kept by the engine. The copy carries the resolved
        key in ``options["shard_key"]`` (so a retry keeps it) and never an ``eta``.

        Raises:
          ShardKeyError: the message's shard key is missing or invalid (nothing stored).
          sharded_broker.InvalidArgument: another bad value (delay, priority, size).
          sharded_broker.QueueFull: the queue's ``max_pending_per_key`` or ``max_pending``
            refused it (nothing stored; docs/operations.md, "Backpressure").
        """
        queue_name = q_name(message.queue_name)
        stored = message.copy(queue_name=queue_name)
        eta = stored.options.pop("eta", None)
        if delay is None and isinstance(eta, (int, float)) and not isinstance(eta, bool):
            delay = max(0, int(eta) - current_millis())
        delay_seconds = 0.0 if delay is None else (
            validation.seconds(delay, "delay (milliseconds)", maximum=validation.MAX_DELAY * 1000) / 1000
        )
        actor = self.actors.get(message.actor_name)
        key = resolve_shard_key(actor, stored)
        if key is None:
            stored.options.pop("shard_key", None)
        else:
            stored.options["shard_key"] = key
        # A message re-enqueued while this process still holds its delivery is a retry
        # of it (Retries passes the delivered message itself): it keeps its key's order.
        at_head = (
            isinstance(message, _LeasedMessage)
            and self._leases.holds(message.lease)
            and self.engine.settings(queue_name).retry_position == "head"
        )
        self.emit_before("enqueue", stored, delay)
        try:
            self.engine.enqueue(
                queue_name,
                stored.encode(),
                key=key,
                priority=actor.priority if actor is not None else 0,
                delay=delay_seconds,
                headers={"actor_name": stored.actor_name, "message_id": stored.message_id},
                at_head=at_head,
            )
        except BackendUnavailable as exc:
            raise ConnectionClosed(exc) from exc
        self.emit_after("enqueue", stored, delay)
        return stored

    def schedule_actor(
        self,
        actor: dramatiq.Actor,
        *,
        every: Union[float, datetime.timedelta, None] = None,
        cron: Optional[str] = None,
        args: tuple = (),
        kwargs: Optional[dict[str, Any]] = None,
        name: Optional[str] = None,
    ) -> sharded_broker.Schedule:
        """Store a schedule that sends ``actor(*args, **kwargs)`` every ``every`` seconds
        (or a ``timedelta``) or at the minutes of ``cron`` (UTC), named ``name`` (default:
        the actor's name) in the actor's queue; created, or replaced by name. The running
        workers of the queue enqueue one message per period between them (no scheduler
        process); a period missed while none ran is sent once. The message's shard key
        comes from the actor's ``shard_key`` as for a send; each delivery gets a message
        id and timestamp of its own. Middleware ``enqueue`` hooks do not run for these
        messages (the engine enqueues them, not a send). The schedule as stored.

        Raises:
          ScheduleError: a bad period or spec, a shard key that cannot be resolved, or a
            broker that cannot be reached.
        """
        if not isinstance(actor, dramatiq.Actor):
            raise ScheduleError(f"schedule_actor needs a dramatiq actor, not {type(actor).__name__}")
        try:
            message = actor.message_with_options(args=tuple(args), kwargs=dict(kwargs or {}))
            stored = message.copy(queue_name=q_name(message.queue_name))
            key = resolve_shard_key(actor, stored)
            if key is not None:
                stored.options["shard_key"] = key
            return self.engine.schedule(
                stored.queue_name, actor.actor_name if name is None else name, stored.encode(),
                every=every, cron=cron, key=key, priority=actor.priority, headers={"actor_name": stored.actor_name},
            )
        except ShardedBrokerError as exc:  # a ShardKeyError too
            raise ScheduleError(f"cannot schedule actor {actor.actor_name!r}: {exc}") from exc

    # -- consuming ------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> dramatiq.Consumer:
        """A consumer leasing up to ``prefetch`` messages at a time (one per shard key),
        blocking up to ``timeout`` milliseconds when the queue is idle.

        A ``.DQ`` name gives a consumer that only waits: the engine delivers delayed
        messages through their own queue once due.

        Raises:
          QueueNotFound: the queue was never declared.
        """
        if queue_name in self.delay_queues:
            return _DelayQueueConsumer(timeout)
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)
        self._announce_consuming()
        return _ShardedConsumer(self, queue_name, prefetch, timeout)

    def _announce_consuming(self) -> None:
        """Once per process and URL: which store this process consumes from (a SQLite file
        by its absolute path), and a warning when the URL's path is relative (producers
        started in another directory would use another file, so another queue)."""
        with _ANNOUNCED_LOCK:
            if self.url in _ANNOUNCED_URLS:
                return
            _ANNOUNCED_URLS.add(self.url)
        self.logger.info("Consuming from %s.", sharded_broker.display_url(self.url))
        warning = relative_path_warning(self.url)
        if warning is not None:
            self.logger.warning("%s.", warning)

    # -- inspecting and testing -----------------------------------------------------

    def flush(self, queue_name: str) -> None:
        """Drop every waiting (ready or delayed) message of a queue; leased ones run on."""
        self.engine.purge(q_name(queue_name))

    def flush_all(self) -> None:
        """Drop every waiting message and every dead letter of every declared queue, and
        the exceptions held for :meth:`join`."""
        for queue_name in self.queues:
            self.engine.purge(queue_name)
            self.engine.purge(queue_name, dead=True)
        with self._failures_lock:
            self._join_failures.clear()

    def join(self, queue_name: str, *, timeout: Optional[int] = None, fail_fast: Optional[bool] = None) -> None:
        """Wait until a queue has no ready, delayed or leased message (for tests), as
        ``StubBroker.join`` does.

        Parameters:
          timeout: milliseconds to wait at most.
          fail_fast: then raise for the oldest dead letter of the queue, if any: the
            actor's own exception (``TimeLimitExceeded``, the user's error, ...) when it
            failed in this process, as ``StubBroker`` does, else
            :class:`MessageDeadLettered` naming the stored reason. ``None``: the
            broker's ``fail_fast_default``.

        Raises:
          QueueJoinTimeout: the timeout elapsed.
          QueueNotFound: the queue was never declared.
        """
        queue_name = q_name(queue_name)
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            stats = self.engine.stats(queue_name)
            if stats.ready + stats.delayed + stats.leased == 0:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            time.sleep(JOIN_POLL_INTERVAL)
        if fail_fast is None:
            fail_fast = self.fail_fast_default
        oldest = self.engine.dead_letters(queue_name, limit=1)
        if not oldest:
            with self._failures_lock:  # its dead letter was replayed or purged meanwhile
                self._join_failures.pop(queue_name, None)
            return
        if fail_fast:
            exception = self._join_failure(queue_name, oldest[0].id)
            if exception is not None:
                raise exception from None
            raise MessageDeadLettered(f"message {oldest[0].headers.get('message_id')} died: {oldest[0].reason}")

    @property
    def dead_letters(self) -> list[dramatiq.MessageProxy]:
        """Every dead letter of every declared queue as ``StubBroker`` lists them: message
        proxies equal to the messages sent (see :class:`DeadLetterMessage`), oldest death
        first per queue. Undecodable payloads are only in :attr:`dead_messages`."""
        return [proxy for proxies in self.dead_letters_by_queue.values() for proxy in proxies]

    @property
    def dead_letters_by_queue(self) -> collections.defaultdict[str, list[dramatiq.MessageProxy]]:
        """``{queue name: its dead letters}`` for the declared queues, as on
        ``StubBroker`` (a fresh snapshot at each read: changing it changes nothing)."""
        by_queue: collections.defaultdict[str, list[dramatiq.MessageProxy]] = collections.defaultdict(list)
        for queue_name in sorted(self.queues):
            with self._failures_lock:
                held = self._join_failures.get(queue_name)
            for dead in self.get_dead_letters(queue_name, limit=None):
                if dead.message is not None:
                    exception = held[1] if held is not None and held[0] == dead.id else None
                    by_queue[queue_name].append(DeadLetterMessage(dead.message, dead, exception))
        return by_queue

    @property
    def dead_messages(self) -> list[DeadMessage]:
        """The engine's view of every dead letter of every declared queue, oldest death
        first per queue: reason, attempts, time of death and engine id, undecodable
        payloads included (``message=None``)."""
        return [dead for queue_name in sorted(self.queues) for dead in self.get_dead_letters(queue_name, limit=None)]

    def get_dead_letters(
        self, queue_name: str, *, limit: Optional[int] = 100, offset: int = 0
    ) -> list[DeadMessage]:
        """Dead letters of one queue in the engine's view, oldest death first
        (``limit=None``: all)."""
        page = 1000 if limit is None else limit
        found: list[DeadMessage] = []
        while True:
            batch = self.engine.dead_letters(q_name(queue_name), limit=page, offset=offset + len(found))
            found.extend(_dead_message(dead) for dead in batch)
            if limit is not None or len(batch) < page:
                return found

    def close(self) -> None:
        """Stop the lease heartbeat and release the engine's connections."""
        self._leases.close()
        self.engine.close()

    # -- for the consumer -----------------------------------------------------------

    def _dead_letter(self, lease: sharded_broker.Lease, reason: str, exception: Optional[BaseException]) -> None:
        """Dead-letter a delivered message, holding its exception for :meth:`join` when
        it is the queue's first dead letter here. Under the lock, so that a join that
        sees the dead letter also sees its exception."""
        with self._failures_lock:
            accepted = self.engine.nack(lease, dead=True, reason=reason)
            if accepted and exception is not None and lease.queue not in self._join_failures:
                self._join_failures[lease.queue] = (lease.id, exception)

    def _join_failure(self, queue_name: str, engine_id: str) -> Optional[BaseException]:
        with self._failures_lock:
            held = self._join_failures.get(queue_name)
        return held[1] if held is not None and held[0] == engine_id else None


def resolve_shard_key(actor: Optional[dramatiq.Actor], message: dramatiq.Message) -> Optional[str]:
    """The shard key of ``message``: its ``shard_key`` option, else its actor's source.

    An actor not declared in this process contributes nothing (only the message's own
    option counts). A callable source may return ``None`` for an unkeyed message; an
    argument source must give a value.

    Raises:
      ShardKeyError: no value, an invalid value, or a failing callable.
    """
    actor_name = message.actor_name
    if message.options.get("shard_key") is not None:
        return _checked_key(message.options["shard_key"], f"shard_key option of a message to actor {actor_name!r}")
    if actor is None:
        return None
    source = actor.options.get("shard_key")
    if source is None:
        return None
    if callable(source):
        try:
            value = source(message.args, message.kwargs)
        except Exception as exc:
            raise ShardKeyError(f"shard_key callable of actor {actor_name!r} raised {exc!r}") from exc
        return None if value is None else _checked_key(value, f"shard_key callable of actor {actor_name!r}")
    value = _argument_key(actor, source)(message.args, message.kwargs)
    if value is None:
        raise ShardKeyError(
            f"argument {source!r} of actor {actor_name!r} (its shard key) is None; pass a key, "
            "or give the actor a callable shard_key that returns None for unkeyed messages"
        )
    return _checked_key(value, f"argument {source!r} of actor {actor_name!r} (its shard key)")


# The reader of each actor's key argument, built at its first send (the actor's signature
# is read then, not at every send); an actor that goes away takes its reader with it.
_argument_keys: weakref.WeakKeyDictionary[dramatiq.Actor, ArgumentKey] = weakref.WeakKeyDictionary()
_argument_keys_lock = threading.Lock()


def _argument_key(actor: dramatiq.Actor, name: str) -> ArgumentKey:
    with _argument_keys_lock:
        reader = _argument_keys.get(actor)
    if reader is None or reader.argument != name:
        reader = ArgumentKey(f"actor {actor.actor_name!r}", name, _actor_function(actor), error=ShardKeyError)
        with _argument_keys_lock:
            _argument_keys[actor] = reader
    return reader


def _actor_function(actor: dramatiq.Actor) -> Callable[..., Any]:
    # A class-based actor's fn is its instance, whose __call__ forwards to perform().
    return actor.fn.perform if isinstance(actor.fn, dramatiq.GenericActor) else actor.fn


def _parameters(actor: dramatiq.Actor) -> Optional[dict[str, inspect.Parameter]]:
    """The actor function's parameters, or None when Python cannot tell them."""
    try:
        return dict(inspect.signature(_actor_function(actor)).parameters)
    except (TypeError, ValueError):
        return None


def _checked_key(value: Any, where: str) -> Optional[str]:
    return coerce_key(value, where, error=ShardKeyError, type_error=ShardKeyTypeError)


def _dead_message(dead: sharded_broker.DeadLetter) -> DeadMessage:
    try:
        message: Optional[dramatiq.Message] = dramatiq.Message.decode(dead.payload)
    except dramatiq.errors.DecodeError:
        message = None
    return DeadMessage(
        id=dead.id,
        queue_name=dead.queue,
        shard_key=dead.key,
        message=message,
        reason=dead.reason,
        attempts=dead.attempts,
        died_at=dead.died_at,
    )


def _failure_reason(message: dramatiq.MessageProxy) -> str:
    exception = message._exception
    reason = "rejected" if exception is None else f"{type(exception).__name__}: {exception}"
    retries = message.options.get("retries")
    if retries:
        reason += f" (after {retries} retries)"
    return reason  # the engine bounds its length


class _LeasedMessage(dramatiq.MessageProxy):
    """A delivered message with the engine lease that proves this process holds it."""

    def __init__(
        self, message: dramatiq.Message, lease: sharded_broker.Lease, consumer: "_ShardedConsumer"
    ) -> None:
        super().__init__(message)
        self.lease = lease
        self.consumer = consumer


class _ShardedConsumer(dramatiq.Consumer):
    """Leases messages for one Worker consumer thread. Thread-safe: the Worker calls
    ``ack``/``nack`` from its worker threads while ``__next__`` runs on the consumer
    thread, and may settle a message through a newer consumer of the same queue (after
    a consumer restart), so settling always goes through the message's own lease and
    the consumer that delivered it."""

    def __init__(self, broker: ShardedBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.logger = get_logger(__name__, type(self))
        self.broker = broker
        self.engine = broker.engine
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.timeout = timeout
        self._changed = threading.Condition()
        self._undelivered: collections.deque[_LeasedMessage] = collections.deque()
        self._outstanding = 0  # leased by this consumer and not yet settled

    def __next__(self) -> Optional[dramatiq.MessageProxy]:
        with self._changed:
            if self._undelivered:
                return self._undelivered.popleft()
            room = min(self.prefetch - self._outstanding, MAX_LEASE_LIMIT)
            if room <= 0:
                self._changed.wait(self.timeout / 1000)
                return None
        try:
            leases = self.engine.lease(self.queue_name, room, per_key=1, wait=self.timeout / 1000)
        except BackendUnavailable as exc:
            raise ConnectionClosed(exc) from exc
        self.broker._leases.hold(leases)
        messages = []
        for lease in leases:
            try:
                message = dramatiq.Message.decode(lease.payload)
            except dramatiq.errors.DecodeError as exc:
                self.logger.error("Dead-lettering undecodable message %s: %s", lease.id, exc.error)
                self.broker._leases.release(lease)
                try:
                    self.engine.nack(lease, dead=True, reason=f"undecodable message: {exc.error!r}")
                except BackendUnavailable as error:
                    # Raising would strand the rest of this batch, held and extended but
                    # never delivered; unheld, this message comes back when its lease expires.
                    self.logger.warning("Could not dead-letter message %s now (%s).", lease.id, error)
                continue
            # A stored eta would make the Worker hold the message in memory and enqueue
            # it again at the tail of its key; the engine already applied the delay.
            message.options.pop("eta", None)
            if SCHEDULE_HEADER in lease.headers:
                # Every period's message is a message of its own (results, age limits):
                # an id stable across redeliveries of this one, its time the firing's.
                message = message.copy(
                    message_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"sharded-broker:{lease.queue}:{lease.id}")),
                    message_timestamp=int(lease.enqueued_at * 1000),
                )
            messages.append(_LeasedMessage(message, lease, self))
        with self._changed:
            self._outstanding += len(messages)
            self._undelivered.extend(messages)
            return self._undelivered.popleft() if self._undelivered else None

    def ack(self, message: dramatiq.MessageProxy) -> None:
        lease = message.lease
        try:
            accepted = self.broker._acks.ack(lease)
        except BackendUnavailable as exc:
            raise ConnectionClosed(exc) from exc  # the Worker retries the ack
        message.consumer._settled(lease)
        if not accepted:
            self.logger.warning(
                "Lease of message %s was lost before its ack (it expired and the message was "
                "delivered again), so it may run twice.", message.message_id,
            )

    def nack(self, message: dramatiq.MessageProxy) -> None:
        lease = message.lease
        try:
            self.broker._dead_letter(lease, _failure_reason(message), message._exception)
        except BackendUnavailable as exc:
            raise ConnectionClosed(exc) from exc
        message.consumer._settled(lease)

    def requeue(self, messages: Iterable[dramatiq.MessageProxy]) -> None:
        """Give unprocessed messages back (the Worker calls this on shutdown and after a
        connection error), each to its place at the head of its key, in one round trip.

        Released, not nacked: a message that never ran does not count toward
        ``max_deliveries``, so stopping workers never dead-letters what they prefetched.
        """
        messages = list(messages)
        if not messages:
            return
        try:
            self.engine.release_many([message.lease for message in messages])
        except BackendUnavailable as exc:
            raise ConnectionClosed(exc) from exc
        for message in messages:
            message.consumer._settled(message.lease)

    def close(self) -> None:
        """Give back the messages leased but not yet handed to the Worker."""
        with self._changed:
            undelivered = list(self._undelivered)
            self._undelivered.clear()
        self.requeue(undelivered)

    def _settled(self, lease: sharded_broker.Lease) -> None:
        self.broker._leases.release(lease)
        with self._changed:
            self._outstanding -= 1
            self._changed.notify_all()


class _DelayQueueConsumer(dramatiq.Consumer):
    """What a Worker gets for a ``.DQ`` name: nothing to deliver (the engine keeps delayed
    messages and delivers them through their own queue), waiting ``timeout`` each time
    so the Worker's consumer thread stays idle."""

    def __init__(self, timeout: int) -> None:
        self.timeout = timeout
        self._closed = threading.Event()

    def __next__(self) -> Optional[dramatiq.MessageProxy]:
        self._closed.wait(self.timeout / 1000)
        return None

    def close(self) -> None:
        self._closed.set()


class _LeaseKeeper:
    """The leases this process holds, and the heartbeat that extends them.

    One heartbeat thread per process (:class:`~sharded_broker.integrations.support.LeaseHeartbeat`),
    started with the first lease held (and again in a forked child), beating every third
    of the shortest visibility timeout in use.
    """

    def __init__(self, broker: ShardedBroker) -> None:
        self.logger = get_logger(__name__, type(self))
        self.broker = broker
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], sharded_broker.Lease] = {}
        self._closed = False
        self._heartbeat: Optional[LeaseHeartbeat[None]] = None
        self._pid = 0

    def hold(self, leases: Iterable[sharded_broker.Lease]) -> None:
        with self._lock:
            for lease in leases:
                self._held[lease.queue, lease.id] = lease
            if self._held and (self._heartbeat is None or self._pid != os.getpid()) and not self._closed:
                self._pid = os.getpid()
                self._heartbeat = LeaseHeartbeat(
                    self.broker.engine, held=self._leases_held, expired=self._expired,
                    interval=lambda: self._visibility_timeout() / 3, visibility_timeout=self._visibility_timeout,
                    logger=self.logger, name="sharded-broker-heartbeat",
                )
                self._heartbeat.start()

    def release(self, lease: sharded_broker.Lease) -> None:
        with self._lock:
            if self._held.get((lease.queue, lease.id)) is lease:
                del self._held[lease.queue, lease.id]

    def holds(self, lease: sharded_broker.Lease) -> bool:
        with self._lock:
            return self._held.get((lease.queue, lease.id)) is lease

    def close(self) -> None:
        with self._lock:
            self._closed = True
            heartbeat = self._heartbeat
        if heartbeat is not None:
            heartbeat.stopped.set()
            if heartbeat.ident is not None and heartbeat is not threading.current_thread():
                heartbeat.join(5)

    def _leases_held(self) -> list[tuple[None, sharded_broker.Lease]]:
        with self._lock:
            return [(None, lease) for lease in self._held.values()]

    def _expired(self, _: None, lease: sharded_broker.Lease) -> None:
        # Refused either because the message was settled since the beat began (nothing
        # to say) or because the lease really expired.
        if self.holds(lease):
            self.release(lease)
            self.logger.warning(
                "Lease of message %s in queue %r expired before its heartbeat; it may be "
                "delivered again. Raise visibility_timeout if this repeats.",
                lease.headers.get("message_id", lease.id), lease.queue,
            )

    def _visibility_timeout(self) -> float:
        """The shortest visibility timeout in use: the one every held lease outlives."""
        engine = self.broker.engine
        timeouts = [engine.settings(name).visibility_timeout for name in list(self.broker.queues)]
        return min([engine.defaults.visibility_timeout, *timeouts])
