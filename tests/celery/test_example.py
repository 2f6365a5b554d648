"""examples/celery_app runs as its README says, twice in a row: workers, produce, check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "celery_app"
CELERY = str(Path(sys.executable).with_name("celery"))


def test_the_example_runs_cleanly_twice_in_a_row(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BROKER_URL": f"sharded+sqlite:///{tmp_path}/queue.db",
        "LEDGER_DB": str(tmp_path / "ledger.db"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=EXAMPLE, env=env, capture_output=True, text=True,
                              timeout=120)

    log = tmp_path / "worker.log"
    with open(log, "wb") as sink:
        worker = subprocess.Popen(
            [CELERY, "-A", "ledger", "worker", "-c", "2", "-n", "example@%h", "-l", "info"],
            cwd=EXAMPLE, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in log.read_bytes():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        for attempt in (1, 2):  # the second run starts from an empty ledger, by itself
            produced = run("produce.py", "--withdrawals", "3")
            assert produced.returncode == 0, produced.stderr
            assert produced.stdout.strip() == "posted 80 entries for 20 accounts"
            checked = run("check.py", "--timeout", "60")
            assert checked.returncode == 0, (attempt, checked.stdout + checked.stderr)
            assert checked.stdout.strip() == "80 entries over 20 accounts, every account in order"
    finally:
        if worker.poll() is None:
            # The main process only, as `kill PID` or systemd do: it stops its own pool children.
            # A SIGTERM to the whole group races it and billiard logs the children's deaths as ERROR.
            worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
    text = log.read_text()
    assert f"transport:   sharded+sqlite:///{tmp_path}/queue.db" in text
    assert "Traceback" not in text and "ERROR" not in text, text
