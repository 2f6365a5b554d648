"""The engine's public face: argument checks, settings, and waiting for work."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import heapq
import importlib
import inspect
import logging
import threading
import time
from types import MappingProxyType
from typing import (
    Any, Callable, Concatenate, Generator, Iterable, Iterator, Mapping, NamedTuple, ParamSpec, Sequence, TypeVar, Union,
)

from . import environment, recurrence, urls
from . import validation as check
from .backend import Backend, EventSubscription, KeySort
from .diagnosis import describe_seconds, diagnose
from .feeder import Feeder, Writer
from .errors import (
    ConfigurationError, InvalidArgument, InvalidArgumentType, InvalidURL, QueueFull, ShardedBrokerError,
)
from .models import (
    CancelResult, DeadLetter, Event, KeyDiagnosis, KeyFacts, KeyInfo, Lease, Message, MessageInfo, MinuteMetrics,
    QueueSettings, QueueStats, RetryPosition, Schedule,
)

# scheme -> "module:Class", imported on first use so that a memory:// user needs no redis-py.
BACKENDS: dict[str, str] = {
    "memory": "sharded_broker.backends.memory:MemoryBackend",
    "sqlite": "sharded_broker.backends.sqlite:SQLiteBackend",
    "redis": "sharded_broker.backends.redis:RedisBackend",
    "rediss": "sharded_broker.backends.redis:RedisBackend",
    "redis+cluster": "sharded_broker.backends.redis_cluster:RedisClusterBackend",
    "rediss+cluster": "sharded_broker.backends.redis_cluster:RedisClusterBackend",
}

MAX_LEASE_LIMIT = 10_000
MAX_METRICS_MINUTES = 7 * 24 * 60
MAX_KEYS_LIMIT = 10_000
T = TypeVar("T")
P = ParamSpec("P")
# stuck_keys reads keys in pages of this many (a few bounded backend calls per page; see
# there), and at most MAX_STUCK_SCAN keys in all.
STUCK_PAGE = 200
MAX_STUCK_SCAN = 100_000
# A consumer (Broker.lease) looks for due schedules of its queue at most this often
# (seconds), so that a running worker is all a schedule needs; each look is one read.
SCHEDULE_CHECK_INTERVAL = 1.0
# Schedules fired per look at most (the rest are still due at the next look).
SCHEDULES_PER_CHECK = 100
MAX_SCHEDULE_NAME_LENGTH = 200
# The header naming the schedule that enqueued a message.
SCHEDULE_HEADER = "schedule"

log = logging.getLogger(__name__)


def backend_class(url: str) -> type[Backend]:
    """The backend class serving ``url``'s scheme."""
    name = urls.scheme(url)
    if name not in BACKENDS:
        raise InvalidURL(
            f"unknown URL scheme {name!r} in broker URL; supported: {', '.join(sorted(BACKENDS))}"
        )
    module_name, _, class_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


# The URL connect() opens when neither its caller nor SHARDED_BROKER_URL names one.
DEFAULT_URL = "memory://"


def connect(url: str | None = None, **options: Any) -> "Broker":
    """Open a broker on ``url`` (``memory://``, ``sqlite:///path.db``, ``redis://...``).

    Without ``url``, ``SHARDED_BROKER_URL`` names it, else ``memory://``; every option not
    given here may be set by ``SHARDED_BROKER_<OPTION>`` (``SHARDED_BROKER_KEY_CONCURRENCY=4``;
    sharded_broker/environment.py, docs/operations.md). Explicit arguments always win.

    ``options`` are queue settings that apply to every queue (``max_deliveries``,
    ``key_concurrency``, ``interval``, ``retry_position``, ``dedup_window``,
    ``unique_while_pending``, ``visibility_timeout``, and the backpressure limits
    ``max_pending_per_key``, ``max_pending``, ``on_full``), ``queues`` (a mapping of queue
    name to settings for that queue), ``max_payload_size``, and the backend's own options;
    every backend takes ``metrics_window`` (seconds of per-minute metrics kept, default
    3600), ``key_metrics_window`` (the same for each shard key's minutes, at most
    ``metrics_window``, which is its default) and ``events`` (publish lifecycle events; default on for memory:// and redis://,
    off for sqlite://, where each event is a row written).

    A malformed URL, or one naming a store that cannot serve (a SQLite file in a missing
    directory, a file that is not a database), raises :class:`InvalidURL`, saying how a
    relative ``sqlite:///`` path was read; a bad option raises ``ConfigurationError``.
    """
    return open_broker(Broker, backend_class, url, options, discard=lambda backend: backend.close())


BrokerT = TypeVar("BrokerT", bound="BrokerEngine")


def open_broker(
    broker_type: type[BrokerT],
    backend_for: Callable[[str], Any],
    url: str | None,
    options: dict[str, Any],
    *,
    discard: Callable[[Any], None],
) -> BrokerT:
    """What :func:`connect` does, for ``broker_type`` (Broker, or the asyncio API's
    AsyncBroker) on a backend of ``backend_for(url)``: the URL and options read (the
    environment's too), checked and split into queue settings and the backend's own.
    ``discard`` releases the backend when a per-queue setting is refused."""
    given = environment.url(url)
    url = DEFAULT_URL if given is None else given
    options = environment.options(options, url)
    settings_options = {k: options.pop(k) for k in list(options) if k in check.QUEUE_SETTING_NAMES}
    per_queue = options.pop("queues", None) or {}
    max_payload_size = options.pop("max_payload_size", check.DEFAULT_MAX_PAYLOAD_SIZE)
    defaults = check.queue_settings(settings_options)
    if not isinstance(per_queue, Mapping):
        raise ConfigurationError("queues must map queue names to settings")
    backend_type = backend_for(url)
    if url.startswith(("redis://", "rediss://")):
        urls.check_redis_url(url)
    try:
        backend = backend_type.from_url(url, **options)
    except InvalidURL as exc:
        hint = urls.relative_path_hint(url)
        if hint is None:
            raise
        raise InvalidURL(f"{exc} ({hint})") from None
    try:
        broker = broker_type(backend, defaults=defaults, max_payload_size=max_payload_size)
        for name, queue_options in per_queue.items():
            broker.configure_queue(name, **queue_options)
    except BaseException:
        discard(backend)  # a refused setting must not leak the backend's connections
        raise
    return broker


# -- operations as steps ----------------------------------------------------------------
#
# Each Broker operation is written once, as a generator of the backend calls it needs
# ("steps"): it checks its arguments, yields a Call (a Backend method's name and
# arguments) or a Sleep, is sent each answer, and returns the operation's answer. Broker
# runs the steps synchronously on its backend; AsyncBroker (sharded_broker/aio.py) awaits
# the same steps on an asyncio backend or in a thread, so both check alike, raise alike
# and wait alike.


# One backend call: a Backend method's name, its positional and its keyword arguments. A
# plain tuple, not a class: it is made on every operation, and a tuple costs the least.
Call = tuple[str, tuple[Any, ...], Mapping[str, Any]]


class Sleep(NamedTuple):
    """A pause between backend calls (for a time shorter than the backend's wait resolution)."""

    seconds: float


class Attempt(NamedTuple):
    """A backend call whose :class:`ShardedBrokerError` the runner throws into the steps
    (to be caught there) instead of raising it out of the operation: for work an
    operation does on the side, whose failure must not be the operation's (the lease's
    look at the due schedules)."""

    call: Call


Step = Union[Call, Sleep, Attempt]
Steps = Generator[Step, Any, T]


_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})


def _call(method: str, *args: Any, **kwargs: Any) -> Call:
    return (method, args, kwargs or _NO_KWARGS)


def _attempt(method: str, *args: Any, **kwargs: Any) -> Attempt:
    return Attempt((method, args, kwargs or _NO_KWARGS))


def run_steps(backend: Backend, steps: Steps[T]) -> T:
    """Run an operation's steps on a synchronous backend; the operation's answer."""
    try:
        step = next(steps)
        while True:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                answer = None
            elif isinstance(step, Attempt):
                method, args, kwargs = step.call
                try:
                    answer = getattr(backend, method)(*args, **kwargs)
                except ShardedBrokerError as exc:
                    step = steps.throw(exc)
                    continue
            else:
                method, args, kwargs = step
                answer = getattr(backend, method)(*args, **kwargs)
            step = steps.send(answer)
    except StopIteration as done:
        return done.value


def public_signature(steps: Callable[..., Any]) -> inspect.Signature:
    """The signature of an operation's steps as its callers see it: ``-> T``, not ``-> Steps[T]``."""
    signature = inspect.signature(steps)
    answer = signature.return_annotation
    if isinstance(answer, str) and answer.startswith("Steps[") and answer.endswith("]"):
        signature = signature.replace(return_annotation=answer[len("Steps["):-1])
    return signature


def operation(steps: Callable[Concatenate[BrokerT, P], Steps[T]]) -> Callable[Concatenate[BrokerT, P], T]:
    """A Broker method running ``steps`` on its backend. The steps stay reachable as
    ``.steps``, for AsyncBroker."""

    @functools.wraps(steps)
    def run(self: BrokerT, *args: P.args, **kwargs: P.kwargs) -> T:
        return run_steps(self.backend, steps(self, *args, **kwargs))

    run.steps = steps  # type: ignore[attr-defined]
    run.__signature__ = public_signature(steps)  # type: ignore[attr-defined]
    return run


class BrokerEngine:
    """What Broker and AsyncBroker share: the queue settings of this process, the steps
    of a key's diagnosis and those of the lease's look at the due schedules."""

    backend: Any

    def __init__(
        self,
        backend: Any,
        *,
        defaults: QueueSettings | None = None,
        max_payload_size: int = check.DEFAULT_MAX_PAYLOAD_SIZE,
    ) -> None:
        self.backend = backend
        self.defaults = defaults or QueueSettings()
        self.max_payload_size = check.positive_int(max_payload_size, "max_payload_size", maximum=check.MAX_PAYLOAD_SIZE_LIMIT)
        self._queue_settings: dict[str, QueueSettings] = {}
        #: Seconds between two looks for due schedules by :meth:`lease` (per queue).
        self.schedule_check_interval = SCHEDULE_CHECK_INTERVAL
        self._next_schedule_check: dict[str, float] = {}  # queue -> time.monotonic() of the next look
        self._schedule_check_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend!r}>"

    # -- settings -------------------------------------------------------------------

    def configure_queue(self, queue: str, **settings: Any) -> QueueSettings:
        """Override settings for one queue in this process (on top of the defaults)."""
        queue = check.queue_name(queue)
        self._queue_settings[queue] = check.queue_settings(settings, self.settings(queue))
        return self._queue_settings[queue]

    def settings(self, queue: str) -> QueueSettings:
        return self._queue_settings.get(queue, self.defaults)

    def _last_delivered_minute(self, queue: str) -> Steps[float | None]:
        """The latest minute of the last hour in which a consumer took a message of ``queue``."""
        metrics = yield _call("metrics", queue, 60, None)
        delivering = [m.minute for m in metrics if m.delivered]
        return delivering[-1] if delivering else None

    def _diagnose(
        self, queue: str, facts: Sequence[KeyFacts], last_delivered: list[float | None] | None = None
    ) -> Steps[list[KeyDiagnosis]]:
        """Each key's diagnosis; ``last_delivered`` holds the last delivery minute once read
        (read here at most once per list, and only when a key could be delivered now)."""
        settings = self.settings(queue)
        diagnoses = [diagnose(f, settings) for f in facts]
        if not any(d.reason == "ready" for d in diagnoses):
            return diagnoses
        # For a key that could be delivered now: is any consumer taking messages at all?
        if last_delivered is None:
            last_delivered = []
        if not last_delivered:
            last_delivered.append((yield from self._last_delivered_minute(queue)))
        last = last_delivered[0]
        answer = []
        for d in diagnoses:
            if d.reason == "ready":
                if last is None:
                    note = f"no consumer took a message of queue {queue!r} in the last hour: is one running?"
                else:
                    note = (
                        f"a consumer last took a message of queue {queue!r} in the minute that started "
                        f"{describe_seconds(d.now - last)} ago"
                    )
                d = dataclasses.replace(d, last_delivered_minute=last, summary=f"{d.summary}; {note}")
            answer.append(d)
        return answer


    def _fire_due(self, queue: str, call: Callable[..., Step]) -> Steps[list[str]]:
        """:meth:`fire_due_schedules`' steps, each backend call made by ``call`` (``_call``,
        or ``_attempt`` for the lease's look, whose backend errors are thrown in here)."""
        now, due = yield call("due_schedules", queue, SCHEDULES_PER_CHECK)
        fired = []
        settings = self.settings(queue)
        for schedule in due:
            message = Message(
                schedule.payload, key=schedule.key, priority=schedule.priority,
                headers={**schedule.headers, SCHEDULE_HEADER: schedule.name},
            )
            next_due = recurrence.next_due(schedule.every, schedule.cron, schedule.next_due, now)
            try:
                # An attempt whatever `call` is: a refusal is this schedule's alone (other
                # errors go on as `call` would take them: out of the operation, or to the
                # lease's look).
                mid = yield _attempt("fire_schedule", queue, schedule.name, schedule.next_due, next_due, message,
                                     settings)
            except QueueFull as full:
                # Its key (or the queue) is at a backpressure limit: nothing changed, and the
                # period fires at a later look once there is room; the other schedules fire.
                log.warning("Schedule %r of queue %r not fired now: %s", schedule.name, queue, full)
                continue
            if mid is not None:
                fired.append(mid)
        return fired

    def _look_for_due_schedules(self, queue: str) -> Steps[tuple[bool, float]]:
        """The due schedules of ``queue`` fired when this process's last look at it is
        ``schedule_check_interval`` old (the first thread or task to see that looks; the
        others go on): whether it enqueued a message, and the seconds until the next look."""
        now = time.monotonic()
        with self._schedule_check_lock:  # held for no step: a claim, not the look itself
            next_check = self._next_schedule_check.get(queue, 0.0)
            if now < next_check:
                return False, next_check - now
            # Claimed first: a failing look waits its turn too instead of repeating at once.
            self._next_schedule_check[queue] = now + self.schedule_check_interval
        try:
            # _attempt: the runner throws a backend error in here rather than out of lease.
            fired = bool((yield from self._fire_due(queue, _attempt)))
        except ShardedBrokerError as exc:
            # Never the lease's failure: its leases are already taken (and a Redis at
            # maxmemory refuses a firing, an enqueue, while consumers drain the queue).
            log.warning("Could not fire the due schedules of queue %r (next look in %gs): %s",
                        queue, self.schedule_check_interval, exc)
            fired = False
        return fired, self.schedule_check_interval

class Broker(BrokerEngine):
    """Per-key FIFO queues over one backend. Thread-safe; share one per process."""

    backend: Backend

    @operation
    def now(self) -> Steps[float]:
        """The backend's clock."""
        return (yield _call("now"))

    # -- producing ------------------------------------------------------------------

    @operation
    def enqueue(
        self,
        queue: str,
        payload: bytes,
        *,
        key: str | None = None,
        priority: int = 0,
        delay: float = 0.0,
        dedup_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        at_head: bool = False,
        ref: str | None = None,
    ) -> Steps[str]:
        """Enqueue one message; its id (or, for a duplicate, the first message's id).
        ``ref``: the caller's own name for it, which :meth:`cancel` and :meth:`get` take
        from any process (see :class:`~sharded_broker.Message`).

        Raises :class:`~sharded_broker.QueueFull` (nothing stored) beyond the queue's
        ``max_pending_per_key`` or ``max_pending`` (docs/operations.md, "Backpressure")."""
        queue = check.queue_name(queue)
        checked = check.message_of(
            payload, key, priority, delay, dedup_id, headers, at_head, self.max_payload_size, ref
        )
        return (yield _call("enqueue_many", queue, [checked], self.settings(queue)))[0]

    @operation
    def enqueue_many(self, queue: str, messages: Iterable[Message]) -> Steps[list[str]]:
        """Enqueue messages atomically in one round trip; their ids, in order.

        Every message is checked first: one bad message refuses the whole batch, and so
        does one beyond a backpressure limit (:class:`~sharded_broker.QueueFull`).
        """
        queue = check.queue_name(queue)
        checked = [check.message(m, self.max_payload_size) for m in messages]
        if not checked:
            return []
        return (yield _call("enqueue_many", queue, checked, self.settings(queue)))

    # -- consuming ------------------------------------------------------------------

    @operation
    def lease(
        self,
        queue: str,
        limit: int = 1,
        *,
        per_key: int = 1,
        visibility_timeout: float | None = None,
        wait: float = 0.0,
    ) -> Steps[list[Lease]]:
        """Deliver up to ``limit`` messages, waiting up to ``wait`` seconds for the first.

        Each served key gives one ordered batch of up to ``per_key`` consecutive messages.
        A lease must be acked, nacked or extended before ``visibility_timeout`` seconds
        (default: the queue's setting) or its message is delivered again.
        """
        queue = check.queue_name(queue)
        limit = check.positive_int(limit, "limit", maximum=MAX_LEASE_LIMIT)
        per_key = check.positive_int(per_key, "per_key", maximum=MAX_LEASE_LIMIT)
        settings = self.settings(queue)
        if visibility_timeout is None:
            visibility_timeout = settings.visibility_timeout
        visibility_timeout = check.seconds(visibility_timeout, "visibility_timeout", allow_zero=False)
        wait = check.seconds(wait, "wait")
        give_up_at = time.monotonic() + wait
        while True:
            result = yield _call("lease", queue, limit, per_key, visibility_timeout, settings)
            # A busy consumer and a waiting one both fire the queue's due schedules.
            fired, until_check = yield from self._look_for_due_schedules(queue)
            if result.leases:
                return result.leases
            if fired:
                continue  # deliver what was just enqueued
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                return result.leases
            # Wake for the next look at the schedules.
            remaining = min(remaining, max(until_check, 0.001))
            due_in = None if result.retry_in is None else max(result.retry_in, 0.0)
            coarse = self.backend.wait_resolution
            if due_in is None or due_in > remaining:
                yield _call("wait", queue, remaining)  # returns early when new work may have come
            elif due_in > coarse:
                # Something comes due within the wait: stop a resolution step before it
                # (or earlier, woken by new work) and sleep the rest on the next round.
                yield _call("wait", queue, due_in - coarse)
            else:
                yield Sleep(due_in)  # the backend's wait could not end this precisely

    @operation
    def wait_for_work(self, queues: Sequence[str], timeout: float) -> Steps[None]:
        """Block up to ``timeout`` seconds, returning early once a message may have become
        deliverable in any of ``queues`` (enqueued, released, come due). Leases nothing:
        for a consumer of several queues (a Celery worker and its remote-control queue)
        between empty ``lease`` calls, in one backend call. Returns at once for no queue."""
        if isinstance(queues, str):
            raise InvalidArgumentType("queues must be a sequence of queue names, not one str")
        names = [check.queue_name(queue) for queue in queues]
        yield _call("wait_any", names, check.seconds(timeout, "timeout"))

    @operation
    def ack(self, lease: Lease) -> Steps[bool]:
        """Settle a lease for good. False when its token is stale (nothing changed)."""
        return (yield _call("ack_many", [_lease(lease)]))[0]

    @operation
    def ack_many(self, leases: Sequence[Lease]) -> Steps[list[bool]]:
        """Ack several leases in one round trip; one bool per lease."""
        leases = [_lease(lease) for lease in leases]
        return (yield _call("ack_many", leases)) if leases else []

    @operation
    def nack(
        self, lease: Lease, *, delay: float = 0.0, dead: bool = False, reason: str | None = None
    ) -> Steps[bool]:
        """Return a message for retry after ``delay`` (back to the head of its key, holding
        it, unless the queue's ``retry_position`` is ``"tail"``), or with ``dead=True``
        move it to the dead-letter list. False when the token is stale."""
        lease = _lease(lease)
        delay = check.seconds(delay, "delay")
        if reason is not None and not isinstance(reason, str):
            raise InvalidArgumentType(f"reason must be a str, not {type(reason).__name__}")
        if reason is not None:
            # Free text, often an exception's message: a lone surrogate is escaped rather
            # than refused, so a worker can always dead-letter what failed.
            reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
            # A whole traceback may arrive here: keep its head, bounded like headers are.
            if len(reason) > check.MAX_REASON_LENGTH:
                reason = reason[: check.MAX_REASON_LENGTH - 15] + " ...(truncated)"
        return (yield _call(
            "nack", lease, delay=delay, dead=bool(dead), reason=reason, settings=self.settings(lease.queue)
        ))

    @operation
    def release(self, lease: Lease) -> Steps[bool]:
        """Give a leased message back unprocessed, without counting the delivery.

        It returns to its place at the head of its key (its original order, no delay,
        whatever ``retry_position`` says), its ``attempts`` go back down by one, and it is
        never dead-lettered by this, so a worker that stops gracefully can give back what
        it prefetched as often as it likes. Like a nack, releasing one message of an
        ordered batch returns it and every later unsettled message of the batch, in
        order; the key is free again once the batch is settled. Not counted in the
        metrics (the delivery stays counted as delivered). False when the token is stale
        (nothing changed)."""
        return (yield _call("release_many", [_lease(lease)]))[0]

    @operation
    def release_lease(
        self, queue: str, message_id: str, token: str, *, key: str | None, batch_id: str | None = None
    ) -> Steps[bool]:
        """:meth:`release` by what :meth:`why` shows of a lease in ``holds`` (the message id,
        the token, the batch id) and its shard key (None for an unkeyed message), for an
        operator who knows the lease's holder is dead."""
        for value, name in ((message_id, "message id"), (token, "lease token")):
            if not isinstance(value, str) or not value:
                raise InvalidArgumentType(f"{name} must be a non-empty string, not {value!r:.80}")
        mid = check.utf8_text(message_id, "message id")
        lease = Lease(
            queue=check.queue_name(queue), id=mid, key=None if key is None else check.shard_key(key), payload=b"",
            priority=0, attempts=0, headers={}, token=check.utf8_text(token, "lease token"), deadline=0.0,
            enqueued_at=0.0, batch_id=mid if batch_id is None else check.utf8_text(batch_id, "batch id"),
        )
        return (yield _call("release_many", [lease]))[0]

    @operation
    def release_many(self, leases: Sequence[Lease]) -> Steps[list[bool]]:
        """Release several leases in one round trip; one bool per lease (True also for a
        lease that an earlier lease of its batch in the same call returned)."""
        leases = [_lease(lease) for lease in leases]
        return (yield _call("release_many", leases)) if leases else []

    @operation
    def extend_many(self, leases: Sequence[Lease], visibility_timeout: float | None = None) -> Steps[list[bool]]:
        """Extend several leases in one round trip (a heartbeat for everything a worker
        holds): each deadline moves to now + ``visibility_timeout`` (default: each lease's
        queue setting) and its ``Lease.deadline`` is updated. One bool per lease, False
        for a stale token (that lease is left as it was)."""
        leases = [_lease(lease) for lease in leases]
        if visibility_timeout is not None:
            visibility_timeout = check.seconds(visibility_timeout, "visibility_timeout", allow_zero=False)
        timeouts = [
            self.settings(lease.queue).visibility_timeout if visibility_timeout is None else visibility_timeout
            for lease in leases
        ]
        if not leases:
            return []
        deadlines = yield _call("extend_many", leases, timeouts)
        for lease, deadline in zip(leases, deadlines):
            if deadline is not None:
                lease.deadline = deadline
        return [deadline is not None for deadline in deadlines]

    @operation
    def extend(self, lease: Lease, visibility_timeout: float | None = None) -> Steps[bool]:
        """Push a lease's deadline to now + ``visibility_timeout``. False when stale."""
        lease = _lease(lease)
        if visibility_timeout is None:
            visibility_timeout = self.settings(lease.queue).visibility_timeout
        visibility_timeout = check.seconds(visibility_timeout, "visibility_timeout", allow_zero=False)
        deadline = yield _call("extend", lease, visibility_timeout)
        if deadline is None:
            return False
        lease.deadline = deadline
        return True

    # -- operating ------------------------------------------------------------------

    @operation
    def set_interval(self, queue: str, key: str, seconds: float | None) -> Steps[None]:
        """At least ``seconds`` between the starts of two deliveries of ``key``; persisted.
        ``None`` returns the key to the queue's default interval."""
        queue = check.queue_name(queue)
        checked = check.shard_key(key)
        if checked is None:
            raise InvalidArgument("set_interval needs a shard key")
        if seconds is not None:
            seconds = check.seconds(seconds, "interval")
        yield _call("set_interval", queue, checked, seconds)

    @operation
    def set_weight(self, queue: str, key: str, weight: int | None) -> Steps[None]:
        """Give ``key`` a weight in the fairness order; persisted. ``None`` or 1 returns
        it to the default weight 1.

        While they stay backlogged, ready keys are served in proportion to their weights:
        a key of weight w keeps its place for up to w consecutive deliveries per round
        (deficit round robin), then goes to the back of the round. A weight never lets a
        key break its ``key_concurrency``, rate interval, pause or a retry holding it;
        waiting on any of them ends its round. docs/operations.md states the bound."""
        queue = check.queue_name(queue)
        checked = check.shard_key(key)
        if checked is None:
            raise InvalidArgument("set_weight needs a shard key")
        yield _call("set_weight", queue, checked, check.weight(weight))

    @operation
    def pause(self, queue: str, key: str | None = None) -> Steps[None]:
        """Stop delivering a key (or the whole queue). Running leases are not affected."""
        yield _call("set_paused", check.queue_name(queue), check.shard_key(key), True)

    @operation
    def resume(self, queue: str, key: str | None = None) -> Steps[None]:
        yield _call("set_paused", check.queue_name(queue), check.shard_key(key), False)

    @operation
    def stats(self, queue: str) -> Steps[QueueStats]:
        return (yield _call("stats", check.queue_name(queue)))

    @operation
    def queues(self) -> Steps[list[str]]:
        return (yield _call("queues"))

    @operation
    def dead_letters(self, queue: str, limit: int = 100, offset: int = 0) -> Steps[list[DeadLetter]]:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgument(f"offset must be an int >= 0, not {offset!r}")
        return (yield _call("dead_letters", check.queue_name(queue), check.positive_int(limit, "limit"), offset))

    @operation
    def replay(
        self, queue: str, ids: Sequence[str] | None = None, *, position: RetryPosition = "tail"
    ) -> Steps[int]:
        """Put dead letters (all, or those in ``ids``) back in service; how many moved."""
        if position not in ("head", "tail"):
            raise InvalidArgument(f"position must be 'head' or 'tail', not {position!r}")
        if ids is not None:
            if isinstance(ids, str) or not isinstance(ids, Iterable):
                raise InvalidArgumentType(f"ids must be a sequence of message id strings, not {type(ids).__name__}")
            ids = list(ids)  # read once: an iterator checked here would be empty below
            if not all(isinstance(i, str) for i in ids):
                raise InvalidArgumentType("ids must be a sequence of message id strings")
            ids = [check.utf8_text(i, "message id") for i in ids]
        return (yield _call("replay", check.queue_name(queue), ids, position))

    @operation
    def cancel(self, queue: str, message_id: str | None = None, *, ref: str | None = None) -> Steps[CancelResult]:
        """Cancel a waiting or delayed message, named by its id or by its ``ref`` (exactly
        one of them; a ref names the newest message enqueued with it, from any process):
        it is deleted and never runs.

        When it was its key's next message, the key moves on to the one after it (which
        keeps the key's place among the ready keys). A leased message (a consumer is
        running it) or a dead letter is refused and left as it was; so is an id (or ref)
        the queue does not hold (never enqueued there, acked, or cancelled already). The
        answer says which (:class:`CancelResult`; truthy exactly when cancelled). Its dedup
        id is released as an ack releases it: with ``unique_while_pending`` an equal
        message may be enqueued again at once, otherwise the dedup window still answers its
        id. Not counted in the metrics, like a purge."""
        queue = check.queue_name(queue)
        message_id, ref = _id_or_ref(message_id, ref)
        return (yield _call("cancel", queue, message_id, self.settings(queue), ref))

    @operation
    def get(self, queue: str, message_id: str | None = None, *, ref: str | None = None) -> Steps[MessageInfo | None]:
        """The message of ``queue`` named by its id or by its ``ref`` (exactly one of them)
        and what it is doing now: waiting, delayed, leased or dead, with its attempts and
        times (:class:`MessageInfo`). ``None`` when the queue holds no such message: acked
        (done) and cancelled messages are not kept by any backend."""
        queue = check.queue_name(queue)
        message_id, ref = _id_or_ref(message_id, ref)
        return (yield _call("get", queue, message_id, ref))

    @operation
    def purge(self, queue: str, *, dead: bool = False) -> Steps[int]:
        """Delete every waiting message (``dead=True``: every dead letter); how many.

        Redis and SQLite delete in atomic chunks of at most 1,000 messages, the queue
        consistent after each; at most as many messages as were there when it started are
        deleted (messages enqueued meanwhile may be among them)."""
        return (yield _call("purge", check.queue_name(queue), bool(dead)))

    @operation
    def metrics(self, queue: str, minutes: int = 60, *, key: str | None = None) -> Steps[list[MinuteMetrics]]:
        """Per-minute counts of enqueued, delivered, acked, retried and dead-lettered
        messages of ``queue`` (or of one shard ``key`` in it), oldest minute first: one
        entry per minute, zeros included, for the last ``minutes`` minutes (the current
        one included) that the backend's ``metrics_window`` (for a key:
        ``key_metrics_window``) still keeps."""
        return (yield _call(
            "metrics",
            check.queue_name(queue),
            check.positive_int(minutes, "minutes", maximum=MAX_METRICS_MINUTES),
            check.shard_key(key),
        ))

    @operation
    def keys(self, queue: str, limit: int = 50, *, sort: KeySort = "backlog") -> Steps[list[KeyInfo]]:
        """The shard keys of ``queue`` that hold messages (ready, delayed or leased), the
        largest ``backlog`` (or with ``sort="lag"``, the oldest head message) first."""
        if sort not in ("backlog", "lag"):
            raise InvalidArgument(f"sort must be 'backlog' or 'lag', not {sort!r}")
        return (yield _call(
            "keys", check.queue_name(queue), check.positive_int(limit, "limit", maximum=MAX_KEYS_LIMIT), sort
        ))

    @operation
    def key_info(self, queue: str, key: str) -> Steps[KeyInfo]:
        """One shard key: its backlog, leased batches, lag, pause, interval and weight, and the
        message it will deliver next (``head``). An unknown key answers zeros."""
        queue = check.queue_name(queue)
        checked = check.shard_key(key)
        if checked is None:
            raise InvalidArgument("key_info needs a shard key")
        return (yield _call("key_info", queue, checked))

    @operation
    def why(self, queue: str, key: str) -> Steps[KeyDiagnosis]:
        """The one reason ``key``'s next message is not delivered now, and until when
        (see :class:`KeyDiagnosis` and ``sharded_broker/diagnosis.py``), judged with this
        broker's settings for ``queue`` (``key_concurrency``, default ``interval``)."""
        queue = check.queue_name(queue)
        checked = check.shard_key(key)
        if checked is None:
            raise InvalidArgument("why needs a shard key")
        facts = yield _call("key_facts", queue, [checked])
        return (yield from self._diagnose(queue, facts))[0]

    @operation
    def stuck_keys(
        self, queue: str, *, older_than: float = 60.0, limit: int = 100, scan_limit: int = 10_000
    ) -> Steps[list[KeyDiagnosis]]:
        """Keys of ``queue`` whose head message has waited more than ``older_than`` seconds,
        each with why it is not moving, the longest wait first (at most ``limit``).

        Reads at most ``scan_limit`` keys (largest backlog first), in pages of
        ``STUCK_PAGE`` keys: per page one call for the keys, one for their heads' ages, and
        one for the facts of the keys whose head is old; never one call over every key."""
        queue = check.queue_name(queue)
        older_than = check.seconds(older_than, "older_than")
        limit = check.positive_int(limit, "limit", maximum=MAX_KEYS_LIMIT)
        scan_limit = check.positive_int(scan_limit, "scan_limit", maximum=MAX_STUCK_SCAN)
        stuck: list[KeyDiagnosis] = []
        last_delivered: list[float | None] = []
        for offset in range(0, scan_limit, STUCK_PAGE):
            page = yield _call("backlog_keys", queue, offset, min(STUCK_PAGE, scan_limit - offset))
            if not page:
                break
            # Cheap first: only keys whose head is old are read in full.
            now, heads = yield _call("head_times", queue, page)
            old = [key for key, enqueued_at in zip(page, heads) if enqueued_at is not None and now - enqueued_at > older_than]
            if old:
                facts = yield _call("key_facts", queue, old)
                waiting = [f for f in facts if f.head is not None and f.now - f.head.enqueued_at > older_than]
                stuck.extend((yield from self._diagnose(queue, waiting, last_delivered)))
            if len(page) < STUCK_PAGE:
                break
        stuck.sort(key=lambda d: (-d.waited, d.key))
        return stuck[:limit]

    @operation
    def lagging_keys(self, queue: str, *, limit: int = 10, scan_limit: int = 10_000) -> Steps[list[KeyInfo]]:
        """The keys of ``queue`` whose head message has waited longest (``keys(sort="lag")``
        in bounded pages): at most ``scan_limit`` keys read, largest backlog first, in pages
        of ``STUCK_PAGE``, one call for the keys and one for their heads' ages each; then
        the ``limit`` oldest are read in full."""
        queue = check.queue_name(queue)
        limit = check.positive_int(limit, "limit", maximum=MAX_KEYS_LIMIT)
        scan_limit = check.positive_int(scan_limit, "scan_limit", maximum=MAX_STUCK_SCAN)
        oldest: list[tuple[float, str]] = []  # (enqueued_at, key) of the limit oldest heads seen
        for offset in range(0, scan_limit, STUCK_PAGE):
            page = yield _call("backlog_keys", queue, offset, min(STUCK_PAGE, scan_limit - offset))
            if not page:
                break
            _, heads = yield _call("head_times", queue, page)
            oldest = heapq.nsmallest(
                limit, oldest + [(t, key) for key, t in zip(page, heads) if t is not None]
            )
            if len(page) < STUCK_PAGE:
                break
        infos = []
        for _, key in oldest:
            infos.append((yield _call("key_info", queue, key)))
        return sorted(infos, key=lambda info: (-info.lag, info.key))

    # -- schedules: recurrent messages stored in the broker --------------------------------

    @operation
    def schedule(
        self,
        queue: str,
        name: str,
        payload: bytes,
        *,
        every: float | datetime.timedelta | None = None,
        cron: str | None = None,
        key: str | None = None,
        priority: int = 0,
        headers: Mapping[str, Any] | None = None,
    ) -> Steps[Schedule]:
        """Create (or replace, by ``name``) a recurrent message of ``queue``: every
        ``every`` seconds (a number or a ``timedelta``), or at the minutes of ``cron``
        (crontab's five fields, UTC, such as ``"*/5 * * * *"``), one message with
        ``payload``, ``key``, ``priority`` and ``headers`` (plus ``{"schedule": name}``) is
        enqueued. The schedule as stored.

        Stored in the backend and fired by the consumers of ``queue`` (:meth:`lease` looks
        about once a second): no separate process is needed, and however many consumers
        run, each period's message is enqueued once. A period that passed while no
        consumer ran is fired once when one starts, not once per missed period. An
        ``every`` schedule is first due ``every`` seconds after it is created; replacing
        a schedule keeps its next due time when its ``every``/``cron`` is unchanged, and
        its pause (sharded_broker/recurrence.py, docs/scheduling.md).
        """
        queue = check.queue_name(queue)
        name = _schedule_name(name)
        if (every is None) == (cron is None):
            raise InvalidArgument("schedule needs exactly one of every= (seconds or a timedelta) and cron= (a crontab spec)")
        every_seconds = None if every is None else recurrence.every_seconds(every)
        cron_spec = None if cron is None else recurrence.parse_cron(cron).spec
        message = check.message_of(payload, key, priority, 0.0, None, headers, False, self.max_payload_size)
        now = yield _call("now")
        stored = Schedule(
            queue=queue, name=name, payload=message.payload, key=message.key, priority=message.priority,
            headers=dict(message.headers or {}), every=every_seconds, cron=cron_spec,
            next_due=recurrence.first_due(every_seconds, cron_spec, now),
        )
        return (yield _call("put_schedule", queue, stored))

    @operation
    def schedules(self, queue: str) -> Steps[list[Schedule]]:
        """The schedules of ``queue``, by name: spec, key, next due time, pause, last firing."""
        return (yield _call("schedules", check.queue_name(queue)))

    @operation
    def pause_schedule(self, queue: str, name: str) -> Steps[None]:
        """Stop a schedule from enqueuing until :meth:`resume_schedule`. InvalidArgument
        for an unknown name."""
        queue, name = check.queue_name(queue), _schedule_name(name)
        if not (yield _call("set_schedule_paused", queue, name, True, None)):
            raise InvalidArgument(f"queue {queue!r} has no schedule named {name!r}")

    @operation
    def resume_schedule(self, queue: str, name: str) -> Steps[None]:
        """Let a paused schedule enqueue again, from its next period after now (periods
        that passed while it was paused are not made up). InvalidArgument for an unknown
        name."""
        queue, name = check.queue_name(queue), _schedule_name(name)
        found = [s for s in (yield _call("schedules", queue)) if s.name == name]
        if not found:
            raise InvalidArgument(f"queue {queue!r} has no schedule named {name!r}")
        current = found[0]
        if not current.paused:
            return
        now = yield _call("now")
        next_due = current.next_due
        if next_due <= now:
            next_due = recurrence.next_due(current.every, current.cron, next_due, now)
        if not (yield _call("set_schedule_paused", queue, name, False, next_due)):
            raise InvalidArgument(f"queue {queue!r} has no schedule named {name!r}")

    @operation
    def unschedule(self, queue: str, name: str) -> Steps[bool]:
        """Remove a schedule; False when ``queue`` had none named ``name``."""
        return (yield _call("remove_schedule", check.queue_name(queue), _schedule_name(name)))

    @operation
    def fire_due_schedules(self, queue: str) -> Steps[list[str]]:
        """Enqueue the message of every schedule of ``queue`` that is due now (at most
        ``SCHEDULES_PER_CHECK``); the ids of the messages this call enqueued. What
        :meth:`lease` does about once a second; a schedule another process fired first
        is skipped, and so is one whose message a backpressure limit refuses (logged; it
        fires at a later look once there is room). Each firing is a compare-and-set on the
        schedule's next due time, so concurrent callers never enqueue one period twice."""
        return (yield from self._fire_due(check.queue_name(queue), _call))

    def events(self, queue: str, *, timeout: float | None = None) -> "EventStream":
        """Subscribe to ``queue``'s lifecycle events (enqueued, delivered, acked, retried,
        dead) from now on. Iterate the answer for :class:`Event` values; iteration ends
        after ``timeout`` seconds without an event (``None``: never). Close it (or use it
        as a context manager) to unsubscribe. ConfigurationError when the broker was
        connected with ``events=False``."""
        queue, timeout = event_stream_args(queue, timeout)
        return EventStream(self.backend.subscribe(queue), timeout)

    @operation
    def bind(self, exchange: str, queue: str) -> Steps[None]:
        """Route messages published to fanout ``exchange`` to ``queue`` too."""
        yield _call("bind", check.queue_name(exchange), check.queue_name(queue))

    @operation
    def unbind(self, exchange: str, queue: str) -> Steps[None]:
        yield _call("unbind", check.queue_name(exchange), check.queue_name(queue))

    @operation
    def bound_queues(self, exchange: str) -> Steps[list[str]]:
        return (yield _call("bound_queues", check.queue_name(exchange)))

    def feed(
        self, queue: str, writer: Writer, *, low_water: int, high_water: int, interval: float = 1.0
    ) -> Feeder:
        """Start a daemon thread that refills ``queue`` from ``writer(room)`` whenever its
        waiting messages (ready + delayed) fall below ``low_water``, up to ``high_water``,
        looking every ``interval`` seconds; every message must carry a ``dedup_id``, so
        none is enqueued twice within the queue's dedup window. Stop it with
        ``.stop()``. See :mod:`sharded_broker.feeder`."""
        feeder = Feeder(self, queue, writer, low_water=low_water, high_water=high_water, interval=interval)
        feeder.start()
        return feeder

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def event_stream_args(queue: str, timeout: float | None) -> tuple[str, float | None]:
    """The checked arguments of :meth:`Broker.events`."""
    queue = check.queue_name(queue)
    if timeout is not None:
        timeout = check.seconds(timeout, "timeout")
    return queue, timeout


def event_poll(give_up_at: float | None, poll: float) -> float:
    """How long an event stream's next wait lasts (at most ``poll``, so that a closed
    stream is noticed); zero or less once ``give_up_at`` (monotonic time) has passed."""
    return poll if give_up_at is None else min(poll, give_up_at - time.monotonic())


class EventStream:
    """An iterator over one queue's events; see :meth:`Broker.events`."""

    # How long one wait for events lasts, so that a closed stream is noticed.
    POLL = 0.5

    def __init__(self, subscription: EventSubscription, timeout: float | None) -> None:
        self._subscription = subscription
        self._timeout = timeout
        self._pending: list[Event] = []
        self._closed = False

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        give_up_at = None if self._timeout is None else time.monotonic() + self._timeout
        while not self._pending:
            if self._closed:
                raise StopIteration
            remaining = event_poll(give_up_at, self.POLL)
            if remaining <= 0:
                raise StopIteration
            self._pending = self._subscription.get(remaining)
        return self._pending.pop(0)

    def close(self) -> None:
        self._closed = True
        self._subscription.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _message_id(message_id: Any) -> str:
    if not isinstance(message_id, str):
        raise InvalidArgumentType(f"message id must be a str, not {type(message_id).__name__}")
    if not message_id:
        raise InvalidArgument("message id must not be empty")
    return check.utf8_text(message_id, "message id")


def _id_or_ref(message_id: Any, ref: Any) -> tuple[str | None, str | None]:
    """A message named by exactly one of its id and its ref, checked."""
    if (message_id is None) == (ref is None):
        raise InvalidArgument(
            "name the message by exactly one of its id and its ref (cancel/get(queue, id) or (queue, ref=...))"
        )
    if ref is not None:
        return None, check.ref(ref)
    return _message_id(message_id), None


def _schedule_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidArgumentType(f"a schedule name must be a str, not {type(name).__name__}")
    if not name or len(name) > MAX_SCHEDULE_NAME_LENGTH or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArgument(
            f"a schedule name must be 1 to {MAX_SCHEDULE_NAME_LENGTH} characters without control characters, not {name!r:.80}"
        )
    return check.utf8_text(name, "schedule name")


def _lease(lease: Any) -> Lease:
    if not isinstance(lease, Lease):
        raise InvalidArgumentType(f"expected a Lease, not {type(lease).__name__}")
    return lease
