"""The Redis backend through Redis Sentinel (``redis+sentinel://``) and ``wait_replicas``, on a
real primary, replica and three Sentinels (tests/support/redis_sentinel.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sharded_broker
import sharded_broker.aio
from sharded_broker import BackendUnavailable, ConfigurationError, InvalidURL
from support.campaign import engine_target
from support.redis_sentinel import SentinelGroup, SentinelProcess, monitor_lines
from support.runs import check

TESTS = Path(__file__).resolve().parent


def test_a_round_trip_through_the_sentinels(sentinel_url: str) -> None:
    broker = sharded_broker.connect(sentinel_url)
    try:
        broker.enqueue("q", b"one", key="k")
        [lease] = broker.lease("q", 1, visibility_timeout=5)
        assert lease.payload == b"one"
        assert broker.ack_many([lease]) == [True]
        assert broker.stats("q").ready == 0
    finally:
        broker.close()


def test_the_asyncio_broker_goes_through_the_sentinels_too(sentinel_url: str) -> None:
    async def round_trip() -> bytes:
        broker = sharded_broker.aio.connect(sentinel_url, wait_replicas=1)
        try:
            await broker.enqueue("q", b"one", key="k")
            [lease] = await broker.lease("q", 1, visibility_timeout=5)
            assert await broker.ack_many([lease]) == [True]
            return lease.payload
        finally:
            await broker.close()

    assert asyncio.run(round_trip()) == b"one"


def test_a_sentinel_url_without_a_master_name_is_refused_naming_it(sentinel_group: SentinelGroup) -> None:
    with pytest.raises(InvalidURL, match=r"\?master=NAME"):
        sharded_broker.connect(f"redis+sentinel://{sentinel_group.addresses}/0")
    with pytest.raises(InvalidURL, match="not a Sentinel address"):
        sharded_broker.connect("redis+sentinel://127.0.0.1:notaport/0?master=x")


def test_an_unknown_master_name_says_so(sentinel_group: SentinelGroup) -> None:
    broker = sharded_broker.connect(sentinel_group.url(master="nosuchprimary"))
    try:
        with pytest.raises(BackendUnavailable, match="no Sentinel named a primary.*nosuchprimary"):
            broker.stats("q")
    finally:
        broker.close()


def test_sentinel_options_only_with_a_sentinel_url(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown option.*sentinel_password"):
        sharded_broker.connect(redis_url, sentinel_password="x")


def test_the_sentinels_own_password(sentinel_group: SentinelGroup, tmp_path: Path) -> None:
    # A fourth Sentinel asking for a password, watching the same primary under another
    # name (the group's Sentinels ignore it: it announces a name they do not monitor).
    guarded = SentinelProcess(
        str(tmp_path), [*monitor_lines("guarded", sentinel_group.primary_port(), quorum=1), "requirepass s3cret-pw"]
    ).start()
    url = f"redis+sentinel://127.0.0.1:{guarded.port}/0?master=guarded"
    try:
        deadline = time.monotonic() + 10
        while True:  # until it has met the primary
            try:
                broker = sharded_broker.connect(url, sentinel_password="s3cret-pw")
                broker.stats("q")
                break
            except BackendUnavailable:
                broker.close()
                assert time.monotonic() < deadline
                time.sleep(0.1)
        broker.enqueue("q", b"through a guarded Sentinel")
        assert broker.stats("q").ready == 1
        broker.close()
        unauthenticated = sharded_broker.connect(url)
        with pytest.raises(BackendUnavailable, match="(?i)auth") as refused:
            unauthenticated.stats("q")
        assert "s3cret-pw" not in str(refused.value)
        unauthenticated.close()
    finally:
        guarded.stop()


def test_wait_replicas_one_is_acknowledged_by_the_replica(sentinel_url: str) -> None:
    broker = sharded_broker.connect(sentinel_url, wait_replicas=1)
    try:
        broker.enqueue("q", b"kept", key="k")
        leases = broker.lease("q", 1, visibility_timeout=5) + []
        broker.enqueue("other", b"x")
        leases += broker.lease("other", 1, visibility_timeout=5)
        assert broker.ack_many(leases) == [True, True]  # two queues: the pipelined path
    finally:
        broker.close()


def test_wait_replicas_beyond_the_replicas_is_refused_as_unavailable(sentinel_url: str) -> None:
    broker = sharded_broker.connect(sentinel_url, wait_replicas=2, wait_timeout=0.2)
    try:
        with pytest.raises(BackendUnavailable, match="only 1 of the 2 replicas.*may not survive a failover"):
            broker.enqueue("q", b"x", key="k")
        assert broker.stats("q").ready == 1  # read-only: no WAIT; the write above was applied
        with pytest.raises(BackendUnavailable, match="only 1 of the 2"):
            broker.lease("q", 1, visibility_timeout=5)
    finally:
        broker.close()


def test_wait_replicas_on_a_plain_server_without_replicas(redis_url: str) -> None:
    broker = sharded_broker.connect(redis_url, wait_replicas=1, wait_timeout=0.05)
    try:
        with pytest.raises(BackendUnavailable, match="only 0 of the 1 replicas"):
            broker.enqueue("q", b"x")
    finally:
        broker.close()


@pytest.mark.parametrize("options", [{"wait_replicas": 0}, {"wait_replicas": "1"}, {"wait_timeout": 1.0},
                                     {"wait_replicas": 1, "wait_timeout": -1}])
def test_bad_wait_options_are_refused(redis_url: str, options: dict) -> None:
    with pytest.raises(ConfigurationError, match="wait_"):
        sharded_broker.connect(redis_url, **options)


def test_a_failover_under_load_loses_and_reorders_nothing(sentinel_group: SentinelGroup, sentinel_url: str,
                                                          tmp_path: Path) -> None:
    """SENTINEL FAILOVER while three consumer processes and a producer run, every side with
    wait_replicas=1: no acknowledged enqueue is lost, no key runs out of order."""
    queue = "campaign"  # engine_target's queue and run log
    target = engine_target(tmp_path)
    events = tmp_path / "events.jsonl"
    options = {"socket_timeout": 2, "wait_replicas": 1, "wait_timeout": 0.5}
    workers = []
    for n in range(3):
        config = {"url": sentinel_url, "queue": queue, "events": str(events), "vt": 3.0, "limit": 1,
                  "options": options}
        with open(tmp_path / f"engine-{n}.out", "wb") as output:
            workers.append(subprocess.Popen(
                [sys.executable, str(TESTS / "support" / "engine_worker.py"), json.dumps(config)],
                cwd=TESTS, env=dict(os.environ), stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            ))
    producer_broker = sharded_broker.connect(sentinel_url, max_deliveries=None, **options)
    keys = [f"k{i}" for i in range(12)]
    published = {key: 0 for key in keys}
    refused = 0
    stop = threading.Event()

    def produce() -> None:
        nonlocal refused
        while not stop.is_set():
            for key in keys:
                seq = published[key]
                body = json.dumps({"k": key, "n": seq, "do": "ok", "s": 0.01}).encode()
                while True:  # the same dedup id until acknowledged: a resend is not a second message
                    try:
                        producer_broker.enqueue(queue, body, key=key, dedup_id=f"{key}:{seq}")
                        break
                    except BackendUnavailable:
                        refused += 1
                        time.sleep(0.05)
                published[key] = seq + 1
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        time.sleep(2.0)
        before = sum(published.values())
        sentinel_group.failover()
        time.sleep(1.0)
        stop.set()
        producer.join(30)
        assert sum(published.values()) > before, "nothing was published after the failover"
        deadline = time.monotonic() + 60
        while True:
            report = check(target.runs(tmp_path), published)
            if not report.lost or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        producer.join(30)
        for worker in workers:
            worker.kill()
            worker.wait(10)
        producer_broker.close()
    print(f"published {sum(published.values())}, refused {refused} times; {report.summary()}")
    assert report.runs > 0
    assert report.clean, report.summary()


def test_the_command_line_reads_a_sentinel_url(sentinel_url: str) -> None:
    broker = sharded_broker.connect(sentinel_url)
    broker.enqueue("sms", b"x", key="k")
    broker.close()
    script = Path(sys.executable).with_name("sharded-broker")
    stats = subprocess.run([str(script), "--url", sentinel_url, "stats", "sms", "--json"], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["ready"] == 1
