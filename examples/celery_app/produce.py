"""Post entries for many accounts: each account deposits 100, then withdraws 10 at a time.

    python produce.py                                  # 20 accounts, 10 withdrawals each
    python produce.py alice bob carol --withdrawals 5 --no-notify

Entries are posted interleaved (every account's deposit, then every account's first
withdrawal, ...), so one account's entries sit among the others' in the queue. Each run
starts from an empty ledger, so ``check.py`` checks this run only.
"""

import argparse

from ledger import notify, post_entry, reset_ledger

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("accounts", nargs="*", default=[f"acct-{n}" for n in range(20)], metavar="ACCOUNT")
parser.add_argument("--withdrawals", type=int, default=10, help="withdrawals of 10 per account (default 10)")
parser.add_argument("--no-notify", action="store_true", help="post ledger entries only, no notifications")
options = parser.parse_args()
if not 0 <= options.withdrawals <= 10:
    parser.error(f"--withdrawals must be 0 to 10 (ten of 10 empty the deposit of 100), not {options.withdrawals}")

reset_ledger()
for account in options.accounts:
    post_entry.delay(account, 0, 100)
for seq in range(1, options.withdrawals + 1):
    for account in options.accounts:
        post_entry.delay(account, seq, -10)  # never overdraws if applied in order
if not options.no_notify:
    for account in options.accounts:
        notify.delay(account, "your statement is ready")  # keyed by config (shard_keys)
        # A key given per call wins over every other source:
        notify.apply_async((account, "thank you"), shard_key=f"vip-{account}")
print(f"posted {len(options.accounts) * (options.withdrawals + 1)} entries for {len(options.accounts)} accounts")
