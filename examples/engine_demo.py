"""Per-key FIFO in one screen, on the engine alone (no Celery, no Dramatiq): a producer
process interleaves messages for a few customers while consumer processes work through
them in parallel, and each customer's messages still run one at a time, in order.

    python examples/engine_demo.py        # SQLite file in a temporary directory, no server
    python examples/engine_demo.py URL    # any broker URL: sqlite:///demo.db, redis://...

(`make demo` runs examples/demo.py: the same story with a real Celery worker.)

The producer and each consumer connect to the URL on their own, as separate programs
would. ``memory://`` lives inside one process, so with it the consumers are threads.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any

import sharded_broker

QUEUE = "demo"
KEYS = ["alice", "bob", "carol", "dave", "erin"]
PER_KEY = 6
CONSUMERS = 4


def produce(url: str) -> None:
    """Enqueue every key's messages, interleaved, in small bursts."""
    broker = sharded_broker.connect(url)
    for step in range(PER_KEY):
        burst = [sharded_broker.Message(f"{key}:{step}".encode(), key=key) for key in KEYS]
        broker.enqueue_many(QUEUE, burst)
        time.sleep(0.02)
    broker.close()


def consume(url: str, name: str, producer_done: Any, events: Any) -> None:
    """Work until the producer is done and nothing is left; report each message as
    (consumer, pid, key, step, started, finished), in monotonic time (one clock for
    every process on the host)."""
    broker = sharded_broker.connect(url)
    while True:
        leases = broker.lease(QUEUE, wait=0.2)
        if not leases:
            stats = broker.stats(QUEUE)
            if producer_done.is_set() and stats.ready + stats.delayed + stats.leased == 0:
                break
            continue
        for lease in leases:
            key, step = lease.payload.decode().split(":")
            started = time.monotonic()
            time.sleep(random.uniform(0.02, 0.06))  # the work
            events.put((name, os.getpid(), key, int(step), started, time.monotonic()))
            broker.ack(lease)
    broker.close()


def main(url: str) -> int:
    in_process = url.startswith("memory:")
    broker = sharded_broker.connect(url)
    broker.purge(QUEUE)
    mode = "threads (memory:// lives in one process)" if in_process else "separate processes"
    print(f"{len(KEYS)} keys x {PER_KEY} messages on {sharded_broker.redact_url(url)}")
    print(f"1 producer and {CONSUMERS} consumers, as {mode}; each line is a finished message\n")

    events: Any = queue_module.Queue() if in_process else multiprocessing.Queue()
    producer_done: Any = threading.Event() if in_process else multiprocessing.Event()

    def start(target: Any, *args: Any) -> Any:
        worker = (threading.Thread if in_process else multiprocessing.Process)(target=target, args=args)
        worker.start()
        return worker

    workers = [start(consume, url, f"consumer-{i}", producer_done, events) for i in range(CONSUMERS)]
    producer = start(produce, url)

    done: list[tuple[str, int, str, int, float, float]] = []

    def show(event: tuple[str, int, str, int, float, float]) -> None:
        name, pid, key, step, _, _ = event
        done.append(event)
        print(f"  {name} (pid {pid})  {key:<6} #{step}")

    producer.join()
    producer_done.set()
    while any(worker.is_alive() for worker in workers) or not events.empty():
        try:
            show(events.get(timeout=0.1))
        except queue_module.Empty:
            pass
    for worker in workers:
        worker.join()
    return report(done)


def report(done: list[tuple[str, int, str, int, float, float]]) -> int:
    runs: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for _, _, key, step, started, finished in done:
        runs[key].append((started, finished, step))
    ok = True
    print()
    for key in KEYS:
        key_runs = sorted(runs[key])
        steps = [step for _, _, step in key_runs]
        one_at_a_time = all(nxt[0] >= prev[1] for prev, nxt in zip(key_runs, key_runs[1:]))
        in_order = steps == list(range(PER_KEY)) and one_at_a_time
        ok &= in_order
        print(f"  {key:<6} {steps}  {'in order, one at a time' if in_order else 'OUT OF ORDER'}")
    # The most keys running at the same moment: keys do run in parallel.
    moments = sorted((t, change) for *_, s, f in done for t, change in ((s, 1), (f, -1)))
    running = most = 0
    for _, change in moments:
        running += change
        most = max(most, running)
    pids = {pid for _, pid, *_ in done}
    print(f"\n  up to {most} keys ran at the same moment, in {len(pids)} consumer process(es)")
    print("\nper-key order held, one message per key at a time" if ok else "\nORDER VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(sys.argv[1]))
    with tempfile.TemporaryDirectory(prefix="sharded-broker-demo-") as directory:
        sys.exit(main(f"sqlite:///{directory}/demo.db"))
