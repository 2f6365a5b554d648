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
* **Batch actors.** ``@dramatiq.actor(shard_key="user_id", batch=50, queue_name="sync")``
  calls the function with a list of up to 50 consecutive messages of one key, in order
  (the engine's ordered batches, ``lease(per_key=50)``); raising :class:`BatchFailed`
  ``(index, error)`` acks the messages before ``index``, retries (or dead-letters) the
  one at ``index`` and gives the later ones back unprocessed. See docs/dramatiq.md.
* **Cancel and look up by message.** :func:`cancel` deletes a message that is still
  waiting or delayed in the broker (it never runs; its key moves on) and refuses one a
  worker is running; :func:`get` says what a message is doing now. Both work from any
  process: a message's Dramatiq ``message_id`` is its engine ref (``Message.ref``).
* **Giving back is free.** Messages a worker prefetched but never ran (a graceful stop,
  a consumer restart after a connection error) are *released*: back to their places at
  the head of their keys, their delivery not counted toward ``max_deliveries``, so
  restarting workers never dead-letters a message that never ran.
"""

from __future__ import annotations

import collections
import datetime
import functools
import inspect
import itertools
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import dramatiq
from dramatiq.common import compute_backoff, current_millis, dq_name, q_name
from dramatiq.errors import ConnectionClosed, DramatiqError, QueueJoinTimeout, QueueNotFound, Retry
from dramatiq.logging import get_logger
from dramatiq.middleware import Middleware, MiddlewareError, Retries
from dramatiq.middleware.retries import DEFAULT_MAX_BACKOFF, DEFAULT_MIN_BACKOFF

import sharded_broker
from sharded_broker import validation
from sharded_broker.broker import MAX_LEASE_LIMIT, SCHEDULE_HEADER
from sharded_broker import environment
from sharded_broker.urls import relative_path_warning
from sharded_broker.errors import (
    BackendUnavailable, ConfigurationError, InvalidArgument, InvalidArgumentType, ShardedBrokerError,
)
from sharded_broker.group_commit import AckGroup

from .support import (
    ArgumentKey, BatchFailed, LeaseHeartbeat, cancel_by_ref, coerce_key, framework_ref, get_by_ref, queues_to_search,
)

__all__ = [
    "ActorSchedules",
    "BatchActorError",
    "BatchFailed",
    "DeadLetterMessage",
    "DeadMessage",
    "MessageDeadLettered",
    "ScheduleError",
    "ShardKeyError",
    "ShardKeyTypeError",
    "ShardKeys",
    "ShardedBroker",
    "cancel",
    "get",
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


class BatchActorError(MiddlewareError, ConfigurationError):
    """A ``batch`` actor option that cannot work (not a count, a queue shared with other
    actors, ``store_results``). Raised when the actor is declared."""


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
    """Declares the ``shard_key`` and ``batch`` actor options and checks them when an actor
    is declared.

    :class:`ShardedBroker` adds this middleware itself; Dramatiq's own validation keeps
    rejecting every other unknown actor option.
    """

    @property
    def actor_options(self) -> set[str]:
        return {"shard_key", "batch"}

    def before_declare_actor(self, broker: dramatiq.Broker, actor: dramatiq.Actor) -> None:
        _check_batch_option(broker, actor)
        if actor.options.get("batch") is not None:
            actor.fn = _BatchFunction(actor)
        source = actor.options.get("shard_key")
        if source is None or callable(source):
            return
        if not isinstance(source, str) or not source.isidentifier():
            raise ShardKeyError(
                f"shard_key of actor {actor.actor_name!r} must be an argument name or a "
                f"callable(args, kwargs), not {source!r}"
            )
        if actor.options.get("batch") is not None:
            return  # a batch actor's messages give their key argument by keyword
        parameters = _parameters(actor)
        if parameters is None or source in parameters:
            return
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return  # the key may arrive through **kwargs; checked when sending
        raise ShardKeyError(
            f"actor {actor.actor_name!r} has no argument {source!r} to take its shard key from; "
            f"its arguments are: {', '.join(parameters) or '(none)'}"
        )

    def after_declare_actor(self, broker: dramatiq.Broker, actor: dramatiq.Actor) -> None:
        if actor.options.get("batch") is not None and isinstance(broker, ShardedBroker):
            broker._batch_actors[actor.queue_name] = actor


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
      url: ``redis://...``, ``rediss://...``, ``redis+cluster://host:port[,host:port...]``, ``sqlite:///path.db`` or ``memory://``
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
        # queue name -> the batch actor that has it to itself (ShardKeys records them).
        self._batch_actors: dict[str, dramatiq.Actor] = {}
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
        if isinstance(message, _LeasedBatch):
            # Retries re-enqueues a delivery whose processing raised outside the batch
            # function (an interrupt landing just after it returned): the consumer settles
            # the batch's own messages, so there is nothing to store.
            self.logger.warning(
                "Not enqueueing a batch delivery of actor %r again: its messages are settled "
                "by the consumer (raise BatchFailed to retry one).", message.actor_name,
            )
            return message
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
                headers={"actor_name": stored.actor_name},  # the message id is the ref
                at_head=at_head,
                ref=framework_ref(stored.message_id),  # names it from any process (cancel, get)
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
            raise MessageDeadLettered(f"message {oldest[0].ref or oldest[0].id} died: {oldest[0].reason}")

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


# -- cancel and get by message -------------------------------------------------------------


def _sharded(broker: Optional[dramatiq.Broker]) -> ShardedBroker:
    broker = broker if broker is not None else dramatiq.get_broker()
    if not isinstance(broker, ShardedBroker):
        raise ConfigurationError(
            f"cancel and get need a ShardedBroker, not {type(broker).__name__}: pass broker= or "
            "dramatiq.set_broker(ShardedBroker(...))"
        )
    return broker


MessageRef = Union[dramatiq.Message, dramatiq.MessageProxy, str]


def _message_id(message: MessageRef) -> str:
    message_id = message if isinstance(message, str) else getattr(message, "message_id", None)
    if not isinstance(message_id, str) or not message_id:
        raise InvalidArgumentType(f"expected a Dramatiq message or message id, not {message!r:.80}")
    return message_id


def _queues(message: MessageRef, broker: ShardedBroker) -> list[str]:
    """Where ``message`` may be: its own queue when it says (a Message or a proxy), else
    the broker's declared queues, then every other queue of the engine."""
    queue_name = None if isinstance(message, str) else getattr(message, "queue_name", None)
    if isinstance(queue_name, str):
        return [q_name(queue_name)]
    return queues_to_search(broker.engine, sorted(broker.get_declared_queues()))


def cancel(message: MessageRef, *, broker: Optional[dramatiq.Broker] = None) -> sharded_broker.CancelResult:
    """Cancel a message that is still waiting (or delayed) in the broker, from any
    process: it is deleted and never runs, and its shard key moves on to its next message
    (``Broker.cancel(queue, ref=message_id)``: the message id is its engine ref).

    ``message`` is what ``send``/``send_with_options`` returned, a delivered message, or a
    message id (then the broker's declared queues, and after them every other queue of
    the engine, are searched, one call each). A message a worker holds
    (``state="leased"``) or a dead letter is refused, and one already done answers
    ``state=None``: the answer (:class:`~sharded_broker.CancelResult`) says which, and is
    truthy when cancelled. ``broker``: default ``dramatiq.get_broker()``, a
    :class:`ShardedBroker`.
    """
    sharded = _sharded(broker)
    if isinstance(message, _LeasedMessage):
        return sharded.engine.cancel(message.lease.queue, message.lease.id)
    return cancel_by_ref(sharded.engine, _message_id(message), _queues(message, sharded))


def get(message: MessageRef, *, broker: Optional[dramatiq.Broker] = None) -> Optional[sharded_broker.MessageInfo]:
    """What a message is doing now (waiting, delayed, leased or dead:
    :class:`~sharded_broker.MessageInfo`), from any process, or ``None`` once it is done
    or cancelled. Arguments as for :func:`cancel`."""
    sharded = _sharded(broker)
    if isinstance(message, _LeasedMessage):
        return sharded.engine.get(message.lease.queue, message.lease.id)
    return get_by_ref(sharded.engine, _message_id(message), _queues(message, sharded))


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
        if actor.options.get("batch") is not None:
            # The function takes the batch, not one message's arguments: by keyword only.
            owner, function = f"batch actor {actor.actor_name!r} (its messages pass the key by keyword)", None
        else:
            owner, function = f"actor {actor.actor_name!r}", _actor_function(actor)
        reader = ArgumentKey(owner, name, function, error=ShardKeyError)
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


def _check_batch_option(broker: dramatiq.Broker, actor: dramatiq.Actor) -> None:
    """Refuse a ``batch`` option that cannot work, and any actor sharing a batch actor's
    queue: a consumer leases a whole queue with one batch size, and a batch of one key
    must hold only messages its one function can take."""
    batch = actor.options.get("batch")
    sharing = sorted(
        other.actor_name for other in broker.actors.values()
        if other.queue_name == actor.queue_name and other.actor_name != actor.actor_name
    )
    if batch is None:
        batch_actors = [name for name in sharing if broker.actors[name].options.get("batch") is not None]
        if batch_actors:
            raise BatchActorError(
                f"actor {actor.actor_name!r} cannot use queue {actor.queue_name!r}: batch actor "
                f"{batch_actors[0]!r} has it to itself (give one of them another queue_name)"
            )
        return
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_LEASE_LIMIT:
        raise BatchActorError(
            f"batch of actor {actor.actor_name!r} must be an int from 1 to {MAX_LEASE_LIMIT} "
            f"(the most messages per call), not {batch!r}"
        )
    if sharing:
        raise BatchActorError(
            f"batch actor {actor.actor_name!r} needs queue {actor.queue_name!r} to itself, but "
            f"{', '.join(map(repr, sharing))} use it too (give it queue_name=...)"
        )
    if actor.options.get("store_results"):
        raise BatchActorError(
            f"batch actor {actor.actor_name!r} cannot store_results: its return value belongs to "
            "a whole batch, not to any message sent"
        )


class _Batch(list):
    """The messages of one delivered batch, as the carrier message's one argument, and
    what became of them: ``failure`` is None until the function ran, then ``(index,
    error)`` of the first failed message, or ``(len, None)`` when all succeeded."""

    def __init__(self, messages: list[dramatiq.Message], leases: list[sharded_broker.Lease]) -> None:
        super().__init__(messages)
        self.leases = leases
        self.failure: Optional[tuple[int, Optional[BaseException]]] = None

    def __repr__(self) -> str:
        # The Worker logs the carrier message with its arguments: one line, not M messages.
        return f"<batch of {len(self)} messages, key {self.leases[0].key!r}, first {self[0].message_id}>"


class _BatchFunction:
    """A batch actor's ``fn``: given a delivered :class:`_Batch`, calls the user's
    function with the list of its messages and records the outcome instead of raising,
    so that Dramatiq's ``Retries`` never re-enqueues a batch (the engine retries the one
    message that failed, keeping its key's order). Any other call (a test calling the
    actor directly) goes straight to the user's function."""

    def __init__(self, actor: dramatiq.Actor) -> None:
        self.fn = actor.fn
        self.actor_name = actor.actor_name
        self.logger = actor.logger
        functools.update_wrapper(self, actor.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not (len(args) == 1 and not kwargs and isinstance(args[0], _Batch)):
            return self.fn(*args, **kwargs)
        batch = args[0]
        try:
            result = self.fn(list(batch))
        except BatchFailed as failed:
            if not 0 <= failed.index < len(batch):
                self.logger.error(
                    "Batch actor %r raised BatchFailed(%r) for a batch of %d messages; failing it at message 0.",
                    self.actor_name, failed.index, len(batch),
                )
                batch.failure = (0, failed)
            else:
                self.logger.warning(
                    "Message %d of a batch of %d failed: %r.", failed.index, len(batch), failed.error
                )
                batch.failure = (failed.index, failed.error if failed.error is not None else failed)
            return None
        except BaseException as error:  # TimeLimitExceeded and Shutdown are interrupts, not Exceptions
            self.logger.error("Batch of %d messages failed at message 0.", len(batch), exc_info=True)
            batch.failure = (0, error)
            return None
        batch.failure = (len(batch), None)
        return result


class _LeasedMessage(dramatiq.MessageProxy):
    """A delivered message with the engine lease that proves this process holds it."""

    def __init__(
        self, message: dramatiq.Message, lease: sharded_broker.Lease, consumer: "_ShardedConsumer"
    ) -> None:
        super().__init__(message)
        self.lease = lease
        self.consumer = consumer


class _LeasedBatch(dramatiq.MessageProxy):
    """One ordered batch of one key, delivered to the Worker as one message: a carrier
    for the batch actor with the :class:`_Batch` as its one argument, the timestamp of
    its oldest message (for ``AgeLimit``) and its own message id."""

    def __init__(self, batch: _Batch, consumer: "_ShardedConsumer") -> None:
        first: dramatiq.Message = batch[0]
        options = {"shard_key": first.options["shard_key"]} if "shard_key" in first.options else {}
        super().__init__(dramatiq.Message(
            queue_name=first.queue_name, actor_name=first.actor_name, args=(batch,), kwargs={},
            options=options, message_timestamp=first.message_timestamp,
        ))
        self.batch = batch
        self.consumer = consumer
        self.acked = 0  # how many of the batch's first messages are acked already


def _leases_of(message: dramatiq.MessageProxy) -> list[sharded_broker.Lease]:
    """The engine leases behind one delivery: a message's one, or a batch's."""
    return list(message.batch.leases) if isinstance(message, _LeasedBatch) else [message.lease]


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
        self._undelivered: collections.deque[dramatiq.MessageProxy] = collections.deque()
        self._outstanding = 0  # leased by this consumer and not yet settled

    def __next__(self) -> Optional[dramatiq.MessageProxy]:
        with self._changed:
            if self._undelivered:
                return self._undelivered.popleft()
            room = min(self.prefetch - self._outstanding, MAX_LEASE_LIMIT)
            if room <= 0:
                self._changed.wait(self.timeout / 1000)
                return None
        # A batch actor's queue is leased in ordered batches of its size, each delivered
        # as one message; ``room`` then counts batches (short batches may exceed it).
        batch_actor = self.broker._batch_actors.get(self.queue_name)
        per_key = 1 if batch_actor is None else batch_actor.options["batch"]
        try:
            leases = self.engine.lease(
                self.queue_name, min(room * per_key, MAX_LEASE_LIMIT), per_key=per_key, wait=self.timeout / 1000
            )
        except BackendUnavailable as exc:
            raise ConnectionClosed(exc) from exc
        self.broker._leases.hold(leases)
        deliveries: list[dramatiq.MessageProxy] = []
        if batch_actor is None:
            for lease in leases:
                message = self._decode(lease)
                if message is not None:
                    deliveries.append(_LeasedMessage(message, lease, self))
        else:
            for _, group in itertools.groupby(leases, key=lambda lease: lease.batch_id):
                deliveries.extend(self._batch_deliveries(list(group), batch_actor.actor_name))
        with self._changed:
            self._outstanding += len(deliveries)
            self._undelivered.extend(deliveries)
            return self._undelivered.popleft() if self._undelivered else None

    def _decode(self, lease: sharded_broker.Lease) -> Optional[dramatiq.Message]:
        """The Dramatiq message of a lease; an undecodable one is dead-lettered (None)."""
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
            return None
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
        return message

    def _batch_deliveries(self, leases: list[sharded_broker.Lease], actor_name: str) -> list[dramatiq.MessageProxy]:
        """What the Worker gets for one ordered batch of one key: one :class:`_LeasedBatch`
        of its leading messages for the batch actor. The batch ends early at an
        undecodable message (dead-lettered) or one for another actor (an old message, or
        one sent by name): that one and every later one go back to the head of the key
        (the engine returns the rest of a batch with any member), except that a batch
        that starts with another actor's message delivers that message alone."""
        messages: list[dramatiq.Message] = []
        for index, lease in enumerate(leases):
            message = self._decode(lease)
            if message is None:  # dead-lettered: the engine gave back the later ones
                self._unhold(leases[index + 1:])
                break
            if message.actor_name != actor_name:
                if index == 0:
                    self._give_back(leases[1:])
                    return [_LeasedMessage(message, lease, self)]
                self._give_back(leases[index:])
                break
            messages.append(message)
        if not messages:
            return []
        return [_LeasedBatch(_Batch(messages, leases[: len(messages)]), self)]

    def _give_back(self, leases: list[sharded_broker.Lease]) -> None:
        """Release the tail of a batch unrun (releasing its first returns them all)."""
        if not leases:
            return
        self._unhold(leases)
        try:
            self.engine.release(leases[0])
        except BackendUnavailable as error:
            self.logger.warning("Could not give back %d message(s) now (%s); their leases will expire.", len(leases), error)

    def _unhold(self, leases: list[sharded_broker.Lease]) -> None:
        for lease in leases:
            self.broker._leases.release(lease)

    def ack(self, message: dramatiq.MessageProxy) -> None:
        if isinstance(message, _LeasedBatch):
            self._settle_batch(message, dead=False)
            return
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
        if isinstance(message, _LeasedBatch):
            self._settle_batch(message, dead=True)
            return
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
        leases = [lease for message in messages for lease in _leases_of(message)]
        try:
            self.engine.release_many(leases)
        except BackendUnavailable as exc:
            raise ConnectionClosed(exc) from exc
        for message in messages:
            message.consumer._settled(*_leases_of(message))

    def close(self) -> None:
        """Give back the messages leased but not yet handed to the Worker."""
        with self._changed:
            undelivered = list(self._undelivered)
            self._undelivered.clear()
        self.requeue(undelivered)

    def _settle_batch(self, delivery: "_LeasedBatch", *, dead: bool) -> None:
        """Settle a batch as the contract's ordered batches do: the messages before the
        failed one are acked, the failed one is retried after the actor's backoff (the
        engine dead-letters it at ``max_deliveries``) or, when ``dead`` (the Worker
        rejected the delivery) or its error is one of the actor's ``throws``,
        dead-lettered; the engine gives the later ones back unprocessed, in order.

        A batch whose function never ran (a middleware failed before it) fails at its
        first message. Called again after a ConnectionClosed, it skips what it settled."""
        batch = delivery.batch
        leases = batch.leases
        index, error = batch.failure if batch.failure is not None else (0, None)
        if dead and index == len(leases):
            index = 0  # all ran, yet a middleware failed the delivery afterwards
        if error is None:
            error = delivery._exception  # what a middleware failed it with (AgeLimit's skip)
        try:
            if delivery.acked < index:
                acking = leases[delivery.acked:index]
                accepted = self.engine.ack_many(acking)
                delivery.acked = index
                for lease, ok in zip(acking, accepted):
                    if not ok:
                        self.logger.warning(
                            "Lease of message %s was lost before its ack (it expired and the message was "
                            "delivered again), so it may run twice.", lease.ref or lease.id,
                        )
            if index < len(leases):
                lease = leases[index]
                actor = self.broker.actors.get(delivery.actor_name)
                throws = actor.options.get("throws") if actor is not None else None
                max_deliveries = self.engine.settings(lease.queue).max_deliveries
                exhausted = max_deliveries is not None and lease.attempts >= max_deliveries
                if dead or exhausted or (throws and isinstance(error, throws)):
                    # Dead-lettered here rather than by the engine's nack, so the reason
                    # names the error and join() can raise it.
                    reason = "rejected" if error is None else f"{type(error).__name__}: {error}"
                    where = f"message {index + 1} of a batch of {len(leases)}"
                    if exhausted:
                        where += f", after {lease.attempts} deliveries"
                    self.broker._dead_letter(lease, f"{reason} ({where})", error)
                else:
                    self.engine.nack(lease, delay=self._retry_delay(actor, lease, error))
        except BackendUnavailable as exc:
            raise ConnectionClosed(exc) from exc  # the Worker settles again
        delivery.consumer._settled(*leases)

    def _retry_delay(self, actor: Optional[dramatiq.Actor], lease: sharded_broker.Lease, error: Optional[BaseException]) -> float:
        """Seconds before a failed batch message runs again: a ``Retry``'s own delay, else
        the backoff ``Retries`` would apply (the actor's, else the middleware's,
        ``min_backoff``/``max_backoff``) after ``attempts - 1`` earlier failures."""
        if isinstance(error, Retry) and error.delay is not None:
            delay = error.delay
        else:
            retries = next((m for m in self.broker.middleware if isinstance(m, Retries)), None)
            options = actor.options if actor is not None else {}
            min_backoff = options.get("min_backoff", retries.min_backoff if retries else DEFAULT_MIN_BACKOFF)
            max_backoff = min(options.get("max_backoff", retries.max_backoff if retries else DEFAULT_MAX_BACKOFF), DEFAULT_MAX_BACKOFF)
            _, delay = compute_backoff(max(lease.attempts - 1, 0), factor=min_backoff, max_backoff=max_backoff)
        return min(delay / 1000, validation.MAX_DELAY)

    def _settled(self, *leases: sharded_broker.Lease) -> None:
        """One delivery (a message, or a batch's leases) is settled."""
        for lease in leases:
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
                lease.ref or lease.id, lease.queue,
            )

    def _visibility_timeout(self) -> float:
        """The shortest visibility timeout in use: the one every held lease outlives."""
        engine = self.broker.engine
        timeouts = [engine.settings(name).visibility_timeout for name in list(self.broker.queues)]
        return min([engine.defaults.visibility_timeout, *timeouts])
