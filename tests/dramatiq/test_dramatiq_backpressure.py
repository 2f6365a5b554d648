"""Backpressure through the Dramatiq adapter with a real dramatiq.Worker, on every backend:
QueueFull surfaces at ``send`` in the producer, and ``on_full="replace"`` is latest wins."""

from __future__ import annotations

import threading

import dramatiq
import pytest

from sharded_broker import QueueFull


def test_send_beyond_the_limit_raises_queue_full(make_broker, run_worker, recorder) -> None:
    broker = make_broker(queues={"default": {"max_pending_per_key": 2}})

    @dramatiq.actor(broker=broker, shard_key="user")
    def notify(user: str, n: int) -> None:
        recorder.add(user, n)

    notify.send("u1", 0)
    notify.send("u1", 1)
    with pytest.raises(QueueFull) as refused:
        notify.send("u1", 2)
    assert (refused.value.queue, refused.value.key, refused.value.limit) == ("default", "u1", 2)
    notify.send("u2", 0)  # another key has room
    with run_worker(broker):
        broker.join("default", timeout=10_000)
    assert recorder.by_key() == {"u1": [0, 1], "u2": [0]}


def test_replace_delivers_the_latest_behind_the_running_one(make_broker, run_worker, recorder) -> None:
    broker = make_broker(queues={"default": {"max_pending_per_key": 1, "on_full": "replace"}})
    started, go_on = threading.Event(), threading.Event()

    @dramatiq.actor(broker=broker, shard_key="doc")
    def render(doc: str, version: int) -> None:
        if version == 0:
            started.set()
            assert go_on.wait(10)
        recorder.add(doc, version)

    render.send("d1", 0)
    with run_worker(broker):
        assert started.wait(10)
        for version in range(1, 6):
            render.send("d1", version)  # each replaces the one waiting before it
        go_on.set()
        # Dropped messages are dead letters: fail_fast would report the first of them.
        broker.join("default", timeout=10_000, fail_fast=False)
    assert recorder.by_key() == {"d1": [0, 5]}
    dropped = broker.engine.dead_letters("default")
    assert len(dropped) == 4 and {d.reason for d in dropped} == {"dropped: max_pending_per_key"}
