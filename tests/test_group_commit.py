"""AckGroup: acks of many threads sent together, each with Broker.ack's meaning."""

from __future__ import annotations

import threading
import time

import pytest

import sharded_broker
from sharded_broker.errors import BackendUnavailable
from sharded_broker.group_commit import AckGroup

Q = "acks"


def _leased(broker: sharded_broker.Broker, count: int) -> list[sharded_broker.Lease]:
    broker.enqueue_many(Q, [sharded_broker.Message(b"x", key=f"k{i}") for i in range(count)])
    leases = broker.lease(Q, count)
    assert len(leases) == count
    return leases


def test_acks_arriving_during_a_call_go_together_in_the_next(broker_url: str) -> None:
    with sharded_broker.connect(broker_url) as broker:
        leases = _leased(broker, 64)
        calls: list[int] = []
        first_call_started, first_call_may_end = threading.Event(), threading.Event()
        ack_many = broker.ack_many

        def recording_ack_many(batch):
            calls.append(len(batch))
            if len(calls) == 1:
                first_call_started.set()
                first_call_may_end.wait(10)
            return ack_many(batch)

        broker.ack_many = recording_ack_many  # type: ignore[method-assign]
        group = AckGroup(broker)
        answers: dict[str, bool] = {}

        def ack(lease: sharded_broker.Lease) -> None:
            answers[lease.id] = group.ack(lease)

        threads = [threading.Thread(target=ack, args=(lease,)) for lease in leases]
        threads[0].start()
        assert first_call_started.wait(10)
        for thread in threads[1:]:
            thread.start()
        deadline = time.monotonic() + 10
        while len(group._waiting) < len(leases) - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        first_call_may_end.set()
        for thread in threads:
            thread.join(10)
        assert calls == [1, len(leases) - 1]  # the lone first ack at once, then all the others together
        assert answers == {lease.id: True for lease in leases}
        stats = broker.stats(Q)
        assert (stats.ready, stats.leased) == (0, 0)


def test_a_lone_ack_is_sent_at_once_and_a_stale_one_is_refused(broker_url: str) -> None:
    with sharded_broker.connect(broker_url) as broker:
        group = AckGroup(broker)
        [lease] = _leased(broker, 1)
        assert group.ack(lease) is True
        assert broker.stats(Q).leased == 0
        assert group.ack(lease) is False  # already settled: its token is stale


def test_a_failed_call_raises_in_every_thread_it_carried(memory_url: str) -> None:
    with sharded_broker.connect(memory_url) as broker:
        leases = _leased(broker, 8)
        in_call = threading.Event()
        release = threading.Event()

        def failing_ack_many(batch):
            in_call.set()
            release.wait(5)
            raise BackendUnavailable("backend down")

        broker.ack_many = failing_ack_many  # type: ignore[method-assign]
        group = AckGroup(broker)
        errors: list[BaseException] = []

        def ack(lease: sharded_broker.Lease) -> None:
            try:
                group.ack(lease)
            except BackendUnavailable as exc:
                errors.append(exc)

        first = threading.Thread(target=ack, args=(leases[0],))
        first.start()
        assert in_call.wait(5)
        rest = [threading.Thread(target=ack, args=(lease,)) for lease in leases[1:]]
        for thread in rest:
            thread.start()
        release.set()
        for thread in [first, *rest]:
            thread.join(10)
        assert len(errors) == len(leases)
        assert broker.stats(Q).leased == len(leases)  # nothing was acked


def test_ack_of_a_non_lease_is_refused_by_name(memory_url: str) -> None:
    with sharded_broker.connect(memory_url) as broker:
        with pytest.raises(sharded_broker.InvalidArgumentType, match="expected a Lease, not str"):
            AckGroup(broker).ack("not a lease")  # type: ignore[arg-type]
