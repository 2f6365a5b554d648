"""The Redis Cluster executor (redis+cluster://) on a real throwaway cluster
(tests/support/redis_cluster.py): routing, library reload, idle waiting, faults' helpers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.cluster

import sharded_broker
from sharded_broker.errors import BackendUnavailable, ConfigurationError, InvalidURL

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


# -- the executor --------------------------------------------------------------------------

def _node_calls(cluster: RedisCluster) -> int:
    """Commands served by every live node since their last CONFIG RESETSTAT, but the
    measurement's own (INFO, CONFIG) and the client's topology reads (CLUSTER)."""
    total = 0
    for node in cluster.alive_nodes():
        client = cluster.client(node)
        try:
            for name, stats in client.info("commandstats").items():
                command = name.removeprefix("cmdstat_")
                if command.split("|")[0] not in ("info", "config", "cluster"):
                    total += int(stats["calls"])
        finally:
            client.close()
    return total


def _reset_stats(cluster: RedisCluster) -> None:
    for node in cluster.alive_nodes():
        client = cluster.client(node)
        try:
            client.config_resetstat()
        finally:
            client.close()


def _queues_on_every_master(cluster: RedisCluster, count: int) -> list[str]:
    """``count`` queue names whose hash tags fall on all the masters, in turn."""
    by_master: dict[int, list[str]] = {}
    candidate = 0
    while min((len(names) for names in by_master.values()), default=0) * len(by_master) < count or len(by_master) < 3:
        name = f"q{candidate}"
        candidate += 1
        by_master.setdefault(cluster.node_of_slot(RedisCluster.key_slot(f"{{{name}}}")).port, []).append(name)
    per_master = -(-count // len(by_master))
    return [name for names in by_master.values() for name in names[:per_master]][:count]


def test_round_trip_over_a_cluster(redis_cluster_url: str) -> None:
    with sharded_broker.connect(redis_cluster_url) as broker:
        ids = broker.enqueue_many("jobs", [sharded_broker.Message(b"a", key="k"), sharded_broker.Message(b"b", key="k")])
        leases = broker.lease("jobs", limit=10, per_key=10)
        assert [lease.payload for lease in leases] == [b"a", b"b"]
        assert [lease.id for lease in leases] == ids
        assert all(broker.ack(lease) for lease in leases)
        assert broker.stats("jobs").ready == 0
        assert "jobs" in broker.queues()


def test_async_round_trip_over_a_cluster(redis_cluster_url: str) -> None:
    import sharded_broker.aio

    async def scenario() -> list[bytes]:
        async with sharded_broker.aio.connect(redis_cluster_url) as broker:
            await broker.enqueue("jobs", b"a", key="k")
            leases = await broker.lease("jobs", limit=10, wait=2.0)
            assert all([await broker.ack(lease) for lease in leases])
            return [lease.payload for lease in leases]

    assert asyncio.run(scenario()) == [b"a"]


def test_queues_are_spread_over_every_master_and_one_ack_reaches_them_all(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    queues = _queues_on_every_master(redis_cluster, 9)
    with sharded_broker.connect(redis_cluster_url) as broker:
        for queue in queues:
            broker.enqueue(queue, queue.encode())
        leases = [lease for queue in queues for lease in broker.lease(queue)]
        assert sorted(lease.payload for lease in leases) == sorted(queue.encode() for queue in queues)
        # one pipeline over the three masters
        assert broker.ack_many(leases) == [True] * len(queues)
        assert all(broker.stats(queue).ready == 0 and broker.stats(queue).leased == 0 for queue in queues)
    for node in redis_cluster.primaries():
        client = redis_cluster.client(node)
        try:
            assert client.dbsize() > 0, f"master {node.port} holds no queue"
            assert client.function_list(), f"master {node.port} has no library"
        finally:
            client.close()


def test_the_library_is_loaded_again_on_a_flushed_master(redis_cluster_url: str, redis_cluster: RedisCluster) -> None:
    with sharded_broker.connect(redis_cluster_url, partitions=1) as broker:
        broker.enqueue("jobs", b"before")
        master = redis_cluster.node_of_slot(RedisCluster.key_slot("{jobs}"))
        client = redis_cluster.client(master)
        try:
            client.flushall()
            client.function_flush()
            assert client.function_list() == []
            broker.enqueue("jobs", b"after")
            assert client.function_list() != []
        finally:
            client.close()
        assert [lease.payload for lease in broker.lease("jobs", limit=10)] == [b"after"]


def test_calls_follow_a_slot_moved_to_another_master(redis_cluster_url: str, redis_cluster: RedisCluster) -> None:
    with sharded_broker.connect(redis_cluster_url) as broker:
        broker.enqueue("jobs", b"1", key="k")
        slot = RedisCluster.key_slot("{jobs}")
        source = redis_cluster.node_of_slot(slot)
        target = next(node for node in redis_cluster.primaries() if node is not source)
        redis_cluster.move_slot(slot, target)
        broker.enqueue("jobs", b"2", key="k")  # MOVED, then sent to the new master
        assert [lease.payload for lease in broker.lease("jobs", limit=10, per_key=10)] == [b"1", b"2"]
        redis_cluster.move_slot(slot, source)


def test_an_idle_consumer_over_many_masters_makes_few_calls(redis_cluster_url: str, redis_cluster: RedisCluster) -> None:
    queues = _queues_on_every_master(redis_cluster, 16)
    with sharded_broker.connect(redis_cluster_url) as broker:
        broker.wait_for_work(queues, 0.1)  # connections made, BLPOPs in flight
        _reset_stats(redis_cluster)
        seconds = 3.0
        deadline = time.monotonic() + seconds
        waits = 0
        while time.monotonic() < deadline:
            broker.wait_for_work(queues, 1.0)
            waits += 1
        calls = _node_calls(redis_cluster)
    assert waits >= 2
    # 16 lists re-sent at most every SIGNAL_BLOCK seconds: none here; at most ~10 a second allowed
    assert calls <= 10 * seconds, f"{calls} calls in {seconds}s of idle waiting"


def test_a_waiting_consumer_picks_a_new_message_up_at_once(redis_cluster_url: str, redis_cluster: RedisCluster) -> None:
    queues = _queues_on_every_master(redis_cluster, 16)
    with sharded_broker.connect(redis_cluster_url) as consumer, sharded_broker.connect(redis_cluster_url) as producer:
        woke_after: list[float] = []

        def wait(ready: threading.Event) -> None:
            consumer.wait_for_work(queues, 0.2)  # an empty wait first: its BLPOPs stay in flight
            ready.set()
            started = time.monotonic()
            consumer.wait_for_work(queues, 5.0)
            woke_after.append(time.monotonic() - started)

        for queue in (queues[0], queues[-1]):
            ready = threading.Event()
            waiter = threading.Thread(target=wait, args=(ready,))
            waiter.start()
            assert ready.wait(10)
            time.sleep(0.2)
            enqueued_at = time.monotonic()
            producer.enqueue(queue, b"x")
            waiter.join(10)
            picked_up = time.monotonic() - enqueued_at
            assert woke_after[-1] < 4.0, "the wait ran to its timeout"
            assert picked_up < 0.25, f"woke {picked_up:.3f}s after the enqueue"
            assert [lease.payload for lease in consumer.lease(queue)] == [b"x"]


def test_lease_with_wait_returns_when_a_message_comes(redis_cluster_url: str) -> None:
    with sharded_broker.connect(redis_cluster_url) as consumer, sharded_broker.connect(redis_cluster_url) as producer:
        threading.Timer(0.3, lambda: producer.enqueue("jobs", b"late")).start()
        started = time.monotonic()
        leases = consumer.lease("jobs", wait=5.0)
        assert [lease.payload for lease in leases] == [b"late"]
        assert time.monotonic() - started < 2.0


def _command_calls(cluster: RedisCluster, command: str) -> int:
    total = 0
    for node in cluster.alive_nodes():
        client = cluster.client(node)
        try:
            total += int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
        finally:
            client.close()
    return total


def test_events_of_a_queue_reach_a_subscriber_on_its_shard_channel(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    _reset_stats(redis_cluster)
    with sharded_broker.connect(redis_cluster_url) as broker:
        stream = broker.events("jobs", timeout=2.0)
        try:
            broker.enqueue("jobs", b"x")
            event = next(stream)
        finally:
            stream.close()
        assert event.queue == "jobs"
    # SPUBLISH: on the queue's master (and its replica), not broadcast to every node
    assert _command_calls(redis_cluster, "spublish") >= 1
    assert _command_calls(redis_cluster, "publish") == 0


@pytest.mark.parametrize("url, reason", [
    ("redis+cluster://", "bad node address"),
    ("redis+cluster://127.0.0.1", "bad node address"),
    ("redis+cluster://127.0.0.1:notaport", "bad node address"),
    ("redis+cluster://127.0.0.1:7000,:7001", "bad node address"),
    ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
])
def test_bad_cluster_urls_are_refused_naming_what_is_wrong(url: str, reason: str) -> None:
    with pytest.raises(InvalidURL, match=reason):
        sharded_broker.connect(url)


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no_such_option"):
        sharded_broker.connect("redis+cluster://127.0.0.1:7000", no_such_option=1)


def test_an_unreachable_cluster_is_unavailable_without_its_password() -> None:
    from support.redis_server import free_port

    url = f"redis+cluster://user:s3cr3tpw@127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailable) as raised:
        sharded_broker.connect(url, socket_connect_timeout=1)
    assert "s3cr3tpw" not in str(raised.value)
    assert "user:***@127.0.0.1" in str(raised.value)


def test_cluster_support_forms_a_one_master_cluster_with_a_replica() -> None:
    # redis-cli --cluster create wants 3 masters: 1 and 2 are formed by hand
    with RedisCluster(masters=1, replicas_per_master=1) as cluster:
        assert [node.port for node in cluster.primaries()] == [cluster.nodes[0].port]
        assert cluster.node_of_slot(16383) is cluster.nodes[0]
        with sharded_broker.connect(cluster.url) as broker:
            broker.enqueue("jobs", b"x")
            assert [lease.payload for lease in broker.lease("jobs")] == [b"x"]


def test_a_wait_in_flight_follows_its_list_to_a_new_master(redis_cluster_url: str, redis_cluster: RedisCluster) -> None:
    slot = RedisCluster.key_slot("{jobs}")
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.primaries() if node is not source)
    with sharded_broker.connect(redis_cluster_url) as consumer, sharded_broker.connect(redis_cluster_url) as producer:
        consumer.wait_for_work(["jobs"], 0.1)  # its BLPOP now blocks on the source master
        try:
            redis_cluster.move_slot(slot, target)
            # the source answers the blocked BLPOP with MOVED; the next wait re-routes it
            consumer.wait_for_work(["jobs"], 1.0)
            threading.Timer(0.3, lambda: producer.enqueue("jobs", b"x")).start()
            started = time.monotonic()
            consumer.wait_for_work(["jobs"], 5.0)
            assert time.monotonic() - started < 2.0, "the wait did not see the enqueue on the new master"
            assert [lease.payload for lease in consumer.lease("jobs")] == [b"x"]
        finally:
            redis_cluster.move_slot(slot, source)


def test_threads_of_one_broker_wait_on_their_queues_at_once(redis_cluster_url: str) -> None:
    # a Dramatiq worker's consumer threads share one broker, each waiting on its queue
    with sharded_broker.connect(redis_cluster_url) as consumer, sharded_broker.connect(redis_cluster_url) as producer:
        woke: dict[str, float] = {}

        def wait(queue: str) -> None:
            started = time.monotonic()
            consumer.wait_for_work([queue], 5.0)
            woke[queue] = time.monotonic() - started

        waiters = [threading.Thread(target=wait, args=(queue,)) for queue in ("first", "second")]
        for waiter in waiters:
            waiter.start()
        time.sleep(0.3)
        producer.enqueue("first", b"1")
        producer.enqueue("second", b"2")
        for waiter in waiters:
            waiter.join(10)
        assert woke["first"] < 2.0 and woke["second"] < 2.0, woke


def test_wait_replicas_is_refused_on_a_cluster_url_rather_than_ignored() -> None:
    with pytest.raises(ConfigurationError, match=r"wait_replicas are not available on a Redis Cluster URL"):
        sharded_broker.connect("redis+cluster://127.0.0.1:1", wait_replicas=1)
