"""One producer or consumer process of the cluster scaling benchmark (benchmarks/cluster_scaling.py).

Run as ``python -m benchmarks.cluster_worker '<json config>'``. It connects, prints
``ready``, waits for ``go`` on stdin, does its work, and prints one JSON line of what it
did: ``{"count", "first", "last"}`` (messages handled and the ``time.time()`` of its first
and last one), so the parent can time processes that ran side by side.

Roles (``role``):

* ``produce``: ``enqueue_many`` of ``batch`` messages, its ``count`` messages spread
  round-robin over its own share of the keys (``keys`` keys, this process's are those
  ``k`` with ``k % producers == index``: every key has one producer, as a key's order
  needs), then exits;
* ``consume``: ``lease(limit=lease_batch)`` + ``ack_many`` until the parent writes ``stop``
  (once the queue is empty);
* ``dramatiq``: a Dramatiq ``Worker`` on a ``ShardedBroker`` running :func:`noop` tasks
  until ``stop``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

QUEUE = "bench"
ACTOR = "scale_noop"
PAYLOAD = b"x" * 100


class Tally:
    """Messages handled in this process and when the first and the last were."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def add(self, count: int, started: float) -> None:
        with self.lock:
            if not self.count:
                self.first = started
            self.count += count
            self.last = time.time()

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first": self.first, "last": self.last}


tally = Tally()


def noop(index: int) -> None:
    """The Dramatiq task: nothing but being counted."""
    tally.add(1, time.time())


def wait_for(word: str) -> None:
    for line in sys.stdin:
        if line.strip() == word:
            return
    raise SystemExit(f"stdin closed before {word!r}")


def stop_event() -> threading.Event:
    """Set when the parent writes ``stop``."""
    stopped = threading.Event()

    def read() -> None:
        wait_for("stop")
        stopped.set()

    threading.Thread(target=read, daemon=True).start()
    return stopped


def produce(config: dict[str, Any]) -> None:
    import sharded_broker
    from sharded_broker import Message

    index, producers, keys = config["index"], config["producers"], config["keys"]
    mine = [f"key-{k}" for k in range(index, keys, producers)]
    messages = [Message(PAYLOAD, key=mine[i % len(mine)]) for i in range(config["count"])]
    with sharded_broker.connect(config["url"], **config.get("options", {})) as broker:
        broker.stats(QUEUE)  # connected (and the library loaded) before the start
        print("ready", flush=True)
        wait_for("go")
        batch = config["batch"]
        for offset in range(0, len(messages), batch):
            started = time.time()
            broker.enqueue_many(QUEUE, messages[offset : offset + batch])
            tally.add(len(messages[offset : offset + batch]), started)


def consume(config: dict[str, Any]) -> None:
    import sharded_broker

    with sharded_broker.connect(config["url"], **config.get("options", {})) as broker:
        broker.stats(QUEUE)
        print("ready", flush=True)
        wait_for("go")
        stopped = stop_event()
        while not stopped.is_set():
            started = time.time()
            leases = broker.lease(QUEUE, limit=config["lease_batch"], wait=0.05)
            if leases:
                broker.ack_many(leases)
                tally.add(len(leases), started)


def dramatiq_worker(config: dict[str, Any]) -> None:
    import dramatiq

    from sharded_broker.integrations.dramatiq import ShardedBroker

    broker = ShardedBroker(url=config["url"], **config.get("options", {}))
    dramatiq.actor(noop, broker=broker, actor_name=ACTOR, queue_name=QUEUE, max_retries=0)
    broker.engine.stats(QUEUE)
    print("ready", flush=True)
    wait_for("go")
    stopped = stop_event()
    worker = dramatiq.Worker(broker, worker_threads=config["worker_threads"])
    worker.start()
    stopped.wait()
    worker.stop()
    broker.close()


ROLES = {"produce": produce, "consume": consume, "dramatiq": dramatiq_worker}


def main(config: dict[str, Any]) -> None:
    import logging

    logging.getLogger("dramatiq").setLevel(logging.WARNING)
    ROLES[config["role"]](config)
    print(json.dumps(tally.as_dict()), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
