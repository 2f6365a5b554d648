"""The asyncio API: :func:`connect` gives an :class:`AsyncBroker`, the operations of
:class:`~sharded_broker.Broker`, awaitable.

    broker = sharded_broker.aio.connect("redis://localhost:6379/0")
    await broker.enqueue("sms", b"hi", key="user-1")
    [lease] = await broker.lease("sms", wait=5.0)
    await broker.ack(lease)

Every operation runs the steps of the Broker method of the same name
(``sharded_broker/broker.py``): the same argument checks, errors, settings and waiting
logic, awaited instead of blocking. How a backend is awaited:

- ``redis://`` and ``rediss://``: natively, on ``redis.asyncio`` connections
  (``backends/redis_asyncio.py``, which runs the same Redis function calls as the blocking
  backend). ``lease(wait=...)`` and ``wait_for_work`` block on an asyncio connection of
  their own; events come from an asyncio pub/sub connection.
- ``memory://`` and ``sqlite://``: the blocking backend, in threads of the broker's own:
  ``CALL_THREADS`` for calls, and up to ``WAIT_THREADS`` for ``lease`` and
  ``wait_for_work`` (which may wait) and event streams, so a waiting consumer never holds
  up an enqueue. A wait in a thread lasts at most ``THREAD_WAIT_SLICE`` seconds at a time,
  so a cancelled operation, or :meth:`AsyncBroker.close`, ends within that.

Either way the event loop never blocks on the backend. A ``lease`` whose task is
cancelled while the backend was handing out messages gives them back (a release, so their
delivery is not counted) as soon as they arrive.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import (
    Any, AsyncIterable, Awaitable, Callable, Concatenate, Coroutine, Iterable, Mapping, ParamSpec, TypeVar, Union,
)

from . import urls
from . import validation as check
from .backend import Backend
from .broker import (
    Attempt, Broker, BrokerEngine, EventStream, Sleep, Steps, backend_class, event_poll, event_stream_args, open_broker,
    public_signature, run_steps,
)
from .errors import ShardedBrokerError
from .feeder import Feeding, FillResult
from .models import Event, LeaseResult, Message, QueueSettings

T = TypeVar("T")
P = ParamSpec("P")

#: An AsyncFeeder's writer: ``writer(room)`` answers up to ``room`` messages, each with a
#: ``dedup_id``: as a list or iterable, as an awaitable of one (``async def``), or as an
#: async iterator (an async generator).
AsyncWriter = Callable[[int], Union[Iterable[Message], Awaitable[Iterable[Message]], AsyncIterable[Message]]]

# Threads of one broker on a memory:// or sqlite:// backend: for calls that return at once
# (the backend serializes them on one lock anyway), and for those that may wait.
CALL_THREADS = 4
WAIT_THREADS = 32
# A wait in a thread returns after at most this long, for its operation to see whether the
# task awaiting it was cancelled (the lease loop then simply asks again).
THREAD_WAIT_SLICE = 0.25


def async_backend_class(url: str) -> Any:
    """The class serving ``url`` for an AsyncBroker: the asyncio Redis backend, or a
    blocking backend's class (run in threads)."""
    if urls.scheme(url) in ("redis", "rediss"):
        from .backends.redis_asyncio import AsyncRedisBackend

        return AsyncRedisBackend
    if urls.scheme(url) in ("redis+cluster", "rediss+cluster"):
        from .backends.redis_asyncio import AsyncRedisClusterBackend

        return AsyncRedisClusterBackend
    return backend_class(url)


def connect(url: str | None = None, **options: Any) -> "AsyncBroker":
    """:func:`sharded_broker.connect` for asyncio: the same URLs, options and environment
    variables, the same errors for bad ones, an :class:`AsyncBroker` in answer. Opens no
    connection itself (call it anywhere; a Redis connection is made on first use, by the
    event loop that uses it), except a SQLite file, which is opened and checked here."""
    return open_broker(AsyncBroker, async_backend_class, url, options, discard=_discard)


def _discard(backend: Any) -> None:
    if isinstance(backend, Backend):
        backend.close()
    # An asyncio Redis backend has opened no connection yet: its clients connect on first use.


def awaitable(
    op: Callable[Concatenate[Broker, P], T], *, waits: bool = False
) -> Callable[Concatenate["AsyncBroker", P], Coroutine[Any, Any, T]]:
    """The AsyncBroker method of Broker operation ``op``: its steps, awaited. ``waits``: the
    operation may wait for work (run in a waiting thread when the backend is blocking)."""
    steps = getattr(op, "steps", None)
    if steps is None:
        raise TypeError(f"Broker.{op.__name__} is not written as steps (@operation): it cannot be awaited")

    @functools.wraps(op)
    async def run(self: "AsyncBroker", *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(steps(self, *args, **kwargs), waits)

    run.__signature__ = public_signature(steps)  # type: ignore[attr-defined]
    return run


class AsyncBroker(BrokerEngine):
    """Per-key FIFO queues over one backend, for asyncio: every operation of
    :class:`~sharded_broker.Broker`, with the same arguments and answers, awaitable. Use
    one per event loop (``async with`` closes it)."""

    def __init__(
        self,
        backend: Any,
        *,
        defaults: QueueSettings | None = None,
        max_payload_size: int = check.DEFAULT_MAX_PAYLOAD_SIZE,
    ) -> None:
        super().__init__(backend, defaults=defaults, max_payload_size=max_payload_size)
        self._threads = _Threads(backend) if isinstance(backend, Backend) else None

    async def _run(self, steps: Steps[T], waits: bool) -> T:
        if self._threads is not None:
            return await self._threads.run(steps, waits)
        return await _run_native(self.backend, steps)

    now = awaitable(Broker.now)
    enqueue = awaitable(Broker.enqueue)
    enqueue_many = awaitable(Broker.enqueue_many)
    lease = awaitable(Broker.lease, waits=True)
    wait_for_work = awaitable(Broker.wait_for_work, waits=True)
    ack = awaitable(Broker.ack)
    ack_many = awaitable(Broker.ack_many)
    nack = awaitable(Broker.nack)
    release = awaitable(Broker.release)
    release_lease = awaitable(Broker.release_lease)
    release_many = awaitable(Broker.release_many)
    extend = awaitable(Broker.extend)
    extend_many = awaitable(Broker.extend_many)
    set_interval = awaitable(Broker.set_interval)
    set_weight = awaitable(Broker.set_weight)
    pause = awaitable(Broker.pause)
    resume = awaitable(Broker.resume)
    stats = awaitable(Broker.stats)
    queues = awaitable(Broker.queues)
    dead_letters = awaitable(Broker.dead_letters)
    replay = awaitable(Broker.replay)
    cancel = awaitable(Broker.cancel)
    get = awaitable(Broker.get)
    purge = awaitable(Broker.purge)
    metrics = awaitable(Broker.metrics)
    keys = awaitable(Broker.keys)
    key_info = awaitable(Broker.key_info)
    why = awaitable(Broker.why)
    stuck_keys = awaitable(Broker.stuck_keys)
    lagging_keys = awaitable(Broker.lagging_keys)
    bind = awaitable(Broker.bind)
    unbind = awaitable(Broker.unbind)
    bound_queues = awaitable(Broker.bound_queues)
    schedule = awaitable(Broker.schedule)
    schedules = awaitable(Broker.schedules)
    pause_schedule = awaitable(Broker.pause_schedule)
    resume_schedule = awaitable(Broker.resume_schedule)
    unschedule = awaitable(Broker.unschedule)
    fire_due_schedules = awaitable(Broker.fire_due_schedules)

    def feed(
        self, queue: str, writer: AsyncWriter, *, low_water: int, high_water: int, interval: float = 1.0
    ) -> AsyncFeeder:
        """:meth:`Broker.feed` for asyncio: start a task of the running event loop that
        refills ``queue`` from ``writer(room)`` whenever its waiting messages (ready +
        delayed) fall below ``low_water``, up to ``high_water``, looking every ``interval``
        seconds; ``writer`` may be an ``async def`` or an async generator. Every message
        must carry a ``dedup_id``. End it with ``await feeder.stop()``. See
        :class:`AsyncFeeder`."""
        feeder = AsyncFeeder(self, queue, writer, low_water=low_water, high_water=high_water, interval=interval)
        feeder.start()
        return feeder

    def events(self, queue: str, *, timeout: float | None = None) -> "AsyncEventStream":
        """:meth:`Broker.events` as an async iterator: ``async for event in broker.events(q)``.
        It subscribes on ``async with``, on ``await``, or else on the first iteration (events
        from then on); ConfigurationError then when events are off."""
        queue, timeout = event_stream_args(queue, timeout)
        return AsyncEventStream(self._subscribe, queue, timeout)

    async def _subscribe(self, queue: str) -> Any:
        if self._threads is not None:
            threads = self._threads
            return _ThreadedSubscription(threads, await threads.call(threads.backend.subscribe, queue))
        return await self.backend.subscribe(queue)

    async def close(self) -> None:
        """Release the backend's connections (and this broker's threads)."""
        if self._threads is not None:
            await self._threads.close()
        else:
            await self.backend.close()

    async def __aenter__(self) -> "AsyncBroker":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncFeeder(Feeding):
    """:class:`~sharded_broker.feeder.Feeder` for an :class:`AsyncBroker`: the same looks, checks
    and settings, as a task of the event loop. ``writer(room)`` may answer the messages,
    an awaitable of them (``async def``) or an async iterator (an async generator); it is
    asked for no more than ``room`` of them. :meth:`start` runs it as a task
    (``AsyncBroker.feed`` does), :meth:`run` feeds in the awaiting task, :meth:`fill_once`
    looks once. A writer that raises, or a backend that cannot be reached, is logged and
    the feeder tries again ``interval`` seconds later."""

    def __init__(
        self,
        broker: AsyncBroker,
        queue: str,
        writer: AsyncWriter,
        *,
        low_water: int,
        high_water: int,
        interval: float = 1.0,
    ) -> None:
        self._configure(queue, writer, low_water, high_water, interval)
        self.broker = broker
        self.writer = writer
        self.stopped = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def fill_once(self) -> FillResult:
        """:meth:`Feeder.fill_once`, awaited."""
        waiting, room = self._room(await self.broker.stats(self.queue))
        if not room:
            return FillResult(waiting, 0)
        written = self.writer(room)
        if inspect.isawaitable(written):
            written = await written
        if isinstance(written, AsyncIterable):
            messages: list[Any] = []
            async for message in written:
                messages.append(message)
                if len(messages) == room:
                    break
            close = getattr(written, "aclose", None)
            if close is not None:
                await close()  # an async generator left early runs its cleanup now
        else:
            messages = list(itertools.islice(written, room))
        messages = self._checked(messages)
        if messages:
            await self.broker.enqueue_many(self.queue, messages)
        return FillResult(waiting, len(messages))

    async def run(self) -> None:
        """Feed until :meth:`stop`: a look at once, then one every ``interval`` seconds."""
        while not self.stopped.is_set():
            try:
                await self.fill_once()
            except Exception as exc:
                self._log_failed_fill(exc)
            try:
                await asyncio.wait_for(self.stopped.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    def start(self) -> "asyncio.Task[None]":
        """Run :meth:`run` as a task of the running event loop; answers the task."""
        self.task = asyncio.get_running_loop().create_task(self.run(), name=f"sharded-broker-feeder-{self.queue}")
        return self.task

    async def stop(self) -> None:
        """Stop feeding; returns once a fill in progress has ended (and the task with it)."""
        self.stopped.set()
        if self.task is not None and self.task is not asyncio.current_task():
            await self.task


# Tasks giving back leases of a cancelled lease call: kept until done (the loop holds
# tasks only weakly).
_GIVING_BACK: set[asyncio.Task[Any]] = set()


async def _run_native(backend: Any, steps: Steps[T]) -> T:
    """Run an operation's steps on an asyncio backend, awaiting each call."""
    try:
        step = next(steps)
        while True:
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                answer = None
            elif isinstance(step, Attempt):
                method, args, kwargs = step.call
                try:
                    answer = await getattr(backend, method)(*args, **kwargs)
                except ShardedBrokerError as exc:
                    step = steps.throw(exc)
                    continue
            else:
                method, args, kwargs = step
                if method == "lease":
                    answer = await _lease_or_give_back(backend, args, kwargs)
                else:
                    answer = await getattr(backend, method)(*args, **kwargs)
            step = steps.send(answer)
    except StopIteration as done:
        return done.value


async def _lease_or_give_back(backend: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> LeaseResult:
    """The backend's lease; if the awaiting task is cancelled meanwhile, the call still
    completes and the messages it handed out are released."""
    call = asyncio.ensure_future(backend.lease(*args, **kwargs))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        def give_back(done: asyncio.Future[LeaseResult]) -> None:
            if not done.cancelled() and done.exception() is None and done.result().leases:
                task = asyncio.ensure_future(backend.release_many(done.result().leases))
                _GIVING_BACK.add(task)
                task.add_done_callback(_GIVING_BACK.discard)

        call.add_done_callback(give_back)
        raise


class _Abandoned(Exception):
    """The task awaiting an operation in a thread was cancelled: the operation stops."""


class _ThreadSide:
    """A blocking backend as one operation running in a thread sees it: every call first
    checks that the operation is still awaited, waits last at most ``THREAD_WAIT_SLICE``,
    and a lease handed out after the task was cancelled is given back."""

    def __init__(self, backend: Backend, abandoned: threading.Event) -> None:
        self._backend = backend
        self._abandoned = abandoned

    def __getattr__(self, name: str) -> Any:
        if self._abandoned.is_set():
            raise _Abandoned
        return getattr(self._backend, name)

    def wait(self, queue: str, timeout: float) -> None:
        self.__getattr__("wait")(queue, min(timeout, THREAD_WAIT_SLICE))

    def wait_any(self, queues: list[str], timeout: float) -> None:
        self.__getattr__("wait_any")(queues, min(timeout, THREAD_WAIT_SLICE))

    def lease(self, *args: Any) -> LeaseResult:
        result: LeaseResult = self.__getattr__("lease")(*args)
        if result.leases and self._abandoned.is_set():
            self._backend.release_many(result.leases)
            raise _Abandoned
        return result


class _Threads:
    """A blocking backend's operations, run in threads of one broker."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="sharded-broker-aio")
        self._waits = ThreadPoolExecutor(WAIT_THREADS, thread_name_prefix="sharded-broker-aio-wait")
        self._running: set[threading.Event] = set()  # the abandon flags of operations under way

    async def call(self, function: Callable[..., T], *args: Any, waits: bool = False) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._waits if waits else self._calls, function, *args)

    async def run(self, steps: Steps[T], waits: bool) -> T:
        abandoned = threading.Event()
        self._running.add(abandoned)
        try:
            return await self.call(run_steps, _ThreadSide(self.backend, abandoned), steps, waits=waits)
        except asyncio.CancelledError:
            abandoned.set()  # the thread stops at its next backend call
            raise
        finally:
            self._running.discard(abandoned)

    async def close(self) -> None:
        for abandoned in list(self._running):
            abandoned.set()
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._calls.shutdown(wait=True)
        self._waits.shutdown(wait=True)
        self.backend.close()


class _ThreadedSubscription:
    """A blocking backend's event subscription, read in a waiting thread."""

    def __init__(self, threads: _Threads, subscription: Any) -> None:
        self._threads = threads
        self._subscription = subscription

    async def get(self, timeout: float) -> list[Event]:
        return await self._threads.call(self._subscription.get, timeout, waits=True)

    async def close(self) -> None:
        await self._threads.call(self._subscription.close)


class AsyncEventStream:
    """An async iterator over one queue's events; see :meth:`AsyncBroker.events`."""

    # How long one wait for events lasts, so that a closed stream is noticed.
    POLL = EventStream.POLL

    def __init__(self, subscribe: Callable[[str], Awaitable[Any]], queue: str, timeout: float | None) -> None:
        self._subscribe = subscribe
        self._queue = queue
        self._timeout = timeout
        self._subscription: Any = None
        self._pending: list[Event] = []
        self._closed = False

    async def _opened(self) -> "AsyncEventStream":
        if self._subscription is None and not self._closed:
            self._subscription = await self._subscribe(self._queue)
        return self

    def __await__(self) -> Any:
        return self._opened().__await__()

    def __aiter__(self) -> "AsyncEventStream":
        return self

    async def __anext__(self) -> Event:
        await self._opened()
        give_up_at = None if self._timeout is None else time.monotonic() + self._timeout
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            remaining = event_poll(give_up_at, self.POLL)
            if remaining <= 0:
                raise StopAsyncIteration
            self._pending = await self._subscription.get(remaining)
        return self._pending.pop(0)

    async def close(self) -> None:
        """Unsubscribe; iteration ends."""
        self._closed = True
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await subscription.close()

    aclose = close

    async def __aenter__(self) -> "AsyncEventStream":
        return await self._opened()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
