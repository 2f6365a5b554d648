"""A user's Dramatiq app and its tests, as docs/testing.md shows them (written into a
throwaway project by test_pytest_plugin.py)."""

APP = '''
import os

import dramatiq

from sharded_broker.integrations.dramatiq import ShardedBroker
from sharded_broker.testing import KeyRecorder

# The app's broker; in tests, the sharded_dramatiq_broker fixture swaps in a fresh one.
dramatiq.set_broker(ShardedBroker(url=os.environ.get("BROKER_URL", "memory://")))
recorder = KeyRecorder()
attempts = {}


@dramatiq.actor(shard_key="account", max_retries=2, min_backoff=60_000, max_backoff=60_000)
def apply(account, seq, fail_once=False):
    with recorder.run(account, seq):
        attempts[account, seq] = attempts.get((account, seq), 0) + 1
        if fail_once and attempts[account, seq] == 1:
            raise ConnectionError(f"bank unreachable for {account}")


@dramatiq.actor(max_retries=0)
def charge(card):
    raise ValueError(f"card {card} declined")
'''

CONFTEST = '''
import pytest

import app


@pytest.fixture(autouse=True)
def fresh_app_state():
    app.recorder.clear()
    app.attempts.clear()
'''

TESTS = '''
import time

import dramatiq
import pytest

import app
from sharded_broker.integrations.pytest_plugin import assert_key_order
from sharded_broker.integrations.dramatiq import ShardedBroker
from sharded_broker.testing import KeyOrderError


def test_drain_answers_what_ran_per_key(sharded_dramatiq_broker, sharded_dramatiq_worker, sharded_drain):
    assert dramatiq.get_broker() is sharded_dramatiq_broker
    sent = [app.apply.send(account, seq) for seq in range(3) for account in ("alice", "bob")]
    ran = sharded_drain("default")
    assert ran["alice"] == [m for m in sent if m.args[0] == "alice"]
    assert [message.args for message in ran["bob"]] == [("bob", 0), ("bob", 1), ("bob", 2)]
    assert_key_order(app.recorder.runs)


def test_each_account_in_order(sharded_dramatiq_broker, sharded_dramatiq_worker, sharded_drain, sharded_clock):
    if sharded_clock is None:
        pytest.skip("redis:// keeps its own clock: a 60 s backoff takes 60 s")
    assert isinstance(dramatiq.get_broker(), ShardedBroker)
    for seq in range(5):
        for account in ("alice", "bob"):
            app.apply.send(account, seq, fail_once=(seq == 1))
    app.apply.send_with_options(args=("carol", 0), delay=3_600_000)  # an hour
    started = time.monotonic()
    ran = sharded_drain("default")
    # Retry backoffs (60 s) and the one-hour delay were moved to now.
    assert time.monotonic() - started < 20
    assert [message.args[1] for message in ran["alice"]] == [0, 1, 1, 2, 3, 4]  # the retry held the key
    assert [message.args[1] for message in ran["carol"]] == [0]
    order = assert_key_order(app.recorder.runs)
    assert order["alice"] == order["bob"] == [0, 1, 1, 2, 3, 4]


def test_a_failure_fails_the_join(sharded_dramatiq_broker, sharded_dramatiq_worker):
    message = app.charge.send("4242")
    with pytest.raises(ValueError, match="card 4242 declined"):
        sharded_dramatiq_broker.join(app.charge.queue_name, timeout=10_000)
    assert sharded_dramatiq_broker.dead_letters == [message]
    assert sharded_dramatiq_broker.dead_letters[0].args == ("4242",)


def test_the_engine_fixture(sharded_engine, sharded_clock):
    sharded_engine.enqueue("sms", b"later", key="u1", delay=600)
    assert sharded_engine.lease("sms") == []
    if sharded_clock is None:
        pytest.skip("redis:// keeps its own clock")
    sharded_clock.advance(601)
    [lease] = sharded_engine.lease("sms")
    assert lease.payload == b"later"


def test_assert_key_order_names_what_is_wrong():
    with pytest.raises(KeyOrderError, match="key 'a' ran out of order: seq 2 before 1"):
        assert_key_order([("a", 2, 0.0, 1.0), ("a", 1, 1.0, 2.0)])
    with pytest.raises(KeyOrderError, match="two runs of one key at once"):
        assert_key_order([("a", 1, 0.0, 2.0), ("a", 2, 1.0, 3.0)])
    assert assert_key_order([("a", 1, 0.0, 1.0), (None, 9, 0.0, 5.0), (None, 8, 1.0, 2.0)]) == {"a": [1], None: [9, 8]}
'''
