"""pytest plugin: fixtures for testing apps that use sharded-broker (docs/testing.md).

Registered for every pytest run by the package's ``pytest11`` entry point, and inert until
a test asks for one of its fixtures: importing it imports neither Dramatiq nor Celery.

Fixtures (function scope unless said otherwise):

``sharded_broker_url``
    The engine URL of this test: a fresh ``memory://`` store by default; with
    ``--sharded-broker-url`` (or the ini option ``sharded_broker_url``) a ``sqlite:///``
    file or a ``redis://`` server instead. ``sqlite://`` alone means a fresh file in the
    test's ``tmp_path``. Queues a test leaves on a given SQLite file or Redis server are
    purged (dead letters too) when it ends.
``sharded_clock``
    The :class:`~sharded_broker.testing.TestClock` of this test's engine (``None`` on
    Redis, which keeps its own clock).
``sharded_engine``
    A :class:`sharded_broker.Broker` on that URL and clock.
``sharded_dramatiq_broker``, ``sharded_dramatiq_worker``
    A :class:`~sharded_broker.integrations.dramatiq.ShardedBroker`, set as Dramatiq's
    global broker and booted (``process_boot``, as the ``dramatiq`` command does), and a
    running in-process ``dramatiq.Worker`` for it. Actors the app declared at import on
    its own global broker send through this one during the test.
``sharded_drain``
    ``sharded_drain(queue="default", timeout=30.0)``: wait until the queue is empty while
    the worker runs it, moving the test clock past delays, retry backoffs and rate
    intervals; return what ran, per shard key, in the order it ran (Dramatiq: the
    messages; Celery: ``(task name, args, kwargs)``).
``sharded_celery_config`` (session)
    Celery settings for ``celery.contrib.pytest`` (pytest-celery): ``broker_url`` is
    ``sharded+`` and the session's engine URL. With ``--sharded-broker-celery`` (or the
    ini option ``sharded_broker_celery = true``) it *is* ``celery_config``, so
    ``celery_app``/``celery_worker`` use sharded-broker with no conftest change.

The assertion helpers ``assert_key_order`` and ``KeyRecorder`` are in
:mod:`sharded_broker.testing` (re-exported here).
"""

from __future__ import annotations

import itertools
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

import sharded_broker
from sharded_broker.testing import KeyRecorder, TestClock, assert_key_order, drain_engine

__all__ = ["KeyRecorder", "assert_key_order"]

URL_OPTION = "sharded_broker_url"
CELERY_OPTION = "sharded_broker_celery"
DEFAULT_URL = "memory://"
# Leases in tests never need to expire (workers run in the test process and do not die),
# and a long lease lets sharded_drain move the clock in long steps.
TEST_VISIBILITY_TIMEOUT = 24 * 3600.0

_names = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sharded-broker")
    group.addoption(
        "--sharded-broker-url", dest=URL_OPTION, default=None,
        help="engine URL for the sharded_* fixtures: memory:// (default), sqlite:// (a file per test), "
        "sqlite:///path.db or redis://host:port/db",
    )
    group.addoption(
        "--sharded-broker-celery", dest=CELERY_OPTION, action="store_true", default=None,
        help="make celery.contrib.pytest's celery_config use sharded-broker (sharded_celery_config)",
    )
    parser.addini(URL_OPTION, "engine URL for the sharded_* fixtures (default memory://)", default=DEFAULT_URL)
    parser.addini(CELERY_OPTION, "make celery_config use sharded-broker", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    if _celery_enabled(config):
        # Registered now, after every entry-point plugin, so that these fixtures win:
        # celery.contrib.pytest's in-process celery_worker (pytest-celery 1.x replaces it
        # with a Docker container worker) and this celery_config. A conftest's own
        # celery_config still comes first.
        if not config.pluginmanager.has_plugin("celery.contrib.pytest"):
            config.pluginmanager.import_plugin("celery.contrib.pytest")
        config.pluginmanager.register(_CeleryConfigOverride(), "sharded_broker_celery_config")


def _celery_enabled(config: pytest.Config) -> bool:
    flag = config.getoption(CELERY_OPTION)
    return bool(flag) if flag is not None else bool(config.getini(CELERY_OPTION))


def configured_url(config: pytest.Config) -> str:
    """The engine URL the options name, checked (an unknown scheme fails here, named)."""
    url = config.getoption(URL_OPTION) or config.getini(URL_OPTION) or DEFAULT_URL
    sharded_broker.broker.backend_class(url)
    return url


def _fresh_url(url: str, directory: Callable[[], Path]) -> tuple[str, bool]:
    """(a URL for one test or session, whether its store is shared and must be purged)."""
    if url in ("memory://", "memory:///"):
        return f"memory://pytest-{uuid.uuid4().hex[:8]}-{next(_names)}", False
    if url in ("sqlite://", "sqlite:///"):
        return f"sqlite:///{directory()}/sharded-broker.db", False
    return url, True


def _engine_options(url: str, clock: Optional[TestClock]) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": TEST_VISIBILITY_TIMEOUT}
    if clock is not None:
        options["clock"] = clock
    return options


def _clock_for(url: str) -> Optional[TestClock]:
    return None if url.startswith(("redis://", "rediss://")) else TestClock()


def _purge_all(url: str, clock: Optional[TestClock]) -> None:
    with sharded_broker.connect(url, **_engine_options(url, clock)) as engine:
        for queue in engine.queues():
            engine.purge(queue)
            engine.purge(queue, dead=True)


class _TestState:
    """What this test's sharded fixtures share: the URL, clock, engine in use, and what ran."""

    def __init__(self, url: str, shared: bool) -> None:
        self.url = url
        self.shared = shared
        self.clock = _clock_for(url)
        self.engine: Optional[sharded_broker.Broker] = None
        self._lock = threading.Lock()
        self._ran: list[tuple[Optional[str], Any]] = []

    def record(self, key: Optional[str], item: Any) -> None:
        with self._lock:
            self._ran.append((key, item))

    def take_ran(self) -> dict[Optional[str], list[Any]]:
        with self._lock:
            ran, self._ran = self._ran, []
        by_key: dict[Optional[str], list[Any]] = {}
        for key, item in ran:
            by_key.setdefault(key, []).append(item)
        return by_key


@pytest.fixture
def _sharded_state(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_TestState]:
    url, shared = _fresh_url(configured_url(request.config), lambda: tmp_path_factory.mktemp("sharded"))
    state = _TestState(url, shared)
    yield state
    if shared:
        _purge_all(url, state.clock)


@pytest.fixture
def sharded_broker_url(_sharded_state: _TestState) -> str:
    """The engine URL of this test (see the module docstring)."""
    return _sharded_state.url


@pytest.fixture
def sharded_clock(_sharded_state: _TestState) -> Optional[TestClock]:
    """This test's engine clock (``None`` on Redis)."""
    return _sharded_state.clock


@pytest.fixture
def sharded_engine(_sharded_state: _TestState) -> Iterator[sharded_broker.Broker]:
    """A sharded-broker engine on this test's URL and clock."""
    engine = sharded_broker.connect(_sharded_state.url, **_engine_options(_sharded_state.url, _sharded_state.clock))
    if _sharded_state.engine is None:
        _sharded_state.engine = engine
    yield engine
    engine.close()


# -- Dramatiq ---------------------------------------------------------------------------


@pytest.fixture
def sharded_dramatiq_broker(_sharded_state: _TestState) -> Iterator[Any]:
    """A booted ShardedBroker on this test's engine, set as Dramatiq's global broker."""
    import dramatiq
    import dramatiq.broker

    from .dramatiq import ShardedBroker

    state = _sharded_state
    broker = ShardedBroker(url=state.url, **_engine_options(state.url, state.clock))
    broker.add_middleware(_dramatiq_recorder(state))
    previous = dramatiq.broker.global_broker
    # Actors the app declared at import, on its own global broker (a StubBroker, say),
    # send through this one for the test, so switching needs no change to the app.
    adopted = list(previous.actors.values()) if previous is not None else []
    for actor in adopted:
        actor.broker = broker
        broker.declare_actor(actor)
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    state.engine = broker.engine
    try:
        yield broker
    finally:
        broker.flush_all()
        broker.close()
        if previous is not None:  # else nothing was adopted
            for actor in adopted:
                actor.broker = previous
            dramatiq.set_broker(previous)


def _dramatiq_recorder(state: _TestState) -> Any:
    from dramatiq.middleware import Middleware

    class RecordRuns(Middleware):
        """Records each message that ran (succeeded or failed), for sharded_drain."""

        def after_process_message(self, broker, message, *, result=None, exception=None):
            state.record(message.options.get("shard_key"), message._message)

        def after_skip_message(self, broker, message):
            state.record(message.options.get("shard_key"), message._message)

    return RecordRuns()


@pytest.fixture
def sharded_dramatiq_worker(sharded_dramatiq_broker: Any) -> Iterator[Any]:
    """A running in-process dramatiq.Worker for ``sharded_dramatiq_broker``."""
    import dramatiq

    worker = dramatiq.Worker(sharded_dramatiq_broker, worker_threads=4, worker_timeout=100)
    worker.start()
    yield worker
    worker.stop()


# -- draining -----------------------------------------------------------------------------


@pytest.fixture
def sharded_drain(_sharded_state: _TestState, request: pytest.FixtureRequest) -> Callable[..., dict]:
    """``sharded_drain(queue="default", timeout=30.0)``: run the queue empty now; what ran
    per shard key (``None``: unkeyed), in the order it ran."""

    def drain(queue: str = "default", *, timeout: float = 30.0) -> dict[Optional[str], list[Any]]:
        if _sharded_state.engine is None:
            raise RuntimeError(
                "sharded_drain needs a worker's broker: use it with sharded_dramatiq_broker (and "
                "sharded_dramatiq_worker), or with celery_app/celery_worker on sharded_celery_config"
            )
        drain_engine(_sharded_state.engine, queue, clock=_sharded_state.clock, timeout=timeout)
        return _sharded_state.take_ran()

    if "celery_app" in request.fixturenames:
        _attach_celery(_sharded_state, request)
    return drain


# -- Celery -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sharded_celery_session(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[_TestState]:
    url, shared = _fresh_url(configured_url(request.config), lambda: tmp_path_factory.mktemp("sharded-celery"))
    state = _TestState(url, shared)
    yield state
    if shared:
        _purge_all(url, state.clock)


@pytest.fixture(scope="session")
def sharded_celery_config(_sharded_celery_session: _TestState) -> dict[str, Any]:
    """Celery settings on sharded-broker for ``celery_config`` (a session's engine)."""
    state = _sharded_celery_session
    return {
        "broker_url": f"sharded+{state.url}",
        "result_backend": "cache+memory://",
        "broker_transport_options": _engine_options(state.url, state.clock),
    }


class _CeleryConfigOverride:
    """``celery_config`` = ``sharded_celery_config`` (registered by --sharded-broker-celery)."""

    @pytest.fixture(scope="session")
    def celery_config(self, sharded_celery_config: dict[str, Any]) -> dict[str, Any]:
        return dict(sharded_celery_config)


def _attach_celery(state: _TestState, request: pytest.FixtureRequest) -> None:
    """Point sharded_drain at this test's Celery app: its engine, clock and task runs."""
    from celery.signals import task_postrun

    app = request.getfixturevalue("celery_app")
    url = str(app.conf.broker_url or "")
    if not url.startswith("sharded+"):
        raise RuntimeError(f"sharded_drain: celery_app's broker_url is {url!r}, not a sharded+ URL")
    options = dict(app.conf.broker_transport_options or {})
    state.url = url.removeprefix("sharded+")
    state.clock = options.get("clock")
    engine = sharded_broker.connect(state.url, **{k: v for k, v in options.items() if k in ("clock", "visibility_timeout")})
    state.engine = engine

    def record(sender: Any = None, task: Any = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
        request_ = getattr(task, "request", None)
        state.record(getattr(request_, "shard_key", None), (task.name, tuple(args or ()), dict(kwargs or {})))

    task_postrun.connect(record, weak=False)

    def detach() -> None:
        task_postrun.disconnect(record)
        engine.close()

    request.addfinalizer(detach)
