"""The Redis Cluster executor (redis+cluster://) on a real throwaway cluster
(tests/support/redis_cluster.py): routing, library reload, idle waiting, faults' helpers."""

from __future__ import annotations

import redis
import redis.cluster

from support.redis_cluster import RedisCluster


def test_cluster_support_forms_a_cluster_with_replicas(redis_cluster: RedisCluster) -> None:
    assert len(redis_cluster.primaries()) == 3
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        for i in range(30):
            client.set(f"smoke:{i}", i)
        assert [int(client.get(f"smoke:{i}")) for i in range(30)] == list(range(30))
        masters_with_keys = {
            node.port for node in redis_cluster.primaries()
            if redis_cluster.client(node).dbsize() > 0
        }
        assert len(masters_with_keys) == 3
    finally:
        client.close()


def test_cluster_support_moves_a_slot_with_its_keys(redis_cluster_url: str, redis_cluster: RedisCluster) -> None:
    slot = RedisCluster.key_slot("{moved}")
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.primaries() if node is not source)
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        client.set("{moved}:a", "1")
        redis_cluster.move_slot(slot, target)
        assert redis_cluster.node_of_slot(slot) is target
        assert client.get("{moved}:a") == b"1"  # MOVED followed by the client
    finally:
        client.close()
    redis_cluster.wait_ok()


def test_cluster_support_kill_master_promotes_its_replica() -> None:
    with RedisCluster(masters=3, replicas_per_master=1) as cluster:
        victim = cluster.node_of_slot(0)
        promoted = cluster.kill_master(victim)
        assert cluster.node_of_slot(0) is promoted
        assert victim not in cluster.alive_nodes()
