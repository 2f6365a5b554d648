"""Batch actors (``@dramatiq.actor(batch=M)``) with a real dramatiq.Worker: ordered batches
of one key, acked on success, and the contract's ordered-batch failure semantics."""

from __future__ import annotations

import threading
import time

import dramatiq
import pytest
from dramatiq.middleware import Retries, TimeLimit

from sharded_broker.integrations.dramatiq import BatchActorError, BatchFailed, ShardKeyError, ShardedBroker


def assert_queue_empty(broker: ShardedBroker, queue: str) -> None:
    stats = broker.engine.stats(queue)
    assert (stats.ready, stats.delayed, stats.leased) == (0, 0, 0)


def test_batches_are_consecutive_messages_of_one_key_in_order(run_worker, broker: ShardedBroker, recorder) -> None:
    batches: list[list[tuple[str, int]]] = []
    lock = threading.Lock()

    @dramatiq.actor(broker=broker, shard_key="account", batch=5, queue_name="ledger")
    def post(messages: list[dramatiq.Message]) -> None:
        items = [(m.kwargs["account"], m.kwargs["n"]) for m in messages]
        key = items[0][0]
        with recorder.running_key(key):
            for account, n in items:
                recorder.add(account, n)
        with lock:
            batches.append(items)

    accounts = [f"acct-{i}" for i in range(4)]
    for n in range(12):
        for account in accounts:
            post.send(account=account, n=n)
    with run_worker(broker, threads=4):
        broker.join("ledger", timeout=30_000)

    assert recorder.by_key() == {account: list(range(12)) for account in accounts}
    assert recorder.overlaps == []  # a key's batches never ran alongside each other
    for items in batches:
        assert 1 <= len(items) <= 5
        assert len({account for account, _ in items}) == 1  # one key per batch
        numbers = [n for _, n in items]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # consecutive, in order
    assert max(len(items) for items in batches) == 5  # queued before the worker: full batches
    assert_queue_empty(broker, "ledger")
    assert broker.dead_letters == []


def test_a_failure_at_index_acks_the_earlier_retries_it_and_gives_back_the_later(
    run_worker, broker: ShardedBroker, recorder
) -> None:
    runs: list[list[int]] = []
    failed_once: set[int] = set()

    @dramatiq.actor(broker=broker, shard_key="key", batch=6, queue_name="steps", min_backoff=20, max_backoff=40)
    def step(messages: list[dramatiq.Message]) -> None:
        numbers = [m.kwargs["n"] for m in messages]
        runs.append(numbers)
        for index, n in enumerate(numbers):
            if n == 2 and n not in failed_once:
                failed_once.add(n)
                raise BatchFailed(index, ValueError("flaky"))
            recorder.add("k", n)

    for n in range(6):
        step.send(key="k", n=n)
    with run_worker(broker, threads=2):
        broker.join("steps", timeout=20_000)

    # 0 and 1 were acked with the failed run; 2 ran again first (at the head of its key);
    # 3-5 went back unprocessed and came with it.
    assert runs[0] == [0, 1, 2, 3, 4, 5]
    assert runs[1][0] == 2
    assert [n for run in runs[1:] for n in run] == [2, 3, 4, 5]
    assert recorder.by_key() == {"k": [0, 1, 2, 3, 4, 5]}
    assert_queue_empty(broker, "steps")
    assert broker.dead_letters == []
    # Only the failed message counts as retried; the ones given back with it do not.
    minutes = broker.engine.metrics("steps", 5)
    assert sum(m.retried for m in minutes) == 1
    assert sum(m.acked for m in minutes) == 6


def test_a_message_failing_every_time_is_dead_lettered_and_its_key_moves_on(run_worker, make_broker, recorder) -> None:
    broker = make_broker(max_deliveries=2)

    @dramatiq.actor(broker=broker, shard_key="key", batch=4, queue_name="charges", min_backoff=10, max_backoff=20)
    def charge(messages: list[dramatiq.Message]) -> None:
        for index, message in enumerate(messages):
            if message.kwargs["n"] == 1:
                raise BatchFailed(index, RuntimeError("card declined"))
            recorder.add("k", message.kwargs["n"])

    for n in range(4):
        charge.send(key="k", n=n)
    with run_worker(broker, threads=2):
        broker.join("charges", timeout=20_000, fail_fast=False)

    assert recorder.by_key() == {"k": [0, 2, 3]}
    [dead] = broker.get_dead_letters("charges")
    assert dead.message is not None and dead.message.kwargs == {"key": "k", "n": 1}
    assert dead.attempts == 2
    assert dead.reason.startswith("RuntimeError: card declined (message ")
    assert_queue_empty(broker, "charges")


def test_another_exception_fails_the_batch_at_its_first_message(run_worker, broker: ShardedBroker) -> None:
    runs: list[list[int]] = []

    @dramatiq.actor(broker=broker, shard_key="key", batch=3, queue_name="boom", min_backoff=10, max_backoff=20)
    def boom(messages: list[dramatiq.Message]) -> None:
        runs.append([m.kwargs["n"] for m in messages])
        if len(runs) == 1:
            raise KeyError("whole batch")

    for n in range(3):
        boom.send(key="k", n=n)
    with run_worker(broker, threads=1):
        broker.join("boom", timeout=20_000)

    assert runs == [[0, 1, 2], [0, 1, 2]]  # nothing acked by the failed run
    assert_queue_empty(broker, "boom")
    assert broker.dead_letters == []


def test_throws_dead_letters_at_once_and_a_time_limit_fails_the_batch(run_worker, memory_url: str) -> None:
    broker = ShardedBroker(url=memory_url, middleware=[TimeLimit(interval=20), Retries()], max_deliveries=5)
    broker.emit_after("process_boot")  # what the dramatiq command does; starts TimeLimit's timer
    try:
        seen: list[int] = []
        slow_runs: list[int] = []

        @dramatiq.actor(broker=broker, shard_key="key", batch=3, queue_name="strict", throws=(ValueError,))
        def strict(messages: list[dramatiq.Message]) -> None:
            for index, message in enumerate(messages):
                if message.kwargs["n"] == 0:
                    raise BatchFailed(index, ValueError("malformed"))
                seen.append(message.kwargs["n"])

        @dramatiq.actor(
            broker=broker, shard_key="key", batch=3, queue_name="slow", time_limit=200, min_backoff=10, max_backoff=20
        )
        def slow(messages: list[dramatiq.Message]) -> None:
            slow_runs.append(len(messages))
            if len(slow_runs) == 1:
                for _ in range(500):  # interrupted by the time limit (between two sleeps)
                    time.sleep(0.01)

        for n in range(3):
            strict.send(key="k", n=n)
        slow.send(key="s", n=0)
        with run_worker(broker, threads=2):
            broker.join("strict", timeout=20_000, fail_fast=False)
            broker.join("slow", timeout=20_000)

        [dead] = broker.get_dead_letters("strict")
        assert dead.attempts == 1 and dead.reason.startswith("ValueError: malformed")
        assert seen == [1, 2]
        assert slow_runs == [1, 1]  # the interrupted run failed, the retry succeeded
    finally:
        broker.close()


def test_declaring_batch_actors(broker: ShardedBroker) -> None:
    @dramatiq.actor(broker=broker, batch=10, queue_name="solo")
    def solo(messages: list) -> int:
        return len(messages)

    assert solo([1, 2, 3]) == 3  # called directly, the function is the user's

    with pytest.raises(BatchActorError, match="batch actor 'solo' has it to itself"):
        dramatiq.actor(lambda x: None, broker=broker, actor_name="intruder", queue_name="solo")
    dramatiq.actor(lambda x: None, broker=broker, actor_name="plain", queue_name="shared")
    with pytest.raises(BatchActorError, match="needs queue 'shared' to itself, but 'plain' use"):
        dramatiq.actor(lambda m: None, broker=broker, actor_name="late", queue_name="shared", batch=5)
    for bad in (0, True, 2.5, "10", 10_001):
        with pytest.raises(BatchActorError, match="must be an int from 1 to 10000"):
            dramatiq.actor(lambda m: None, broker=broker, actor_name=f"bad-{bad!r}", queue_name="q-bad", batch=bad)


def test_a_batch_actor_reads_its_key_argument_by_keyword(broker: ShardedBroker) -> None:
    @dramatiq.actor(broker=broker, shard_key="user_id", batch=5, queue_name="users")
    def sync(messages: list) -> None: ...

    assert sync.send(user_id=42, text="hi").options["shard_key"] == "42"
    with pytest.raises(ShardKeyError, match="batch actor 'sync' \\(its messages pass the key by keyword\\)"):
        sync.send(42, "hi")
    assert broker.engine.stats("users").ready == 1


def test_a_stopping_worker_gives_prefetched_batches_back_uncounted(run_worker, make_broker, recorder) -> None:
    broker = make_broker(max_deliveries=1)
    started, finish = threading.Event(), threading.Event()

    @dramatiq.actor(broker=broker, shard_key="key", batch=3, queue_name="sync")
    def sync(messages: list[dramatiq.Message]) -> None:
        if messages[0].kwargs["key"] == "blocker":
            started.set()
            assert finish.wait(10)
        for message in messages:
            recorder.add(message.kwargs["key"], message.kwargs["n"])

    sync.send(key="blocker", n=0)
    for n in range(3):
        sync.send(key="victim", n=n)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)  # prefetch 2: both batches leased
    worker.start()
    assert started.wait(10)
    assert broker.engine.stats("sync").leased == 4  # the victim's batch is prefetched, held
    stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 10_000})
    stopper.start()
    while any(thread.running for thread in worker.workers):  # it takes nothing new
        time.sleep(0.01)
    finish.set()
    stopper.join(15)
    assert not stopper.is_alive()
    stats = broker.engine.stats("sync")
    assert (stats.ready, stats.leased, stats.dead) == (3, 0, 0)
    head = broker.engine.key_info("sync", "victim").head
    assert head is not None and head.attempts == 0  # the prefetched batch's delivery was not counted

    with run_worker(broker):
        broker.join("sync", timeout=10_000)
    assert recorder.by_key() == {"blocker": [0], "victim": [0, 1, 2]}
    assert broker.dead_letters == []


def test_age_limit_dead_letters_a_stale_head_and_gives_the_rest_back(run_worker, broker: ShardedBroker, recorder) -> None:
    @dramatiq.actor(broker=broker, shard_key="key", batch=4, queue_name="fresh", max_age=1000)
    def fresh_only(messages: list[dramatiq.Message]) -> None:
        for message in messages:
            recorder.add("k", message.kwargs["n"])

    fresh_only.send(key="k", n=0)
    fresh_only.send(key="k", n=1)
    time.sleep(1.1)
    fresh_only.send(key="k", n=2)
    fresh_only.send(key="k", n=3)
    with run_worker(broker):
        broker.join("fresh", timeout=10_000, fail_fast=False)
    assert recorder.by_key() == {"k": [2, 3]}  # each stale head died alone; the fresh ones ran
    dead = broker.get_dead_letters("fresh")
    assert [d.message.kwargs["n"] for d in dead] == [0, 1]
    assert all("age limit" in d.reason and "of a batch of" in d.reason for d in dead)


def test_the_heartbeat_keeps_every_lease_of_a_long_batch(run_worker, make_broker) -> None:
    broker = make_broker(visibility_timeout=0.5)
    runs: list[list[int]] = []

    @dramatiq.actor(broker=broker, shard_key="key", batch=3, queue_name="long")
    def slow(messages: list[dramatiq.Message]) -> None:
        runs.append([m.kwargs["n"] for m in messages])
        time.sleep(1.5)  # three visibility timeouts

    for n in range(3):
        slow.send(key="k", n=n)
    with run_worker(broker, threads=2):
        broker.join("long", timeout=20_000)
    assert runs == [[0, 1, 2]]  # no member expired and ran again
    assert broker.dead_letters == []
