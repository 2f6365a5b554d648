"""Acks from many threads, sent together: group commit over ``Broker.ack_many``.

A task-queue worker acks from each of its worker threads, one message at a time. Sent
one by one, N acks cost N round trips and N script calls on the backend. With
:class:`AckGroup`, a thread that acks while another thread's ``ack_many`` is in flight
waits for it to end, and then the acks that piled up meanwhile go in one ``ack_many``,
sent by the first of the waiting threads. Nothing waits for a timer: a lone ack is sent
at once, exactly as ``Broker.ack`` would, and under load an ack waits at most for the one
call in flight before its own.

Every ack keeps the meaning of ``Broker.ack``: it returns only once the backend settled
it, with ``False`` for a stale token, and a failed call raises its error in every thread
whose ack it carried (none of those acks took effect unless the backend says otherwise,
as with ``ack_many``).

Each waiting thread parks on a lock of its own and is woken exactly once: when its ack
is settled, or when it is handed the next call to send. (One shared condition woken with
``notify_all`` after every call woke every waiter, most of them only to wait again: in a
Dramatiq worker's profile that was a fifth of the drain's Python time.)
"""

from __future__ import annotations

import threading
from typing import Optional

from .broker import Broker
from .models import Lease


class _Pending:
    """One thread's ack. ``wake`` is held while its thread waits (the thread that sends
    the call carrying it never waits); ``batch`` is set when the thread is to send the
    next call."""

    __slots__ = ("lease", "wake", "batch", "accepted", "error")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.wake = threading.Lock()
        self.batch: Optional[list[_Pending]] = None
        self.accepted = False
        self.error: Optional[BaseException] = None


class AckGroup:
    """Group commit of acks over one broker; thread-safe, one per broker is enough."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._lock = threading.Lock()
        self._waiting: list[_Pending] = []  # acks that came while a call was in flight
        self._in_flight = False

    def ack(self, lease: Lease) -> bool:
        """Ack ``lease``, together with the acks of other threads waiting meanwhile.
        False when its token was stale (nothing changed), like ``Broker.ack``."""
        mine = _Pending(lease)
        with self._lock:
            waits = self._in_flight
            if waits:
                mine.wake.acquire()
                self._waiting.append(mine)
            else:
                self._in_flight = True
                mine.batch = [mine]
        if waits:
            mine.wake.acquire()  # released once settled, or once handed the next call
        if mine.batch is not None:
            self._send(mine.batch)
        if mine.error is not None:
            raise mine.error
        return mine.accepted

    def _send(self, batch: list[_Pending]) -> None:
        """Send ``batch`` (its first ack is the calling thread's), hand the acks that
        came meanwhile to the first of their threads, and wake the others of ``batch``."""
        try:
            answers = self.broker.ack_many([pending.lease for pending in batch])
        except BaseException as exc:  # handed to every thread whose ack this call carried
            for pending in batch:
                pending.error = exc
        else:
            for pending, accepted in zip(batch, answers):
                pending.accepted = accepted
        with self._lock:
            following, self._waiting = self._waiting, []
            if following:
                following[0].batch = following  # still in flight: that thread sends it
            else:
                self._in_flight = False
        if following:
            following[0].wake.release()
        for pending in batch[1:]:
            pending.wake.release()
