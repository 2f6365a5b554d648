"""Security: no pickle, passwords that never leak, TLS with verification on by default,
and prefixes that isolate apps sharing one Redis."""

from __future__ import annotations

import ast
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import dramatiq
import pytest
from celery import Celery
from kombu import Connection

import sharded_broker
from sharded_broker import BackendUnavailable, Message
from sharded_broker.integrations.dramatiq import ShardedBroker
from support.redis_server import RedisServer, free_port
from support.tls import make_ca, tls_server_args

pytestmark = pytest.mark.reliability

Q = "jobs"
ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("sharded-broker")
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "jsonpickle", "shelve", "marshal"}


# -- no pickle ------------------------------------------------------------------------


def _source_files() -> list[Path]:
    return sorted((ROOT / "sharded_broker").rglob("*.py")) + sorted((ROOT / "integrations").rglob("*.py"))


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_pickle_like_serializer(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            modules.add(node.value.split(".")[0])  # importlib.import_module("pickle") and the like
    assert not modules & UNSAFE_MODULES


@pytest.fixture
def pickle_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call of pickle's functions in this test fails it (the classes stay: modules
    imported at collection subclass them)."""

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, name, refuse)


@pytest.mark.parametrize("scheme", ["memory", "sqlite", "redis"])
def test_engine_round_trips_never_pickle(scheme: str, pickle_forbidden: None, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = {"memory": "memory://no-pickle", "sqlite": f"sqlite:///{tmp_path}/q.db"}.get(scheme) or request.getfixturevalue("redis_url")
    with sharded_broker.connect(url, max_deliveries=1) as broker:
        broker.enqueue(Q, b"\x80\x04payload", key="a", headers={"n": [1, "x", None]}, dedup_id="d")
        [lease] = broker.lease(Q)
        assert (lease.payload, lease.headers) == (b"\x80\x04payload", {"n": [1, "x", None]})
        broker.nack(lease, dead=True, reason="r")
        assert broker.dead_letters(Q)[0].headers == {"n": [1, "x", None]}


def test_dramatiq_adapter_stores_json_and_never_pickles(pickle_forbidden: None, redis_url: str) -> None:
    broker = ShardedBroker(url=redis_url)
    try:
        @dramatiq.actor(broker=broker, shard_key="user")
        def notify(user: str, text: str) -> None:
            pass

        notify.send("u1", "hi")
        with sharded_broker.connect(redis_url) as engine:
            [lease] = engine.lease(notify.queue_name)
        assert json.loads(lease.payload)["args"] == ["u1", "hi"]
    finally:
        broker.close()


def test_celery_adapter_defaults_to_json_and_never_pickles(pickle_forbidden: None, redis_url: str) -> None:
    app = Celery("no_pickle", broker=f"sharded+{redis_url}")
    try:
        assert app.conf.task_serializer == "json" and list(app.conf.accept_content) == ["json"]
        app.send_task("tasks.notify", args=("u1",), shard_key="user-1")
        with sharded_broker.connect(redis_url) as engine:
            [lease] = engine.lease("celery")
        message = json.loads(lease.payload)
        assert message["content-type"] == "application/json"
        assert lease.key == "user-1"
    finally:
        app.close()


# -- passwords ------------------------------------------------------------------------

PASSWORD = "Pa55-w0rd-that-must-not-leak"


@pytest.fixture(params=["password", "acl-user"])
def auth_server(request: pytest.FixtureRequest) -> Iterator[tuple[RedisServer, str]]:
    """A redis-server that requires a password (or an ACL user), and the URL that logs in."""
    if request.param == "password":
        server, userinfo = RedisServer(["--requirepass", PASSWORD]), f":{PASSWORD}"
    else:
        acl = ["--user", "default", "off", "--user", "app", "on", f">{PASSWORD}", "~*", "&*", "+@all"]
        server, userinfo = RedisServer(acl), f"app:{PASSWORD}"
    with server:
        yield server, f"redis://{userinfo}@127.0.0.1:{server.port}/0"


def _cli(url: str, *args: str) -> str:
    result = subprocess.run(
        [str(CLI), "--url", url, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60
    )
    return result.stdout + result.stderr


def test_the_password_never_leaks_into_logs_errors_reprs_or_the_cli(
    auth_server: tuple[RedisServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    server, url = auth_server
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with sharded_broker.connect(url) as broker:
        broker.enqueue(Q, b"1", key="a")  # logged in: the server requires it
        [lease] = broker.lease(Q)
        seen += [repr(broker), repr(broker.backend), str(broker.backend.url), repr(lease)]
        seen.append(_cli(url, "stats"))
        seen.append(_cli(url, "stats", "--json"))
        wrong = url.replace(PASSWORD, PASSWORD[::-1])
        with pytest.raises(BackendUnavailable) as refused:
            sharded_broker.connect(wrong).stats(Q)
        seen.append(str(refused.value))
        seen.append(_cli(wrong, "stats"))
        server.kill()
        with pytest.raises(BackendUnavailable) as unavailable:
            broker.ack(lease)
        seen.append(str(unavailable.value))
        seen.append(_cli(url, "stats"))
        server.start()
    assert "***" in seen[-1] and "***" in seen[-2], seen[-2:]
    dramatiq_broker = ShardedBroker(url=url)
    seen.append(repr(dramatiq_broker))
    dramatiq_broker.close()
    with Connection(f"sharded+{url}") as connection:
        seen += [connection.as_uri(), repr(connection)]
    seen.append(caplog.text)
    for text in seen:
        assert PASSWORD not in text and PASSWORD[::-1] not in text, text


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A redis-server speaking TLS only, with a certificate from a CA made for the suite;
    answers the rediss:// URL, that CA, and another CA that did not sign it."""
    directory = tmp_path_factory.mktemp("tls")
    ca, other = make_ca(directory, "ca"), make_ca(directory, "other")
    tls_port = free_port()
    # Also listening on 127.0.0.2, an address the certificate does not name.
    with RedisServer([*tls_server_args(ca, tls_port), "--bind", "127.0.0.1", "127.0.0.2"]):
        yield f"rediss://localhost:{tls_port}/0", ca.ca_cert, other.ca_cert


def test_rediss_with_the_right_ca_works(tls_server: tuple[str, Path, Path]) -> None:
    url, ca_cert, _ = tls_server
    with sharded_broker.connect(url, ssl_ca_certs=str(ca_cert)) as broker:
        broker.enqueue(Q, b"over tls", key="a")
        assert [lease.payload for lease in broker.lease(Q)] == [b"over tls"]
        broker.purge(Q)


def test_rediss_verifies_certificates_by_default(tls_server: tuple[str, Path, Path]) -> None:
    url, _, other_ca = tls_server
    # No CA given: the system's CAs do not know the suite's CA, so the server is refused.
    with pytest.raises(BackendUnavailable, match="(?i)certificate verify failed"):
        sharded_broker.connect(url, socket_connect_timeout=5).stats(Q)
    with pytest.raises(BackendUnavailable, match="(?i)certificate verify failed"):
        sharded_broker.connect(url, ssl_ca_certs=str(other_ca), socket_connect_timeout=5).stats(Q)


def test_rediss_checks_the_host_name(tls_server: tuple[str, Path, Path]) -> None:
    url, ca_cert, _ = tls_server
    # The certificate names 127.0.0.1 and localhost; reached at 127.0.0.2, the same server
    # (signed by the trusted CA) is refused.
    port = url.rsplit(":", 1)[1].split("/")[0]
    with sharded_broker.connect(f"rediss://127.0.0.2:{port}/0", ssl_ca_certs=str(ca_cert), socket_connect_timeout=2) as broker:
        with pytest.raises(BackendUnavailable, match="(?i)certificate verify failed.*(IP address|hostname) mismatch"):
            broker.stats(Q)


def test_plain_redis_to_a_tls_port_fails_cleanly(tls_server: tuple[str, Path, Path]) -> None:
    url, _, _ = tls_server
    plain = url.replace("rediss://", "redis://")
    with pytest.raises(BackendUnavailable):
        sharded_broker.connect(plain, socket_timeout=2, socket_connect_timeout=2).stats(Q)


# -- isolation ------------------------------------------------------------------------


def test_apps_with_different_prefixes_cannot_see_lease_purge_or_replay_each_others_messages(redis_url: str) -> None:
    with sharded_broker.connect(redis_url, prefix="billing", max_deliveries=1) as billing, sharded_broker.connect(
        redis_url, prefix="mailer", max_deliveries=1
    ) as mailer:
        billing.enqueue_many(Q, [Message(b"b1", key="a"), Message(b"b2", key="a"), Message(b"b3", key="z")])
        [dying] = billing.lease(Q)
        billing.nack(dying, dead=True, reason="kept")
        [held] = billing.lease(Q)
        before = billing.stats(Q).as_dict() | {"oldest_age": 0}

        # mailer sees nothing of billing's queue...
        assert mailer.queues() == [] and mailer.lease(Q, 10) == [] and mailer.dead_letters(Q) == []
        assert mailer.stats(Q).as_dict() | {"oldest_age": 0} == {
            "queue": Q, "ready": 0, "leased": 0, "delayed": 0, "dead": 0, "keys": 0, "oldest_age": 0, "paused": False,
        }
        # ...cannot settle, extend or fail billing's leases, even holding one...
        assert mailer.ack(held) is False and mailer.extend(held) is False
        assert mailer.nack(held) is False and mailer.nack(held, dead=True) is False
        # ...nor purge, replay or pause them.
        assert (mailer.purge(Q), mailer.purge(Q, dead=True)) == (0, 0)
        assert mailer.replay(Q) == 0 and mailer.replay(Q, [dying.id]) == 0
        mailer.pause(Q)
        mailer.pause(Q, key="z")
        assert billing.stats(Q).as_dict() | {"oldest_age": 0} == before

        # billing's own view is untouched: its lease, its dead letter, its next messages.
        assert billing.ack(held) is True
        assert [d.id for d in billing.dead_letters(Q)] == [dying.id]
        assert [lease.payload for lease in billing.lease(Q, 10)] == [p for p in (b"b2", b"b3") if p != held.payload]


def test_adapters_with_different_prefixes_are_isolated_too(redis_url: str) -> None:
    billing, mailer = ShardedBroker(url=redis_url, prefix="billing"), ShardedBroker(url=redis_url, prefix="mailer")
    try:
        for broker in (billing, mailer):
            @dramatiq.actor(broker=broker, shard_key="user", queue_name=Q, actor_name="notify")
            def notify(user: str) -> None:
                pass

        billing.get_actor("notify").send("u1")
        assert mailer.engine.stats(Q).ready == 0 and mailer.engine.lease(Q) == []
        mailer.flush(Q)
        assert billing.engine.stats(Q).ready == 1
    finally:
        billing.close()
        mailer.close()
    apps = {}
    for name in ("billing", "mailer"):
        apps[name] = Celery(name, broker=f"sharded+{redis_url}")
        apps[name].conf.broker_transport_options = {"prefix": name}
    try:
        apps["billing"].send_task("tasks.notify", args=("u1",))
        with apps["mailer"].connection_for_write() as connection:
            assert connection.default_channel.queue_purge("celery") == 0
        with sharded_broker.connect(redis_url, prefix="mailer") as engine:
            assert engine.stats("celery").ready == 0
        with sharded_broker.connect(redis_url, prefix="billing") as engine:
            assert engine.stats("celery").ready == 1
    finally:
        for app in apps.values():
            app.close()
