"""Acks from many threads, sent together: group commit over ``Broker.ack_many``.

A task-queue worker acks from each of its worker threads, one message at a time. Sent
one by one, N acks cost N round trips and N script calls on the backend. With
:class:`AckGroup`, a thread that acks while another thread's ``ack_many`` is in flight
waits for it to end, and then the acks that piled up meanwhile go in one ``ack_many``,
sent by one of the waiting threads. Nothing waits for a timer: a lone ack is sent at
once, exactly as ``Broker.ack`` would, and under load an ack waits at most for the one
call in flight before its own.

Every ack keeps the meaning of ``Broker.ack``: it returns only once the backend settled
it, with ``False`` for a stale token, and a failed call raises its error in every thread
whose ack it carried (none of those acks took effect unless the backend says otherwise,
as with ``ack_many``).
"""

from __future__ import annotations

import threading
from typing import Optional

from .broker import Broker
from .models import Lease


class _Pending:
    __slots__ = ("lease", "done", "accepted", "error")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.done = False
        self.accepted = False
        self.error: Optional[BaseException] = None


class AckGroup:
    """Group commit of acks over one broker; thread-safe, one per broker is enough."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._lock = threading.Lock()
        self._call_ended = threading.Condition(self._lock)
        self._waiting: list[_Pending] = []
        self._in_flight = False

    def ack(self, lease: Lease) -> bool:
        """Ack ``lease``, together with the acks of other threads waiting meanwhile.
        False when its token was stale (nothing changed), like ``Broker.ack``."""
        mine = _Pending(lease)
        with self._lock:
            self._waiting.append(mine)
            while self._in_flight and not mine.done:
                self._call_ended.wait()
            if not mine.done:
                # No call in flight and this ack not sent yet: this thread sends every
                # ack waiting now, its own included.
                self._in_flight = True
                batch, self._waiting = self._waiting, []
        if not mine.done:
            self._send(batch)
        if mine.error is not None:
            raise mine.error
        return mine.accepted

    def _send(self, batch: list[_Pending]) -> None:
        error: Optional[BaseException] = None
        answers: list[bool] = []
        try:
            answers = self.broker.ack_many([pending.lease for pending in batch])
        except BaseException as exc:  # handed to every thread whose ack this call carried
            error = exc
        with self._lock:
            for index, pending in enumerate(batch):
                if error is None:
                    pending.accepted = answers[index]
                else:
                    pending.error = error
                pending.done = True
            self._in_flight = False
            self._call_ended.notify_all()
