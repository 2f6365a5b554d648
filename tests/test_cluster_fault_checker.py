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


def test_an_ack_resent_after_a_transport_failure_that_finds_it_done_completed_it() -> None:
    events = log(("a", 0, 990.0))
    events += [
        {"e": "start", "id": "m1", "k": "a", "n": 1, "a": 1, "pid": 1, "t": 999.9},
        {"e": "unavailable", "pid": 1, "error": "Error while reading from socket"},
        {"e": "ack", "id": "m1", "ok": False, "pid": 1, "done": 999.95},
    ]
    report = check_failover(events, acked("a", 989, 990), FAULT_AT)
    assert report.clean and report.runs == 2
    # the same False answer without a resend (no transport failure) is no completion
    events[-2] = {"e": "up", "pid": 1}
    assert check_failover(events, acked("a", 989, 990), FAULT_AT).incomplete == ["a#1"]
