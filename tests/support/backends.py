"""Backend parametrisation for the conformance, model and bad-input suites.

Every backend is opened by URL through ``sharded_broker.connect(url, clock=...)`` with a
:class:`FakeClock`, so tests move time forward explicitly and never sleep for semantics.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

BACKENDS = ("memory", "sqlite", "redis", "redis-cluster")

# The clock starts at a realistic epoch time so backends that store seconds or
# milliseconds since the epoch see ordinary values.
CLOCK_START = 1_700_000_000.0


class FakeClock:
    """A thread-safe clock that moves only when told to (seconds since the epoch)."""

    def __init__(self, start: float = CLOCK_START) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds``; the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += seconds
            return self._now


def partition_options(broker_url: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """``partitions=1`` for a test marked ``one_partition`` on a Redis Cluster (whose queues
    default to 16 partitions): its expectations order messages of different keys (or the
    unkeyed lane) against each other, an order that holds within one partition."""
    if request.node.get_closest_marker("one_partition") and "+cluster://" in broker_url:
        return {"partitions": 1}
    return {}
