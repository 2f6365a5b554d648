"""Embedded, durable backend on one SQLite file, shared by every process of one host.

``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` (as SQLAlchemy spells
them). Options: ``clock`` (a callable returning seconds since the epoch, for tests),
``busy_timeout`` (seconds a call keeps retrying while other processes hold the write
lock, default 30; after that it raises BackendUnavailable) and ``synchronous``
(``"normal"``, the default: nothing committed is lost when a process dies, the last
transactions may be lost on power failure; ``"full"``: not even then).

Guarantees, on top of the backend contract (``sharded_broker/backend.py``; the design in
docs/design.md). The engine's decisions are the planner's (``backends/planner.py``), the
same code as the memory backend's; this package keeps them in SQLite:

- ``backend.py``: the facade (options, one transaction per operation, waiting, events);
- ``store.py``: a transaction, and each queue in it as the planner's store;
- ``connection.py``: opening the file, fork safety, retries, error translation;
- ``sql.py`` with ``schema.sql`` and ``queries.sql``: the schema and the statements by name.

- Every operation is one short write transaction (``BEGIN IMMEDIATE``, WAL mode), so any
  number of processes and threads may enqueue, lease and ack on the same file at once. A
  process killed at any moment (SIGKILL) loses nothing that was committed; its leases
  come back when their visibility timeout ends. ``database is locked`` never reaches the
  caller: busy transactions are retried until ``busy_timeout``.
- Batch calls (``enqueue_many``, ``lease`` with a limit, ``ack_many``, ``release_many``,
  ``extend_many``) are one transaction each. Every hot statement reads through an index
  (O(log n)); the heaps of the memory model are partial indexes here. Like every backend,
  a call promotes at most ``planner.SWEEP_LIMIT`` due delayed messages, returns at most as
  many expired leases and forgets at most as many expired dedup entries.
- One clock per database: the caller host's ``time.time()``, never allowed to run behind
  the latest time already written for the queue (kept in its row of the ``queues`` table,
  so that a transaction writes no extra row for it), so deadlines and ready times never
  go backwards when processes' clocks differ slightly.
- Thread-safe (one connection per process, behind a lock) and fork-safe (a child process
  never reuses its parent's connection; it opens its own on first use).
- ``wait`` never spins: it sleeps 5 ms, doubling to 100 ms, between polls, and wakes at
  once when this process enqueues, acks or returns a message.
- Metrics are rows per (queue, key, minute) with the five counts, summed in memory during
  a transaction and upserted at its end; a transaction that creates rows forgets at most a
  few expired ones (``metrics_window``, default 3600 seconds; per-key rows
  ``key_metrics_window``, default the same). Per-key backlogs are an index on the keys
  table, so the largest backlogs are read without a scan.
- ``purge`` deletes in transactions of at most ``PURGE_CHUNK`` (1,000) messages, so the
  write lock is never held for long; the queue is consistent after each.
- Events (``events=True``; off by default, as each one is a row written) go to an
  ``events`` table capped at ``EVENTS_KEPT`` rows (each transaction deletes as many old
  rows as it adds); subscribers tail it by polling every 50 ms, in any process. A
  subscriber further than ``EVENTS_KEPT`` events behind misses the oldest.
"""

from .backend import SQLiteBackend
from .sql import ADDED_COLUMNS

__all__ = ["ADDED_COLUMNS", "SQLiteBackend"]
