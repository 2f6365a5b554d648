"""Prometheus metrics for sharded-broker queues (needs the ``prometheus`` extra).

>>> from prometheus_client import REGISTRY
>>> from sharded_broker.prometheus import ShardedBrokerCollector
>>> REGISTRY.register(ShardedBrokerCollector(broker))          # doctest: +SKIP

Each scrape reads every queue's stats, recent per-minute metrics and largest key
backlogs afresh (three calls per queue, no scans) and exposes, with a ``queue`` label:

- ``sharded_broker_messages{queue, state}``: messages by state (ready, leased, delayed, dead);
- ``sharded_broker_keys{queue}``: shard keys with at least one live message;
- ``sharded_broker_oldest_message_age_seconds{queue}``: age of the oldest ready message (lag);
- ``sharded_broker_queue_paused{queue}``: 1 while the queue is paused;
- ``sharded_broker_messages_enqueued_total{queue}``, ``..._delivered_total``,
  ``..._acked_total``, ``..._retried_total``, ``..._dead_total``: counters of what every
  process using the broker did, for ``rate()`` and ``increase()``. The backend keeps
  per-minute counts (not lifetime totals), so each collector counts from its own start:
  a restarted exporter is a counter reset, which ``rate()`` handles;
- ``sharded_broker_key_backlog{queue, key}`` and ``sharded_broker_key_lag_seconds{queue,
  key}``: the ``top_keys`` keys (default 10) with the largest backlog per queue;
- ``sharded_broker_up``: 1 when the last scrape read the backend, 0 when it failed (the
  other metrics are then left out of that scrape rather than failing it).

Labels are bounded: by the number of queues, and per-key labels by ``top_keys`` per queue.
A key leaves the top-N series when its backlog falls behind others (its series then
stops, as a finished key's should).
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable, Iterator, Sequence

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "sharded_broker.prometheus needs prometheus_client: pip install prometheus_client (the prometheus extra)"
    ) from exc

from . import validation
from .broker import Broker
from .backend import minute_of
from .errors import ShardedBrokerError
from .models import COUNTERS, KeyInfo, MinuteMetrics, QueueStats

__all__ = ["ShardedBrokerCollector"]

log = logging.getLogger(__name__)

STATES = ("ready", "leased", "delayed", "dead")
DEFAULT_TOP_KEYS = 10
# Minutes of metrics read at most per scrape (scrapes further apart lose the older minutes).
MAX_MINUTES_PER_SCRAPE = 60


class _Totals:
    """Monotonic totals per queue built from the backend's per-minute counts: each scrape
    adds what every minute since the previous scrape gained."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: dict[str, list[int]] = {}
        self.seen: dict[str, dict[float, tuple[int, ...]]] = {}
        # Until the first scrape is done, what a queue already counted is the baseline;
        # a queue that appears later counts from zero (everything it did is new).
        self.started = False

    def minutes_to_read(self, queue: str, now_minute: float) -> int:
        seen = self.seen.get(queue)
        if not seen:
            return 1
        return int(min(MAX_MINUTES_PER_SCRAPE, (now_minute - max(seen)) // 60 + 1))

    def add(self, queue: str, rows: Sequence[MinuteMetrics]) -> list[int]:
        first_look = queue not in self.seen and not self.started
        seen = self.seen.get(queue, {})
        totals = self.totals.setdefault(queue, [0] * len(COUNTERS))
        now_seen = {}
        for row in rows:
            counts = tuple(getattr(row, name) for name in COUNTERS)
            # The first look sets the baseline: counting starts at this collector's start.
            before = counts if first_look else seen.get(row.minute, (0,) * len(COUNTERS))
            for i, (value, old) in enumerate(zip(counts, before)):
                totals[i] += max(0, value - old)
            now_seen[row.minute] = counts
        self.seen[queue] = now_seen
        return list(totals)


class ShardedBrokerCollector(Collector):
    """A custom collector: gauges of ``broker``'s queues, read at scrape time.

    ``queues``: the queues to export; default every queue the backend knows, looked up
    at each scrape so new queues appear by themselves. ``top_keys``: how many keys per
    queue get per-key series (0: none).
    """

    def __init__(
        self, broker: Broker, queues: Sequence[str] | None = None, *, top_keys: int = DEFAULT_TOP_KEYS
    ) -> None:
        if queues is not None and (isinstance(queues, str) or not all(isinstance(q, str) for q in queues)):
            raise TypeError("queues must be a sequence of queue names")
        if isinstance(top_keys, bool) or not isinstance(top_keys, int) or not 0 <= top_keys <= 1000:
            raise ValueError(f"top_keys must be an int from 0 to 1000, not {top_keys!r}")
        self.broker = broker
        self.queues = [validation.queue_name(q) for q in queues] if queues is not None else None
        self.top_keys = top_keys
        self._totals = _Totals()

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering the collector does not read the backend.
        return self._families()

    def collect(self) -> Iterator[Metric]:
        try:
            names = self.queues if self.queues is not None else self.broker.queues()
            rows = [self.broker.stats(name) for name in names]
            now_minute = minute_of(self.broker.now())
            with self._totals.lock:
                totals = {
                    name: self._totals.add(
                        name, self.broker.metrics(name, self._totals.minutes_to_read(name, now_minute))
                    )
                    for name in names
                }
                self._totals.started = True
            keys = [info for name in names for info in (self.broker.keys(name, self.top_keys) if self.top_keys else [])]
        except ShardedBrokerError as exc:
            # One line per failed scrape: a traceback every scrape interval would drown the log.
            log.warning("sharded-broker metrics: cannot read the backend: %s: %s", type(exc).__name__, exc)
            up = GaugeMetricFamily("sharded_broker_up", "1 when the broker's backend answered this scrape.")
            up.add_metric([], 0)
            yield up
            return
        yield from self._families(rows, totals, keys)

    @staticmethod
    def _families(
        rows: Sequence[QueueStats] | None = None,
        totals: dict[str, list[int]] | None = None,
        keys: Sequence[KeyInfo] = (),
    ) -> list[Metric]:
        """The metric families, with samples from ``rows``, ``totals`` and ``keys``
        (None: names only)."""
        up = GaugeMetricFamily("sharded_broker_up", "1 when the broker's backend answered this scrape.")
        messages = GaugeMetricFamily(
            "sharded_broker_messages", "Messages in a queue, by state.", labels=["queue", "state"]
        )
        keys_family = GaugeMetricFamily(
            "sharded_broker_keys", "Shard keys with at least one ready, delayed or leased message.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "sharded_broker_oldest_message_age_seconds",
            "Age of the oldest ready message of a queue (0 when none): the queue's lag.",
            labels=["queue"],
        )
        paused = GaugeMetricFamily("sharded_broker_queue_paused", "1 while a queue is paused.", labels=["queue"])
        counters = {
            name: CounterMetricFamily(
                f"sharded_broker_messages_{name}",
                f"Messages {name if name != 'dead' else 'dead-lettered'} in a queue, by every process, since this collector started.",
                labels=["queue"],
            )
            for name in COUNTERS
        }
        key_backlog = GaugeMetricFamily(
            "sharded_broker_key_backlog",
            "Ready, delayed and leased messages of a shard key (only the keys with the largest backlogs).",
            labels=["queue", "key"],
        )
        key_lag = GaugeMetricFamily(
            "sharded_broker_key_lag_seconds",
            "Age of a shard key's next message (only the keys with the largest backlogs).",
            labels=["queue", "key"],
        )
        if rows is not None:
            up.add_metric([], 1)
        for queue, values in (totals or {}).items():
            for name, value in zip(COUNTERS, values):
                counters[name].add_metric([queue], value)
        for info in keys:
            key_backlog.add_metric([info.queue, info.key], info.backlog)
            key_lag.add_metric([info.queue, info.key], info.lag)
        for row in rows or ():
            for state in STATES:
                messages.add_metric([row.queue, state], getattr(row, state))
            keys_family.add_metric([row.queue], row.keys)
            oldest.add_metric([row.queue], row.oldest_age)
            paused.add_metric([row.queue], 1 if row.paused else 0)
        return [up, messages, keys_family, oldest, paused, *counters.values(), key_backlog, key_lag]
