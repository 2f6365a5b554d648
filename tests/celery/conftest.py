"""Fixtures for the Celery adapter tests: a fresh app on a private broker per test."""

from __future__ import annotations

import itertools
import time
from typing import Callable, Iterator

import pytest
from celery import Celery

import sharded_broker

_names = itertools.count()


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.01)


@pytest.fixture
def wait_until() -> Callable[..., None]:
    """``wait_until(condition, timeout, message)``: poll until it holds, else fail the test."""
    return _wait_until


@pytest.fixture
def memory_broker_url() -> str:
    return f"sharded+memory://celery-test-{next(_names)}"


@pytest.fixture
def make_app(memory_broker_url: str) -> Iterator[Callable[..., Celery]]:
    """Build a Celery app on this test's own ``sharded+memory://`` store."""
    apps: list[Celery] = []

    def make(broker_url: str | None = None, **transport_options) -> Celery:
        app = Celery(f"sbtest{next(_names)}", broker=broker_url or memory_broker_url, backend="cache+memory://",
                     set_as_current=False)
        app.conf.broker_transport_options = transport_options
        app.conf.worker_hijack_root_logger = False
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def engine(memory_broker_url: str) -> sharded_broker.Broker:
    """The engine under this test's app, to look at queued messages directly."""
    return sharded_broker.connect(memory_broker_url.removeprefix("sharded+"))
