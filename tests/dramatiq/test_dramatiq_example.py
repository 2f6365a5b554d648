"""examples/dramatiq_app runs as its README says: send, two worker processes, check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dramatiq_app"


def test_the_example_app_applies_every_payment_once_in_order(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BROKER_URL": f"sqlite:///{tmp_path}/queue.db",
        "LEDGER_PATH": str(tmp_path / "ledger.db"),
        "dramatiq_worker_timeout": "250",
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=120
        )

    sent = run("send.py", "--accounts", "10", "--payments", "6")
    assert sent.returncode == 0, sent.stderr
    log = tmp_path / "workers.log"
    with open(log, "wb") as sink:
        workers = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "app", "--processes", "2", "--threads", "3"],
            cwd=EXAMPLE, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        checked = run("check.py", "--timeout", "60")
    finally:
        workers.terminate()
        workers.wait(30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "10 accounts, 60 payments applied, 0 dead letters" in checked.stdout
    # The provider's expected failures (the first attempt of payments 0 and 3 of each
    # account) are one log line each, never an error with a traceback.
    lines = log.read_text().splitlines()
    assert sum("Retrying message" in line for line in lines) == 20, lines
    assert not any("Traceback" in line or "[ERROR]" in line for line in lines), lines
