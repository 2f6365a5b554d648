"""The helpers Dramatiq's tests import from ``tests.common``, without RabbitMQ (pika)."""

from __future__ import annotations

import platform
from contextlib import contextmanager

import pytest

from dramatiq import Worker
from dramatiq.threading import is_gevent_active


@contextmanager
def worker(*args, **kwargs):
    try:
        worker = Worker(*args, **kwargs)
        worker.start()
        yield worker
    finally:
        worker.stop()


skip_in_ci = pytest.mark.skipif(False, reason="not skipped here")
skip_on_windows = pytest.mark.skipif(platform.system() == "Windows", reason="test skipped on Windows")
skip_on_pypy = pytest.mark.skipif(platform.python_implementation() == "PyPy", reason="no time limits on PyPy")
skip_with_gevent = pytest.mark.skipif(is_gevent_active(), reason="Behaviour with gevent is different.")
skip_without_gevent = pytest.mark.skipif(not is_gevent_active(), reason="Behaviour without gevent is different.")
skip_unless_rabbit_mq = pytest.mark.skipif(True, reason="RabbitMQ tests are not broker-generic")
RABBITMQ_CREDENTIALS = None
