"""`celery worker` processes running tests/celery/worker_app.py, for the fault tests.

Each worker is its own process group (main process and pool children), started from the
app's directory with the installed package (no PYTHONPATH: ``sharded+`` resolves through
the ``.pth`` hook), and always killed when the test ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

APP_DIR = Path(__file__).resolve().parents[1] / "celery"  # worker_app.py
CELERY = str(Path(sys.executable).with_name("celery"))


def app_env(log: Path, broker_url: str, **settings: str) -> dict[str, str]:
    """The environment of worker_app processes: ``settings`` are its ``SB_*`` variables
    (``vt="2"`` becomes ``SB_VT=2``)."""
    env = dict(os.environ, SB_LOG=str(log), SB_BROKER_URL=broker_url, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    env.pop("CELERY_BROKER_URL", None)
    env.update({f"SB_{name.upper()}": value for name, value in settings.items()})
    return env


def publish(env: dict[str, str], calls: Sequence[str]) -> None:
    """Run ``calls`` (Python statements using ``worker_app``) in a fresh producer process."""
    subprocess.run(
        [sys.executable, "-c", "\n".join(["import worker_app", *calls])],
        cwd=APP_DIR, env=env, check=True, timeout=120, capture_output=True,
    )


class CeleryWorker:
    """One `celery -A worker_app worker` process group."""

    def __init__(self, env: dict[str, str], output: Path, *options: str, name: str = "w", cli: Sequence[str] = ()) -> None:
        self.output = output
        with open(output, "wb") as sink:
            self.process = subprocess.Popen(
                [CELERY, "-A", "worker_app", *cli, "worker", "-n", f"{name}@%h", "-l", "info",
                 "--without-heartbeat", "--without-gossip", "--without-mingle", *options],
                cwd=APP_DIR, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 90) -> "CeleryWorker":
        deadline = time.monotonic() + timeout
        while b" ready." not in self.output.read_bytes():
            assert self.process.poll() is None, f"celery exited early:\n{self.text()}"
            assert time.monotonic() < deadline, f"celery not ready after {timeout}s:\n{self.text()}"
            time.sleep(0.1)
        return self

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        if self.alive():
            os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the main process and its children, as a crash would."""
        try:
            self.signal_group(signal.SIGCONT)
            self.signal_group(signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM to the main process), else kill."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
