"""A Dramatiq worker over a redis+cluster:// URL, with wait_replicas."""

from __future__ import annotations

import dramatiq

from sharded_broker.integrations.dramatiq import ShardedBroker


def test_a_worker_consumes_in_key_order_over_a_cluster_with_wait_replicas(redis_cluster_url: str, run_worker,
                                                                           recorder) -> None:
    broker = ShardedBroker(url=redis_cluster_url, wait_replicas=1, visibility_timeout=5.0)
    try:
        @dramatiq.actor(broker=broker, shard_key="account")
        def post(account: str, n: int) -> None:
            with recorder.running_key(account):
                recorder.add(account, n)

        accounts = [f"acct-{i}" for i in range(5)]
        for n in range(4):
            for account in accounts:
                post.send(account, n)
        with run_worker(broker, threads=4):
            broker.join(post.queue_name, timeout=30_000)
        assert recorder.by_key() == {account: list(range(4)) for account in accounts}
        assert recorder.overlaps == []
    finally:
        broker.close()
