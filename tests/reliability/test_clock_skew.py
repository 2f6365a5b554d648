"""Clock: consumers on hosts whose clocks are far off (time.time shifted in each worker
process) cannot reorder or double-deliver, because every time comes from Redis."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import sharded_broker
from support.workload import Workers, assert_in_order_and_complete, drained, numbered, wait_until

pytestmark = pytest.mark.reliability

Q = "jobs"
HOUR = 3600.0


def test_skewed_consumer_clocks_neither_reorder_nor_double_deliver(redis_url: str, tmp_path: Path) -> None:
    """Three consumers, their clocks an hour behind, exact, and an hour ahead, share one
    queue with a 2 s visibility timeout. Were deadlines computed from client clocks, the
    fast consumer would see every other consumer's lease as expired and take it again."""
    keys = [f"k{i}" for i in range(12)]
    per_key = 10
    with sharded_broker.connect(redis_url) as broker:
        ids = broker.enqueue_many(Q, numbered(keys, per_key))
        config = dict(url=redis_url, queue=Q, vt=2.0, work=0.01, idle_exit=1.0)
        with Workers(tmp_path / "events.jsonl", **config) as workers:
            for skew in (-HOUR, 0.0, HOUR):
                workers.start(1, clock_skew=skew)
            wait_until(lambda: drained(broker, Q), timeout=60, what="the queue to drain")
            workers.wait(30)
            events = workers.read()
        # Leases live on the server's clock, not any client's.
        broker.enqueue(Q, b"{}", key="probe")
        [lease] = broker.lease(Q, visibility_timeout=30.0)
        assert abs(lease.deadline - 30.0 - time.time()) < 5.0
    clocks = sorted(e["time"] - time.time() for e in events if e["e"] == "up")
    assert [round(offset / HOUR) for offset in clocks] == [-1, 0, 1], "the workers' clocks were not skewed"
    pids = {e["pid"] for e in events if e["e"] == "start"}
    assert len(pids) == 3, "every skewed consumer took part"
    starts = [e["id"] for e in events if e["e"] == "start"]
    assert sorted(starts) == sorted(ids), "a message was delivered twice or never"
    assert all(e["ok"] for e in events if e["e"] == "ack")
    assert set(assert_in_order_and_complete(events, {key: per_key for key in keys}).values()) == {0}
