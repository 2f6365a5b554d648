"""Verify that every account's entries applied in order and no balance went negative."""

import sqlite3
import sys

from ledger import DATABASE

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
