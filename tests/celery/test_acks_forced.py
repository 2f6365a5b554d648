"""The transport makes keyed order hold under Celery's defaults, and says so when a
configuration explicitly asks for what would break it (early acks, acking a task whose
pool process died)."""

from __future__ import annotations

import logging

import pytest


def _connect(app) -> None:
    app.finalize()  # as a worker has, before its consumer connects
    with app.connection_for_read() as connection:
        connection.connect()


def test_explicit_early_acks_and_acked_worker_losses_are_overridden_with_a_warning(make_app, caplog) -> None:
    app = make_app()
    app.conf.task_acks_late = False
    app.conf.task_reject_on_worker_lost = False

    @app.task(shared=False, shard_key="user")
    def keyed(user): ...

    caplog.set_level(logging.WARNING, logger="sharded_broker.integrations.celery")
    _connect(app)
    assert keyed.acks_late and keyed.reject_on_worker_lost
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "task_acks_late=False is ignored with a sharded+ broker" in text
    assert "the next task of the key would run at the same time" in text
    assert "task_reject_on_worker_lost=False is ignored" in text and "lost, and its key would move on" in text


def test_a_task_asking_for_early_acks_is_named_in_the_warning(make_app, caplog) -> None:
    app = make_app()
    app.conf.task_acks_late = True

    @app.task(shared=False, name="tasks.early", acks_late=False, shard_key="user")
    def early(user): ...

    caplog.set_level(logging.WARNING, logger="sharded_broker.integrations.celery")
    _connect(app)
    assert early.acks_late
    assert any("task 'tasks.early': acks_late=False is ignored" in r.getMessage() for r in caplog.records)


def test_defaults_are_forced_without_a_warning(make_app, caplog) -> None:
    app = make_app()

    @app.task(shared=False, shard_key="user")
    def keyed(user): ...

    caplog.set_level(logging.WARNING, logger="sharded_broker.integrations.celery")
    _connect(app)
    assert keyed.acks_late and keyed.reject_on_worker_lost
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]


@pytest.mark.parametrize("form", ["env", "list"])
def test_the_url_from_the_environment_or_a_failover_list_is_recognised(make_app, memory_broker_url, monkeypatch, form) -> None:
    app = make_app()
    if form == "env":
        app.conf.broker_url = None
        monkeypatch.setenv("CELERY_BROKER_URL", memory_broker_url)
    else:
        app.conf.broker_url = [memory_broker_url, memory_broker_url]

    @app.task(shared=False, shard_key="user")
    def keyed(user): ...

    assert app.conf.get("broker_url") is None or not isinstance(app.conf.get("broker_url"), str)
    _connect(app)
    assert keyed.acks_late and keyed.reject_on_worker_lost
