"""The randomized fault campaign (tests/support/campaign.py), once per target: the engine's
own consumers, `celery worker` and `dramatiq`. Marked soak: `make reliability` runs it
(SB_CAMPAIGN_SECONDS per target, default 180; SB_CAMPAIGN_SEED replays a schedule).

Goal: no overlap, no order violation, nothing lost; duplicates (a run whose ack a fault
made impossible, run again) are counted and reported, as are the overlaps of a frozen
worker's own tasks, which nothing can prevent (see docs/celery.md, "Limits").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.campaign import celery_target, dramatiq_target, engine_target, run_campaign

pytestmark = [pytest.mark.reliability, pytest.mark.soak, pytest.mark.timeout(0)]


@pytest.mark.parametrize("make_target", [engine_target, celery_target, dramatiq_target], ids=["engine", "celery", "dramatiq"])
def test_fault_campaign(make_target, tmp_path: Path) -> None:
    outcome = run_campaign(make_target(tmp_path), tmp_path)
    report = outcome.report
    assert sum(outcome.faults.values()) > 0 and report.completed > 0, outcome.summary()
    assert not report.overlaps and not report.order_violations and not report.lost, (
        outcome.summary() + f"\nreplay with SB_CAMPAIGN_SEED={outcome.seed}"
    )
