"""Cancelling a Celery task that is still waiting in the broker, and looking it up.

A task's message carries its task id as its engine ref, so a revoke sent by any process
(``AsyncResult.revoke()``, ``app.control.revoke``, ``celery control revoke``) cancels the
task's message in the broker (the sending transport sees the revoke broadcast leave);
``cancel(app, task)`` and ``get(app, task)`` do it by hand, from any process. The last
tests run a real ``celery worker``, with the cancels and revokes sent by processes that
did not publish the tasks: the cancelled tasks never run and the key's others run in order.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery

import sharded_broker
from sharded_broker.integrations.celery import cancel, get
from support.celery_worker import APP_DIR, CELERY, CeleryWorker, app_env, publish


def queued_args(engine: sharded_broker.Broker, queue: str = "celery") -> list[tuple]:
    """The arguments of every task waiting in ``queue``, in delivery order (each acked)."""
    args = []
    while leases := engine.lease(queue, 10):
        args += [ast.literal_eval(json.loads(lease.payload)["headers"]["argsrepr"]) for lease in leases]
        engine.ack_many(leases)
    return args


@pytest.fixture
def record(make_app):
    app = make_app()

    @app.task(shard_key="key", name="test_cancel.record")  # a name no other test module uses
    def record(key, seq):
        return seq

    return record


def test_cancel_a_waiting_task_and_its_key_moves_on(record, engine: sharded_broker.Broker) -> None:
    results = [record.delay("k", seq) for seq in range(3)]
    info = get(record.app, results[0])
    assert (info.state, info.key, info.attempts) == ("waiting", "k", 0)
    cancelled = cancel(record.app, results[0].id)  # a task id works as well as its AsyncResult
    assert cancelled and (cancelled.state, cancelled.key) == ("waiting", "k")
    assert get(record.app, results[0]) is None
    assert not cancel(record.app, results[0])  # gone already: nothing to cancel
    assert queued_args(engine) == [("k", 1), ("k", 2)]


def test_revoke_in_the_publishing_process_cancels_in_the_broker(record, engine: sharded_broker.Broker) -> None:
    results = [record.delay("k", seq) for seq in range(3)]
    results[1].revoke()
    record.app.control.revoke([results[2].id])  # a list of ids, as Celery allows
    assert get(record.app, results[1]) is None and get(record.app, results[2]) is None
    assert engine.stats("celery").ready == 1
    assert queued_args(engine) == [("k", 0)]


def test_a_running_task_is_refused(record, engine: sharded_broker.Broker) -> None:
    result = record.delay("k", 0)
    [lease] = engine.lease("celery")
    refused = cancel(record.app, result)
    assert not refused and refused.state == "leased"
    assert get(record.app, result).state == "leased"
    result.revoke()  # left to the workers: the lease is intact
    assert engine.ack(lease)


def test_an_unknown_task_is_not_found_and_a_bad_one_refused(record) -> None:
    missing = cancel(record.app, "not-a-task-of-ours")
    assert (missing.cancelled, missing.state, missing.queue, missing.ref) == (False, None, "celery", "not-a-task-of-ours")
    assert get(record.app, "not-a-task-of-ours") is None
    with pytest.raises(sharded_broker.InvalidArgumentType, match="task id or AsyncResult"):
        cancel(record.app, 42)


def test_a_task_of_another_queue_is_found_by_searching_or_by_name(record, engine: sharded_broker.Broker) -> None:
    elsewhere = record.apply_async(("k", 0), queue="elsewhere")
    assert get(record.app, elsewhere).key == "k"  # the app's queues first, then every other
    assert get(record.app, elsewhere, queue="celery") is None
    result = cancel(record.app, elsewhere, queue="elsewhere")
    assert result.cancelled and result.queue == "elsewhere"


def test_the_search_skips_celerys_remote_control_and_event_queues(record, engine: sharded_broker.Broker) -> None:
    for queue in ("w1@host.celery.pidbox", "celeryev.3f2a"):
        engine.enqueue(queue, b"not a task", ref="looks-like-a-task")
    assert get(record.app, "looks-like-a-task") is None
    assert cancel(record.app, "looks-like-a-task").state is None
    assert engine.get("celeryev.3f2a", ref="looks-like-a-task") is not None  # left alone


def test_cancel_from_another_process_than_the_publisher(make_app, tmp_path: Path) -> None:
    """This process never saw the task ids: another one published the tasks."""
    url = f"sharded+sqlite:///{tmp_path}/q.db"
    script = (
        "from celery import Celery\n"
        f"app = Celery('producer', broker={url!r})\n"
        "for seq in range(3):\n"
        "    app.send_task('test_cancel.record', ('k', seq), task_id=f'elsewhere-{seq}')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    app = make_app(url)
    assert get(app, "elsewhere-1").state == "waiting"
    assert cancel(app, "elsewhere-1").cancelled
    app.control.revoke("elsewhere-2")
    assert get(app, "elsewhere-2") is None
    with sharded_broker.connect(url.removeprefix("sharded+")) as engine:
        assert queued_args(engine) == [("k", 0)]


def test_an_app_on_another_transport_is_refused(record) -> None:
    result = record.delay("k", 0)
    other = Celery("other", broker="memory://", set_as_current=False)
    with pytest.raises(sharded_broker.ConfigurationError, match="need a sharded\\+ broker URL"):
        cancel(other, result)
    other.close()


def test_a_worker_started_after_the_cancels_never_runs_them(tmp_path: Path, redis_url: str) -> None:
    log = tmp_path / "tasks.log"
    env = app_env(log, f"sharded+{redis_url}")
    publish(env, [
        "for seq in range(5): worker_app.record.apply_async(('acct', seq), task_id=f'acct-{seq}')",
        "worker_app.record.delay('acct', 5)",  # last of its key: once it ran, every other was served
    ])
    # Processes that published nothing: a revoke, celery control revoke, cancel.
    publish(env, ["worker_app.app.control.revoke('acct-1')"])
    subprocess.run(
        [CELERY, "-A", "worker_app", "control", "revoke", "acct-2", "--timeout", "0.5"],
        cwd=APP_DIR, env=env, capture_output=True, timeout=120,
    )
    publish(env, [
        "from sharded_broker.integrations.celery import cancel, get",
        "assert get(worker_app.app, 'acct-3').state == 'waiting'",
        "assert cancel(worker_app.app, 'acct-3').cancelled",
    ])
    worker = CeleryWorker(env, tmp_path / "worker.out", "-P", "solo", "-c", "1").wait_ready()

    def ran() -> list[str]:
        return [line.split()[2] for line in log.read_text().splitlines()] if log.exists() else []

    try:
        deadline = time.monotonic() + 60
        while "5" not in ran():
            assert worker.alive() and time.monotonic() < deadline, worker.text()
            time.sleep(0.05)
        assert ran() == ["0", "4", "5"], worker.text()
    finally:
        worker.stop()


def test_a_revoke_from_another_process_cancels_a_delayed_task_under_a_running_worker(
    tmp_path: Path, redis_url: str
) -> None:
    """The worker holds no copy of a task with a countdown: the revoke, sent by a process
    that did not publish it, removes it from the broker, and the worker never runs it."""
    log = tmp_path / "tasks.log"
    env = app_env(log, f"sharded+{redis_url}")
    worker = CeleryWorker(env, tmp_path / "worker.out", "-P", "solo", "-c", "1").wait_ready()
    try:
        publish(env, ["worker_app.record.apply_async(('acct', 0), task_id='later', countdown=3)"])
        with sharded_broker.connect(redis_url) as engine:
            assert engine.get("celery", ref="later").state == "delayed"
            publish(env, ["worker_app.app.control.revoke('later')"])
            assert engine.get("celery", ref="later") is None
            publish(env, ["worker_app.record.delay('acct', 1)"])
            deadline = time.monotonic() + 60
            while not (log.exists() and "acct 1" in log.read_text()):
                assert worker.alive() and time.monotonic() < deadline, worker.text()
                time.sleep(0.05)
            time.sleep(3.5)  # past the countdown: the revoked task would have run by now
            assert [line.split()[2] for line in log.read_text().splitlines()] == ["1"], worker.text()
    finally:
        worker.stop()
