"""Post entries for many accounts: each account deposits, then withdraws it all."""

from ledger import notify, post_entry

ACCOUNTS = [f"acct-{n}" for n in range(20)]

for account in ACCOUNTS:
    post_entry.delay(account, 0, 100)
for account in ACCOUNTS:
    for seq in range(1, 11):
        post_entry.delay(account, seq, -10)  # never overdraws if applied in order
for account in ACCOUNTS:
    notify.delay(account, "your statement is ready")  # keyed by config (shard_keys)
    # A key given per call wins over every other source:
    notify.apply_async((account, "thank you"), shard_key=f"vip-{account}")
print(f"posted {len(ACCOUNTS) * 11} entries for {len(ACCOUNTS)} accounts")
