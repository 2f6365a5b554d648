"""Worker death: engine consumer processes SIGKILLed mid-task, again and again."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import sharded_broker
from support.workload import Workers, assert_in_order_and_complete, drained, numbered, wait_for_events, wait_until

pytestmark = pytest.mark.reliability

Q = "jobs"


def test_repeated_sigkill_of_consumers_loses_nothing_and_keeps_each_keys_order(shared_url: str, tmp_path: Path) -> None:
    """Consumers are killed with SIGKILL mid-run, six times, and replaced. Every message
    is acked, each key runs 0..n-1 in order, and only a message that was running when its
    worker died runs again (at most once per kill)."""
    keys = [f"user-{i}" for i in range(20)]
    per_key = 12
    with sharded_broker.connect(shared_url) as broker:
        ids = broker.enqueue_many(Q, numbered(keys, per_key))
        with Workers(tmp_path / "events.jsonl", url=shared_url, queue=Q, vt=2.0, work=0.01) as workers:
            workers.start(3)
            rng = random.Random(7)
            kills = 0
            for _ in range(6):
                starts = sum(e["e"] == "start" for e in workers.read())
                wait_for_events(workers, "start", starts + 5, timeout=30)
                victim = rng.choice(workers.alive())
                victim.kill()
                victim.wait(10)
                kills += 1
                workers.start(1)
            wait_until(lambda: drained(broker, Q), timeout=60, what="the queue to drain")
            events = workers.read()
        stats = broker.stats(Q)
        assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)
    # Drained with no dead letter: every message was acked (a worker may die between its
    # ack and logging it, so the log alone cannot tell), and each one ran.
    started = {e["id"] for e in events if e["e"] == "start"}
    assert started == set(ids), f"{len(set(ids) - started)} messages never ran"
    repeats = assert_in_order_and_complete(events, {key: per_key for key in keys})
    assert sum(repeats.values()) <= kills, repeats


def test_a_killed_consumers_message_comes_back_first_in_its_key(shared_url: str, tmp_path: Path) -> None:
    """The message a worker held when it died is the next one its key delivers, to the
    next worker, after the visibility timeout; no later message of that key overtakes it."""
    with sharded_broker.connect(shared_url) as broker:
        broker.enqueue_many(Q, numbered(["a"], 3))
        with Workers(tmp_path / "events.jsonl", url=shared_url, queue=Q, vt=1.0, work=30.0) as workers:
            [first] = workers.start(1)
            wait_for_events(workers, "start", 1, timeout=30)
            first.kill()
            first.wait(10)
            workers.start(1, work=0.0, idle_exit=2.0)
            wait_until(lambda: drained(broker, Q), timeout=30, what="the queue to drain")
            events = workers.read()
    starts = [(e["n"], e["a"]) for e in events if e["e"] == "start"]
    assert starts == [(0, 1), (0, 2), (1, 1), (2, 1)]
