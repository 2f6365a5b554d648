"""The demos run as a new user runs them, and their verdicts can fail.

``examples/demo.py`` (``make demo``) runs a real ``celery worker`` on SQLite;
``examples/engine_demo.py`` does the same on the engine alone; ``examples/asyncio_app.py``
with the asyncio API.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo.py"
ENGINE_DEMO = ROOT / "examples" / "engine_demo.py"
ASYNCIO_APP = ROOT / "examples" / "asyncio_app.py"


def _load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("celery_demo", DEMO)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _gone(pid: int) -> bool:
    """True when no process has this pid (a zombie still awaiting its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (alive := {pid for pid in pids if not _gone(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def test_the_celery_demo_keeps_every_accounts_order_on_a_real_worker_and_stops_it() -> None:
    done = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    demo = _load_demo()
    for account in demo.ACCOUNTS:
        assert re.search(rf"^  {account} +#0 #1 #2 #3 #4 #5 +in order, one at a time +balance 100 90 80 70 60 50$",
                         output, re.MULTILINE), output
    assert "OK: every account's entries ran in the order posted, one at a time" in output
    worker = int(re.search(r"worker .*\(pid (\d+)\)", output).group(1))
    pool = {int(pid) for pid in re.search(r"Worker processes: pids ([\d, ]+)\.", output).group(1).split(", ")}
    assert len(pool) > 1  # a prefork pool ran the tasks, not the worker's main process
    assert _wait_gone({worker, *pool}) == set(), "the demo left worker processes running"


def test_ctrl_c_stops_the_worker_and_its_pool() -> None:
    demo = subprocess.Popen(
        [sys.executable, str(DEMO)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's foreground job
    )
    try:
        seen = ""
        while "ready after" not in seen:
            line = demo.stdout.readline()
            assert line, seen  # the demo ended before its worker was ready
            seen += line
        worker = int(re.search(r"worker .*\(pid (\d+)\)", seen).group(1))
        pool = {int(pid) for pid in Path(f"/proc/{worker}/task/{worker}/children").read_text().split()}
        assert pool, "the worker has no pool processes"
        demo.send_signal(signal.SIGINT)
        seen += demo.stdout.read()
        assert demo.wait(60) == 130, seen
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "interrupted: the worker is stopped" in seen
    assert _wait_gone({worker, *pool}) == set(), "Ctrl-C left worker processes running"


def test_the_verdict_names_every_kind_of_order_violation() -> None:
    demo = _load_demo()
    entry = demo.Entry

    def runs(*spans: tuple[int, float, float]) -> list:
        return [entry("a", seq, 0, started, finished, 1) for seq, started, finished in spans]

    assert demo.problems(runs((0, 0, 1), (1, 1, 2), (2, 2, 3)), ["a"], 3) == {"a": []}
    assert demo.problems(runs((0, 0, 1), (2, 1, 2), (1, 2, 3)), ["a"], 3) == {"a": ["#1 ran after #2"]}
    assert demo.problems(runs((0, 0, 1), (1, 0.5, 2), (2, 2, 3)), ["a"], 3) == {
        "a": ["#0 and #1 ran at the same time"]}
    assert demo.problems(runs((0, 0, 1), (1, 1, 2), (1, 2, 3)), ["a"], 3) == {"a": ["#1 ran 2 times", "#2 never ran"]}


def test_the_demo_exits_non_zero_when_an_account_ran_out_of_order(capsys) -> None:
    demo = _load_demo()
    per_account = demo.WITHDRAWALS + 1
    good = [demo.Entry(account, seq, 100 - 10 * seq, seq, seq + 1, 1 + seq % 2)
            for account in demo.ACCOUNTS for seq in range(per_account)]
    assert demo.report(good) == 0
    swapped = [entry if entry.account != "bob" or entry.seq > 1 else
               demo.Entry("bob", 1 - entry.seq, entry.balance, entry.started, entry.finished, entry.pid)
               for entry in good]
    assert demo.report(swapped) == 1
    assert "ORDER VIOLATED: bob: #0 ran after #1" in capsys.readouterr().out


def test_the_engine_demo_still_runs_on_sqlite(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ENGINE_DEMO), f"sqlite:///{tmp_path}/queue.db"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("in order, one at a time") == 5
    assert "per-key order held" in done.stdout


def test_the_asyncio_app_keeps_each_accounts_order_on_sqlite(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ASYNCIO_APP), f"sqlite:///{tmp_path}/queue.db"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("#0 #1 #2 #3 #4 #5 #6 #7  in order") == 4
    assert "OK: every account's orders ran in the order posted" in done.stdout
