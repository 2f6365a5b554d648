"""The SQL of the SQLite backend: the schema (``schema.sql``), the fixed statements by name
(``queries.sql``), and the few statements built from column lists.

docs/design.md ("SQLite") describes the layout.
"""

from __future__ import annotations

import functools
from importlib import resources

from ...models import COUNTERS

# Version 2 added the metrics and events tables and the keys_backlog index; a version 1
# file gains them when opened. Version 3 replaced two indexes (OLD_INDEXES) by
# messages_key_order and messages_open_batches, and keeps each queue's clock floor in its
# row (queues.last_now) instead of one 'last_now' in meta, and the metrics counts of the
# current minute in the queue's and the key's rows (ADDED_COLUMNS): an older file gains
# them when opened, each queue starting from the old floor. Version 4 keeps a leased
# message's batch size and delivery time (messages.batch_size, leased_at: ADDED_COLUMNS).
# Version 5 keeps a key's weight and its round in progress (keys.weight, round_turns,
# round_at, round_order: ADDED_COLUMNS) and adds the messages_key_delayed index
# (max_pending_per_key counts a key's delayed messages); an older file gains both when opened.
# Version 6 adds the schedules table (recurrent messages) and its schedules_due index,
# which an older file gains when opened (the schema's statements create what is missing).
# Version 7 keeps a message's ref (messages.ref: ADDED_COLUMNS) and indexes it (messages_ref).
SCHEMA_VERSION = 7
OLD_INDEXES = ("messages_ready", "messages_batch")
_OPEN_MINUTE_COLUMNS = {"open_minute": "REAL", **{f"open_{c}": "INTEGER NOT NULL DEFAULT 0" for c in COUNTERS}}
ADDED_COLUMNS = {
    "queues": {"last_now": "REAL NOT NULL DEFAULT 0", **_OPEN_MINUTE_COLUMNS},
    "keys": {
        **_OPEN_MINUTE_COLUMNS, "weight": "INTEGER", "round_turns": "INTEGER NOT NULL DEFAULT 0",
        "round_at": "REAL", "round_order": "INTEGER",
    },
    "messages": {
        "batch_size": "INTEGER NOT NULL DEFAULT 0", "leased_at": "REAL NOT NULL DEFAULT 0", "ref": "TEXT",
    },
}
NAME_MARK = "-- name: "


def _text(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def schema_statements() -> list[str]:
    """The statements of schema.sql, in order (its whole-line comments left out)."""
    text = "\n".join(line for line in _text("schema.sql").splitlines() if not line.lstrip().startswith("--"))
    return [statement for statement in text.split(";") if statement.strip()]


def load_queries(text: str) -> dict[str, str]:
    """The statements of a queries file by name: each follows a ``-- name: NAME`` line, up to
    its ``;`` (other comment lines dropped, lines joined by spaces)."""
    queries: dict[str, str] = {}
    name = None
    lines: list[str] = []
    for line in text.splitlines() + [NAME_MARK]:
        if line.startswith(NAME_MARK):
            if name is not None:
                queries[name] = " ".join(lines).rstrip(";").strip()
            name, lines = line[len(NAME_MARK):].strip() or None, []
        elif line.strip() and not line.lstrip().startswith("--") and name is not None:
            lines.append(line.strip())
    return queries


QUERIES = load_queries(_text("queries.sql"))

# Adds a transaction's counts to a metrics row; answers the row's new sum of counts (equal
# to the counts added when the row was created now).
METRICS_UPSERT = (
    f"INSERT INTO metrics (queue, key, minute, {', '.join(COUNTERS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (queue, key, minute) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)
    + " RETURNING " + " + ".join(COUNTERS)
)

# The columns of a queue's and a key's row that hold the counts of its open minute.
OPEN_COUNTS = tuple(f"open_{counter}" for counter in COUNTERS)
QUEUE_FIELDS = (
    "tail_seq", "head_seq", "next_order", "next_dead", "paused", "ready", "delayed", "leased", "dead", "keys",
    "held_messages", "last_now", "open_minute", *OPEN_COUNTS,
)
KEY_FIELDS = (
    "count", "slots", "ready_at", "ready_order", "interval", "last_delivery", "paused", "open_minute", *OPEN_COUNTS,
    "weight", "round_turns", "round_at", "round_order",
)
QUEUE_SELECT = f"SELECT {', '.join(QUEUE_FIELDS)} FROM queues WHERE name = ?"
QUEUE_INSERT = f"INSERT INTO queues (name, {', '.join(QUEUE_FIELDS)}) VALUES (?{', ?' * len(QUEUE_FIELDS)})"
KEY_SELECT = f"SELECT {', '.join(KEY_FIELDS)} FROM keys WHERE queue = ? AND key = ?"
KEY_INSERT = f"INSERT INTO keys (queue, key, {', '.join(KEY_FIELDS)}) VALUES (?, ?{', ?' * len(KEY_FIELDS)})"


# Statements whose columns vary, built once per set of columns (a handful of sets).
@functools.cache
def message_update(columns: tuple[str, ...]) -> str:
    return f"UPDATE messages SET {', '.join(c + ' = ?' for c in columns)} WHERE id = ?"


@functools.cache
def queue_update(fields: tuple[int, ...]) -> str:
    """The UPDATE of a queue row's fields at these positions in QUEUE_FIELDS."""
    return f"UPDATE queues SET {', '.join(QUEUE_FIELDS[i] + ' = ?' for i in fields)} WHERE name = ?"


@functools.cache
def key_update(fields: tuple[int, ...]) -> str:
    """The UPDATE of a key row's fields at these positions in KEY_FIELDS."""
    return f"UPDATE keys SET {', '.join(KEY_FIELDS[i] + ' = ?' for i in fields)} WHERE queue = ? AND key = ?"


@functools.cache
def keys_select(count: int) -> str:
    """The rows of ``count`` keys (callers pad their lists to a few counts: powers of two)."""
    return f"SELECT key, {', '.join(KEY_FIELDS)} FROM keys WHERE queue = ? AND key IN ({', '.join('?' * count)})"


@functools.cache
def message_insert(extra_columns: tuple[str, ...]) -> str:
    return (
        "INSERT INTO messages (id, queue, key, payload, priority, seq, enqueued_at, headers, dedup_id, "
        f"at_head, state, not_before{''.join(', ' + c for c in extra_columns)}) "
        f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?{', ?' * len(extra_columns)})"
    )
