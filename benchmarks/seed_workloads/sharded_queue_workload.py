"""sharded-queue's own in-memory benchmark workload, run inside its virtualenv.

The workload of sharded-queue's ``tests/test_performance.py``: register N requests routed
over T threads in one call (RuntimeStorage), then one worker (RuntimeLock) handles them in
batches of 512 with no pauses. Prints one JSON object. Standalone: it runs with the seed's
own interpreter and packages, not this project's.

Usage: python sharded_queue_workload.py REQUESTS THREADS
"""

import asyncio
import json
import sys
import time
from typing import NamedTuple

from sharded_queue import Handler, Queue, Route, Worker
from sharded_queue.drivers import RuntimeLock, RuntimeStorage

THREADS = int(sys.argv[2])
BATCH = 512


class DummyRequest(NamedTuple):
    n: int


class DummyHandler(Handler):
    handled = 0

    @classmethod
    async def route(cls, *requests: DummyRequest) -> list[Route]:
        return [Route(request.n % THREADS) for request in requests]

    async def handle(self, *requests: DummyRequest) -> None:
        DummyHandler.handled += len(requests)


async def main(count: int) -> dict:
    queue = Queue(RuntimeStorage())
    worker = Worker(RuntimeLock(), queue)
    worker.settings.batch_size = BATCH
    worker.settings.empty_limit = 0
    worker.settings.empty_pause = 0
    requests = [DummyRequest(n) for n in range(count)]
    start = time.perf_counter()
    await queue.register(DummyHandler, *requests)
    registered = time.perf_counter()
    await worker.loop(count)
    handled = time.perf_counter()
    if DummyHandler.handled != count:
        raise SystemExit(f"handled {DummyHandler.handled} of {count} requests")
    return {
        "requests": count,
        "threads": THREADS,
        "batch": BATCH,
        "register_per_s": round(count / (registered - start), 1),
        "handle_per_s": round(count / (handled - registered), 1),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
