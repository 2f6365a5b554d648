"""Celery remote-control latency on sharded+ brokers: idle and under a busy prefork pool.

    .venv/bin/python -m benchmarks.control_latency [--pings 10]

Starts a throwaway redis-server, then for sharded+redis:// and sharded+sqlite:/// a real
``celery -A worker_app worker --pool=prefork -c 2`` (tests/celery/worker_app.py) and
measures ``app.control.ping`` (one reply) and ``inspect().revoked()`` round trips: first
idle, then while both pool processes run 3-second tasks with more queued behind them.
A figure for docs/celery.md, never a timed test.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RedisServer

WORKER_DIR = Path(__file__).resolve().parent.parent / "tests" / "celery"
CELERY = str(Path(sys.executable).parent / "celery")


def start_worker(url: str, log: Path, output: Path) -> subprocess.Popen:
    env = dict(os.environ, SB_BROKER_URL=url, SB_LOG=str(log), SB_TASK_SECONDS="3")
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [CELERY, "-A", "worker_app", "worker", "-n", "bench@%h", "--pool=prefork", "-c", "2",
             "--without-heartbeat", "-l", "info"],
            cwd=WORKER_DIR, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while b" ready." not in output.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{output.read_text()}")
        time.sleep(0.1)
    return process


def timed(call, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        answer = call()
        times.append(time.perf_counter() - started)
        if not answer:
            raise RuntimeError("no reply from the worker")
    return times


def measure(url: str, pings: int) -> dict[str, float]:
    sys.path.insert(0, str(WORKER_DIR))
    os.environ["SB_BROKER_URL"] = url
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "tasks.log"
        os.environ["SB_LOG"] = str(log)
        import importlib

        import worker_app

        importlib.reload(worker_app)
        app = worker_app.app
        process = start_worker(url, log, Path(scratch) / "worker.out")
        try:
            ping = lambda: app.control.ping(timeout=10, limit=1)  # noqa: E731
            revoked = lambda: app.control.inspect(timeout=10, limit=1).revoked()  # noqa: E731
            figures = {
                "idle ping": statistics.median(timed(ping, pings)),
                "idle inspect revoked": statistics.median(timed(revoked, pings)),
            }
            for n in range(8):  # two running, six waiting
                worker_app.record.delay(f"k{n}", n)
            time.sleep(1.0)
            figures["busy ping"] = statistics.median(timed(ping, pings))
            figures["busy inspect revoked"] = statistics.median(timed(revoked, pings))
            return figures
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            app.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pings", type=int, default=10)
    args = parser.parse_args()
    with RedisServer() as server, tempfile.TemporaryDirectory() as scratch:
        for url in (f"sharded+{server.url}", f"sharded+sqlite:///{scratch}/broker.db"):
            figures = measure(url, args.pings)
            scheme = url.split("://")[0]
            print(f"{scheme:16} " + "  ".join(f"{name}: {seconds * 1000:.0f} ms" for name, seconds in figures.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
