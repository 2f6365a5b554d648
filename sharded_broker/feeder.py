"""A feeder: keeps a queue topped up from a user's writer function (QuasiQueue's writer).

::

    def writer(room: int) -> Iterable[sharded_broker.Message]:
        for row in db.fetch_pending(limit=room):
            yield sharded_broker.Message(row.payload, key=row.account, dedup_id=f"row-{row.id}")

    feeder = broker.feed("sync", writer, low_water=100, high_water=1_000, interval=1.0)
    ...
    feeder.stop()        # from any thread; returns once the feeder's loop has ended

On the asyncio API, :meth:`AsyncBroker.feed <sharded_broker.aio.AsyncBroker.feed>` runs
:class:`~sharded_broker.aio.AsyncFeeder`, the same looks and checks (:class:`Feeding`) as a
task of the event loop.

Every ``interval`` seconds the feeder reads the queue's stats; when its waiting messages
(``ready + delayed``) are below ``low_water`` it asks ``writer(room)`` for up to
``room = high_water - waiting`` messages and enqueues them in one ``enqueue_many``. Every
message must carry a ``dedup_id``: the engine drops an enqueue whose dedup id it saw
within the queue's ``dedup_window`` (default 5 minutes), so a writer that yields a row
again (it is still pending in the source, or two feeders run) never queues it twice
within the window. Uses only the public :class:`~sharded_broker.Broker` API.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import validation as check
from .errors import BackendUnavailable, InvalidArgument, InvalidArgumentType
from .models import Message

if TYPE_CHECKING:
    from .broker import Broker

__all__ = ["Feeder", "Feeding", "FillResult", "Writer"]

logger = logging.getLogger(__name__)

#: ``writer(room)``: up to ``room`` messages to enqueue, each with a ``dedup_id``.
Writer = Callable[[int], Iterable[Message]]


@dataclass(frozen=True)
class FillResult:
    """One look at the queue: how many messages were waiting, and how many the writer
    gave (``written``; duplicates the engine dropped are counted here too, since the
    engine answers a duplicate with the first message's id)."""

    waiting: int
    written: int


class Feeding:
    """What every feeder does on a look at its queue, whatever runs it (Feeder's thread,
    AsyncFeeder's task in sharded_broker.aio): its checked settings, how much room a look
    finds, the checks of what the writer gave, and how a failed look is logged."""

    queue: str
    low_water: int
    high_water: int
    interval: float

    def _configure(self, queue: str, writer: object, low_water: int, high_water: int, interval: float) -> None:
        if not callable(writer):
            raise InvalidArgumentType(f"writer must be a callable(room) -> messages, not {type(writer).__name__}")
        self.queue = check.queue_name(queue)
        self.low_water = _count(low_water, "low_water", minimum=0)
        self.high_water = _count(high_water, "high_water", minimum=1)
        if self.low_water > self.high_water:
            raise InvalidArgument(f"low_water ({self.low_water}) must not exceed high_water ({self.high_water})")
        self.interval = check.seconds(interval, "interval", allow_zero=False)

    def _room(self, stats: Any) -> tuple[int, int]:
        """(waiting, room): the queue's waiting messages and how many to ask the writer for
        (0 when they are not below low water)."""
        waiting = stats.ready + stats.delayed
        return waiting, 0 if waiting >= self.low_water else self.high_water - waiting

    def _checked(self, messages: list[Any]) -> list[Message]:
        """The writer's messages, or InvalidArgument (nothing enqueued) for one that is not
        a :class:`Message` or has no ``dedup_id``."""
        for message in messages:
            if not isinstance(message, Message):
                raise InvalidArgumentType(
                    f"the writer of queue {self.queue!r} must yield sharded_broker.Message values, not "
                    f"{type(message).__name__}"
                )
            if message.dedup_id is None:
                raise InvalidArgument(
                    f"the writer of queue {self.queue!r} yielded a message without a dedup_id: a feeder "
                    "enqueues only messages it can recognise again (Message(..., dedup_id=...))"
                )
        return messages

    def _log_failed_fill(self, exc: Exception) -> None:
        if isinstance(exc, BackendUnavailable):
            logger.warning("feeder of queue %r: backend unavailable, trying again: %s", self.queue, exc)
        else:
            logger.error("feeder of queue %r: a fill failed; trying again in %gs", self.queue, self.interval,
                         exc_info=exc)


class Feeder(Feeding, threading.Thread):
    """Refills ``queue`` from ``writer`` when it runs low; see the module docstring.

    A daemon thread: ``start()`` it (``Broker.feed`` does), or call ``run()`` to feed in
    the current thread until :meth:`stop` is called from another thread or a signal
    handler, or call :meth:`fill_once` from a loop of your own.

    A writer that raises, or a backend that cannot be reached, is logged and the feeder
    tries again ``interval`` seconds later: one bad look never stops the feeding.
    """

    def __init__(
        self,
        broker: "Broker",
        queue: str,
        writer: Writer,
        *,
        low_water: int,
        high_water: int,
        interval: float = 1.0,
    ) -> None:
        self._configure(queue, writer, low_water, high_water, interval)
        super().__init__(name=f"sharded-broker-feeder-{self.queue}", daemon=True)
        self.broker = broker
        self.writer = writer
        self.stopped = threading.Event()

    def fill_once(self) -> FillResult:
        """Look at the queue once and, when it is below ``low_water``, enqueue up to
        ``high_water - waiting`` messages from the writer (one ``enqueue_many``).

        Raises InvalidArgument (nothing enqueued) when the writer yields something that is
        not a :class:`Message`, or a message without a ``dedup_id``."""
        waiting, room = self._room(self.broker.stats(self.queue))
        if not room:
            return FillResult(waiting, 0)
        messages = self._checked(list(itertools.islice(self.writer(room), room)))  # never more than room
        if messages:
            self.broker.enqueue_many(self.queue, messages)
        return FillResult(waiting, len(messages))

    def run(self) -> None:
        """Feed until :meth:`stop`: a look at once, then one every ``interval`` seconds."""
        while not self.stopped.is_set():
            try:
                self.fill_once()
            except Exception as exc:
                self._log_failed_fill(exc)
            self.stopped.wait(self.interval)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop feeding; waits up to ``timeout`` seconds for a fill in progress to end
        (when the feeder runs in a thread of its own and it is not the caller)."""
        self.stopped.set()
        if self.ident is not None and self is not threading.current_thread():
            self.join(timeout)


def _count(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, not {value}")
    return value
