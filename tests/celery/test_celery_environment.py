"""A real Celery worker on a bare ``sharded://`` broker URL: the engine URL and options
come from SHARDED_BROKER_URL and SHARDED_BROKER_<OPTION> alone."""

from __future__ import annotations

import threading

import pytest
from celery.contrib.testing.worker import start_worker
from kombu import Connection

from sharded_broker.errors import ConfigurationError, InvalidURL


def test_engine_url_and_key_concurrency_come_from_the_environment(
    make_app, monkeypatch: pytest.MonkeyPatch, memory_url: str, wait_until
) -> None:
    monkeypatch.setenv("SHARDED_BROKER_URL", memory_url)
    monkeypatch.setenv("SHARDED_BROKER_KEY_CONCURRENCY", "2")
    app = make_app("sharded://")
    # Two tasks of one key meet inside the task: only key_concurrency=2 (from the
    # environment) lets the second start while the first runs.
    both_running = threading.Barrier(2, timeout=10)
    met: list[int] = []

    @app.task(shared=False, shard_key="user")
    def meet(user: str, n: int) -> None:
        both_running.wait()
        met.append(n)

    meet.delay("u1", 1)
    meet.delay("u1", 2)
    with app.connection() as connection:
        transport = connection.transport
        assert transport.engine_url == memory_url
        assert transport.broker.defaults.key_concurrency == 2
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=20):
        wait_until(lambda: len(met) == 2, 20, "both tasks")
    assert sorted(met) == [1, 2]


def test_transport_options_beat_the_environment(make_app, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_KEY_CONCURRENCY", "two")  # never read: the option is given
    monkeypatch.setenv("SHARDED_BROKER_VISIBILITY_TIMEOUT", "7")
    app = make_app(key_concurrency=3)
    with app.connection() as connection:
        assert connection.transport.broker.defaults.key_concurrency == 3
        assert connection.transport.broker.defaults.visibility_timeout == 7.0


def test_a_bad_variable_is_named_not_blamed_on_transport_options(make_app, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_INTERVAL", "soon")
    app = make_app()
    with pytest.raises(ConfigurationError, match=r"^SHARDED_BROKER_INTERVAL must be a number of seconds"):
        with app.connection() as connection:
            connection.transport


def test_bare_url_without_the_variable_is_a_clear_error() -> None:
    with pytest.raises(InvalidURL, match=r"takes its engine URL from SHARDED_BROKER_URL, which is not set"):
        Connection("sharded://").transport


def test_the_password_of_the_url_variable_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_URL", "redis://:hunter2@127.0.0.1:1/0")
    shown = Connection("sharded://").as_uri()
    assert shown == "sharded+redis://:**@127.0.0.1:1/0"
