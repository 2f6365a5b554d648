"""The dashboard in a real browser: Debian's headless Chromium, driven through its
chromedriver (Selenium), over a throwaway redis-server with a running Dramatiq worker and
the real ``sharded-broker dashboard`` command.

One story, as an operator lives it: a paused key shows as stuck with the reason
"paused" and is resumed from the page, after which its messages complete in order; a
poison message dead-letters, is replayed from the page and completes; an action without
the token is refused. The same run saves a screenshot of every page into
docs/dashboard/ (docs/dashboard.md shows them), at laptop and phone widths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

pytest.importorskip("flask", reason="the dashboard extra (flask, waitress) is not installed")
pytest.importorskip("selenium", reason="selenium (a dev dependency) is not installed")
pytest.importorskip("dramatiq", reason="the dramatiq extra is not installed (a tox redis-only env)")

import dramatiq
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import sharded_broker
from sharded_broker.integrations.dramatiq import ShardedBroker
from support.redis_server import free_port

pytestmark = pytest.mark.browser

SCRIPT = Path(sys.executable).with_name("sharded-broker")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "dashboard"
QUEUE = "orders"
LAPTOP = (1280, 900)
PHONE = (390, 844)
WAIT = 20.0  # seconds any one step may take (the page refreshes every 2 s)


def chromium_paths() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "chromium and chromedriver are missing: run scripts/ensure-chromium (make test does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    binary, driver_path = chromium_paths()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager never downloads anything
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={LAPTOP[0]},{LAPTOP[1]}", "--hide-scrollbars", "--lang=en-US"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard(redis_url: str) -> Iterator[str]:
    """The real command on a free port: the address it prints (with the token fragment)."""
    port = free_port()
    process = subprocess.Popen(
        [str(SCRIPT), "--url", redis_url, "dashboard", "--port", str(port), "--stuck-after", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        line = process.stdout.readline()
        assert "#token=" in line, line + process.stderr.read()
        yield line.split(": ", 1)[1].split()[0]
    finally:
        process.terminate()
        process.communicate(timeout=30)


class Done:
    """What the actors completed, in order, per key."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[str, list[Any]] = {}

    def add(self, key: str, value: Any) -> None:
        with self.lock:
            self.by_key.setdefault(key, []).append(value)

    def of(self, key: str) -> list[Any]:
        with self.lock:
            return list(self.by_key.get(key, []))


def wait_for(driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any], what: str) -> Any:
    # The live refresh replaces the page's content every 2 s: an element found just before
    # may be gone when it is read, so such a step is tried again.
    return WebDriverWait(
        driver, WAIT, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    ).until(condition, message=f"waiting for {what}")


def click(driver: webdriver.Chrome, css: str) -> None:
    """Click the element ``css`` names, found afresh (see wait_for)."""
    def clicked(d: webdriver.Chrome) -> bool:
        found = d.find_elements(By.CSS_SELECTOR, css)
        if found:
            found[0].click()
        return bool(found)

    wait_for(driver, clicked, f"{css} to click")


def use_size(driver: webdriver.Chrome, size: tuple[int, int], height: int | None = None) -> None:
    """Lay the page out as a screen of ``size`` (a phone-sized one as a mobile device)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": size[0], "height": height or size[1], "deviceScaleFactor": 1, "mobile": size[0] < 600,
    })


def shoot(driver: webdriver.Chrome, name: str, size: tuple[int, int] = LAPTOP) -> None:
    """A full-page screenshot of the current page at ``size`` into docs/dashboard/NAME.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    use_size(driver, size)
    height = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    use_size(driver, size, max(size[1], min(height, 4000)))
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    use_size(driver, size)


def fits_the_width(driver: webdriver.Chrome) -> bool:
    """No horizontal scrolling of the page itself (wide tables scroll inside their box)."""
    return driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


def text_of(driver: webdriver.Chrome, css: str) -> str:
    """The text of the first element ``css`` names ('' when there is none), read in the page
    in one step, so a refresh cannot replace it halfway."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : '';", css
    )


def test_operator_story_in_a_real_browser(browser: webdriver.Chrome, dashboard: str, redis_url: str) -> None:
    driver = browser
    done = Done()
    fixed: set[str] = set()
    app = ShardedBroker(url=redis_url, visibility_timeout=5.0)

    @dramatiq.actor(broker=app, queue_name=QUEUE, shard_key="key")
    def record(key: str, n: int) -> None:
        done.add(key, n)

    @dramatiq.actor(broker=app, queue_name=QUEUE, shard_key="key", max_retries=0)
    def charge(key: str) -> None:
        if key not in fixed:
            raise ValueError(f"card declined for {key}")
        done.add(key, "charged")

    @dramatiq.actor(broker=app, queue_name=QUEUE, shard_key="key")
    def slow(key: str, n: int) -> None:
        time.sleep(1.5)
        done.add(key, n)

    admin = sharded_broker.connect(redis_url)
    admin.pause(QUEUE, key="alice")
    for n in range(5):
        record.send("alice", n)
    record.send("bob", 0)
    worker = dramatiq.Worker(app, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        wait_for(driver, lambda _: done.of("bob") == [0], "the worker to run bob's message")

        # Queues page: every queue with readable counts and the chart.
        driver.get(dashboard)
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f'#queues tr[data-queue="{QUEUE}"]'), "the queue row")
        assert "#token=" not in driver.current_url  # the page took the token out of the address bar
        assert driver.find_elements(By.CSS_SELECTOR, "svg.chart polyline")
        shoot(driver, "queues")

        # The queue page lists alice as stuck, with the reason "paused".
        click(driver, f'#queues tr[data-queue="{QUEUE}"] a')
        wait_for(
            driver, lambda d: text_of(d, '#stuck tr[data-key="alice"] .reason') == "paused",
            "alice listed as stuck with the reason paused",
        )
        assert done.of("alice") == []
        shoot(driver, "queue")
        use_size(driver, PHONE)
        assert fits_the_width(driver), "the queue page scrolls sideways on a phone-sized screen"
        shoot(driver, "queue-phone", PHONE)
        use_size(driver, LAPTOP)

        # The key page says why; resume from the page, then alice's messages complete in order.
        click(driver, '#stuck tr[data-key="alice"] a')
        wait_for(driver, lambda d: text_of(d, "#why-reason") == "paused", "the key page's reason")
        assert "is paused: resume it to deliver" in text_of(driver, "#why-summary")
        shoot(driver, "key")
        use_size(driver, PHONE)
        assert fits_the_width(driver), "the key page scrolls sideways on a phone-sized screen"
        shoot(driver, "key-phone", PHONE)
        use_size(driver, LAPTOP)
        click(driver, 'button[data-action="pause"][data-paused="false"]')
        wait_for(driver, lambda _: len(done.of("alice")) == 5, "alice's messages to complete")
        assert done.of("alice") == [0, 1, 2, 3, 4]
        wait_for(driver, lambda d: text_of(d, "#why-reason") == "empty", "the page to show alice moving again")

        # A key held by a running task: the lease, its deadline, and the release button.
        slow.send("dave", 0)
        slow.send("dave", 1)
        wait_for(driver, lambda _: admin.why(QUEUE, "dave").reason == "leased", "dave's first task to run")
        driver.get(dashboard.split("#")[0] + f"key?q={QUEUE}&k=dave")
        wait_for(driver, lambda d: text_of(d, "#why-reason") == "leased", "the key page to show the lease")
        assert "lease of message" in text_of(driver, "#why .hold")
        assert driver.find_elements(By.CSS_SELECTOR, '#why button[data-action="release"]')
        shoot(driver, "key-leased")
        wait_for(driver, lambda _: done.of("dave") == [0, 1], "dave's tasks to complete in order")

        # A poison message dead-letters; replayed from the page, it completes.
        charge.send("carol")
        wait_for(driver, lambda _: admin.stats(QUEUE).dead == 1, "the poison message to dead-letter")
        driver.get(dashboard.split("#")[0] + f"queue?q={QUEUE}")
        wait_for(driver, lambda d: text_of(d, "#dead tbody tr[data-id]"), "the dead letter")
        assert "ValueError: card declined for carol" in text_of(driver, "#dead tbody tr[data-id]")
        shoot(driver, "queue-dead-letter")
        fixed.add("carol")
        click(driver, '#dead tbody tr[data-id] button[data-action="replay"]')
        wait_for(driver, lambda _: done.of("carol") == ["charged"], "the replayed message to complete")
        wait_for(driver, lambda _: admin.stats(QUEUE).dead == 0, "no dead letters left")
        assert "replayed 1 message" in text_of(driver, "#status")

        # Without the token, an action is refused: by the page, and by the server itself.
        driver.execute_script("sessionStorage.clear()")
        click(driver, 'h1 button[data-action="pause"]')
        wait_for(driver, lambda d: "enter the dashboard's token" in text_of(d, "#status"), "the page to ask for the token")
        status = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch('/api/pause', {method: 'POST', headers: {'Content-Type': 'application/json'},"
            " body: JSON.stringify({queue: arguments[0], paused: true})})"
            ".then(r => r.json().then(b => done([r.status, b.error])));",
            QUEUE,
        )
        assert status[0] == 403 and "token" in status[1]
        assert not admin.stats(QUEUE).paused
    finally:
        worker.stop(timeout=10_000)
        app.close()
        admin.close()
