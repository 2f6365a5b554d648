"""Backend.wait_any, and Broker.wait_for_work over it: one blocking wait over several
queues, woken by work in any of them."""

from __future__ import annotations

import threading
import time

import pytest

from sharded_broker import Broker, InvalidArgument, InvalidArgumentType


def test_wait_any_returns_when_any_of_its_queues_gets_work(broker: Broker) -> None:
    returned = threading.Event()

    def wait() -> None:
        broker.backend.wait_any(["tasks", "control"], 30.0)
        returned.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)  # blocked by now
    broker.enqueue("control", b"ping")  # the second queue of the two
    assert returned.wait(10.0), "wait_any slept through work in one of its queues"
    waiter.join()


def test_wait_any_on_no_queue_or_no_time_returns_at_once(broker: Broker) -> None:
    started = time.monotonic()
    broker.backend.wait_any([], 30.0)
    broker.backend.wait_any(["tasks"], 0.0)
    assert time.monotonic() - started < 10.0


def test_wait_for_work_returns_when_any_of_its_queues_gets_work_and_leases_nothing(broker: Broker) -> None:
    returned = threading.Event()

    def wait() -> None:
        broker.wait_for_work(["tasks", "control"], 30.0)
        returned.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)  # blocked by now
    broker.enqueue("control", b"ping")
    assert returned.wait(10.0), "wait_for_work slept through work in one of its queues"
    waiter.join()
    assert broker.stats("control").ready == 1  # still there for the consumer's lease


def test_wait_for_work_refuses_bad_queue_names_and_timeouts(broker: Broker) -> None:
    with pytest.raises(InvalidArgument, match="queue name"):
        broker.wait_for_work(["tasks", "no spaces"], 1.0)
    with pytest.raises(InvalidArgumentType, match="not one str"):
        broker.wait_for_work("tasks", 1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="timeout must be >= 0"):
        broker.wait_for_work(["tasks"], -1.0)
