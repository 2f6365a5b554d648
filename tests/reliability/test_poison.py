"""Poison messages: a task that always fails, or always kills its worker, ends in the
dead-letter list after max_deliveries with its reason and stops blocking its key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import sharded_broker
from sharded_broker import Message
from support.workload import Workers, body, drained, wait_until

pytestmark = pytest.mark.reliability

Q = "jobs"
MAX_DELIVERIES = 3


def test_an_always_failing_task_is_dead_lettered_and_its_key_moves_on(shared_url: str, tmp_path: Path) -> None:
    with sharded_broker.connect(shared_url, max_deliveries=MAX_DELIVERIES) as broker:
        [poison, *_] = broker.enqueue_many(Q, [
            Message(body("a", 0, "fail"), key="a"), Message(body("a", 1), key="a"), Message(body("b", 0), key="b"),
        ])
        config = dict(url=shared_url, queue=Q, vt=5.0, idle_exit=1.0, options={"max_deliveries": MAX_DELIVERIES})
        with Workers(tmp_path / "events.jsonl", **config) as workers:
            workers.start(2)
            wait_until(lambda: drained(broker, Q), timeout=30, what="the queue to drain")
            events = workers.read()
        [dead] = broker.dead_letters(Q)
        assert (dead.id, dead.key, dead.attempts) == (poison, "a", MAX_DELIVERIES)
        assert f"{MAX_DELIVERIES} deliveries" in dead.reason and "max_deliveries" in dead.reason
        assert broker.stats(Q).dead == 1
    runs_of_a = [(e["n"], e["a"]) for e in events if e["e"] == "start" and e["k"] == "a"]
    assert runs_of_a == [(0, 1), (0, 2), (0, 3), (1, 1)]  # retried at the head, then the key moved on


def test_a_task_that_always_kills_its_worker_is_dead_lettered_and_its_key_moves_on(
    shared_url: str, tmp_path: Path
) -> None:
    """Every delivery of the poison message SIGKILLs the worker running it; workers are
    restarted as they die. After max_deliveries the expired lease is dead-lettered with
    the reason, and the rest of the key (and every other key) runs."""
    with sharded_broker.connect(shared_url, max_deliveries=MAX_DELIVERIES) as broker:
        [poison, *_] = broker.enqueue_many(Q, [
            Message(body("a", 0, "kill"), key="a"), Message(body("a", 1), key="a"), Message(body("b", 0), key="b"),
        ])
        config = dict(url=shared_url, queue=Q, vt=0.5, options={"max_deliveries": MAX_DELIVERIES})
        with Workers(tmp_path / "events.jsonl", **config) as workers:
            workers.start(1)
            deadline = time.monotonic() + 60
            while not drained(broker, Q):
                assert time.monotonic() < deadline, "the poison message kept its key blocked"
                if not workers.alive():
                    workers.start(1)
                time.sleep(0.05)
            events = workers.read()
            killed = sum(1 for p in workers.processes if p.poll() == -9)
        [dead] = broker.dead_letters(Q)
        assert (dead.id, dead.key, dead.attempts) == (poison, "a", MAX_DELIVERIES)
        assert "lease expired" in dead.reason and f"{MAX_DELIVERIES} deliveries" in dead.reason
    runs_of_a = [(e["n"], e["a"]) for e in events if e["e"] == "start" and e["k"] == "a"]
    assert runs_of_a == [(0, 1), (0, 2), (0, 3), (1, 1)]
    assert killed == MAX_DELIVERIES
