"""A broker outage shorter than the visibility timeout expires no running task's lease.

The worker talks to Redis through a TCP proxy that, for a while, cuts every connection
and refuses new ones. The outage begins just before the heartbeat's first beat and ends
well inside the survivable window (visibility_timeout - heartbeat_interval - 0.5 s, see
sharded_broker/heartbeat.py), but after the heartbeat's next regular beat would have
failed too: only a failed beat retried at once keeps the lease. Meanwhile the test polls
the queue directly (not through the proxy): taking the message would mean a second
worker could run it while the first run goes on.

Also: a frozen Celery worker (SIGSTOP longer than the timeout) whose late ack is fenced
says so in its log.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import dramatiq
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

import sharded_broker
from sharded_broker.heartbeat import RETRY_PAUSE_MAX, survivable_outage
from sharded_broker.integrations.dramatiq import ShardedBroker
from support.celery_worker import CeleryWorker, app_env, publish
from support.redis_server import RedisServer
from support.runs import read_runs
from support.tcp_proxy import TcpProxy
from support.workload import wait_until

pytestmark = pytest.mark.reliability

VT = 6.0  # heartbeat every 2 s: it survives 3.5 s of outage, at any moment
OUTAGE_STARTS = 1.7  # seconds after the task started: just before the first beat
OUTAGE = 3.0  # so the regular beat at 4 s fails too; the lease dies at 6 s unless retried
TASK_SECONDS = 8.0


@pytest.fixture
def proxy(redis_server: RedisServer, redis_url: str) -> Iterator[TcpProxy]:
    with TcpProxy(redis_server.port) as proxy:
        yield proxy


class Thief:
    """Polls a queue directly during the run: any message it gets was leasable while its
    first run was still going on. Started once the run has begun: before, the message is
    rightly leasable, and a thief could take it ahead of the worker."""

    def __init__(self, url: str, queue: str) -> None:
        self.engine = sharded_broker.connect(url)
        self.queue = queue
        self.stolen: list[sharded_broker.Lease] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            leases = self.engine.lease(self.queue, 10, visibility_timeout=60)
            self.stolen += leases
            self.engine.release_many(leases)  # the real run must still be able to finish
            time.sleep(0.02)

    def __enter__(self) -> "Thief":
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.engine.close()


def _outage(proxy: TcpProxy, started_at: float) -> None:
    time.sleep(max(0.0, started_at + OUTAGE_STARTS - time.monotonic()))
    proxy.refuse(True)
    proxy.drop_connections()
    time.sleep(OUTAGE)
    proxy.refuse(False)


def test_the_outage_window_formula() -> None:
    # The outage ends, and a retry comes, well before the lease's deadline...
    assert OUTAGE_STARTS + OUTAGE + RETRY_PAUSE_MAX < VT - 0.5
    # ...yet it covers the regular beat after the first one, which a heartbeat that only
    # beats on schedule would need.
    assert OUTAGE_STARTS + OUTAGE > 2 * VT / 3
    assert survivable_outage(30, 10) == pytest.approx(30 - 10 - RETRY_PAUSE_MAX)


def test_a_dramatiq_lease_survives_an_outage_shorter_than_the_timeout(proxy: TcpProxy, redis_url: str) -> None:
    broker = ShardedBroker(url=f"redis://127.0.0.1:{proxy.port}/0", visibility_timeout=VT)
    started: list[float] = []
    ended: list[float] = []

    @dramatiq.actor(broker=broker, shard_key="key", queue_name="outage", max_retries=0)
    def long_task(key: str) -> None:
        started.append(time.monotonic())
        time.sleep(TASK_SECONDS)
        ended.append(time.monotonic())

    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    try:
        long_task.send("k")
        worker.start()
        wait_until(lambda: started, 30, "the task to start")
        with Thief(redis_url, "outage") as thief:
            _outage(proxy, started[0])
            wait_until(lambda: ended, 30, "the task to end")
        with sharded_broker.connect(redis_url) as engine:
            wait_until(lambda: engine.stats("outage").leased == 0, 30, "the ack")
            stats = engine.stats("outage")
            assert (stats.ready, stats.dead) == (0, 0)
    finally:
        worker.stop(timeout=10_000)
        broker.close()
    assert thief.stolen == [], "the message was leasable while its first run went on"
    assert len(started) == 1


def test_a_celery_lease_survives_an_outage_shorter_than_the_timeout(proxy: TcpProxy, redis_url: str) -> None:
    app = Celery("outage", broker=f"sharded+redis://127.0.0.1:{proxy.port}/0", set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": VT}
    app.conf.worker_hijack_root_logger = False
    started: list[float] = []
    ended: list[float] = []

    @app.task(shared=False, shard_key="key", name="outage.long")
    def long_task(key: str) -> None:
        started.append(time.monotonic())
        time.sleep(TASK_SECONDS)
        ended.append(time.monotonic())

    long_task.delay("k")
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30):
        wait_until(lambda: started, 30, "the task to start")
        with Thief(redis_url, "celery") as thief:
            _outage(proxy, started[0])
            wait_until(lambda: ended, 30, "the task to end")
            with sharded_broker.connect(redis_url) as engine:
                wait_until(lambda: engine.stats("celery").leased == 0, 30, "the ack")
    app.close()
    assert thief.stolen == [], "the message was leasable while its first run went on"
    assert len(started) == 1


def test_a_frozen_celery_workers_fenced_late_ack_is_logged(redis_url: str, tmp_path: Path) -> None:
    """SIGSTOP of a whole prefork worker for longer than the timeout: the message is
    delivered again meanwhile; when the frozen task ends, its late ack is refused, and the
    worker's log says that this run's side effects may have come after the next run's."""
    log = tmp_path / "tasks.log"
    env = app_env(log, f"sharded+{redis_url}", vt="1.5")
    publish(env, ["worker_app.span.delay('k', 0, 2.0)"])
    worker = CeleryWorker(env, tmp_path / "worker.out", "-P", "prefork", "-c", "1").wait_ready()
    try:
        wait_until(lambda: read_runs(log), 60, "the task to start")
        worker.signal_group(signal.SIGSTOP)
        with sharded_broker.connect(redis_url) as engine:
            taken: list[sharded_broker.Lease] = []
            wait_until(lambda: taken.extend(engine.lease("celery", 1)) or taken, 20, "the lease to expire")
            assert engine.ack(taken[0])  # the next delivery ran and finished
            worker.signal_group(signal.SIGCONT)
            wait_until(lambda: any(run.end for run in read_runs(log)), 30, "the frozen task to end")
            wait_until(lambda: "late ack of message" in worker.text(), 30, "the fenced ack's warning")
            assert engine.stats("celery").dead == 0
        assert "may have happened alongside or after the next run" in worker.text()
    finally:
        worker.kill()
