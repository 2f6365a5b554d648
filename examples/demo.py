"""Per-key FIFO with a real Celery worker and no server: what `make demo` runs.

A real ``celery worker`` (prefork pool, 4 processes) runs the ledger app of
examples/celery_app on ``sharded+sqlite:///<temp dir>/queue.db``. A producer, a separate
process (examples/celery_app/produce.py), posts a few accounts' ledger entries
interleaved: every account's deposit, then every account's first withdrawal, and so on.
Each task records when it started and finished and which worker process ran it; at the
end the demo draws a timeline and checks that every account's entries ran in the order
they were posted, one at a time, while different accounts ran at the same time.

    python examples/demo.py             # needs celery: pip install -e '.[celery]'
    python examples/engine_demo.py      # the same story on the engine alone, no Celery

Exit status: 0 when every account kept its order, 1 when an order was violated or the
run failed, 130 when interrupted. The worker (and its pool processes) is stopped in
every case.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

APP_DIR = Path(__file__).resolve().parent / "celery_app"
ACCOUNTS = ["alice", "bob", "carol", "dave", "erin"]
WITHDRAWALS = 5  # entries per account: the deposit (#0), then withdrawals #1..#5
CONCURRENCY = 4  # fewer pool processes than accounts: accounts take turns, fairly
WORK_SECONDS = 0.15  # per task: long enough that tasks visibly overlap
START_TIMEOUT = 60.0
RUN_TIMEOUT = 60.0
TIMELINE_WIDTH = 60


class DemoFailed(Exception):
    """The run itself went wrong (the worker did not start, tasks did not finish)."""


@dataclass(frozen=True)
class Entry:
    """One ledger entry as the task recorded it."""

    account: str
    seq: int
    balance: int
    started: float
    finished: float
    pid: int


class Worker:
    """A ``celery worker`` in its own process group, always stopped by ``stop()``."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.command = [
            sys.executable, "-m", "celery", "-A", "ledger", "worker", "--pool=prefork",
            f"--concurrency={CONCURRENCY}", "--loglevel=info", "-n", f"demo-{os.getpid()}@%h",
        ]
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(
                self.command, cwd=APP_DIR, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # Its own session: the terminal's Ctrl-C reaches only the demo, which then
                # stops the worker in order, and killpg reaches every pool process.
                start_new_session=True, preexec_fn=_stop_when_parent_dies,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while b" ready." not in self.log.read_bytes():
            if self.process.poll() is not None:
                raise DemoFailed(f"the worker exited with status {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoFailed(f"the worker was not ready after {START_TIMEOUT:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join("    " + line for line in self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Warm shutdown (SIGTERM, as an operator would), then SIGKILL to whatever is left
        of the process group. A second Ctrl-C while waiting skips to the SIGKILL."""

        def kill_now(signum: int, frame: FrameType | None) -> None:
            self._kill_group()

        previous = signal.signal(signal.SIGINT, kill_now)
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_group()  # pool processes outliving their main process, if any
            self.process.wait()
        finally:
            signal.signal(signal.SIGINT, previous)

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already


def _stop_when_parent_dies() -> None:
    """In the worker before exec: on Linux, have the kernel send it SIGTERM if the demo
    is killed outright (SIGKILL leaves the demo no chance to stop it)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    if importlib.util.find_spec("celery") is None:
        print("This demo runs a real Celery worker: install the celery extra (pip install -e '.[celery]',\n"
              "or run `make demo`, which does). The engine-level demo needs no Celery:\n"
              "python examples/engine_demo.py", file=sys.stderr)
        return 1
    # A terminal closing or `kill` stops the worker as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    with tempfile.TemporaryDirectory(prefix="sharded-broker-demo-") as directory:
        try:
            return run(Path(directory))
        except DemoFailed as failure:
            print(f"\nDEMO FAILED: {failure}")
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted: the worker is stopped")
            return 130


def run(directory: Path) -> int:
    url = f"sharded+sqlite:///{directory}/queue.db"
    ledger = directory / "ledger.db"
    env = {
        **os.environ,
        "BROKER_URL": url,
        "LEDGER_DB": str(ledger),
        "LEDGER_WORK_SECONDS": str(WORK_SECONDS),
        "PYTHONUNBUFFERED": "1",
    }
    expected = len(ACCOUNTS) * (WITHDRAWALS + 1)
    print("Per-key FIFO with a real Celery worker, on the embedded SQLite broker (no server)\n")
    print(f"  broker    {url}")
    print(f"  app       examples/celery_app/ledger.py: post_entry(account, seq, amount), shard key = account")

    worker = Worker(env, directory / "worker.log")
    try:
        print(f"  worker    celery -A ledger worker --pool=prefork --concurrency={CONCURRENCY}"
              f"  (pid {worker.process.pid})", flush=True)
        began = time.monotonic()
        worker.wait_ready()
        print(f"            ready after {time.monotonic() - began:.1f} s", flush=True)

        began = time.monotonic()
        posted = subprocess.run(
            [sys.executable, "produce.py", *ACCOUNTS, "--withdrawals", str(WITHDRAWALS), "--no-notify"],
            cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
        if posted.returncode != 0:
            raise DemoFailed(f"the producer failed:\n{posted.stdout}{posted.stderr}")
        order = " ".join(f"{account}#{seq}" for seq in range(2) for account in ACCOUNTS)
        print(f"  producer  examples/celery_app/produce.py, a separate process: posted {expected} entries "
              f"for {len(ACCOUNTS)} accounts\n            interleaved: {order} ...", flush=True)

        deadline = time.monotonic() + RUN_TIMEOUT
        while _count(ledger) < expected:
            if not worker.alive():
                raise DemoFailed(f"the worker exited with status {worker.process.returncode}:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoFailed(f"only {_count(ledger)} of {expected} tasks ran in {RUN_TIMEOUT:.0f} s:\n"
                                 f"{worker.log_tail()}")
            time.sleep(0.05)
        print(f"\nAll {expected} tasks ran in {time.monotonic() - began:.1f} s.", flush=True)
    finally:
        stopping = time.monotonic()
        worker.stop()
        print(f"Worker stopped in {time.monotonic() - stopping:.1f} s (warm shutdown).", flush=True)
    return report(_entries(ledger))


def _count(ledger: Path) -> int:
    if not ledger.exists():
        return 0
    with sqlite3.connect(ledger, timeout=30) as db:
        try:
            return db.execute("SELECT count(*) FROM entries").fetchone()[0]
        except sqlite3.OperationalError:  # the first task has not created the table yet
            return 0


def _entries(ledger: Path) -> list[Entry]:
    with sqlite3.connect(ledger, timeout=30) as db:
        rows = db.execute("SELECT account, seq, balance, started, finished, pid FROM entries").fetchall()
    return [Entry(*row) for row in rows]


def problems(entries: list[Entry], accounts: list[str], per_account: int) -> dict[str, list[str]]:
    """Every way each account's entries broke per-key FIFO: out of posting order, missing,
    run twice, or two of its entries running at the same time. Empty lists when it held."""
    found: dict[str, list[str]] = {}
    for account in accounts:
        runs = sorted((entry for entry in entries if entry.account == account), key=lambda entry: entry.started)
        wrong: list[str] = []
        seqs = [entry.seq for entry in runs]
        for earlier, later in zip(runs, runs[1:]):
            if later.seq < earlier.seq:
                wrong.append(f"#{later.seq} ran after #{earlier.seq}")
            if later.started < earlier.finished:
                wrong.append(f"#{earlier.seq} and #{later.seq} ran at the same time")
        wrong += [f"#{seq} ran {seqs.count(seq)} times" for seq in sorted(set(seqs)) if seqs.count(seq) > 1]
        wrong += [f"#{seq} never ran" for seq in range(per_account) if seq not in seqs]
        found[account] = wrong
    return found


def most_at_once(entries: list[Entry]) -> int:
    """The most tasks (hence accounts, when each account runs one at a time) running at one moment."""
    changes = sorted([(entry.started, 1) for entry in entries] + [(entry.finished, -1) for entry in entries])
    running = most = 0
    for _, change in changes:
        running += change
        most = max(most, running)
    return most


def timeline(entries: list[Entry], accounts: list[str], width: int = TIMELINE_WIDTH) -> list[str]:
    """One row per account: in each column, the digit of the entry running at that moment,
    '!' where two of its entries ran at once, '.' where it had nothing running; a last row
    counts the accounts busy in each column."""
    start = min(entry.started for entry in entries)
    span = max(entry.finished for entry in entries) - start
    step = span / width
    moments = [start + (column + 0.5) * step for column in range(width)]
    rows = []
    busy = [0] * width
    for account in accounts:
        own = [entry for entry in entries if entry.account == account]
        cells = []
        for column, moment in enumerate(moments):
            running = [entry for entry in own if entry.started <= moment < entry.finished]
            busy[column] += bool(running)
            cells.append("." if not running else "!" if len(running) > 1 else str(running[0].seq % 10))
        rows.append(f"  {account:<7} {''.join(cells)}")
    rows.append(f"  {'busy':<7} {''.join(map(str, busy))}")
    header = f"  {'':<7} 0 s{f'{span:.2f} s':>{width - 3}}"
    return [header, *rows]


def report(entries: list[Entry]) -> int:
    found = problems(entries, ACCOUNTS, WITHDRAWALS + 1)
    span = max(entry.finished for entry in entries) - min(entry.started for entry in entries)
    print(f"\nTimeline, one column per {1000 * span / TIMELINE_WIDTH:.0f} ms. A digit is the entry an account is "
          f"running\n(#0 its deposit, #1-#{WITHDRAWALS} its withdrawals), '.' nothing of it; "
          "busy = accounts running at that moment.\n")
    print("\n".join(timeline(entries, ACCOUNTS)))
    print("\nIn the order they ran, with the balance each entry left:\n")
    for account in ACCOUNTS:
        runs = sorted((entry for entry in entries if entry.account == account), key=lambda entry: entry.started)
        seqs = " ".join(f"#{entry.seq}" for entry in runs)
        balances = " ".join(str(entry.balance) for entry in runs)
        verdict = "; ".join(found[account]) or "in order, one at a time"
        print(f"  {account:<7} {seqs:<20}  {verdict:<25}  balance {balances}")

    pids = sorted({entry.pid for entry in entries})
    spread = min(len({entry.pid for entry in entries if entry.account == account}) for account in ACCOUNTS)
    print(f"\nWorker processes: pids {', '.join(map(str, pids))}.")
    if spread > 1:
        print(f"Every account ran on at least {spread} of them: the order comes from the broker, "
              "not from pinning an account to a process.")
    print()
    if any(found.values()):
        violations = (f"{account}: {', '.join(wrong)}" for account, wrong in found.items() if wrong)
        print("ORDER VIOLATED: " + "; ".join(violations))
        return 1
    print(f"OK: every account's entries ran in the order posted, one at a time, "
          f"while up to {most_at_once(entries)} accounts ran at once.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
