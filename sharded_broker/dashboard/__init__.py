"""``sharded-broker dashboard``: a small web app over one broker URL.

A Flask (WSGI) app served by waitress: the engine's calls are synchronous and short, so a
WSGI app on a thread pool fits them without an event loop. Pages are rendered on the
server (a page is complete at first paint) and refresh their live region every
``REFRESH_SECONDS`` by fetching the same page's fragment; charts are inline SVG drawn
here; the one script and stylesheet ship inside the package (nothing is fetched from
the internet).

Security (see docs/dashboard.md):

- Every state-changing action is a ``POST`` to ``/api/...`` that must carry the token
  (``--token``, or one generated at start-up and printed once) in the
  ``X-Dashboard-Token`` header, with a JSON body. A cross-site page can send neither a
  custom header nor a JSON body without a CORS preflight, which this app never grants;
  an ``Origin`` or ``Sec-Fetch-Site`` header naming another site is refused as well.
  The page learns the token from the URL's fragment (``#token=...``), which browsers
  never send to a server, so it appears in no request line or log.
- ``read_only`` hides every action and refuses every ``POST``.
- The broker URL's password is shown nowhere: pages show :func:`sharded_broker.urls.display_url`, and every
  error text is scrubbed of it before it reaches a page or a log line.
- :func:`check_bind` refuses a non-loopback address without an explicit token.
"""

from __future__ import annotations

import hmac
import ipaddress
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

from flask import Flask, Response, abort, jsonify, render_template, request
from markupsafe import Markup, escape

from .. import urls
from ..broker import Broker
from ..diagnosis import describe_seconds
from ..errors import InvalidArgument, InvalidArgumentType, ShardedBrokerError
from ..models import COUNTERS, KeyDiagnosis, KeyInfo, MinuteMetrics

REFRESH_SECONDS = 2.0
TOKEN_HEADER = "X-Dashboard-Token"
CHART_MINUTES = 60
KEY_MINUTES = 15
HOT_KEYS = 10
# The stuck-keys list reads every key (in bounded pages); the page refreshes every 2 s, so
# one queue's list is reused for up to this long (and never longer than --stuck-after:
# a list of keys waiting more than S seconds is then at most S seconds old).
STUCK_REUSE_SECONDS = 10.0
DEAD_SHOWN = 50
# Dead letters replayed per engine call by a replay job: its progress advances per chunk.
REPLAY_CHUNK = 500
DEAD_PAGE = 1000
SERIES_COLOURS = {"enqueued": "#3b82f6", "delivered": "#8b5cf6", "acked": "#10b981", "retried": "#f59e0b", "dead": "#ef4444"}

log = logging.getLogger("sharded_broker.dashboard")


class BindRefused(ValueError):
    """A dashboard may not listen where others can reach it without a token."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, token_given: bool) -> None:
    """Refuse to listen on a non-loopback ``host`` unless the operator chose a token."""
    if not is_loopback(host) and not token_given:
        raise BindRefused(
            f"refusing to listen on {host}: it is not a loopback address, so others can reach the dashboard; "
            "pass --token TOKEN (and share it only with operators), or listen on 127.0.0.1"
        )


# -- formatting for people ------------------------------------------------------------------


def number(value: float | int) -> str:
    """Thousands separators: ``12,345``."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def ago(seconds: float) -> str:
    return "now" if seconds < 0.05 else f"{describe_seconds(seconds)} ago"


def utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def clock_minute(epoch: float) -> str:
    """A metrics minute as a clock reading: ``14:05 UTC``."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%H:%M UTC")


def chart(minutes: list[MinuteMetrics], *, title: str) -> Markup:
    """Per-minute counts as an inline SVG line chart with a legend, oldest minute left."""
    width, height, left, bottom, top = 900, 200, 44, 22, 10
    peak = max([getattr(m, name) for m in minutes for name in COUNTERS] + [1])
    span = max(len(minutes) - 1, 1)

    def point(i: int, value: int) -> str:
        x = left + (width - left - 6) * i / span
        y = top + (height - top - bottom) * (1 - value / peak)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" class="axis"/>',
        f'<text x="{left - 4}" y="{top + 8}" class="tick" text-anchor="end">{number(peak)}</text>',
        f'<text x="{left - 4}" y="{height - bottom}" class="tick" text-anchor="end">0</text>',
        f'<text x="{left}" y="{height - 6}" class="tick">{len(minutes)} min ago</text>',
        f'<text x="{width - 4}" y="{height - 6}" class="tick" text-anchor="end">now</text>',
    ]
    for name in COUNTERS:
        points = " ".join(point(i, getattr(m, name)) for i, m in enumerate(minutes))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{SERIES_COLOURS[name]}" stroke-width="2"/>')
    parts.append("</svg>")
    totals = {name: sum(getattr(m, name) for m in minutes) for name in COUNTERS}
    legend = "".join(
        f'<span class="legend"><i class="series-{name}"></i>{name} {number(totals[name])}</span>'
        for name in COUNTERS
    )
    return Markup(f'<figure><figcaption>{escape(title)}</figcaption>{"".join(parts)}<div>{legend}</div></figure>')


def sum_minutes(series: list[list[MinuteMetrics]]) -> list[MinuteMetrics]:
    """Several queues' minutes (aligned: the same window) added up."""
    if not series:
        return []
    return [
        MinuteMetrics(row[0].minute, *(sum(getattr(m, name) for m in row) for name in COUNTERS))
        for row in zip(*series)
    ]


# -- replays with progress ------------------------------------------------------------------


@dataclass
class ReplayJob:
    id: str
    queue: str
    total: int = 0
    done: int = 0
    finished: bool = False
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "id": self.id, "queue": self.queue, "total": self.total, "done": self.done,
                "finished": self.finished, "error": self.error,
            }


class ReplayJobs:
    """Replays of every dead letter of a queue, run in chunks on a thread of their own so
    that a page can show their progress (``GET /api/jobs/<id>``)."""

    KEPT = 50

    def __init__(self, broker: Broker, scrub: Callable[[str], str]) -> None:
        self._broker = broker
        self._scrub = scrub
        self._jobs: dict[str, ReplayJob] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def start(self, queue: str, position: str) -> ReplayJob:
        job = ReplayJob(id=f"replay-{next(self._ids)}", queue=queue)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.KEPT:
                del self._jobs[next(iter(self._jobs))]
        threading.Thread(target=self._run, args=(job, position), name=job.id, daemon=True).start()
        return job

    def get(self, job_id: str) -> ReplayJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def _run(self, job: ReplayJob, position: str) -> None:
        try:
            ids: list[str] = []
            while page := self._broker.dead_letters(job.queue, DEAD_PAGE, len(ids)):
                ids.extend(letter.id for letter in page)
            with job.lock:
                job.total = len(ids)
            chunks = [ids[i : i + REPLAY_CHUNK] for i in range(0, len(ids), REPLAY_CHUNK)]
            if position == "head":
                chunks.reverse()  # each chunk goes ahead of the one replayed after it
            for chunk in chunks:
                self._broker.replay(job.queue, chunk, position=position)  # type: ignore[arg-type]
                with job.lock:
                    job.done += len(chunk)
        except Exception as exc:  # reported on the page, scrubbed of the password
            with job.lock:
                job.error = self._scrub(f"{type(exc).__name__}: {exc}")
            log.warning("replay of %s failed: %s", job.queue, job.error)
        finally:
            with job.lock:
                job.finished = True


# -- the app ----------------------------------------------------------------------------------


def create_app(
    broker: Broker, url: str, *, token: str, read_only: bool = False, stuck_after: float = 60.0
) -> Flask:
    """The dashboard for ``broker`` (opened on ``url``). ``token`` guards every action."""
    if not token:
        raise ValueError("the dashboard needs a token for its actions")
    app = Flask(__name__)
    app.config.update(JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=64 * 1024)
    shown_url = urls.display_url(url)

    def scrub(text: str) -> str:
        return urls.scrub(text, url)

    jobs = ReplayJobs(broker, scrub)
    stuck_lists: dict[str, tuple[float, tuple[list[KeyDiagnosis], list[KeyInfo]]]] = {}
    stuck_lock = threading.Lock()
    reuse_for = min(STUCK_REUSE_SECONDS, stuck_after)

    def waiting_keys(queue: str) -> tuple[list[KeyDiagnosis], list[KeyInfo], float]:
        """The queue's stuck and most lagging keys (both read by scanning every key in
        bounded pages), and when they were read (monotonic seconds)."""
        with stuck_lock:
            kept = stuck_lists.get(queue)
        if kept is not None and time.monotonic() - kept[0] < reuse_for:
            return (*kept[1], kept[0])
        read_at = time.monotonic()
        found = (
            broker.stuck_keys(queue, older_than=stuck_after, limit=HOT_KEYS * 2),
            broker.lagging_keys(queue, limit=HOT_KEYS),
        )
        with stuck_lock:
            stuck_lists[queue] = (read_at, found)
        return (*found, read_at)

    app.jinja_env.filters.update(number=number, ago=ago, utc=utc, minute=clock_minute, seconds=describe_seconds)
    app.jinja_env.globals.update(
        url=shown_url, read_only=read_only, refresh=REFRESH_SECONDS, counters=COUNTERS,
    )

    def page(template: str, **context: Any) -> str:
        context["now"] = broker.now()
        if request.args.get("partial") == "1":
            return render_template(template, partial=True, **context)
        return render_template(template, partial=False, **context)

    def known_queue(name: str | None) -> str:
        if not name or name not in broker.queues():
            abort(404, description=f"unknown queue {name!r}")
        return name

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'none'; base-uri 'none'"
        )
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(Exception)
    def failed(exc: Exception) -> tuple[Response | str, int]:
        from werkzeug.exceptions import HTTPException

        if isinstance(exc, HTTPException):
            status, text = exc.code or 500, exc.description or exc.name
        elif isinstance(exc, (InvalidArgument, InvalidArgumentType)):
            status, text = 400, str(exc)
        elif isinstance(exc, ShardedBrokerError):
            status, text = 503, str(exc)
        else:
            status, text = 500, f"{type(exc).__name__}: {exc}"
            log.error("dashboard error: %s", scrub(text))
        text = scrub(text)
        if request.path.startswith("/api/"):
            return jsonify(error=text), status
        return render_template("error.html", status=status, message=text, partial=False, now=None), status

    # -- pages --------------------------------------------------------------------------

    @app.get("/")
    def queues_page() -> str:
        names = broker.queues()
        stats = [broker.stats(name) for name in names]
        minutes = sum_minutes([broker.metrics(name, CHART_MINUTES) for name in names])
        return page(
            "queues.html", stats=stats,
            chart=chart(minutes, title=f"all queues, per minute, last {CHART_MINUTES} minutes") if minutes else None,
        )

    @app.get("/queue")
    def queue_page() -> str:
        name = known_queue(request.args.get("q"))
        stuck, lagging, read_at = waiting_keys(name)
        return page(
            "queue.html", queue=name, stats=broker.stats(name), stuck_age=time.monotonic() - read_at,
            chart=chart(broker.metrics(name, CHART_MINUTES), title=f"{name}, per minute, last {CHART_MINUTES} minutes"),
            hottest=broker.keys(name, HOT_KEYS, sort="backlog"),
            lagging=lagging,
            stuck=stuck, stuck_after=stuck_after,
            dead=broker.dead_letters(name, DEAD_SHOWN),
        )

    @app.get("/key")
    def key_page() -> str:
        name = known_queue(request.args.get("q"))
        key = request.args.get("k") or abort(400, description="which key? (k=...)")
        minutes = broker.metrics(name, KEY_MINUTES, key=key)
        return page(
            "key.html", queue=name, key=key, info=broker.key_info(name, key), why=broker.why(name, key),
            minutes=list(reversed(minutes)),
            chart=chart(minutes, title=f"key {key}, per minute, last {KEY_MINUTES} minutes"),
            default_interval=broker.settings(name).interval,
        )

    # -- actions ------------------------------------------------------------------------

    def action() -> dict[str, Any]:
        """The checked JSON body of an action request, or a refusal."""
        if read_only:
            abort(403, description="the dashboard is read-only (--read-only): actions are off")
        given = request.headers.get(TOKEN_HEADER, "")
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            abort(403, description=f"missing or wrong token: actions need the dashboard's token in {TOKEN_HEADER}")
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            abort(403, description="cross-site request refused")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            abort(403, description="cross-site request refused")
        if not request.is_json:
            abort(415, description="actions take a JSON body (Content-Type: application/json)")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, description="the body must be a JSON object")
        return body

    def field_of(body: dict[str, Any], name: str, required: bool = True) -> Any:
        """A text field of the body (``None`` when absent and not ``required``)."""
        value = body.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            abort(400, description=f"{name} must be a non-empty string, not {value!r:.60}")
        return value

    def done(**answer: Any) -> Response:
        log.info("action: %s", scrub(str(answer)))
        return jsonify(ok=True, **answer)

    @app.post("/api/pause")
    def pause() -> Response:
        body = action()
        name = known_queue(field_of(body, "queue"))
        key = field_of(body, "key", required=False)
        paused = body.get("paused")
        if not isinstance(paused, bool):
            abort(400, description=f"paused must be true or false, not {paused!r:.60}")
        (broker.pause if paused else broker.resume)(name, key=key)
        return done(action="pause" if paused else "resume", queue=name, key=key)

    @app.post("/api/interval")
    def interval() -> Response:
        body = action()
        name = known_queue(field_of(body, "queue"))
        key = field_of(body, "key")
        seconds = body.get("seconds")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
            abort(400, description=f"seconds must be a number or null, not {seconds!r:.60}")
        broker.set_interval(name, key, seconds)
        return done(action="interval", queue=name, key=key, seconds=seconds)

    @app.post("/api/release")
    def release() -> Response:
        body = action()
        name = known_queue(field_of(body, "queue"))
        released = broker.release_lease(
            name, field_of(body, "message_id"), field_of(body, "token"), key=field_of(body, "key"),
            batch_id=field_of(body, "batch_id"),
        )
        if not released:
            abort(409, description="that lease is no longer current (acked, expired or released already)")
        return done(action="release", queue=name, message_id=body["message_id"])

    @app.post("/api/replay")
    def replay() -> Response:
        body = action()
        name = known_queue(field_of(body, "queue"))
        position = body.get("position", "tail")
        if position not in ("head", "tail"):
            abort(400, description="position must be 'head' or 'tail'")
        ids = body.get("ids")
        if ids is None:
            job = jobs.start(name, position)
            return done(action="replay", queue=name, job=job.id)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            abort(400, description="ids must be a list of message ids")
        return done(action="replay", queue=name, replayed=broker.replay(name, ids, position=position))

    @app.post("/api/purge")
    def purge() -> Response:
        body = action()
        name = known_queue(field_of(body, "queue"))
        return done(action="purge", queue=name, purged=broker.purge(name, dead=True))

    @app.get("/api/jobs/<job_id>")
    def job_status(job_id: str) -> Response:
        job = jobs.get(job_id)
        if job is None:
            abort(404, description=f"no replay job {job_id!r}")
        return jsonify(job.as_dict())

    return app


def new_token() -> str:
    return secrets.token_urlsafe(24)
