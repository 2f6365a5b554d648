"""Real prefork `celery worker` processes under the faults of issue 12: the URL reaching
Celery by other ways than app.conf, a consumer restart after a lost connection (CLIENT
KILL, a Redis restart), and SIGKILL of one pool process. Tasks log start and end lines;
tests/support/runs.py checks them for overlaps, order violations, lost and duplicate runs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

import sharded_broker
from support.celery_worker import CeleryWorker, app_env, publish
from support.redis_server import RedisServer
from support.runs import check, read_runs
from support.workload import wait_until


@pytest.fixture
def workers() -> Iterator[list[CeleryWorker]]:
    started: list[CeleryWorker] = []
    yield started
    for worker in started:
        worker.kill()


def spans(keys: list[str], per_key: int, seconds: float, action: str = "ok") -> list[str]:
    return [f"worker_app.span.delay({key!r}, {seq}, {seconds}, {action!r})" for seq in range(per_key) for key in keys]


def ended(log: Path) -> int:
    return sum(run.end is not None for run in read_runs(log))


@pytest.mark.parametrize("form", ["-b", "CELERY_BROKER_URL", "list"])
def test_keys_are_held_whatever_way_the_url_reaches_celery(form, redis_url, tmp_path, workers) -> None:
    """Late acks are decided from the transport the worker's connection uses: with the URL
    given by `celery -b`, only by CELERY_BROKER_URL, or as a failover list, a prefork
    worker with more processes than keys never runs two tasks of a key at once."""
    log = tmp_path / "tasks.log"
    url = f"sharded+{redis_url}"
    env = app_env(log, url, vt="10", broker_form={"-b": "none", "CELERY_BROKER_URL": "none", "list": "list"}[form])
    if form == "CELERY_BROKER_URL":
        env["CELERY_BROKER_URL"] = url
    producer_env = dict(env, SB_BROKER_FORM="conf")
    keys, per_key = ["a", "b", "c"], 4
    publish(producer_env, spans(keys, per_key, 0.6))
    cli = ("-b", url) if form == "-b" else ()
    workers.append(CeleryWorker(env, tmp_path / "worker.out", "-P", "prefork", "-c", "4", cli=cli).wait_ready())
    wait_until(lambda: ended(log) >= len(keys) * per_key, 90, "every task")
    report = check(read_runs(log), {key: per_key for key in keys})
    assert report.clean and not report.duplicates, report.summary()
    assert report.completed == len(keys) * per_key


def _run_through_a_connection_loss(
    tmp_path: Path, server_url: str, workers: list[CeleryWorker], cut, repeat_cut: bool = False
) -> None:
    log = tmp_path / "tasks.log"
    env = app_env(log, f"sharded+{server_url}", vt="3")
    keys, per_key = ["a", "b", "c", "d"], 3
    publish(env, spans(keys, per_key, 2.5))
    worker = CeleryWorker(env, tmp_path / "worker.out", "-P", "prefork", "-c", "4").wait_ready()
    workers.append(worker)
    wait_until(lambda: len(read_runs(log)) >= 4, 60, "four tasks to start")
    time.sleep(0.5)
    # A killed connection can be replaced by redis-py's own retry without the consumer
    # noticing (a kill between two commands): cut again, while tasks run, until it restarts.
    deadline = time.monotonic() + 6
    cut()
    while repeat_cut and "Connection to broker lost" not in worker.text() and time.monotonic() < deadline:
        time.sleep(0.3)
        cut()
    wait_until(lambda: ended(log) >= len(keys) * per_key, 120, "every task")
    time.sleep(4)  # more than a visibility timeout: a lease lost in the restart would run again
    with sharded_broker.connect(server_url) as engine:
        stats = engine.stats("celery")
        assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0), stats
    report = check(read_runs(log), {key: per_key for key in keys})
    # Every task ran to its end exactly once, none of a key at the same time, in order.
    assert report.clean and not report.duplicates and report.runs == len(keys) * per_key, (
        report.summary() + "\n" + worker.text()[-3000:]
    )
    assert "their leases are kept" in worker.text(), worker.text()[-3000:]


def test_a_client_kill_mid_run_keeps_running_tasks_leased_and_runs_each_once(redis_url, tmp_path, workers) -> None:
    """CLIENT KILL TYPE normal while four 2.5 s tasks run (and eight wait, prefetched):
    the consumer restarts; the running tasks keep their leases and heartbeat and are
    acked when they end; nothing runs twice or out of order."""
    admin = redis.Redis.from_url(redis_url)
    _run_through_a_connection_loss(
        tmp_path, redis_url, workers, lambda: admin.client_kill_filter(_type="normal"), repeat_cut=True
    )
    admin.close()


def test_a_short_redis_restart_mid_run_keeps_running_tasks_leased_and_runs_each_once(tmp_path, workers) -> None:
    """redis-server (AOF) SIGKILLed and started again 1.5 s later while tasks run: the
    leases of the running tasks survive (kept and extended by the heartbeat, which
    retries until their deadline) and nothing runs twice."""
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        def restart() -> None:
            server.kill()
            time.sleep(1.5)
            server.start()

        _run_through_a_connection_loss(tmp_path, server.url, workers, restart)


def test_sigkill_of_one_pool_process_redelivers_its_task_and_a_task_that_always_kills_it_dead_letters(
    redis_url, tmp_path, workers
) -> None:
    """The OOM killer's SIGKILL of a single prefork pool process: its task is delivered
    again (whatever task_reject_on_worker_lost says), counted toward max_deliveries, so
    a task that kills its process every time is dead-lettered and its key moves on."""
    log = tmp_path / "tasks.log"
    marks = tmp_path / "marks"
    marks.mkdir()
    env = app_env(log, f"sharded+{redis_url}", vt="5", max_deliveries="3", marks=str(marks), worker_lost_wait="1")
    publish(env, [
        "worker_app.span.delay('once', 0, 0.1, 'crash_once')",
        "worker_app.span.delay('always', 0, 0.1, 'crash')",
        "worker_app.span.delay('once', 1, 0.1)",
        "worker_app.span.delay('always', 1, 0.1)",
    ])
    worker = CeleryWorker(env, tmp_path / "worker.out", "-P", "prefork", "-c", "2").wait_ready()
    workers.append(worker)
    wait_until(lambda: ended(log) >= 3, 90, "the three tasks that can end")
    with sharded_broker.connect(redis_url) as engine:
        wait_until(lambda: engine.stats("celery").dead == 1, 30, "the always-crashing task to be dead-lettered")
        (dead,) = engine.dead_letters("celery")
        assert dead.key == "always" and dead.attempts == 3, dead
        stats = engine.stats("celery")
        assert (stats.ready, stats.leased) == (0, 0)
    runs = read_runs(log)
    report = check(runs, {"once": 2, "always": 2}, dead=[("always", 0)])
    assert report.clean and not report.duplicates, report.summary()
    assert [(r.seq, r.end is not None) for r in runs if r.key == "once"] == [(0, False), (0, True), (1, True)]
    assert [(r.seq, r.end is not None) for r in runs if r.key == "always"] == [(0, False)] * 3 + [(1, True)]
    assert "WorkerLostError" in worker.text()


def test_a_pool_process_killed_by_signal_is_not_acked_as_failed(redis_url, tmp_path, workers) -> None:
    """The same with the pool process killed from outside (SIGKILL by pid, mid-task)."""
    log = tmp_path / "tasks.log"
    env = app_env(log, f"sharded+{redis_url}", vt="5", worker_lost_wait="1")
    publish(env, spans(["k"], 3, 1.5))
    worker = CeleryWorker(env, tmp_path / "worker.out", "-P", "prefork", "-c", "2").wait_ready()
    workers.append(worker)
    wait_until(lambda: len(read_runs(log)) >= 1, 60, "the first task to start")
    victim = read_runs(log)[0].pid
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: ended(log) >= 3, 90, "every task")
    runs = read_runs(log)
    report = check(runs, {"k": 3})
    assert report.clean and not report.duplicates, report.summary()
    assert [(r.seq, r.end is not None) for r in runs] == [(0, False), (0, True), (1, True), (2, True)]


def test_a_consumer_restart_gives_back_only_what_celery_will_not_run(redis_url) -> None:
    """A message Celery holds back without handing it to its pool (a rate-limit bucket)
    is given back at the restart and runs once after it; the running task's lease is
    kept; nothing runs twice."""
    import logging
    import threading

    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    app = Celery("restart", broker=f"sharded+{redis_url}", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 3}
    app.conf.worker_hijack_root_logger = False
    runs: list[tuple[str, int]] = []
    lock = threading.Lock()

    @app.task(shared=False, name="restart.long", shard_key="key")
    def long_task(key: str, seq: int) -> None:
        with lock:
            runs.append((key, seq))
        time.sleep(3)

    @app.task(shared=False, name="restart.limited", shard_key="key", rate_limit="6/m")
    def limited(key: str, seq: int) -> None:
        with lock:
            runs.append((key, seq))

    long_task.delay("a", 0)
    limited.delay("b", 0)
    limited.delay("c", 0)  # waits in Celery's rate-limit bucket for 10 s
    admin = redis.Redis.from_url(redis_url)
    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=30):
        transport_log = logging.getLogger("sharded_broker.integrations.celery")
        transport_log.disabled = False  # the worker's logging set-up disables loggers made before it
        # Records are caught on the transport's logger itself: the worker's logging set-up
        # may replace the root logger's handlers, pytest's capture among them.
        records: list[logging.LogRecord] = []
        catcher = logging.Handler(logging.INFO)
        catcher.emit = records.append  # type: ignore[method-assign]
        transport_log.addHandler(catcher)
        transport_log.setLevel(logging.INFO)
        wait_until(lambda: len(runs) >= 2, 30, "the long task and the first limited one")
        admin.client_kill_filter(_type="normal")
        wait_until(lambda: len(runs) >= 3, 60, "the bucketed task, after the restart")
        with sharded_broker.connect(redis_url) as engine:
            wait_until(lambda: engine.stats("celery").leased == 0, 30, "every ack")
        time.sleep(4)  # more than a visibility timeout: nothing more may run
    app.close()
    admin.close()
    assert sorted(runs) == [("a", 0), ("b", 0), ("c", 0)], runs
    transport_log.removeHandler(catcher)
    text = "\n".join(r.getMessage() for r in records)
    assert "their leases are kept" in text and "1 prefetched message(s) given back" in text, text
