"""The `dramatiq` command line as real subprocesses (several processes and threads each)
against a throwaway redis-server, a throwaway Redis Cluster and a SQLite file: per-key order, retries, and a worker
process killed with SIGKILL in the middle of its tasks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import dramatiq
import pytest

from sharded_broker.integrations.dramatiq import ShardedBroker

APP_DIR = Path(__file__).parent
READY_LINE = "Worker process is ready for action."


class Cli:
    """One `dramatiq dramatiq_cli_app` command: a main process and its worker processes."""

    def __init__(self, env: dict[str, str], tmp_path: Path, name: str, processes: int, threads: int) -> None:
        self.stderr_path = tmp_path / f"{name}.stderr"
        self.processes = processes
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "dramatiq", "dramatiq_cli_app",
                    "--path", str(APP_DIR),
                    "--processes", str(processes),
                    "--threads", str(threads),
                    "--worker-shutdown-timeout", "10000",
                ],
                env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.stderr_path.read_text(errors="replace").count(READY_LINE) < self.processes:
            assert self.process.poll() is None, f"dramatiq exited early:\n{self.stderr_path.read_text()}"
            assert time.monotonic() < deadline, f"workers not ready:\n{self.stderr_path.read_text()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # dramatiq's graceful shutdown
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def child_pids(self) -> set[int]:
        """The worker processes of this command (and any other child of its main process)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return {int(pid) for pid in children.split()}


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def cli_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/cli.db"
    else:
        url = request.getfixturevalue("redis_cluster_url" if request.param == "redis-cluster" else "redis_url")
    (tmp_path / "marks").mkdir()
    (tmp_path / "events.log").touch()
    return {
        **os.environ,
        "SHARDED_BROKER_URL": url,
        "SHARDED_BROKER_VISIBILITY_TIMEOUT": "1.5",
        "DRAMATIQ_APP_LOG": str(tmp_path / "events.log"),
        "DRAMATIQ_APP_MARKS": str(tmp_path / "marks"),
        "dramatiq_worker_timeout": "250",  # milliseconds; shortens the graceful shutdowns
        "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_DIR), os.environ.get("PYTHONPATH")])),
    }


@pytest.fixture
def start_cli(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Cli]]:
    started: list[Cli] = []

    def start(name: str, processes: int, threads: int) -> Cli:
        cli = Cli(cli_env, tmp_path, name, processes, threads)
        started.append(cli)
        return cli

    yield start
    for cli in started:
        cli.stop()


@pytest.fixture
def producer(cli_env: dict[str, str]) -> Iterator[tuple[ShardedBroker, dramatiq.Actor]]:
    """A producer process's view: the same actor declared on its own ShardedBroker."""
    broker = ShardedBroker(url=cli_env["SHARDED_BROKER_URL"])

    @dramatiq.actor(broker=broker, shard_key="key")
    def record(key, n, seconds=0.0, fail_first=False): ...

    yield broker, record
    broker.close()


def read_events(cli_env: dict[str, str]) -> list[tuple[str, str, int, int]]:
    lines = Path(cli_env["DRAMATIQ_APP_LOG"]).read_text().splitlines()
    return [(kind, key, int(n), int(pid)) for kind, key, n, pid in (line.split() for line in lines)]


def check_order(events: list[tuple[str, str, int, int]], keys: list[str], per_key: int, killed: set[int] = frozenset()) -> None:
    """Per key: never two runs at once, and the completed runs in order 0..per_key-1.

    A run started by a killed process never ends; it may be followed by another start.
    A message may complete twice in a row (killed after its work, before its ack).
    """
    by_key: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for kind, key, n, pid in events:
        by_key[key].append((kind, n, pid))
    assert sorted(by_key) == sorted(keys)
    for key, key_events in by_key.items():
        running = None
        completed: list[int] = []
        for kind, n, pid in key_events:
            if kind == "start":
                assert running is None or running[1] in killed, f"{key}: two runs at once: {key_events}"
                running = (n, pid)
            else:
                assert running == (n, pid), f"{key}: {kind} of a run that was not running: {key_events}"
                running = None
                if kind == "end" and completed[-1:] != [n]:
                    completed.append(n)
        assert completed == list(range(per_key)), f"{key}: {key_events}"


def test_two_worker_processes_keep_per_key_order_with_retries(start_cli, producer, cli_env) -> None:
    broker, record = producer
    cli = start_cli("workers", processes=2, threads=3)
    cli.wait_ready()
    keys = [f"user-{i}" for i in range(12)]
    for n in range(6):
        for key in keys:
            record.send(key, n, seconds=random.uniform(0, 0.01), fail_first=n == 2)
    broker.join("default", timeout=60_000, fail_fast=True)

    events = read_events(cli_env)
    check_order(events, keys, per_key=6)
    assert sum(kind == "fail" for kind, *_ in events) == len(keys)
    worker_pids = {pid for *_, pid in events}
    assert len(worker_pids) == 2 and worker_pids <= cli.child_pids()  # both processes took part


def test_sigkill_of_a_worker_process_loses_nothing_and_keeps_order(start_cli, producer, cli_env) -> None:
    broker, record = producer
    doomed = start_cli("doomed", processes=2, threads=2)
    survivor = start_cli("survivor", processes=1, threads=2)
    doomed.wait_ready()
    survivor.wait_ready()
    doomed_pids = doomed.child_pids()
    keys = [f"device-{i}" for i in range(12)]
    for n in range(3):
        for key in keys:
            record.send(key, n, seconds=0.25)

    # Kill a worker process of `doomed` while it is running a task. Tasks run in waves of
    # equal length, so pick a run that started after the first wave ended: it has most of
    # its 0.25 s still to go.
    deadline = time.monotonic() + 30
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "the doomed workers never ran a task"
        events = read_events(cli_env)
        first_end = next((i for i, (kind, *_) in enumerate(events) if kind == "end"), len(events))
        open_runs: dict[tuple[str, int], tuple[int, int]] = {}
        for index, (kind, key, n, pid) in enumerate(events):
            if kind == "start":
                open_runs[key, n] = (index, pid)
            else:
                open_runs.pop((key, n), None)
        fresh = [pid for index, pid in open_runs.values() if index > first_end and pid in doomed_pids]
        if fresh:
            victim = fresh[0]
        else:
            time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)

    broker.join("default", timeout=60_000)
    events = read_events(cli_env)
    check_order(events, keys, per_key=3, killed={victim})
    interrupted = {(key, n) for kind, key, n, pid in events if pid == victim and kind == "start"} - {
        (key, n) for kind, key, n, pid in events if pid == victim and kind == "end"
    }
    assert interrupted, "the victim was killed between tasks"
    for key, n in interrupted:  # run again, by another process, after its lease expired
        assert any(kind == "end" and (k, m) == (key, n) and pid != victim for kind, k, m, pid in events)
    assert broker.dead_letters == []
