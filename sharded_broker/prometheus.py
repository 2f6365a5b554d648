"""Prometheus metrics for sharded-broker queues (needs the ``prometheus`` extra).

>>> from prometheus_client import REGISTRY
>>> from sharded_broker.prometheus import ShardedBrokerCollector
>>> REGISTRY.register(ShardedBrokerCollector(broker))          # doctest: +SKIP

Each scrape reads every queue's stats afresh (one ``stats`` call per queue, no scans)
and exposes, with a ``queue`` label:

- ``sharded_broker_messages{queue, state}``: messages by state (ready, leased, delayed, dead);
- ``sharded_broker_keys{queue}``: shard keys with at least one live message;
- ``sharded_broker_oldest_message_age_seconds{queue}``: age of the oldest ready message (lag);
- ``sharded_broker_queue_paused{queue}``: 1 while the queue is paused;
- ``sharded_broker_up``: 1 when the last scrape read the backend, 0 when it failed (the
  other metrics are then left out of that scrape rather than failing it).

Labels are bounded by the number of queues: no per-key labels.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Sequence

try:
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "sharded_broker.prometheus needs prometheus_client: pip install 'sharded-broker[prometheus]'"
    ) from exc

from .broker import Broker
from .cli import BACKEND_ERRORS
from .models import QueueStats

__all__ = ["ShardedBrokerCollector"]

log = logging.getLogger(__name__)

STATES = ("ready", "leased", "delayed", "dead")


class ShardedBrokerCollector(Collector):
    """A custom collector: gauges of ``broker``'s queues, read at scrape time.

    ``queues``: the queues to export; default every queue the backend knows, looked up
    at each scrape so new queues appear by themselves.
    """

    def __init__(self, broker: Broker, queues: Sequence[str] | None = None) -> None:
        if queues is not None and (isinstance(queues, str) or not all(isinstance(q, str) for q in queues)):
            raise TypeError("queues must be a sequence of queue names")
        self.broker = broker
        self.queues = list(queues) if queues is not None else None

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering the collector does not read the backend.
        return self._families()

    def collect(self) -> Iterator[Metric]:
        try:
            names = self.queues if self.queues is not None else self.broker.queues()
            rows = [self.broker.stats(name) for name in names]
        except BACKEND_ERRORS as exc:
            # One line per failed scrape: a traceback every scrape interval would drown the log.
            log.warning("sharded-broker metrics: cannot read the backend: %s: %s", type(exc).__name__, exc)
            up = GaugeMetricFamily("sharded_broker_up", "1 when the broker's backend answered this scrape.")
            up.add_metric([], 0)
            yield up
            return
        yield from self._families(rows)

    @staticmethod
    def _families(rows: Sequence[QueueStats] | None = None) -> list[Metric]:
        """The metric families, with samples from ``rows`` (None: names only)."""
        up = GaugeMetricFamily("sharded_broker_up", "1 when the broker's backend answered this scrape.")
        messages = GaugeMetricFamily(
            "sharded_broker_messages", "Messages in a queue, by state.", labels=["queue", "state"]
        )
        keys = GaugeMetricFamily(
            "sharded_broker_keys", "Shard keys with at least one ready, delayed or leased message.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "sharded_broker_oldest_message_age_seconds",
            "Age of the oldest ready message of a queue (0 when none): the queue's lag.",
            labels=["queue"],
        )
        paused = GaugeMetricFamily("sharded_broker_queue_paused", "1 while a queue is paused.", labels=["queue"])
        if rows is not None:
            up.add_metric([], 1)
        for row in rows or ():
            for state in STATES:
                messages.add_metric([row.queue, state], getattr(row, state))
            keys.add_metric([row.queue], row.keys)
            oldest.add_metric([row.queue], row.oldest_age)
            paused.add_metric([row.queue], 1 if row.paused else 0)
        return [up, messages, keys, oldest, paused]
