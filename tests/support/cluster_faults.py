"""Faults of a Redis Cluster under load, and the checker of what they did to each key.

A :class:`Producer` thread enqueues numbered messages (``support.workload.body``: key,
number in the key) one call at a time, in rounds (one message of every key per round, each
key's numbers in order) until it is stopped, and records when each enqueue was
acknowledged (the call returned). A call that failed with
``BackendUnavailable`` is sent again with the same ``dedup_id``, so a first try that took
effect but lost its reply is not enqueued twice. Engine worker processes
(``support/engine_worker.py``) consume and log every start and ack.

:func:`check_failover` reads both logs against a fault at ``fault_at`` (``time.time()``).
Asynchronous replication makes a promoted replica's data a *prefix* of its dead master's
history (Redis replicates a function's effects as one unit, in order): everything the
master did in the last moments before the SIGKILL may be forgotten. For one key that
means exactly two things, and the checker tells them apart from real faults:

* **lost**: an acknowledged enqueue that no worker ever started; tolerated only when its
  acknowledgement came at most ``replication_window`` seconds before the fault (a write
  the replica had not yet received);
* **rewound**: after the fault, a key's deliveries go back to an earlier number (its acks
  were forgotten), and run from there in order again: a re-run of messages that were done,
  tolerated only once per key, only for a run starting after the fault, and only back to
  a message whose ack came at most ``replication_window`` before the fault.

Everything else is an **order violation**: a key's runs must go n, n (a redelivery of the
running message), or n+1, or skip only numbers that were lost.

A message that started, whose every ack was refused and which was never delivered again,
is **unconfirmed** when its last run started at most ``replication_window`` before the
fault, on the master that died: its ack was in flight to that master, which applied it (and
its replica got it) but never answered, so the client's retry found the lease settled and
answered false (the product's documented answer to a retried ack whose first try took
effect: test_network_faults.py); or, without WAIT, the promoted replica never got the
message at all, and the run on the dead master was its only one. Either way the message
ran and is settled. Any other message acknowledged by the producer and started but never completed
is **incomplete**.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis

import sharded_broker
from sharded_broker import Message
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer
from support.workload import body


class Producer(threading.Thread):
    """Enqueues numbered messages, one round of ``keys`` after another, pacing ``interval``
    seconds between calls, until :meth:`stop` (it ends the round under way, so every key
    has the same number of messages); ``acked[(key, n)]`` is when each enqueue returned.

    It runs until stopped rather than for a fixed count so that a fault always hits it
    while it sends, however slowly the consumers start on a loaded machine."""

    def __init__(self, url: str, queue: str, keys: list[str], interval: float = 0.0,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.queue, self.keys, self.interval = url, queue, keys, interval
        self.options = options or {}
        self.acked: dict[tuple[str, int], float] = {}
        self.rounds = 0  # rounds whose every enqueue was acknowledged
        self.retries = 0
        self.error: BaseException | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            with sharded_broker.connect(self.url, **self.options) as broker:
                n = 0
                while not self._stopping.is_set():
                    for key in self.keys:
                        self._enqueue(broker, Message(body(key, n), key=key, dedup_id=f"{key}#{n}"))
                        self.acked[key, n] = time.time()
                        if self.interval:
                            time.sleep(self.interval)
                    n += 1
                    self.rounds = n
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def stop(self) -> None:
        """Stop after the round under way."""
        self._stopping.set()

    def _enqueue(self, broker: sharded_broker.Broker, message: Message) -> None:
        backoff = 0.02
        deadline = time.monotonic() + 60
        while True:
            try:
                broker.enqueue(self.queue, message.payload, key=message.key, dedup_id=message.dedup_id)
                return
            except sharded_broker.BackendUnavailable:
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 0.5)

    @property
    def sent(self) -> int:
        return len(self.acked)


@dataclass
class FailoverReport:
    """What a fault did to the keys (see the module docstring)."""

    runs: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged, never started, within the window
    lost_outside_window: list[str] = field(default_factory=list)
    rewound: list[str] = field(default_factory=list)  # key: back from #n to #m after the fault
    order_violations: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    unconfirmed: list[str] = field(default_factory=list)  # ran on the master that died; its ack refused
    redelivered: int = 0  # runs of the message that was running (stale lease, visibility timeout)

    @property
    def clean(self) -> bool:
        """No loss and no rewind: what a migration, or a failover with WAIT, must give.
        An unconfirmed message is neither (with WAIT it can only be an ack that took
        effect), and it needs a master that died: a migration passes no fault time."""
        return not (self.lost or self.lost_outside_window or self.rewound or self.order_violations
                    or self.incomplete)

    @property
    def within_asynchronous_replication(self) -> bool:
        """Only what asynchronous replication may cost: losses and rewinds within the window."""
        return not (self.lost_outside_window or self.order_violations or self.incomplete)

    def summary(self, limit: int = 10) -> str:
        parts = [f"runs {self.runs}, redelivered {self.redelivered}"]
        for name in ("lost", "lost_outside_window", "rewound", "order_violations", "incomplete", "unconfirmed"):
            found = getattr(self, name)
            parts.append(f"{name} {len(found)}{': ' + str(found[:limit]) if found else ''}")
        return "; ".join(parts)


def runs_per_key(events: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Each key's (number, start time) runs, in the order they started (the events file's
    order: one O_APPEND write per line), leaving out runs on a lease that was stale by the
    time of its ack (refused, and the message delivered again)."""
    starts_per_id: dict[str, int] = defaultdict(int)
    for event in events:
        if event["e"] == "start":
            starts_per_id[event["id"]] += 1
    started: list[tuple[str, int, str, int, float]] = []
    for event in events:
        if event["e"] == "start":
            started.append((event["k"], event["n"], event["id"], event["pid"], event["t"]))
        elif event["e"] == "ack" and not event["ok"] and starts_per_id[event["id"]] > 1:
            for index in range(len(started) - 1, -1, -1):
                if started[index][2:4] == (event["id"], event["pid"]):
                    del started[index]
                    starts_per_id[event["id"]] -= 1
                    break
    runs: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for key, number, _, _, when in started:
        runs[key].append((number, when))
    return runs


def check_failover(
    events: list[dict[str, Any]],
    acked: dict[tuple[str, int], float],
    fault_at: float | None,
    replication_window: float = 1.0,
) -> FailoverReport:
    """The checker (module docstring). ``fault_at`` is when a master died (its SIGKILL);
    None when none did (a migration): no loss, rewind or unconfirmed message is tolerated."""
    report = FailoverReport()
    started_numbers: dict[str, set[int]] = defaultdict(set)
    starts: dict[tuple[str, int], int] = defaultdict(int)
    completed: set[tuple[str, int]] = set()
    acked_done_at: dict[tuple[str, int], float] = {}  # when a worker's ack of it returned true
    last_start: dict[tuple[str, int], float] = {}
    refusals: dict[tuple[str, int], int] = defaultdict(int)
    by_id: dict[str, tuple[str, int]] = {}
    for event in events:
        if event["e"] == "start":
            started_numbers[event["k"]].add(event["n"])
            by_id[event["id"]] = (event["k"], event["n"])
            starts[by_id[event["id"]]] += 1
            last_start[by_id[event["id"]]] = event["t"]
        elif event["e"] == "ack" and event["id"] in by_id:
            if event["ok"]:
                completed.add(by_id[event["id"]])
                acked_done_at.setdefault(by_id[event["id"]], event["done"])
            else:
                refusals[by_id[event["id"]]] += 1

    def in_window(when: float | None) -> bool:
        return fault_at is not None and when is not None and fault_at - replication_window <= when <= fault_at

    lost_numbers: dict[str, set[int]] = defaultdict(set)
    for (key, n), when in sorted(acked.items()):
        if n in started_numbers[key]:
            if (key, n) in completed:
                continue
            # every run answered (none cut short by its worker's death), the last one begun at the fault
            if refusals[key, n] == starts[key, n] and in_window(last_start[key, n]):
                report.unconfirmed.append(f"{key}#{n}")
            else:
                report.incomplete.append(f"{key}#{n}")
            continue
        lost_numbers[key].add(n)
        (report.lost if in_window(when) else report.lost_outside_window).append(f"{key}#{n}")
    for key, runs in runs_per_key(events).items():
        report.runs += len(runs)
        rewinds = 0
        if runs and runs[0][0] != 0 and not set(range(runs[0][0])) <= lost_numbers[key]:
            report.order_violations.append(f"{key}: began with #{runs[0][0]}")
        for (previous, _), (number, when) in zip(runs, runs[1:]):
            if number == previous:
                report.redelivered += 1
            elif number > previous:
                skipped = set(range(previous + 1, number))
                if not skipped <= lost_numbers[key]:
                    report.order_violations.append(f"{key}: #{number} after #{previous}, skipping unlost "
                                                   f"{sorted(skipped - lost_numbers[key])[:5]}")
            else:
                forgotten_acks = [acked_done_at.get((key, m)) for m in range(number, previous)]
                if fault_at is not None and when >= fault_at and rewinds == 0 and all(
                    in_window(at) for at in forgotten_acks
                ):
                    rewinds += 1
                    report.rewound.append(f"{key}: #{previous} -> #{number}")
                else:
                    report.order_violations.append(f"{key}: #{number} started after #{previous}")
    return report


def busiest_master(cluster: RedisCluster) -> RedisServer:
    """The master holding the most keys: the one whose loss or migration hurts the queue most."""
    def size(node: RedisServer) -> int:
        client = cluster.client(node)
        try:
            return int(client.dbsize())
        finally:
            client.close()

    return max(cluster.primaries(), key=size)


def slots_with_keys(cluster: RedisCluster, master: RedisServer) -> list[int]:
    """The slots of ``master`` that hold keys, busiest first."""
    client = cluster.client(master)
    try:
        counts: dict[int, int] = defaultdict(int)
        for key in client.scan_iter(count=1000):
            counts[int(client.execute_command("CLUSTER KEYSLOT", key))] += 1
        return sorted(counts, key=lambda slot: -counts[slot])
    except redis.RedisError:
        return []
    finally:
        client.close()
