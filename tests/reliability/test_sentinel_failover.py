"""A Sentinel failover after the primary crashed (SIGKILL), under load."""

from __future__ import annotations

from pathlib import Path

from support.redis_sentinel import SentinelGroup, failover_under_load


def test_a_primary_killed_under_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """The primary SIGKILLed while three consumers and a producer run with wait_replicas=1:
    the Sentinels promote the replica, producers and consumers follow it by themselves,
    and every enqueue acknowledged before or after the crash runs, in key order."""
    with SentinelGroup() as group:
        report, published, refused = failover_under_load(group.url(), tmp_path, group.kill_primary)
    print(f"published {published}, refused {refused} times; {report.summary()}")
    assert report.runs >= published > 0
    assert report.clean, report.summary()
