"""ShardedBroker with an in-process dramatiq.Worker, on every backend."""

from __future__ import annotations

import random
import threading
import time

import dramatiq
import pytest
from dramatiq.errors import Retry
from dramatiq.middleware import CurrentMessage, Middleware
from dramatiq.results import Results
from dramatiq.results.backends import StubBackend

from sharded_broker.integrations.dramatiq import DeadMessage, ShardedBroker


def test_per_key_order_over_many_keys(run_worker, broker: ShardedBroker, recorder) -> None:
    @dramatiq.actor(broker=broker, shard_key="account")
    def post(account: str, n: int) -> None:
        with recorder.running_key(account):
            time.sleep(random.uniform(0, 0.003))
            recorder.add(account, n)

    accounts = [f"acct-{i}" for i in range(20)]
    for n in range(8):
        for account in accounts:
            post.send(account, n)
    with run_worker(broker, threads=8):
        broker.join(post.queue_name, timeout=30_000)

    assert recorder.by_key() == {account: list(range(8)) for account in accounts}
    assert recorder.overlaps == []


def test_every_key_source(run_worker, broker: ShardedBroker, recorder) -> None:
    broker.add_middleware(CurrentMessage())

    def record(label: object) -> None:
        key = CurrentMessage.get_current_message().options.get("shard_key")
        with recorder.running_key(key):
            recorder.add(key, label)

    @dramatiq.actor(broker=broker, shard_key="user_id")
    def by_argument(text: str, user_id: int) -> None:
        record(text)

    @dramatiq.actor(broker=broker, shard_key=lambda args, kwargs: f"user-{kwargs['order']['user']}")
    def by_callable(*, order: dict) -> None:
        record(order["n"])

    @dramatiq.actor(broker=broker)
    def unkeyed(n: int) -> None:
        record(n)

    sent = [
        by_argument.send("a0", 7),  # positional
        by_argument.send(text="a1", user_id=7),  # keyword
        by_argument.send_with_options(args=("a2", 0), shard_key="user-7"),  # per message
        by_callable.send(order={"user": 7, "n": 3}),
        unkeyed.send(1),
    ]
    assert [m.options.get("shard_key") for m in sent] == ["7", "7", "user-7", "user-7", None]
    with run_worker(broker):
        broker.join("default", timeout=10_000)

    assert recorder.by_key() == {"7": ["a0", "a1"], "user-7": ["a2", 3], None: [1]}
    assert recorder.overlaps == []


def test_backoff_retry_goes_back_to_the_head_of_its_key(run_worker, broker: ShardedBroker, recorder) -> None:
    failed: set[tuple[str, int]] = set()

    @dramatiq.actor(broker=broker, shard_key="key", min_backoff=20, max_backoff=50)
    def step(key: str, n: int) -> None:
        with recorder.running_key(key):
            if n in (0, 2) and (key, n) not in failed:
                failed.add((key, n))
                raise Retry("not yet", delay=100 if n == 0 else None)
            recorder.add(key, n)

    keys = [f"k{i}" for i in range(5)]
    for n in range(4):
        for key in keys:
            step.send(key, n)
    with run_worker(broker):
        broker.join("default", timeout=20_000)

    # Each failed message held its key until its retry ran (RedisBroker would run later ones meanwhile).
    assert recorder.by_key() == {key: [0, 1, 2, 3] for key in keys}
    assert len(failed) == 10
    assert recorder.overlaps == []
    assert broker.dead_letters == []


def test_retry_position_tail_frees_the_key(make_broker) -> None:
    broker = make_broker(retry_position="tail")

    @dramatiq.actor(broker=broker, shard_key="key")
    def step(key: str, n: int) -> None: ...

    step.send("k", 0)
    step.send("k", 1)
    consumer = broker.consume("default", prefetch=2, timeout=1000)
    first = next(consumer)
    # What Retries does: enqueue the delivered message again with a delay, then ack it.
    broker.enqueue(first, delay=60_000)
    consumer.ack(first)
    second = next(consumer)
    assert second.args == ("k", 1)  # the key is not held by the delayed retry
    consumer.ack(second)
    assert broker.engine.stats("default").delayed == 1


def test_retry_position_head_holds_the_key(broker: ShardedBroker) -> None:
    @dramatiq.actor(broker=broker, shard_key="key")
    def step(key: str, n: int) -> None: ...

    step.send("k", 0)
    step.send("k", 1)
    consumer = broker.consume("default", prefetch=2, timeout=200)
    first = next(consumer)
    broker.enqueue(first, delay=300)
    consumer.ack(first)
    again = None
    while again is None:
        again = next(consumer)
    assert (again.args, again.message_id) == (("k", 0), first.message_id)
    consumer.ack(again)
    second = next(consumer)
    assert second.args == ("k", 1)
    consumer.ack(second)


def test_exhausted_retries_become_dead_letters_and_the_key_goes_on(run_worker, 
    broker: ShardedBroker, recorder
) -> None:
    @dramatiq.actor(broker=broker, shard_key="key", max_retries=1, min_backoff=10, max_backoff=20)
    def charge(key: str, n: int) -> None:
        if n == 1:
            raise ValueError(f"card declined for {key}")
        recorder.add(key, n)

    for n in range(4):
        charge.send("alice", n)
    with run_worker(broker):
        broker.join("default", timeout=10_000, fail_fast=False)
        with pytest.raises(ValueError, match="card declined for alice"):
            broker.join("default", timeout=10_000, fail_fast=True)

    assert recorder.by_key() == {"alice": [0, 2, 3]}
    [dead] = broker.dead_messages
    assert isinstance(dead, DeadMessage)
    assert dead.shard_key == "alice" and dead.queue_name == "default"
    assert dead.message is not None and dead.message.args == ("alice", 1)
    assert dead.reason.startswith("ValueError: card declined for alice")
    assert "retries" in dead.reason
    assert broker.get_dead_letters("default") == [dead]
    [proxy] = broker.dead_letters  # StubBroker's element type: a proxy equal to the message
    assert isinstance(proxy, dramatiq.MessageProxy) and proxy == dead.message
    assert proxy.dead == dead and isinstance(proxy._exception, ValueError)
    broker.flush_all()
    assert broker.dead_letters == [] and broker.dead_messages == []


def test_fail_fast_without_the_exception_names_the_reason(run_worker, broker: ShardedBroker) -> None:
    @dramatiq.actor(broker=broker, max_retries=0)
    def boom() -> None:
        raise RuntimeError("kaput")

    boom.send()
    with run_worker(broker):
        broker.join("default", timeout=10_000, fail_fast=False)
    other_process = ShardedBroker(url=broker.url)  # knows only what the engine stored
    try:
        other_process.declare_queue("default")
        with pytest.raises(dramatiq.errors.DramatiqError, match="RuntimeError: kaput"):
            other_process.join("default", fail_fast=True)
    finally:
        other_process.close()


def test_delay_is_stored_in_the_broker_and_never_reaches_the_worker_as_eta(run_worker, 
    broker: ShardedBroker, recorder
) -> None:
    delayed_in_worker_memory = []

    class SpyDelays(Middleware):
        def before_delay_message(self, broker, message):
            delayed_in_worker_memory.append(message)

    broker.add_middleware(SpyDelays())
    broker.add_middleware(CurrentMessage())

    @dramatiq.actor(broker=broker, shard_key="key")
    def remind(key: str, n: int) -> None:
        message = CurrentMessage.get_current_message()
        recorder.add(key, n, time.time(), dict(message.options))

    sent_at = time.time()
    remind.send_with_options(args=("k", 0), delay=400)
    remind.send("k", 1)  # due now: a delayed message never blocks its key
    assert broker.engine.stats("default").delayed == 1
    with run_worker(broker):
        broker.join("default", timeout=10_000)

    assert [event[1] for event in recorder.done] == [1, 0]
    _, _, ran_at, options = recorder.done[1]
    assert ran_at >= sent_at + 0.4
    assert "eta" not in options
    assert delayed_in_worker_memory == []


def test_priority_keeps_dramatiqs_convention(run_worker, broker: ShardedBroker, recorder) -> None:
    @dramatiq.actor(broker=broker, shard_key="key", priority=10)
    def routine(key: str, n: int) -> None:
        recorder.add(key, ("routine", n))

    @dramatiq.actor(broker=broker, shard_key="key", priority=0)
    def urgent(key: str, n: int) -> None:
        recorder.add(key, ("urgent", n))

    routine.send("k", 0)
    routine.send("k", 1)
    urgent.send("k", 0)
    with run_worker(broker, threads=1):
        broker.join("default", timeout=10_000)
    assert recorder.by_key() == {"k": [("urgent", 0), ("routine", 0), ("routine", 1)]}


def test_results_pipelines_and_callbacks(run_worker, make_broker) -> None:
    results = StubBackend()
    broker = make_broker()
    broker.add_middleware(Results(backend=results))
    successes = []

    @dramatiq.actor(broker=broker, shard_key=lambda args, kwargs: "calc", store_results=True)
    def add(x: int, y: int) -> int:
        return x + y

    @dramatiq.actor(broker=broker)
    def on_ok(message: dict, result: int) -> None:
        successes.append((message["actor_name"], result))

    single = add.send(1, 2)
    # pipeline(..., broker=) rather than `|`, which would use the global broker.
    piped = dramatiq.pipeline(
        [add.message(1, 2), add.message(3), add.message_with_options(args=(4,), on_success=on_ok)],
        broker=broker,
    ).run()
    with run_worker(broker):
        assert single.get_result(backend=results, block=True, timeout=10_000) == 3
        assert piped.get_result(block=True, timeout=10_000) == 10
        broker.join("default", timeout=10_000)
    assert successes == [("add", 10)]


def test_age_limit_dead_letters_stale_messages(run_worker, broker: ShardedBroker, recorder) -> None:
    # A second of age allowed: the fresh message must start within it even on a loaded
    # machine (50 ms failed there), the stale one is older by then.
    @dramatiq.actor(broker=broker, shard_key="key", max_age=1000)
    def fresh_only(key: str, n: int) -> None:
        recorder.add(key, n)

    fresh_only.send("k", 0)
    time.sleep(1.2)
    with run_worker(broker):
        fresh_only.send("k", 1)
        broker.join("default", timeout=10_000, fail_fast=False)
    assert recorder.by_key() == {"k": [1]}
    [dead] = broker.dead_messages
    assert dead.message.args == ("k", 0)
    assert "age limit" in dead.reason


def test_heartbeat_keeps_a_long_task_from_running_twice(run_worker, make_broker) -> None:
    broker = make_broker(visibility_timeout=0.5)
    runs = []

    @dramatiq.actor(broker=broker, shard_key="key")
    def slow(key: str) -> None:
        runs.append(key)
        time.sleep(1.5)  # three visibility timeouts

    slow.send("k")
    with run_worker(broker, threads=2):
        broker.join("default", timeout=20_000)
    assert runs == ["k"]


def test_consumer_is_thread_safe_and_honours_prefetch(broker: ShardedBroker) -> None:
    @dramatiq.actor(broker=broker, shard_key="key")
    def job(key: str) -> None: ...

    for i in range(6):
        job.send(f"k{i}")
    consumer = broker.consume("default", prefetch=3, timeout=100)
    held = [next(consumer) for _ in range(3)]
    assert all(m is not None for m in held)
    assert next(consumer) is None  # prefetch reached: nothing more until one is settled
    acker = threading.Thread(target=lambda: [consumer.ack(m) for m in held])
    acker.start()
    more = []
    while len(more) < 3:
        message = next(consumer)
        if message is not None:
            more.append(message)
    acker.join()
    consumer.requeue(more[1:])
    consumer.ack(more[0])
    consumer.close()
    stats = broker.engine.stats("default")
    assert (stats.ready, stats.leased) == (2, 0)


def test_time_limit_with_an_explicit_middleware_list(run_worker, memory_url: str, recorder) -> None:
    from dramatiq.middleware import Retries, TimeLimit

    broker = ShardedBroker(url=memory_url, middleware=[TimeLimit(interval=20), Retries(max_retries=0)])
    broker.emit_after("process_boot")  # what the dramatiq command does; starts TimeLimit's timer
    try:
        @dramatiq.actor(broker=broker, shard_key="key", time_limit=100)  # shard_key still declared
        def bounded(key: str, n: int, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:  # interruptible, unlike one long sleep
                time.sleep(0.01)
            recorder.add(key, n)

        bounded.send("k", 0, 5.0)
        bounded.send("k", 1, 0.0)
        with run_worker(broker):
            broker.join("default", timeout=10_000, fail_fast=False)
        assert recorder.by_key() == {"k": [1]}
        [dead] = broker.dead_messages
        assert dead.message.args == ("k", 0, 5.0) and dead.reason.startswith("TimeLimitExceeded")
    finally:
        broker.close()


def test_graceful_stops_never_dead_letter_prefetched_messages(run_worker, make_broker, recorder) -> None:
    # A worker stopped while a task runs gives back what it prefetched and never ran.
    # Stopped more often than max_deliveries allows deliveries, it must not dead-letter it.
    broker = make_broker(max_deliveries=2)
    started, finish = threading.Event(), threading.Event()

    @dramatiq.actor(broker=broker, shard_key="key", max_retries=0)
    def blocker(key: str, n: int) -> None:
        started.set()
        assert finish.wait(10)
        recorder.add(key, n)

    @dramatiq.actor(broker=broker, shard_key="key", max_retries=0, priority=10)  # runs after blocker
    def prefetched(key: str, n: int) -> None:
        recorder.add(key, n)

    prefetched.send("victim", 0)
    stops = 4
    for round_ in range(stops):
        started.clear()
        finish.clear()
        blocker.send(f"blocker-{round_}", round_)
        worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)  # prefetch 2
        worker.start()
        assert started.wait(10)
        stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 10_000})
        stopper.start()
        while any(thread.running for thread in worker.workers):  # it takes nothing new
            time.sleep(0.01)
        finish.set()
        stopper.join(15)
        assert not stopper.is_alive()
        stats = broker.engine.stats("default")
        assert (stats.ready, stats.leased, stats.dead) == (1, 0, 0)
        head = broker.engine.key_info("default", "victim").head
        assert head is not None and head.attempts == 0  # its deliveries were not counted
    assert "victim" not in recorder.by_key()
    with run_worker(broker):
        broker.join("default", timeout=10_000, fail_fast=True)
    assert recorder.by_key()["victim"] == [0]
    assert broker.dead_letters == []


def test_weighted_keys_get_more_turns_with_a_real_worker(broker: ShardedBroker) -> None:
    """A weight set through the engine (ShardedBroker.engine) reaches Dramatiq's workers:
    one worker thread taking one message at a time runs the heavier key's messages in
    proportion to its weight."""
    ran: list[str] = []

    @dramatiq.actor(broker=broker, shard_key="tenant")
    def work(tenant: str, n: int) -> None:
        ran.append(tenant)

    broker.engine.set_weight(work.queue_name, "paying", 3)
    for n in range(6):
        for tenant in ("paying", "free-1", "free-2"):
            work.send(tenant, n)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.queue_prefetch = 1  # one lease at a time: each delivery is a fairness decision
    worker.start()
    try:
        broker.join(work.queue_name, timeout=30_000)
    finally:
        worker.stop()
    letters = "".join({"paying": "P", "free-1": "1", "free-2": "2"}[tenant] for tenant in ran)
    assert letters == "PPP12PPP12" + "12" * 4
