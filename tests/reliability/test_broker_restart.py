"""Broker restart: redis-server with AOF (appendfsync always) SIGKILLed and restarted on
the same port while a producer and consumer processes run at full speed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import sharded_broker
from sharded_broker import BackendUnavailable
from support.redis_server import RedisServer
from support.workload import Workers, assert_in_order_and_complete, body, wait_for_events, wait_until

pytestmark = pytest.mark.reliability

Q = "jobs"
AOF = ["--appendonly", "yes", "--appendfsync", "always"]


class Producer(threading.Thread):
    """Enqueues numbered messages, one round of ``keys`` after another, until :meth:`stop`
    (it ends the round under way: every key gets ``rounds`` messages), retrying each
    enqueue with backoff (same dedup_id) until the broker acknowledges it. It runs until
    stopped, not for a fixed count, so that every crash hits it while it sends, however
    slowly the consumers started."""

    def __init__(self, url: str, keys: list[str]) -> None:
        super().__init__(name="producer", daemon=True)
        self.broker = sharded_broker.connect(url)
        self.keys = keys
        self.ids: dict[tuple[str, int], str] = {}
        self.failures = 0
        self.rounds = 0
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            for key in self.keys:
                backoff = 0.02
                while True:
                    try:
                        self.ids[key, self.rounds] = self.broker.enqueue(
                            Q, body(key, self.rounds), key=key, dedup_id=f"{key}/{self.rounds}"
                        )
                        break
                    except BackendUnavailable:
                        self.failures += 1
                        time.sleep(backoff)
                        backoff = min(backoff * 2, 0.5)
                time.sleep(0.01)  # below the consumers' pace: no backlog to drain at the end
            self.rounds += 1
        self.broker.close()

    def stop(self) -> None:
        """Stop after the round under way."""
        self._stopping.set()


def retried(call):
    while True:
        try:
            return call()
        except BackendUnavailable:
            time.sleep(0.1)


def test_redis_sigkill_and_restart_mid_run_loses_nothing_acknowledged_and_keeps_order(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(10)]
    server = RedisServer(AOF)
    with server:
        url = server.url + "?socket_timeout=3&socket_connect_timeout=1"
        producer = Producer(url, keys)
        with Workers(tmp_path / "events.jsonl", url=url, queue=Q, vt=2.0, work=0.005) as workers:
            workers.start(2)
            producer.start()
            for _ in range(2):  # two crashes, each while both sides are busy
                starts = sum(e["e"] == "start" for e in workers.read())
                wait_for_events(workers, "start", starts + 20, timeout=30)
                server.kill()
                time.sleep(0.3)
                server.start()
            after_restarts = producer.rounds
            wait_until(lambda: producer.rounds >= after_restarts + 3, timeout=30,
                       what="the producer to carry on after the restarts")
            producer.stop()
            producer.join(60)
            assert not producer.is_alive(), "the producer did not finish after the restarts"
            with sharded_broker.connect(url) as broker:
                wait_until(
                    lambda: (lambda s: s.ready == s.leased == s.delayed == 0)(retried(lambda: broker.stats(Q))),
                    timeout=60, what="the queue to drain",
                )
                stats = broker.stats(Q)
            events = workers.read()
            assert len(workers.alive()) == 2, "a consumer died instead of reconnecting"
    assert stats.dead == 0
    # Every enqueue acknowledged to the producer was stored once (retries did not duplicate).
    assert len(set(producer.ids.values())) == len(keys) * producer.rounds
    started = {e["id"] for e in events if e["e"] == "start"}
    assert set(producer.ids.values()) <= started
    assert_in_order_and_complete(events, {key: producer.rounds for key in keys})
    # The faults really hit both sides, and both carried on by themselves.
    assert any(e["e"] == "unavailable" for e in events)
    assert producer.failures > 0
