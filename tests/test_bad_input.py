"""Bad input gets a clear error naming what was wrong, and changes nothing already queued.

Every refused call is checked three ways: the exception type, a message that names the
problem, and a queue left exactly as it was (same stats, same next delivery).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest

import sharded_broker
from sharded_broker import (
    Broker,
    ConfigurationError,
    InvalidArgument,
    InvalidArgumentType,
    Lease,
    Message,
    ShardedBrokerError,
)
from support.backends import FakeClock

Q = "q"


@pytest.fixture
def queued(broker: Broker, clock: FakeClock) -> Broker:
    """A broker whose queue holds a1, a2 (key a), b1 (key b), one delayed and one dead letter."""
    broker.enqueue(Q, b"doomed", key="z")
    [doomed] = broker.lease(Q)
    broker.nack(doomed, dead=True, reason="test")
    clock.advance(0.001)
    for key, payload in [("a", b"a1"), ("a", b"a2"), ("b", b"b1")]:
        broker.enqueue(Q, payload, key=key)
        clock.advance(0.001)
    broker.enqueue(Q, b"later", key="c", delay=60)
    return broker


def snapshot(broker: Broker) -> dict[str, Any]:
    stats = broker.stats(Q).as_dict()
    return {**stats, "dead_letters": [d.payload for d in broker.dead_letters(Q)], "queues": broker.queues()}


def assert_still_delivers_a1_b1(broker: Broker) -> None:
    """What the ``queued`` fixture queued is still there, in order (consumes it)."""
    leases = broker.lease(Q, 10)
    assert [lease.payload for lease in leases] == [b"a1", b"b1"]
    assert all(broker.ack_many(leases))


def refused(
    broker: Broker, call: Callable[[], Any], error: type[Exception], *words: str
) -> None:
    """``call`` raises ``error`` whose message contains every one of ``words``, and the
    queue's stats, dead letters and queue list are exactly as they were."""
    before = snapshot(broker)
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, ShardedBrokerError)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert snapshot(broker) == before


# -- URLs and connect options (no backend is touched) ------------------------------------------


@pytest.mark.parametrize(
    "url, words",
    [
        ("mysql://localhost/db", ["unknown URL scheme", "'mysql'", "memory", "redis", "sqlite"]),
        ("localhost:6379", ["malformed broker URL", "scheme://"]),
        ("amqp://guest@localhost//", ["unknown URL scheme", "'amqp'"]),
        ("redis//localhost", ["malformed broker URL", "scheme://"]),
        ("", ["malformed broker URL"]),
        ("redis://[::1", ["malformed broker URL"]),
    ],
)
def test_bad_urls(url: str, words: list[str]) -> None:
    with pytest.raises(ConfigurationError) as info:
        sharded_broker.connect(url)
    for word in words:
        assert word in str(info.value)


def test_url_must_be_a_string() -> None:
    with pytest.raises(ConfigurationError, match="must be a str, not bytes"):
        sharded_broker.connect(b"memory://")


def test_password_is_not_leaked_in_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        sharded_broker.connect("redis//user:hunter2@localhost")
    assert "hunter2" not in str(info.value)
    # A "#" or "?" in the password ends the host part for a URL parser: still hidden.
    for url in ("redis://:hunter2#x@127.0.0.1:", "redis://:hunter2?x@127.0.0.1:1/0"):
        with pytest.raises(ConfigurationError) as info:
            sharded_broker.connect(url)
        assert "hunter2" not in str(info.value), str(info.value)


def test_unknown_connect_option(broker_url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        sharded_broker.connect(broker_url, visibilty_timeout=5)
    assert "visibilty_timeout" in str(info.value)


def test_a_clock_that_cannot_be_called_is_refused(broker_url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        sharded_broker.connect(broker_url, clock="12:00")
    assert "clock" in str(info.value)


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"max_deliveries": 0}, InvalidArgument, ["max_deliveries", "0"]),
        ({"key_concurrency": "2"}, InvalidArgumentType, ["key_concurrency", "str"]),
        ({"interval": -1}, InvalidArgument, ["interval", ">= 0"]),
        ({"visibility_timeout": 0}, InvalidArgument, ["visibility_timeout", "> 0"]),
        ({"dedup_window": math.nan}, InvalidArgument, ["dedup_window"]),
        ({"retry_position": "middle"}, ConfigurationError, ["retry_position", "'middle'"]),
        ({"unique_while_pending": "yes"}, ConfigurationError, ["unique_while_pending"]),
        ({"queues": {"q": {"colour": "red"}}}, ConfigurationError, ["colour"]),
        ({"queues": {"bad name": {}}}, InvalidArgument, ["queue name", "'bad name'"]),
        ({"queues": ["q"]}, ConfigurationError, ["queues"]),
        ({"max_payload_size": 0}, InvalidArgument, ["max_payload_size"]),
    ],
)
def test_bad_settings(broker_url: str, clock: FakeClock, options: dict, error: type[Exception], words: list[str]) -> None:
    with pytest.raises(error) as info:
        sharded_broker.connect(broker_url, clock=clock, **options).close()
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_configure_queue_changes_nothing(queued: Broker) -> None:
    refused(queued, lambda: queued.configure_queue(Q, max_deliveries=-1), InvalidArgument, "max_deliveries")
    assert queued.settings(Q).max_deliveries == 5
    assert_still_delivers_a1_b1(queued)


# -- queue names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, error, words",
    [
        ("", InvalidArgument, ["queue name", "empty"]),
        ("x" * 201, InvalidArgument, ["queue name", "201", "200"]),
        ("{q}", InvalidArgument, ["queue name", "'{q}'"]),
        ("a}b", InvalidArgument, ["queue name"]),
        ("my queue", InvalidArgument, ["queue name", "'my queue'"]),
        ("tab\tq", InvalidArgument, ["queue name"]),
        ("nul\x00q", InvalidArgument, ["queue name"]),
        ("ünïcode", InvalidArgument, ["queue name"]),
        (None, InvalidArgumentType, ["queue name", "NoneType"]),
        (b"q", InvalidArgumentType, ["queue name", "bytes"]),
    ],
)
def test_bad_queue_names(queued: Broker, name: Any, error: type[Exception], words: list[str]) -> None:
    refused(queued, lambda: queued.enqueue(name, b"x", key="a"), error, *words)
    refused(queued, lambda: queued.lease(name), error, *words)
    refused(queued, lambda: queued.stats(name), error, *words)
    refused(queued, lambda: queued.purge(name), error, *words)
    refused(queued, lambda: queued.pause(name), error, *words)
    refused(queued, lambda: queued.bind("exchange", name), error, *words)
    assert_still_delivers_a1_b1(queued)


def test_longest_queue_name_is_accepted(broker: Broker) -> None:
    name = "q" * 200
    broker.enqueue(name, b"x", key="a")
    assert [lease.payload for lease in broker.lease(name)] == [b"x"]


# -- shard keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, error, words",
    [
        (42, InvalidArgumentType, ["shard key", "int"]),
        (b"a", InvalidArgumentType, ["shard key", "bytes"]),
        (("a",), InvalidArgumentType, ["shard key", "tuple"]),
        ("", InvalidArgument, ["shard key", "empty"]),
        ("k" * 513, InvalidArgument, ["shard key", "513", "512"]),
        ("a\x00b", InvalidArgument, ["shard key", "control character"]),
        ("line\nbreak", InvalidArgument, ["shard key", "control character"]),
        ("del\x7f", InvalidArgument, ["shard key", "control character"]),
    ],
)
def test_bad_keys(queued: Broker, key: Any, error: type[Exception], words: list[str]) -> None:
    refused(queued, lambda: queued.enqueue(Q, b"x", key=key), error, *words)
    refused(queued, lambda: queued.set_interval(Q, key, 1.0), error, *words)
    refused(queued, lambda: queued.pause(Q, key=key), error, *words)
    assert_still_delivers_a1_b1(queued)


def test_keys_with_spaces_braces_and_unicode_are_fine(broker: Broker) -> None:
    keys = ["user 1", "{tenant}", "ключ-🔑", "k" * 512, "a:b/c"]
    for key in keys:
        broker.enqueue(Q, key.encode(), key=key)
    assert sorted(lease.key for lease in broker.lease(Q, 10)) == sorted(keys)


def test_set_interval_needs_a_key(queued: Broker) -> None:
    refused(queued, lambda: queued.set_interval(Q, None, 1.0), InvalidArgument, "shard key")
    assert_still_delivers_a1_b1(queued)


def test_why_and_the_key_scans_refuse_bad_arguments(queued: Broker) -> None:
    refused(queued, lambda: queued.why(Q, None), InvalidArgument, "why needs a shard key")
    refused(queued, lambda: queued.why("bad queue", "a"), InvalidArgument, "queue name")
    refused(queued, lambda: queued.stuck_keys(Q, older_than=-1), InvalidArgument, "older_than")
    refused(queued, lambda: queued.stuck_keys(Q, older_than="1"), InvalidArgumentType, "older_than")
    refused(queued, lambda: queued.stuck_keys(Q, limit=0), InvalidArgument, "limit")
    refused(queued, lambda: queued.lagging_keys(Q, scan_limit=10**9), InvalidArgument, "scan_limit")
    refused(queued, lambda: queued.release_lease(Q, "", "token", key=None), InvalidArgumentType, "message id")
    refused(queued, lambda: queued.release_lease(Q, "id", None, key=None), InvalidArgumentType, "lease token")
    assert_still_delivers_a1_b1(queued)


# -- payloads, priorities, delays, headers, dedup ids ----------------------------------------------


@pytest.mark.parametrize(
    "payload, error, words",
    [
        ("text", InvalidArgumentType, ["payload", "bytes", "str"]),
        (None, InvalidArgumentType, ["payload", "NoneType"]),
        (123, InvalidArgumentType, ["payload", "int"]),
    ],
)
def test_payload_must_be_bytes(queued: Broker, payload: Any, error: type[Exception], words: list[str]) -> None:
    refused(queued, lambda: queued.enqueue(Q, payload, key="a"), error, *words)
    assert_still_delivers_a1_b1(queued)


def test_payload_over_the_maximum_size(connect) -> None:
    broker = connect(max_payload_size=1024)
    broker.enqueue(Q, b"a1", key="a")
    broker.enqueue(Q, b"b1", key="b")
    broker.enqueue(Q, b"x" * 1024, key="big")  # exactly the maximum is accepted
    before = snapshot(broker)
    with pytest.raises(InvalidArgument) as info:
        broker.enqueue(Q, b"x" * 1025, key="a")
    assert "1025" in str(info.value) and "1024" in str(info.value) and "max_payload_size" in str(info.value)
    assert snapshot(broker) == before
    assert sorted(lease.payload for lease in broker.lease(Q, 10)) == [b"a1", b"b1", b"x" * 1024]


def test_bytearray_and_memoryview_payloads_are_accepted(broker: Broker) -> None:
    broker.enqueue(Q, bytearray(b"ba"))
    broker.enqueue(Q, memoryview(b"mv"))
    assert [lease.payload for lease in broker.lease(Q, 10)] == [b"ba", b"mv"]


@pytest.mark.parametrize(
    "priority, error, words",
    [
        (2**31, InvalidArgument, ["priority", "out of range"]),
        (-(2**31) - 1, InvalidArgument, ["priority", "out of range"]),
        (True, InvalidArgumentType, ["priority", "bool"]),
        (1.5, InvalidArgumentType, ["priority", "float"]),
        ("1", InvalidArgumentType, ["priority", "str"]),
    ],
)
def test_bad_priorities(queued: Broker, priority: Any, error: type[Exception], words: list[str]) -> None:
    refused(queued, lambda: queued.enqueue(Q, b"x", key="a", priority=priority), error, *words)
    assert_still_delivers_a1_b1(queued)


def test_extreme_priorities_are_accepted(broker: Broker) -> None:
    broker.enqueue(Q, b"low", key="a", priority=2**31 - 1)
    broker.enqueue(Q, b"high", key="a", priority=-(2**31))
    assert [lease.payload for lease in broker.lease(Q)] == [b"high"]


@pytest.mark.parametrize(
    "delay, error, words",
    [
        (-1, InvalidArgument, ["delay", ">= 0", "-1"]),
        (math.nan, InvalidArgument, ["delay"]),
        (math.inf, InvalidArgument, ["delay", "maximum"]),
        ("5", InvalidArgumentType, ["delay", "str"]),
        (True, InvalidArgumentType, ["delay", "bool"]),
    ],
)
def test_bad_delays(queued: Broker, delay: Any, error: type[Exception], words: list[str]) -> None:
    refused(queued, lambda: queued.enqueue(Q, b"x", key="a", delay=delay), error, *words)
    assert_still_delivers_a1_b1(queued)


@pytest.mark.parametrize(
    "headers, error, words",
    [
        (["a"], InvalidArgumentType, ["headers", "mapping", "list"]),
        ({1: "a"}, InvalidArgumentType, ["header names", "int"]),
        ({"a": object()}, InvalidArgumentType, ["headers", "JSON"]),
        ({"a": "x" * 70_000}, InvalidArgument, ["headers", "maximum"]),
    ],
)
def test_bad_headers(queued: Broker, headers: Any, error: type[Exception], words: list[str]) -> None:
    refused(queued, lambda: queued.enqueue(Q, b"x", key="a", headers=headers), error, *words)
    assert_still_delivers_a1_b1(queued)


@pytest.mark.parametrize(
    "dedup_id, error, words",
    [
        (7, InvalidArgumentType, ["dedup_id", "int"]),
        ("", InvalidArgument, ["dedup_id"]),
        ("d" * 513, InvalidArgument, ["dedup_id", "512"]),
    ],
)
def test_bad_dedup_ids(queued: Broker, dedup_id: Any, error: type[Exception], words: list[str]) -> None:
    refused(queued, lambda: queued.enqueue(Q, b"x", key="a", dedup_id=dedup_id), error, *words)
    assert_still_delivers_a1_b1(queued)


def test_one_bad_message_refuses_the_whole_batch(queued: Broker) -> None:
    batch = [Message(b"ok", key="a"), Message(b"also ok", key="b"), Message("bad", key="c")]
    refused(queued, lambda: queued.enqueue_many(Q, batch), InvalidArgumentType, "payload")
    refused(queued, lambda: queued.enqueue_many(Q, [Message(b"ok"), b"raw"]), InvalidArgumentType, "Message", "bytes")
    assert_still_delivers_a1_b1(queued)


# -- lease, ack, nack, extend ------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda b: b.lease(Q, 0), InvalidArgument, ["limit", "0"]),
        (lambda b: b.lease(Q, -3), InvalidArgument, ["limit"]),
        (lambda b: b.lease(Q, 10_001), InvalidArgument, ["limit", "10000"]),
        (lambda b: b.lease(Q, "5"), InvalidArgumentType, ["limit", "str"]),
        (lambda b: b.lease(Q, True), InvalidArgumentType, ["limit", "bool"]),
        (lambda b: b.lease(Q, per_key=0), InvalidArgument, ["per_key"]),
        (lambda b: b.lease(Q, visibility_timeout=0), InvalidArgument, ["visibility_timeout", "> 0"]),
        (lambda b: b.lease(Q, visibility_timeout=-5), InvalidArgument, ["visibility_timeout"]),
        (lambda b: b.lease(Q, wait=-1), InvalidArgument, ["wait", ">= 0"]),
        (lambda b: b.lease(Q, wait=math.nan), InvalidArgument, ["wait"]),
        (lambda b: b.dead_letters(Q, limit=0), InvalidArgument, ["limit"]),
        (lambda b: b.dead_letters(Q, offset=-1), InvalidArgument, ["offset"]),
        (lambda b: b.replay(Q, position="middle"), InvalidArgument, ["position", "'middle'"]),
        (lambda b: b.replay(Q, "some-id"), InvalidArgumentType, ["ids"]),
        (lambda b: b.replay(Q, [1, 2]), InvalidArgumentType, ["ids"]),
        (lambda b: b.replay(Q, 42), InvalidArgumentType, ["ids", "int"]),
        (lambda b: b.set_interval(Q, "a", -1), InvalidArgument, ["interval", ">= 0"]),
        (lambda b: b.set_interval(Q, "a", "1"), InvalidArgumentType, ["interval", "str"]),
        (lambda b: b.set_weight(Q, "a", 0), InvalidArgument, ["weight", "between 1 and 1000", "0"]),
        (lambda b: b.set_weight(Q, "a", -2), InvalidArgument, ["weight", "-2"]),
        (lambda b: b.set_weight(Q, "a", 1001), InvalidArgument, ["weight", "1000", "1001"]),
        (lambda b: b.set_weight(Q, "a", 1.5), InvalidArgumentType, ["weight", "int", "float"]),
        (lambda b: b.set_weight(Q, "a", "2"), InvalidArgumentType, ["weight", "str"]),
        (lambda b: b.set_weight(Q, "a", True), InvalidArgumentType, ["weight", "bool"]),
        (lambda b: b.set_weight(Q, None, 2), InvalidArgument, ["set_weight needs a shard key"]),
        (lambda b: b.set_weight(Q, "", 2), InvalidArgument, ["shard key", "empty"]),
    ],
)
def test_bad_arguments(queued: Broker, call: Callable[[Broker], Any], error: type[Exception], words: list[str]) -> None:
    refused(queued, lambda: call(queued), error, *words)
    assert_still_delivers_a1_b1(queued)


def test_bad_settle_arguments(queued: Broker, clock: FakeClock) -> None:
    [lease] = queued.lease(Q)  # a1, held through the checks
    assert lease.payload == b"a1"
    checks: list[tuple[Callable[[], Any], type[Exception], tuple[str, ...]]] = [
        (lambda: queued.ack("not a lease"), InvalidArgumentType, ("Lease", "str")),
        (lambda: queued.ack_many([lease, None]), InvalidArgumentType, ("Lease", "NoneType")),
        (lambda: queued.nack({"id": lease.id}), InvalidArgumentType, ("Lease", "dict")),
        (lambda: queued.nack(lease, delay=-1), InvalidArgument, ("delay", ">= 0")),
        (lambda: queued.nack(lease, reason=42), InvalidArgumentType, ("reason", "int")),
        (lambda: queued.extend(lease, 0), InvalidArgument, ("visibility_timeout", "> 0")),
        (lambda: queued.extend(lease, -1), InvalidArgument, ("visibility_timeout",)),
        (lambda: queued.extend(lease.id, 10), InvalidArgumentType, ("Lease", "str")),
        (lambda: queued.extend_many([lease], 0), InvalidArgument, ("visibility_timeout", "> 0")),
        (lambda: queued.extend_many([lease, "x"]), InvalidArgumentType, ("Lease", "str")),
        (lambda: queued.release("not a lease"), InvalidArgumentType, ("Lease", "str")),
        (lambda: queued.release_many([lease, None]), InvalidArgumentType, ("Lease", "NoneType")),
    ]
    before = snapshot(queued)
    for call, error, words in checks:
        with pytest.raises(error) as info:
            call()
        for word in words:
            assert word in str(info.value), str(info.value)
        assert snapshot(queued) == before
    # The lease is untouched: still current, and its key still held.
    assert [x.payload for x in queued.lease(Q, 10)] == [b"b1"]
    assert queued.ack(lease)
    assert [x.payload for x in queued.lease(Q, 10)] == [b"a2"]


def test_a_lease_of_another_queue_is_refused_not_misapplied(connect, clock: FakeClock) -> None:
    broker = connect()
    broker.enqueue("one", b"x", key="a")
    broker.enqueue("two", b"y", key="a")
    [lease] = broker.lease("one")
    forged = Lease(**{**lease.__dict__, "queue": "two"})
    assert broker.ack(forged) is False
    assert broker.stats("two").ready == 1
    assert broker.ack(lease) is True


def test_url_problems_are_invalid_url_and_a_relative_sqlite_path_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("localhost:6379", "mysql://localhost/db", "redis://localhost:6379/0?socket_timeout=soon", "sqlite://"):
        with pytest.raises(sharded_broker.InvalidURL):
            sharded_broker.connect(url)
    with pytest.raises(sharded_broker.InvalidURL) as info:
        sharded_broker.connect("sqlite:///var/lib/app/queue.db")
    assert str(info.value) == (
        f"sqlite database {tmp_path}/var/lib/app/queue.db: directory {tmp_path}/var/lib/app does not exist "
        f"(sqlite:///var/lib/app/queue.db is relative to the current directory {tmp_path}; an absolute path "
        "takes four slashes: sqlite:////var/lib/app/queue.db names /var/lib/app/queue.db)"
    )
    with pytest.raises(sharded_broker.InvalidURL) as absolute:
        sharded_broker.connect(f"sqlite:///{tmp_path}/missing/queue.db")
    assert "relative" not in str(absolute.value)
    # An option problem is not a URL problem.
    with pytest.raises(ConfigurationError) as option:
        sharded_broker.connect("sqlite:///queue.db", busy_timeout=-1)
    assert not isinstance(option.value, sharded_broker.InvalidURL)
    assert sharded_broker.display_url("sqlite:///queue.db") == f"sqlite:///{tmp_path}/queue.db"
    assert sharded_broker.display_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
