"""Worker death, repeated, through both adapters: the whole `dramatiq` command, or a
prefork `celery worker` (main and worker processes), is SIGKILLed mid-task three times and
started again. Every message completes, in its key's order; only a message that was
running when the processes died runs again. (One SIGKILL of a worker process, for each
adapter, is in tests/dramatiq and tests/celery.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import dramatiq
import pytest

import sharded_broker
from sharded_broker.integrations.dramatiq import ShardedBroker
from support.workload import wait_until

pytestmark = pytest.mark.reliability

APP_DIR = Path(__file__).resolve().parents[1] / "dramatiq"  # dramatiq_cli_app.py
READY_LINE = "Worker process is ready for action."


def start_cli(env: dict[str, str], stderr_path: Path) -> subprocess.Popen[bytes]:
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "dramatiq_cli_app", "--path", str(APP_DIR), "--processes", "1", "--threads", "4"],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )
    wait_until(lambda: READY_LINE in stderr_path.read_text(errors="replace") or process.poll() is not None, 60, "dramatiq to start")
    assert process.poll() is None, stderr_path.read_text()
    return process


def test_repeated_sigkill_of_dramatiq_workers_loses_nothing_and_keeps_order(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "events.log"
    log.touch()
    env = {
        **os.environ,
        "SHARDED_BROKER_URL": redis_url,
        "SHARDED_BROKER_VISIBILITY_TIMEOUT": "1.5",
        "DRAMATIQ_APP_LOG": str(log),
        "DRAMATIQ_APP_MARKS": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_DIR), os.environ.get("PYTHONPATH")])),
    }
    keys, per_key = [f"k{i}" for i in range(6)], 8
    producer = ShardedBroker(url=redis_url)

    @dramatiq.actor(broker=producer, shard_key="key", queue_name="default")
    def record(key, n, seconds=0.0, fail_first=False): ...

    try:
        for n in range(per_key):
            for key in keys:
                record.send(key, n, 0.05)
        kills = 0
        for round_ in range(4):
            process = start_cli(env, tmp_path / f"dramatiq-{round_}.stderr")
            if round_ == 3:
                break
            starts = log.read_text().count("start")
            wait_until(lambda: log.read_text().count("start") >= starts + 6, 60, "tasks to run")
            os.killpg(process.pid, signal.SIGKILL)  # main and worker processes, mid-task
            process.wait(10)
            kills += 1
        with sharded_broker.connect(redis_url) as engine:
            wait_until(lambda: (lambda s: s.ready + s.leased + s.delayed == 0)(engine.stats("default")), 90, "the queue to drain")
            assert engine.stats("default").dead == 0
        process.terminate()
        process.wait(30)
    finally:
        producer.close()
    starts: dict[str, list[int]] = defaultdict(list)
    ends: dict[str, set[int]] = defaultdict(set)
    for kind, key, n, _ in (line.split() for line in log.read_text().splitlines()):
        (starts[key].append(int(n)) if kind == "start" else ends[key].add(int(n)))
    repeats = 0
    for key in keys:
        ran = starts[key]
        assert ran[0] == 0 and all(b in (a, a + 1) for a, b in zip(ran, ran[1:])), f"{key} out of order: {ran}"
        assert ends[key] == set(range(per_key)), f"{key} did not complete: {ran}"
        repeats += len(ran) - per_key
    # Four threads hold at most four messages (of four keys) when the processes die.
    assert repeats <= 4 * kills


CELERY_APP_DIR = Path(__file__).resolve().parents[1] / "celery"  # worker_app.py
CELERY = str(Path(sys.executable).with_name("celery"))


def test_repeated_sigkill_of_celery_workers_loses_nothing_and_keeps_order(redis_url: str, tmp_path: Path) -> None:
    """A prefork Celery worker (main process and children) SIGKILLed mid-task three times
    and started again: every task completes, in its key's order."""
    log = tmp_path / "tasks.log"
    env = dict(os.environ, SB_BROKER_URL=f"sharded+{redis_url}", SB_VT="1.5", SB_TASK_SECONDS="0.05", SB_LOG=str(log))
    env.pop("PYTHONPATH", None)  # the app finds the transport through the installed package
    keys, per_key = [f"acct-{i}" for i in range(6)], 8
    subprocess.run(
        [sys.executable, "-c", "\n".join([
            "import worker_app",
            f"for seq in range({per_key}):",
            f"    for key in {keys!r}:",
            "        worker_app.record.delay(key, seq)",
        ])],
        cwd=CELERY_APP_DIR, env=env, check=True, timeout=60, capture_output=True,
    )

    def lines() -> list[list[str]]:
        return [line.split() for line in log.read_text().splitlines()] if log.exists() else []

    process = None
    try:
        for round_ in range(4):
            output = tmp_path / f"celery-{round_}.out"
            with open(output, "wb") as sink:
                process = subprocess.Popen(
                    [
                        CELERY, "-A", "worker_app", "worker", "-n", f"w{round_}@%h", "-l", "info",
                        "-P", "prefork", "-c", "3", "--without-heartbeat", "--without-gossip", "--without-mingle",
                    ],
                    cwd=CELERY_APP_DIR, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                )
            wait_until(lambda: b" ready." in output.read_bytes() or process.poll() is not None, 60, "celery to start")
            assert process.poll() is None, output.read_text()
            if round_ == 3:
                break
            done = len(lines())
            wait_until(lambda: len(lines()) >= done + 5, 60, "tasks to run")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        wanted = {(key, str(seq)) for key in keys for seq in range(per_key)}
        wait_until(lambda: {(key, seq) for _, key, seq, _ in lines()} >= wanted, 90, "every task")
        with sharded_broker.connect(redis_url) as engine:
            wait_until(lambda: (lambda s: s.ready + s.leased + s.delayed == 0)(engine.stats("celery")), 30, "the queue to drain")
            assert engine.stats("celery").dead == 0
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    completed: dict[str, list[int]] = defaultdict(list)
    for _, key, seq, _ in lines():
        completed[key].append(int(seq))
    for key in keys:
        # A task killed after its work and before its ack completes again, right away.
        once = [seq for i, seq in enumerate(completed[key]) if i == 0 or completed[key][i - 1] != seq]
        assert once == list(range(per_key)), f"{key}: {completed[key]}"
