"""Send payments for many accounts, interleaved: deposit, withdraw it, deposit, withdraw...

    python send.py [--accounts 40] [--payments 10]
"""

from __future__ import annotations

import argparse

from app import LEDGER_PATH, apply_payment, broker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=40)
    parser.add_argument("--payments", type=int, default=10)
    args = parser.parse_args()

    broker.flush_all()
    LEDGER_PATH.unlink(missing_ok=True)
    for seq in range(args.payments):
        for number in range(args.accounts):
            # Even payments deposit, odd ones withdraw what the previous one deposited:
            # any reordering within an account shows up as InsufficientFunds.
            amount = 100 + seq if seq % 2 == 0 else -(100 + seq - 1)
            apply_payment.send(f"acct-{number}", seq, amount, flaky=seq % 3 == 0)
    print(f"sent {args.accounts * args.payments} payments for {args.accounts} accounts")
    print(broker.engine.stats(apply_payment.queue_name))


if __name__ == "__main__":
    main()
