"""The ``sharded-broker`` command line.

Most tests run the installed console script as a subprocess against a real SQLite file and
a real throwaway redis-server, seeded through the Python API, and check what an operator
or a script sees: table cells, JSON values, exit codes, the one stderr line of an error.
A few fast in-process tests (click's CliRunner on memory://) cover argument handling.
"""

from __future__ import annotations

import inspect
import json
import os
import pty
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

import sharded_broker
from sharded_broker.cli import format_duration, main, normalize_url, replay_chunks
from support.redis_server import RedisServer, free_port
from support.tls import make_ca, tls_server_args

README = Path(__file__).resolve().parents[1] / "README.md"

SCRIPT = Path(sys.executable).with_name("sharded-broker")
SECRET = "hunter2-secret"


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A real backend: a fresh SQLite file, or the session's flushed redis-server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queues.db'}"
    return request.getfixturevalue("redis_url")


def cli(
    url: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the console script without a terminal (stdin from /dev/null)."""
    assert SCRIPT.exists(), f"console script not installed at {SCRIPT}; reinstall the project"
    command = [str(SCRIPT), *(["--url", url] if url else []), *args]
    return subprocess.run(
        command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        env={**os.environ, "COLUMNS": "200", **(env or {})}, cwd=cwd,
    )


def on_a_terminal(columns: int, *args: str) -> tuple[int, str]:
    """Run the console script on a pseudo-terminal ``columns`` wide: (exit code, output
    without terminal escape sequences)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(SCRIPT), *args], stdin=terminal, stdout=terminal, stderr=terminal,
        env={**os.environ, "COLUMNS": str(columns), "LINES": "60", "TERM": "xterm-256color"},
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the command exited
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    returncode = process.wait(timeout=60)
    return returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode()).replace("\r", "")


def seed(url: str) -> dict[str, str]:
    """sms: user-0 has m0 (dead), m2, m4; user-1 has m1 (dead), m3. email: one delayed message."""
    with sharded_broker.connect(url) as broker:
        ids = {f"m{i}": broker.enqueue("sms", f"m{i}".encode(), key=f"user-{i % 2}") for i in range(5)}
        leases = broker.lease("sms", limit=2)
        assert sorted(lease.payload for lease in leases) == [b"m0", b"m1"]
        for lease in leases:
            assert broker.nack(lease, dead=True, reason="boom [Errno 5]")
        broker.enqueue("email", b"later", key="user-9", delay=3600)
    return ids


def table_rows(output: str) -> dict[str, list[str]]:
    """Body rows of a rich table, by their first cell."""
    rows = {}
    for line in output.splitlines():
        if line.startswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            rows[cells[0]] = cells
    return rows


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def drain_payloads(broker: sharded_broker.Broker, queue: str) -> list[bytes]:
    delivered = []
    while leases := broker.lease(queue, limit=1):
        delivered += [lease.payload for lease in leases]
        broker.ack_many(leases)
    return delivered


# -- reading ------------------------------------------------------------------------------


def test_stats_table_shows_every_queue(url: str) -> None:
    seed(url)
    result = cli(url, "stats")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    # queue, ready, leased, delayed, dead, keys, lag, paused
    assert rows["sms"][:6] == ["sms", "3", "0", "0", "2", "2"]
    assert rows["email"][:6] == ["email", "0", "0", "1", "0", "1"]
    assert rows["sms"][7] == "" and rows["email"][6] == "0s"


def test_stats_json(url: str) -> None:
    seed(url)
    every = cli(url, "stats", "--json")
    assert every.returncode == 0, every.stderr
    by_queue = {row["queue"]: row for row in json.loads(every.stdout)}
    assert set(by_queue) == {"sms", "email"}
    sms = by_queue["sms"]
    assert {k: sms[k] for k in ("ready", "leased", "delayed", "dead", "keys", "paused")} == {
        "ready": 3, "leased": 0, "delayed": 0, "dead": 2, "keys": 2, "paused": False,
    }
    assert sms["oldest_age"] >= 0
    one = cli(url, "stats", "email", "--json")
    assert one.returncode == 0, one.stderr
    email = json.loads(one.stdout)
    assert (email["queue"], email["delayed"], email["ready"], email["keys"]) == ("email", 1, 0, 1)


def test_stats_of_an_empty_broker(url: str) -> None:
    with sharded_broker.connect(url) as broker:
        broker.queues()  # creates the SQLite file, as an app would
    assert json.loads(cli(url, "stats", "--json").stdout) == []
    result = cli(url, "stats")
    assert result.returncode == 0 and "no queues yet" in result.stdout


def test_dead_lists_dead_letters(url: str) -> None:
    ids = seed(url)
    result = cli(url, "dead", "sms")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert set(rows) == {ids["m0"], ids["m1"]}
    id_, key, attempts, reason, died_at = rows[ids["m0"]]
    assert (key, attempts, reason) == ("user-0", "1", "boom [Errno 5]")  # brackets are not markup
    assert died_at.endswith("UTC")

    as_json = json.loads(cli(url, "dead", "sms", "--json").stdout)
    assert [(d["id"], d["key"], d["attempts"], d["reason"], d["payload_size"]) for d in as_json] == [
        (ids["m0"], "user-0", 1, "boom [Errno 5]", 2),
        (ids["m1"], "user-1", 1, "boom [Errno 5]", 2),
    ]
    assert all(d["died_at"] >= d["enqueued_at"] > 0 for d in as_json)
    limited = json.loads(cli(url, "dead", "sms", "--json", "--limit", "1", "--offset", "1").stdout)
    assert [d["id"] for d in limited] == [ids["m1"]]


def test_top_once_and_json_frames(url: str) -> None:
    seed(url)
    once = cli(url, "top", "--once")
    assert once.returncode == 0, once.stderr
    rows = table_rows(once.stdout)
    assert rows["sms"][:6] == ["sms", "3", "0", "0", "2", "2"]
    assert rows["sms"][-2:] == ["-", "-"]  # no rates before a second snapshot

    frames = cli(url, "top", "--json", "--iterations", "2", "--interval", "0.1")
    assert frames.returncode == 0, frames.stderr
    first, second = (json.loads(line) for line in frames.stdout.splitlines())
    sms_first = {q["queue"]: q for q in first["queues"]}["sms"]
    sms_second = {q["queue"]: q for q in second["queues"]}["sms"]
    assert sms_first["backlog_change_per_second"] is None
    assert sms_second["backlog_change_per_second"] == 0.0 and sms_second["dead_change_per_second"] == 0.0
    assert sms_second["ready"] == 3


def test_top_shows_last_minute_counts_and_hottest_keys(url: str) -> None:
    seed(url)
    frames = cli(url, "top", "--json", "--once")
    assert frames.returncode == 0, frames.stderr
    frame = json.loads(frames.stdout)
    sms = {q["queue"]: q for q in frame["queues"]}["sms"]
    # Seeded within the current minute: the last full minute is (almost surely) empty,
    # but its fields are there.
    assert set(sms["last_minute"]) == {"minute", "enqueued", "delivered", "acked", "retried", "dead"}
    assert [(k["queue"], k["key"], k["backlog"]) for k in frame["hottest_keys"]] == [
        ("sms", "user-0", 2), ("email", "user-9", 1), ("sms", "user-1", 1),
    ]
    once = cli(url, "top", "--once")
    assert once.returncode == 0, once.stderr
    rows = table_rows(once.stdout)
    assert rows["user-0"][:3] == ["user-0", "sms", "2"]
    assert "hottest keys" in once.stdout


def test_keys_sorted_by_backlog_and_by_lag(url: str) -> None:
    seed(url)
    with sharded_broker.connect(url) as broker:
        broker.enqueue("sms", b"m5", key="user-2")
        broker.set_interval("sms", "user-1", 1.5)
        broker.pause("sms", key="user-1")
    result = cli(url, "keys", "sms")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert list(rows) == ["user-0", "user-1", "user-2"]
    assert rows["user-0"][:3] == ["user-0", "2", "0"]
    assert rows["user-1"][4:] == ["1.5s", "PAUSED"]
    by_backlog = json.loads(cli(url, "keys", "sms", "--json", "--limit", "2").stdout)
    assert [(k["key"], k["backlog"], k["interval"], k["paused"]) for k in by_backlog] == [
        ("user-0", 2, None, False), ("user-1", 1, 1.5, True),
    ]
    by_lag = json.loads(cli(url, "keys", "sms", "--json", "--sort", "lag").stdout)
    # user-0's head (m2) was enqueued before user-1's (m3), and both before user-2's.
    assert [k["key"] for k in by_lag] == ["user-0", "user-1", "user-2"]
    assert by_lag[0]["lag"] >= by_lag[1]["lag"] >= by_lag[2]["lag"] >= 0


def test_show_a_key(url: str) -> None:
    ids = seed(url)
    result = cli(url, "show", "sms", "user-0")
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout)["user-0"][:3] == ["user-0", "2", "0"]
    assert f"head: {ids['m2']} priority 0, attempts 0, 2 bytes" in result.stdout
    shown = json.loads(cli(url, "show", "sms", "user-0", "--json").stdout)
    assert (shown["key"], shown["backlog"], shown["head"]["id"], shown["head"]["size"]) == ("user-0", 2, ids["m2"], 2)
    assert len(shown["minutes"]) == 5
    now = shown["minutes"][-1]
    # user-0: m0, m2, m4 enqueued; m0 delivered and dead-lettered (all in this minute,
    # unless the seeding straddled a minute boundary).
    assert sum(m["enqueued"] for m in shown["minutes"]) == 3
    assert sum(m["dead"] for m in shown["minutes"]) == 1
    assert now["minute"] % 60 == 0



def test_why_a_key_is_not_moving(url: str) -> None:
    seed(url)
    with sharded_broker.connect(url) as broker:
        [lease] = broker.lease("sms")
        other = "user-1" if lease.key == "user-0" else "user-0"
        broker.pause("sms", key=other)
    held = json.loads(cli(url, "why", "sms", lease.key, "--json").stdout)
    assert (held["reason"], held["backlog"], held["holds"][0]["message_id"]) == ("leased", 2, lease.id)
    assert held["holds"][0]["token"] == lease.token and held["until"] == pytest.approx(lease.deadline)
    result = cli(url, "why", "sms", other)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"paused: key '{other}' is paused: resume it to deliver")
    # Judged with the app's key_concurrency when given: one slot of two is still free.
    assert json.loads(cli(url, "why", "sms", lease.key, "--key-concurrency", "2", "--json").stdout)["reason"] == "ready"
    assert json.loads(cli(url, "why", "email", "user-9", "--json").stdout)["reason"] == "delayed"
    missing = cli(url, "why", "nope", "k")
    assert missing.returncode == 1 and "unknown queue 'nope'" in one_error_line(missing)


def test_keys_stuck_lists_waiting_keys_with_their_reason(url: str) -> None:
    seed(url)
    with sharded_broker.connect(url) as broker:
        broker.pause("sms", key="user-1")
    time.sleep(0.2)
    stuck = json.loads(cli(url, "keys", "sms", "--stuck", "--older-than", "0.1", "--json").stdout)
    assert {(d["key"], d["reason"]) for d in stuck} == {("user-0", "ready"), ("user-1", "paused")}
    assert all(d["waited"] > 0.1 for d in stuck)
    table = table_rows(cli(url, "keys", "sms", "--stuck", "--older-than", "0.1").stdout)
    assert table["user-1"][3] == "paused"
    none = cli(url, "keys", "sms", "--stuck", "--older-than", "3600")
    assert none.returncode == 0 and "no key of 'sms' has waited longer than 1 h 0 min" in none.stdout


def test_show_of_a_key_without_messages_settings_or_activity_fails(url: str) -> None:
    seed(url)
    for args in (("show", "sms", "nobody"), ("show", "sms", "nobody", "--json")):
        result = cli(url, *args)
        assert result.returncode == 1 and result.stdout == ""
        assert one_error_line(result) == (
            "Error: key 'nobody' of 'sms' has no messages, no interval or pause, and no activity in the last 5 minutes"
        )
    # A drained key with a setting is still shown, saying it has no messages.
    with sharded_broker.connect(url) as broker:
        broker.set_interval("sms", "drained", 2.0)
    shown = cli(url, "show", "sms", "drained")
    assert shown.returncode == 0, shown.stderr
    assert table_rows(shown.stdout)["drained"][:2] == ["drained", "0"]
    assert "head: none, the key has no messages" in shown.stdout


def test_events_tails_a_queue(url: str) -> None:
    seed(url)
    process = subprocess.Popen(
        [str(SCRIPT), "--url", url, "events", "live", "--json", "--count", "3", "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        assert "tailing events" in process.stderr.readline()
        with sharded_broker.connect(url, events=True) as broker:
            mid = broker.enqueue("live", b"new", key="user-7")
            broker.enqueue("sms", b"elsewhere")
            [lease] = broker.lease("live", 10)
            broker.ack(lease)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["id"], e["key"], e["queue"]) for e in events] == [
        ("enqueued", mid, "user-7", "live"), ("delivered", mid, "user-7", "live"), ("acked", mid, "user-7", "live"),
    ]


def test_keys_and_show_of_an_unknown_queue(url: str) -> None:
    seed(url)
    for args in (("keys", "nope"), ("show", "nope", "k")):
        result = cli(url, *args)
        assert result.returncode == 1
        assert "unknown queue 'nope'" in one_error_line(result)


# -- acting -------------------------------------------------------------------------------


def test_replay_all_to_the_head_restores_order(url: str) -> None:
    seed(url)
    result = cli(url, "replay", "sms", "--all", "--position", "head")
    assert result.returncode == 0, result.stderr
    assert "replayed 2 dead letters" in result.stdout
    with sharded_broker.connect(url) as broker:
        assert broker.stats("sms").dead == 0
        by_key: dict[str | None, list[bytes]] = {}
        while leases := broker.lease("sms", limit=10):
            for lease in leases:
                by_key.setdefault(lease.key, []).append(lease.payload)
            broker.ack_many(leases)
    assert by_key == {"user-0": [b"m0", b"m2", b"m4"], "user-1": [b"m1", b"m3"]}


def test_replay_ids_json_and_unknown_ids(url: str) -> None:
    ids = seed(url)
    result = cli(url, "replay", "sms", ids["m1"], "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"queue": "sms", "requested": 1, "replayed": 1, "position": "tail"}
    with sharded_broker.connect(url) as broker:
        assert [d.id for d in broker.dead_letters("sms")] == [ids["m0"]]

    missing = cli(url, "replay", "sms", ids["m0"], "no-such-id")
    assert missing.returncode == 1
    assert "1 of 2 ids were not dead letters of 'sms'" in one_error_line(missing)
    with sharded_broker.connect(url) as broker:
        assert broker.stats("sms").dead == 0


def test_get_shows_a_message_in_each_state(url: str) -> None:
    ids = seed(url)
    waiting = cli(url, "get", "sms", ids["m2"])
    assert waiting.returncode == 0, waiting.stderr
    assert f"message {ids['m2']} of 'sms': waiting" in waiting.stdout
    assert "key: user-0" in waiting.stdout and "deliveries so far: 0" in waiting.stdout
    assert "available: " in waiting.stdout and "(due now)" in waiting.stdout

    dead = json.loads(cli(url, "get", "sms", ids["m0"], "--json").stdout)
    assert (dead["state"], dead["attempts"], dead["dead_reason"], dead["key"]) == ("dead", 1, "boom [Errno 5]", "user-0")
    assert dead["died_at"] > 0 and dead["lease_deadline"] is None
    assert "died: " in cli(url, "get", "sms", ids["m0"]).stdout

    with sharded_broker.connect(url) as broker:
        [lease] = broker.lease("sms", visibility_timeout=60)
        delayed_id = broker.enqueue("sms", b"later", key="user-5", delay=600)
    leased = json.loads(cli(url, "get", "sms", lease.id, "--json").stdout)
    assert (leased["state"], leased["attempts"]) == ("leased", 1)
    assert leased["lease_deadline"] == pytest.approx(lease.deadline, abs=1e-3)
    assert "lease deadline: " in cli(url, "get", "sms", lease.id).stdout
    delayed = cli(url, "get", "sms", delayed_id)
    assert ": delayed" in delayed.stdout and re.search(r"available: .* \(in (9|10) min", delayed.stdout), delayed.stdout

    missing = cli(url, "get", "sms", "no-such-id")
    assert missing.returncode == 1
    assert "no message 'no-such-id' in queue 'sms'" in one_error_line(missing)


def test_cancel_a_waiting_message_and_refusals(url: str) -> None:
    ids = seed(url)
    result = cli(url, "cancel", "sms", ids["m2"])
    assert result.returncode == 0, result.stderr
    assert f"cancelled message {ids['m2']} of queue 'sms' (it was waiting)" in result.stdout
    again = cli(url, "cancel", "sms", ids["m2"], "--json")
    assert again.returncode == 1
    answer = json.loads(again.stdout)
    assert (answer["cancelled"], answer["state"], answer["id"]) == (False, None, ids["m2"])
    assert "no message" in one_error_line(again)

    dead = cli(url, "cancel", "sms", ids["m0"])
    assert dead.returncode == 1 and "is a dead letter" in one_error_line(dead)
    with sharded_broker.connect(url) as broker:
        # user-0 moved on from the cancelled m2 to m4, keeping its turn before user-1.
        [lease] = broker.lease("sms")
        assert lease.payload == b"m4"
        leased = cli(url, "cancel", "sms", lease.id, "--json")
        assert leased.returncode == 1
        assert json.loads(leased.stdout)["state"] == "leased" and "cannot be cancelled" in one_error_line(leased)
        assert broker.ack(lease)
        assert drain_payloads(broker, "sms") == [b"m3"]
        assert broker.stats("sms").dead == 2


def test_get_and_cancel_by_ref(url: str) -> None:
    seed(url)
    with sharded_broker.connect(url) as broker:
        mid = broker.enqueue("sms", b"by ref", key="user-9", ref="task-42")
    shown = cli(url, "get", "sms", "--ref", "task-42")
    assert shown.returncode == 0, shown.stderr
    assert f"message {mid} of 'sms': waiting" in shown.stdout and "ref task-42" in shown.stdout
    assert json.loads(cli(url, "get", "sms", "--ref", "task-42", "--json").stdout)["ref"] == "task-42"
    cancelled = cli(url, "cancel", "sms", "--ref", "task-42", "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    answer = json.loads(cancelled.stdout)
    assert (answer["cancelled"], answer["id"], answer["ref"], answer["state"]) == (True, mid, "task-42", "waiting")
    again = cli(url, "cancel", "sms", "--ref", "task-42")
    assert again.returncode == 1 and "no message with ref 'task-42' in queue 'sms'" in one_error_line(again)
    missing = cli(url, "get", "sms", "--ref", "task-42")
    assert missing.returncode == 1 and "no message with ref 'task-42'" in one_error_line(missing)
    for args in (("get", "sms"), ("cancel", "sms", mid, "--ref", "task-42")):
        both = cli(url, *args)
        assert both.returncode == 2 and "by its ID or by --ref REF (exactly one)" in one_error_line(both)


def test_purge_refuses_without_a_terminal_then_purges_with_yes(url: str) -> None:
    seed(url)
    refused = cli(url, "purge", "sms")
    assert refused.returncode == 2
    assert "pass --yes" in one_error_line(refused)
    with sharded_broker.connect(url) as broker:
        assert (broker.stats("sms").ready, broker.stats("sms").dead) == (3, 2)

    purged = cli(url, "purge", "sms", "--yes", "--json")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {"queue": "sms", "what": "waiting", "purged": 3}
    dead = cli(url, "purge", "sms", "--dead", "--yes")
    assert dead.returncode == 0 and "purged 2 dead letters" in dead.stdout
    with sharded_broker.connect(url) as broker:
        stats = broker.stats("sms")
        assert (stats.ready, stats.dead, broker.stats("email").delayed) == (0, 0, 1)


def test_purge_asks_on_a_terminal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    seed(url)

    def purge_answering(answer: bytes) -> tuple[int, str]:
        controller, terminal = pty.openpty()
        process = subprocess.Popen(
            [str(SCRIPT), "--url", url, "purge", "sms"],
            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        os.close(terminal)
        os.write(controller, answer)
        out, err = process.communicate(timeout=60)
        os.close(controller)
        return process.returncode, out + err

    code, output = purge_answering(b"n\n")
    assert code == 1 and "Delete 3 ready and 0 delayed messages of queue 'sms'?" in output
    assert "nothing deleted" in output
    with sharded_broker.connect(url) as broker:
        assert broker.stats("sms").ready == 3
    code, output = purge_answering(b"y\n")
    assert code == 0 and "purged 3 ready and delayed messages" in output
    with sharded_broker.connect(url) as broker:
        assert broker.stats("sms").ready == 0


def test_pause_and_resume_a_queue_and_a_key(url: str) -> None:
    seed(url)
    paused = cli(url, "pause", "sms")
    assert paused.returncode == 0 and "paused queue 'sms'" in paused.stdout
    assert table_rows(cli(url, "stats").stdout)["sms"][7] == "PAUSED"
    with sharded_broker.connect(url) as broker:
        assert broker.stats("sms").paused and broker.lease("sms", limit=10) == []
    assert cli(url, "resume", "sms").returncode == 0

    assert cli(url, "pause", "sms", "user-0").returncode == 0
    with sharded_broker.connect(url) as broker:
        assert not broker.stats("sms").paused
        assert drain_payloads(broker, "sms") == [b"m3"]  # only user-1 is served
    resumed = cli(url, "resume", "sms", "user-0")
    assert resumed.returncode == 0 and "resumed key 'user-0' of 'sms'" in resumed.stdout
    with sharded_broker.connect(url) as broker:
        assert drain_payloads(broker, "sms") == [b"m2", b"m4"]


def test_interval_spaces_deliveries_and_clears(url: str) -> None:
    seed(url)
    result = cli(url, "interval", "sms", "user-0", "3600")
    assert result.returncode == 0, result.stderr
    assert "at least 3600s between deliveries" in result.stdout
    with sharded_broker.connect(url) as broker:
        # Deliveries before the interval was set do not count: m2 goes, then m4 waits an hour.
        assert sorted(drain_payloads(broker, "sms")) == [b"m2", b"m3"]
    cleared = cli(url, "interval", "sms", "user-0", "--clear")
    assert cleared.returncode == 0 and "default interval" in cleared.stdout
    with sharded_broker.connect(url) as broker:
        assert drain_payloads(broker, "sms") == [b"m4"]


def test_weight_gives_a_key_more_turns_and_clears(url: str) -> None:
    with sharded_broker.connect(url) as broker:
        for i in range(6):
            broker.enqueue("tiers", f"p{i}".encode(), key="paying")
            broker.enqueue("tiers", f"f{i}".encode(), key="free")
    result = cli(url, "weight", "tiers", "paying", "3")
    assert result.returncode == 0, result.stderr
    assert "key 'paying' of 'tiers': weight 3 (up to 3 turns per round)" in result.stdout
    keys = cli(url, "keys", "tiers")
    assert table_rows(keys.stdout)["paying"][-2] == "3"  # the weight column, shown when one is set
    assert table_rows(keys.stdout)["free"][-2] == "1"
    assert [k["weight"] for k in json.loads(cli(url, "keys", "tiers", "--json").stdout) if k["key"] == "paying"] == [3]
    assert "weight: 3" in cli(url, "why", "tiers", "paying").stdout
    with sharded_broker.connect(url) as broker:
        served = []
        for _ in range(4):
            [lease] = broker.lease("tiers")
            served.append(lease.key)
            broker.ack(lease)
    assert served == ["paying", "paying", "paying", "free"]
    cleared = cli(url, "weight", "tiers", "paying", "--clear")
    assert cleared.returncode == 0 and "weight 1 (the default" in cleared.stdout
    assert "weight" not in cli(url, "keys", "tiers").stdout  # no weighted key: no column
    for args in (("0",), ("-2",), ("x",), ()):
        refused = cli(url, "weight", "tiers", "paying", *args)
        assert refused.returncode == 2, args


def test_settings_on_a_queue_without_messages_say_so(url: str) -> None:
    seed(url)
    result = cli(url, "pause", "smss")
    assert result.returncode == 0
    assert "queue 'smss' has never held a message" in one_error_line(result)


def test_refused_values_change_nothing(url: str) -> None:
    seed(url)
    # A negative number is SECONDS, with or without "--" (not "no such option").
    for args in (("--", "-5"), ("-1",), ("-0.5",)):
        result = cli(url, "interval", "sms", "user-0", *args)
        assert result.returncode == 2, args
        assert "interval must be >= 0" in one_error_line(result)
    with sharded_broker.connect(url) as broker:
        assert drain_payloads(broker, "sms") == [b"m2", b"m3", b"m4"]


def test_replay_of_ids_that_are_not_dead_letters_says_so_and_nothing_else(url: str) -> None:
    ids = seed(url)
    with sharded_broker.connect(url) as broker:
        live = broker.enqueue("sms", b"alive", key="user-5")
    for args, words in (
        ((live,), "no dead letter of 'sms' has that id"),
        (("no-such-id", live), "no dead letter of 'sms' has any of these 2 ids"),
    ):
        result = cli(url, "replay", "sms", *args)
        assert result.returncode == 1
        assert result.stdout == ""  # never "replayed 0 dead letters" first
        assert words in one_error_line(result)
    with sharded_broker.connect(url) as broker:
        assert {d.id for d in broker.dead_letters("sms")} == {ids["m0"], ids["m1"]}


def test_replay_default_position_is_the_same_in_help_readme_and_engine() -> None:
    engine_default = inspect.signature(sharded_broker.Broker.replay).parameters["position"].default
    help_text = CliRunner().invoke(main, ["replay", "--help"]).output
    assert f"[default: {engine_default}]" in " ".join(help_text.split())
    [readme_row] = [line for line in README.read_text().splitlines() if line.startswith("| `dead QUEUE`, `replay")]
    assert f"[--position {engine_default}" in readme_row
    assert f"{engine_default} of their keys by default" in readme_row


# -- errors -------------------------------------------------------------------------------


def test_unknown_queue_is_one_line_and_exit_1(url: str) -> None:
    seed(url)
    for command in (["stats", "smss"], ["dead", "smss"], ["replay", "smss", "--all"], ["purge", "smss", "--yes"]):
        result = cli(url, *command)
        assert result.returncode == 1, command
        assert one_error_line(result) == "Error: unknown queue 'smss'; known queues: email, sms"


def test_unreachable_server_never_shows_the_password() -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    result = cli(url, "stats")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "127.0.0.1" in line and "***" in line
    assert SECRET not in result.stdout + result.stderr


def test_wrong_password_never_shows_the_password() -> None:
    with RedisServer(["--requirepass", "the-right-one"]) as server:
        result = cli(f"redis://:{SECRET}@127.0.0.1:{server.port}/0", "stats", "--json")
    assert result.returncode == 1
    one_error_line(result)
    assert SECRET not in result.stdout + result.stderr


def test_celery_url_form_is_accepted(redis_url: str) -> None:
    seed(redis_url)
    result = cli("sharded+" + redis_url, "stats", "sms", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ready"] == 3


def test_url_from_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    seed(url)
    result = cli("", "stats", "sms", "--json", env={"SHARDED_BROKER_URL": url})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dead"] == 2


def test_options_from_the_environment_and_explicit_ones_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    with sharded_broker.connect(url) as broker:
        broker.enqueue("sms", b"a", key="k")
        broker.enqueue("sms", b"b", key="k")
        assert [lease.payload for lease in broker.lease("sms")] == [b"a"]  # holds key k
    env = {"SHARDED_BROKER_URL": url, "SHARDED_BROKER_KEY_CONCURRENCY": "2"}
    from_environment = cli("", "why", "sms", "k", "--json", env=env)
    assert from_environment.returncode == 0, from_environment.stderr
    assert json.loads(from_environment.stdout)["reason"] == "ready"  # a second slot is free
    explicit = cli("", "why", "sms", "k", "--json", "--key-concurrency", "1", env=env)
    assert explicit.returncode == 0, explicit.stderr
    assert json.loads(explicit.stdout)["reason"] == "leased"
    # --url beats SHARDED_BROKER_URL.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    sharded_broker.connect(other).close()
    result = cli(other, "stats", "--json", env=env)
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stderr


def test_bad_variables_are_usage_errors_naming_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    sharded_broker.connect(url).close()
    bad = cli("", "stats", env={"SHARDED_BROKER_URL": url, "SHARDED_BROKER_KEY_CONCURRENCY": "two"})
    assert bad.returncode == 2
    assert one_error_line(bad) == "Error: SHARDED_BROKER_KEY_CONCURRENCY must be a positive integer, not 'two'"
    typo = cli("", "stats", env={"SHARDED_BROKER_URL": url, "SHARDED_BROKER_VISIBILITY_TIMOUT": "5"})
    assert typo.returncode == 2
    assert one_error_line(typo).startswith("Error: unknown environment variable(s) SHARDED_BROKER_VISIBILITY_TIMOUT; known: ")
    malformed = cli("", "stats", env={"SHARDED_BROKER_URL": "admin:hunter2@redis-host:6379"})
    assert malformed.returncode == 2
    assert one_error_line(malformed).startswith("Error: SHARDED_BROKER_URL must be a broker URL")
    assert "hunter2" not in malformed.stderr + malformed.stdout


def test_bad_urls(tmp_path: Path) -> None:
    missing = cli(f"sqlite:///{tmp_path / 'nope.db'}", "stats")
    assert missing.returncode == 1
    assert "no SQLite database at" in one_error_line(missing)
    assert not (tmp_path / "nope.db").exists()  # a read command creates nothing

    malformed = cli("localhost/0", "stats")  # no scheme; never connected
    assert malformed.returncode == 2 and "malformed broker URL" in one_error_line(malformed)
    scheme = cli("amqp://guest:guest@localhost//", "stats")
    assert scheme.returncode == 2 and "unknown URL scheme 'amqp'" in one_error_line(scheme)
    assert "guest:guest" not in scheme.stderr


def test_no_url_is_a_usage_error() -> None:
    result = cli("", "stats", env={"SHARDED_BROKER_URL": ""})
    assert result.returncode == 2
    assert one_error_line(result) == "Error: no broker URL: pass --url URL or set SHARDED_BROKER_URL"


def test_every_command_help_works_without_a_url() -> None:
    assert main.commands  # the loop below checks something
    for name in main.commands:
        result = cli("", name, "--help", env={"SHARDED_BROKER_URL": ""})
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout.startswith(f"Usage: sharded-broker {name} ")


def test_sqlite_paths_are_shown_absolute_and_relative_ones_explained(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    seed(f"sqlite:///{tmp_path / 'app' / 'queues.db'}")
    # From tmp_path, sqlite:///app/queues.db is that file: stats names it absolutely.
    result = cli("sqlite:///app/queues.db", "stats", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"broker: sqlite:///{tmp_path / 'app' / 'queues.db'}"
    # From tmp_path/app, the same URL names a file that does not exist: said, with where it looked.
    elsewhere = cli("sqlite:///app/queues.db", "stats", cwd=tmp_path / "app")
    assert elsewhere.returncode == 1
    assert one_error_line(elsewhere) == (
        f"Error: no SQLite database at {tmp_path / 'app' / 'app' / 'queues.db'} (sqlite:///app/queues.db is "
        f"relative to the current directory {tmp_path / 'app'}; an absolute path takes four slashes: "
        "sqlite:////app/queues.db names /app/queues.db)"
    )
    assert not (tmp_path / "app" / "app").exists()


def test_no_command_touches_a_sqlite_file_that_is_not_a_queue_database(tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    with closing(sqlite3.connect(foreign)) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
        db.commit()
    junk, empty = tmp_path / "junk.db", tmp_path / "empty.db"
    junk.write_bytes(b"not a database at all, just text\n" * 200)
    empty.write_bytes(b"")
    before = {path: path.read_bytes() for path in (foreign, junk, empty)}
    commands = [("stats",), ("top", "--once"), ("keys", "q"), ("dead", "q"), ("show", "q", "k"),
                ("events", "q", "--timeout", "0"), ("pause", "q"), ("interval", "q", "k", "1")]
    for path, words, tried in ((foreign, "not a sharded-broker queue database", commands),
                               (junk, "is not a SQLite database", commands[:1]),
                               (empty, "not a sharded-broker queue database", commands[:1])):
        for command in tried:
            result = cli(f"sqlite:///{path}", *command)
            assert result.returncode == 1, (path, command)
            assert words in one_error_line(result)
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "empty.db", "junk.db"]  # no -wal, no -shm


def test_memory_url_says_it_is_per_process(memory_url: str) -> None:
    result = invoke(memory_url, "stats", "--json")
    assert result.exit_code == 0
    assert "a memory:// store lives inside one process" in result.stderr
    assert "always empty" in result.stderr


def test_rediss_to_a_plain_text_port_names_tls_within_the_connect_timeout() -> None:
    connect_timeout = 6.0
    with RedisServer() as server:
        started = time.monotonic()
        result = cli(f"rediss://127.0.0.1:{server.port}/0?socket_connect_timeout={connect_timeout:g}", "stats")
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert f"the server at 127.0.0.1:{server.port} speaks plain-text Redis, not TLS" in one_error_line(result)
    # Without the check, the client waits out the whole timeout and reports only that.
    assert elapsed < connect_timeout


def test_rediss_to_a_tls_port_works_through_the_check(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "tls")
    tls_port = free_port()
    with RedisServer([*tls_server_args(ca, tls_port)]):
        url = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={ca.ca_cert}"
        with sharded_broker.connect(f"rediss://localhost:{tls_port}/0", ssl_ca_certs=str(ca.ca_cert)) as broker:
            broker.enqueue("sms", b"over tls", key="user-1")
        result = cli(url, "stats", "sms", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ready"] == 1


def test_top_fits_100_columns_without_cutting_a_header(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    with sharded_broker.connect(url) as broker:
        for i in range(30):
            broker.enqueue("notifications-email", b"x", key=f"customer-{i % 4}")
    returncode, output = on_a_terminal(100, "--url", url, "top", "--once")
    assert returncode == 0, output
    lines = output.splitlines()
    assert max(len(line) for line in lines) <= 100
    headers = [line for line in lines if line.startswith("┃")]
    assert len(headers) == 2 and not any("…" in line for line in headers), headers
    stats_header = [cell.strip() for cell in headers[0].strip("┃").split("┃")]
    assert stats_header[:8] == ["queue", "ready", "leased", "delayed", "dead", "keys", "lag", "paused"]
    assert table_rows(output)["notifications-email"][:2] == ["notifications-email", "30"]


# -- exporter -----------------------------------------------------------------------------


def scrape(port: int, process: subprocess.Popen[str]) -> str:
    """GET /metrics, retrying while the exporter starts up."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_exporter_serves_the_collector(url: str) -> None:
    seed(url)
    port = free_port()
    process = subprocess.Popen(
        [str(SCRIPT), "--url", url, "exporter", "--port", str(port), "--queue", "sms"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        body = scrape(port, process)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"on http://127.0.0.1:{port}/metrics" in err
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert samples[("sharded_broker_up", ())] == 1
    assert samples[("sharded_broker_messages", (("queue", "sms"), ("state", "ready")))] == 3
    assert samples[("sharded_broker_messages", (("queue", "sms"), ("state", "dead")))] == 2
    assert samples[("sharded_broker_keys", (("queue", "sms"),))] == 2
    assert samples[("sharded_broker_key_backlog", (("key", "user-0"), ("queue", "sms")))] == 2
    assert samples[("sharded_broker_messages_enqueued_total", (("queue", "sms"),))] == 0  # counts from its start
    assert not any(dict(labels).get("queue") == "email" for _, labels in samples)  # --queue sms only


def test_exporter_port_in_use(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"
    seed(url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(url, "exporter", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in one_error_line(result)


# -- in process (memory://) ---------------------------------------------------------------


def invoke(memory_url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--url", memory_url, *args])


def test_replay_needs_ids_or_all(memory_url: str) -> None:
    seed(memory_url)
    for args in (["replay", "sms"], ["replay", "sms", "some-id", "--all"]):
        result = invoke(memory_url, *args)
        assert result.exit_code == 2 and "IDS" in result.stderr
    assert sharded_broker.connect(memory_url).stats("sms").dead == 2


def test_interval_needs_seconds_or_clear(memory_url: str) -> None:
    seed(memory_url)
    neither = invoke(memory_url, "interval", "sms", "user-0")
    assert neither.exit_code == 2 and "SECONDS or --clear" in neither.stderr and "both" not in neither.stderr
    both = invoke(memory_url, "interval", "sms", "user-0", "5", "--clear")
    assert both.exit_code == 2 and "not both" in both.stderr
    nan = invoke(memory_url, "interval", "sms", "user-0", "nan")
    assert nan.exit_code == 2 and "interval must be >= 0" in nan.stderr


def test_bad_key_is_a_usage_error(memory_url: str) -> None:
    seed(memory_url)
    result = invoke(memory_url, "pause", "sms", "bad\nkey")
    assert result.exit_code == 2 and "control character" in result.stderr
    assert not sharded_broker.connect(memory_url).stats("sms").paused


def test_replay_chunks_keep_a_key_together() -> None:
    letters = [("a1", "a"), ("b1", "b"), ("a2", "a"), ("n1", None), ("c1", "c"), ("b2", "b"), ("n2", None)]
    assert replay_chunks(letters, 3) == [["a1", "a2"], ["b1", "b2"], ["n1", "n2", "c1"]]
    # A key with more dead letters than a chunk holds still goes in one call.
    assert replay_chunks([(f"x{i}", "x") for i in range(5)] + [("y", "y")], 2) == [
        ["x0", "x1", "x2", "x3", "x4"], ["y"],
    ]


def test_replay_all_in_many_chunks(memory_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sharded_broker.cli.REPLAY_CHUNK", 2)
    monkeypatch.setattr("sharded_broker.cli.REPLAY_PAGE", 3)
    broker = sharded_broker.connect(memory_url)
    for i in range(12):
        broker.enqueue("q", f"{i}".encode(), key=f"k{i % 4}")
    while leases := broker.lease("q", limit=12):
        for lease in leases:
            broker.nack(lease, dead=True, reason="test")
    assert broker.stats("q").dead == 12
    result = invoke(memory_url, "replay", "q", "--all", "--position", "head")
    assert result.exit_code == 0, result.output
    assert "replayed 12 dead letters" in result.stdout
    by_key: dict[str | None, list[bytes]] = {}
    while leases := broker.lease("q", limit=12):
        for lease in leases:
            by_key.setdefault(lease.key, []).append(lease.payload)
        broker.ack_many(leases)
    assert by_key == {f"k{k}": [f"{i}".encode() for i in range(k, 12, 4)] for k in range(4)}


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 0.04, 4.25, 59.9, 307, 3600 * 3 + 125, 86400 * 2 + 3600 * 5)] == [
        "0s", "0s", "4.2s", "59.9s", "5m 07s", "3h 02m", "2d 05h",
    ]


def test_normalize_url() -> None:
    assert normalize_url("sharded+redis://:pw@host:6379/0") == "redis://:pw@host:6379/0"
    assert normalize_url("sqlite:///q.db") == "sqlite:///q.db"


def test_percent_encoded_password_is_masked_in_errors() -> None:
    url = f"redis://:p%40{SECRET}@127.0.0.1:{free_port()}/0"
    result = cli(url, "stats")
    assert result.returncode == 1
    assert SECRET not in result.stdout + result.stderr
