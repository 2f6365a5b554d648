"""Wait until every payment is settled, then check each account's ledger.

    python check.py [--timeout 120]

Exits 1 if a payment is missing, ran twice, ran out of order, or was dead-lettered.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections import defaultdict

from app import LEDGER_PATH, apply_payment, broker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the workers")
    args = parser.parse_args()

    # Dead letters are reported below with the rest, not raised.
    broker.join(apply_payment.queue_name, timeout=int(args.timeout * 1000), fail_fast=False)
    ledger = sqlite3.connect(LEDGER_PATH)
    sequences: dict[str, list[int]] = defaultdict(list)
    for account, seq in ledger.execute("SELECT account, seq FROM entries ORDER BY rowid"):
        sequences[account].append(seq)
    problems = [
        f"{account}: applied in order {seqs}"
        for account, seqs in sorted(sequences.items())
        if seqs != list(range(len(seqs)))
    ]
    lengths = {len(seqs) for seqs in sequences.values()}
    if len(lengths) > 1:
        problems.append(f"accounts have different numbers of payments: {sorted(lengths)}")
    dead_letters = broker.dead_messages
    for dead in dead_letters:
        problems.append(f"dead letter {dead.message}: {dead.reason}")
    entries = sum(len(seqs) for seqs in sequences.values())
    print(f"{len(sequences)} accounts, {entries} payments applied, {len(dead_letters)} dead letters")
    for problem in problems:
        print("PROBLEM:", problem)
    print("every account's payments applied once, in order" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
