"""A user's Celery tests on the plugin's celery_config, as docs/testing.md shows them
(written into a throwaway project by test_pytest_plugin.py)."""

INI = """
[pytest]
sharded_broker_celery = true
"""

CONFTEST = '''
import pytest


@pytest.fixture(scope="session")
def celery_worker_pool():
    return "threads"  # tasks run in threads of the test process, as the solo pool would
'''

TESTS = '''
import time

from sharded_broker.integrations.pytest_plugin import KeyRecorder, assert_key_order


def test_keyed_tasks_run_in_order(celery_app, celery_worker, sharded_drain):
    assert celery_app.conf.broker_url.startswith("sharded+memory://")
    recorder = KeyRecorder()

    @celery_app.task(name="apply", shard_key="account")
    def apply(account, seq):
        with recorder.run(account, seq):
            time.sleep(0.005)

    celery_worker.reload()
    for seq in range(4):
        for account in ("alice", "bob"):
            apply.delay(account, seq)
    apply.delay(None, 99)  # no key: runs in parallel with everything
    ran = sharded_drain("celery")
    assert ran["alice"] == [("apply", ("alice", seq), {}) for seq in range(4)]
    assert [args[1] for _, args, _ in ran["bob"]] == [0, 1, 2, 3]
    assert [args for _, args, _ in ran[None]] == [(None, 99)]
    assert assert_key_order(recorder.runs)["alice"] == [0, 1, 2, 3]


def test_results_and_canvas(celery_app, celery_worker):
    from celery import chain

    @celery_app.task
    def add(x, y):
        return x + y

    celery_worker.reload()
    assert chain(add.s(1, 2), add.s(3)).apply_async().get(timeout=10) == 6
'''

SESSION_TESTS = '''
def test_the_session_worker(celery_session_app, celery_session_worker):
    assert celery_session_app.conf.broker_url.startswith("sharded+")

    @celery_session_app.task
    def mul(x, y):
        return x * y

    celery_session_worker.reload()
    assert mul.delay(6, 7).get(timeout=10) == 42
'''
