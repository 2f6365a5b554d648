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
from sharded_broker.backends.redis import ReplicasShort
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


# -- wait_replicas on a cluster -------------------------------------------------------------
# These tests count the WAITs of each master for calls to queues whose slot they know
# ({queue}): their brokers keep each queue in one partition (partitions=1).

def _waits_per_master(cluster: RedisCluster) -> dict[int, int]:
    """WAIT calls served by each live master since the last CONFIG RESETSTAT."""
    calls = {}
    for node in cluster.primaries():
        client = cluster.client(node)
        try:
            calls[node.port] = int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
        finally:
            client.close()
    return calls


def test_writes_with_wait_replicas_are_answered_after_a_wait_on_their_master(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    master = redis_cluster.node_of_slot(RedisCluster.key_slot("{jobs}"))
    with sharded_broker.connect(redis_cluster_url, partitions=1, wait_replicas=1) as broker:
        broker.enqueue("jobs", b"warm-up")  # the registry's SADD and the enqueue, each waited
        _reset_stats(redis_cluster)
        broker.enqueue("jobs", b"a", key="k")
        [lease] = broker.lease("jobs", limit=1)
        assert broker.ack(lease)
        waits = _waits_per_master(redis_cluster)
        assert waits[master.port] == 3, waits  # enqueue, lease, ack: each followed by its WAIT
        assert sum(waits.values()) == 3, waits  # on the master that ran them, nowhere else
        _reset_stats(redis_cluster)
        broker.stats("jobs")  # a read-only function: no WAIT
        assert sum(_waits_per_master(redis_cluster).values()) == 0


def test_waited_pipelines_wait_on_every_master_that_ran_a_write(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    queues = _queues_on_every_master(redis_cluster, 6)
    with sharded_broker.connect(redis_cluster_url, partitions=1, wait_replicas=1) as broker:
        for queue in queues:
            broker.enqueue(queue, queue.encode())
        leases = [lease for queue in queues for lease in broker.lease(queue)]
        _reset_stats(redis_cluster)
        assert broker.ack_many(leases) == [True] * len(queues)  # one call per queue, two per master
        waits = _waits_per_master(redis_cluster)
        assert len(waits) == 3 and all(calls == 1 for calls in waits.values()), waits  # one per master's share
        assert all(broker.stats(queue).leased == 0 for queue in queues)


def test_a_waited_pipeline_sends_a_call_refused_by_a_moved_slot_again_to_its_new_master(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    queues = _queues_on_every_master(redis_cluster, 3)
    slot = RedisCluster.key_slot(f"{{{queues[0]}}}")
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.primaries() if node is not source)
    with sharded_broker.connect(redis_cluster_url, partitions=1, wait_replicas=1) as broker:
        for queue in queues:
            broker.enqueue(queue, queue.encode())
        leases = [lease for queue in queues for lease in broker.lease(queue)]
        redis_cluster.move_slot(slot, target)
        try:
            _reset_stats(redis_cluster)
            # the source refuses its share (MOVED): that call goes alone to the target, WAIT with it
            assert broker.ack_many(leases) == [True] * len(queues)
            assert _waits_per_master(redis_cluster)[target.port] == 2  # its own share's, and the moved call's
            assert all(broker.stats(queue).leased == 0 for queue in queues)
        finally:
            redis_cluster.move_slot(slot, source)


def test_more_replicas_than_a_master_has_make_writes_unavailable_but_applied(redis_cluster_url: str) -> None:
    with sharded_broker.connect(redis_cluster_url) as plain:
        plain.enqueue("other", b"w")  # the library loaded on every master
    with sharded_broker.connect(redis_cluster_url, partitions=1, wait_replicas=2, wait_timeout=0.2) as broker:
        started = time.monotonic()
        # this broker's first enqueue of a queue: a pipeline (the registry's SADD, the enqueue)
        with pytest.raises(ReplicasShort, match=r"only 1 of the 2 replicas .* within 0\.2s"):
            broker.enqueue("jobs", b"x")
        assert time.monotonic() - started < 2.0
        assert broker.stats("jobs").ready == 1  # applied on the master all the same, as documented
        assert "jobs" in broker.queues()
        with pytest.raises(BackendUnavailable, match=r"only 1 of the 2 replicas"):
            broker.enqueue("jobs", b"y")  # one call
        assert broker.stats("jobs").ready == 2


def test_async_writes_with_wait_replicas_wait_and_come_up_short_as_the_sync_ones(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    import sharded_broker.aio

    async def scenario() -> None:
        async with sharded_broker.aio.connect(redis_cluster_url, partitions=1, wait_replicas=1) as broker:
            await broker.enqueue("jobs", b"warm-up")
            _reset_stats(redis_cluster)
            await broker.enqueue("jobs", b"a")
            leases = await broker.lease("jobs", limit=10)
            assert [await broker.ack(lease) for lease in leases] == [True, True]
            assert sum(_waits_per_master(redis_cluster).values()) == 4  # enqueue, lease, two acks
            queues = _queues_on_every_master(redis_cluster, 6)
            for queue in queues:
                await broker.enqueue(queue, queue.encode())
            leases = [lease for queue in queues for lease in await broker.lease(queue)]
            _reset_stats(redis_cluster)
            assert await broker.ack_many(leases) == [True] * len(queues)
            waits = _waits_per_master(redis_cluster)
            assert len(waits) == 3 and all(calls == 1 for calls in waits.values()), waits
        async with sharded_broker.aio.connect(redis_cluster_url, partitions=1, wait_replicas=2, wait_timeout=0.2) as broker:
            with pytest.raises(ReplicasShort):
                await broker.enqueue("jobs", b"b")  # a pipeline: this broker's first enqueue of it
            with pytest.raises(ReplicasShort):
                await broker.enqueue("jobs", b"c")
            assert (await broker.stats("jobs")).ready == 2

    asyncio.run(scenario())


def test_a_waited_call_follows_a_moved_slot_and_waits_on_its_new_master(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    slot = RedisCluster.key_slot("{jobs}")
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.primaries() if node is not source)
    with sharded_broker.connect(redis_cluster_url, partitions=1, wait_replicas=1) as broker:
        broker.enqueue("jobs", b"1", key="k")
        redis_cluster.move_slot(slot, target)
        try:
            _reset_stats(redis_cluster)
            # MOVED by the source (the WAIT sent with the refused call runs there, waiting for
            # nothing new), then sent again to the target, its WAIT with it
            broker.enqueue("jobs", b"2", key="k")
            waits = _waits_per_master(redis_cluster)
            assert (waits[source.port], waits[target.port]) == (1, 1), waits
            assert [lease.payload for lease in broker.lease("jobs", limit=10, per_key=10)] == [b"1", b"2"]
        finally:
            redis_cluster.move_slot(slot, source)


def test_an_async_waited_call_follows_a_moved_slot_and_waits_on_its_new_master(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    import sharded_broker.aio

    slot = RedisCluster.key_slot("{jobs}")
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.primaries() if node is not source)

    async def scenario() -> list[bytes]:
        async with sharded_broker.aio.connect(redis_cluster_url, partitions=1, wait_replicas=1) as broker:
            await broker.enqueue("jobs", b"1", key="k")
            redis_cluster.move_slot(slot, target)
            _reset_stats(redis_cluster)
            await broker.enqueue("jobs", b"2", key="k")
            waits = _waits_per_master(redis_cluster)
            assert (waits[source.port], waits[target.port]) == (1, 1), waits
            return [lease.payload for lease in await broker.lease("jobs", limit=10, per_key=10)]

    try:
        assert asyncio.run(scenario()) == [b"1", b"2"]
    finally:
        redis_cluster.move_slot(slot, source)


def test_a_waited_call_follows_a_slot_migrating_under_it(redis_cluster_url: str, redis_cluster: RedisCluster) -> None:
    slot = RedisCluster.key_slot("{jobs}")
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.primaries() if node is not source)
    with sharded_broker.connect(redis_cluster_url, partitions=1, wait_replicas=1) as broker:
        broker.enqueue("jobs", b"1", key="k")
        src, dst = redis_cluster.client(source), redis_cluster.client(target)
        source_id, target_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")

        def finish_migration() -> None:
            for client in (dst, src):
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)

        try:
            # a migration halfway: every key of the slot on the target, the slot still the source's
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
            keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *keys)
            _reset_stats(redis_cluster)
            finishing = threading.Timer(0.5, finish_migration)
            finishing.start()
            # ASK by the source; on the target (ASKING) TRYAGAIN, as a queue's call names keys
            # that do not exist yet; until the migration ends and the source says MOVED
            broker.enqueue("jobs", b"2", key="k")
            finishing.join()
            assert _command_calls(redis_cluster, "asking") >= 1
            assert _waits_per_master(redis_cluster)[target.port] >= 1
            assert [lease.payload for lease in broker.lease("jobs", limit=10, per_key=10)] == [b"1", b"2"]
        finally:
            src.close()
            dst.close()
            redis_cluster.move_slot(slot, source)


# A script that keeps its server busy for a second (TIME read in a loop).
BUSY_SECOND = """
local t = redis.call('TIME')
local started = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - started > 1000000
return 1
"""


def test_a_waited_call_whose_reply_is_lost_is_not_sent_again(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    master = redis_cluster.node_of_slot(RedisCluster.key_slot("{jobs}"))
    with sharded_broker.connect(redis_cluster_url, partitions=1, wait_replicas=1, socket_timeout=0.3) as broker:
        broker.enqueue("jobs", b"warm-up")
        admin = redis_cluster.client(master)
        admin.config_resetstat()
        busy = threading.Thread(target=admin.eval, args=(BUSY_SECOND, 0))
        try:
            busy.start()
            time.sleep(0.1)
            # sent, but its reply does not come within the socket timeout: it may run (here,
            # it will, once the server is free), so it is not sent a second time (the
            # executor without wait_replicas sends it again through redis-py: two FCALLs)
            with pytest.raises(BackendUnavailable):
                broker.enqueue("jobs", b"once")
            busy.join()
            time.sleep(0.5)  # anything sent meanwhile has run
            fcalls = admin.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0)
        finally:
            busy.join()
            admin.close()
        assert fcalls == 1
        assert broker.stats("jobs").ready == 2


def test_an_async_waited_call_whose_reply_is_lost_is_not_sent_again(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    import sharded_broker.aio

    master = redis_cluster.node_of_slot(RedisCluster.key_slot("{jobs}"))
    admin = redis_cluster.client(master)
    busy = threading.Thread(target=admin.eval, args=(BUSY_SECOND, 0))

    async def scenario() -> int:
        async with sharded_broker.aio.connect(redis_cluster_url, partitions=1, wait_replicas=1, socket_timeout=0.3) as broker:
            await broker.enqueue("jobs", b"warm-up")
            admin.config_resetstat()
            busy.start()
            await asyncio.sleep(0.1)
            with pytest.raises(BackendUnavailable):
                await broker.enqueue("jobs", b"once")
            busy.join()
            await asyncio.sleep(0.5)
            return (await broker.stats("jobs")).ready

    try:
        assert asyncio.run(scenario()) == 2
        assert admin.info("commandstats")["cmdstat_fcall"]["calls"] == 2  # the enqueue once, and stats
    finally:
        if busy.is_alive():
            busy.join()
        admin.close()


def _moved_partition(cluster: RedisCluster, queue: str, partitions: int, keys: list[str]) -> tuple[int, object, object]:
    """The slot of a partition of ``queue`` holding one of ``keys``, its master, and another master."""
    from sharded_broker.backends.redis import partition_name, partition_of

    partition = partition_of(keys[0], partitions)
    slot = RedisCluster.key_slot(f"{{{partition_name(queue, partition, partitions)}}}")
    source = cluster.node_of_slot(slot)
    target = next(node for node in cluster.primaries() if node is not source)
    return slot, source, target


def test_a_pipeline_sends_the_calls_a_moved_slot_refused_again_to_its_new_master(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    keys = [f"k{i}" for i in range(40)]
    slot, source, target = _moved_partition(redis_cluster, "moving", 8, keys)
    with sharded_broker.connect(redis_cluster_url, partitions=8) as broker:
        # the first batch goes to the masters as the client knows them; the slot then moves
        broker.enqueue_many("moving", [sharded_broker.Message(b"1", key=key) for key in keys])
        redis_cluster.move_slot(slot, target)  # type: ignore[arg-type]
        try:
            _reset_stats(redis_cluster)
            # the old master refuses its share of the pipeline (MOVED, nothing ran): sent again
            ids = broker.enqueue_many("moving", [sharded_broker.Message(b"2", key=key) for key in keys])
            assert len(set(ids)) == len(keys)
            assert _fcalls_per_master(redis_cluster, "rejected_calls")[source.port] == 1  # type: ignore[attr-defined]
            leases = broker.lease("moving", limit=100, per_key=2)
            by_key: dict[str, list[bytes]] = {}
            for lease in leases:
                by_key.setdefault(lease.key or "", []).append(lease.payload)
            assert by_key == {key: [b"1", b"2"] for key in keys}
            assert broker.ack_many(leases) == [True] * len(leases)
            assert broker.stats("moving").ready == 0
        finally:
            redis_cluster.move_slot(slot, source)  # type: ignore[arg-type]


def test_an_async_pipeline_sends_the_calls_a_moved_slot_refused_again_to_its_new_master(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    import sharded_broker.aio

    keys = [f"k{i}" for i in range(40)]
    slot, source, target = _moved_partition(redis_cluster, "amoving", 8, keys)

    async def scenario() -> None:
        async with sharded_broker.aio.connect(redis_cluster_url, partitions=8) as broker:
            await broker.enqueue_many("amoving", [sharded_broker.Message(b"1", key=key) for key in keys])
            redis_cluster.move_slot(slot, target)  # type: ignore[arg-type]
            ids = await broker.enqueue_many("amoving", [sharded_broker.Message(b"2", key=key) for key in keys])
            assert len(set(ids)) == len(keys)
            # a lone call to the moved slot: refused (MOVED), sent again to the new master
            await broker.enqueue("amoving", b"3", key=keys[0])
            leases = await broker.lease("amoving", limit=100, per_key=3)
            by_key: dict[str, list[bytes]] = {}
            for lease in leases:
                by_key.setdefault(lease.key or "", []).append(lease.payload)
            assert by_key == {key: [b"1", b"2", b"3"] if key == keys[0] else [b"1", b"2"] for key in keys}
            assert await broker.ack_many(leases) == [True] * len(leases)
            assert (await broker.stats("amoving")).ready == 0

    try:
        asyncio.run(scenario())
    finally:
        redis_cluster.move_slot(slot, source)  # type: ignore[arg-type]


def _fcalls_per_master(cluster: RedisCluster, counted: str = "calls") -> dict[int, int]:
    """FCALLs served (or ``rejected_calls``: refused, as with MOVED) by each live master
    since the last CONFIG RESETSTAT."""
    calls = {}
    for node in cluster.primaries():
        client = cluster.client(node)
        try:
            calls[node.port] = int(client.info("commandstats").get("cmdstat_fcall", {}).get(counted, 0))
        finally:
            client.close()
    return calls


def test_a_call_on_a_remembered_route_follows_its_slot_moved_and_then_goes_straight_there(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    slot = RedisCluster.key_slot("{jobs}")
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.primaries() if node is not source)
    with sharded_broker.connect(redis_cluster_url, partitions=1) as broker:
        broker.enqueue("jobs", b"1", key="k")  # the route of {jobs} remembered: the source
        redis_cluster.move_slot(slot, target)
        try:
            _reset_stats(redis_cluster)
            broker.enqueue("jobs", b"2", key="k")  # refused by the source (MOVED, not run), sent to the target
            broker.enqueue("jobs", b"3", key="k")  # the route learned again: the target at once
            refusals = _fcalls_per_master(redis_cluster, "rejected_calls")
            runs = _fcalls_per_master(redis_cluster)
            assert (refusals[source.port], runs[source.port], runs[target.port]) == (1, 0, 2)
            leases = broker.lease("jobs", limit=10, per_key=10)
            assert [lease.payload for lease in leases] == [b"1", b"2", b"3"]
        finally:
            redis_cluster.move_slot(slot, source)


def test_an_async_call_refused_by_a_moved_slot_is_sent_once_more_straight_to_its_new_master(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    import sharded_broker.aio

    slot = RedisCluster.key_slot("{jobs}")
    source = redis_cluster.node_of_slot(slot)
    target = next(node for node in redis_cluster.primaries() if node is not source)

    async def scenario() -> list[bytes]:
        async with sharded_broker.aio.connect(redis_cluster_url, partitions=1) as broker:
            await broker.enqueue("jobs", b"1", key="k")
            redis_cluster.move_slot(slot, target)
            _reset_stats(redis_cluster)
            await broker.enqueue("jobs", b"2", key="k")  # refused by the source (MOVED), then the target
            await broker.enqueue("jobs", b"3", key="k")  # the slot map updated: the target at once
            refusals = _fcalls_per_master(redis_cluster, "rejected_calls")
            runs = _fcalls_per_master(redis_cluster)
            assert (refusals[source.port], runs[source.port], runs[target.port]) == (1, 0, 2)
            leases = await broker.lease("jobs", limit=10, per_key=10)
            return [lease.payload for lease in leases]

    try:
        assert asyncio.run(scenario()) == [b"1", b"2", b"3"]
    finally:
        redis_cluster.move_slot(slot, source)


def _empty_leases_picking_up(broker: sharded_broker.Broker, queue: str, count: int) -> int:
    """Lease calls (one message each, waiting) that came back empty while ``count``
    messages were ready, after the consumer saw the queue empty."""
    empty = leased = 0
    while leased < count and empty < 20:
        leases = broker.lease(queue, 1, wait=0.5)
        if not leases:
            empty += 1
            continue
        broker.ack(leases[0])
        leased += 1
    return empty


def test_a_consumer_that_saw_a_partitioned_queue_empty_picks_every_partition_up_at_once(
    redis_cluster_url: str,
) -> None:
    with sharded_broker.connect(redis_cluster_url, partitions=16) as broker:
        broker.enqueue("spread", b"first", key="w")
        for lease in broker.lease("spread", limit=10):  # every other partition answers empty: quiet
            broker.ack(lease)
        broker.enqueue_many("spread", [sharded_broker.Message(b"x", key=f"k{i}") for i in range(64)])
        # each wait answers one partition's token (as one server's BLPOP): the lease call
        # after it asks that partition; the tokens taken with it wait for the next waits
        assert _empty_leases_picking_up(broker, "spread", 64) == 0
        assert broker.stats("spread").ready == 0


def test_an_async_consumer_that_saw_a_partitioned_queue_empty_picks_every_partition_up_at_once(
    redis_cluster_url: str,
) -> None:
    import sharded_broker.aio

    async def scenario() -> int:
        async with sharded_broker.aio.connect(redis_cluster_url, partitions=16) as broker:
            await broker.enqueue("spread", b"first", key="w")
            for lease in await broker.lease("spread", limit=10):
                await broker.ack(lease)
            await broker.enqueue_many("spread", [sharded_broker.Message(b"x", key=f"k{i}") for i in range(64)])
            empty = leased = 0
            while leased < 64 and empty < 20:
                leases = await broker.lease("spread", 1, wait=0.5)
                if not leases:
                    empty += 1
                    continue
                await broker.ack(leases[0])
                leased += 1
            return empty

    assert asyncio.run(scenario()) == 0
