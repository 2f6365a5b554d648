"""Helpers for the tests of apps that use sharded-broker (no test framework needed).

* :class:`KeyRecorder` records, from any thread, when each message of a shard key ran;
  :func:`assert_key_order` checks such records: every key's runs in the order they were
  sent and never two of one key at once (the per-key FIFO guarantee).
* :class:`TestClock` is a clock to connect ``memory://`` and ``sqlite://`` engines with
  (``sharded_broker.connect(url, clock=clock)``): real time plus an offset that
  :meth:`TestClock.advance` moves forward, so delayed messages and rate intervals come
  due at once instead of after a sleep. (``redis://`` always uses the server's clock.)
* :func:`drain_engine` waits until a queue is empty, moving a :class:`TestClock` forward
  whenever only delayed messages are left.

The pytest plugin (``sharded_broker.integrations.pytest_plugin``) builds its fixtures on
these; see docs/testing.md.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Iterator, Optional

from .broker import Broker

__all__ = ["KeyOrderError", "KeyRecorder", "Run", "TestClock", "assert_key_order", "drain_engine"]


@dataclass(frozen=True)
class Run:
    """One run of one message: its shard key, its place in the key's sending order
    (``seq``) and when it started and finished (``time.monotonic()`` seconds)."""

    key: Hashable
    seq: Any
    started: float
    finished: float


class KeyOrderError(AssertionError):
    """A shard key's messages ran out of order or overlapped."""


def assert_key_order(records: Iterable[Any]) -> dict[Hashable, list[Any]]:
    """Check the per-key FIFO guarantee on what ran; the ``seq`` values per key, in order.

    ``records`` are :class:`Run` values (what :class:`KeyRecorder` keeps), or tuples
    ``(key, seq, started, finished)``. For every key, ordered by start time, the ``seq``
    values must never decrease (each key ran in the order it was sent; a retry runs its
    ``seq`` again, right after the failed run), and each run must start
    no earlier than the previous run of its key finished (never two at once). A key of
    ``None`` (unkeyed messages) is not checked: unkeyed messages run in parallel.

    Raises:
      KeyOrderError: naming the key and the two runs at fault.
      TypeError: a record that is neither a Run nor a 4-tuple.
    """
    by_key: dict[Hashable, list[Run]] = {}
    for record in records:
        run = _as_run(record)
        by_key.setdefault(run.key, []).append(run)
    order: dict[Hashable, list[Any]] = {}
    for key, runs in by_key.items():
        runs.sort(key=lambda run: (run.started, run.finished))
        order[key] = [run.seq for run in runs]
        if key is None:
            continue
        for previous, run in zip(runs, runs[1:]):
            if run.started < previous.finished:
                raise KeyOrderError(
                    f"key {key!r}: seq {run.seq!r} started {previous.finished - run.started:.3f}s "
                    f"before seq {previous.seq!r} finished (two runs of one key at once)"
                )
            if run.seq < previous.seq:
                raise KeyOrderError(f"key {key!r} ran out of order: seq {previous.seq!r} before {run.seq!r}")
    return order


def _as_run(record: Any) -> Run:
    if isinstance(record, Run):
        return record
    if isinstance(record, tuple) and len(record) == 4:
        return Run(*record)
    raise TypeError(f"a key-order record must be a Run or a (key, seq, started, finished) tuple, not {record!r:.100}")


class KeyRecorder:
    """A thread-safe record of runs for :func:`assert_key_order`.

    In a task or actor::

        with recorder.run(key, seq):
            ...  # the work

    ``recorder.runs`` is what ran so far; ``recorder.order()`` checks it and answers the
    ``seq`` values per key.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[Run] = []

    @contextlib.contextmanager
    def run(self, key: Hashable, seq: Any) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            finished = time.monotonic()
            with self._lock:
                self._runs.append(Run(key, seq, started, finished))

    @property
    def runs(self) -> list[Run]:
        with self._lock:
            return list(self._runs)

    def clear(self) -> None:
        """Forget every run (between tests)."""
        with self._lock:
            self._runs.clear()

    def order(self) -> dict[Hashable, list[Any]]:
        """:func:`assert_key_order` over the runs so far."""
        return assert_key_order(self.runs)


class TestClock:
    """Real time plus an offset that only grows: a clock for ``memory://`` and
    ``sqlite://`` engines (``connect(url, clock=clock)``) that tests can move forward."""

    __test__ = False  # not a test class, whatever pytest's name rules say

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward (delays and intervals elapse at once)."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValueError(f"a clock moves forward by a number of seconds >= 0, not {seconds!r}")
        with self._lock:
            self._offset += float(seconds)


def drain_engine(
    engine: Broker, queue: str, *, clock: Optional[TestClock] = None, timeout: float = 30.0, poll: float = 0.01
) -> None:
    """Wait until ``queue`` has no ready, delayed or leased message while workers run it.

    With ``clock`` (the engine's :class:`TestClock`), time moves forward whenever nothing
    of the queue is running and messages wait only for time (a delay, a retry backoff, a
    rate interval), so they come due now. It moves a third of the queue's
    ``visibility_timeout`` at a time, checking in between, so a lease taken meanwhile is
    never expired by the jump (the plugin's fixtures use a long ``visibility_timeout``, so
    steps are long too). Without a clock (``redis://``) delays take their real time.

    Raises:
      TimeoutError: the queue was not empty after ``timeout`` seconds, with its counts.
    """
    step = engine.settings(queue).visibility_timeout / 3
    give_up_at = time.monotonic() + timeout
    stalled_polls = 0
    while True:
        stats = engine.stats(queue)
        if stats.ready + stats.delayed + stats.leased == 0:
            return
        if time.monotonic() >= give_up_at:
            raise TimeoutError(
                f"queue {queue!r} still had {stats.ready} ready, {stats.delayed} delayed and "
                f"{stats.leased} running messages after {timeout:g}s: is a worker running it "
                f"(or a key paused)?"
            )
        stalled_polls = stalled_polls + 1 if stats.leased == 0 else 0
        # Only delayed messages left: time is all they wait for. Ready ones that no worker
        # takes for a few polls wait for a rate interval (or a paused key: no harm).
        if clock is not None and (stats.ready == 0 and stats.leased == 0 or stalled_polls > 5):
            clock.advance(step)
        time.sleep(poll)
