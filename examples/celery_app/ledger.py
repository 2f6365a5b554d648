"""A per-account ledger on Celery: entries of one account must apply in order.

Nothing here knows about sharded-broker except the broker URL and where the shard key
comes from. Entries of one account run one at a time, in the order they were posted;
different accounts run in parallel.

Each entry is stored with the balance it produced, when it started and finished
(``time.monotonic()``: one clock for every process on the host) and the worker process
that ran it, so ``check.py`` and the demo (``make demo``) can show what happened.
"""

import os
import sqlite3
import time
from pathlib import Path

from celery import Celery
from celery.utils.log import get_task_logger

HERE = Path(__file__).resolve().parent
# The embedded SQLite broker needs no server; its file is named by an absolute path (four
# slashes) so that producers and workers started anywhere share it. For several hosts
# use your Redis: BROKER_URL=sharded+redis://HOST:PORT/0.
app = Celery("ledger", broker=os.environ.get("BROKER_URL", f"sharded+sqlite:///{HERE}/queue.db"))
app.conf.broker_transport_options = {
    # A worker that dies hands its accounts back after about this many seconds.
    "visibility_timeout": 30,
    # Config only, for tasks whose code you cannot touch: key notify by its argument.
    "shard_keys": {"ledger.notify": "customer_id"},
}

logger = get_task_logger(__name__)
DATABASE = os.environ.get("LEDGER_DB", str(HERE / "ledger.db"))
WORK_SECONDS = float(os.environ.get("LEDGER_WORK_SECONDS", "0.01"))


def reset_ledger() -> None:
    """Start a run from an empty ledger (produce.py calls it before posting)."""
    db = _db()
    try:
        db.execute("DELETE FROM entries")
    finally:
        db.close()


def _db() -> sqlite3.Connection:
    db = sqlite3.connect(DATABASE, timeout=30, isolation_level=None)
    db.execute(
        "CREATE TABLE IF NOT EXISTS entries (account TEXT, seq INTEGER, amount INTEGER, balance INTEGER,"
        " started REAL, finished REAL, pid INTEGER)"
    )
    return db


@app.task(name="ledger.post_entry", shard_key="account")  # the key is the `account` argument
def post_entry(account: str, seq: int, amount: int) -> int:
    """Apply one entry. A withdrawal posted after a deposit must see that deposit."""
    started = time.monotonic()
    time.sleep(WORK_SECONDS)  # some real work
    db = _db()
    try:
        row = db.execute("SELECT balance FROM entries WHERE account = ? ORDER BY rowid DESC LIMIT 1", (account,)).fetchone()
        balance = (row[0] if row else 0) + amount
        db.execute(
            "INSERT INTO entries (account, seq, amount, balance, started, finished, pid) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (account, seq, amount, balance, started, time.monotonic(), os.getpid()),
        )
        return balance
    finally:
        db.close()


@app.task(name="ledger.notify")
def notify(customer_id: str, text: str) -> None:
    logger.info("to %s: %s", customer_id, text)
