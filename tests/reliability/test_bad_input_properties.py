"""Bad input, property-based: whatever a caller passes to the engine API, a call either
does exactly what it says (the message comes back intact) or raises a clear error naming
the argument, and nothing already queued changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import sharded_broker
from sharded_broker import ConfigurationError, InvalidArgument, InvalidArgumentType, Message
from support.backends import FakeClock

pytestmark = pytest.mark.reliability

MAX_PAYLOAD = 64 * 1024
CANARY = "canary"
LUA_AND_TAGS = "{}[]()%$'\"\\\0\n\r\t-- ;:.*+?^ #\u00e9\u2603\U0001f600"

lone_surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
hostile_text = (
    st.text(alphabet=st.sampled_from(LUA_AND_TAGS), max_size=12) | st.text(max_size=30)
    | st.tuples(st.text(max_size=3), lone_surrogates).map("".join)
)
anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=8), hostile_text,
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
queue_names = st.one_of(
    st.sampled_from(["jobs", "q.1", "a:b@c+d-e_f"]), hostile_text, st.text(min_size=190, max_size=210, alphabet="ab"), anything,
)
keys = st.one_of(st.none(), hostile_text, st.text(min_size=500, max_size=520, alphabet="k{}"), anything)
payloads = st.one_of(
    st.binary(max_size=64),
    st.integers(MAX_PAYLOAD - 2, MAX_PAYLOAD + 2).map(lambda n: b"\xff" * n),
    st.binary(max_size=8).map(bytearray),
    anything,
)
priorities = st.one_of(st.integers(-(2**31) - 2, -(2**31) + 2), st.integers(2**31 - 3, 2**31 + 1), st.integers(-5, 5), anything)
delays = st.one_of(st.floats(), st.integers(-3, 3), st.just(10 * 365 * 24 * 3600.0 + 1), anything)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=8,
)
headers = st.one_of(st.none(), st.dictionaries(hostile_text, json_values, max_size=4), anything)
dedup_ids = st.one_of(st.none(), hostile_text, st.text(min_size=510, max_size=515, alphabet="d"), anything)

# Values the engine must accept, as awkward as they come.
no_controls = st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\x7f")
valid = {
    "queue": st.sampled_from(["jobs", "q.1", "a:b@c+d-e_f"]) | st.text(alphabet="az09_.:@+-", min_size=1, max_size=200),
    "key": st.none() | st.text(alphabet=st.sampled_from(LUA_AND_TAGS.translate({0: None, 10: None, 13: None, 9: None})), min_size=1, max_size=12)
    | st.text(no_controls, min_size=1, max_size=40)
    | st.just("k{}" * 170 + "ab"),
    "payload": st.binary(max_size=64) | st.sampled_from([b"", b"\x00" * MAX_PAYLOAD]) | st.binary(max_size=8).map(bytearray),
    "priority": st.integers(-(2**31), 2**31 - 1) | st.integers(-5, 5),
    "delay": st.floats(0, 100) | st.integers(0, 5) | st.just(10 * 365 * 24 * 3600.0),
    "headers": st.none() | st.dictionaries(st.text(no_controls, max_size=6) | hostile_text, json_values, max_size=4),
    "dedup_id": st.none() | st.text(no_controls, min_size=1, max_size=30) | st.just("d" * 512),
}
# Anything at all, for the one argument an example makes hostile.
hostile = {
    "queue": queue_names, "key": keys, "payload": payloads, "priority": priorities, "delay": delays,
    "headers": headers, "dedup_id": dedup_ids,
}
# Words an error about each argument must contain.
ARGUMENT_WORDS = {
    "queue": "queue name", "key": "shard key", "payload": "payload", "priority": "priority",
    "delay": "delay", "headers": "header", "dedup_id": "dedup_id",
}


@pytest.fixture(params=["memory", "sqlite", "redis"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = {"memory": f"memory://properties-{id(request)}", "sqlite": f"sqlite:///{tmp_path}/q.db"}.get(request.param)
    url = url or request.getfixturevalue("redis_url")
    clock = FakeClock()
    broker = sharded_broker.connect(url, clock=clock, max_payload_size=MAX_PAYLOAD)
    # Something already queued, and held, that no refused call may change.
    broker.enqueue_many(CANARY, [Message(b"held", key="{k}"), Message(b"waiting", key="{k}"), Message(b"later", delay=60)])
    [held] = broker.lease(CANARY, visibility_timeout=10**6)
    yield broker, clock, held
    broker.close()


def snapshot(broker: sharded_broker.Broker) -> tuple[Any, ...]:
    return broker.queues(), broker.stats(CANARY).as_dict() | {"oldest_age": None}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), hostile_argument=st.sampled_from([None, *hostile]))
def test_enqueue_accepts_exactly_or_refuses_clearly_changing_nothing(engine: Any, data: st.DataObject, hostile_argument: str | None) -> None:
    """Every argument is valid but one (or none), drawn from anything at all."""
    broker, clock, held = engine
    args = {name: data.draw(hostile[name] if name == hostile_argument else strategy, label=name) for name, strategy in valid.items()}
    before = snapshot(broker)
    clock.advance(1000.0)  # past every earlier dedup window
    try:
        mid = broker.enqueue(
            args["queue"], args["payload"], key=args["key"], priority=args["priority"], delay=args["delay"],
            headers=args["headers"], dedup_id=args["dedup_id"],
        )
    except (InvalidArgument, InvalidArgumentType) as refused:
        event(f"refused {hostile_argument}")
        assert hostile_argument is not None, f"a valid message was refused: {refused}"
        assert ARGUMENT_WORDS[hostile_argument] in str(refused), str(refused)
        assert snapshot(broker) == before
        return
    event("accepted")
    clock.advance(float(args["delay"]) + 1.0)
    leases = broker.lease(args["queue"], 10_000, per_key=10_000)
    mine = [lease for lease in leases if lease.id == mid]
    assert len(mine) == 1, (mid, leases)
    [lease] = mine
    assert (lease.payload, lease.key, lease.priority) == (bytes(args["payload"]), args["key"], args["priority"])
    assert lease.dedup_id == args["dedup_id"]
    assert lease.headers == json.loads(json.dumps(args["headers"] or {}))
    assert all(broker.ack_many(leases))
    assert broker.stats(CANARY).leased == 1 and broker.extend(held) is True


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    call=st.sampled_from(
        ["lease", "nack", "extend", "set_interval", "set_weight", "pause", "dead_letters", "replay", "purge", "ack"]
    ),
    first=anything | hostile_text, second=anything,
)
def test_other_calls_refuse_bad_arguments_without_changing_anything(engine: Any, call: str, first: Any, second: Any) -> None:
    broker, clock, held = engine
    calls = {
        "lease": lambda: broker.lease(CANARY, first, per_key=1, visibility_timeout=second if second else None),
        "nack": lambda: broker.nack(first, delay=second),
        "extend": lambda: broker.extend(held, second) if second is not None else broker.extend(first),
        "set_interval": lambda: broker.set_interval(CANARY, first, second),
        "set_weight": lambda: broker.set_weight(CANARY, first, second),
        "pause": lambda: broker.pause(first, key=second),
        "dead_letters": lambda: broker.dead_letters(CANARY, first, second),
        "replay": lambda: broker.replay(CANARY, first, position=second),
        "purge": lambda: broker.purge(first, dead=second),
        "ack": lambda: broker.ack(first),
    }
    before = snapshot(broker)
    try:
        calls[call]()
    except (InvalidArgument, InvalidArgumentType) as refused:
        assert str(refused), "an error must say what was wrong"
        assert snapshot(broker) == before
        return
    # Accepted: undo what a valid pause, interval or weight did, so later examples start alike.
    if call == "pause":
        broker.resume(first, key=second)
    elif call == "set_interval":
        broker.set_interval(CANARY, first, None)
    elif call == "set_weight":
        broker.set_weight(CANARY, first, None)


# Passwords as users write them in URLs (the characters that end a userinfo excluded).
PASSWORDS = st.text(alphabet=st.characters(blacklist_characters="/?#@:[]", blacklist_categories=("Cs", "Cc")), min_size=6, max_size=12)
URLS = st.one_of(
    st.text(max_size=40),
    st.builds(lambda scheme, rest: f"{scheme}://{rest}", st.sampled_from(["redis", "rediss", "sqlite", "memory", "http", "REDIS", ""]), hostile_text),
    st.builds(lambda user, pw, port, db: f"redis://{user}:{pw}@127.0.0.1:{port}/{db}",
              st.text(alphabet="abc{}%", max_size=4), PASSWORDS,
              st.one_of(st.integers(-5, 70000).map(str), hostile_text), st.one_of(st.integers(-2, 20).map(str), hostile_text)),
    anything,
)


@settings(max_examples=200, deadline=None)
@given(url=URLS)
def test_malformed_and_hostile_urls_are_refused_clearly(url: Any) -> None:
    """connect() either opens a broker or raises ConfigurationError; a password never shows
    in the error. (Nothing listens on the ports drawn, so no call is made.)"""
    password = None
    if isinstance(url, str) and url.startswith("redis://") and "@127.0.0.1:" in url:
        password = url[len("redis://"):].partition("@127.0.0.1:")[0].partition(":")[2]
        # Short passwords, or ones repeated elsewhere in the URL, also show up by chance.
        password = password if len(password) >= 6 and url.count(password) == 1 else None
    try:
        broker = sharded_broker.connect(url, socket_connect_timeout=0.2) if isinstance(url, str) and url.startswith(("redis", "rediss")) else sharded_broker.connect(url)
    except ConfigurationError as refused:
        text = str(refused)
        assert text
        if password:
            assert password not in text, text
        return
    except (InvalidArgument, InvalidArgumentType) as refused:
        assert str(refused)
        return
    if password:
        # As it would appear in a URL (a password like "Broker" is part of the repr's words).
        assert f":{password}@" not in repr(broker), repr(broker)
    broker.close()


def test_lone_surrogates_are_refused_on_every_backend(engine: Any) -> None:
    """Python strings may hold lone surrogates, UTF-8 cannot: refused by name, up front
    (SQLite could not store them; it used to fail with UnicodeEncodeError)."""
    broker, _, held = engine
    before = snapshot(broker)
    refusals = {
        "shard key": lambda: broker.enqueue(CANARY, b"x", key="user-\ud800"),
        "dedup_id": lambda: broker.enqueue(CANARY, b"x", dedup_id="\udfff"),
        "message id": lambda: broker.replay(CANARY, ["\ud800"]),
    }
    for words, call in refusals.items():
        with pytest.raises(InvalidArgument, match=f"{words} .*lone surrogate"):
            call()
        assert snapshot(broker) == before
    with pytest.raises(InvalidArgument, match="shard key .*lone surrogate"):
        broker.set_interval(CANARY, "\ud800", 1.0)
    # A dead-letter reason is free text (often an exception's message): escaped, not refused.
    assert broker.nack(held, dead=True, reason="bad \ud83d") is True
    assert [d.reason for d in broker.dead_letters(CANARY)] == ["bad \\ud83d"]
