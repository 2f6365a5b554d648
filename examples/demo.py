"""Per-key FIFO in one screen: producers interleave messages for a few customers,
consumers process them in parallel, and each customer's messages still run in order.

    make demo            # or: python examples/demo.py [URL]
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import defaultdict

import sharded_broker

KEYS = ["alice", "bob", "carol", "dave", "erin"]
PER_KEY = 6
CONSUMERS = 4


def main(url: str) -> int:
    broker = sharded_broker.connect(url)
    broker.purge("demo")
    for step in range(PER_KEY):
        for key in KEYS:
            broker.enqueue("demo", f"{key}:{step}".encode(), key=key)
    seen: dict[str, list[int]] = defaultdict(list)
    lock = threading.Lock()
    running: set[str] = set()
    overlaps = []

    def consume(name: str) -> None:
        while True:
            leases = broker.lease("demo", wait=0.5)
            if not leases:
                return
            for lease in leases:
                key, step = lease.payload.decode().split(":")
                with lock:
                    if key in running:
                        overlaps.append(key)
                    running.add(key)
                    print(f"  {name} starts {key:<6} #{step}   (running now: {', '.join(sorted(running))})")
                time.sleep(random.uniform(0.01, 0.05))
                with lock:
                    running.discard(key)
                    seen[key].append(int(step))
                broker.ack(lease)

    print(f"{len(KEYS)} keys x {PER_KEY} messages on {sharded_broker.redact_url(url)}, {CONSUMERS} consumers\n")
    threads = [threading.Thread(target=consume, args=(f"consumer-{i}",)) for i in range(CONSUMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print()
    ok = not overlaps
    for key in KEYS:
        in_order = seen[key] == list(range(PER_KEY))
        ok &= in_order
        print(f"  {key:<6} {seen[key]}  {'in order' if in_order else 'OUT OF ORDER'}")
    print("\nper-key order held, one message per key at a time" if ok else "\nORDER VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "memory://"))
