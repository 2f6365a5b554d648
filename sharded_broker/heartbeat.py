"""Lease heartbeats that ride out short broker outages (both adapters beat through
:class:`sharded_broker.integrations.support.LeaseHeartbeat`, which calls this).

A worker extends the leases it holds every ``heartbeat_interval`` seconds. When one
extension fails because the backend is unreachable, waiting for the next regular beat
would let the leases expire during an outage shorter than the visibility timeout, and
another worker would run the same messages meanwhile. :func:`extend_before_deadline`
retries the failed extension at once, with a short exponential backoff, until it goes
through or until the leases' deadline has passed.

The outage a lease survives: the last successful extension happened at most one
``heartbeat_interval`` before the outage began, so the leases still have
``visibility_timeout - heartbeat_interval`` seconds to live when it starts; retries come
at most :data:`RETRY_PAUSE_MAX` apart. A lease therefore survives an outage shorter than
``visibility_timeout - heartbeat_interval - RETRY_PAUSE_MAX`` (with the default interval
of a third of the timeout: ``2/3 * visibility_timeout - 0.5 s``), less the time one
extension call may block when the network stalls rather than refuses (the backend's
``socket_timeout``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Sequence

from .broker import Broker
from .errors import BackendUnavailable
from .models import Lease

__all__ = ["RETRY_PAUSE_FIRST", "RETRY_PAUSE_MAX", "extend_before_deadline", "survivable_outage"]

#: First pause after a failed extension, doubled after each further failure.
RETRY_PAUSE_FIRST = 0.05
#: Longest pause between two tries of a failed extension.
RETRY_PAUSE_MAX = 0.5


def survivable_outage(visibility_timeout: float, heartbeat_interval: float) -> float:
    """Seconds of backend outage a held lease is guaranteed to survive (see the module
    docstring); 0 when the heartbeat is too slow for any."""
    return max(0.0, visibility_timeout - heartbeat_interval - RETRY_PAUSE_MAX)


def extend_before_deadline(
    broker: Broker,
    leases: Sequence[Lease],
    deadline: float,
    stopped: threading.Event,
    on_unavailable: Callable[[BackendUnavailable, int], None],
) -> tuple[Optional[list[bool]], float]:
    """``broker.extend_many(leases)``, retried while the backend is unavailable.

    ``deadline`` is a ``time.monotonic()`` time by which the earliest of ``leases``
    expires. Tries again after each :class:`BackendUnavailable` (calling
    ``on_unavailable(error, failures_so_far)``), pausing :data:`RETRY_PAUSE_FIRST`
    doubling up to :data:`RETRY_PAUSE_MAX`, until one try goes through, the deadline has
    passed, or ``stopped`` is set.

    Returns ``(answers, started)``: ``extend_many``'s answers (``None`` if no try went
    through) and the monotonic time the successful try began (the leases now last at
    least their visibility timeout from then).
    """
    pause = RETRY_PAUSE_FIRST
    failures = 0
    while True:
        started = time.monotonic()
        try:
            return broker.extend_many(leases), started
        except BackendUnavailable as exc:
            failures += 1
            on_unavailable(exc, failures)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stopped.wait(min(pause, remaining)):
            return None, started
        pause = min(pause * 2, RETRY_PAUSE_MAX)
