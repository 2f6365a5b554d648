"""The dashboard's pages, actions and security, through Flask's test client on real
backends (memory, and a real redis-server where the broker URL's password matters).
The browser tests (tests/test_dashboard_browser.py) drive it in Chromium."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="the dashboard extra (flask, waitress) is not installed")

import sharded_broker
from sharded_broker import Message
from sharded_broker.dashboard import REPLAY_CHUNK, TOKEN_HEADER, BindRefused, check_bind, create_app
from support.redis_server import RedisServer, free_port

TOKEN = "test-token-123"
SECRET = "hunter2-dashboard-secret"
SCRIPT = Path(sys.executable).with_name("sharded-broker")


@pytest.fixture
def broker(memory_url: str):
    with sharded_broker.connect(memory_url) as broker:
        yield broker


def client_for(broker, url: str = "memory://", **options):
    app = create_app(broker, url, token=TOKEN, stuck_after=0.0, **options)
    return app.test_client()


def post(client, path: str, body: dict, *, token: str | None = TOKEN, **headers):
    if token is not None:
        headers[TOKEN_HEADER] = token
    return client.post(path, json=body, headers=headers)


def test_pages_show_readable_numbers_and_the_reason(broker) -> None:
    broker.enqueue_many("sms", [Message(b"x", key=f"user-{i % 3}") for i in range(1234)])
    broker.pause("sms", key="user-1")
    client = client_for(broker)
    home = client.get("/")
    assert home.status_code == 200
    assert b">1,234<" in home.data and b"all queues, per minute" in home.data
    queue = client.get("/queue?q=sms").get_data(as_text=True)
    assert ">1,234<" in queue  # ready
    assert 'data-key="user-1"' in queue and "reason-paused" in queue  # stuck (stuck_after=0) and why
    assert "hottest keys" in queue and "most lagging keys" in queue and ">412<" in queue
    key = client.get("/key?q=sms&k=user-1").get_data(as_text=True)
    assert 'id="why-reason">paused<' in key and "key &#39;user-1&#39; is paused" in key
    assert "recent minutes" in key and 'data-action="interval"' in key
    # The live region alone, for the page's refresh.
    partial = client.get("/key?q=sms&k=user-1&partial=1").get_data(as_text=True)
    assert "<html" not in partial and 'id="why-reason"' in partial
    assert client.get("/queue?q=nope").status_code == 404
    assert client.get("/static/dashboard.js").status_code == 200  # shipped in the package


def test_security_headers_forbid_framing_and_foreign_scripts(broker) -> None:
    broker.enqueue("sms", b"x", key="a")
    response = client_for(broker).get("/")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["X-Frame-Options"] == "DENY"
    assert b"http://" not in response.data and b"https://" not in response.data  # nothing fetched from outside


def test_an_action_needs_the_token(broker) -> None:
    broker.enqueue("sms", b"x", key="a")
    client = client_for(broker)
    for token in (None, "", "wrong-token"):
        refused = post(client, "/api/pause", {"queue": "sms", "key": "a", "paused": True}, token=token)
        assert refused.status_code == 403 and "token" in refused.get_json()["error"]
    assert not broker.key_info("sms", "a").paused
    accepted = post(client, "/api/pause", {"queue": "sms", "key": "a", "paused": True})
    assert accepted.status_code == 200, accepted.get_json()
    assert broker.key_info("sms", "a").paused


def test_cross_site_requests_are_refused_even_with_the_token(broker) -> None:
    broker.enqueue("sms", b"x", key="a")
    client = client_for(broker)
    body = {"queue": "sms", "paused": True}
    assert post(client, "/api/pause", body, Origin="https://evil.example").status_code == 403
    assert post(client, "/api/pause", body, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    # A plain form post (what a cross-site page can send without a preflight) is refused.
    form = client.post("/api/pause", data={"queue": "sms", "paused": "true"}, headers={TOKEN_HEADER: TOKEN})
    assert form.status_code == 415
    assert client.get("/api/pause").status_code == 405  # no change through GET
    assert not broker.stats("sms").paused
    same_site = post(client, "/api/pause", body, Origin="http://localhost")
    assert same_site.status_code == 200 and broker.stats("sms").paused


def test_read_only_hides_actions_and_refuses_them(broker) -> None:
    broker.enqueue("sms", b"x", key="a")
    broker.nack(broker.lease("sms")[0], dead=True, reason="boom")
    client = client_for(broker, read_only=True)
    for page in ("/", "/queue?q=sms", "/key?q=sms&k=a"):
        text = client.get(page).get_data(as_text=True)
        assert "data-action" not in text and "read-only" in text, page
    refused = post(client, "/api/replay", {"queue": "sms"})
    assert refused.status_code == 403 and "read-only" in refused.get_json()["error"]
    assert broker.stats("sms").dead == 1


def test_actions_interval_release_replay_and_purge(broker) -> None:
    broker.enqueue_many("sms", [Message(b"1", key="a"), Message(b"2", key="a"), Message(b"3", key="b")])
    client = client_for(broker)
    assert post(client, "/api/interval", {"queue": "sms", "key": "a", "seconds": 2.5}).status_code == 200
    assert broker.key_info("sms", "a").interval == 2.5
    assert post(client, "/api/interval", {"queue": "sms", "key": "a", "seconds": None}).status_code == 200
    assert broker.key_info("sms", "a").interval is None
    bad = post(client, "/api/interval", {"queue": "sms", "key": "a", "seconds": "soon"})
    assert bad.status_code == 400 and "seconds must be a number" in bad.get_json()["error"]
    assert {lease.key for lease in broker.lease("sms", 2)} == {"a", "b"}
    [hold] = broker.why("sms", "a").holds
    lease_fields = {"queue": "sms", "key": "a", "message_id": hold.message_id, "token": hold.token, "batch_id": hold.batch_id}
    released = post(client, "/api/release", lease_fields)
    assert released.status_code == 200
    again = post(client, "/api/release", lease_fields)
    assert again.status_code == 409 and "no longer current" in again.get_json()["error"]
    assert broker.why("sms", "a").reason == "ready"
    letters = broker.lease("sms", 5)
    for lease in letters:
        broker.nack(lease, dead=True, reason="boom")
    one = post(client, "/api/replay", {"queue": "sms", "ids": [letters[0].id]})
    assert one.get_json()["replayed"] == 1
    purged = post(client, "/api/purge", {"queue": "sms"})
    assert purged.get_json()["purged"] == len(letters) - 1 and broker.stats("sms").dead == 0
    unknown = post(client, "/api/purge", {"queue": "nope"})
    assert unknown.status_code == 404


def test_replaying_many_dead_letters_reports_progress(broker) -> None:
    count = 2 * REPLAY_CHUNK + 37
    broker.enqueue_many("sms", [Message(str(i).encode(), key=f"k{i % 10}") for i in range(count)])
    broker.configure_queue("sms", max_deliveries=1)
    while leases := broker.lease("sms", 500, per_key=500):
        for lease in leases:
            broker.nack(lease, dead=True, reason="boom")
    assert broker.stats("sms").dead == count
    client = client_for(broker)
    started = post(client, "/api/replay", {"queue": "sms", "position": "tail"})
    job_id = started.get_json()["job"]
    seen = []
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        job = client.get(f"/api/jobs/{job_id}").get_json()
        seen.append(job["done"])
        if job["finished"]:
            break
        time.sleep(0.01)
    assert job == {"id": job_id, "queue": "sms", "total": count, "done": count, "finished": True, "error": None}
    assert seen == sorted(seen)
    assert broker.stats("sms").dead == 0 and broker.stats("sms").ready == count
    assert client.get("/api/jobs/replay-999").status_code == 404


def test_the_password_reaches_no_page_log_or_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with RedisServer(["--requirepass", SECRET]) as server:
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
        broker = sharded_broker.connect(url)
        broker.enqueue("sms", b"x", key="a")
        client = client_for(broker, url)
        pages = [client.get(path) for path in ("/", "/queue?q=sms", "/key?q=sms&k=a")]
        assert all(page.status_code == 200 for page in pages)
        assert all(SECRET not in page.get_data(as_text=True) for page in pages)
        assert "redis://:***@127.0.0.1" in pages[0].get_data(as_text=True)
    # The server is gone: the error page and the log name the URL without its password.
    failed = client.get("/queue?q=sms")
    assert failed.status_code == 503
    assert SECRET not in failed.get_data(as_text=True) and "unavailable" in failed.get_data(as_text=True)
    action = post(client, "/api/pause", {"queue": "sms", "paused": True})
    assert action.status_code == 503 and SECRET not in action.get_data(as_text=True)
    assert SECRET not in caplog.text
    broker.close()


def test_non_loopback_bind_needs_a_token() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, token_given=False)
    for host in ("0.0.0.0", "192.0.2.10", "::", "example.internal"):
        with pytest.raises(BindRefused, match="--token"):
            check_bind(host, token_given=False)
        check_bind(host, token_given=True)
    # The command refuses before it listens anywhere.
    result = subprocess.run(
        [str(SCRIPT), "--url", "memory://", "dashboard", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "SHARDED_BROKER_DASHBOARD_TOKEN"},
    )
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0" in result.stderr


def test_the_command_prints_the_address_with_a_generated_token_once(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    with sharded_broker.connect(f"sqlite:///{db}") as broker:
        broker.enqueue("sms", b"x", key="a")
    port = free_port()
    process = subprocess.Popen(
        [str(SCRIPT), "dashboard", "--url", f"sqlite:///{db}", "--port", str(port)],  # --url after it works too
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith(f"dashboard of sqlite:///{db}: http://127.0.0.1:{port}/#token=")
        token = line.split("#token=")[1].split()[0]
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/queue?q=sms", timeout=10) as page:
            text = page.read().decode()
        assert token not in text  # the page never holds the token: the fragment does
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/pause", data=b'{"queue": "sms", "paused": true}', method="POST",
            headers={"Content-Type": "application/json", TOKEN_HEADER: token},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert token not in out + err  # printed once, on the first line only
    with sharded_broker.connect(f"sqlite:///{db}") as broker:
        assert broker.stats("sms").paused


def test_the_command_takes_its_token_from_the_environment(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    with sharded_broker.connect(f"sqlite:///{db}") as broker:
        broker.enqueue("sms", b"x", key="a")
    port = free_port()
    process = subprocess.Popen(
        [str(SCRIPT), "dashboard", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "SHARDED_BROKER_URL": f"sqlite:///{db}", "SHARDED_BROKER_DASHBOARD_TOKEN": "env-token"},
    )
    try:
        line = process.stdout.readline()
        assert line == f"dashboard of sqlite:///{db}: http://127.0.0.1:{port}/ (actions need the token given with --token or $SHARDED_BROKER_DASHBOARD_TOKEN)\n"
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/pause", data=b'{"queue": "sms", "paused": true}', method="POST",
            headers={"Content-Type": "application/json", TOKEN_HEADER: "env-token"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        process.terminate()
        process.communicate(timeout=30)
    with sharded_broker.connect(f"sqlite:///{db}") as broker:
        assert broker.stats("sms").paused


def test_the_command_never_prints_the_password() -> None:
    with RedisServer(["--requirepass", SECRET]) as server:
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
        with sharded_broker.connect(url) as broker:
            broker.enqueue("sms", b"x", key="a")
        port = free_port()
        process = subprocess.Popen(
            [str(SCRIPT), "--url", url, "dashboard", "--port", str(port), "--read-only"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )
        try:
            line = process.stdout.readline()
            assert line.startswith(f"dashboard of redis://:***@127.0.0.1:{server.port}/0: http://127.0.0.1:{port}/")
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/queue?q=sms", timeout=10) as page:
                assert SECRET not in page.read().decode()
        finally:
            process.terminate()
            out, err = process.communicate(timeout=30)
        assert SECRET not in line + out + err
    # Unreachable: the command fails in one line, without the password.
    failed = subprocess.run(
        [str(SCRIPT), "--url", url, "dashboard", "--port", "0"], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert failed.returncode == 1 and SECRET not in failed.stdout + failed.stderr
    assert "redis://:***@127.0.0.1" in failed.stderr
