"""An asyncio app on sharded-broker: request handlers enqueue, consumer tasks work.

    python examples/asyncio_app.py [URL]      # default memory://; sqlite:///q.db, redis://...

``handle_order`` is what a FastAPI (or any asyncio web framework) endpoint does: it awaits
the enqueue, so the event loop keeps serving other requests meanwhile. Three consumer
tasks lease with ``wait=``, which never blocks the loop, and each account's orders still
run one at a time, in the order they were posted. The check at the end says so, or exits
non-zero.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

import sharded_broker.aio

ACCOUNTS = ("alice", "bob", "carol", "dave")
ORDERS_PER_ACCOUNT = 8
QUEUE = "orders"


async def handle_order(broker: sharded_broker.aio.AsyncBroker, account: str, seq: int) -> dict[str, str]:
    """The body of a web endpoint such as ``@app.post("/orders")``."""
    payload = json.dumps({"account": account, "seq": seq}).encode()
    message_id = await broker.enqueue(QUEUE, payload, key=account)
    return {"queued": message_id}


async def consume(broker: sharded_broker.aio.AsyncBroker, done: list[tuple[str, int]], total: int) -> None:
    while len(done) < total:
        for lease in await broker.lease(QUEUE, limit=2, wait=0.5):
            order = json.loads(lease.payload)
            await asyncio.sleep(random.uniform(0, 0.01))  # the work, awaited: other tasks run meanwhile
            done.append((order["account"], order["seq"]))
            await broker.ack(lease)


async def main(url: str) -> int:
    total = len(ACCOUNTS) * ORDERS_PER_ACCOUNT
    async with sharded_broker.aio.connect(url) as broker:
        await broker.purge(QUEUE)
        done: list[tuple[str, int]] = []
        consumers = [asyncio.create_task(consume(broker, done, total)) for _ in range(3)]
        # Each account's client posts its orders one after the other (an order is "posted"
        # once its request is answered); the accounts' requests arrive concurrently.
        async def client(account: str) -> None:
            for seq in range(ORDERS_PER_ACCOUNT):
                await handle_order(broker, account, seq)

        await asyncio.gather(*(client(account) for account in ACCOUNTS))
        await asyncio.wait_for(asyncio.gather(*consumers), 60)
    failed = False
    for account in ACCOUNTS:
        ran = [seq for name, seq in done if name == account]
        in_order = ran == list(range(ORDERS_PER_ACCOUNT))
        failed |= not in_order
        print(f"  {account:<6} {' '.join(f'#{seq}' for seq in ran)}  {'in order' if in_order else 'OUT OF ORDER'}")
    print("ORDER VIOLATED" if failed else "OK: every account's orders ran in the order posted")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "memory://")))
