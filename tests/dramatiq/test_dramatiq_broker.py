"""The Broker contract of ShardedBroker and its refusal of bad input (no worker needed)."""

from __future__ import annotations

import json

import dramatiq
import pytest
from dramatiq.errors import QueueJoinTimeout, QueueNotFound
from dramatiq.middleware import Middleware, MiddlewareError

import sharded_broker
from sharded_broker.integrations.dramatiq import ShardedBroker, ShardKeyError, ShardKeyTypeError


@pytest.fixture
def memory_broker(memory_url: str):
    broker = ShardedBroker(url=memory_url)
    yield broker
    broker.close()


def waiting(broker: ShardedBroker, queue: str = "default") -> int:
    stats = broker.engine.stats(queue)
    return stats.ready + stats.delayed


def test_a_shard_key_argument_the_actor_lacks_is_refused_when_declared(memory_broker) -> None:
    with pytest.raises(ShardKeyError, match=r"actor 'notify' has no argument 'user' .*: user_id, text"):

        @dramatiq.actor(broker=memory_broker, shard_key="user")
        def notify(user_id, text): ...

    assert "notify" not in memory_broker.actors
    for source in (42, "user id", ""):
        with pytest.raises(ShardKeyError, match="must be an argument name or a callable"):
            dramatiq.actor(broker=memory_broker, actor_name=f"a{source!r}", shard_key=source)(lambda user: None)


def test_unknown_actor_options_are_still_refused(memory_broker) -> None:
    with pytest.raises(ValueError, match="shard_kye"):
        dramatiq.actor(broker=memory_broker, shard_kye="user_id")(lambda user_id: None)


@pytest.mark.parametrize(
    ("send", "error", "match"),
    [
        (lambda a: a.send(user_id=4.5), ShardKeyTypeError, r"argument 'user_id' .* must be a str or an int, not float"),
        (lambda a: a.send(user_id=[1]), ShardKeyTypeError, "not list"),
        (lambda a: a.send(user_id=True), ShardKeyTypeError, "not bool"),
        (lambda a: a.send(user_id=None), ShardKeyError, "is None"),
        (lambda a: a.send(user_id=""), ShardKeyError, "must not be empty"),
        (lambda a: a.send(user_id="a\nb"), ShardKeyError, "control character"),
        (lambda a: a.send(user_id="x" * 600), ShardKeyError, "maximum is 512"),
        (lambda a: a.send(text="hi"), ShardKeyError, "does not give it"),  # only through **kwargs
        (lambda a: a.send_with_options(kwargs={"user_id": 1}, shard_key=3.5), ShardKeyTypeError, "shard_key option"),
        (lambda a: a.send_with_options(kwargs={"user_id": 1}, delay=-5), sharded_broker.InvalidArgument, "delay"),
        (lambda a: a.send_with_options(kwargs={"user_id": 1}, delay="soon"), sharded_broker.InvalidArgumentType, "delay"),
    ],
)
def test_bad_keys_are_refused_when_sending_and_nothing_is_stored(memory_broker, send, error, match) -> None:
    @dramatiq.actor(broker=memory_broker, shard_key="user_id")
    def notify(**kwargs): ...

    notify.send(user_id="already-queued")
    with pytest.raises(error, match=match) as caught:
        send(notify)
    if issubclass(error, ShardKeyError):
        assert isinstance(caught.value, MiddlewareError)  # propagates even from a hook
    assert waiting(memory_broker) == 1


def test_callable_key_sources_are_checked(memory_broker) -> None:
    def explode(args, kwargs):
        raise KeyError("tenant")

    @dramatiq.actor(broker=memory_broker, shard_key=explode)
    def broken(order): ...

    @dramatiq.actor(broker=memory_broker, shard_key=lambda args, kwargs: args[0])
    def passthrough(key): ...

    with pytest.raises(ShardKeyError, match="shard_key callable of actor 'broken' raised KeyError") as caught:
        broken.send({})
    assert isinstance(caught.value.__cause__, KeyError)
    with pytest.raises(ShardKeyTypeError, match="not dict"):
        passthrough.send({"a": 1})
    assert passthrough.send(None).options.get("shard_key") is None  # None from a callable: unkeyed
    assert passthrough.send(7).options["shard_key"] == "7"
    assert waiting(memory_broker) == 2


def test_an_argument_default_is_a_key(memory_broker) -> None:
    @dramatiq.actor(broker=memory_broker, shard_key="region")
    def sync(account, region="eu"): ...

    assert sync.send("a").options["shard_key"] == "eu"
    assert sync.send("a", "us").options["shard_key"] == "us"


def test_bad_configuration_is_refused(memory_url: str) -> None:
    with pytest.raises(sharded_broker.ConfigurationError, match="unknown"):
        ShardedBroker(url=memory_url, visibility_timout=3)
    with pytest.raises(sharded_broker.ConfigurationError, match="scheme"):
        ShardedBroker(url="amqp://localhost")
    with pytest.raises(sharded_broker.InvalidArgument, match="visibility_timeout"):
        ShardedBroker(url=memory_url, visibility_timeout=0)
    broker = ShardedBroker(url=memory_url)
    with pytest.raises(sharded_broker.InvalidArgument, match="queue name"):
        broker.declare_queue("no spaces")
    assert broker.get_declared_queues() == set()


def test_queues_hooks_and_encoding(memory_broker) -> None:
    events = []

    class Spy(Middleware):
        def after_declare_queue(self, broker, queue_name):
            events.append(("declare", queue_name))

        def after_declare_delay_queue(self, broker, queue_name):
            events.append(("declare delay queue", queue_name))

        def before_enqueue(self, broker, message, delay):
            events.append(("before_enqueue", message.message_id, delay))
            message.options["trace"] = "t-1"  # middleware may add options before encoding

        def after_enqueue(self, broker, message, delay):
            events.append(("after_enqueue", message.message_id, delay))

    memory_broker.add_middleware(Spy())

    @dramatiq.actor(broker=memory_broker, queue_name="mail", shard_key="to")
    def send_mail(to): ...

    message = send_mail.send_with_options(args=("bob",), delay=1500)
    assert memory_broker.get_declared_queues() == {"mail"}
    # Declared as Dramatiq's brokers do; the delay itself waits in the engine's "mail" queue.
    assert memory_broker.get_declared_delay_queues() == {"mail.DQ"}
    assert events == [
        ("declare", "mail"),
        ("declare delay queue", "mail.DQ"),
        ("before_enqueue", message.message_id, 1500),
        ("after_enqueue", message.message_id, 1500),
    ]
    assert memory_broker.engine.stats("mail").delayed == 1
    memory_broker.engine.purge("mail")
    send_mail.send("bob")
    [lease] = memory_broker.engine.lease("mail")
    stored = json.loads(lease.payload)  # dramatiq's JSON encoder, never pickle
    assert stored["options"] == {"shard_key": "bob", "trace": "t-1"}
    assert (lease.key, lease.headers["actor_name"]) == ("bob", "send_mail")


def test_a_delay_queue_message_with_an_eta_is_stored_as_a_delay(memory_broker) -> None:
    @dramatiq.actor(broker=memory_broker, shard_key="key")
    def job(key): ...

    legacy = job.message("k").copy(queue_name="default.DQ", options={"eta": 0})
    stored = memory_broker.enqueue(legacy)
    assert stored.queue_name == "default" and "eta" not in stored.options
    consumer = memory_broker.consume("default", timeout=1000)
    delivered = next(consumer)
    assert delivered.message_id == legacy.message_id and "eta" not in delivered.options
    consumer.ack(delivered)
    delay_consumer = memory_broker.consume("default.DQ", timeout=50)  # what a Worker starts
    assert next(delay_consumer) is None
    delay_consumer.close()


def test_undeclared_queues_and_join_timeouts(memory_broker) -> None:
    with pytest.raises(QueueNotFound):
        memory_broker.consume("nope")
    with pytest.raises(QueueNotFound):
        memory_broker.join("nope")

    @dramatiq.actor(broker=memory_broker, shard_key="key")
    def job(key): ...

    job.send("k")
    memory_broker.engine.pause("default", key="k")
    with pytest.raises(QueueJoinTimeout):
        memory_broker.join("default", timeout=200)
    memory_broker.flush("default")
    memory_broker.join("default", timeout=1000)


def test_undecodable_payloads_become_dead_letters(memory_broker) -> None:
    memory_broker.declare_queue("default")
    memory_broker.engine.enqueue("default", b"\xff not json", key="k")
    consumer = memory_broker.consume("default", timeout=100)
    assert next(consumer) is None
    [dead] = memory_broker.dead_messages
    assert dead.message is None and dead.shard_key == "k"
    assert memory_broker.dead_letters == []  # no message to give a proxy of
    assert dead.reason.startswith("undecodable message")


def test_an_undecodable_payload_that_cannot_be_dead_lettered_is_let_go(memory_broker, monkeypatch) -> None:
    memory_broker.declare_queue("default")
    memory_broker.engine.enqueue("default", b"\xff not json", key="bad")
    good = dramatiq.Message(queue_name="default", actor_name="a", args=(), kwargs={}, options={})
    memory_broker.enqueue(good)

    def unavailable(*args, **kwargs):
        raise sharded_broker.BackendUnavailable("backend down")

    monkeypatch.setattr(memory_broker.engine, "nack", unavailable)
    consumer = memory_broker.consume("default", prefetch=2, timeout=100)
    # The decodable message of the same batch is still delivered (and its lease kept alive);
    # the undecodable one is no longer held, so its lease expires and it comes back.
    delivered = next(consumer)
    assert delivered is not None and delivered.message_id == good.message_id
    held = [lease.key for lease in memory_broker._leases._held.values()]
    assert held == [None]


def test_repr_hides_the_password() -> None:
    broker = ShardedBroker.__new__(ShardedBroker)
    broker.url = "redis://user:secret@db:6379/0"
    assert "secret" not in repr(broker)


def test_class_based_and_async_actors_take_keys_from_their_arguments(memory_broker) -> None:
    class Invoice(dramatiq.GenericActor):
        class Meta:
            broker = memory_broker
            shard_key = "customer"

        def perform(self, customer, total): ...

    @dramatiq.actor(broker=memory_broker, shard_key="customer")
    async def remind(text, customer): ...

    assert Invoice.send("c-1", 10).options["shard_key"] == "c-1"
    assert remind.send("due", "c-2").options["shard_key"] == "c-2"
    with pytest.raises(ShardKeyError, match="no argument 'client'"):

        class Refund(dramatiq.GenericActor):
            class Meta:
                broker = memory_broker
                shard_key = "client"

            def perform(self, customer): ...


def test_a_consumer_says_where_it_consumes_and_warns_once_about_a_relative_sqlite_path(
    tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.chdir(tmp_path)
    broker = ShardedBroker(url="sqlite:///queue.db")
    try:
        broker.declare_queue("default")
        broker.declare_queue("other")
        with caplog.at_level("INFO", logger="dramatiq"):
            for queue in ("default", "other", "default"):  # a worker opens a consumer per queue
                broker.consume(queue, timeout=10).close()
    finally:
        broker.close()
    messages = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert messages == [
        ("INFO", f"Consuming from sqlite:///{tmp_path}/queue.db."),
        ("WARNING", f"broker URL sqlite:///queue.db is relative to the current directory: this process uses "
                    f"{tmp_path}/queue.db. A producer or worker started in another directory uses another file, "
                    f"so another queue; write sqlite:///{tmp_path}/queue.db (four slashes: an absolute path) "
                    f"to be sure."),
    ]
