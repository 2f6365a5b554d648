"""Bad input through both adapters, property-based: whatever shard key, arguments, delay,
priority and headers an app sends, the message is either stored under the key it names, or the
send raises a clear error and nothing is stored."""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterator

import dramatiq
import pytest
from celery import Celery
from hypothesis import HealthCheck, event, given, settings, strategies as st
from kombu.exceptions import EncodeError

import sharded_broker
from sharded_broker.integrations.dramatiq import ShardedBroker

pytestmark = pytest.mark.reliability

LUA_AND_TAGS = "{}[]()%$'\"\\\0\n\t-- ;:.*+?^#\u00e9\U0001f600"
hostile_text = (
    st.text(alphabet=st.sampled_from(LUA_AND_TAGS), max_size=10) | st.text(max_size=20)
    | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
    | st.text(alphabet="k{}", min_size=510, max_size=515)
)
anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=6), hostile_text,
    st.lists(st.integers(), max_size=2), st.builds(object),
)
no_controls = st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\x7f")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
valid_keys = (
    st.text(no_controls, min_size=1, max_size=40) | st.text(alphabet=st.sampled_from("{}[]%$'\"\\-- ;:.*+?^#"), min_size=1, max_size=10)
    | st.integers(-(2**63), 2**63)
)
ABSENT = "<absent>"
_stores = itertools.count()


def draw_arguments(data: st.DataObject, valid: dict[str, Any], hostile_argument: str | None) -> dict[str, Any]:
    """Valid values for every argument but ``hostile_argument``, which may be anything."""
    return {
        name: data.draw(st.one_of(strategy, anything, hostile_text) if name == hostile_argument else strategy, label=name)
        for name, strategy in valid.items()
    }


def expected_key(args: dict[str, Any]) -> str | None:
    """The key a send names: the per-call option, else the task's ``user`` argument (the
    Celery adapter sends a message whose key argument is None unkeyed; Dramatiq refuses it)."""
    source = args["user"] if args["option"] in (ABSENT, None) else args["option"]
    return None if source is None else str(source)


PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# -- Dramatiq ---------------------------------------------------------------------------


@pytest.fixture
def dramatiq_app() -> Iterator[tuple[ShardedBroker, dramatiq.Actor, sharded_broker.Broker]]:
    url = f"memory://adapter-props-{next(_stores)}"
    broker = ShardedBroker(url=url)

    @dramatiq.actor(broker=broker, shard_key="user", queue_name="props")
    def notify(user: Any, text: Any) -> None:
        pass

    with sharded_broker.connect(url) as engine:
        yield broker, notify, engine
    broker.close()


DRAMATIQ_VALID = {
    "user": valid_keys, "text": json_values, "option": st.sampled_from([ABSENT, None]) | valid_keys,
    "delay": st.none() | st.integers(0, 10**6),
}


@PROPERTY
@given(data=st.data(), hostile_argument=st.sampled_from([None, *DRAMATIQ_VALID]))
def test_dramatiq_sends_exactly_or_refuses_clearly(dramatiq_app: Any, data: st.DataObject, hostile_argument: str | None) -> None:
    broker, notify, engine = dramatiq_app
    args = draw_arguments(data, DRAMATIQ_VALID, hostile_argument)
    options = {} if args["option"] == ABSENT else {"shard_key": args["option"]}
    try:
        notify.send_with_options(args=(args["user"], args["text"]), delay=args["delay"], **options)
    except (sharded_broker.InvalidArgument, sharded_broker.InvalidArgumentType, TypeError, ValueError) as refused:
        event(f"refused {hostile_argument}")
        assert hostile_argument is not None, f"a valid send was refused: {refused!r}"
        assert str(refused)
        stats = engine.stats("props")
        assert (stats.ready, stats.delayed) == (0, 0), "a refused send stored something"
        return
    event("accepted")
    stats = engine.stats("props")
    assert stats.ready + stats.delayed == 1
    if stats.ready:
        [lease] = engine.lease("props")
        assert lease.key == expected_key(args)
        assert json.loads(lease.payload)["args"][0] == args["user"]
        engine.ack(lease)
    engine.purge("props")


# -- Celery -----------------------------------------------------------------------------


@pytest.fixture
def celery_app() -> Iterator[tuple[Celery, Any, sharded_broker.Broker]]:
    url = f"memory://adapter-props-{next(_stores)}"
    app = Celery("props", broker=f"sharded+{url}")

    @app.task(shard_key="user", name="props.notify")
    def notify(user: Any, text: Any) -> None:
        pass

    with sharded_broker.connect(url) as engine:
        yield app, notify, engine
    app.close()


CELERY_VALID = {
    "user": valid_keys, "text": json_values, "option": st.sampled_from([ABSENT, None]) | valid_keys,
    "priority": st.none() | st.integers(0, 9), "countdown": st.none() | st.floats(0, 1000),
    "headers": st.none() | st.dictionaries(st.text("abcxyz_-", min_size=1, max_size=6), json_values, max_size=3),
}


@PROPERTY
@given(data=st.data(), hostile_argument=st.sampled_from([None, *CELERY_VALID]))
def test_celery_sends_exactly_or_refuses_clearly(celery_app: Any, data: st.DataObject, hostile_argument: str | None) -> None:
    app, notify, engine = celery_app
    args = draw_arguments(data, CELERY_VALID, hostile_argument)
    options = {} if args["option"] == ABSENT else {"shard_key": args["option"]}
    try:
        notify.apply_async(
            args=(args["user"], args["text"]), priority=args["priority"], countdown=args["countdown"],
            headers=args["headers"], **options
        )
    except (sharded_broker.InvalidArgument, sharded_broker.InvalidArgumentType, EncodeError, TypeError, ValueError, OverflowError) as refused:
        event(f"refused {hostile_argument}")
        assert hostile_argument is not None, f"a valid send was refused: {refused!r}"
        assert str(refused)
        stats = engine.stats("celery")
        assert (stats.ready, stats.delayed) == (0, 0), "a refused send stored something"
        return
    event("accepted")
    stats = engine.stats("celery")
    assert stats.ready + stats.delayed == 1
    if stats.ready:
        [lease] = engine.lease("celery")
        assert lease.key == expected_key(args)
        assert json.loads(lease.payload)["headers"]["task"] == "props.notify"
        engine.ack(lease)
    engine.purge("celery")
