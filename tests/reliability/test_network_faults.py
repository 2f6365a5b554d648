"""Network faults between clients and Redis, injected by a TCP proxy: dropped
connections, stalls, latency and replies lost in transit. Every operation either completes
or raises BackendUnavailable, which the caller can retry without losing or duplicating."""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, TypeVar

import dramatiq
import pytest

import sharded_broker
from sharded_broker import BackendUnavailable, Message
from sharded_broker.integrations.dramatiq import ShardedBroker
from support.redis_server import RedisServer
from support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.reliability

Q = "jobs"
T = TypeVar("T")


@pytest.fixture
def proxy(redis_server: RedisServer, redis_url: str) -> Iterator[TcpProxy]:
    with TcpProxy(redis_server.port) as proxy:
        yield proxy


def through(proxy: TcpProxy, **options) -> sharded_broker.Broker:
    """A broker whose every connection goes through the proxy; a stalled read gives up
    after half a second."""
    return sharded_broker.connect(f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=0.5", **options)


def retried(call: Callable[[], T], failures: list[BaseException]) -> T:
    for _ in range(200):
        try:
            return call()
        except BackendUnavailable as exc:
            failures.append(exc)
            time.sleep(0.01)
    raise AssertionError("the operation never went through")


def test_dropped_connections_fail_clearly_and_retries_lose_and_duplicate_nothing(proxy: TcpProxy, redis_url: str) -> None:
    """Connections are cut every few operations through a whole produce/consume run, while
    idle (the next call reconnects unnoticed) and in use (the request reached Redis, the
    reply is lost). Each call completes or raises BackendUnavailable; retrying enqueues
    (with dedup ids), leases and acks finishes the run with every message delivered in its
    key's order."""
    keys = [f"k{i}" for i in range(5)]
    per_key = 20
    failures: list[BaseException] = []
    with through(proxy) as broker, sharded_broker.connect(redis_url) as direct:
        ids = {}
        for n in range(per_key):
            for key in keys:
                _cut(proxy, len(ids))
                ids[key, n] = retried(lambda: broker.enqueue(Q, f"{key}:{n}".encode(), key=key, dedup_id=f"{key}:{n}"), failures)
        assert direct.stats(Q).ready == len(keys) * per_key  # no duplicate from a retried enqueue
        delivered: dict[str, list[int]] = {key: [] for key in keys}
        calls = 0
        while not _drained(direct):
            calls += 1
            _cut(proxy, calls)
            leases = retried(lambda: broker.lease(Q, 3, visibility_timeout=0.3), failures)
            for lease in leases:
                key, n = lease.payload.decode().split(":")
                delivered[key].append(int(n))
                retried(lambda: broker.ack(lease), failures)
            if not leases:
                time.sleep(0.05)
        assert direct.stats(Q).dead == 0
    assert failures, "the proxy never cut a connection in use"
    assert all("unavailable" in str(exc) for exc in failures)
    for key in keys:
        # In order; a lease whose reply was lost comes back (only it) after its timeout.
        ran = delivered[key]
        assert ran[0] == 0 and ran[-1] == per_key - 1, ran
        assert all(b in (a, a + 1) for a, b in zip(ran, ran[1:])), ran


def test_a_stalled_connection_fails_within_the_socket_timeout_and_recovers(proxy: TcpProxy) -> None:
    with through(proxy) as broker:
        broker.enqueue(Q, b"1", key="a")
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="unavailable"):
            broker.lease(Q)
        assert time.monotonic() - started < 10, "a stalled server hung the caller"
        proxy.drop_connections()
        proxy.resume()
        # The stalled lease call never reached Redis: the message is still there, once.
        [lease] = broker.lease(Q)
        assert (lease.payload, lease.attempts) == (b"1", 1)
        assert broker.ack(lease)


def test_latency_slows_but_does_not_break_anything(proxy: TcpProxy) -> None:
    proxy.set_latency(0.02)
    with through(proxy) as broker:
        broker.enqueue_many(Q, [Message(str(n).encode(), key="a") for n in range(5)] + [Message(b"x", key="b")])
        got = []
        while len(got) < 6:
            leases = broker.lease(Q, 10, wait=1.0)  # blocking waits go through the proxy too
            got += [lease.payload for lease in leases]
            assert all(broker.ack_many(leases))
        assert [p for p in got if p != b"x"] == [b"0", b"1", b"2", b"3", b"4"]
        stats = broker.stats(Q)
        assert (stats.ready, stats.leased) == (0, 0)


def test_an_enqueue_whose_reply_is_lost_is_retried_without_duplicating(proxy: TcpProxy, redis_url: str) -> None:
    with through(proxy) as broker, sharded_broker.connect(redis_url) as direct:
        broker.enqueue(Q, b"first", key="a")  # the connection is open, and the queue known
        proxy.drop_next_reply()
        with pytest.raises(BackendUnavailable):
            broker.enqueue(Q, b"second", key="a", dedup_id="order-2")
        assert proxy.dropped_replies == 1
        assert direct.stats(Q).ready == 2  # it did take effect; the caller could not know
        mid = broker.enqueue(Q, b"second", key="a", dedup_id="order-2")
        assert direct.stats(Q).ready == 2
        payloads = [(lease.id, lease.payload) for lease in direct.lease(Q, 10, per_key=10)]
        assert payloads[1] == (mid, b"second") and len(payloads) == 2


def test_an_ack_whose_reply_is_lost_is_not_redelivered(proxy: TcpProxy, redis_url: str) -> None:
    with through(proxy) as broker, sharded_broker.connect(redis_url) as direct:
        broker.enqueue(Q, b"1", key="a")
        [lease] = broker.lease(Q, visibility_timeout=0.5)
        proxy.drop_next_reply()
        with pytest.raises(BackendUnavailable):
            broker.ack(lease)
        assert broker.ack(lease) is False  # the retry finds it already settled
        time.sleep(0.6)
        assert direct.lease(Q) == []
        assert _drained(direct) and direct.stats(Q).dead == 0


def test_an_ack_lost_before_reaching_redis_leads_to_one_redelivery(proxy: TcpProxy, redis_url: str) -> None:
    with through(proxy) as broker, sharded_broker.connect(redis_url) as direct:
        broker.enqueue_many(Q, [Message(b"1", key="a"), Message(b"2", key="a")])
        [lease] = broker.lease(Q, visibility_timeout=0.5)
        proxy.stall()
        with pytest.raises(BackendUnavailable):
            broker.ack(lease)
        proxy.drop_connections()  # the ack dies in the network, never reaching Redis
        proxy.resume()
        time.sleep(0.6)
        [again] = direct.lease(Q)
        assert (again.id, again.payload, again.attempts) == (lease.id, b"1", 2)
        assert broker.ack(lease) is False  # fencing: the old holder cannot settle it now
        assert direct.ack(again)
        [last] = direct.lease(Q)
        assert last.payload == b"2" and direct.ack(last)
        assert _drained(direct)


def _cut(proxy: TcpProxy, count: int) -> None:
    if count % 7 == 3:
        proxy.drop_connections()
    elif count % 7 == 5:
        proxy.drop_next_reply()


def _drained(broker: sharded_broker.Broker) -> bool:
    stats = broker.stats(Q)
    return stats.ready == stats.leased == stats.delayed == 0


def test_a_dramatiq_worker_rides_out_cut_connections_in_order(proxy: TcpProxy, redis_url: str) -> None:
    """A Dramatiq worker (and its producer) talking through the proxy while connections
    are cut again and again: every message runs, in its key's order; a message whose ack
    was lost may run twice in a row, nothing runs out of turn."""
    url = f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=1"
    broker = ShardedBroker(url=url, visibility_timeout=1.0)
    ran: dict[str, list[int]] = {}
    lock = threading.Lock()

    @dramatiq.actor(broker=broker, shard_key="key", queue_name=Q, max_retries=0)
    def record(key: str, n: int) -> None:
        with lock:
            ran.setdefault(key, []).append(n)

    keys, per_key = [f"k{i}" for i in range(4)], 15
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        for n in range(per_key):
            for key in keys:
                for _ in range(50):
                    try:
                        record.send(key, n)
                        break
                    except dramatiq.errors.ConnectionClosed:
                        time.sleep(0.02)  # the send failed clearly: retry it
            if n % 3 == 1:
                proxy.drop_connections()
            elif n % 3 == 2:
                proxy.drop_next_reply()
            time.sleep(0.05)
        with sharded_broker.connect(redis_url) as direct:
            deadline = time.monotonic() + 60
            while not _drained(direct):
                assert time.monotonic() < deadline, "the worker did not finish after the cuts"
                time.sleep(0.1)
            assert direct.stats(Q).dead == 0
    finally:
        worker.stop(timeout=5000)
        broker.close()
    assert proxy.dropped_replies > 0
    for key in keys:
        done = [n for i, n in enumerate(ran[key]) if i == 0 or ran[key][i - 1] != n]  # a lost ack reruns
        assert done == list(range(per_key)), f"{key}: {ran[key]}"
