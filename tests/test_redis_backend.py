"""What is specific to the Redis backend: script hygiene, round trips, waiting, the
server's clock, authentication and TLS, prefixes, and shard keys that look like syntax.

The semantics every backend shares are in test_conformance.py and test_model.py.
"""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
import redis.backoff
import redis.retry

import sharded_broker
from sharded_broker import BackendUnavailable, ConfigurationError, Message
from sharded_broker.backends.redis import QUEUE_KEYS, RedisBackend
from support.redis_server import RedisServer, free_port

LUA_DIR = Path(sharded_broker.__file__).parent / "backends" / "lua"
Q = "jobs"

# Commands whose first argument is not a key.
_KEYLESS_COMMANDS = {"TIME"}


@pytest.fixture
def broker(redis_url: str) -> Iterator[sharded_broker.Broker]:
    with sharded_broker.connect(redis_url) as broker:
        yield broker


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per top-level command name, from INFO commandstats (the INFO call included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


def calls_between(before: dict[str, int], after: dict[str, int], *names: str) -> int:
    return sum(after.get(name, 0) - before.get(name, 0) for name in names)


class SendCounter:
    """Counts requests written to Redis by this process (one per round trip)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(connection, command, check_health=True):  # type: ignore[no-untyped-def]
            self.count += 1
            return original(connection, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)


# -- the scripts ----------------------------------------------------------------------


def lua_files() -> list[Path]:
    return sorted(LUA_DIR.glob("*.lua"))


def test_there_is_one_script_per_operation() -> None:
    names = {path.stem for path in lua_files()}
    assert names >= {
        "enqueue", "lease", "ack", "nack", "release", "extend", "set_interval", "set_paused", "stats",
        "dead_letters", "dead_order", "replay", "purge", "bind", "unbind",
    }


@pytest.mark.parametrize("path", lua_files(), ids=lambda p: p.name)
def test_every_redis_call_names_a_key_passed_in_KEYS(path: Path) -> None:
    """No key name is built inside a function: each command's key is K[<NAME>], one of the
    keys the function was called with."""
    source = path.read_text()
    calls = re.findall(r"redis\.p?call\(\s*'([A-Z]+)'\s*(?:,\s*([^,)]+))?", source)
    assert calls or path.name == "_common.lua" or "K[" not in source
    for command, first_argument in calls:
        if command in _KEYLESS_COMMANDS:
            continue
        assert re.fullmatch(r"K\[(?:[A-Z]+|1|index)\]", first_argument.strip()), (
            f"{path.name}: {command} on {first_argument!r}, not a key the function was given"
        )
    # The constants naming the keys follow the order RedisBackend passes them in.
    if path.name == "_common.lua":
        names, numbers = re.search(r"^local (MSGS, [A-Z0-9, \n]+) = ([\d, \n]+)$", source, re.M).groups()
        names = [name.strip() for name in names.split(",")]
        assert names == [name.upper() for name in QUEUE_KEYS]
        assert [int(n) for n in numbers.split(",")] == list(range(1, len(QUEUE_KEYS) + 1))
    assert "SCAN" not in source and "'KEYS'" not in source


def test_every_key_written_belongs_to_its_queue_hash_tag(broker: sharded_broker.Broker, admin: redis.Redis) -> None:
    broker.configure_queue(Q, interval=0.5)
    broker.enqueue_many(Q, [Message(b"1", key="a", dedup_id="x"), Message(b"2", delay=60), Message(b"3")])
    broker.set_interval(Q, "a", 2.0)
    broker.pause(Q, key="b")
    leases = broker.lease(Q, limit=2)
    broker.nack(leases[0], dead=True)
    broker.bind("fanout", Q)
    allowed_queue_keys = {f"sb:{{{Q}}}:{name}" for name in (*QUEUE_KEYS, "partitions")}
    keys = {key.decode() for key in admin.scan_iter()}
    assert keys - allowed_queue_keys == {"sb:queues", "sb:bindings:{fanout}"}
    assert admin.get(f"sb:{{{Q}}}:partitions") == b"1"  # one server's default
    assert len(keys & allowed_queue_keys) >= 10


def test_scripts_are_loaded_once_and_reloaded_after_a_script_flush(
    broker: sharded_broker.Broker, admin: redis.Redis
) -> None:
    broker.enqueue(Q, b"1", key="a")
    before = command_calls(admin)
    for i in range(5):
        broker.enqueue(Q, b"x", key=f"k{i}")
    assert calls_between(before, command_calls(admin), "script|load", "eval") == 0
    admin.script_flush()
    other = broker.enqueue("other", b"3")  # a new queue: registered in the same round trip
    broker.enqueue(Q, b"2", key="a")
    assert broker.queues() == ["jobs", "other"]
    leases = broker.lease(Q, 10) + broker.lease("other")
    admin.script_flush()
    assert broker.ack_many(leases) == [True] * len(leases)  # several queues: the pipelined path
    assert other in [lease.id for lease in leases]


# -- compact metrics, chunked purge and replay ------------------------------------------


def queue_key(name: str) -> str:
    return f"sb:{{{Q}}}:{name}"


def test_each_key_minute_counter_is_one_field_of_the_spans_hash(
    broker: sharded_broker.Broker, admin: redis.Redis
) -> None:
    broker.configure_queue(Q, max_deliveries=2)
    broker.enqueue_many(Q, [Message(b"x", key=f"k{i}") for i in range(10)] + [Message(b"u")])
    leases = broker.lease(Q, 100)
    broker.ack_many(leases[:5])
    for lease in leases[5:]:
        broker.nack(lease)
    # One field per counter used this minute, for the queue (enqueued, delivered, acked,
    # retried) in the metrics hash, and for each key (enqueued and delivered, then acked or
    # retried) in the hash of the current span, counted with HINCRBY: no expiry entries
    # (a span's hash is dropped whole when its slot comes round again).
    minute = int(broker.metrics(Q, 1)[0].minute)
    assert admin.hlen(queue_key("metrics")) == 4 + 1  # and the field keeping it a hashtable
    key_fields = {
        f"{minute}:{c}:k{i}".encode() for i in range(10) for c in ("e", "d", "a" if i < 5 else "r")
    }
    [slot] = [name for name in ("kmetrics0", "kmetrics1", "kmetrics2") if admin.exists(queue_key(name))]
    assert set(admin.hkeys(queue_key(slot))) == key_fields | {b"#encoding"}
    assert [(r.enqueued, r.delivered, r.acked, r.retried) for r in broker.metrics(Q, 1)] == [(11, 11, 5, 6)]
    assert [(r.enqueued, r.delivered, r.acked, r.retried) for r in broker.metrics(Q, 1, key="k7")] == [(1, 1, 0, 1)]


def test_purge_of_many_messages_is_chunked_and_consistent_between_chunks(
    broker: sharded_broker.Broker, admin: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ready keys sort by name, so the first chunk (1,000) takes all of k0 and k1.
    broker.enqueue_many(Q, [Message(f"{i}".encode(), key=f"k{i % 5}") for i in range(2_500)])
    backend = broker.backend
    send = backend._send
    between_chunks = []

    def observed_send(request):  # type: ignore[no-untyped-def]
        answer = send(request)
        if getattr(request, "function", None) == "purge":
            # Another client, served while the purge is under way, sees a consistent queue.
            with sharded_broker.connect(redis_url) as other:
                backlogs = {key: other.key_info(Q, key).backlog for key in ("k0", "k1", "k2")}
                if not between_chunks:  # enqueued while the purge runs: beyond its count
                    other.enqueue_many(Q, [Message(b"late", key="late")] * 10)
            ready_keys = sorted(m[16:].decode() for m in admin.zrange(queue_key("keyq"), 0, -1))
            between_chunks.append((backlogs, ready_keys))
        return answer

    broker.purge("elsewhere")  # loads the scripts used below, so every call counted runs
    broker.key_info(Q, "k0")
    monkeypatch.setattr(backend, "_send", observed_send)
    before = command_calls(admin)
    assert broker.purge(Q) == 2_500
    # 3 chunks; between them 3 key_info calls each and one enqueue_many.
    assert calls_between(before, command_calls(admin), "fcall") == 3 + 3 * 3 + 1
    assert between_chunks[0] == ({"k0": 0, "k1": 0, "k2": 500}, ["k2", "k3", "k4", "late"])
    assert between_chunks[-1] == ({"k0": 0, "k1": 0, "k2": 0}, ["late"])
    # It deleted as many as the queue held when it started: here, exactly those.
    assert broker.stats(Q).ready == 10 and [info.key for info in broker.keys(Q)] == ["late"]


def test_replay_of_many_dead_letters_is_chunked(redis_url: str, admin: redis.Redis) -> None:
    from support.backends import FakeClock

    clock = FakeClock()
    with sharded_broker.connect(redis_url, clock=clock) as broker:
        broker.configure_queue(Q, max_deliveries=1)
        broker.enqueue_many(Q, [Message(f"{i}".encode()) for i in range(2_500)])
        broker.lease(Q, 2_500, visibility_timeout=1)
        clock.advance(2)
        while broker.stats(Q).dead < 2_500:
            broker.lease(Q)
        broker.replay("elsewhere", [f"x{i}" for i in range(1_001)])  # loads the scripts counted below
        broker.replay("elsewhere")
        before = command_calls(admin)
        assert broker.replay(Q) == 2_500
        # Three chunks: where each goes (dead_order), then the replay itself.
        assert calls_between(before, command_calls(admin), "fcall") == 6
        assert [lease.payload for lease in broker.lease(Q, 10_000)] == [f"{i}".encode() for i in range(2_500)]


# -- round trips and waiting ----------------------------------------------------------


def test_batch_operations_cost_one_round_trip(
    broker: sharded_broker.Broker, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends = SendCounter(monkeypatch)
    broker.enqueue(Q, b"warm-up")  # connects and loads the script
    sends.count = 0
    broker.enqueue("fresh", b"1")
    # A queue's first enqueue reads (or stores) its partition count, then enqueues and
    # registers the queue in one round trip.
    assert sends.count == 2
    warm_up = broker.lease(Q)
    broker.extend_many(warm_up)  # loads each script once
    broker.release_many(warm_up)
    broker.ack_many(broker.lease(Q))
    messages = [Message(f"{i}".encode(), key=f"k{i % 7}") for i in range(100)]

    before = command_calls(admin)
    sends.count = 0
    ids = broker.enqueue_many(Q, messages)
    round_trips = sends.count
    after = command_calls(admin)
    assert len(set(ids)) == 100
    assert (round_trips, calls_between(before, after, "fcall")) == (1, 1)

    sends.count = 0
    leases = broker.lease(Q, limit=50, per_key=10)
    round_trips = sends.count
    after_lease = command_calls(admin)
    assert len(leases) == 50
    assert (round_trips, calls_between(after, after_lease, "fcall")) == (1, 1)

    sends.count = 0
    assert broker.extend_many(leases, 60) == [True] * 50
    round_trips = sends.count
    after_extend = command_calls(admin)
    assert (round_trips, calls_between(after_lease, after_extend, "fcall")) == (1, 1)

    sends.count = 0
    assert broker.release_many(leases[10:]) == [True] * 40
    round_trips = sends.count
    after_release = command_calls(admin)
    assert (round_trips, calls_between(after_extend, after_release, "fcall")) == (1, 1)

    sends.count = 0
    assert broker.ack_many(leases[:10]) == [True] * 10
    round_trips = sends.count
    assert (round_trips, calls_between(after_release, command_calls(admin), "fcall")) == (1, 1)


def test_extend_and_release_over_several_queues_cost_one_round_trip(
    broker: sharded_broker.Broker, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for queue in ("q1", "q2", "q3"):
        broker.enqueue_many(queue, [Message(b"1", key="a"), Message(b"2", key="b")])
    warm_up = broker.lease("q1")
    broker.extend_many(warm_up)  # loads the scripts
    broker.release_many(warm_up)
    leases = [lease for queue in ("q1", "q2", "q3") for lease in broker.lease(queue, 10)]
    assert len(leases) == 6
    sends = SendCounter(monkeypatch)
    before = command_calls(admin)
    sends.count = 0
    assert broker.extend_many(leases, 60) == [True] * 6
    assert sends.count == 1  # one pipelined round trip, one script call per queue
    after_extend = command_calls(admin)
    assert calls_between(before, after_extend, "fcall") == 3
    sends.count = 0  # not counting the INFO above
    assert broker.release_many(leases) == [True] * 6
    assert sends.count == 1
    assert calls_between(after_extend, command_calls(admin), "fcall") == 3
    assert [broker.stats(queue).ready for queue in ("q1", "q2", "q3")] == [2, 2, 2]


def test_idle_waiting_does_not_poll(broker: sharded_broker.Broker, admin: redis.Redis) -> None:
    broker.enqueue(Q, b"warm-up")
    broker.ack_many(broker.lease(Q))
    admin.delete(f"sb:{{{Q}}}:signal")  # no wake-up tokens left from the warm-up
    before = command_calls(admin)
    assert broker.lease(Q, wait=1.0) == []
    calls = calls_between(before, command_calls(admin), "fcall", "blpop", "time")
    # lease, block, lease (+ perhaps one more short block and lease), each function call
    # reading TIME; and the one look a second at the queue's schedules (schedule_due, TIME).
    assert calls <= 7


def test_a_waiting_consumer_is_woken_by_an_enqueue(broker: sharded_broker.Broker, admin: redis.Redis) -> None:
    broker.enqueue(Q, b"warm-up")
    broker.ack_many(broker.lease(Q))
    admin.delete(f"sb:{{{Q}}}:signal")
    producer = threading.Timer(0.3, broker.enqueue, (Q, b"late"), {"key": "a"})
    before = command_calls(admin)
    producer.start()
    leases = broker.lease(Q, wait=10.0)
    producer.join()
    assert [lease.payload for lease in leases] == [b"late"]
    # Woken by the token, not by polling: a handful of calls, not one per few milliseconds.
    assert calls_between(before, command_calls(admin), "fcall", "blpop") <= 6


def test_a_blocked_waiter_does_not_hold_up_other_threads(broker: sharded_broker.Broker) -> None:
    waiter = threading.Thread(target=broker.backend.wait, args=("idle", 1.0))
    waiter.start()
    try:
        broker.enqueue(Q, b"1", key="a")
        assert [lease.payload for lease in broker.lease(Q)] == [b"1"]
        assert waiter.is_alive()  # the enqueue and lease above did not wait for it
    finally:
        waiter.join()


# -- the server's clock ---------------------------------------------------------------


def test_times_come_from_the_server_not_the_client(
    broker: sharded_broker.Broker, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    skew = 86_400.0
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    broker.enqueue(Q, b"late", key="a", delay=30.0)
    broker.enqueue(Q, b"now", key="b")
    seconds, micros = admin.time()
    server_now = seconds + micros / 1e6
    [lease] = broker.lease(Q, visibility_timeout=60.0)
    assert lease.payload == b"now"  # the delay counts from the server's time, not the skewed one
    assert abs(lease.enqueued_at - server_now) < skew / 2
    assert abs(lease.deadline - (server_now + 60.0)) < skew / 2
    assert abs(broker.now() - server_now) < skew / 2


def test_a_clock_hook_replaces_the_server_clock(redis_url: str) -> None:
    now = [1_700_000_000.25]
    with sharded_broker.connect(redis_url, clock=lambda: now[0]) as broker:
        broker.enqueue(Q, b"1", key="a", delay=10.0)
        assert broker.lease(Q) == []
        now[0] += 10.0
        [lease] = broker.lease(Q, visibility_timeout=5.0)
        assert (lease.enqueued_at, lease.deadline) == (1_700_000_000.25, 1_700_000_015.25)


# -- keys that look like syntax, prefixes ----------------------------------------------

ODD_KEYS = ["a", "a{", "{a}", "}{", "a'b", 'a"b', "[a", "(a", "a\\", "%s%d", "a..b", "é", "a b", "a]"]


def test_shard_keys_with_braces_quotes_and_lua_syntax_keep_their_own_order(broker: sharded_broker.Broker) -> None:
    messages = [Message(f"{key}|{i}".encode(), key=key) for i in range(3) for key in ODD_KEYS]
    broker.enqueue_many(Q, messages)
    delivered: dict[str, list[int]] = {}
    while leases := broker.lease(Q, limit=len(ODD_KEYS)):
        keys = [lease.key for lease in leases]
        assert len(keys) == len(set(keys))  # one in flight per key
        for lease in leases:
            key, _, index = lease.payload.decode().rpartition("|")
            assert key == lease.key
            delivered.setdefault(key, []).append(int(index))
        assert all(broker.ack_many(leases))
    assert delivered == {key: [0, 1, 2] for key in ODD_KEYS}
    broker.set_interval(Q, "{a}", 5.0)
    broker.pause(Q, key="a{")
    broker.enqueue_many(Q, [Message(b"1", key="a{"), Message(b"2", key="{a}"), Message(b"3", key="{a}")])
    assert [lease.payload for lease in broker.lease(Q, limit=5)] == [b"2"]
    assert broker.stats(Q).keys == 2


def test_prefixes_are_isolated(redis_url: str) -> None:
    with sharded_broker.connect(redis_url, prefix="one") as one, sharded_broker.connect(redis_url, prefix="two") as two:
        one.enqueue(Q, b"1", key="a")
        one.bind("ex", Q)
        assert two.lease(Q) == []
        assert two.stats(Q).ready == 0 and one.stats(Q).ready == 1
        assert (one.queues(), two.queues()) == ([Q], [])
        assert (one.bound_queues("ex"), two.bound_queues("ex")) == ([Q], [])
        two.purge(Q)
        assert [lease.payload for lease in one.lease(Q)] == [b"1"]


# -- URLs, options, authentication, TLS, failures ---------------------------------------


def test_unknown_options_are_refused_by_name(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="socket_timout"):
        sharded_broker.connect(redis_url, socket_timout=1.0)
    with pytest.raises(ConfigurationError, match="decode_responses"):
        sharded_broker.connect(redis_url, decode_responses=True)
    with pytest.raises(ConfigurationError, match="ssl_ca_certs.*rediss://"):
        sharded_broker.connect(redis_url, ssl_ca_certs="/nowhere")
    with pytest.raises(ConfigurationError, match="bogus"):
        sharded_broker.connect(redis_url + "?bogus=1")
    with pytest.raises(ConfigurationError, match="prefix"):
        sharded_broker.connect(redis_url, prefix="a{b}")


def test_connection_options_pass_through(redis_url: str) -> None:
    url = redis_url + "?socket_timeout=0.5&health_check_interval=10"
    with sharded_broker.connect(url, socket_connect_timeout=2.0, retry_on_timeout=True, client_name="sb-test") as broker:
        broker.enqueue(Q, b"1")
        # A wait longer than socket_timeout: blocking calls use a longer read timeout.
        broker.backend.wait("idle", 0.8)
        client = broker.backend._client
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"], kwargs["client_name"]) == (0.5, 2.0, "sb-test")


def test_password_in_the_url(tmp_path: Path) -> None:
    with RedisServer(["--requirepass", "s3cret-pw"]) as server:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        with sharded_broker.connect(url) as broker:
            broker.enqueue(Q, b"1")
            assert len(broker.lease(Q)) == 1
            assert "s3cret-pw" not in repr(broker)
        wrong = sharded_broker.connect(f"redis://:wrong-pw@127.0.0.1:{server.port}/0")
        with pytest.raises(BackendUnavailable) as refused:
            wrong.enqueue(Q, b"1")
        assert "wrong-pw" not in str(refused.value) and "***" in str(refused.value)
        wrong.close()


def test_acl_user_in_the_url() -> None:
    acl = ["--user", "default", "off", "--user", "worker", "on", ">w0rker-pw", "~*", "&*", "+@all"]
    with RedisServer(acl) as server:
        with sharded_broker.connect(f"redis://worker:w0rker-pw@127.0.0.1:{server.port}/0") as broker:
            broker.enqueue(Q, b"1", key="a")
            assert [lease.payload for lease in broker.lease(Q)] == [b"1"]
            assert broker.queues() == [Q]
        with pytest.raises(BackendUnavailable):
            sharded_broker.connect(f"redis://worker:nope@127.0.0.1:{server.port}/0").stats(Q)


def test_an_unreachable_server_is_backend_unavailable_with_the_password_redacted() -> None:
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0"
    broker = sharded_broker.connect(url, socket_connect_timeout=1.0)
    with pytest.raises(BackendUnavailable) as unavailable:
        broker.enqueue(Q, b"1")
    assert "hunter2" not in str(unavailable.value)
    assert "127.0.0.1" in str(unavailable.value)
    assert "hunter2" not in repr(broker)


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_rediss_url_speaks_tls(tmp_path: Path) -> None:
    cert, key = _self_signed_certificate(tmp_path)
    tls_port = free_port()
    server = RedisServer([
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", "tls-pw",
    ])
    with server:
        url = f"rediss://:tls-pw@127.0.0.1:{tls_port}/0"
        with sharded_broker.connect(url, ssl_ca_certs=str(cert)) as broker:
            broker.enqueue(Q, b"secret", key="a")
            assert [lease.payload for lease in broker.lease(Q)] == [b"secret"]
        with sharded_broker.connect(url + "?ssl_cert_reqs=none") as broker:
            assert broker.stats(Q).leased == 1
        # Plain text to the TLS port fails cleanly.
        with pytest.raises(BackendUnavailable):
            sharded_broker.connect(f"redis://:tls-pw@127.0.0.1:{tls_port}/0", socket_timeout=2.0).stats(Q)


def test_backend_class_serves_both_schemes() -> None:
    assert sharded_broker.broker.backend_class("redis://h") is RedisBackend
    assert sharded_broker.broker.backend_class("rediss://h") is RedisBackend


def test_queues_survive_a_server_crash_with_append_only_persistence() -> None:
    """kill -9 of redis-server with AOF on: nothing is lost, scripts are loaded again, an
    unacked lease comes back after its deadline and the stale ack is refused."""
    now = [1_700_000_000.0]
    server = RedisServer(["--appendonly", "yes", "--appendfsync", "always"])
    with server, sharded_broker.connect(server.url, clock=lambda: now[0]) as broker:
        broker.enqueue_many(Q, [Message(b"1", key="a"), Message(b"2", key="a"), Message(b"3", delay=60)])
        [lease] = broker.lease(Q, visibility_timeout=30.0)
        server.kill()
        server.start()
        assert broker.stats(Q).as_dict() | {"oldest_age": 0} == {
            "queue": Q, "ready": 1, "leased": 1, "delayed": 1, "dead": 0, "keys": 1, "oldest_age": 0, "paused": False,
        }
        now[0] += 31.0
        [again] = broker.lease(Q)
        assert (again.payload, again.attempts) == (b"1", 2)
        assert broker.ack(lease) is False
        assert broker.ack(again) is True


def test_a_server_out_of_memory_refuses_cleanly_and_keeps_what_is_queued() -> None:
    with RedisServer(["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]) as server:
        broker = sharded_broker.connect(server.url)
        try:
            broker.enqueue("q", b"first", key="a")
            filler = redis.Redis.from_url(server.url)
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                for i in range(10_000):
                    filler.set(f"filler:{i}", b"x" * 4096)
            # Filled to within one filler value of the limit: a 64 KiB message is over it.
            with pytest.raises(BackendUnavailable, match="maxmemory"):
                broker.enqueue("q", b"x" * 65536, key="a")
            filler.close()
            assert broker.stats("q").ready == 1
            [lease] = broker.lease("q")
            assert lease.payload == b"first"
        finally:
            broker.close()


def test_a_server_without_functions_is_refused_with_the_version_needed() -> None:
    # A Redis 7 with FCALL and FUNCTION renamed away answers them as an older server does:
    # "unknown command".
    with RedisServer(["--rename-command", "FCALL", "", "--rename-command", "FUNCTION", ""]) as server:
        with sharded_broker.connect(server.url) as broker:
            with pytest.raises(ConfigurationError, match=r"needs Redis 7\.0 or newer"):
                broker.enqueue("q", b"x", key="a")
            with pytest.raises(ConfigurationError, match=r"needs Redis 7\.0 or newer"):
                broker.lease("q")


def test_the_state_and_metrics_hashes_are_hashtables_from_their_first_message(
    broker: sharded_broker.Broker, admin: redis.Redis
) -> None:
    # A small hash would be a listpack, where every lookup scans it: with a few hundred
    # keys, each HGET of a key's state would read hundreds of entries.
    broker.enqueue(Q, b"x", key="k")
    slots = [name for name in ("kmetrics0", "kmetrics1", "kmetrics2") if admin.exists(queue_key(name))]
    for name in ("state", "metrics", *slots):
        assert admin.object("encoding", queue_key(name)) == b"hashtable", name
    assert len(slots) == 1


def test_an_enqueue_sent_again_after_its_reply_was_lost_stores_nothing_twice(
    broker: sharded_broker.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py resends a command when the connection drops before its reply came back,
    though the server may have run it: the enqueue function sees its own first id stored
    and changes nothing."""
    broker.enqueue("q", b"first")  # the queue is registered: later enqueues are one FCALL each
    broker.ack(broker.lease("q")[0])
    backend = broker.backend
    send_once = backend._fcall

    sent = 0  # FCALLs that reached the server

    def sent_twice(command: bytes) -> object:
        nonlocal sent
        sent += 2
        send_once(command)
        return send_once(command)  # the retry, with the same arguments (the same ids)

    monkeypatch.setattr(backend, "_fcall", sent_twice)
    ids = broker.enqueue_many("q", [Message(b"a", key="k"), Message(b"b", key="k"), Message(b"c")])
    assert sent == 2
    monkeypatch.undo()
    assert broker.stats("q").ready == 3
    delivered = []
    while leases := broker.lease("q", limit=10, per_key=10):
        delivered += [lease.id for lease in leases]
        assert broker.ack_many(leases) == [True] * len(leases)
    assert sorted(delivered) == sorted(ids) and broker.stats("q").ready == 0


def test_a_kept_connection_the_server_closed_is_replaced_before_the_next_call(
    redis_url: str, admin: redis.Redis
) -> None:
    """The backend keeps its connection between FCALLs and checks it before each, as
    redis-py's pool checks what it lends: a connection the server closed meanwhile (its
    ``timeout``, a ``CLIENT KILL``) is replaced, not written to, so no retry is needed."""
    no_retries = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
    with sharded_broker.connect(redis_url, retry=no_retries, client_name="sb-kept") as broker:
        broker.enqueue(Q, b"1")  # registers the queue (a pipeline)
        broker.enqueue(Q, b"2")  # an FCALL: its connection is kept
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        time.sleep(0.05)  # the server's FIN reaches the client's socket
        broker.enqueue(Q, b"3")
        assert broker.stats(Q).ready == 3


def test_kept_connections_go_back_to_the_pool_for_plain_commands(redis_url: str) -> None:
    """A kept FCALL connection stays lent in redis-py's pool, so a plain command (here
    SMEMBERS of the queue registry) would find a pool of one connection exhausted: it goes
    back first."""
    with sharded_broker.connect(redis_url, max_connections=1) as broker:
        for _ in range(2):
            broker.enqueue(Q, b"1")
            assert broker.queues() == [Q]
        assert broker.stats(Q).ready == 2


def _enqueue_ids_in_child(broker: sharded_broker.Broker, answers: "multiprocessing.Queue[list[str]]") -> None:
    answers.put([broker.enqueue(Q, b"from the child") for _ in range(3)])


def test_a_forked_child_makes_message_ids_of_its_own(redis_url: str) -> None:
    """A child forked from a process that enqueued (a Celery prefork pool's) must not make
    its parent's next ids: an enqueue whose id is already stored is taken for a resent
    call and stores nothing, so the parent's next messages would be lost."""
    fork = multiprocessing.get_context("fork")
    with sharded_broker.connect(redis_url) as broker:
        first = broker.enqueue(Q, b"from the parent")
        answers: multiprocessing.Queue[list[str]] = fork.Queue()
        children = [fork.Process(target=_enqueue_ids_in_child, args=(broker, answers)) for _ in range(2)]
        for child in children:
            child.start()
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        from_children = answers.get(timeout=5) + answers.get(timeout=5)
        from_parent = [broker.enqueue(Q, b"from the parent") for _ in range(3)]
        assert len({first, *from_children, *from_parent}) == 10
        assert broker.stats(Q).ready == 10


def _enqueue_in_child(broker: sharded_broker.Broker, redis_url: str, answers: "multiprocessing.Queue[int]") -> None:
    broker.enqueue(Q, b"from the child")
    client = redis.Redis.from_url(redis_url)
    answers.put(sum(1 for c in client.client_list() if c["name"] == "sb-fork"))
    client.close()


def test_a_forked_child_does_not_use_the_connection_its_parent_kept(redis_url: str) -> None:
    """After a fork the kept connection is the parent's socket: the child opens its own
    (two processes writing one socket would read each other's replies)."""
    fork = multiprocessing.get_context("fork")
    with sharded_broker.connect(redis_url, client_name="sb-fork") as broker:
        broker.enqueue(Q, b"from the parent")  # registers the queue (a pipeline)
        broker.enqueue(Q, b"from the parent")  # an FCALL: the parent keeps its connection
        answers: multiprocessing.Queue[int] = fork.Queue()
        child = fork.Process(target=_enqueue_in_child, args=(broker, redis_url, answers))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert answers.get(timeout=5) == 2  # the parent's kept connection and the child's own
        broker.enqueue(Q, b"from the parent again")
        assert broker.stats(Q).ready == 4


def test_weights_cost_nothing_in_a_queue_without_one(broker: sharded_broker.Broker, admin: redis.Redis) -> None:
    """Lease and ack read a key's weight only in a queue where some key has one (the
    queue's #nw count): a plain queue runs exactly the commands it ran before weights."""

    def cycle_commands(queue: str) -> dict[str, int]:
        broker.enqueue_many(queue, [Message(b"m", key=f"k{i}") for i in range(3)])
        before = command_calls(admin)
        for _ in range(3):
            assert broker.ack_many(broker.lease(queue)) == [True]
        after = command_calls(admin)
        return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}

    broker.set_weight("weighted", "elsewhere", 2)  # a weighted key that is never served
    cycle_commands("warm-up")  # loads the library, so both cycles below run the same way
    plain = cycle_commands("plain")
    weighted = cycle_commands("weighted")
    plain.pop("info"), weighted.pop("info")
    # One HGET of the served key's weight per delivery, and nothing else, where a weight exists.
    assert {name: weighted[name] - plain.get(name, 0) for name in weighted if weighted[name] != plain.get(name)} == {
        "hget": 3
    }


def test_refs_cost_nothing_for_messages_without_one(broker: sharded_broker.Broker, admin: redis.Redis) -> None:
    """Only a message with a ref touches the r:<ref> fields: one HGET and one HSET when it
    is enqueued, one HGET and one HDEL when it is acked; a plain one runs exactly the
    commands it ran before refs."""

    def cycle_commands(queue: str, refs: bool) -> dict[str, int]:
        before = command_calls(admin)
        broker.enqueue_many(queue, [Message(b"m", key=f"k{i}", ref=f"r{i}" if refs else None) for i in range(3)])
        for _ in range(3):
            assert broker.ack_many(broker.lease(queue)) == [True]
        after = command_calls(admin)
        return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}

    cycle_commands("warm-up", True)
    plain, with_refs = cycle_commands("plain", False), cycle_commands("refs", True)
    plain.pop("info"), with_refs.pop("info")
    assert {name: with_refs[name] - plain.get(name, 0) for name in with_refs if with_refs[name] != plain.get(name)} == {
        "hget": 6, "hset": 3, "hdel": 3,
    }
    assert not [f for f in admin.hkeys("sb:{refs}:state") if f.startswith(b"r:")]


def test_every_path_that_deletes_a_message_takes_its_ref_with_it(
    broker: sharded_broker.Broker, admin: redis.Redis
) -> None:
    broker.configure_queue(Q, max_deliveries=1, max_pending_per_key=1, on_full="drop_oldest")
    broker.enqueue_many(Q, [Message(b"a", key="a", ref="a"), Message(b"b", key="b", ref="b", delay=60)])
    broker.enqueue_many(Q, [Message(b"c", ref="c"), Message(b"c2", ref="c"), Message(b"u", ref="u")])
    index_view(admin)
    broker.enqueue(Q, b"a2", key="a", ref="a2")  # drops a (a dead letter keeps its ref)
    index_view(admin)
    assert broker.cancel(Q, ref="b").cancelled
    index_view(admin)
    leases = broker.lease(Q, 10)
    assert sorted((lease.payload, lease.ref) for lease in leases) == [
        (b"a2", "a2"), (b"c", None), (b"c2", "c"), (b"u", "u")
    ]
    assert broker.nack(next(lease for lease in leases if lease.payload == b"u"), dead=True)
    index_view(admin)
    assert all(broker.ack_many([lease for lease in leases if lease.payload != b"u"]))
    index_view(admin)
    assert broker.replay(Q, position="head") == 2 and broker.get(Q, ref="a").state == "waiting"
    index_view(admin)
    assert broker.purge(Q) == 2
    assert index_view(admin)["ready"] == 0
    assert not [f for f in admin.hkeys(queue_key("state")) if f.startswith(b"r:")]


# -- cancel keeps every index consistent ----------------------------------------------------


def index_view(admin: redis.Redis) -> dict[str, object]:
    """The queue's indexes read raw, checked against each other: every record in exactly
    one state index (ready with its readyage entry, delayed, leases, dead), each key's
    backlog its live records, and keyq and the key states naming the same keys."""
    from sharded_broker.backends.redis import _record

    records = {mid.decode(): _record(raw) for mid, raw in admin.hgetall(queue_key("msgs")).items()}
    ready = {m[m.index(b"\0") + 24 if m[:1] != b"\1" else 23:].decode() for m in admin.zrange(queue_key("ready"), 0, -1)}
    assert ready == {m.decode() for m in admin.zrange(queue_key("readyage"), 0, -1)}
    delayed = {m[16:].split(b"\0")[0].decode() for m in admin.zrange(queue_key("delayed"), 0, -1)}
    leased = {m[30:].split(b"\0")[0].decode() for m in admin.zrange(queue_key("leases"), 0, -1)}
    dead = {m.decode() for m in admin.zrange(queue_key("dead"), 0, -1)}
    assert sum(map(len, (ready, delayed, leased, dead))) == len(records)
    assert ready | delayed | leased | dead == set(records)
    live: dict[str, int] = {}
    for mid, values in records.items():
        if values[0] is not None and mid not in dead:
            live[values[0].decode()] = live.get(values[0].decode(), 0) + 1
    backlog = {key.decode(): -int(score) for key, score in admin.zrange(queue_key("backlog"), 0, -1, withscores=True)}
    assert backlog == live
    state = admin.hgetall(queue_key("state"))
    scheduled = {m[16:].decode() for m in admin.zrange(queue_key("keyq"), 0, -1)}
    placed = {f[2:].decode() for f, v in state.items() if f.startswith(b"k:") and v.split(b",")[1]}
    assert scheduled == placed
    assert scheduled <= set(backlog)
    # Each r:<ref> field names a record carrying that ref (rf, the record's 17th value), and back.
    refs = {f[2:].decode(): v.decode() for f, v in state.items() if f.startswith(b"r:")}
    carried = {values[16].decode(): mid for mid, values in records.items() if len(values) > 16}
    assert refs == carried
    return {"ready": len(ready), "delayed": len(delayed), "leased": len(leased), "dead": len(dead),
            "keys": sorted(backlog), "scheduled": sorted(scheduled),
            "key_states": sorted(f[2:].decode() for f in state if f.startswith(b"k:"))}


def test_cancel_leaves_every_index_consistent(broker: sharded_broker.Broker, admin: redis.Redis) -> None:
    ids = broker.enqueue_many(Q, [
        Message(b"a1", key="a"), Message(b"a2", key="a"), Message(b"a3", key="a"),
        Message(b"b1", key="b"), Message(b"c1", key="c", delay=60), Message(b"u1"), Message(b"u2", delay=60),
        Message(b"d1", key="d"), Message(b"d2", key="d"), Message(b"d3", key="d"),
    ])
    leases = broker.lease(Q, 10)
    assert sorted(lease.payload for lease in leases) == [b"a1", b"b1", b"d1", b"u1"]
    [retry] = [lease for lease in leases if lease.key == "b"]
    assert broker.nack(retry, delay=60)  # b1 goes back to its key, holding it for a minute
    held = [lease for lease in leases if lease.key != "b"]
    index_view(admin)
    for mid in (ids[1], ids[3], ids[4], ids[6], ids[8]):  # a2 (a's head), b1 (a held retry), c1, u2, d2
        assert broker.cancel(Q, mid).cancelled
        index_view(admin)
    assert broker.cancel(Q, ids[0]).state == "leased"  # a1
    view = index_view(admin)
    assert (view["ready"], view["delayed"], view["leased"], view["dead"]) == (2, 0, 3, 0)  # a3 d3; a1 d1 u1
    assert view["keys"] == ["a", "d"] and "b" not in view["key_states"] and "c" not in view["key_states"]
    assert all(broker.ack_many(held))
    assert sorted(lease.payload for lease in broker.lease(Q, 10)) == [b"a3", b"d3"]  # each key moved on
    view = index_view(admin)
    assert (view["ready"], view["leased"], view["scheduled"]) == (0, 2, [])
