"""The Celery adapter with in-process workers on ``sharded+memory://``.

Real Celery workers (``celery.contrib.testing.worker.start_worker``) and the real engine;
the engine is also read directly to check what a publish stored.
"""

from __future__ import annotations

import threading
import time

import pytest
from celery.contrib.testing.worker import start_worker
from kombu import Connection

import sharded_broker
from sharded_broker.errors import ConfigurationError, InvalidArgument, InvalidArgumentType, InvalidURL
from sharded_broker.integrations.celery import binding_entry, engine_url, parse_binding_entry


def run_worker(app, pool="threads", concurrency=4, **kwargs):
    return start_worker(app, pool=pool, concurrency=concurrency, perform_ping_check=False,
                        shutdown_timeout=20, **kwargs)


class Journal:
    """What tasks did, from any thread: (event, key, seq, time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, int, float]] = []

    def add(self, event: str, key: str, seq: int) -> None:
        with self.lock:
            self.events.append((event, key, seq, time.monotonic()))

    def done(self, key: str | None = None) -> list[int]:
        with self.lock:
            return [s for e, k, s, _ in self.events if e == "end" and (key is None or k == key)]

    def count(self, event: str = "end") -> int:
        with self.lock:
            return sum(1 for e, *_ in self.events if e == event)


# -- order -------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_per_key_order_without_overlap_under_default_acks(make_app, pool, wait_until):
    app = make_app()
    assert not app.conf.task_acks_late  # Celery's default: ack when the task starts
    journal = Journal()

    @app.task(shared=False, shard_key="user")
    def step(user, seq):
        journal.add("start", user, seq)
        time.sleep(0.02)
        journal.add("end", user, seq)

    keys, per_key = ["u1", "u2"], 6  # fewer keys than threads: a key's next task could overlap
    for seq in range(per_key):
        for key in keys:
            step.delay(key, seq)
    with run_worker(app, pool=pool):
        wait_until(lambda: journal.count() == len(keys) * per_key, 20, "all tasks")
    for key in keys:
        assert journal.done(key) == list(range(per_key))
        # The next task of a key starts only after the previous one ended.
        events = [(e, s) for e, k, s, _ in journal.events if k == key]
        assert events == [(e, s) for s in range(per_key) for e in ("start", "end")]
    assert step.acks_late  # made late by the transport, so a key is held until its task ends


def test_unkeyed_tasks_still_run_in_parallel(make_app):
    app = make_app()
    running, peak, lock = [0], [0], threading.Lock()
    both_started = threading.Barrier(2, timeout=10)

    @app.task(shared=False)
    def free(n):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        both_started.wait()  # only returns if two run at the same time
        with lock:
            running[0] -= 1

    results = [free.delay(n) for n in range(2)]
    with run_worker(app, concurrency=2):
        for result in results:
            result.get(timeout=10)  # results backends are unaffected
    assert peak[0] == 2


# -- where the key comes from --------------------------------------------------------------


def _stored(engine, queue="celery"):
    leases = engine.lease(queue, limit=100)
    engine.ack_many(leases)
    return leases


def test_key_sources_and_their_precedence(make_app, engine):
    app = make_app(shard_keys={"cfg.task": "account", "cfg.both": "account"})

    @app.task(shared=False, name="opt.positional", shard_key="user")
    def positional(user, text): ...

    @app.task(shared=False, name="opt.callable", shard_key=lambda args, kwargs: f"{kwargs['region']}-{args[0]}")
    def by_callable(n, region): ...

    @app.task(shared=False, name="cfg.task")
    def configured(account, amount): ...

    @app.task(shared=False, name="cfg.both", shard_key="user")
    def option_wins(user, account): ...

    @app.task(shared=False, name="plain")
    def plain(x): ...

    positional.delay("u-1", "hi")
    positional.apply_async(kwargs={"user": 42, "text": "hi"})  # an int key, by keyword
    positional.apply_async(("u-1", "hi"), shard_key="override")  # per call beats the option
    by_callable.delay(7, region="eu")
    configured.delay("acct-9", 10)
    option_wins.delay("u-2", "acct-2")  # the task option beats the transport option
    plain.delay(1)
    plain.apply_async((1,), shard_key="k")

    got = [(lease.headers["task"], lease.key) for lease in _stored(engine)]
    assert sorted(got, key=str) == sorted([
        ("opt.positional", "u-1"), ("opt.positional", "42"), ("opt.positional", "override"),
        ("opt.callable", "eu-7"), ("cfg.task", "acct-9"), ("cfg.both", "u-2"),
        ("plain", None), ("plain", "k"),
    ], key=str)


def test_per_call_key_travels_in_the_headers(make_app, engine):
    app = make_app()

    @app.task(shared=False, name="hdr")
    def hdr(x): ...

    hdr.apply_async((1,), shard_key="user-7")
    (lease,) = _stored(engine)
    message = sharded_broker.integrations.celery.json_loads(lease.payload)
    assert message["headers"]["shard_key"] == "user-7"
    assert "shard_key" not in message["properties"]


@pytest.mark.parametrize("bad", [["a"], 1.5, True, {"k": 1}, ""])
def test_bad_keys_are_refused_at_publish_and_nothing_is_queued(make_app, engine, bad):
    app = make_app()

    @app.task(shared=False, name="bad.option", shard_key="user")
    def from_option(user): ...

    @app.task(shared=False, name="bad.call")
    def per_call(x): ...

    with pytest.raises((InvalidArgumentType, InvalidArgument), match="shard key for task 'bad.call'"):
        per_call.apply_async((1,), shard_key=bad)
    with pytest.raises((InvalidArgumentType, InvalidArgument), match="shard key for task 'bad.option'"):
        from_option.delay(bad)
    assert engine.stats("celery").ready == 0


def test_missing_key_argument_is_refused(make_app, engine):
    app = make_app(shard_keys={"typo.task": "acount"})

    @app.task(shared=False, name="typo.task")
    def typo(account): ...

    with pytest.raises(InvalidArgument, match="argument 'acount'"):
        typo.delay("a-1")
    assert engine.stats("celery").ready == 0


# -- retries, delays, priorities ---------------------------------------------------------


def test_retry_with_countdown_keeps_its_place_at_the_head_of_the_key(make_app, engine, wait_until):
    app = make_app()
    journal = Journal()

    @app.task(shared=False, bind=True, shard_key="user", max_retries=3)
    def flaky(self, user, seq):
        if seq == 0 and self.request.retries == 0:
            journal.add("retry", user, seq)
            raise self.retry(countdown=0.3)
        journal.add("end", user, seq)

    flaky.delay("u", 0)
    flaky.delay("u", 1)
    flaky.delay("other", 5)
    with run_worker(app):
        wait_until(lambda: journal.count() == 3, 10, "three tasks")
    # seq 1 waited for the retry of seq 0, although it was due first; other keys did not wait.
    assert journal.done("u") == [0, 1]
    assert journal.done()[0] == 5


def test_retry_goes_to_the_tail_of_its_key_with_retry_position_tail(make_app, engine, wait_until):
    app = make_app(retry_position="tail")
    journal = Journal()

    @app.task(shared=False, bind=True, shard_key="user", max_retries=3)
    def flaky(self, user, seq):
        if seq == 0 and self.request.retries == 0:
            journal.add("retry", user, seq)
            raise self.retry(countdown=0.3)
        journal.add("end", user, seq)

    flaky.delay("u", 0)
    flaky.delay("u", 1)
    with run_worker(app):
        wait_until(lambda: journal.count() == 2, 10, "two tasks")
    # The retry neither held the key nor went back to its head: seq 1 ran first.
    assert journal.done("u") == [1, 0]


def test_countdown_waits_in_the_broker_without_blocking_its_key(make_app, engine, wait_until):
    app = make_app()
    journal = Journal()

    @app.task(shared=False, shard_key="user")
    def step(user, seq):
        journal.add("end", user, seq)

    step.apply_async(("u", 0), countdown=0.6)
    step.apply_async(("u", 1))
    stats = engine.stats("celery")
    assert (stats.delayed, stats.ready) == (1, 1)  # stored in the broker, not in a worker
    with run_worker(app):
        wait_until(lambda: journal.count() == 2, 10, "both tasks")
    assert journal.done("u") == [1, 0]


def test_priority_follows_celerys_redis_convention_within_a_key(make_app, wait_until):
    app = make_app()
    journal = Journal()

    @app.task(shared=False, shard_key="user")
    def step(user, seq):
        journal.add("end", user, seq)

    for priority in (5, 9, 0, 3):
        step.apply_async(("u", priority), priority=priority)
    step.apply_async(("u", -1))  # no priority: Celery's default, 0, runs first among equals
    with run_worker(app, pool="solo", concurrency=1):
        wait_until(lambda: journal.count() == 5, 10, "five tasks")
    assert journal.done("u") == [0, -1, 3, 5, 9]


# -- leases ---------------------------------------------------------------------------------


def test_a_task_ten_times_longer_than_the_visibility_timeout_runs_once(make_app, engine, wait_until):
    app = make_app(visibility_timeout=0.3, heartbeat_interval=0.05)  # six beats per timeout: load-proof
    journal = Journal()

    @app.task(shared=False, shard_key="user")
    def slow(user, seq):
        journal.add("start", user, seq)
        time.sleep(3.0)
        journal.add("end", user, seq)

    slow.delay("u", 0)
    with run_worker(app, concurrency=2):
        wait_until(lambda: journal.count() == 1, 15, "the slow task")
        time.sleep(0.5)  # a redelivery would start within a timeout or two
    assert journal.count("start") == 1
    assert engine.stats("celery").dead == 0


# -- queues, fanout, purge ------------------------------------------------------------------


def test_routes_queues_inspect_ping_and_purge(make_app, engine, wait_until):
    app = make_app()
    app.conf.task_routes = {"routed.task": {"queue": "reports"}}
    journal = Journal()

    @app.task(shared=False, name="routed.task", shard_key="user")
    def routed(user, seq):
        journal.add("end", user, seq)

    @app.task(shared=False, name="default.task", shard_key="user")
    def default(user, seq):
        journal.add("end", user, seq)

    routed.delay("r", 1)
    default.delay("d", 2)
    assert engine.stats("reports").ready == 1
    with run_worker(app, queues=["celery", "reports"]) as worker:
        wait_until(lambda: journal.count() == 2, 10, "both queues")
        # Fanout out, direct reply back; limit=1: done at the one worker's reply instead of
        # waiting out the timeout.
        replies = app.control.inspect(timeout=3, limit=1).ping()
        assert replies == {worker.hostname: {"ok": "pong"}}
    default.delay("d", 3)
    default.delay("e", 4)
    assert app.control.purge() == 2
    assert engine.stats("celery").ready == 0


# -- configuration ------------------------------------------------------------------------


def test_unknown_transport_option_is_refused_by_name(make_app):
    app = make_app(visiblity_timeout=10)
    with pytest.raises(ConfigurationError, match="visiblity_timeout"):
        with app.connection_for_write() as conn:
            conn.connect()


def test_redis_transport_options_get_a_hint_or_are_ignored(make_app):
    with pytest.raises(ConfigurationError, match="global_keyprefix.*'prefix'"):
        with make_app(global_keyprefix="x").connection_for_write() as conn:
            conn.connect()
    app = make_app(fanout_prefix=True, fanout_patterns=True, polling_interval=0.1, max_retries=3)
    with app.connection_for_write() as conn:
        conn.connect()


def test_per_queue_visibility_timeout_is_used_for_leases_and_heartbeat(make_app, engine):
    app = make_app(visibility_timeout=30, queues={"fast": {"visibility_timeout": 3}})
    with app.connection_for_write() as conn:
        conn.connect()
        channel = conn.default_channel
        channel._put("fast", {"body": "", "headers": {}, "properties": {}})
        channel._put("celery", {"body": "", "headers": {}, "properties": {}})
        channel._lease("fast", 1, False)
        channel._lease("celery", 1, False)
        deadlines = {lease.queue: lease.deadline - engine.now() for lease in channel.unsettled_leases()}
        # Each queue's own lease length; the heartbeat beats often enough for the shortest.
        assert deadlines["fast"] <= 3 < 20 < deadlines["celery"] <= 30
        assert conn.transport.heartbeat_interval == 1


def test_closing_gives_every_unacked_message_back_in_one_call(make_app, engine, monkeypatch):
    app = make_app()
    with app.connection_for_write() as conn:
        conn.connect()
        channel = conn.default_channel
        for seq in range(3):
            channel._put("celery", {"body": "", "headers": {}, "properties": {}})
        assert all(channel.basic_get("celery") is not None for _ in range(3))
        calls = []
        real_release_many = conn.transport.broker.release_many

        def counting_release_many(leases):
            calls.append(len(leases))
            return real_release_many(leases)

        monkeypatch.setattr(conn.transport.broker, "release_many", counting_release_many)
        channel.close()
        assert calls == [3]
    stats = engine.stats("celery")
    assert (stats.ready, stats.leased) == (3, 0)


def test_closing_the_connection_stops_the_heartbeat_thread_before_the_engine_closes(make_app):
    app = make_app(heartbeat_interval=0.01)
    with app.connection_for_write() as conn:
        conn.connect()
        channel = conn.default_channel
        channel._put("celery", {"body": "", "headers": {}, "properties": {}})
        channel._lease("celery", 1, False)
        heartbeat = conn.transport._heartbeat
        assert heartbeat.is_alive()
    # No beat can reach the closed engine (or reopen a connection to it) afterwards.
    assert not heartbeat.is_alive()


def test_a_heartbeat_slower_than_the_lease_is_refused(make_app):
    # Every lease would expire between two beats: every long task would run twice.
    app = make_app(visibility_timeout=30, heartbeat_interval=12, queues={"fast": {"visibility_timeout": 10}})
    with pytest.raises(ConfigurationError, match="heartbeat_interval 12.*visibility_timeout 10"):
        with app.connection_for_write() as conn:
            conn.connect()


def test_unknown_engine_scheme_is_refused_by_name(make_app):
    app = make_app(broker_url="sharded+foo://localhost/0")
    with pytest.raises(ConfigurationError, match="unknown URL scheme 'foo'"):
        with app.connection_for_write() as conn:
            conn.connect()


def test_a_bad_url_is_reported_as_a_url_problem_not_an_option_problem(make_app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The classic slip: three slashes make /var/lib/app relative to the current directory.
    app = make_app(broker_url="sharded+sqlite:///var/lib/app/queue.db", visibility_timeout=10)
    with pytest.raises(InvalidURL) as info:
        with app.connection_for_write() as conn:
            conn.connect()
    assert str(info.value) == (
        f"broker URL sharded+sqlite:///var/lib/app/queue.db: sqlite database {tmp_path}/var/lib/app/queue.db: "
        f"directory {tmp_path}/var/lib/app does not exist (sqlite:///var/lib/app/queue.db is relative to the "
        f"current directory {tmp_path}; an absolute path takes four slashes: sqlite:////var/lib/app/queue.db "
        "names /var/lib/app/queue.db)"
    )
    malformed = make_app(broker_url="sharded+redis://:secret@localhost:6379/0?socket_timeout=soon")
    with pytest.raises(InvalidURL, match=r"^broker URL sharded\+redis://:\*\*\*@localhost:6379/0\?socket_timeout=soon: malformed redis URL ") as info:
        with malformed.connection_for_write() as conn:
            conn.connect()
    assert "secret" not in str(info.value) and "broker_transport_options" not in str(info.value)


def test_as_uri_shows_a_sqlite_file_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    connection = Connection("sharded+sqlite:///q.db")
    try:
        assert connection.as_uri() == f"sharded+sqlite:///{tmp_path}/q.db"  # what the worker banner prints
        assert connection.as_uri(include_password=True) == "sharded+sqlite:///q.db"  # as given, for reuse
    finally:
        connection.release()


def test_a_shard_key_naming_no_argument_is_refused_when_the_task_is_declared(make_app):
    from celery import shared_task

    app = make_app()
    with pytest.raises(ConfigurationError, match=r"has no argument 'acount' .*its arguments are: account, amount$"):
        @app.task(shared=False, shard_key="acount")
        def post(account, amount):
            pass

    with pytest.raises(ConfigurationError, match=r"task 'ledger.post' has no argument 'acount'"):
        @shared_task(name="ledger.post", shard_key="acount")
        def shared_post(account, amount):
            pass

    with pytest.raises(ConfigurationError, match=r"no argument 'self' .*its arguments are: account$"):
        @app.task(shared=False, bind=True, shard_key="self")  # the task itself, not a caller's argument
        def bound(self, account):
            pass

    with pytest.raises(ConfigurationError, match=r"must be an argument name or a callable\(args, kwargs\), not 42"):
        @app.task(shared=False, shard_key=42)
        def numbered(account):
            pass

    @app.task(shared=False, shard_key="account")
    def by_argument(account, amount):
        pass

    @app.task(shared=False, shard_key="account")
    def by_keyword(**fields):  # the key may come by keyword: checked when published
        pass

    @app.task(shared=False, bind=True, shard_key="account")
    def bound_ok(self, account):
        pass

    @app.task(shared=False, shard_key=lambda args, kwargs: "k")
    def by_callable(x):
        pass

    assert {by_argument.name, by_keyword.name, bound_ok.name, by_callable.name} <= set(app.tasks)


def test_engine_url_is_rebuilt_from_the_connection():
    def url(*args, **kwargs):
        return engine_url(Connection(*args, **kwargs))

    assert url("sharded+redis://:pw@h:6380/2?socket_timeout=3") == "redis://:pw@h:6380/2?socket_timeout=3"
    assert url("sharded+rediss://h:6380/0") == "rediss://h:6380/0"
    assert url("sharded+redis://h", userid="u", password="p/w", port=6390, virtual_host="3") == "redis://u:p%2Fw@h:6390/3"
    assert url("sharded+sqlite:///tmp/q.db") == "sqlite:///tmp/q.db"
    assert url("sharded+memory://") == "memory://"
    assert Connection("sharded+redis://:secret@h:1/0").as_uri() == "sharded+redis://:**@h:1/0"


def test_binding_entries_round_trip():
    for routing_key, queue in [("", "q"), ("worker.#", "celeryev.1"), ("a+b@c.*", "x+y"), ("k", "celery@h.celery.pidbox")]:
        entry = binding_entry(routing_key, queue)
        sharded_broker.validation.queue_name(entry)
        assert parse_binding_entry(entry) == (routing_key, queue)


# -- kombu level ------------------------------------------------------------------------------


def test_closing_a_channel_returns_unacked_messages_to_the_head_of_their_keys(memory_broker_url, engine):
    from kombu import Queue

    queue = Queue("plain")
    with Connection(memory_broker_url) as conn:
        producer = conn.Producer()
        for n in range(3):
            producer.publish({"n": n}, routing_key="plain", declare=[queue], headers={"shard_key": "k"})
        channel = conn.channel()
        first = queue(channel).get()  # delivered, never acked
        assert first.payload == {"n": 0} and first.headers["shard_key"] == "k"
        assert queue(conn.channel()).get() is None  # the key is held
        channel.close()
        again = queue(conn.channel()).get()
        # Given back uncounted: to Celery this is its first counted delivery still.
        assert again.payload == {"n": 0} and not again.delivery_info["redelivered"]
        again.ack()
        assert queue(conn.channel()).get().payload == {"n": 1}
    assert engine.stats("plain").dead == 0


def test_closing_channels_never_dead_letters_a_message_that_did_not_run(memory_broker_url, engine):
    from kombu import Queue

    queue = Queue("plain")
    with Connection(memory_broker_url, transport_options={"max_deliveries": 2}) as conn:
        conn.Producer().publish({"n": 0}, routing_key="plain", declare=[queue], headers={"shard_key": "k"})
        for _ in range(4):  # more closes than max_deliveries allows deliveries
            channel = conn.channel()
            assert queue(channel).get().payload == {"n": 0}  # delivered, never acked
            channel.close()
            assert engine.key_info("plain", "k").head.attempts == 0  # the delivery did not count
        last = queue(conn.channel()).get()
        assert last.payload == {"n": 0}
        last.ack()
    stats = engine.stats("plain")
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)


def test_a_stopping_celery_worker_consumes_nothing_more(memory_broker_url, engine, monkeypatch):
    # Celery's blocking loop drains once more after a shutdown signal; that drain must
    # neither deliver (and hold) a message nor wait for work.
    import socket

    from celery.worker import state
    from kombu import Queue

    queue = Queue("plain")
    received = []
    with Connection(memory_broker_url) as conn:
        conn.Producer().publish({"n": 0}, routing_key="plain", declare=[queue])
        with conn.Consumer(queue, callbacks=[lambda body, message: (received.append(body), message.ack())]):
            monkeypatch.setattr(state, "should_stop", 0)  # what a warm shutdown (SIGTERM) sets
            with pytest.raises(socket.timeout):
                conn.drain_events(timeout=30)
            assert received == [] and engine.stats("plain").ready == 1
            monkeypatch.setattr(state, "should_stop", None)
            conn.drain_events(timeout=5)
    assert received == [{"n": 0}]


def test_topic_exchange_bindings_are_shared_between_connections(memory_broker_url):
    from kombu import Exchange, Queue

    events = Exchange("events", type="topic")
    tasks_only = Queue("tasks-only", events, routing_key="task.#")
    everything = Queue("everything", events, routing_key="#")
    with Connection(memory_broker_url) as consumer_side:
        tasks_only(consumer_side.channel()).declare()
        everything(consumer_side.channel()).declare()
    with Connection(memory_broker_url) as producer_side:  # knows no binding of its own
        producer = producer_side.Producer(exchange=events)  # declares the exchange, as Celery does
        producer.publish({"e": 1}, exchange=events, routing_key="task.succeeded")
        producer.publish({"e": 2}, exchange=events, routing_key="worker.heartbeat")
    with Connection(memory_broker_url) as reader:
        def drain(queue):
            got = []
            while (message := queue(reader.channel()).get(no_ack=True)) is not None:
                got.append(message.payload["e"])
            return got

        assert drain(tasks_only) == [1]
        assert drain(everything) == [1, 2]


def test_an_auto_delete_queue_goes_with_its_last_consumer(memory_broker_url, engine):
    from kombu import Exchange, Queue

    broadcast = Exchange("broadcast", type="fanout")
    listener = Queue("listener", broadcast, auto_delete=True)
    with Connection(memory_broker_url) as conn:
        consumer = conn.Consumer(listener, callbacks=[lambda body, message: None], no_ack=True)
        consumer.consume()
        assert engine.bound_queues("broadcast") == [binding_entry("", "listener")]
        conn.Producer(exchange=broadcast).publish({"x": 1})
        consumer.cancel()
        assert engine.bound_queues("broadcast") == []
        assert engine.stats("listener").ready == 0


def test_registering_the_alias_by_hand(monkeypatch):
    from kombu.transport import TRANSPORT_ALIASES, get_transport_cls

    from sharded_broker.integrations.celery import Transport, register

    monkeypatch.delitem(TRANSPORT_ALIASES, "sharded")
    monkeypatch.setattr("kombu.transport._transport_cache", {})
    with pytest.raises(KeyError, match="sharded"):
        get_transport_cls("sharded")
    register()
    assert get_transport_cls("sharded") is Transport


def test_broker_use_ssl_reaches_the_redis_backend(make_app):
    import ssl

    app = make_app(broker_url="sharded+rediss://:pw@127.0.0.1:1/0")  # never dialled
    app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/tmp/ca.pem"}
    with app.connection_for_write() as conn:
        transport = conn.transport
        assert transport.engine_url == "rediss://:pw@127.0.0.1:1/0"
        assert transport.engine_options == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/tmp/ca.pem"}
        assert conn.as_uri() == "sharded+rediss://:**@127.0.0.1:1/0"
