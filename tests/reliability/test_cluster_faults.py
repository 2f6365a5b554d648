"""Faults of a real Redis Cluster (3 masters, 3 replicas) under load: a master SIGKILLed
and its replica promoted; a slot of the queue migrated while producers and consumers run.

Each test starts its own cluster (a fault changes the topology) and checks every key's
runs with tests/support/cluster_faults.py's checker, which reports loss precisely.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import sharded_broker
from support.cluster_faults import FailoverReport, Producer, busiest_master, check_failover, slots_with_keys
from support.redis_cluster import RedisCluster
from support.workload import Workers, drained, wait_until

pytestmark = pytest.mark.reliability

QUEUE = "faults"
KEYS = [f"user-{i}" for i in range(12)]
# Loopback replication lag is well under a millisecond; a second bounds it with room for a
# loaded machine. A loss or a rewind older than this is a fault, not replication.
REPLICATION_WINDOW = 1.0


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[RedisCluster]:
    """3 masters with a replica each; a test run with ``wait_replicas=N`` gets N+1 per
    master, so that after a failover the promoted replica still has N to acknowledge its
    writes (with only N, every write to it would be refused short of replicas)."""
    callspec = getattr(request.node, "callspec", None)
    wait_replicas = callspec.params.get("wait_replicas") if callspec is not None else None
    with RedisCluster(masters=3, replicas_per_master=1 + (wait_replicas or 0)) as fresh:
        yield fresh


def run_under_fault(cluster: RedisCluster, tmp_path: Path, per_key: int, fault, *, vt: float,
                    fault_after: int, options: dict[str, Any] | None = None) -> tuple[FailoverReport, Producer]:
    """Producer and 3 engine workers on ``cluster``; ``fault()`` once ``fault_after``
    messages were acked by the workers (the producer must still be sending then, and
    after: the fault is under load); every message drained; the checker's report and
    the producer. ``options`` go to every connect (the producer's and the workers')."""
    options = options or {}
    producer = Producer(cluster.url, QUEUE, KEYS, per_key, interval=0.003, options=options)
    with Workers(tmp_path / "events.jsonl", url=cluster.url, queue=QUEUE, vt=vt, limit=5, work=0.002,
                 idle_exit=4.0, options=options) as workers:
        workers.start(3)
        producer.start()
        wait_until(lambda: sum(e["e"] == "ack" for e in workers.read()) >= fault_after, 60, "acks before the fault")
        fault_at = time.time()
        fault()
        assert producer.is_alive(), "the producer had finished before the fault was over: not under load"
        producer.join(120)
        assert not producer.is_alive(), "producer did not finish"
        assert producer.error is None, f"producer failed: {producer.error!r}"
        with sharded_broker.connect(cluster.url) as broker:
            wait_until(lambda: drained(broker, QUEUE), 90, "the queue drained", step=0.2)
        workers.wait(30)
        events = workers.read()
    return check_failover(events, producer.acked, fault_at, REPLICATION_WINDOW), producer


@pytest.mark.parametrize("wait_replicas", [None, 1], ids=["asynchronous", "wait_replicas=1"])
def test_master_killed_under_load_keeps_every_key_in_order(
    cluster: RedisCluster, tmp_path: Path, wait_replicas: int | None
) -> None:
    """SIGKILL of the master holding most of the queue; its replica is promoted.

    Asynchronous replication (as Redis documents it) may lose an enqueue acknowledged less
    than REPLICATION_WINDOW before the kill, and forget acks of that window, so their
    messages run again, in order, from the first forgotten one: tolerated, and nothing
    else (no order violation, no loss of anything acknowledged earlier, nothing left
    undone); the report says exactly which messages were lost or re-run. With
    ``wait_replicas=1`` every write was on the replica before it was acknowledged: no loss
    and no rewind at all."""
    options = {} if wait_replicas is None else {"wait_replicas": wait_replicas}
    promoted: list[object] = []

    def kill() -> None:
        promoted.append(cluster.kill_master(busiest_master(cluster)))

    report, producer = run_under_fault(cluster, tmp_path, per_key=80, fault=kill, vt=3.0, fault_after=150,
                                       options=options)
    print(f"master kill ({options or 'asynchronous'}): {report.summary()}; producer retries {producer.retries}")
    assert promoted, "no replica was promoted"
    assert producer.sent == len(KEYS) * 80
    assert report.within_asynchronous_replication, report.summary()
    if wait_replicas:
        assert report.clean, report.summary()
    assert report.runs >= producer.sent - len(report.lost)


def test_slots_migrated_under_load_lose_nothing(cluster: RedisCluster, tmp_path: Path) -> None:
    """Every slot of the queue on its busiest master moved to another master, one after
    the other (IMPORTING/MIGRATING, MIGRATE in
    batches, SETSLOT NODE: what ``redis-cli --cluster reshard`` does) while the producer and
    the workers run: no loss, no order violation, no double delivery but the redelivery
    of a lease that outlived its visibility timeout (each such one is a run of the
    message that was running: ``redelivered``)."""
    moved: list[tuple[int, int]] = []

    def migrate() -> None:
        source = busiest_master(cluster)
        slots = slots_with_keys(cluster, source)
        assert slots, "the queue has no key on its busiest master"
        target = next(node for node in cluster.primaries() if node is not source)
        for slot in slots:
            cluster.move_slot(slot, target, batch=2)  # small batches: each slot is split for longer
            moved.append((slot, target.port))

    report, producer = run_under_fault(cluster, tmp_path, per_key=60, fault=migrate, vt=5.0, fault_after=100)
    print(f"slots migrated {moved}: {report.summary()}; producer retries {producer.retries}")
    assert moved and all(cluster.node_of_slot(slot).port == port for slot, port in moved)
    assert report.clean, report.summary()
    assert report.runs == producer.sent + report.redelivered
