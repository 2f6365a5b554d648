"""cancel(message) and get(message) with ShardedBroker, and a real Worker, on every backend.

The messages are cancelled before the Worker starts: the cancelled ones never run, the
others of their key run in order. A message's Dramatiq message id is its engine ref, so a
broker other than the sender's (another process) finds it too.
"""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage

import sharded_broker
from sharded_broker.integrations.dramatiq import ShardedBroker, cancel, get


def test_cancelled_messages_never_run_and_their_key_moves_on(run_worker, broker: ShardedBroker, recorder) -> None:
    @dramatiq.actor(broker=broker, shard_key="account")
    def post(account: str, n: int) -> None:
        with recorder.running_key(account):
            recorder.add(account, n)

    sent = {(account, n): post.send(account, n) for n in range(5) for account in ("a", "b")}
    later = post.send_with_options(args=("a", 5), delay=200)
    info = get(sent[("a", 0)], broker=broker)
    assert (info.state, info.key, info.attempts) == ("waiting", "a", 0)
    assert get(later, broker=broker).state == "delayed"
    for victim in (("a", 0), ("a", 3), ("b", 4)):  # a head, one in the middle, a tail
        result = cancel(sent[victim], broker=broker)
        assert result and result.state == "waiting" and result.key == victim[0]
    assert cancel(later.message_id, broker=broker).state == "delayed"  # by Dramatiq message id too
    assert get(sent[("a", 0)], broker=broker) is None
    assert not cancel(sent[("a", 0)], broker=broker)  # already gone

    with run_worker(broker, threads=4):
        broker.join(post.queue_name, timeout=20_000)

    assert recorder.by_key() == {"a": [1, 2, 4], "b": [0, 1, 2, 3]}
    assert recorder.overlaps == []
    assert broker.engine.stats(post.queue_name).keys == 0


def test_a_running_message_is_refused(run_worker, broker: ShardedBroker, recorder) -> None:
    broker.add_middleware(CurrentMessage())
    answers = []

    @dramatiq.actor(broker=broker, shard_key="account")
    def step(account: str, n: int) -> None:
        current = CurrentMessage.get_current_message()
        answers.append((cancel(current, broker=broker).state, get(current, broker=broker).state))
        recorder.add(account, n)

    first = step.send("a", 0)
    with run_worker(broker, threads=1):
        broker.join(step.queue_name, timeout=20_000)
    assert answers == [("leased", "leased")]
    assert recorder.by_key() == {"a": [0]}
    assert get(first, broker=broker) is None  # done: not kept


def test_the_global_broker_is_the_default_and_must_be_sharded(broker: ShardedBroker) -> None:
    @dramatiq.actor(broker=broker)
    def job() -> None: ...

    message = job.send()
    previous = dramatiq.get_broker()
    dramatiq.set_broker(broker)
    try:
        assert cancel(message).cancelled
    finally:
        dramatiq.set_broker(previous)
    with pytest.raises(sharded_broker.ConfigurationError, match="need a ShardedBroker, not StubBroker"):
        cancel(message, broker=StubBroker())
    assert get("not-a-message-of-ours", broker=broker) is None
    unknown = cancel("not-a-message-of-ours", broker=broker)
    assert (unknown.cancelled, unknown.state, unknown.ref) == (False, None, "not-a-message-of-ours")
    with pytest.raises(sharded_broker.InvalidArgumentType, match="Dramatiq message or message id"):
        cancel(42, broker=broker)


def test_a_broker_that_did_not_send_the_messages_cancels_them(run_worker, make_broker, recorder) -> None:
    sender, other = make_broker(), make_broker()  # two processes' brokers on one store

    def declare(broker: ShardedBroker) -> dramatiq.Actor:
        @dramatiq.actor(broker=broker, shard_key="account", actor_name="post", queue_name="posts")
        def post(account: str, n: int) -> None:
            with recorder.running_key(account):
                recorder.add(account, n)

        return post

    declare(sender)
    post = declare(other)
    sent = [sender.enqueue(post.message("a", n)) for n in range(4)]
    later = sender.enqueue(post.message("a", 4), delay=200_000)
    ids = [message.message_id for message in sent]
    assert get(ids[1], broker=other).state == "waiting"  # by id alone: the declared queues searched
    assert cancel(ids[1], broker=other).cancelled
    assert cancel(sent[2], broker=other).cancelled  # the message as sent: its own queue
    assert cancel(later.message_id, broker=other).state == "delayed"
    assert get(ids[2], broker=other) is None and get(later, broker=sender) is None

    with run_worker(other, threads=2):
        other.join("posts", timeout=20_000)
    assert recorder.by_key() == {"a": [0, 3]}
    assert other.engine.stats("posts").keys == 0
