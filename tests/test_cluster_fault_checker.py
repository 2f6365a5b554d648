"""The cluster fault tests' checker (tests/support/cluster_faults.py) on made-up event
logs: it must find each kind of fault, and tolerate only what asynchronous replication
explains."""

from __future__ import annotations

from typing import Any

from support.cluster_faults import check_failover

FAULT_AT = 1000.0


def log(*runs: tuple[str, int, float]) -> list[dict[str, Any]]:
    """A start and a successful ack for each (key, number, time), one worker."""
    events: list[dict[str, Any]] = []
    for index, (key, number, when) in enumerate(runs):
        events.append({"e": "start", "id": f"m{index}", "k": key, "n": number, "a": 1, "pid": 1, "t": when})
        events.append({"e": "ack", "id": f"m{index}", "ok": True, "pid": 1, "done": when + 0.01})
    return events


def acked(key: str, *times: float) -> dict[tuple[str, int], float]:
    return {(key, n): when for n, when in enumerate(times)}


def test_in_order_runs_are_clean() -> None:
    report = check_failover(log(("a", 0, 990.0), ("a", 1, 991.0), ("a", 2, 1002.0)), acked("a", 989, 990, 991),
                            FAULT_AT)
    assert report.clean and report.runs == 3


def test_a_message_acknowledged_just_before_the_fault_and_never_run_is_lost_within_the_window() -> None:
    report = check_failover(log(("a", 0, 990.0), ("a", 2, 1003.0)), acked("a", 989.0, 999.5, 1001.0), FAULT_AT)
    assert report.lost == ["a#1"] and not report.order_violations
    assert report.within_asynchronous_replication and not report.clean


def test_a_loss_older_than_the_window_is_a_fault() -> None:
    report = check_failover(log(("a", 0, 990.0), ("a", 2, 1003.0)), acked("a", 989.0, 990.5, 1001.0), FAULT_AT)
    assert report.lost_outside_window == ["a#1"] and not report.within_asynchronous_replication


def test_a_rewind_after_the_fault_over_acks_of_the_window_is_tolerated_once() -> None:
    runs = log(("a", 0, 998.0), ("a", 1, 999.5), ("a", 1, 1002.0), ("a", 2, 1003.0))
    report = check_failover(runs, acked("a", 997.0, 998.0, 999.0), FAULT_AT)
    assert report.redelivered == 1 and not report.rewound  # a re-run of the message that was running
    runs = log(("a", 0, 998.0), ("a", 1, 999.5), ("a", 2, 999.7), ("a", 1, 1002.0), ("a", 2, 1003.0))
    report = check_failover(runs, acked("a", 997.0, 998.0, 999.0), FAULT_AT)
    assert report.rewound == ["a: #2 -> #1"] and report.within_asynchronous_replication


def test_going_back_before_the_fault_or_over_old_acks_is_an_order_violation() -> None:
    before = log(("a", 0, 990.0), ("a", 1, 991.0), ("a", 0, 992.0), ("a", 1, 993.0))
    assert check_failover(before, acked("a", 989, 990), FAULT_AT).order_violations == ["a: #0 started after #1"]
    old_acks = log(("a", 0, 990.0), ("a", 1, 991.0), ("a", 0, 1002.0), ("a", 1, 1003.0))
    assert check_failover(old_acks, acked("a", 989, 990), FAULT_AT).order_violations
    no_fault = log(("a", 0, 998.0), ("a", 1, 999.5), ("a", 0, 1002.0), ("a", 1, 1003.0))
    assert check_failover(no_fault, acked("a", 997, 998), None).order_violations


def test_skipping_a_message_that_ran_elsewhere_is_an_order_violation() -> None:
    runs = log(("a", 0, 990.0), ("a", 2, 991.0), ("a", 1, 992.0))
    report = check_failover(runs, acked("a", 989, 989.5, 990), FAULT_AT)
    assert "a: #2 after #0, skipping unlost [1]" in report.order_violations


def test_a_message_started_but_never_acked_is_incomplete() -> None:
    events = log(("a", 0, 990.0))
    events.append({"e": "start", "id": "late", "k": "a", "n": 1, "a": 1, "pid": 2, "t": 991.0})
    report = check_failover(events, acked("a", 989, 990), FAULT_AT)
    assert report.incomplete == ["a#1"] and not report.within_asynchronous_replication


def refused_run(key: str, number: int, when: float) -> list[dict[str, Any]]:
    """One run whose ack was refused (its work ended 10 ms after it started)."""
    return [{"e": "start", "id": "refused", "k": key, "n": number, "a": 1, "pid": 2, "t": when},
            {"e": "ack", "id": "refused", "ok": False, "pid": 2, "done": when + 0.01}]


def test_a_run_whose_ack_was_in_flight_to_the_master_that_died_is_unconfirmed_not_incomplete() -> None:
    # The dead master applied the ack but never answered; the retry found it settled.
    events = log(("a", 0, 990.0)) + refused_run("a", 1, 999.9) + log(("a", 2, 1003.0))
    report = check_failover(events, acked("a", 989, 999.8, 1001), FAULT_AT)
    assert report.unconfirmed == ["a#1"] and not report.incomplete
    assert report.clean and report.runs == 3


def test_a_refused_ack_far_from_the_fault_or_with_no_master_dead_is_incomplete() -> None:
    events = log(("a", 0, 990.0)) + refused_run("a", 1, 995.0) + log(("a", 2, 1003.0))
    report = check_failover(events, acked("a", 989, 994, 1001), FAULT_AT)
    assert report.incomplete == ["a#1"] and not report.within_asynchronous_replication
    events = log(("a", 0, 990.0)) + refused_run("a", 1, 999.9) + log(("a", 2, 1003.0))
    report = check_failover(events, acked("a", 989, 999.8, 1001), None)
    assert report.incomplete == ["a#1"] and not report.clean
