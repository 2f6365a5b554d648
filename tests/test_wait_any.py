"""Backend.wait_any: one blocking wait over several queues, woken by work in any of them."""

from __future__ import annotations

import threading
import time

from sharded_broker import Broker


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
