"""Backpressure through the Celery transport with a real in-process worker: QueueFull
surfaces at ``apply_async`` in the producer, and ``on_full="replace"`` is latest wins."""

from __future__ import annotations

import threading

import pytest
from celery.contrib.testing.worker import start_worker

from sharded_broker import QueueFull


def run_worker(app):
    return start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=20)


def test_apply_async_beyond_the_limit_raises_queue_full(make_app, engine, wait_until):
    app = make_app(queues={"celery": {"max_pending_per_key": 2}})
    done: list[tuple[str, int]] = []

    @app.task(shared=False, shard_key="user")
    def notify(user, n):
        done.append((user, n))

    notify.delay("u1", 0)
    notify.apply_async(args=("u1", 1))
    with pytest.raises(QueueFull) as refused:
        notify.apply_async(args=("u1", 2))
    assert (refused.value.queue, refused.value.key, refused.value.limit) == ("celery", "u1", 2)
    notify.delay("u2", 0)
    assert engine.stats("celery").ready == 3  # the refused task was not stored
    with run_worker(app):
        wait_until(lambda: len(done) == 3, 10, "three tasks")
    assert sorted(done) == [("u1", 0), ("u1", 1), ("u2", 0)]


def test_replace_runs_the_latest_behind_the_running_one(make_app, engine, wait_until):
    app = make_app(queues={"celery": {"max_pending_per_key": 1, "on_full": "replace"}})
    started, go_on = threading.Event(), threading.Event()
    done: list[int] = []

    @app.task(shared=False, shard_key="doc")
    def render(doc, version):
        if version == 0:
            started.set()
            assert go_on.wait(10)
        done.append(version)

    render.delay("d1", 0)
    with run_worker(app):
        assert started.wait(10)
        for version in range(1, 6):
            render.delay("d1", version)  # each replaces the one waiting before it
        go_on.set()
        wait_until(lambda: len(done) == 2 and engine.stats("celery").leased == 0, 10, "the latest version")
    assert done == [0, 5]
    dropped = engine.dead_letters("celery")
    assert len(dropped) == 4 and {d.reason for d in dropped} == {"dropped: max_pending_per_key"}
