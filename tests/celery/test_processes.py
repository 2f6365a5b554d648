"""The Celery adapter as users run it: fresh processes, ``celery -A ... worker``, no imports.

The app under test (``worker_app.py``) never imports sharded_broker: ``sharded+`` URLs
resolve through the ``.pth`` hook installed with the package.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
CELERY = str(BIN / "celery")


class Processes:
    """Starts processes for one test and always stops them (whole process groups)."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.running: list[subprocess.Popen] = []

    def start(self, *args: str, name: str) -> tuple[subprocess.Popen, Path]:
        output = self.tmp_path / f"{name}.out"
        with open(output, "wb") as sink:
            process = subprocess.Popen(
                args, cwd=HERE, env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running.append(process)
        return process, output

    def run(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(args, cwd=HERE, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def worker(self, name: str, *options: str) -> tuple[subprocess.Popen, Path]:
        process, output = self.start(
            CELERY, "-A", "worker_app", "worker", "-n", f"{name}@%h", "-l", "info", "--without-heartbeat",
            *options, name=name,
        )
        wait_for(lambda: b" ready." in output.read_bytes() or process.poll() is not None, 60, f"{name} to start")
        assert process.poll() is None, output.read_text()
        return process, output

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """SIGKILL the process and its children, as a crash would."""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    @staticmethod
    def stop(process: subprocess.Popen, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM to the main process only, as an operator would)."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            Processes.kill(process)
            raise

    def close(self) -> None:
        for process in self.running:
            try:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def read_log(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def python(*code: str) -> list[str]:
    return [sys.executable, "-c", "\n".join(code)]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = dict(os.environ, SB_LOG=str(tmp_path / "tasks.log"), PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the installed package, not the source tree
    procs = Processes(tmp_path, env)
    yield procs
    procs.close()


def test_interpreter_start_does_not_import_kombu(processes):
    out = processes.run(*python(
        "import sys",
        "finders = lambda: [type(f).__name__ for f in sys.meta_path]",
        "print('kombu' in sys.modules, 'celery' in sys.modules, finders()[:1])",
        "import kombu.transport",
        "print(kombu.transport.TRANSPORT_ALIASES['sharded'], 'AliasFinder' in finders())",
        "import celery.app",
        "print(getattr(celery.app.Celery.task, '_sharded_broker_checks_shard_key', False), 'AliasFinder' in finders())",
    ))
    assert out.split("\n")[:3] == [
        "False False ['AliasFinder']",
        "sharded_broker.integrations.celery:Transport True",  # still waiting for celery.app
        "True False",  # gone once both were seen
    ]


def test_a_shard_key_typo_fails_when_the_app_module_is_imported(processes, tmp_path):
    (tmp_path / "typo_app.py").write_text(
        "from celery import Celery\n"
        "app = Celery('typo_app', broker='sharded+memory://')\n"
        "@app.task(shard_key='acount')\n"
        "def post_entry(account, amount):\n"
        "    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import typo_app"], cwd=tmp_path, env=processes.env, capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "sharded_broker.errors.ConfigurationError: task 'typo_app.post_entry' has no argument 'acount' to take "
        "its shard key from (shard_key='acount'); its arguments are: account, amount"
    )


def test_a_worker_on_a_relative_sqlite_path_shows_where_it_led_and_warns_once(processes, tmp_path):
    relative = os.path.relpath(tmp_path / "queue.db", HERE)  # the worker runs in tests/celery
    processes.env.update(SB_BROKER_URL=f"sharded+sqlite:///{relative}")
    worker, output = processes.worker("relative", "-P", "solo")
    processes.stop(worker)
    text = output.read_text()
    banner = [line for line in text.splitlines() if "transport:" in line]
    assert banner and banner[0].split()[-1] == f"sharded+sqlite:///{tmp_path / 'queue.db'}", banner
    warnings = [line for line in text.splitlines() if "is relative to the current directory" in line]
    assert len(warnings) == 1, text
    assert f"this process uses {tmp_path / 'queue.db'}" in warnings[0]


def test_two_prefork_workers_keep_per_key_order_through_a_sigkill(processes, redis_url):
    processes.env.update(SB_BROKER_URL=f"sharded+{redis_url}", SB_VT="2", SB_TASK_SECONDS="0.08")
    log = Path(processes.env["SB_LOG"])
    keys, per_key = [f"acct-{i}" for i in range(24)], 6
    victim, _ = processes.worker("victim", "-P", "prefork", "-c", "4")
    processes.worker("survivor", "-P", "prefork", "-c", "4")
    processes.run(*python(
        "import sys, worker_app",
        "assert 'sharded_broker' not in sys.modules  # the app imports nothing of ours",
        f"for seq in range({per_key}):",
        f"    for key in {keys!r}:",
        "        worker_app.record.delay(key, seq)",
    ))
    wait_for(lambda: len(read_log(log)) >= len(keys) * per_key // 4, 30, "a quarter of the tasks")
    processes.kill(victim)  # mid-run: it holds leases on tasks running and prefetched
    wait_for(lambda: {(k, s) for _, k, s, _ in read_log(log)} >= {(k, str(s)) for k in keys for s in range(per_key)},
             60, "every task, including the victim's")
    done: dict[str, list[int]] = {}
    for _, key, seq, _ in read_log(log):
        runs = done.setdefault(key, [])
        if not runs or runs[-1] != int(seq):  # a task the victim finished but never acked runs again, next
            runs.append(int(seq))
    assert done == {key: list(range(per_key)) for key in keys}
    assert len({pid for *_, pid in read_log(log)}) > 4  # both workers' children ran tasks


def test_a_prefork_worker_over_a_redis_cluster_keeps_per_key_order(processes, redis_cluster_url):
    # This source tree's package (a worktree's may be newer than the installed one); the
    # sharded+ alias still comes from the installed .pth hook.
    processes.env.update(
        SB_BROKER_URL=f"sharded+{redis_cluster_url}", SB_TASK_SECONDS="0.01", PYTHONPATH=str(HERE.parents[1])
    )
    log = Path(processes.env["SB_LOG"])
    keys, per_key = [f"acct-{i}" for i in range(12)], 5
    processes.worker("cluster", "-P", "prefork", "-c", "3")
    processes.run(*python(
        "import sys, worker_app",
        "assert 'sharded_broker' not in sys.modules",
        f"for seq in range({per_key}):",
        f"    for key in {keys!r}:",
        "        worker_app.record.delay(key, seq)",
    ))
    wait_for(lambda: len([row for row in read_log(log) if row[1] != "beat"]) >= len(keys) * per_key, 60,
             "every task")
    done: dict[str, list[int]] = {}
    for _, key, seq, _ in read_log(log):
        done.setdefault(key, []).append(int(seq))
    done.pop("beat", None)
    assert done == {key: list(range(per_key)) for key in keys}


def test_url_alone_drives_worker_inspect_beat_and_purge_on_sqlite(processes, tmp_path):
    processes.env.update(SB_BROKER_URL=f"sharded+sqlite:///{tmp_path / 'queue.db'}")
    log = Path(processes.env["SB_LOG"])
    processes.run(*python(
        "import sys, worker_app",
        "assert 'sharded_broker' not in sys.modules",
        "for seq in range(4):",
        "    worker_app.record.delay('k', seq)",
        "    worker_app.by_config.delay('acct', seq)  # keyed by the shard_keys transport option",
    ))
    worker, _ = processes.worker("solo", "-P", "solo")
    wait_for(lambda: len(read_log(log)) >= 8, 30, "eight tasks")
    assert [s for t, _, s, _ in read_log(log) if t == "record"] == ["0", "1", "2", "3"]
    assert [s for t, _, s, _ in read_log(log) if t == "by_config"] == ["0", "1", "2", "3"]

    # Addressed to the worker by name: done at its reply instead of waiting out the timeout.
    assert "pong" in processes.run(CELERY, "-A", "worker_app", "inspect", "ping", "-t", "5",
                                   "-d", f"solo@{socket.gethostname()}")

    beat, _ = processes.start(CELERY, "-A", "worker_app", "beat", "-s", str(tmp_path / "beat-schedule"),
                              "--pidfile=", name="beat")
    wait_for(lambda: any(key == "beat" for _, key, _, _ in read_log(log)), 30, "a task published by beat")
    processes.stop(beat)

    processes.stop(worker)
    processes.run(*python("import worker_app", "for n in range(3): worker_app.record.delay('p', n)"))
    assert "Purged 3 messages" in processes.run(CELERY, "-A", "worker_app", "purge", "-f")
