"""Workloads for the reliability tests: numbered messages per key, engine worker
processes (``engine_worker.py``) and the checks run on their event logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import sharded_broker
from sharded_broker import Message

WORKER = Path(__file__).with_name("engine_worker.py")


def body(key: str, number: int, do: str = "ok") -> bytes:
    return json.dumps({"k": key, "n": number, "do": do}).encode()


def numbered(keys: Iterable[str], per_key: int, do: str = "ok") -> list[Message]:
    """``per_key`` messages for every key, interleaved across keys, numbered 0.. in each."""
    keys = list(keys)
    return [Message(body(key, n, do), key=key) for n in range(per_key) for key in keys]


class Workers:
    """Engine worker processes sharing one events file."""

    def __init__(self, events: Path, **config: Any) -> None:
        self.events = events
        self.config = {"events": str(events), **config}
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, count: int = 1, **overrides: Any) -> list[subprocess.Popen[bytes]]:
        started = [
            subprocess.Popen([sys.executable, str(WORKER), json.dumps({**self.config, **overrides})])
            for _ in range(count)
        ]
        self.processes += started
        return started

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.processes if p.poll() is None]

    def kill_all(self) -> None:
        for process in self.alive():
            process.kill()
            process.wait(10)

    def stop(self, timeout: float) -> None:
        """Tell every worker to exit at its next lease that finds nothing (``stop_file``),
        and wait for them: once the queue is drained and nothing more is sent, they stop
        at once instead of after ``idle_exit``, and each one's last events are written."""
        Path(self.config["stop_file"]).touch()
        self.wait(timeout)

    def wait(self, timeout: float) -> None:
        """Wait for every worker to exit on its own (``idle_exit``)."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.wait(max(0.1, deadline - time.monotonic()))

    def read(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines()]

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill_all()


def wait_until(condition, timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def wait_for_events(workers: Workers, kind: str, count: int, timeout: float) -> None:
    wait_until(lambda: sum(e["e"] == kind for e in workers.read()) >= count, timeout, f"{count} {kind!r} events")


def drained(broker: sharded_broker.Broker, queue: str) -> bool:
    stats = broker.stats(queue)
    return stats.ready == stats.leased == stats.delayed == 0


def runs_by_key(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The message numbers each key ran, in the order they started, leaving out runs on a
    lease that turned out stale: the ack was refused *and* the message was delivered
    again (that run was not the holder's, and its start line may have been written after
    the redelivery). A refused ack of a message never delivered again is a retried ack
    whose first try took effect: that run counts."""
    starts_per_id: dict[str, int] = defaultdict(int)
    for event in events:
        if event["e"] == "start":
            starts_per_id[event["id"]] += 1
    started: list[tuple[str, int, str, int]] = []
    for event in events:
        if event["e"] == "start":
            started.append((event["k"], event["n"], event["id"], event["pid"]))
        elif event["e"] == "ack" and not event["ok"] and starts_per_id[event["id"]] > 1:
            for index in range(len(started) - 1, -1, -1):
                if started[index][2:] == (event["id"], event["pid"]):
                    del started[index]
                    starts_per_id[event["id"]] -= 1
                    break
    runs: dict[str, list[int]] = defaultdict(list)
    for key, number, _, _ in started:
        runs[key].append(number)
    return runs


def assert_in_order_and_complete(events: list[dict[str, Any]], per_key: dict[str, int]) -> dict[str, int]:
    """Every key ran its messages 0..n-1 in order, where only the message that was
    running may run again; answers the number of repeated runs per key."""
    runs = runs_by_key(events)
    repeats: dict[str, int] = {}
    for key, count in per_key.items():
        ran = runs.get(key, [])
        assert ran, f"key {key!r} never ran"
        assert ran[0] == 0, f"key {key!r} started with message {ran[0]}: {ran}"
        for previous, number in zip(ran, ran[1:]):
            assert number in (previous, previous + 1), f"key {key!r} ran out of order: {ran}"
        assert ran[-1] == count - 1, f"key {key!r} stopped at {ran[-1]} of {count}: {ran}"
        repeats[key] = len(ran) - count
    return repeats
