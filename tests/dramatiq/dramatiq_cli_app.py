"""The app that tests/dramatiq/test_dramatiq_cli.py runs under the `dramatiq` command.

Configured by environment variables: SHARDED_BROKER_URL, SHARDED_BROKER_VISIBILITY_TIMEOUT
(seconds), DRAMATIQ_APP_LOG (a file every process appends one line per event to) and
DRAMATIQ_APP_MARKS (a directory recording which messages already failed once).
"""

from __future__ import annotations

import os
import time

import dramatiq

from sharded_broker.integrations.dramatiq import ShardedBroker

broker = ShardedBroker(
    url=os.environ["SHARDED_BROKER_URL"],
    visibility_timeout=float(os.environ.get("SHARDED_BROKER_VISIBILITY_TIMEOUT", "5")),
)
dramatiq.set_broker(broker)


def log(*fields: object) -> None:
    # One write() on an O_APPEND file is atomic, so lines of all processes interleave
    # in the order the events happened.
    fd = os.open(os.environ["DRAMATIQ_APP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(map(str, fields)) + "\n").encode())
    finally:
        os.close(fd)


@dramatiq.actor(shard_key="key", max_retries=3, min_backoff=50, max_backoff=200)
def record(key: str, n: int, seconds: float = 0.0, fail_first: bool = False) -> None:
    log("start", key, n, os.getpid())
    time.sleep(seconds)
    if fail_first:
        mark = os.path.join(os.environ["DRAMATIQ_APP_MARKS"], f"{key}-{n}")
        if not os.path.exists(mark):
            open(mark, "w").close()
            log("fail", key, n, os.getpid())
            raise RuntimeError(f"first attempt of {key} #{n} fails")
    log("end", key, n, os.getpid())
