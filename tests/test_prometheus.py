"""The Prometheus collector: its exposition output, parsed back, on real backends."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import sharded_broker
from sharded_broker.prometheus import ShardedBrokerCollector
from support.redis_server import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path, memory_url: str) -> str:
    if request.param == "memory":
        return memory_url
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queues.db'}"
    return request.getfixturevalue("redis_url")


def scrape(collector: ShardedBrokerCollector) -> tuple[str, Samples]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def queue_label(queue: str, **labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"queue": queue, **labels}.items()))


def test_gauges_per_queue(url: str) -> None:
    broker = sharded_broker.connect(url)
    for i in range(4):
        broker.enqueue("sms", b"x", key=f"user-{i % 2}")
    [lease] = broker.lease("sms")
    broker.enqueue("sms", b"later", key="user-7", delay=3600)
    [doomed] = broker.lease("sms")
    broker.nack(doomed, dead=True, reason="test")
    broker.enqueue("email", b"y")
    broker.pause("email")

    text, samples = scrape(ShardedBrokerCollector(broker))
    assert "# TYPE sharded_broker_messages gauge" in text
    assert samples[("sharded_broker_up", ())] == 1
    assert {state: samples[("sharded_broker_messages", queue_label("sms", state=state))]
            for state in ("ready", "leased", "delayed", "dead")} == {"ready": 2, "leased": 1, "delayed": 1, "dead": 1}
    assert samples[("sharded_broker_keys", queue_label("sms"))] == 3
    assert samples[("sharded_broker_queue_paused", queue_label("sms"))] == 0
    assert samples[("sharded_broker_queue_paused", queue_label("email"))] == 1
    assert samples[("sharded_broker_messages", queue_label("email", state="ready"))] == 1
    assert samples[("sharded_broker_oldest_message_age_seconds", queue_label("sms"))] >= 0
    # Bounded cardinality: the only labels are queue and state, and key for the top keys.
    assert {name for _, labels in samples for name, _ in labels} == {"queue", "state", "key"}
    broker.ack(lease)
    broker.close()


def test_oldest_age_is_the_lag(memory_url: str) -> None:
    now = [1_000_000.0]
    broker = sharded_broker.connect(memory_url, clock=lambda: now[0])
    broker.enqueue("sms", b"x", key="k")
    now[0] += 42.5
    _, samples = scrape(ShardedBrokerCollector(broker))
    assert samples[("sharded_broker_oldest_message_age_seconds", queue_label("sms"))] == 42.5


def test_only_the_chosen_queues(memory_url: str) -> None:
    broker = sharded_broker.connect(memory_url)
    broker.enqueue("sms", b"x")
    broker.enqueue("email", b"y")
    _, samples = scrape(ShardedBrokerCollector(broker, queues=["email", "not-yet"]))
    queues = {dict(labels)["queue"] for _, labels in samples if labels}
    assert queues == {"email", "not-yet"}
    assert samples[("sharded_broker_messages", queue_label("not-yet", state="ready"))] == 0


def test_new_queues_appear_at_the_next_scrape(memory_url: str) -> None:
    broker = sharded_broker.connect(memory_url)
    collector = ShardedBrokerCollector(broker)
    _, before = scrape(collector)
    assert before == {("sharded_broker_up", ()): 1}
    broker.enqueue("sms", b"x")
    _, after = scrape(collector)
    assert after[("sharded_broker_messages", queue_label("sms", state="ready"))] == 1


def test_unreachable_backend_reports_down(caplog: pytest.LogCaptureFixture) -> None:
    broker = sharded_broker.connect(f"redis://:secret-pw@127.0.0.1:{free_port()}/0")
    # Registering describes the metrics without reading the backend, so it cannot fail.
    with caplog.at_level(logging.WARNING, logger="sharded_broker.prometheus"):
        text, samples = scrape(ShardedBrokerCollector(broker))
    assert samples == {("sharded_broker_up", ()): 0}
    assert "cannot read the backend" in caplog.text and "secret-pw" not in caplog.text + text


def test_queues_must_be_names(memory_url: str) -> None:
    broker = sharded_broker.connect(memory_url)
    with pytest.raises(TypeError, match="sequence of queue names"):
        ShardedBrokerCollector(broker, queues="sms")
    # A malformed name is refused now, not reported as an unreachable backend at every scrape.
    with pytest.raises(sharded_broker.InvalidArgument, match="sms digest"):
        ShardedBrokerCollector(broker, queues=["sms", "sms digest"])


def test_prometheus_client_stays_optional() -> None:
    """Importing the package never imports prometheus_client; the collector module says
    how to install it when it is missing."""
    code = (
        "import sys, sharded_broker, sharded_broker.cli\n"
        "assert 'prometheus_client' not in sys.modules, 'imported prometheus_client'\n"
        "sys.modules['prometheus_client'] = None  # as if not installed\n"
        "try:\n"
        "    import sharded_broker.prometheus\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install prometheus_client" in result.stdout

    exporter = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "from sharded_broker.cli import main\n"
        "main(['--url', 'memory://', 'exporter', '--port', '9'])\n"
    )
    result = subprocess.run([sys.executable, "-c", exporter], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: sharded_broker.prometheus needs prometheus_client: pip install prometheus_client (the prometheus extra)"
    ]


def counter(samples: Samples, step: str, queue: str) -> float:
    return samples[(f"sharded_broker_messages_{step}_total", queue_label(queue))]


def test_counters_count_from_the_collector_start(url: str) -> None:
    broker = sharded_broker.connect(url)
    broker.enqueue("sms", b"before", key="a")  # before the first scrape: the baseline
    collector = ShardedBrokerCollector(broker)
    text, samples = scrape(collector)
    assert re.search(r"# TYPE sharded_broker_messages_enqueued(_total)? counter", text)
    assert [counter(samples, step, "sms") for step in ("enqueued", "delivered", "acked", "retried", "dead")] == [0] * 5
    for i in range(3):
        broker.enqueue("sms", b"x", key=f"k{i}")
    leases = broker.lease("sms", 10)
    broker.ack(leases[0])
    broker.nack(leases[1])
    broker.nack(leases[2], dead=True)
    _, samples = scrape(collector)
    assert [counter(samples, step, "sms") for step in ("enqueued", "delivered", "acked", "retried", "dead")] == [
        3, 4, 1, 1, 1,
    ]
    _, again = scrape(collector)  # nothing new: counters hold
    assert counter(again, "enqueued", "sms") == 3
    broker.enqueue("email", b"1")  # a queue that appears later counts from zero
    broker.enqueue("email", b"2")
    _, later = scrape(collector)
    assert counter(later, "enqueued", "email") == 2
    broker.close()


def test_counters_carry_across_minutes(memory_url: str) -> None:
    from support.backends import FakeClock

    clock = FakeClock()
    broker = sharded_broker.connect(memory_url, clock=clock)
    broker.enqueue("sms", b"0")
    collector = ShardedBrokerCollector(broker)
    scrape(collector)
    broker.enqueue("sms", b"1")
    clock.advance(60)
    broker.enqueue("sms", b"2")
    clock.advance(120)
    broker.enqueue("sms", b"3")
    _, samples = scrape(collector)
    assert counter(samples, "enqueued", "sms") == 3


def test_per_key_series_only_for_the_top_keys(url: str) -> None:
    broker = sharded_broker.connect(url)
    for i in range(6):
        for _ in range(i + 1):
            broker.enqueue("sms", b"x", key=f"user-{i}")
    _, samples = scrape(ShardedBrokerCollector(broker, top_keys=3))
    backlogs = {
        dict(labels)["key"]: value for (name, labels), value in samples.items() if name == "sharded_broker_key_backlog"
    }
    assert backlogs == {"user-5": 6, "user-4": 5, "user-3": 4}
    assert samples[("sharded_broker_key_lag_seconds", queue_label("sms", key="user-5"))] >= 0
    _, none = scrape(ShardedBrokerCollector(broker, top_keys=0))
    assert not any(name.startswith("sharded_broker_key_") for name, _ in none)
    with pytest.raises(ValueError, match="top_keys"):
        ShardedBrokerCollector(broker, top_keys=-1)
    broker.close()
