"""Wait until the workers have run everything queued, then verify that every account's
entries applied in order and no balance went negative.

    python check.py [--timeout 60]
"""

import argparse
import sqlite3
import sys
import time

import sharded_broker
from ledger import DATABASE, app

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the workers (default 60)")
options = parser.parse_args()

# Celery's sharded+ URL is the engine URL behind a prefix; the engine tells what is left.
with sharded_broker.connect(app.conf.broker_url.removeprefix("sharded+")) as engine:
    deadline = time.monotonic() + options.timeout
    while (left := engine.stats(app.conf.task_default_queue)).ready + left.leased + left.delayed:
        if time.monotonic() > deadline:
            sys.exit(f"the workers did not finish within {options.timeout:g} s: {left.ready} ready, "
                     f"{left.leased} running, {left.delayed} delayed (are they running?)")
        time.sleep(0.2)

rows = sqlite3.connect(DATABASE).execute("SELECT account, seq, balance FROM entries ORDER BY rowid").fetchall()
by_account: dict[str, list[int]] = {}
for account, seq, balance in rows:
    by_account.setdefault(account, []).append(seq)
    if balance < 0:
        sys.exit(f"{account} overdrawn at entry {seq}: entries ran out of order")
bad = {a: seqs for a, seqs in by_account.items() if seqs != sorted(seqs)}
if bad:
    sys.exit(f"out of order: {bad}")
print(f"{len(rows)} entries over {len(by_account)} accounts, every account in order")
