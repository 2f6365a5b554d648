"""Cancelling a Celery task that is still waiting in the broker, and looking it up.

``AsyncResult.revoke()`` in the publishing process cancels the task's message in the broker
(the transport sees the revoke broadcast leave); ``cancel(app, task)`` and ``get(app, task)``
do it by hand. The last test runs a real ``celery worker``, started only after the cancels:
the cancelled tasks never run and the key's others run in order.
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import pytest
from celery import Celery

import sharded_broker
from sharded_broker.integrations.celery import cancel, get
from support.celery_worker import CeleryWorker, app_env, publish


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


def test_a_task_this_process_did_not_publish_is_a_lookup_error(record) -> None:
    with pytest.raises(LookupError, match="was not published by this process"):
        cancel(record.app, "not-a-task-of-ours")
    with pytest.raises(LookupError, match="cancel QUEUE ID"):
        get(record.app, "not-a-task-of-ours")
    with pytest.raises(sharded_broker.InvalidArgumentType, match="task id or AsyncResult"):
        cancel(record.app, 42)


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
        "from sharded_broker.integrations.celery import cancel",
        "results = [worker_app.record.delay('acct', seq) for seq in range(5)]",
        "results[1].revoke()",
        "assert cancel(worker_app.app, results[3]).cancelled",
        "worker_app.record.delay('acct', 5)",  # last of its key: once it ran, every other was served
    ])
    worker = CeleryWorker(env, tmp_path / "worker.out", "-P", "solo", "-c", "1").wait_ready()

    def ran() -> list[str]:
        return [line.split()[2] for line in log.read_text().splitlines()] if log.exists() else []

    try:
        deadline = time.monotonic() + 60
        while "5" not in ran():
            assert worker.alive() and time.monotonic() < deadline, worker.text()
            time.sleep(0.05)
        assert ran() == ["0", "2", "4", "5"], worker.text()
    finally:
        worker.stop()
