"""The Dramatiq app the fault campaign runs under the `dramatiq` command.

Environment: SB_CAMPAIGN_URL (engine URL), SB_CAMPAIGN_VT (visibility timeout, seconds),
SB_CAMPAIGN_LOG (the start/end log, see tests/support/runs.py).
"""

from __future__ import annotations

import os
import time

import dramatiq

from sharded_broker.integrations.dramatiq import ShardedBroker

broker = ShardedBroker(
    url=os.environ["SB_CAMPAIGN_URL"],
    visibility_timeout=float(os.environ["SB_CAMPAIGN_VT"]),
    max_deliveries=None,
)
dramatiq.set_broker(broker)


def _log(*fields: object) -> None:
    fd = os.open(os.environ["SB_CAMPAIGN_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(map(str, fields)) + "\n").encode())
    finally:
        os.close(fd)


@dramatiq.actor(shard_key="key", queue_name="campaign", max_retries=0)
def span(key: str, seq: int, seconds: float) -> None:
    _log("start", key, seq, os.getpid(), time.time())
    time.sleep(seconds)
    _log("end", key, seq, os.getpid(), time.time())


@dramatiq.actor(queue_name="campaign", max_retries=0)
def free(seq: int, seconds: float) -> None:
    _log("start", "-", seq, os.getpid(), time.time())
    time.sleep(seconds)
    _log("end", "-", seq, os.getpid(), time.time())
