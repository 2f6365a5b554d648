"""The ``sharded-broker`` command line: look inside the queues and act on them.

Every command takes the broker URL the app uses (``--url`` or ``SHARDED_BROKER_URL``;
``redis://``, ``rediss://``, ``redis+sentinel://``, ``sqlite:///``, and Celery's ``sharded+redis://`` form);
``COMMAND --help`` needs none.

Guarantees, for scripts:

- ``--json`` on every read command prints machine-readable output with stable field
  names (those of :class:`~sharded_broker.QueueStats`, :class:`~sharded_broker.DeadLetter`,
  :class:`~sharded_broker.KeyInfo`, :class:`~sharded_broker.MinuteMetrics`,
  :class:`~sharded_broker.MessageInfo`, :class:`~sharded_broker.CancelResult`,
  :class:`~sharded_broker.Event` and :class:`~sharded_broker.Schedule`; times are seconds since
  the epoch).
- Exit codes: 0 ok; 1 the operation failed (unreachable server, unknown queue, nothing
  replayed, nothing cancelled, no such message, confirmation declined); 2 usage error
  (bad option or argument, malformed URL, a value the engine refuses). Errors go to
  stderr as one line.
- A password in the URL never appears in any output.
- A command that is refused changes nothing; ``purge`` asks first (and refuses when it
  cannot ask) unless given ``--yes``.
- A ``sqlite:///`` URL must name an existing queue database: no command creates a file,
  or adds tables to a file that is not one. Output names the file by its absolute path.

Each command is a plain click command on :data:`main`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import quote

import click
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from . import environment, urls
from .broker import Broker, connect
from .diagnosis import describe_seconds
from .errors import ConfigurationError, InvalidArgument, InvalidArgumentType, InvalidURL, ShardedBrokerError
from .models import COUNTERS, DeadLetter, Event, KeyDiagnosis, KeyInfo, MessageInfo, MinuteMetrics, QueueStats, Schedule
from .validation import MAX_WEIGHT

URL_ENVVAR = environment.URL_VARIABLE
# What a command reports in one line instead of a traceback: every error the engine and
# its backends raise (the error model in sharded_broker/backend.py), and the command's own
# I/O failing (a file, a socket).
REPORTED_ERRORS: tuple[type[BaseException], ...] = (ShardedBrokerError, OSError)
# Errors that mean the command line itself was wrong (exit 2, like click's usage errors).
USAGE_ERRORS: tuple[type[BaseException], ...] = (ConfigurationError, InvalidArgument, InvalidArgumentType)
# Dead letters listed per backend call while collecting ids to replay.
REPLAY_PAGE = 1000
# Ids replayed per backend call: the progress bar advances once per chunk.
REPLAY_CHUNK = 500
# How many known queues an "unknown queue" error names before it cuts the list short.
KNOWN_QUEUES_SHOWN = 10
# top: the hottest keys shown (by backlog, over every queue), read per queue.
TOP_KEYS = 5
# show: minutes of the key's metrics listed.
SHOW_MINUTES = 5
# rediss:// checks: redis-py 8's default socket_connect_timeout, used when the URL sets none.
DEFAULT_CONNECT_TIMEOUT = 5.0
# Longest waits of the check for a TLS handshake, then for a plain-text reply (a handshake
# takes two round trips; a plain Redis answers a PING in one).
TLS_HANDSHAKE_WAIT = 2.0
PLAIN_REPLY_WAIT = 1.0


class CommandFailed(click.ClickException):
    """The operation failed: exit code 1, one line on stderr."""

    exit_code = 1


class BadUsage(click.ClickException):
    """The command line asked for something the broker refuses: exit code 2, one line
    (click's own UsageError would print the usage text too)."""

    exit_code = 2


normalize_url = urls.engine_url


@dataclass
class Session:
    """What every command shares: the URL, and the broker once a command needs it.

    ``url`` is None when neither ``--url`` nor ``SHARDED_BROKER_URL`` gave one: commands
    that need no broker (``--help``) still run; the others stop with a usage error.
    """

    url: str | None
    stdout: Console
    stderr: Console
    _broker: Broker | None = field(default=None, repr=False)

    @property
    def safe_url(self) -> str:
        """The URL as output shows it: no password, a SQLite file by its absolute path."""
        return "(no URL)" if self.url is None else urls.display_url(self.url)

    def broker(self, **options: Any) -> Broker:
        """The broker for the URL, opened on first use with ``options``.

        Refuses a ``sqlite:///`` URL that does not name an existing queue database: a
        command must not create a database, or add tables to someone else's file, where
        the operator mistyped a path. A ``rediss://`` URL pointed at a plain-text Redis
        port fails at once naming TLS. A ``memory://`` store lives inside one process, so
        the command's own is always empty: said on stderr.
        """
        if self._broker is None:
            if not self.url:
                raise BadUsage(f"no broker URL: pass --url URL or set {URL_ENVVAR}")
            try:
                scheme = urls.scheme(self.url)
            except InvalidURL:
                scheme = ""  # connect() below names the problem
            path = urls.sqlite_path(self.url)
            if path:
                _require_queue_database(path, urls.relative_path_hint(self.url))
            elif scheme == "rediss":
                _refuse_plain_text_port(self.url, self.safe_url)
            elif scheme == "rediss+cluster":
                try:
                    # the first node stands for the cluster: its nodes share a setup
                    _refuse_plain_text_port(urls.cluster_parts(self.url)[0], self.safe_url)
                except InvalidURL:
                    pass  # connect() below names the problem
            elif scheme == "memory":
                self.stderr.print(
                    "note: a memory:// store lives inside one process; this command's store is its own, "
                    "so it is always empty (use the app's sqlite:/// or redis:// URL)",
                    markup=False,
                )
            self._broker = connect(self.url, **options)
        return self._broker

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None

    def scrub(self, text: str) -> str:
        """``text`` on one line, with the URL's password (if any) masked."""
        return urls.scrub(text, self.url)


def _require_queue_database(path: str, hint: str | None) -> None:
    """Fail (exit 1) unless ``path`` is an existing sharded-broker SQLite database; errors
    end with ``hint`` (how a relative path was read).

    Read without writing anything (a read-only connection), so a mistyped path to some
    other SQLite file is left exactly as it was.
    """
    absolute = os.path.abspath(path)
    relative = f" ({hint})" if hint else ""
    if not os.path.isfile(absolute):
        raise CommandFailed(f"no SQLite database at {absolute}{relative}")
    try:
        with closing(sqlite3.connect(f"file:{quote(absolute)}?mode=ro", uri=True)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise CommandFailed(f"{absolute} is not a SQLite database ({exc}){relative}") from None
    if not {"queues", "messages"} <= tables:
        raise CommandFailed(
            f"{absolute} is a SQLite database but not a sharded-broker queue database "
            f"(no queues table); check the URL{relative}"
        )


def _refuse_plain_text_port(url: str, safe_url: str) -> None:
    """Fail (exit 1) naming TLS when a ``rediss://`` URL points at a plain-text Redis port.

    A TLS client talking to a plain port hears nothing back until its connect timeout
    ends, then reports only a timeout. This tries a TLS handshake (nothing is sent over
    it) for at most half the connect timeout; if that fails, it asks the port in plain
    text, for at most a quarter more, whether Redis answers. Any other outcome (a TLS
    server, nothing listening, a certificate the real connection may refuse) is left to
    that connection to report, so the hint comes within the connect timeout or not at all.
    """
    address = urls.redis_address(url)
    if address is None:
        return  # malformed: connect() names the problem
    host, port, connect_timeout = address
    timeout = connect_timeout or DEFAULT_CONNECT_TIMEOUT
    try:
        with socket.create_connection((host, port), timeout=min(timeout / 2, TLS_HANDSHAKE_WAIT)) as raw:
            context = ssl.create_default_context()
            # Only asks whether the port speaks TLS at all; the real connection verifies.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with context.wrap_socket(raw, server_hostname=host):
                return
    except (ssl.SSLError, socket.timeout):
        pass  # no TLS answer: maybe plain Redis
    except OSError:
        return  # unreachable: the real connection reports it
    try:
        with socket.create_connection((host, port), timeout=min(timeout / 4, PLAIN_REPLY_WAIT)) as plain:
            plain.sendall(b"PING\r\n")
            reply = plain.recv(64)
    except OSError:
        return
    if reply[:1] in (b"+", b"-") and reply.endswith(b"\r\n"):
        raise CommandFailed(
            f"{safe_url}: the server at {host}:{port} speaks plain-text Redis, not TLS; "
            f"use a redis:// URL for it, or the port where the server accepts TLS"
        )


class _Group(click.Group):
    """Turns backend and validation errors raised by any command into one stderr line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            session = ctx.obj if isinstance(ctx.obj, Session) else None
            if session is not None:
                # click types message as Final, but a group's invoke is where it may be
                # reworded (click itself formats it only when the exception is shown).
                exc.message = session.scrub(exc.message)  # type: ignore[misc]
            raise
        except USAGE_ERRORS as exc:
            raise BadUsage(_describe(ctx, exc)) from None
        except REPORTED_ERRORS as exc:
            raise CommandFailed(_describe(ctx, exc)) from None


def _describe(ctx: click.Context, exc: BaseException) -> str:
    session = ctx.obj if isinstance(ctx.obj, Session) else None
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, ShardedBrokerError):
        where = f" at {session.safe_url}" if session else ""
        message = f"broker{where} failed: {type(exc).__name__}: {message}"
    return session.scrub(message) if session else " ".join(message.split())


def _stdout_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped output is for reading in full: never cut a table to 80 columns.
        console.width = 10_000
    return console


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    metavar="URL",
    help=(
        f"Broker URL, as the app uses it (redis://..., redis+cluster://host:port,..., redis+sentinel://host:port,.../0?master=NAME, "
        f"sqlite:////absolute/path.db, sharded+redis://...). "
        f"Default: ${URL_ENVVAR}. Options a command does not set come from $SHARDED_BROKER_<OPTION>."
    ),
)
@click.version_option(package_name="sharded-broker")
@click.pass_context
def main(ctx: click.Context, url: str | None) -> None:
    """Look inside sharded-broker queues and act on them.

    Give the broker URL with --url or SHARDED_BROKER_URL. sqlite:///queue.db is relative
    to the current directory; sqlite:////var/lib/app/queue.db is absolute.
    """
    # soft_wrap: a message to stderr stays one line, whatever the terminal's width.
    stderr = Console(stderr=True, highlight=False, soft_wrap=True)
    if url is None:
        try:
            url = environment.url(None)
        except InvalidURL as exc:
            raise BadUsage(str(exc)) from None
    session = Session(normalize_url(url) if url else None, _stdout_console(), stderr)
    ctx.obj = session
    ctx.call_on_close(session.close)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
pass_session = click.pass_obj


def _print_json(value: Any) -> None:
    # default=str: headers are arbitrary JSON-ish values; never fail on one that is not.
    click.echo(json.dumps(value, default=str, sort_keys=False))


def _require_queue(broker: Broker, queue: str) -> None:
    """Fail (exit 1) unless ``queue`` has ever held a message."""
    known = broker.queues()
    if queue in known:
        return
    if not known:
        raise CommandFailed(f"unknown queue {queue!r}: the broker has no queues yet")
    shown = ", ".join(known[:KNOWN_QUEUES_SHOWN]) + (", ..." if len(known) > KNOWN_QUEUES_SHOWN else "")
    raise CommandFailed(f"unknown queue {queue!r}; known queues: {shown}")


def _note_if_new(session: Session, queue: str, was_known: bool) -> None:
    """Settings may be made before a queue's first message; say so, in case of a typo."""
    if not was_known:
        session.stderr.print(
            f"note: queue {queue!r} has never held a message; the setting applies once it does", markup=False
        )


# -- formatting -----------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """A short human duration: ``0s``, ``4.2s``, ``5m 07s``, ``3h 02m``, ``2d 05h``."""
    if seconds < 0.05:
        return "0s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


def format_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _format_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:+.1f}"


def _key_text(key: str | None) -> Text:
    return Text("(unkeyed)", style="dim") if key is None else Text(key)


# Headers of top's optional columns: (full, abbreviated for narrow terminals).
MINUTE_HEADERS = {
    "enqueued": ("enq/min", "enq/m"), "delivered": ("dlv/min", "dlv/m"), "acked": ("ack/min", "ack/m"),
    "retried": ("retry/min", "rty/m"), "dead": ("dead/min", "dead/m"),
}
RATE_HEADERS = {"backlog": ("backlog Δ/s", "blog Δ/s"), "dead": ("dead Δ/s", "dead Δ/s")}
# Measuring a table against this width gives its natural width (no cell cut).
NATURAL_WIDTH_LIMIT = 100_000
# top: the optional columns, dropped in this order while the table is wider than the
# terminal (per-minute counts by COUNTERS name, net rates as "rate:<name>").
TOP_DROP_ORDER = ("retried", "delivered", "rate:dead", "dead", "enqueued", "acked", "rate:backlog")


def stats_table(
    rows: Sequence[QueueStats],
    rates: dict[str, "QueueRates"] | None = None,
    per_minute: dict[str, MinuteMetrics] | None = None,
    *,
    short: bool = False,
    hide: frozenset[str] = frozenset(),
) -> Table:
    """The stats table; with ``per_minute``, the counts of each queue's last full minute;
    with ``rates``, two more columns of net change per second. ``short`` abbreviates the
    headers; ``hide`` leaves out optional columns (names as in :data:`TOP_DROP_ORDER`)."""
    pick = 1 if short else 0
    table = Table(header_style="bold")
    table.add_column("queue", no_wrap=True)
    for name in ("ready", "leased", "delayed", "dead", "keys", "lag"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("paused", no_wrap=True)
    counters = [name for name in COUNTERS if per_minute is not None and name not in hide]
    rate_names = [name for name in RATE_HEADERS if rates is not None and f"rate:{name}" not in hide]
    for name in counters:
        table.add_column(MINUTE_HEADERS[name][pick], justify="right", no_wrap=True)
    for name in rate_names:
        table.add_column(RATE_HEADERS[name][pick], justify="right", no_wrap=True)
    for row in rows:
        cells = [
            Text(row.queue),
            *(f"{value:,}" for value in (row.ready, row.leased, row.delayed, row.dead, row.keys)),
            format_duration(row.oldest_age),
            Text("PAUSED", style="bold red") if row.paused else "",
        ]
        minute = (per_minute or {}).get(row.queue)
        cells += [f"{getattr(minute, name):,}" if minute else "-" for name in counters]
        rate = (rates or {}).get(row.queue)
        cells += [_format_rate(getattr(rate, name) if rate else None) for name in rate_names]
        table.add_row(*cells)
    return table


def fit_stats_table(
    console: Console,
    rows: Sequence[QueueStats],
    rates: dict[str, "QueueRates"],
    per_minute: dict[str, MinuteMetrics],
) -> Table:
    """The widest form of ``top``'s stats table that fits ``console``: full headers, else
    abbreviated ones, else without optional columns, dropped in :data:`TOP_DROP_ORDER`.
    (Narrower than even the core columns need, rich shrinks cells as it must.)"""
    forms: list[tuple[bool, frozenset[str]]] = [(False, frozenset())] + [
        (True, frozenset(TOP_DROP_ORDER[:n])) for n in range(len(TOP_DROP_ORDER) + 1)
    ]
    return _first_that_fits(
        console, [functools.partial(stats_table, rows, rates, per_minute, short=short, hide=hide) for short, hide in forms]
    )


def _first_that_fits(console: Console, builders: Sequence[Callable[[], Table]]) -> Table:
    """The first table built by ``builders`` whose natural width (no cell cut) fits the
    console, else the last one."""
    unbounded = console.options.update(width=NATURAL_WIDTH_LIMIT)
    for build in builders:
        table = build()
        if Measurement.get(console, unbounded, table).maximum <= console.width:
            break
    return table


def keys_table(infos: Sequence[KeyInfo], *, with_queue: bool = False, hide: frozenset[str] = frozenset()) -> Table:
    """Keys with their backlog, leased batches, lag, pause and interval, and their weight
    when one of them has a weight other than 1 (``hide``: leave out the "interval" or
    "leased" column)."""
    weighted = any(info.weight != 1 for info in infos)
    table = Table(header_style="bold")
    table.add_column("key", no_wrap=True)
    if with_queue:
        table.add_column("queue", no_wrap=True)
    table.add_column("backlog", justify="right")
    if "leased" not in hide:
        table.add_column("leased", justify="right")
    table.add_column("lag", justify="right")
    if "interval" not in hide:
        table.add_column("interval", justify="right")
    if weighted:
        table.add_column("weight", justify="right")
    table.add_column("paused")
    for info in infos:
        table.add_row(
            Text(info.key),
            *([Text(info.queue)] if with_queue else []),
            f"{info.backlog:,}",
            *([f"{info.leased:,}"] if "leased" not in hide else []),
            format_duration(info.lag),
            *(["default" if info.interval is None else f"{info.interval:g}s"] if "interval" not in hide else []),
            *([str(info.weight)] if weighted else []),
            Text("PAUSED", style="bold red") if info.paused else "",
        )
    return table


def dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "queue": letter.queue,
        "key": letter.key,
        "attempts": letter.attempts,
        "reason": letter.reason,
        "priority": letter.priority,
        "enqueued_at": letter.enqueued_at,
        "died_at": letter.died_at,
        "dedup_id": letter.dedup_id,
        "ref": letter.ref,
        "headers": letter.headers,
        "payload_size": len(letter.payload),
    }


# -- read commands --------------------------------------------------------------------


def _all_stats(broker: Broker, queue: str | None) -> list[QueueStats]:
    if queue is not None:
        _require_queue(broker, queue)
        return [broker.stats(queue)]
    return [broker.stats(name) for name in broker.queues()]


@main.command()
@click.argument("queue", required=False)
@json_option
@pass_session
def stats(session: Session, queue: str | None, as_json: bool) -> None:
    """Counts and lag of every queue (or QUEUE).

    Ready, leased, delayed and dead messages, shard keys with live messages, the age of
    the oldest ready message (lag) and whether the queue is paused. With --json: one object for QUEUE, a list of objects for every queue.
    """
    rows = _all_stats(session.broker(), queue)
    if as_json:
        dicts = [row.as_dict() for row in rows]
        _print_json(dicts[0] if queue is not None else dicts)
    elif not rows:
        session.stdout.print(f"no queues yet at {session.safe_url}", markup=False)
    else:
        # Which store: a relative SQLite path shows where it led.
        session.stdout.print(f"broker: {session.safe_url}", markup=False, soft_wrap=True)
        session.stdout.print(stats_table(rows))


@dataclass(frozen=True)
class QueueRates:
    """Net change per second between two stats snapshots (not throughput: a queue that
    takes in and finishes 100 messages a second shows 0)."""

    backlog: float
    dead: float


def _backlog(row: QueueStats) -> int:
    return row.ready + row.leased + row.delayed


def rates_between(
    before: dict[str, QueueStats], after: dict[str, QueueStats], elapsed: float
) -> dict[str, QueueRates]:
    """Per-queue rates from two snapshots ``elapsed`` seconds apart (queues in both only)."""
    if elapsed <= 0:
        return {}
    return {
        name: QueueRates(
            backlog=(_backlog(now) - _backlog(before[name])) / elapsed,
            dead=(now.dead - before[name].dead) / elapsed,
        )
        for name, now in after.items()
        if name in before
    }


@main.command()
@click.option("--interval", "refresh", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Exit after this many frames (default: run until Ctrl-C).")
@json_option
@pass_session
def top(session: Session, refresh: float, once: bool, iterations: int | None, as_json: bool) -> None:
    """Live stats of every queue, refreshed until Ctrl-C.

    Adds each queue's counts of the last full minute (enqueued, delivered, acked,
    retried, dead), the net change per second of its backlog (ready + leased + delayed)
    and of its dead letters, and the hottest keys (largest backlogs over every queue).
    Net changes compare successive snapshots, so the first frame has none. With --json:
    one JSON object per frame and line ({"time", "queues": [...], "hottest_keys": [...]},
    each queue with last_minute, backlog_change_per_second and dead_change_per_second,
    null on the first frame).
    """
    broker = session.broker()
    frames = 1 if once else iterations
    previous: tuple[float, dict[str, QueueStats]] | None = None

    @dataclass
    class Frame:
        current: dict[str, QueueStats]
        rates: dict[str, QueueRates] | None
        last_minute: dict[str, MinuteMetrics]
        hottest: list[KeyInfo]

    def snapshot() -> Frame:
        nonlocal previous
        taken = time.monotonic()
        current = {row.queue: row for row in _all_stats(broker, None)}
        rates = None if previous is None else rates_between(previous[1], current, taken - previous[0])
        previous = (taken, current)
        # The last full minute: the current one is still counting.
        last_minute = {name: broker.metrics(name, 2)[0] for name in current}
        hottest = sorted(
            (info for name in current for info in broker.keys(name, TOP_KEYS)),
            key=lambda info: (-info.backlog, info.queue, info.key),
        )[:TOP_KEYS]
        return Frame(current, rates, last_minute, hottest)

    def frame_json(frame: Frame) -> str:
        queues = []
        for name, row in frame.current.items():
            rate = (frame.rates or {}).get(name)
            queues.append({
                **row.as_dict(),
                "backlog_change_per_second": rate.backlog if rate else None,
                "dead_change_per_second": rate.dead if rate else None,
                "last_minute": frame.last_minute[name].as_dict(),
            })
        hottest = [_key_json(info) for info in frame.hottest]
        return json.dumps({"time": time.time(), "queues": queues, "hottest_keys": hottest})

    def frame_table(frame: Frame) -> Any:
        from rich.console import Group

        table = fit_stats_table(session.stdout, list(frame.current.values()), frame.rates or {}, frame.last_minute)
        table.title = Text(f"sharded-broker top · {session.safe_url} · {format_time(time.time())}")
        if not frame.hottest:
            return table
        keys = _first_that_fits(session.stdout, [
            functools.partial(keys_table, frame.hottest, with_queue=True, hide=hide)
            for hide in (frozenset(), frozenset({"interval"}), frozenset({"interval", "leased"}))
        ])
        keys.title = Text(f"hottest keys (largest backlog, top {TOP_KEYS})")
        return Group(table, keys)

    live_display = not as_json and session.stdout.is_terminal and frames != 1
    try:
        if live_display:
            from rich.live import Live

            with Live(console=session.stdout, auto_refresh=False) as live:
                for _ in _frame_counter(frames, refresh):
                    live.update(frame_table(snapshot()), refresh=True)
        else:
            for _ in _frame_counter(frames, refresh):
                frame = snapshot()
                if as_json:
                    click.echo(frame_json(frame))
                else:
                    session.stdout.print(frame_table(frame))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how top is meant to end.


def _frame_counter(frames: int | None, refresh: float) -> Iterator[int]:
    """Yield frame numbers, sleeping ``refresh`` seconds between frames."""
    count = 0
    while frames is None or count < frames:
        if count:
            time.sleep(refresh)
        yield count
        count += 1


@main.command()
@click.argument("queue")
@click.option("--limit", type=click.IntRange(min=1, max=100_000), default=100, show_default=True,
              help="List at most this many, oldest death first.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Skip this many first.")
@json_option
@pass_session
def dead(session: Session, queue: str, limit: int, offset: int, as_json: bool) -> None:
    """List the dead letters of QUEUE, oldest death first.

    Shows id, shard key, attempts, reason and when each died. With --json: a list of objects (id, queue, key, attempts, reason, priority,
    enqueued_at, died_at, dedup_id, ref, headers, payload_size).
    """
    broker = session.broker()
    _require_queue(broker, queue)
    letters = broker.dead_letters(queue, limit=limit, offset=offset)
    if as_json:
        _print_json([dead_letter_json(letter) for letter in letters])
        return
    if not letters:
        session.stdout.print(f"no dead letters in {queue!r}", markup=False)
        return
    table = Table(header_style="bold")
    table.add_column("id", no_wrap=True)
    table.add_column("key")
    table.add_column("attempts", justify="right")
    table.add_column("reason")
    table.add_column("died at", no_wrap=True)
    for letter in letters:
        table.add_row(
            Text(letter.id), _key_text(letter.key), str(letter.attempts), Text(letter.reason), format_time(letter.died_at)
        )
    session.stdout.print(table)
    total = broker.stats(queue).dead
    if offset + len(letters) < total:
        session.stderr.print(
            f"showing {offset + 1}-{offset + len(letters)} of {total:,}; see more with --offset/--limit", markup=False
        )


def _key_json(info: KeyInfo) -> dict[str, Any]:
    return info.as_dict()


# The queue settings why and keys --stuck judge by: those of the app's processes, which
# the command cannot see (a key's own interval is stored in the broker and always known).
def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--interval", "default_interval", type=click.FloatRange(min=0), default=None,
        help="The queue's default rate interval in the app, in seconds (default 0).",
    )(command)
    return click.option(
        "--key-concurrency", type=click.IntRange(min=1, max=10_000), default=None,
        help="The queue's key_concurrency in the app (default 1).",
    )(command)


def _configure(broker: Broker, queue: str, key_concurrency: int | None, default_interval: float | None) -> None:
    settings: dict[str, Any] = {}
    if key_concurrency is not None:
        settings["key_concurrency"] = key_concurrency
    if default_interval is not None:
        settings["interval"] = default_interval
    if settings:
        broker.configure_queue(queue, **settings)


def diagnosis_json(diagnosis: KeyDiagnosis) -> dict[str, Any]:
    return diagnosis.as_dict()


def _until_text(diagnosis: KeyDiagnosis) -> str:
    if diagnosis.until is None:
        return "-"
    return f"in {describe_seconds(diagnosis.until - diagnosis.now)}"


@main.command()
@click.argument("queue")
@click.argument("key")
@settings_options
@json_option
@pass_session
def why(
    session: Session, queue: str, key: str, key_concurrency: int | None, default_interval: float | None,
    as_json: bool,
) -> None:
    """Why is KEY of QUEUE not moving? The one reason its next message is not delivered
    now, and until when.

    Reasons: paused (the key or the queue), leased (by which lease, its delivery count and
    deadline; for a batch, how many settled), key_concurrency (every slot in use),
    interval (next delivery allowed at), retry (a retry holds the key until), delayed
    (nothing due yet), ready (waiting for a consumer, with the queue's last delivery),
    empty (nothing waiting). With --json: the KeyDiagnosis fields (queue, key, reason,
    until, summary, now, backlog, head, holds, interval, paused_scope, ready_since,
    last_delivered_minute, weight, waited).
    """
    broker = session.broker()
    _require_queue(broker, queue)
    _configure(broker, queue, key_concurrency, default_interval)
    diagnosis = broker.why(queue, key)
    if as_json:
        _print_json(diagnosis_json(diagnosis))
        return
    out = session.stdout
    out.print(Text.assemble((diagnosis.reason, "bold"), f": {diagnosis.summary}"))
    if diagnosis.until is not None:
        out.print(f"until: {format_time(diagnosis.until)} ({_until_text(diagnosis)})", markup=False)
    out.print(f"backlog: {diagnosis.backlog:,} message(s)", markup=False)
    if diagnosis.weight != 1:
        out.print(f"weight: {diagnosis.weight} (up to {diagnosis.weight} turns per round)", markup=False)
    if diagnosis.head is not None:
        out.print(
            f"next message: {diagnosis.head.id}, waiting {describe_seconds(diagnosis.waited)}, "
            f"deliveries so far: {diagnosis.head.attempts}",
            markup=False,
        )
    for hold in diagnosis.holds:
        batch = f", batch of {hold.size} ({hold.settled} settled)" if hold.size > 1 else ""
        out.print(
            f"lease: message {hold.message_id} token {hold.token}, delivery {hold.attempts}, "
            f"deadline {format_time(hold.deadline)}{batch}",
            markup=False,
        )


def stuck_table(diagnoses: Sequence[KeyDiagnosis]) -> Table:
    table = Table(header_style="bold")
    table.add_column("key")
    table.add_column("waited", justify="right", no_wrap=True)
    table.add_column("backlog", justify="right")
    table.add_column("reason", no_wrap=True)
    table.add_column("until", no_wrap=True)
    table.add_column("why")
    for d in diagnoses:
        table.add_row(
            Text(d.key), describe_seconds(d.waited), f"{d.backlog:,}", d.reason, _until_text(d), Text(d.summary)
        )
    return table


@main.command("keys")
@click.argument("queue")
@click.option("--sort", type=click.Choice(["backlog", "lag"]), default="backlog", show_default=True,
              help="Largest backlog first, or oldest head message first.")
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=50, show_default=True,
              help="List at most this many keys.")
@click.option("--stuck", is_flag=True,
              help="Only keys whose next message has waited longer than --older-than, with why.")
@click.option("--older-than", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="With --stuck: seconds a key's next message has waited.")
@settings_options
@json_option
@pass_session
def keys_command(
    session: Session, queue: str, sort: str, limit: int, stuck: bool, older_than: float,
    key_concurrency: int | None, default_interval: float | None, as_json: bool,
) -> None:
    """The shard keys of QUEUE that hold messages.

    Backlog counts a key's ready, delayed and leased messages; leased its batches in
    flight; lag the age of its next message. With --json: a list of objects (queue, key,
    backlog, leased, lag, paused, interval, head, weight).

    With --stuck: the keys whose next message has waited longer than --older-than
    seconds, longest first, each with the reason it is not moving (as `why` says), read
    in bounded pages of keys. With --json: a list of `why --json` objects.
    """
    broker = session.broker()
    _require_queue(broker, queue)
    if stuck:
        _configure(broker, queue, key_concurrency, default_interval)
        diagnoses = broker.stuck_keys(queue, older_than=older_than, limit=limit)
        if as_json:
            _print_json([diagnosis_json(d) for d in diagnoses])
        elif not diagnoses:
            session.stdout.print(
                f"no key of {queue!r} has waited longer than {describe_seconds(older_than)}", markup=False
            )
        else:
            session.stdout.print(stuck_table(diagnoses))
        return
    infos = broker.keys(queue, limit, sort=sort)  # type: ignore[arg-type]
    if as_json:
        _print_json([_key_json(info) for info in infos])
    elif not infos:
        session.stdout.print(f"no keys with messages in {queue!r}", markup=False)
    else:
        session.stdout.print(keys_table(infos))


@main.command()
@click.argument("queue")
@click.argument("key")
@json_option
@pass_session
def show(session: Session, queue: str, key: str, as_json: bool) -> None:
    """One shard KEY of QUEUE: its backlog, settings, next message and recent minutes.

    With --json: the key's object (as in `keys --json`, with head: id, priority,
    attempts, enqueued_at, not_before, size) plus "minutes", its metrics of the last
    few minutes, oldest first. Exit code 1 when KEY has no messages, no setting and no
    activity in those minutes (a mistyped key looks like that).
    """
    broker = session.broker()
    _require_queue(broker, queue)
    info = broker.key_info(queue, key)
    minutes = broker.metrics(queue, SHOW_MINUTES, key=key)
    active = any(getattr(minute, name) for minute in minutes for name in COUNTERS)
    if not (info.backlog or info.leased or info.paused or info.interval is not None or info.weight != 1 or active):
        raise CommandFailed(
            f"key {key!r} of {queue!r} has no messages, no interval or pause, and no activity "
            f"in the last {SHOW_MINUTES} minutes"
        )
    if as_json:
        _print_json({**_key_json(info), "minutes": [m.as_dict() for m in minutes]})
        return
    out = session.stdout
    out.print(keys_table([info]))
    head = info.head
    if head is None:
        out.print("head: nothing ready" if info.backlog else "head: none, the key has no messages", markup=False)
    else:
        out.print(
            f"head: {head.id} priority {head.priority}, attempts {head.attempts}, {head.size:,} bytes, "
            f"enqueued {format_time(head.enqueued_at)}"
            + (f", not before {format_time(head.not_before)}" if head.not_before > head.enqueued_at else ""),
            markup=False,
        )
    table = Table(header_style="bold", title=Text("per minute"))
    table.add_column("minute", no_wrap=True)
    for name in COUNTERS:
        table.add_column(name, justify="right")
    for minute in minutes:
        table.add_row(format_time(minute.minute), *(f"{getattr(minute, name):,}" for name in COUNTERS))
    out.print(table)


def message_json(info: MessageInfo) -> dict[str, Any]:
    return info.as_dict()


def _no_such_message(queue: str, message_id: str | None, ref: str | None) -> CommandFailed:
    name = f"message {message_id!r}" if message_id is not None else f"message with ref {ref!r}"
    return CommandFailed(
        f"no {name} in queue {queue!r}: never enqueued there, or acked or cancelled since "
        "(done messages are not kept)"
    )


def _id_or_ref(message_id: str | None, ref: str | None) -> None:
    if (message_id is None) == (ref is None):
        raise BadUsage("name the message by its ID or by --ref REF (exactly one)")


ref_option = click.option(
    "--ref", default=None, metavar="REF",
    help="Name the message by its ref instead of its ID (a Celery task id, a Dramatiq message id).",
)


@main.command("get")
@click.argument("queue")
@click.argument("message_id", metavar="[ID]", required=False)
@ref_option
@json_option
@pass_session
def get_command(session: Session, queue: str, message_id: str | None, ref: str | None, as_json: bool) -> None:
    """One message of QUEUE by ID (or --ref REF): what it is doing now (waiting, delayed,
    leased or dead), its deliveries so far and its times.

    Exit code 1 when QUEUE holds no such message (acked and cancelled messages are not
    kept). With --json: the MessageInfo fields (queue, id, key, state, priority,
    attempts, enqueued_at, size, dedup_id, available_at, lease_deadline, leased_at,
    dead_reason, died_at, ref).
    """
    _id_or_ref(message_id, ref)
    broker = session.broker()
    _require_queue(broker, queue)
    info = broker.get(queue, message_id, ref=ref)
    if info is None:
        raise _no_such_message(queue, message_id, ref)
    if as_json:
        _print_json(message_json(info))
        return
    now = broker.backend.now()
    lines = [
        f"message {info.id} of {queue!r}: {info.state}",
        f"key: {'(unkeyed)' if info.key is None else info.key}",
        f"priority {info.priority}, deliveries so far: {info.attempts}, {info.size:,} bytes"
        + ("" if info.dedup_id is None else f", dedup id {info.dedup_id}")
        + ("" if info.ref is None else f", ref {info.ref}"),
        f"enqueued: {format_time(info.enqueued_at)} ({describe_seconds(max(0.0, now - info.enqueued_at))} ago)",
    ]
    if info.available_at is not None:
        when = info.available_at - now
        relative = f"in {describe_seconds(when)}" if when > 0 else "due now"
        lines.append(f"available: {format_time(info.available_at)} ({relative})")
    if info.state == "leased":
        if info.leased_at is not None:
            lines.append(f"leased: {format_time(info.leased_at)}")
        if info.lease_deadline is not None:
            lines.append(f"lease deadline: {format_time(info.lease_deadline)}")
    if info.died_at is not None:
        lines.append(f"died: {format_time(info.died_at)}: {info.dead_reason}")
    for line in lines:
        session.stdout.print(line, markup=False)


@main.command()
@click.argument("queue")
@click.argument("message_id", metavar="[ID]", required=False)
@ref_option
@click.option(
    "--key-concurrency", type=click.IntRange(min=1, max=10_000), default=None,
    help="The queue's key_concurrency in the app (default 1): whether the message's key may be served again.",
)
@json_option
@pass_session
def cancel(
    session: Session, queue: str, message_id: str | None, ref: str | None, key_concurrency: int | None, as_json: bool
) -> None:
    """Cancel the waiting or delayed message ID (or --ref REF) of QUEUE: it is deleted
    and never runs; when it was its key's next message, the key moves on to the one
    after it.

    A leased message (a worker is running it) or a dead letter is refused and left as it
    was, exit code 1; so is a message that QUEUE does not hold. With --json: {"queue",
    "id", "cancelled", "state", "key", "ref", "summary"} (state: what the message was
    doing, null for an unknown one; id null for an unknown ref).
    """
    _id_or_ref(message_id, ref)
    broker = session.broker()
    _require_queue(broker, queue)
    _configure(broker, queue, key_concurrency, None)
    result = broker.cancel(queue, message_id, ref=ref)
    if as_json:
        _print_json(result.as_dict())
    elif result:
        session.stdout.print(result.summary, markup=False)
    if not result:
        raise _no_such_message(queue, message_id, ref) if result.state is None else CommandFailed(result.summary)


def event_json(event: Event) -> dict[str, Any]:
    return event.as_dict()


@main.command()
@click.argument("queue")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after this many events.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="Exit after this many seconds without an event (default: wait until Ctrl-C).")
@json_option
@pass_session
def events(session: Session, queue: str, count: int | None, timeout: float | None, as_json: bool) -> None:
    """Tail the lifecycle events of QUEUE (enqueued, delivered, acked, retried, dead).

    Shows events from the moment it starts. On SQLite, events are written only by
    processes connected with events=True. With --json: one object per line (type,
    queue, id, key, at).
    """
    broker = session.broker(events=True)
    seen = 0
    try:
        with broker.events(queue, timeout=timeout) as stream:
            session.stderr.print(f"tailing events of {queue!r} (Ctrl-C to stop)", markup=False)
            for event in stream:
                if as_json:
                    click.echo(json.dumps(event_json(event)))
                else:
                    key = "(unkeyed)" if event.key is None else event.key
                    click.echo(f"{format_time(event.at)}  {event.type:<9}  {event.id}  {key}")
                seen += 1
                if count is not None and seen >= count:
                    return
    except KeyboardInterrupt:
        pass  # Ctrl-C is how tailing is meant to end.


# -- write commands -------------------------------------------------------------------


def _dead_letter_keys(broker: Broker, queue: str) -> list[tuple[str, str | None]]:
    """(id, key) of every dead letter of ``queue`` now, oldest death first."""
    found: list[tuple[str, str | None]] = []
    while True:
        page = broker.dead_letters(queue, limit=REPLAY_PAGE, offset=len(found))
        found += [(letter.id, letter.key) for letter in page]
        if len(page) < REPLAY_PAGE:
            return found


def replay_chunks(letters: Iterable[tuple[str, str | None]], size: int) -> list[list[str]]:
    """Group dead-letter ids into chunks of about ``size`` for one replay call each,
    never splitting the ids of one key (or of the unkeyed lane) across chunks: a replay
    call restores the relative order of the messages it moves, so a key replayed in
    one call ends up in the same order as if everything were replayed at once."""
    by_key: dict[str | None, list[str]] = {}
    for message_id, key in letters:
        by_key.setdefault(key, []).append(message_id)
    chunks: list[list[str]] = []
    current: list[str] = []
    for ids in by_key.values():
        if current and len(current) + len(ids) > size:
            chunks.append(current)
            current = []
        current = current + ids
    if current:
        chunks.append(current)
    return chunks


@main.command()
@click.argument("queue")
@click.argument("ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter of QUEUE.")
@click.option("--position", type=click.Choice(["tail", "head"]), default="tail", show_default=True,
              help="Where replayed messages go in their key's order: tail (behind the messages "
                   "waiting now) or head (before them).")
@json_option
@pass_session
def replay(session: Session, queue: str, ids: tuple[str, ...], replay_all: bool, position: str, as_json: bool) -> None:
    """Put dead letters of QUEUE back in service.

    Replays IDS, or --all; their attempts start again from 0. By default they go to the
    tail of their keys (--position head: before the messages waiting now). --all replays
    the dead letters present when it starts, a key's messages together so they keep
    their order. Exit code 1 when some IDS were not dead letters of QUEUE. With --json:
    {"queue", "requested", "replayed", "position"}.
    """
    if bool(ids) == replay_all:
        raise click.UsageError("name the dead letters to replay (IDS) or pass --all, not both")
    broker = session.broker()
    _require_queue(broker, queue)
    if replay_all:
        chunks = replay_chunks(_dead_letter_keys(broker, queue), REPLAY_CHUNK)
    else:
        # One call keeps the given messages' relative order within each key.
        chunks = [list(dict.fromkeys(ids))]
    requested = sum(len(chunk) for chunk in chunks)
    replayed = 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        # A bar is for someone watching: not in logs, pipes or --json runs.
        console=session.stderr, disable=as_json or not requested or not session.stderr.is_terminal,
    )
    with progress:
        task = progress.add_task("replay", total=requested)
        for chunk in chunks:
            replayed += broker.replay(queue, chunk, position=position)  # type: ignore[arg-type]
            progress.advance(task, len(chunk))
    if as_json:
        _print_json({"queue": queue, "requested": requested, "replayed": replayed, "position": position})
    elif replayed or not ids:
        session.stdout.print(
            f"replayed {replayed:,} dead letter{'s' * (replayed != 1)} of {queue!r} to the {position} of their keys",
            markup=False,
        )
    if ids and not replayed:
        which = "that id" if requested == 1 else f"any of these {requested} ids"
        raise CommandFailed(f"no dead letter of {queue!r} has {which} (already replayed or purged?); nothing replayed")
    if ids and replayed < requested:
        raise CommandFailed(
            f"{requested - replayed} of {requested} ids were not dead letters of {queue!r} (already replayed or purged?)"
        )


def _value_or_clear(value: object, clear: bool, name: str) -> None:
    """A per-key setting command takes its VALUE or --clear, exactly one of them."""
    if value is None and not clear:
        raise click.UsageError(f"give {name} or --clear")
    if value is not None and clear:
        raise click.UsageError(f"give {name} or --clear, not both")


@main.command()
@click.argument("queue")
@click.option("--dead", "dead_letters", is_flag=True, help="Purge the dead letters instead of the waiting messages.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_session
def purge(session: Session, queue: str, dead_letters: bool, yes: bool, as_json: bool) -> None:
    """Delete the waiting messages (or --dead: dead letters) of QUEUE.

    Waiting means ready and delayed; leased messages are left to the workers holding them. Asks first unless --yes;
    without a terminal to ask on, refuses unless --yes. With --json: {"queue", "what",
    "purged"}.
    """
    broker = session.broker()
    _require_queue(broker, queue)
    what = "dead letters" if dead_letters else "ready and delayed messages"
    if not yes:
        if not sys.stdin.isatty():
            raise BadUsage(f"refusing to purge {queue!r} without confirmation: no terminal to ask on; pass --yes")
        row = broker.stats(queue)
        counts = f"{row.dead:,} dead letters" if dead_letters else f"{row.ready:,} ready and {row.delayed:,} delayed messages"
        if not click.confirm(f"Delete {counts} of queue {queue!r}?", default=False, err=True):
            raise CommandFailed("purge cancelled; nothing deleted")
    purged = broker.purge(queue, dead=dead_letters)
    if as_json:
        _print_json({"queue": queue, "what": "dead" if dead_letters else "waiting", "purged": purged})
    else:
        session.stdout.print(f"purged {purged:,} {what} of {queue!r}", markup=False)


@main.command(context_settings={"ignore_unknown_options": True})  # "-1" is SECONDS, not an option
@click.argument("queue")
@click.argument("key")
@click.argument("seconds", type=float, required=False)
@click.option("--clear", is_flag=True, help="Return KEY to the queue's default interval.")
@pass_session
def interval(session: Session, queue: str, key: str, seconds: float | None, clear: bool) -> None:
    """Space the deliveries of KEY in QUEUE at least SECONDS apart.

    Stored in the backend, so every worker keeps it. --clear returns KEY to the queue's
    default interval.
    """
    _value_or_clear(seconds, clear, "SECONDS")
    broker = session.broker()
    was_known = queue in broker.queues()
    broker.set_interval(queue, key, None if clear else seconds)
    _note_if_new(session, queue, was_known)
    if clear:
        message = f"key {key!r} of {queue!r} now uses the queue's default interval"
    else:
        message = f"key {key!r} of {queue!r}: at least {seconds:g}s between deliveries"
    session.stdout.print(message, markup=False)


@main.command()
@click.argument("queue")
@click.argument("key")
@click.argument("weight", type=click.IntRange(min=1, max=MAX_WEIGHT), required=False)
@click.option("--clear", is_flag=True, help="Return KEY to the default weight 1.")
@pass_session
def weight(session: Session, queue: str, key: str, weight: int | None, clear: bool) -> None:
    """Give KEY of QUEUE the weight WEIGHT in the fairness order.

    While they stay backlogged, ready keys are served in proportion to their weights: a
    key of weight N takes up to N consecutive turns per round. Stored in the backend, so
    every worker keeps it. --clear (or 1) returns KEY to the default weight 1.
    """
    _value_or_clear(weight, clear, "WEIGHT")
    broker = session.broker()
    was_known = queue in broker.queues()
    broker.set_weight(queue, key, None if clear else weight)
    _note_if_new(session, queue, was_known)
    shown = 1 if clear or weight is None else weight
    session.stdout.print(
        f"key {key!r} of {queue!r}: weight {shown}"
        + (" (the default: one turn per round)" if shown == 1 else f" (up to {shown} turns per round)"),
        markup=False,
    )


def schedules_table(schedules: Sequence[Schedule], now: float) -> Table:
    table = Table(header_style="bold")
    table.add_column("name")
    table.add_column("spec", no_wrap=True)
    table.add_column("key")
    table.add_column("next due", no_wrap=True)
    table.add_column("last fired", no_wrap=True)
    table.add_column("fired", justify="right")
    for schedule in schedules:
        if schedule.paused:
            due = Text("paused", style="yellow")
        else:
            wait = schedule.next_due - now
            due = Text(f"{format_time(schedule.next_due)} ({'in ' + format_duration(wait) if wait > 0 else 'now'})")
        last = "never" if schedule.last_fired is None else format_time(schedule.last_fired)
        table.add_row(Text(schedule.name), Text(schedule.spec), _key_text(schedule.key), due, last, f"{schedule.fired:,}")
    return table


@main.command("schedules")
@click.argument("queue")
@click.option("--pause", "pause_name", metavar="NAME", default=None, help="Pause the schedule NAME.")
@click.option("--resume", "resume_name", metavar="NAME", default=None,
              help="Resume the schedule NAME (from its next period after now).")
@click.option("--remove", "remove_name", metavar="NAME", default=None, help="Remove the schedule NAME.")
@json_option
@pass_session
def schedules_command(
    session: Session, queue: str, pause_name: str | None, resume_name: str | None, remove_name: str | None,
    as_json: bool,
) -> None:
    """List the schedules (recurrent messages) of QUEUE, or pause, resume or remove one.

    Lists each schedule's name, spec (every N seconds, or a cron spec in UTC), shard key,
    next due time, last firing and how many messages it enqueued. The running consumers
    of QUEUE fire them; see docs/scheduling.md. Exit code 1 for an unknown NAME. With
    --json: a list of objects (queue, name, spec, every, cron, key, priority, headers,
    next_due, paused, last_fired, fired, payload_size); with an action, {"queue", "name",
    "action"}.
    """
    actions = [(name, action) for name, action in
               ((pause_name, "paused"), (resume_name, "resumed"), (remove_name, "removed")) if name is not None]
    if len(actions) > 1:
        raise click.UsageError("give one of --pause, --resume and --remove at a time")
    broker = session.broker()
    if actions:
        [(name, action)] = actions
        if name not in {schedule.name for schedule in broker.schedules(queue)}:
            raise CommandFailed(f"queue {queue!r} has no schedule named {name!r}; see `sharded-broker schedules {queue}`")
        if action == "paused":
            broker.pause_schedule(queue, name)
        elif action == "resumed":
            broker.resume_schedule(queue, name)
        else:
            broker.unschedule(queue, name)
        if as_json:
            _print_json({"queue": queue, "name": name, "action": action})
        else:
            session.stdout.print(f"{action} schedule {name!r} of {queue!r}", markup=False)
        return
    found = broker.schedules(queue)
    if as_json:
        _print_json([schedule.as_dict() for schedule in found])
        return
    if not found:
        session.stdout.print(f"no schedules in {queue!r}", markup=False)
        return
    session.stdout.print(schedules_table(found, broker.now()))


def _pause_command(paused: bool) -> Callable[..., None]:
    verb = "paused" if paused else "resumed"

    @click.argument("queue")
    @click.argument("key", required=False)
    @pass_session
    def command(session: Session, queue: str, key: str | None) -> None:
        broker = session.broker()
        was_known = queue in broker.queues()
        (broker.pause if paused else broker.resume)(queue, key)
        _note_if_new(session, queue, was_known)
        target = f"queue {queue!r}" if key is None else f"key {key!r} of {queue!r}"
        session.stdout.print(f"{verb} {target}", markup=False)

    return command


main.command(
    "pause",
    help="Stop delivering QUEUE (or only KEY in it). Leases already held go on.",
)(_pause_command(True))
main.command("resume", help="Deliver QUEUE (or KEY in it) again after a pause.")(_pause_command(False))


# -- exporter -------------------------------------------------------------------------


@main.command()
@click.option("--port", type=click.IntRange(min=1, max=65535), required=True, help="Port to serve /metrics on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--queue", "queues", multiple=True,
              help="Export only this queue (repeatable; default: every queue, looked up at each scrape).")
@click.option("--top-keys", type=click.IntRange(min=0, max=1000), default=10, show_default=True,
              help="Per-key series (backlog, lag) for this many keys per queue, those with the largest backlogs.")
@pass_session
def exporter(session: Session, port: int, host: str, queues: tuple[str, ...], top_keys: int) -> None:
    """Serve Prometheus metrics on http://HOST:PORT/metrics.

    Runs until SIGINT or SIGTERM (then exits 0). A scrape that cannot reach the backend
    reports sharded_broker_up 0.
    """
    try:
        # First: its ImportError tells how to install the missing extra.
        from .prometheus import ShardedBrokerCollector
    except ImportError as exc:
        raise CommandFailed(str(exc)) from None
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(ShardedBrokerCollector(session.broker(), queues=list(queues) or None, top_keys=top_keys))
    # Handlers first: a SIGTERM that comes as soon as the port answers still exits 0.
    stop = _stop_on_signals()
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise CommandFailed(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    session.stderr.print(f"serving metrics of {session.safe_url} on http://{host}:{port}/metrics", markup=False)
    stop.wait()


@main.command()
@click.option("--url", "dashboard_url", metavar="URL", default=None,
              help="Broker URL, as `sharded-broker --url` takes it (either place works).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. A non-loopback address needs --token.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port, printed at start-up).")
@click.option("--token", default=None,
              help="Token every action needs (default: $SHARDED_BROKER_DASHBOARD_TOKEN, else one "
                   "generated now and printed once).")
@click.option("--read-only", is_flag=True, help="Show no actions and refuse every change.")
@click.option("--stuck-after", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="A key is listed as stuck when its next message has waited this many seconds.")
@settings_options
@pass_session
def dashboard(
    session: Session, dashboard_url: str | None, host: str, port: int, token: str | None, read_only: bool,
    stuck_after: float, key_concurrency: int | None, default_interval: float | None,
) -> None:
    """A web dashboard of the broker's queues, keys and dead letters, with actions
    (pause/resume, intervals, replay or purge dead letters, release a dead lease).

    Listens on 127.0.0.1:8000 by default. Actions need a token: --token, or one
    generated at start-up and printed once, in the address to open (as the URL's
    #fragment, which the browser never sends to the server). Needs the dashboard extra:
    pip install 'sharded-broker[dashboard]'.
    """
    try:
        from waitress import create_server

        from .dashboard import BindRefused, check_bind, create_app, new_token
    except ImportError as exc:
        raise CommandFailed(
            f"the dashboard needs Flask and waitress ({exc.name} is missing): pip install 'sharded-broker[dashboard]'"
        ) from None
    if dashboard_url:
        session.url = normalize_url(dashboard_url)
    token = environment.dashboard_token(token)
    try:
        check_bind(host, token_given=bool(token))
    except BindRefused as exc:
        raise BadUsage(str(exc)) from None
    options: dict[str, Any] = {}
    if key_concurrency is not None:
        options["key_concurrency"] = key_concurrency
    if default_interval is not None:
        options["interval"] = default_interval
    broker = session.broker(**options)
    broker.queues()  # reach the broker now: an unreachable one fails here, not on the first page
    generated = token is None
    action_token = new_token() if token is None else token
    app = create_app(broker, session.url or "", token=action_token, read_only=read_only, stuck_after=stuck_after)
    server = create_server(app, host=host, port=port, threads=8, ident="sharded-broker")
    shown_host = f"[{host}]" if ":" in host else host
    address = f"http://{shown_host}:{server.effective_port}/"
    if read_only:
        note = " (read-only)"
    elif generated:
        address += f"#token={action_token}"
        note = " (the token after #token= is printed only now)"
    else:
        note = " (actions need the token given with --token or $SHARDED_BROKER_DASHBOARD_TOKEN)"
    click.echo(f"dashboard of {session.safe_url}: {address}{note}")
    sys.stdout.flush()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (the command then returns: exit code 0)."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


if __name__ == "__main__":
    main()
