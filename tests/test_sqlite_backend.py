"""What only the SQLite backend promises: several processes on one file, crash safety,
durability, indexed hot paths, a clock that never runs backwards, and clear errors for bad
paths. Semantics shared by every backend are in tests/test_conformance.py."""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

import sharded_broker
from sharded_broker import ConfigurationError, Message
from sharded_broker.backends.sqlite import SQLiteBackend, sql

FORK = multiprocessing.get_context("fork")


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return url_of(tmp_path / "q.db")


# -- several processes on one file --------------------------------------------------------


def _produce(url: str, keys: list[str], per_key: int, seed: int) -> None:
    """Enqueue ``per_key`` messages for each key, in order, in batches of random sizes."""
    rnd = random.Random(seed)
    broker = sharded_broker.connect(url)
    pending = [(key, i) for i in range(per_key) for key in keys]
    while pending:
        size = rnd.randint(1, 7)
        batch, pending = pending[:size], pending[size:]
        if len(batch) == 1:
            key, i = batch[0]
            broker.enqueue("jobs", f"{key}:{i}".encode(), key=key)
        else:
            broker.enqueue_many("jobs", [Message(f"{key}:{i}".encode(), key=key) for key, i in batch])
    broker.close()


def _consume(broker: sharded_broker.Broker, producers_done, events, errors, threads: int) -> None:
    """Lease and ack until the producers are done and the queue is empty; report each
    message as (key, index, batch id, leased_at, finished_at), times in monotonic time
    (one clock for every process of the host)."""

    def work() -> None:
        try:
            while True:
                leases = broker.lease("jobs", random.randint(1, 3), per_key=random.randint(1, 2), wait=0.1)
                if not leases:
                    stats = broker.stats("jobs")
                    if producers_done.is_set() and stats.ready + stats.delayed + stats.leased == 0:
                        return
                    continue
                leased_at = time.monotonic()
                for lease in leases:
                    key, index = lease.payload.decode().split(":")
                    events.put((key, int(index), lease.batch_id, leased_at, time.monotonic()))
                assert all(broker.ack_many(leases)), "an ack was refused"
        except BaseException as exc:  # reported to the test, which fails on it
            errors.put(repr(exc))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _drain(events) -> list:
    items = []
    while True:
        try:
            items.append(events.get(timeout=0.05))
        except queue.Empty:
            return items


def test_processes_and_threads_share_one_file_in_order_and_complete(db_url: str) -> None:
    """Two producer processes and three consumer processes (two threads each) on one
    file: every message delivered exactly once, each key in order and never two of one
    key at a time, and no 'database is locked' ever reaches a caller."""
    keys = [f"k{i}" for i in range(12)]
    per_key = 25
    # Opened (and used) before forking: each child must open its own connection.
    broker = sharded_broker.connect(db_url)
    assert broker.stats("jobs").ready == 0
    producers_done = FORK.Event()
    events, errors = FORK.Queue(), FORK.Queue()
    consumers = [
        FORK.Process(target=_consume, args=(broker, producers_done, events, errors, 2)) for _ in range(3)
    ]
    producers = [
        FORK.Process(target=_produce, args=(db_url, keys[n::2], per_key, n)) for n in range(2)
    ]
    for process in consumers + producers:
        process.start()
    for process in producers:
        process.join(60)
        assert process.exitcode == 0
    producers_done.set()
    collected = []
    while any(p.is_alive() for p in consumers):
        collected += _drain(events)
    for process in consumers:
        process.join(60)
        assert process.exitcode == 0
    collected += _drain(events)
    failures = _drain(errors)
    assert failures == []

    by_key: dict[str, list[tuple[float, int, float, str]]] = defaultdict(list)
    for key, index, batch_id, leased_at, finished_at in collected:
        by_key[key].append((leased_at, index, finished_at, batch_id))
    assert sorted(by_key) == sorted(keys)
    for key, runs in by_key.items():
        runs.sort()
        assert [index for _, index, _, _ in runs] == list(range(per_key)), f"key {key} out of order or incomplete"
        for (_, _, finished, batch), (next_leased, _, _, next_batch) in zip(runs, runs[1:]):
            # One ordered batch is leased at once; the next batch only after it is acked.
            assert batch == next_batch or next_leased >= finished, f"two batches of key {key} ran at once"
    stats = broker.stats("jobs")
    assert (stats.ready, stats.leased, stats.delayed, stats.dead, stats.keys) == (0, 0, 0, 0, 0)


# -- crashes --------------------------------------------------------------------------------


def _produce_and_report(url: str, ids_out) -> None:
    broker = sharded_broker.connect(url)
    for n in range(100_000):
        ids = broker.enqueue_many("jobs", [Message(f"{n}:{i}".encode(), key=f"k{n % 3}") for i in range(5)])
        ids_out.send(ids)  # only after the transaction committed


def test_sigkill_mid_enqueue_loses_nothing_committed(db_url: str) -> None:
    sharded_broker.connect(db_url).close()
    receiver, sender = FORK.Pipe(duplex=False)
    producer = FORK.Process(target=_produce_and_report, args=(db_url, sender))
    producer.start()
    reported: list[str] = []
    while len(reported) < 200:
        reported += receiver.recv()
    time.sleep(random.uniform(0.0, 0.05))
    os.kill(producer.pid, signal.SIGKILL)
    producer.join(10)
    while receiver.poll(0.1):
        reported += receiver.recv()

    broker = sharded_broker.connect(db_url)
    stored = set()
    while True:
        leases = broker.lease("jobs", 500, per_key=500)
        if not leases:
            break
        stored.update(lease.id for lease in leases)
        broker.ack_many(leases)
    assert set(reported) <= stored
    assert len(stored) % 5 == 0, "a batch was stored in part"
    assert broker.backend._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _lease_ack_loop(url: str, events, visibility_timeout: float) -> None:
    """Report each finished message through ``events``, a pipe of this worker's own: a
    pipe write of a few bytes is atomic and unbuffered, so a SIGKILL loses no report of
    an acked message and leaves no shared lock held."""
    broker = sharded_broker.connect(url)
    while True:
        for lease in broker.lease("jobs", 2, per_key=2, visibility_timeout=visibility_timeout, wait=0.05):
            time.sleep(0.01)  # the work: most kills land while a lease is held
            key, index = lease.payload.decode().split(":")
            events.send((time.monotonic(), key, int(index), lease.attempts))  # finished, about to ack
            broker.ack(lease)


def test_sigkilled_workers_leases_come_back_in_order(db_url: str) -> None:
    """Workers killed at random moments (inside transactions, holding leases): nothing is
    lost, their leases come back after the visibility timeout, and every key's messages
    still finish in order (a message may finish twice only if its worker died between
    finishing and acking)."""
    keys = [f"k{i}" for i in range(4)]
    per_key = 50
    visibility_timeout = 0.5
    broker = sharded_broker.connect(db_url)
    broker.enqueue_many("jobs", [Message(f"{key}:{i}".encode(), key=key) for i in range(per_key) for key in keys])
    finished: list[tuple[float, str, int, int]] = []  # (monotonic time, key, index, attempts)
    rnd = random.Random(7)
    for _ in range(3):
        pipes = [FORK.Pipe(duplex=False) for _ in range(2)]
        workers = [
            FORK.Process(target=_lease_ack_loop, args=(db_url, sender, visibility_timeout)) for _, sender in pipes
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            time.sleep(rnd.uniform(0.1, 0.3))
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)
        for receiver, sender in pipes:
            sender.close()  # the worker's end died with it: recv() ends with EOFError
            try:
                while True:
                    finished.append(receiver.recv())
            except EOFError:
                receiver.close()

    while True:
        leases = broker.lease("jobs", 10, per_key=3, visibility_timeout=visibility_timeout, wait=2 * visibility_timeout)
        if not leases:
            break
        for lease in leases:
            key, index = lease.payload.decode().split(":")
            finished.append((time.monotonic(), key, int(index), lease.attempts))
        assert all(broker.ack_many(leases))

    finished.sort()
    for key in keys:
        indexes = [index for _, k, index, _ in finished if k == key]
        assert sorted(set(indexes)) == list(range(per_key)), f"key {key} lost messages"
        for previous, current in zip(indexes, indexes[1:]):
            assert current in (previous, previous + 1), f"key {key} out of order: {indexes}"
    stats = broker.stats("jobs")
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (0, 0, 0, 0)
    assert any(attempts > 1 for *_, attempts in finished), "no lease of a killed worker came back"


# -- durability ------------------------------------------------------------------------------


def test_everything_survives_close_and_reopen(db_url: str) -> None:
    broker = sharded_broker.connect(db_url, max_deliveries=1)
    broker.enqueue_many("jobs", [Message(b"a1", key="a"), Message(b"a2", key="a"), Message(b"b1", key="b")])
    broker.enqueue("jobs", b"later", key="c", delay=3600)
    broker.enqueue("jobs", b"doomed", key="d", headers={"why": "test"})
    held = broker.lease("jobs", 3)
    by_payload = {lease.payload: lease for lease in held}
    assert set(by_payload) == {b"a1", b"b1", b"doomed"}
    broker.nack(by_payload[b"doomed"], dead=True, reason="bad input")
    broker.set_interval("jobs", "a", 0.0)
    broker.pause("jobs", key="b")
    broker.bind("broadcast", "jobs")
    broker.close()

    reopened = sharded_broker.connect(db_url, max_deliveries=1)
    stats = reopened.stats("jobs")
    assert (stats.ready, stats.leased, stats.delayed, stats.dead, stats.keys) == (1, 2, 1, 1, 3)
    assert reopened.queues() == ["jobs"]
    assert reopened.bound_queues("broadcast") == ["jobs"]
    [dead] = reopened.dead_letters("jobs")
    assert (dead.payload, dead.reason, dead.headers) == (b"doomed", "bad input", {"why": "test"})
    # Leases taken before the restart are still held, and their tokens still work.
    assert reopened.ack(by_payload[b"a1"])
    assert reopened.extend(by_payload[b"b1"], 60)
    assert [lease.payload for lease in reopened.lease("jobs", 5)] == [b"a2"]


def test_two_connections_taking_turns_see_each_others_writes(db_url: str) -> None:
    """Each connection reuses the rows it committed last; a commit by the other connection
    in between must make it read them again (counts, seqs, the key order, the lane)."""
    first = sharded_broker.connect(db_url, visibility_timeout=60)
    second = sharded_broker.connect(db_url, visibility_timeout=60)
    sent: dict[str, list[bytes]] = defaultdict(list)
    got: dict[str, list[bytes]] = defaultdict(list)
    rnd = random.Random(7)
    for step in range(300):
        producer, consumer = (first, second) if rnd.random() < 0.5 else (second, first)
        key = rnd.choice(["a", "b", "c", None])
        payload = f"{step}".encode()
        producer.enqueue("jobs", payload, key=key)
        sent[str(key)].append(payload)
        if rnd.random() < 0.7:
            for lease in consumer.lease("jobs", rnd.randint(1, 3)):
                got[str(lease.key)].append(lease.payload)
                assert (first if rnd.random() < 0.5 else second).ack(lease)
        stats = consumer.stats("jobs")
        delivered = sum(len(v) for v in got.values())
        assert (stats.ready, stats.leased) == (step + 1 - delivered, 0)
        assert stats.keys == sum(1 for k in ("a", "b", "c") if len(sent[k]) > len(got[k]))
    while leases := first.lease("jobs", 10):
        for lease in leases:
            got[str(lease.key)].append(lease.payload)
            assert second.ack(lease)
    for key in ("a", "b", "c"):
        assert got[key] == sent[key]  # per-key FIFO across both connections
    assert sorted(got["None"]) == sorted(sent["None"])
    assert first.metrics("jobs", 1)[-1].acked == second.metrics("jobs", 1)[-1].acked == 300
    first.close()
    second.close()


# -- indexes ---------------------------------------------------------------------------------


def _full_scans(conn: sqlite3.Connection, statement: str) -> list[str]:
    plan = conn.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()
    return [
        detail for *_, detail in plan
        if (detail.startswith("SCAN") and " INDEX " not in detail) or "TEMP B-TREE" in detail
    ]


def test_hot_statements_read_through_indexes(db_url: str) -> None:
    """Every statement that enqueue, lease, ack, nack, extend, expiry, delays, cancel, get and
    the why-not-moving reads run is planned with an index: no full-table scan and no sort on any hot path."""
    broker = sharded_broker.connect(db_url, max_deliveries=2, key_concurrency=2, interval=0.0)
    broker.enqueue_many("jobs", [Message(b"x", key=f"k{i % 50}", dedup_id=f"d{i}") for i in range(500)])
    conn = broker.backend._connection()
    conn.execute("ANALYZE")  # plans as they will be on a busy database
    statements: set[str] = set()
    conn.set_trace_callback(statements.add)
    try:
        broker.enqueue_many("jobs", [Message(b"y", key="k1", delay=0.01, priority=1), Message(b"z")])
        broker.enqueue("jobs", b"head", key="k2", at_head=True, dedup_id="d1")
        broker.enqueue_many("jobs", [Message(b"r", key="k3", ref="r1"), Message(b"r", key="k3", ref="r1")])
        leases = broker.lease("jobs", 20, per_key=3, visibility_timeout=0.05)
        broker.ack_many(leases[:5])
        broker.nack(leases[5], delay=0.01)
        broker.nack(leases[6], dead=True, reason="no")
        broker.extend(leases[7], 0.05)
        time.sleep(0.1)  # let the rest expire and the delays end
        running = broker.lease("jobs", 20, per_key=3)
        broker.set_interval("jobs", "k3", 1.0)
        broker.pause("jobs", key="k4")
        broker.resume("jobs", key="k4")
        broker.stats("jobs")
        broker.dead_letters("jobs")
        # why and keys --stuck: the key rows and heads, the delayed order, the leases.
        broker.why("jobs", "k1")
        broker.stuck_keys("jobs", older_than=0.0)
        broker.lagging_keys("jobs")
        # cancel and get by id: a waiting head, a leased message, a dead letter.
        waiting = broker.key_info("jobs", "k9").head
        assert waiting is not None and broker.get("jobs", waiting.id) is not None
        assert broker.cancel("jobs", waiting.id).cancelled
        assert broker.get("jobs", running[0].id).state == "leased"
        assert broker.cancel("jobs", leases[6].id).state == "dead"
        # by ref
        assert broker.get("jobs", ref="r1") is not None
        assert broker.cancel("jobs", ref="r1").cancelled
        broker.purge("jobs")
        broker.purge("jobs", dead=True)
    finally:
        conn.set_trace_callback(None)
    checked = [s for s in statements if s.split()[0].upper() in ("SELECT", "UPDATE", "DELETE", "INSERT")]
    assert len(checked) > 20
    offenders = {s: scans for s in checked if (scans := _full_scans(conn, s))}
    assert offenders == {}


def test_batch_calls_read_their_keys_rows_in_one_indexed_statement(db_url: str) -> None:
    """enqueue_many and ack_many over keys this connection does not know yet (more keys than
    its row cache holds, or rows another connection wrote) read those keys' rows with one
    statement, through the primary key, and count each key right."""
    with sharded_broker.connect(db_url) as writer:
        writer.enqueue_many("jobs", [Message(b"a", key=f"k{i}") for i in range(600)])
    broker = sharded_broker.connect(db_url)  # a fresh connection: no key row known
    conn = broker.backend._connection()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        broker.enqueue_many("jobs", [Message(b"b", key=f"k{i}") for i in range(600)] + [Message(b"c", key="new")])
    finally:
        conn.set_trace_callback(None)
    reads = [s for s in statements if s.startswith("SELECT") and "FROM keys" in s]
    assert len(reads) == 2  # 601 keys: KEYS_READ (512) per statement
    assert all(_full_scans(conn, s) == [] and " IN (" in s for s in reads)
    assert [broker.key_info("jobs", key).backlog for key in ("k0", "k599", "new")] == [2, 2, 1]
    leases = broker.lease("jobs", 300)
    assert len(leases) == 300
    acker = sharded_broker.connect(db_url)
    conn = acker.backend._connection()
    statements.clear()
    conn.set_trace_callback(statements.append)
    try:
        assert acker.ack_many(leases) == [True] * 300
    finally:
        conn.set_trace_callback(None)
    assert len([s for s in statements if s.startswith("SELECT") and "FROM keys" in s]) == 1
    assert [acker.key_info("jobs", lease.key).backlog for lease in leases[:3]] == [1, 1, 1]
    assert acker.stats("jobs").ready == 901 and acker.stats("jobs").leased == 0


def test_a_large_purge_commits_chunk_by_chunk_so_others_write_between(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = sharded_broker.connect(db_url)
    other = sharded_broker.connect(db_url, busy_timeout=0.5)  # a connection of its own
    broker.enqueue_many("jobs", [Message(f"{i}".encode(), key=f"k{i % 5}") for i in range(2_500)])
    backend = broker.backend
    write = backend._write
    between_chunks = []

    def observed_write(body, **options):  # type: ignore[no-untyped-def]
        answer = write(body, **options)
        # The write lock is free between chunks: another connection writes and reads a
        # consistent queue (keys k0 and k1, ordered first, are gone after the first chunk).
        other.enqueue("elsewhere", b"between chunks")
        between_chunks.append([other.key_info("jobs", f"k{i}").backlog for i in range(5)])
        return answer

    monkeypatch.setattr(backend, "_write", observed_write)
    assert broker.purge("jobs") == 2_500
    assert between_chunks == [[0, 0, 500, 500, 500], [0, 0, 0, 0, 500], [0, 0, 0, 0, 0]]
    assert other.stats("elsewhere").ready == 3
    monkeypatch.undo()
    assert broker.stats("jobs").ready == 0 and broker.keys("jobs") == []
    broker.close()
    other.close()


# -- one clock per database --------------------------------------------------------------------


def test_clock_never_runs_behind_what_is_stored(db_url: str) -> None:
    ahead = sharded_broker.connect(db_url, clock=lambda: 2_000_000_000.0)
    ahead.enqueue("jobs", b"m", key="a")
    behind = sharded_broker.connect(db_url, clock=lambda: 1_999_999_000.0)
    assert behind.now() == 2_000_000_000.0
    [lease] = behind.lease("jobs", visibility_timeout=30)
    assert lease.deadline == 2_000_000_030.0
    assert lease.enqueued_at == 2_000_000_000.0


# -- waiting ------------------------------------------------------------------------------------


def test_wait_polls_with_backoff_and_wakes_on_local_work(db_url: str) -> None:
    broker = sharded_broker.connect(db_url)
    backend = broker.backend
    calls = []
    original = backend.lease

    def counting_lease(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    backend.lease = counting_lease
    assert broker.lease("idle", wait=1.0) == []
    assert len(calls) <= 20, f"{len(calls)} polls in one second of waiting: it spins"

    # A waiter whose backoff step is a minute returns early only if it is woken.
    woken_after: list[float] = []

    def waiter() -> None:
        backend._local.step = 60.0
        assert original("jobs", 1, 1, 30.0, broker.settings("jobs")).leases == []
        started = time.monotonic()
        backend.wait("jobs", 60.0)
        woken_after.append(time.monotonic() - started)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    time.sleep(0.2)
    broker.enqueue("jobs", b"now", key="a")
    thread.join(10)
    assert woken_after and woken_after[0] < 10, "a local enqueue did not wake the waiting consumer"
    assert [lease.payload for lease in broker.lease("jobs")] == [b"now"]


# -- bad input ----------------------------------------------------------------------------------


def test_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "q.db"
    with pytest.raises(ConfigurationError, match=str(missing.parent)):
        sharded_broker.connect(url_of(missing))
    assert not (tmp_path / "no").exists()


def test_a_file_that_is_not_a_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    content = b"these are my notes, not a database\n" * 200
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=f"{path} is not a SQLite database"):
        sharded_broker.connect(url_of(path))
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_read_only_file_is_refused(db_url: str, tmp_path: Path) -> None:
    broker = sharded_broker.connect(db_url)
    broker.enqueue("jobs", b"m")
    broker.close()
    path = tmp_path / "q.db"
    path.chmod(0o444)
    with pytest.raises(ConfigurationError, match=f"{path} is read-only"):
        sharded_broker.connect(db_url)


def test_a_directory_is_not_a_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=f"{tmp_path} is a directory"):
        sharded_broker.connect(url_of(tmp_path))


@pytest.mark.parametrize(
    "url, message",
    [
        ("sqlite://", "use memory://"),
        ("sqlite:///", "use memory://"),
        ("sqlite:///:memory:", "use memory://"),
        ("sqlite://host/q.db", "names a host"),
        ("sqlite:///q.db?timeout=5", "no query string"),
    ],
)
def test_malformed_urls_are_explained(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        sharded_broker.connect(url)


def test_unknown_and_bad_options_are_named(db_url: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown option.*bogus"):
        sharded_broker.connect(db_url, bogus=1)
    with pytest.raises(ConfigurationError, match="synchronous"):
        sharded_broker.connect(db_url, synchronous="sometimes")
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        sharded_broker.connect(db_url, busy_timeout=0)


def test_relative_and_absolute_paths_as_sqlalchemy_spells_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = sharded_broker.connect("sqlite:///relative.db")
    relative.enqueue("jobs", b"m")
    assert relative.backend.path == str(tmp_path / "relative.db")
    absolute = sharded_broker.connect(f"sqlite:///{tmp_path}/relative.db")
    assert absolute.backend.path == str(tmp_path / "relative.db")
    assert absolute.stats("jobs").ready == 1
    assert repr(absolute.backend) == f"<SQLiteBackend sqlite:///{tmp_path}/relative.db>"
    assert isinstance(absolute.backend, SQLiteBackend)


def test_busy_database_waits_instead_of_failing(db_url: str, tmp_path: Path) -> None:
    """Another connection holds the write lock for a while: calls wait for it, then
    succeed; with a short busy_timeout they fail with BackendUnavailable naming the file."""
    broker = sharded_broker.connect(db_url)
    blocker = sqlite3.connect(tmp_path / "q.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: blocker.execute("COMMIT"))
    release.start()
    assert broker.enqueue("jobs", b"m")  # would raise 'database is locked' without retries
    release.join()
    impatient = sharded_broker.connect(db_url, busy_timeout=0.2)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sharded_broker.BackendUnavailable, match=str(tmp_path / "q.db")):
            impatient.enqueue("jobs", b"m")
    finally:
        blocker.execute("ROLLBACK")
    assert broker.stats("jobs").ready == 1


def test_a_version_4_file_gains_the_weight_columns(db_url: str, tmp_path: Path) -> None:
    """A file written before weights and schedules (schema version 4) opens, keeps its
    queue and its keys' settings, and takes weights (version 5) and schedules (version 6)
    from then on."""
    with sharded_broker.connect(db_url) as broker:
        broker.enqueue("jobs", b"a0", key="a")
        broker.enqueue("jobs", b"b0", key="b")
        broker.set_interval("jobs", "b", 2.0)
    conn = sqlite3.connect(tmp_path / "q.db")
    conn.executescript(
        "".join(f"ALTER TABLE keys DROP COLUMN {column};" for column in ("weight", "round_turns", "round_at", "round_order"))
        + "DROP INDEX messages_key_delayed; DROP TABLE schedules; PRAGMA user_version = 4;"
    )
    conn.close()
    with sharded_broker.connect(db_url) as broker:
        assert broker.key_info("jobs", "b").interval == 2.0
        assert broker.key_info("jobs", "a").weight == 1
        broker.set_weight("jobs", "a", 2)
        broker.enqueue("jobs", b"a1", key="a")
        leases = broker.lease("jobs")
        assert [lease.payload for lease in leases] == [b"a0"]
        assert broker.ack_many(leases) == [True]
        assert [lease.payload for lease in broker.lease("jobs")] == [b"a1"]  # a's second turn
        broker.schedule("jobs", "s", b"x", every=10)
        assert [schedule.name for schedule in broker.schedules("jobs")] == ["s"]
    conn = sqlite3.connect(tmp_path / "q.db")
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"messages_key_delayed", "schedules_due"} <= indexes
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sql.SCHEMA_VERSION
    conn.close()


def test_a_version_6_file_gains_refs(db_url: str, tmp_path: Path) -> None:
    """A file written before refs (schema version 6) opens with its messages, which carry
    none, and takes refs (version 7) from then on."""
    with sharded_broker.connect(db_url) as broker:
        old = broker.enqueue("jobs", b"old", key="a")
    conn = sqlite3.connect(tmp_path / "q.db")
    conn.executescript("DROP INDEX messages_ref; ALTER TABLE messages DROP COLUMN ref; PRAGMA user_version = 6;")
    conn.close()
    with sharded_broker.connect(db_url) as broker:
        assert broker.get("jobs", old).ref is None
        new = broker.enqueue("jobs", b"new", key="a", ref="task-1")
        assert broker.get("jobs", ref="task-1").id == new
        assert [(lease.payload, lease.ref) for lease in broker.lease("jobs")] == [(b"old", None)]
        assert broker.cancel("jobs", ref="task-1").cancelled
    conn = sqlite3.connect(tmp_path / "q.db")
    assert "messages_ref" in {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 7
    conn.close()

