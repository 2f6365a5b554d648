"""A real Dramatiq worker on a ShardedBroker configured by the environment alone."""

from __future__ import annotations

import threading
from pathlib import Path

import dramatiq
import pytest

from sharded_broker.errors import ConfigurationError
from sharded_broker.integrations.dramatiq import ShardedBroker


def test_url_and_key_concurrency_come_from_the_environment(
    run_worker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHARDED_BROKER_URL", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("SHARDED_BROKER_KEY_CONCURRENCY", "2")
    monkeypatch.setenv("SHARDED_BROKER_VISIBILITY_TIMEOUT", "5")
    broker = ShardedBroker()
    try:
        assert broker.url == f"sqlite:///{tmp_path}/env.db"
        assert broker.engine.defaults.visibility_timeout == 5.0
        # Two messages of one key meet inside the actor: only key_concurrency=2 (from the
        # environment) lets the second start while the first runs.
        both_running = threading.Barrier(2, timeout=10)
        met: list[int] = []

        @dramatiq.actor(broker=broker, shard_key="user", max_retries=0)
        def meet(user: str, n: int) -> None:
            both_running.wait()
            met.append(n)

        meet.send("u1", 1)
        meet.send("u1", 2)
        with run_worker(broker, threads=2):
            broker.join(meet.queue_name, timeout=15_000)
        assert sorted(met) == [1, 2]
        assert (tmp_path / "env.db").exists()
    finally:
        broker.close()


def test_explicit_arguments_beat_the_environment(monkeypatch: pytest.MonkeyPatch, memory_url: str) -> None:
    monkeypatch.setenv("SHARDED_BROKER_URL", "sqlite:////nonexistent-dir/never.db")
    monkeypatch.setenv("SHARDED_BROKER_VISIBILITY_TIMEOUT", "5")
    broker = ShardedBroker(url=memory_url, visibility_timeout=9)
    try:
        assert broker.url == memory_url and broker.engine.defaults.visibility_timeout == 9.0
    finally:
        broker.close()


def test_no_url_anywhere_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match=r"^no broker URL: pass ShardedBroker\(url=...\) or set SHARDED_BROKER_URL$"):
        ShardedBroker()
