"""celery.contrib.pytest's fixtures (enabled by pytest-celery) on sharded+memory:// and
sharded+sqlite:///: canvas, retries, countdown, revoke, inspect and events, with real
in-process workers."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from celery import chain, chord, group
from celery.result import AsyncResult

import sharded_broker


@pytest.fixture(scope="module", params=["memory", "sqlite", "sqlite+redis-results"])
def celery_config(request, tmp_path_factory) -> dict:
    """What a user's conftest writes: only the broker URL changes (and, for chords in
    production, a real result backend: Redis here)."""
    if request.param == "memory":
        url = f"sharded+memory://fixtures-{uuid.uuid4().hex[:8]}"
    else:
        url = f"sharded+sqlite:///{tmp_path_factory.mktemp('celery')}/broker.db"
    results = request.getfixturevalue("redis_server").url if "redis" in request.param else "cache+memory://"
    return {
        "broker_url": url,
        "result_backend": results,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_transport_options": {"shard_keys": {"record": "account"}},
    }


@pytest.fixture(scope="module")
def celery_worker_pool() -> str:
    return "threads"


@pytest.fixture
def engine(celery_app):
    broker = sharded_broker.connect(celery_app.conf.broker_url.removeprefix("sharded+"))
    yield broker
    broker.close()


def test_canvas_chain_group_and_chord(celery_app, celery_worker) -> None:
    @celery_app.task
    def add(x, y):
        return x + y

    @celery_app.task
    def total(numbers):
        return sum(numbers)

    celery_worker.reload()
    assert add.delay(2, 3).get(timeout=10) == 5
    assert chain(add.s(1, 2), add.s(10), add.s(100)).apply_async().get(timeout=10) == 113
    assert group(add.s(i, i) for i in range(5)).apply_async().get(timeout=10) == [0, 2, 4, 6, 8]
    assert chord((add.s(i, 1) for i in range(4)), total.s()).apply_async().get(timeout=10) == 10


def test_keyed_tasks_keep_order_through_retries(celery_app, celery_worker) -> None:
    ran: list[tuple[str, int]] = []
    failed_once: set[int] = set()

    @celery_app.task(bind=True, name="record", max_retries=3)
    def record(self, account, seq):
        if seq == 1 and seq not in failed_once:
            failed_once.add(seq)
            raise self.retry(countdown=0.2)
        ran.append((account, seq))

    celery_worker.reload()
    results = [record.delay("acct", seq) for seq in range(4)]
    for result in results:
        result.get(timeout=15)
    assert ran == [("acct", 0), ("acct", 1), ("acct", 2), ("acct", 3)]  # the retry held the key


def test_countdown_waits_in_the_broker(celery_app, celery_worker, engine) -> None:
    @celery_app.task
    def stamp():
        return time.time()

    celery_worker.reload()
    sent = time.time()
    result = stamp.apply_async(countdown=0.5)
    stats = engine.stats("celery")
    assert stats.delayed == 1  # in the broker, where `inspect scheduled` cannot see it
    assert result.get(timeout=10) >= sent + 0.5


def test_a_revoke_sent_just_before_its_task_wins(celery_app, celery_worker) -> None:
    ran: list[str] = []

    @celery_app.task
    def work(n):
        ran.append(n)

    celery_worker.reload()
    for attempt in range(5):
        task_id = f"revoked-{attempt}-{uuid.uuid4().hex[:6]}"
        celery_app.control.revoke(task_id)
        work.apply_async((attempt,), task_id=task_id)
        with pytest.raises(Exception):  # TaskRevokedError, raised from the result
            AsyncResult(task_id, app=celery_app).get(timeout=10)
        assert AsyncResult(task_id, app=celery_app).state == "REVOKED"
    assert work.delay("after").get(timeout=10) is None
    assert ran == ["after"]


def test_inspect_ping_active_and_events(celery_app, celery_worker) -> None:
    started, finish = threading.Event(), threading.Event()

    @celery_app.task(name="record")
    def record(account, seq):
        started.set()
        assert finish.wait(10)

    celery_worker.reload()
    succeeded: list[str] = []
    receiver_ready = threading.Event()

    def receive() -> None:
        with celery_app.connection_for_read() as connection:
            def on_succeeded(event: dict) -> None:
                succeeded.append(event["uuid"])
                receiver.should_stop = True

            receiver = celery_app.events.Receiver(connection, handlers={"task-succeeded": on_succeeded})
            receiver_ready.set()
            receiver.capture(limit=None, timeout=15, wakeup=False)

    receiver_thread = threading.Thread(target=receive, daemon=True)
    receiver_thread.start()
    assert receiver_ready.wait(10)
    time.sleep(0.5)  # the receiver's queue is bound once it consumes

    # limit=1: each call is done at the one worker's reply instead of waiting out the timeout.
    inspect = celery_app.control.inspect(timeout=2, limit=1)
    assert list(inspect.ping().values()) == [{"ok": "pong"}]
    result = record.delay("acct", 0)
    assert started.wait(10)
    [active] = list(inspect.active().values())
    assert [task["id"] for task in active] == [result.id]
    # Late acks (the key is held until the task ends): docs/celery.md says so.
    assert active[0]["acknowledged"] is False
    finish.set()
    result.get(timeout=10)
    receiver_thread.join(15)
    assert succeeded == [result.id]


def test_a_busy_prefork_pool_never_blocks_the_consumer(celery_app) -> None:
    # The transport has no event loop; with putlocks the consumer's only thread would wait
    # for a free pool process before taking its next message, remote control included.
    from celery.contrib.testing.worker import start_worker

    with start_worker(celery_app, pool="prefork", concurrency=1, perform_ping_check=False) as worker:
        assert worker.pool_putlocks is False
        assert worker.pool.putlocks is False
