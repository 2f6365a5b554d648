"""sharded_broker.integrations.support: what both adapters share, without either framework."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest

import sharded_broker
from sharded_broker import InvalidArgument, InvalidArgumentType
from sharded_broker.integrations.support import (
    ArgumentKey, LeaseHeartbeat, cancel_by_ref, coerce_key, framework_ref, get_by_ref, queues_to_search,
)


class KeyError_(InvalidArgument):
    pass


class KeyTypeError_(KeyError_, InvalidArgumentType):
    pass


def test_coerce_key_takes_str_and_int_and_refuses_the_rest_naming_where() -> None:
    assert coerce_key("user-1", "here") == "user-1"
    assert coerce_key(42, "here") == "42"
    assert coerce_key(None, "here") is None
    for value in (True, 1.0, b"k", ["k"]):
        with pytest.raises(InvalidArgumentType, match=rf"^argument 'k' must be a str or an int, not {type(value).__name__}"):
            coerce_key(value, "argument 'k'")
    with pytest.raises(InvalidArgument, match=r"^argument 'k': shard key must not be empty"):
        coerce_key("", "argument 'k'")
    with pytest.raises(KeyTypeError_):
        coerce_key(2.5, "x", error=KeyError_, type_error=KeyTypeError_)
    with pytest.raises(KeyError_, match="control character"):
        coerce_key("a\nb", "x", error=KeyError_, type_error=KeyTypeError_)


def test_argument_key_reads_keyword_then_position_then_default() -> None:
    def notify(user_id, text, *, channel="sms"):  # noqa: ANN001, ANN202
        ...

    by_user = ArgumentKey("task 'notify'", "user_id", notify)
    assert by_user((7, "hi"), {}) == 7
    assert by_user((), {"user_id": 8}) == 8
    assert ArgumentKey("task 'notify'", "channel", notify)((7, "hi"), {}) == "sms"
    with pytest.raises(KeyError_, match=r"task 'notify' takes its shard key from argument 'user_id', but the message does not give it"):
        ArgumentKey("task 'notify'", "user_id", notify, error=KeyError_)((), {"text": "hi"})
    # Without a signature (a task known only by name) a keyword still works.
    unknown = ArgumentKey("task 'remote'", "user_id", None)
    assert unknown((), {"user_id": 9}) == 9
    with pytest.raises(InvalidArgument, match="does not give it"):
        unknown((9,), {})


def test_the_heartbeat_keeps_held_leases_alive_and_reports_refused_ones(memory_url: str) -> None:
    with sharded_broker.connect(memory_url, visibility_timeout=0.6) as broker:
        broker.enqueue_many("q", [sharded_broker.Message(b"x", key=k) for k in ("a", "b")])
        kept, settled = broker.lease("q", 2)
        held = [("kept", kept), ("settled", settled)]
        refused: list[tuple[str, str]] = []
        lock = threading.Lock()

        def expired(owner: str, lease: sharded_broker.Lease) -> None:
            with lock:
                refused.append((owner, lease.key or ""))
                held[:] = [(o, held_lease) for o, held_lease in held if held_lease is not lease]

        def leases() -> list[tuple[str, sharded_broker.Lease]]:
            with lock:
                return list(held)

        assert broker.ack(settled)  # settled before the first beat: its extension is refused
        heartbeat: LeaseHeartbeat[str] = LeaseHeartbeat(
            broker, held=leases, expired=expired, interval=lambda: 0.2, visibility_timeout=lambda: 0.6,
            logger=logging.getLogger("test"),
        )
        heartbeat.start()
        try:
            time.sleep(2.0)  # more than three visibility timeouts
            assert broker.lease("q", 1) == []  # "a" is still held: nothing delivered again
            assert broker.ack(kept)  # and its token is still the current one
        finally:
            heartbeat.stopped.set()
            heartbeat.join(5)
        assert not heartbeat.is_alive()
        assert refused == [("settled", "b")]


def test_framework_ref_is_the_id_or_none_when_the_engine_would_refuse_it() -> None:
    assert framework_ref("3f2a-task") == "3f2a-task"
    assert [framework_ref(bad) for bad in (None, "", "x" * 513, 42, "\udcff")] == [None] * 5


def test_cancel_and_get_by_ref_search_the_queues_in_order(broker_url: str) -> None:
    with sharded_broker.connect(broker_url) as broker:
        broker.enqueue("first", b"other")
        mid = broker.enqueue("second", b"x", ref="task-1")
        queues = queues_to_search(broker, ["nowhere", "first"])
        assert queues == ["nowhere", "first", "second"]
        assert get_by_ref(broker, "task-1", queues).id == mid
        assert get_by_ref(broker, "task-2", queues) is None
        missing = cancel_by_ref(broker, "task-2", queues)
        assert (missing.queue, missing.state, missing.ref) == ("nowhere", None, "task-2")
        result = cancel_by_ref(broker, "task-1", queues)
        assert result.cancelled and (result.queue, result.id) == ("second", mid)


def test_the_support_module_imports_neither_framework() -> None:
    code = (
        "import sys, sharded_broker.integrations.support; "
        "print(sorted(m for m in ('celery', 'kombu', 'dramatiq') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
