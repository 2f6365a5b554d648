"""Bounded work per call (guarantee 13, docs/design.md): one lease call promotes at most
SWEEP_LIMIT due delayed messages and returns at most as many expired leases, on every
backend alike (the planner for memory and SQLite, Lua for Redis); the rest waits for the
next call."""

from __future__ import annotations

from sharded_broker import Broker, Message
from sharded_broker.backends.planner import SWEEP_LIMIT
from support.backends import FakeClock

Q = "q"
MORE = 100


def ready_and(broker: Broker, state: str) -> tuple[int, int]:
    stats = broker.stats(Q)
    return stats.ready, getattr(stats, state)


def test_one_lease_call_promotes_at_most_sweep_limit_due_delayed_messages(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue_many(Q, [Message(b"%d" % i, delay=1.0) for i in range(SWEEP_LIMIT + MORE)])
    clock.advance(2.0)
    broker.pause(Q)  # the calls below only sweep: nothing is delivered
    assert broker.lease(Q) == []
    assert ready_and(broker, "delayed") == (SWEEP_LIMIT, MORE)
    assert broker.lease(Q) == []
    assert ready_and(broker, "delayed") == (SWEEP_LIMIT + MORE, 0)


def test_one_lease_call_returns_at_most_sweep_limit_expired_leases(broker: Broker, clock: FakeClock) -> None:
    broker.enqueue_many(Q, [Message(b"%d" % i) for i in range(SWEEP_LIMIT + MORE)])
    assert len(broker.lease(Q, SWEEP_LIMIT + MORE, visibility_timeout=1.0)) == SWEEP_LIMIT + MORE
    clock.advance(2.0)
    broker.pause(Q)
    assert broker.lease(Q) == []
    assert ready_and(broker, "leased") == (SWEEP_LIMIT, MORE)
    assert broker.lease(Q) == []
    assert ready_and(broker, "leased") == (SWEEP_LIMIT + MORE, 0)
