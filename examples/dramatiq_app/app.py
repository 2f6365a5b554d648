"""A payments ledger on Dramatiq with per-account order.

Each account's payments must apply in the order they were sent: a withdrawal is only
valid after the deposit that funds it. ``apply_payment`` names ``account`` as its shard
key, so payments of one account run one at a time and in order while different accounts
run in parallel, across every worker process and thread. The payment provider is flaky
(the first attempt of every third payment fails); Dramatiq's Retries middleware retries them,
and the retry holds its account's place, so order survives failures too. Those failures
are expected: each is one log line ("Retrying message ..."), not a traceback.

Run it: see README.md next to this file.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

import dramatiq
from dramatiq.middleware import CurrentMessage

from sharded_broker.integrations.dramatiq import ShardedBroker

HERE = Path(__file__).resolve().parent
# SQLite needs no server and is shared by every process on this host (its file named by an
# absolute path, so processes started anywhere share it); for several hosts use your
# Redis: BROKER_URL=redis://HOST:PORT/0.
BROKER_URL = os.environ.get("BROKER_URL", f"sqlite:///{HERE}/queue.db")
LEDGER_PATH = Path(os.environ.get("LEDGER_PATH", HERE / "ledger.db"))

broker = ShardedBroker(url=BROKER_URL, visibility_timeout=10)
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)


class ProviderUnavailable(dramatiq.Retry):
    """The payment provider did not answer; worth retrying. A ``dramatiq.Retry``: Dramatiq
    retries it like any failure but logs it in one line, not as an error with a traceback."""


class InsufficientFunds(Exception):
    """A withdrawal ran before the deposit that funds it: payments ran out of order."""


def open_ledger() -> sqlite3.Connection:
    ledger = sqlite3.connect(LEDGER_PATH, timeout=30, isolation_level=None)
    ledger.execute(
        "CREATE TABLE IF NOT EXISTS entries (account TEXT, seq INTEGER, amount INTEGER, balance INTEGER)"
    )
    return ledger


@dramatiq.actor(shard_key="account", max_retries=5, min_backoff=100, max_backoff=1000, throws=(InsufficientFunds,))
def apply_payment(account: str, seq: int, amount: int, flaky: bool = False) -> None:
    """Apply payment number ``seq`` of ``account`` (a deposit if ``amount`` > 0)."""
    time.sleep(random.uniform(0.005, 0.02))  # the call to the payment provider
    first_attempt = not CurrentMessage.get_current_message().options.get("retries")
    if flaky and first_attempt:
        raise ProviderUnavailable(f"provider timed out on {account} #{seq}")
    ledger = open_ledger()
    try:
        ledger.execute("BEGIN IMMEDIATE")
        (balance,) = ledger.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM entries WHERE account = ?", (account,)
        ).fetchone()
        if balance + amount < 0:
            ledger.execute("ROLLBACK")
            raise InsufficientFunds(f"{account} #{seq}: balance {balance}, payment {amount}")
        ledger.execute("INSERT INTO entries VALUES (?, ?, ?, ?)", (account, seq, amount, balance + amount))
        ledger.execute("COMMIT")
    finally:
        ledger.close()
