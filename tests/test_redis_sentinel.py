"""The Redis backend through Redis Sentinel (``redis+sentinel://``) and ``wait_replicas``, on a
real primary, replica and three Sentinels (tests/support/redis_sentinel.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sharded_broker
import sharded_broker.aio
from sharded_broker import BackendUnavailable, ConfigurationError, InvalidURL
from support.redis_sentinel import SentinelGroup, SentinelProcess, failover_under_load, monitor_lines


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
    report, published, refused = failover_under_load(sentinel_url, tmp_path, sentinel_group.failover)
    print(f"published {published}, refused {refused} times; {report.summary()}")
    assert report.runs >= published > 0
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


def test_the_asyncio_broker_refuses_a_write_short_of_replicas(sentinel_url: str) -> None:
    async def short() -> str:
        broker = sharded_broker.aio.connect(sentinel_url, wait_replicas=2, wait_timeout=0.1)
        unwaiting = sharded_broker.aio.connect(sentinel_url)
        try:
            with pytest.raises(BackendUnavailable, match="only 1 of the 2 replicas") as refused:
                await broker.enqueue("q", b"x", key="k")
            await unwaiting.enqueue("other", b"y")
            leases = await unwaiting.lease("q", 1, visibility_timeout=5) + await unwaiting.lease("other", 1)
            with pytest.raises(BackendUnavailable, match="only 1 of the 2 replicas"):
                await broker.ack_many(leases)  # two queues: the pipelined path
            assert (await broker.stats("q")).leased == 0  # applied all the same
            return str(refused.value)
        finally:
            await broker.close()
            await unwaiting.close()

    assert "may not survive a failover" in asyncio.run(short())


def test_rediss_sentinel_speaks_tls_to_the_primary_and_ssl_options_need_it() -> None:
    # No server needed: connections are made on first use. (A TLS primary behind Sentinels is
    # not started by the suite; this checks the connections the backend would make.)
    import redis.sentinel

    from sharded_broker.backends.redis import RedisBackend

    backend = RedisBackend.from_url("rediss+sentinel://127.0.0.1:1/0?master=m", ssl_cert_reqs="none")
    try:
        pool = backend._client.connection_pool
        assert pool.connection_class is redis.sentinel.SentinelManagedSSLConnection
        assert pool.connection_kwargs["ssl_cert_reqs"] == "none"
    finally:
        backend.close()
    with pytest.raises(ConfigurationError, match="need a rediss:// or rediss\\+sentinel:// URL"):
        RedisBackend.from_url("redis+sentinel://127.0.0.1:1/0?master=m", ssl_cert_reqs="none")
