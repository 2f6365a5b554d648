"""``sharded-broker schedules``: the installed console script against a real SQLite file
and a real redis-server, seeded through the Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sharded_broker

SCRIPT = Path(sys.executable).with_name("sharded-broker")


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queues.db'}"
    return request.getfixturevalue("redis_url")


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "--url", url, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def seed(url: str) -> None:
    with sharded_broker.connect(url) as broker:
        broker.schedule("jobs", "nightly", b"n", cron="0 3 * * *", key="acct-1")
        broker.schedule("jobs", "tick", b"t", every=30)


def test_schedules_lists_each_schedule(url: str) -> None:
    seed(url)
    done = cli(url, "schedules", "jobs")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    nightly = next(line for line in lines if "nightly" in line)
    assert "cron 0 3 * * *" in nightly and "acct-1" in nightly and "never" in nightly
    tick = next(line for line in lines if "tick" in line)
    assert "every 30s" in tick and "(in 2" in tick  # due in 29-30 s
    as_json = json.loads(cli(url, "schedules", "jobs", "--json").stdout)
    assert [(s["name"], s["spec"], s["key"], s["paused"], s["fired"]) for s in as_json] == [
        ("nightly", "cron 0 3 * * *", "acct-1", False, 0), ("tick", "every 30s", None, False, 0),
    ]
    assert as_json[1]["every"] == 30.0 and as_json[1]["payload_size"] == 1
    assert cli(url, "schedules", "other").stdout.strip() == "no schedules in 'other'"


def test_pause_resume_and_remove_by_name(url: str) -> None:
    seed(url)
    done = cli(url, "schedules", "jobs", "--pause", "tick")
    assert (done.returncode, done.stdout.strip()) == (0, "paused schedule 'tick' of 'jobs'")
    assert "paused" in next(line for line in cli(url, "schedules", "jobs").stdout.splitlines() if "tick" in line)
    assert json.loads(cli(url, "schedules", "jobs", "--resume", "tick", "--json").stdout) == {
        "queue": "jobs", "name": "tick", "action": "resumed",
    }
    with sharded_broker.connect(url) as broker:
        assert not next(s for s in broker.schedules("jobs") if s.name == "tick").paused
    assert cli(url, "schedules", "jobs", "--remove", "nightly").stdout.strip() == "removed schedule 'nightly' of 'jobs'"
    with sharded_broker.connect(url) as broker:
        assert [s.name for s in broker.schedules("jobs")] == ["tick"]


def test_unknown_names_and_two_actions_are_refused(url: str) -> None:
    seed(url)
    done = cli(url, "schedules", "jobs", "--remove", "nope")
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        "queue 'jobs' has no schedule named 'nope'; see `sharded-broker schedules jobs`"
    )
    done = cli(url, "schedules", "jobs", "--pause", "tick", "--remove", "tick")
    assert done.returncode == 2 and "one of --pause, --resume and --remove" in done.stderr
    with sharded_broker.connect(url) as broker:
        assert [s.paused for s in broker.schedules("jobs")] == [False, False]
