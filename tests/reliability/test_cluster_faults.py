"""Faults of a real Redis Cluster (3 masters, 3 replicas) under load: a master SIGKILLed
and its replica promoted; a slot of the queue migrated while producers and consumers run.

Each test starts its own cluster (a fault changes the topology) and checks every key's
runs with tests/support/cluster_faults.py's checker, which reports loss precisely.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import sharded_broker
from sharded_broker import Lease
from sharded_broker.backends.redis import home_of_id
from support.cluster_faults import FailoverReport, Producer, busiest_master, check_failover, slots_with_keys
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer
from support.workload import Workers, body, drained, wait_until

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


# Rounds (one message per key) the producer sends once the fault is over, through the
# cluster as the fault left it, before it stops.
ROUNDS_AFTER_FAULT = 10


def run_under_fault(cluster: RedisCluster, tmp_path: Path, fault: Callable[[], float | None], *, vt: float,
                    fault_after: int, options: dict[str, Any] | None = None) -> tuple[FailoverReport, Producer]:
    """Producer and 3 engine workers on ``cluster``; ``fault()`` once ``fault_after``
    messages were acked by the workers, while the producer sends (it runs until stopped,
    so the fault is under load however slowly the workers started), then
    ROUNDS_AFTER_FAULT more rounds; every message drained; the checker's report and the
    producer. ``fault()`` answers when a master died (its SIGKILL), None if none did.
    ``options`` go to every connect (the producer's and the workers')."""
    options = options or {}
    producer = Producer(cluster.url, QUEUE, KEYS, interval=0.003, options=options)
    with Workers(tmp_path / "events.jsonl", url=cluster.url, queue=QUEUE, vt=vt, limit=5, work=0.002,
                 stop_file=str(tmp_path / "stop"), options=options) as workers:
        workers.start(3)
        producer.start()
        wait_until(lambda: sum(e["e"] == "ack" for e in workers.read()) >= fault_after, 60, "acks before the fault")
        assert producer.is_alive(), f"producer failed before the fault: {producer.error!r}"
        died_at = fault()
        rounds_at_fault_end = producer.rounds
        wait_until(lambda: producer.rounds >= rounds_at_fault_end + ROUNDS_AFTER_FAULT or not producer.is_alive(),
                   60, "rounds sent after the fault")
        producer.stop()
        producer.join(60)
        assert not producer.is_alive(), "producer did not finish"
        assert producer.error is None, f"producer failed: {producer.error!r}"
        with sharded_broker.connect(cluster.url) as broker:
            # The slowest a message can come back: a lease the fault stranded, after vt.
            wait_until(lambda: drained(broker, QUEUE), 60 + vt, "the queue drained", step=0.2)
        workers.stop(30)
        crashed = [p.returncode for p in workers.processes if p.returncode != 0]
        assert not crashed, f"a worker crashed (exit codes {crashed}): its traceback is in the captured stderr"
        events = workers.read()
    return check_failover(events, producer.acked, died_at, REPLICATION_WINDOW), producer


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

    def kill() -> float | None:
        master = busiest_master(cluster)
        promoted.append(cluster.kill_master(master))
        return master.killed_at

    report, producer = run_under_fault(cluster, tmp_path, fault=kill, vt=3.0, fault_after=150, options=options)
    print(f"master kill ({options or 'asynchronous'}): {report.summary()}; producer retries {producer.retries}")
    assert promoted, "no replica was promoted"
    assert producer.sent == len(KEYS) * producer.rounds
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

    def migrate() -> None:  # no master dies: no loss tolerated
        source = busiest_master(cluster)
        slots = slots_with_keys(cluster, source)
        assert slots, "the queue has no key on its busiest master"
        target = next(node for node in cluster.primaries() if node is not source)
        for slot in slots:
            cluster.move_slot(slot, target, batch=2)  # small batches: each slot is split for longer
            moved.append((slot, target.port))

    report, producer = run_under_fault(cluster, tmp_path, fault=migrate, vt=5.0, fault_after=100)
    print(f"slots migrated {moved}: {report.summary()}; producer retries {producer.retries}")
    assert moved and all(cluster.node_of_slot(slot).port == port for slot, port in moved)
    assert report.clean, report.summary()
    assert report.runs == producer.sent + report.redelivered


def test_a_message_run_only_on_the_master_that_died_is_unconfirmed_not_incomplete() -> None:
    """What made the master-kill test fail now and then with one ``incomplete`` message: a
    message enqueued, leased and started on a master SIGKILLed before its replica had it
    (asynchronous replication). The promoted replica never had it, so the worker's ack is
    refused and it is never delivered again: it ran once and is settled, which the checker
    calls unconfirmed (tolerated at a kill), not incomplete. Made certain here: the
    replica's link is cut, and its reconnection held off (DEBUG SLEEP), just before."""
    key = KEYS[0]
    with RedisCluster(masters=3, replicas_per_master=1, extra_args=["--enable-debug-command", "yes"]) as cluster, \
            sharded_broker.connect(cluster.url) as broker:
        broker.enqueue(QUEUE, body(key, 0), key=key)
        acked = {(key, 0): time.time()}
        events: list[dict[str, Any]] = []

        def run(lease: Lease) -> None:
            events.append({"e": "start", "id": lease.id, "k": key, "n": json.loads(lease.payload)["n"], "a": 1,
                           "pid": 1, "t": time.time()})

        def ack(lease: Lease) -> bool:
            done = time.time()
            while True:  # as engine_worker.py: retried until the cluster answers
                try:
                    ok = broker.ack(lease)
                    break
                except sharded_broker.BackendUnavailable:
                    time.sleep(0.1)
            events.append({"e": "ack", "id": lease.id, "ok": ok, "pid": 1, "done": done})
            return ok

        [first] = broker.lease(QUEUE, visibility_timeout=30)
        run(first)
        assert ack(first)
        cluster.wait_replicas_synced()

        def on(node: RedisServer, *command: Any) -> Any:
            with cluster.client(node) as client:
                return client.execute_command(*command)

        def role(node: RedisServer) -> dict[str, Any]:
            with cluster.client(node) as client:
                return client.info("replication")

        # the master of the key's partition
        master = cluster.node_of_slot(RedisCluster.key_slot(f"{{{home_of_id(QUEUE, first.id)}}}"))
        [replica] = [node for node in cluster.alive_nodes() if role(node).get("master_port") == master.port]
        def sleeping() -> bool:
            """Whether the replica leaves a PING unanswered (a raw socket: no client retries)."""
            with socket.create_connection(("127.0.0.1", replica.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                sock.settimeout(0.05)
                try:
                    sock.recv(16)
                except socket.timeout:
                    return True
            return False

        asleep = threading.Thread(target=on, args=(replica, "DEBUG", "SLEEP", "2"))
        asleep.start()
        wait_until(sleeping, 10, "the replica asleep")  # it cannot reconnect before the kill
        on(master, "CLIENT", "KILL", "TYPE", "replica")
        broker.enqueue(QUEUE, body(key, 1), key=key)
        acked[key, 1] = time.time()
        [second] = broker.lease(QUEUE, visibility_timeout=30)
        run(second)
        master.kill()
        asleep.join()
        wait_until(lambda: role(replica)["role"] == "master", 30, "the promotion")
        cluster.wait_ok()
        assert not ack(second), "the promoted replica had the message: the link was not cut in time"
        assert broker.lease(QUEUE, visibility_timeout=30) == [] and drained(broker, QUEUE)
    report = check_failover(events, acked, master.killed_at, REPLICATION_WINDOW)
    assert report.unconfirmed == [f"{key}#1"] and not report.incomplete, report.summary()
    assert report.within_asynchronous_replication and report.runs == 2
