"""One process's connection to a SQLite queue file: opening it (path checks, pragmas,
schema upgrades), fork safety, transactions, and retries while another connection holds
the write lock. Every sqlite3 error leaves here as one of the project's errors
(``InvalidURL`` for a file that cannot serve, ``BackendUnavailable`` otherwise).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
import weakref
from typing import Callable, TypeVar

from ...errors import BackendUnavailable, InvalidURL
from . import sql

T = TypeVar("T")

# Pages SQLite keeps in memory per connection (negative: KiB): at a million messages the
# indexes of the hot statements stay cached instead of being read again from the file.
CACHE_KIB = 64 * 1024
# Bytes of the database file read through a memory map instead of read() calls: pages
# come from the OS page cache (shared by every process on the host) without a copy or a
# system call. At a million messages (a 340 MB file) a lease + ack then costs as much as
# at 100,000 (measured: 0.77 of the 100,000 rate without it, 1.00 with it).
MMAP_BYTES = 1024 * 1024 * 1024
# WAL pages written before a commit checkpoints them into the database (SQLite's default:
# 1,000). Each checkpoint syncs the WAL and the database file to disk, the largest cost of
# a small transaction; a larger WAL syncs ten times less often and writes each hot page
# back once per checkpoint instead of once per 1,000 frames. After a checkpoint the file
# is cut back to WAL_KEPT_BYTES.
WAL_CHECKPOINT_PAGES = 10_000
WAL_KEPT_BYTES = 64 * 1024 * 1024

# Prepared statements the sqlite3 module keeps per connection (its default: 128). The
# queries by name, and the UPDATEs of queue and key rows built per set of changed columns,
# are more than that in a mixed workload; a statement dropped from the cache is compiled
# again on its next use.
STATEMENTS_CACHED = 512

# Connections inherited through fork: the child must neither use nor close them (closing
# could disturb the parent's locks and WAL state), so they are kept alive here, unused.
_INHERITED: list[sqlite3.Connection] = []
_CONNECTIONS: "weakref.WeakSet[Connection]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Locks held by another thread at fork time would never be released in the child."""
    for connection in list(_CONNECTIONS):
        connection.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Connection:
    """This process's connection to one file, behind a lock (thread-safe), opened again
    in a forked child (fork-safe)."""

    def __init__(self, path: str, *, busy_timeout: float, synchronous: str) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.lock = threading.RLock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        _CONNECTIONS.add(self)
        self._check_path()
        with self.lock:
            self.get()

    def _check_path(self) -> None:
        """Refuse, before SQLite does with a vaguer message, paths that cannot work."""
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise InvalidURL(f"sqlite database {self.path}: directory {directory} does not exist")
        if os.path.isdir(self.path):
            raise InvalidURL(f"sqlite database {self.path} is a directory, not a file")
        if os.path.exists(self.path):
            mode = os.stat(self.path).st_mode
            # root may write anywhere; a file without write bits is still meant read-only.
            if not os.access(self.path, os.R_OK | os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                raise InvalidURL(
                    f"sqlite database {self.path} is read-only; the broker needs to write to it"
                )
        # WAL mode keeps its -wal and -shm files next to the database.
        if not os.access(directory, os.W_OK | os.X_OK):
            raise InvalidURL(
                f"sqlite database {self.path}: directory {directory} is not writable (WAL needs its -wal and -shm files there)"
            )

    def get(self) -> sqlite3.Connection:
        """This process's connection (called with the lock held)."""
        if self._pid != os.getpid():
            # Forked: the parent's connection (and maybe its lock state) must not be reused.
            if self._conn is not None:
                _INHERITED.append(self._conn)
            self._conn = None
            self._pid = os.getpid()
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def close(self) -> None:
        with self.lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=min(self.busy_timeout, 5.0), isolation_level=None, check_same_thread=False,
                cached_statements=STATEMENTS_CACHED,
            )
            conn.row_factory = sqlite3.Row
        except sqlite3.Error as exc:
            raise self.error(exc) from None
        try:
            self.retry_busy(lambda: self._setup(conn))
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise InvalidURL(f"sqlite database {self.path} could not switch to WAL mode (mode is {mode})")
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_KEPT_BYTES}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in range(sql.SCHEMA_VERSION + 1):
                raise InvalidURL(
                    f"sqlite database {self.path} has schema version {version}; this version of sharded-broker "
                    f"reads version {sql.SCHEMA_VERSION}"
                )
            if version != sql.SCHEMA_VERSION:
                self._upgrade(conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _upgrade(conn: sqlite3.Connection) -> None:
        """Bring a new or older file to the current schema, in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        for index in sql.OLD_INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {index}")
        # Columns first: the schema's new indexes may cover them.
        for table, columns in sql.ADDED_COLUMNS.items():
            present = {column[1] for column in conn.execute(f"PRAGMA table_info({table})")}
            if not present:
                continue  # a new file: the schema creates the table whole
            for column, declaration in columns.items():
                if column not in present:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            if table == "queues" and "last_now" not in present:
                conn.execute(
                    "UPDATE queues SET last_now = COALESCE((SELECT value FROM meta WHERE name = 'last_now'), 0)"
                )
        for statement in sql.schema_statements():
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={sql.SCHEMA_VERSION}")
        conn.execute("COMMIT")

    def error(self, exc: sqlite3.Error) -> Exception:
        """A clear error for ``exc``, naming the database file."""
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            return InvalidURL(f"{self.path} is not a SQLite database (or it is corrupt): {text}")
        if "readonly" in text or "read-only" in text:
            return InvalidURL(f"sqlite database {self.path} is read-only; the broker needs to write to it: {text}")
        if "unable to open" in text:
            return InvalidURL(f"cannot open sqlite database {self.path}: {text}")
        return BackendUnavailable(f"sqlite database {self.path}: {text}")

    @staticmethod
    def _busy(exc: sqlite3.Error) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))

    def retry_busy(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt``, retrying while another connection holds the write lock."""
        give_up_at = time.monotonic() + self.busy_timeout
        pause = 0.001
        while True:
            try:
                return attempt()
            except sqlite3.Error as exc:
                if not self._busy(exc):
                    raise self.error(exc) from None
                if time.monotonic() >= give_up_at:
                    raise BackendUnavailable(
                        f"sqlite database {self.path} stayed locked by another connection for "
                        f"{self.busy_timeout:g}s (busy_timeout)"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def transaction(self, body: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """``body`` inside one transaction (``BEGIN IMMEDIATE`` to write; a read sees one
        consistent snapshot and is rolled back), retried while busy."""

        def attempt() -> T:
            conn = self.get()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = body(conn)
                if write:
                    conn.execute("COMMIT")
                return result
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

        with self.lock:
            return self.retry_busy(attempt)
