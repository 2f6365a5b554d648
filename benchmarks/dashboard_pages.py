"""How fast the dashboard's pages answer over a busy Redis queue.

    .venv/bin/python -m benchmarks.dashboard_pages [--keys 5000] [--messages 50000]

Starts a throwaway redis-server, fills one queue (--messages spread over --keys keys,
some leased, some dead, one key paused), then times each page through the app (Flask's
test client: the server's own work, no browser) and the scans behind the queue page: the
stuck-keys scan when no head is old enough to count and when every one is, and the most
lagging keys. A figure for docs/dashboard.md, never a timed test.
"""

from __future__ import annotations

import argparse
import time

import sharded_broker
from benchmarks.common import RedisServer
from sharded_broker import Message
from sharded_broker.dashboard import create_app


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=50_000)
    options = parser.parse_args()
    with RedisServer() as server:
        broker = sharded_broker.connect(server.url)
        for start in range(0, options.messages, 5000):
            broker.enqueue_many("sms", [
                Message(b"x" * 100, key=f"user-{i % options.keys}")
                for i in range(start, min(start + 5000, options.messages))
            ])
        leases = broker.lease("sms", 200)
        for lease in leases[:20]:
            broker.nack(lease, dead=True, reason="boom")
        broker.pause("sms", key="user-7")
        time.sleep(1.2)
        print(f"{options.messages:,} messages over {options.keys:,} keys, {len(leases) - 20} leased, 20 dead")
        client = create_app(broker, server.url, token="bench", stuck_after=60.0).test_client()
        for path in ("/", "/queue?q=sms", "/queue?q=sms&partial=1", "/key?q=sms&k=user-42"):
            print(f"page {path}: {timed(lambda: client.get(path)):.3f} s")
        print(f"stuck keys, none old enough: {timed(lambda: broker.stuck_keys('sms', older_than=60)):.3f} s")
        print(f"stuck keys, all of them: {timed(lambda: broker.stuck_keys('sms', older_than=1)):.3f} s")
        print(f"most lagging keys: {timed(lambda: broker.lagging_keys('sms')):.3f} s")
        broker.close()


if __name__ == "__main__":
    main()
