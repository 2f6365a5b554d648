"""Celery batch tasks in a real ``celery worker`` with the prefork pool (tests/celery/batch_app.py):
BatchFailed crosses from the pool process to the worker's main process, which settles the
batch's leases as the contract's ordered batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sharded_broker

HERE = Path(__file__).parent
CELERY = str(Path(sys.executable).with_name("celery"))


def test_prefork_worker_runs_batches_in_order_with_partial_failures(redis_url: str, tmp_path: Path) -> None:
    # Redis only: the in-process tests (test_celery_batch.py) cover every backend.
    engine_url = redis_url
    log, marks = tmp_path / "tasks.log", tmp_path / "marks"
    marks.mkdir()
    env = dict(os.environ, SB_BROKER_URL=f"sharded+{engine_url}", SB_LOG=str(log), SB_MARKS=str(marks),
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the installed package, not the source tree
    keys = ["a", "b", "c"]
    subprocess.run(
        [sys.executable, "-c", f"import batch_app\nfor n in range(8):\n    for key in {keys!r}:\n"
                               "        batch_app.handle.delay(key=key, n=n)"],
        cwd=HERE, env=env, check=True, timeout=60, capture_output=True,
    )
    engine = sharded_broker.connect(engine_url)
    output = tmp_path / "worker.out"
    with open(output, "wb") as sink:
        worker = subprocess.Popen(
            [CELERY, "-A", "batch_app", "worker", "-P", "prefork", "-c", "2", "-l", "info",
             "--without-heartbeat", "--without-gossip", "--without-mingle"],
            cwd=HERE, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            stats = engine.stats("batches")
            if (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 3):
                break
            assert worker.poll() is None, output.read_text(errors="replace")
            assert time.monotonic() < deadline, f"{stats}\n{output.read_text(errors='replace')}"
            time.sleep(0.1)
    finally:
        if worker.poll() is None:
            # The main process only, as `kill PID` does: a SIGTERM to the whole group can end
            # a pool process holding the pool's inqueue lock, and the main process then waits
            # out the 30 s below at exit (billiard's Pool._help_stuff_finish).
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)

    lines = [line.split() for line in log.read_text().splitlines()]
    for key in keys:
        # Each message done once, in order; 5 failed every time and was dead-lettered.
        assert [int(n) for event, k, n in (line[:3] for line in lines) if event == "done" and k == key] == [0, 1, 2, 3, 4, 6, 7]
        # A key's batches never overlapped: each started after the previous one ended.
        spans = [line for line in lines if line[0] in ("start", "end") and line[1] == key]
        assert [event for event, *_ in spans] == ["start", "end"] * (len(spans) // 2)
        batches = [line[2] for line in spans if line[0] == "start"]
        # The first batch failed at 2 (0 and 1 acked); the retry began with 2 and failed at
        # 5, which then led each batch until it was dead-lettered at its third delivery.
        assert batches == ["0,1,2,3", "2,3,4,5", "5,6,7", "5,6,7", "6,7"]
    dead = engine.dead_letters("batches")
    assert sorted(d.key for d in dead) == keys
    assert {d.attempts for d in dead} == {3}
    assert all(d.reason.startswith("ValueError: ") and d.reason.endswith(", after 3 deliveries)") for d in dead)
    engine.close()
