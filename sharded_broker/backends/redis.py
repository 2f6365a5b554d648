"""Redis backend: ``redis://``, ``rediss://`` (TLS), and a primary found through Redis
Sentinel, ``redis+sentinel://`` / ``rediss+sentinel://``. Needs Redis 7.0 or newer.

Every operation is one atomic Redis function, registered by ``lua/<operation>.lua``; all of
them, with the shared helpers of ``lua/_common.lua``, form one Functions library that is
loaded once per server (``FUNCTION LOAD``) and called with ``FCALL``. Each function gets
every key it touches as a key argument; all keys of one queue share the hash tag
``{<queue>}`` (``<prefix>:{<queue>}:<structure>``), so a queue's functions can run on a
Redis Cluster node. Per-shard-key data lives inside fixed per-queue structures (described
at the top of ``_common.lua`` and in docs/redis.md), never in key names built at run time.
Times cross as whole microseconds.

Guarantees, beyond the contract of :class:`~sharded_broker.backend.Backend`:

* Time comes from the server (``TIME`` inside each function), so client clock skew cannot
  reorder or double-deliver; only a ``clock=`` test hook replaces it.
* ``enqueue_many``, ``lease(limit=N)``, ``ack_many``, ``release_many`` and
  ``extend_many`` on one queue are one round trip (the last three over several queues:
  one pipelined round trip, one function call per queue).
* Every hot operation is O(log n) with bounded work per call: at most ``SWEEP_LIMIT``
  (500) due delayed messages promoted and expired leases returned per lease call; beyond
  that, the next call is due at once. No ``KEYS``/``SCAN``.
* ``wait`` blocks on a per-queue signal list with BLPOP on a connection of its own; enqueue,
  ack, nack, replay, interval and pause changes push wake-up tokens. An idle consumer
  makes about two calls a second.
* Through Sentinel, a call refused with READONLY (the primary was demoted) did not run:
  redis-py's Sentinel connections then ask the Sentinels for the new primary and the
  client's retry policy sends the call again, so producers and consumers follow a
  failover by themselves (docs/redis.md, "Sentinel", says what a failover can lose).
* ``wait_replicas=N`` follows every writing function call, in the same round trip, by
  ``WAIT N`` (:class:`ReplicaWait`); fewer replicas acknowledging in ``wait_timeout``
  raise BackendUnavailable. Functions that write nothing (``READ_ONLY_FUNCTIONS``) skip it.
* Connection failures raise :class:`~sharded_broker.BackendUnavailable` naming the URL
  with its password redacted.
* Metrics are counted inside the enqueue, lease, ack and nack functions with ``HINCRBY``:
  one hash field per counter used per (key, minute) and per queue minute; the keys' fields
  live in three hashes taking turns by span (half the key window), one dropped whole when
  its turn comes again, the queue's old minutes go when a new minute starts; per-key
  backlogs live in a zset, so the largest backlogs are read without a scan.
* A lease writes nothing to a message's record and an ack reads nothing: a lease is named
  by its entry in the leases index (token, id, key, batch), which the client sends back.
* At ``maxmemory`` an enqueue is refused (``BackendUnavailable``, nothing written) while
  lease, ack, nack, release, extend and purge go on, so consumers can drain the queue.
* ``purge`` and ``replay`` of more than ``CHUNK`` (1,000) messages run as several function
  calls of at most ``CHUNK`` messages each, every one atomic and leaving the queue
  consistent, so Redis serves other clients between them.
* Events (on by default: ``events=False`` turns them off) are one ``PUBLISH`` per function
  call on the channel ``<prefix>:{<queue>}:events``, carrying every event of the call;
  Redis pub/sub is fire-and-forget, so a subscriber sees only what happens while it is
  connected, and publishing to a channel nobody listens to costs next to nothing.
* A queue may be stored as P partitions (option ``partitions``; a Redis Cluster's default
  is 16, one server's 1): partition p is a queue of its own under the hash tag
  ``{<queue>#<p>}``, a key always in partition ``crc32(key) % P``, so every guarantee
  above holds per key. P is stored with the queue (``<prefix>:{<queue>}:partitions``)
  when it is first used and every client follows it. Message ids name their partition
  (``...-<p>``), so settling a lease goes straight to it; reading a whole queue (stats,
  metrics, keys, dead letters, purge) asks every partition in one pipelined round trip.
  See "Partitions" in docs/redis-cluster.md for fairness across partitions and what
  is per partition (``max_pending``, dedup ids shared by several keys, ``enqueue_many``'s
  atomicity).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import itertools
import os
import random
import secrets
import threading
import time
import weakref
import zlib
from contextlib import contextmanager
from importlib import resources
from types import MappingProxyType
from typing import Any, Callable, Generator, Iterator, Mapping, NamedTuple, Sequence, TypeVar, Union

import msgpack
import redis
import redis.exceptions
import redis.sentinel

from ..backend import (
    DEFAULT_METRICS_WINDOW, Backend, EventSubscription, KeySort, compact_json, events_option, headers_text, kept_minutes,
    key_metrics_window_option, metrics_window_option,
)
from ..errors import BackendError, BackendUnavailable, ConfigurationError, QueueFull
from ..urls import is_sentinel_url, redact_url, sentinel_url
from ..models import (
    COUNTERS, CancelResult, DeadLetter, Event, HeadMessage, HeldBatch, KeyFacts, KeyInfo, Lease, LeaseResult,
    Message, MessageInfo, MinuteMetrics, QueueSettings, QueueStats, RetryPosition, Schedule,
)
from ..validation import queue_name
from .planner import PUBLIC_STATES, describe

# The keys of every queue function, in this order (named by the constants at the top of
# _common.lua).
QUEUE_KEYS = (
    "msgs", "ready", "keyq", "state", "backlog", "delayed", "leases", "dedupexp", "dead", "readyage",
    "metrics", "signal", "events", "kmetrics0", "kmetrics1", "kmetrics2",
)
QUEUE_FUNCTIONS = (
    "enqueue", "lease", "ack", "nack", "release", "extend", "set_interval", "set_weight", "set_paused", "stats",
    "dead_letters", "dead_order", "replay", "purge", "metrics", "keys", "why", "cancel", "get",
)
EXCHANGE_FUNCTIONS = ("bind", "unbind")
# Recurrent messages (lua/_schedules.lua): called with the queue's keys and then
# SCHEDULE_KEYS, last.
SCHEDULE_FUNCTIONS = (
    "schedule_put", "schedule_list", "schedule_due", "schedule_fire", "schedule_set_paused", "schedule_remove",
)
SCHEDULE_KEYS = ("schedules", "schedq")
# The functions that write nothing: with wait_replicas, no WAIT follows them.
READ_ONLY_FUNCTIONS = frozenset({
    "stats", "dead_letters", "dead_order", "metrics", "keys", "why", "get", "schedule_list", "schedule_due",
})
T = TypeVar("T")
# Redis Functions (FUNCTION LOAD, FCALL) came with Redis 7.0.
MINIMUM_SERVER = (7, 0)

# Purge and replay of many messages work in calls of at most this many messages, so that
# no call blocks Redis for long (measured 18-29 ms per purge call, docs/redis.md).
CHUNK = 1000

# wait() blocks at most this long per BLPOP: a wake-up token normally ends it at once, and
# a missed token (taken by another waiter) costs at most this delay.
MAX_BLOCK = 1.0

_OWN_OPTIONS = frozenset({
    "prefix", "clock", "metrics_window", "key_metrics_window", "events", "wait_replicas", "wait_timeout",
    "partitions",
})
# Options of redis+sentinel:// URLs only: the Sentinels' own credentials.
_SENTINEL_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})
# wait_replicas: how long a write waits for its replicas unless wait_timeout says.
DEFAULT_WAIT_TIMEOUT = 1.0
# Options that would break the backend (it needs bytes and its own connection pool).
_REFUSED_OPTIONS = frozenset({"decode_responses", "connection_pool", "single_connection_client", "encoding"})
# Errors that say "not now" rather than "wrong call": the server is unreachable, slow,
# out of memory under maxmemory/noeviction, or a read-only replica after a failover. The
# operation had no effect (a script refused for OOM writes nothing) and may be retried.
_TRANSPORT_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)


def _redis_options() -> frozenset[str]:
    names = set(inspect.signature(redis.Redis.__init__).parameters) - {"self", "kwargs"}
    return frozenset((names | {"max_connections"}) - _REFUSED_OPTIONS)


def _lua_source(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text(encoding="utf-8")


def _text(value: str) -> bytes:
    # Keys are any str without control characters; keep even lone surrogates round-trip.
    return value.encode("utf-8", "surrogatepass")


def _str(value: Any) -> str:
    """Text of a reply (bytes: the client does not decode responses)."""
    return value.decode("utf-8", "surrogatepass")


def _us(seconds: float) -> str:
    """A time or duration as the functions take it: whole microseconds."""
    return str(round(seconds * 1_000_000))


def _pack(value: Any) -> bytes:
    # Redis's cmsgpack reads no bin type: bytes go as msgpack raw strings.
    return msgpack.packb(value, use_bin_type=False)


# A stored record is consecutive msgpack values (see load() in _common.lua): the envelope
# the client packs (k p h d ah pl), t s, then st a nb ea eo o r da when not defaults.
_RECORD_HEAD = b"\x98"  # an array of the first 8 values, the whole of most records


def _record(raw: bytes) -> list[Any]:
    """A stored record's values, read in one call when it has only its first eight."""
    try:
        return msgpack.unpackb(_RECORD_HEAD + raw, raw=True)
    except msgpack.ExtraData as extra:
        unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max(len(extra.extra), 1))
        unpacker.feed(extra.extra)
        return [*extra.unpacked, *unpacker]


# -- requests: what an operation asks its executor to send ---------------------------------
#
# Every operation below is written once, without I/O ("sans-IO"): a generator that yields
# the requests it needs (FunctionCall, Command, Pipeline, WaitSignals), is sent each reply (or has the
# redis-py error thrown into it) and returns the operation's answer. RedisBackend runs
# them on a redis.Redis client, AsyncRedisBackend (redis_asyncio.py) on a redis.asyncio
# one: which function an operation calls, with which keys and arguments, and how its reply
# is read, is known here only.


class FunctionCall(NamedTuple):
    """FCALL of one library function, named by its operation (``"lease"``)."""

    function: str
    keys: Sequence[bytes]
    args: Sequence[Any]


class Command(NamedTuple):
    """A plain command, as the redis-py client method of that name (``"smembers"``)."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = MappingProxyType({})


class WaitSignals(NamedTuple):
    """Block up to ``timeout`` seconds until a wake-up token comes on any of the signal
    lists ``keys`` (taking it), on the connections for blocking waits. The reply is the
    list of the keys a token was taken from (empty when none came in time). On one server
    this is one BLPOP; a cluster executor, whose keys live in several slots, waits on each
    key's node."""

    keys: Sequence[bytes]
    timeout: float


class Pipeline(NamedTuple):
    """Several function calls, after an optional command, in one round trip. The reply is
    the list of their replies, each failed one's error in its place (not raised)."""

    calls: Sequence[FunctionCall]
    prelude: Command | None = None


Request = Union[FunctionCall, Command, Pipeline, WaitSignals]
Steps = Generator[Request, Any, T]


class _Library:
    """Every operation as one Redis Functions library, loaded once per server.

    The library's name carries a digest of its source, so processes running different
    versions of this package each find their own functions on a shared server.
    """

    def __init__(self) -> None:
        sources = ("_common", *QUEUE_FUNCTIONS, *EXCHANGE_FUNCTIONS, "_schedules", *SCHEDULE_FUNCTIONS)
        body = "\n".join(_lua_source(name) for name in sources)
        self.name = "sharded_broker_" + hashlib.sha1(body.encode("utf-8")).hexdigest()[:16]
        self.source = f"#!lua name={self.name}\nlocal LIB = '{self.name}'\n{body}"
        self.functions = {
            name: f"{self.name}_{name}" for name in (*QUEUE_FUNCTIONS, *EXCHANGE_FUNCTIONS, *SCHEDULE_FUNCTIONS)
        }

    def call(self, function: str, keys: Sequence[bytes], args: Sequence[Any]) -> Steps[Any]:
        request = FunctionCall(function, keys, args)
        try:
            return (yield request)
        except redis.exceptions.ResponseError as exc:
            if not _missing_function(exc):
                raise
        yield from self.load()  # on a server older than 7.0: ConfigurationError naming its version
        return (yield request)

    def load(self) -> Steps[None]:
        """Load the library, unless another client just did."""
        try:
            yield Command("function_load", (self.source,))
        except redis.exceptions.ResponseError as exc:
            if "already exists" in str(exc):
                return
            if "unknown command" not in str(exc).lower():
                raise
            info = yield Command("info", ("server",))
            raise ConfigurationError(
                f"this Redis server is version {info.get('redis_version', 'unknown')}; sharded-broker needs Redis "
                f"{'.'.join(map(str, MINIMUM_SERVER))} or newer (it runs as Redis Functions)"
            ) from None


def _missing_function(exc: Exception) -> bool:
    """The server lacks the library: not loaded yet (or flushed), or a server without
    Functions at all, whose FCALL is an unknown command (load() then says so)."""
    if not isinstance(exc, redis.exceptions.ResponseError):
        return False
    text = str(exc).lower()
    return "function not found" in text or ("unknown command" in text and "fcall" in text)


_LIBRARY = _Library()
# ack and release count metrics but take no queue settings: the defaults fill the slots.
_OBSERVE_ONLY = QueueSettings()


def _raise_refusal(queue: str, answer: Any) -> None:
    """QueueFull when an enqueue's or a firing's answer is a backpressure refusal: {0, key
    ('' for max_pending), setting, limit, note} (an answer of ids starts with a string)."""
    if isinstance(answer, list) and answer and isinstance(answer[0], int):
        _, key, setting, limit, note = answer
        raise QueueFull(queue, _str(key) or None, _str(setting), limit, _str(note))


def checked_options(url: str, options: Mapping[str, Any]) -> None:
    """Refuse, naming them, options and URL query parameters the backend cannot use."""
    known = _redis_options()
    sentinel = is_sentinel_url(url)
    unknown = sorted(set(options) - known - _OWN_OPTIONS - (_SENTINEL_OPTIONS if sentinel else frozenset()))
    if unknown:
        refused = [name for name in unknown if name in _REFUSED_OPTIONS]
        if refused:
            raise ConfigurationError(f"option(s) {', '.join(refused)} cannot be used with the redis backend")
        raise ConfigurationError(
            f"unknown option(s) for {redact_url(url)}: {', '.join(unknown)}; "
            "known: prefix, clock, metrics_window, key_metrics_window, events, partitions, wait_replicas, wait_timeout, "
            f"{'sentinel_username, sentinel_password, ' if sentinel else ''}"
            "and redis-py connection options (socket_timeout, ssl_ca_certs, ...)"
        )
    replica_wait(options.get("wait_replicas"), options.get("wait_timeout"))
    partitions_option(options.get("partitions"))
    try:
        from_query = redis.connection.parse_url(sentinel_url(url).primary_url if sentinel else url)
    except ValueError as exc:
        raise ConfigurationError(f"malformed redis URL {redact_url(url)!r}: {exc}") from None
    unknown_query = sorted(set(from_query) - known - {"connection_class"})
    if unknown_query:
        raise ConfigurationError(
            f"unknown query parameter(s) in {redact_url(url)}: {', '.join(unknown_query)}"
        )
    if not url.startswith(("rediss://", "rediss+sentinel://")):
        ssl_options = sorted(name for name in options if name.startswith("ssl"))
        if ssl_options:
            raise ConfigurationError(f"option(s) {', '.join(ssl_options)} need a rediss:// or rediss+sentinel:// URL")


class ReplicasShort(BackendUnavailable):
    """A write answered, but fewer replicas than ``wait_replicas`` acknowledged it in time."""


class ReplicaWait(NamedTuple):
    """``wait_replicas``: the ``WAIT`` sent after every writing function call, on the same
    connection and in the same round trip, and the check of its answer. Any executor
    uses it: :meth:`after` says whether a call needs it, :attr:`command` is the packed
    WAIT to send after the call, :meth:`check` reads WAIT's answer.

    What it guarantees: when a write is answered, ``replicas`` replicas had received it
    (WAIT counts replicas that acknowledged the replication offset of this connection's
    writes), so a failover to one of them keeps it. What it does not: the replicas
    acknowledge receipt, not a write to disk, and a write that WAIT found short of
    replicas is applied on the primary all the same (the error says it may be lost, it
    was not undone)."""

    replicas: int
    timeout: float

    @property
    def millis(self) -> int:
        """WAIT's timeout: whole milliseconds, never 0 (which would mean "forever")."""
        return max(1, round(self.timeout * 1000))

    @property
    def command(self) -> bytes:
        return b"".join((b"*3\r\n", _bulk(b"WAIT"), _bulk(b"%d" % self.replicas), _bulk(b"%d" % self.millis)))

    @staticmethod
    def after(function: str) -> bool:
        """Whether a call of ``function`` writes, so WAIT follows it."""
        return function not in READ_ONLY_FUNCTIONS

    def check(self, acknowledged: Any, safe_url: str) -> None:
        """BackendUnavailable unless WAIT's answer counts ``replicas`` replicas."""
        if isinstance(acknowledged, Exception):
            raise BackendUnavailable(f"redis at {safe_url} refused WAIT after a write: {acknowledged}")
        if int(acknowledged) < self.replicas:
            raise ReplicasShort(
                f"redis at {safe_url}: only {acknowledged} of the {self.replicas} replicas asked for (wait_replicas) "
                f"acknowledged a write within {self.timeout:g}s; the write is applied on the primary but may not "
                "survive a failover"
            )


def replica_wait(replicas: Any, timeout: Any) -> ReplicaWait | None:
    """The ReplicaWait of the options ``wait_replicas`` and ``wait_timeout`` (seconds,
    default DEFAULT_WAIT_TIMEOUT); None without wait_replicas. ConfigurationError for
    bad values."""
    if replicas is None:
        if timeout is not None:
            raise ConfigurationError("wait_timeout needs wait_replicas (the replicas each write waits for)")
        return None
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigurationError(f"wait_replicas must be a whole number of replicas, 1 or more, not {replicas!r}")
    seconds = DEFAULT_WAIT_TIMEOUT if timeout is None else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 3600:
        raise ConfigurationError(f"wait_timeout must be seconds, more than 0 and at most 3600, not {timeout!r}")
    return ReplicaWait(replicas, float(seconds))


def clients(client_module: Any, url: str, redis_options: Mapping[str, Any], safe_url: str) -> tuple[Any, Any]:
    """A client for ``url`` and one for blocking waits, of ``client_module`` (``redis`` or
    ``redis.asyncio``, which name their classes alike). Blocking waits get connections of
    their own, whose read timeout outlasts a block (socket_timeout may come from the
    options or from the URL's query). A Sentinel URL gives two clients of the primary the
    Sentinels name (:func:`sentinel_clients`)."""
    if is_sentinel_url(url):
        return sentinel_clients(client_module, url, redis_options, safe_url)
    try:
        client = client_module.Redis.from_url(url, **redis_options)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad redis URL or option for {safe_url}: {exc}") from None
    pool = client.connection_pool
    blocking_kwargs = dict(pool.connection_kwargs)
    if blocking_kwargs.get("socket_timeout") is not None:
        blocking_kwargs["socket_timeout"] = max(float(blocking_kwargs["socket_timeout"]), MAX_BLOCK + 5.0)
    blocking_client = client_module.Redis(
        connection_pool=client_module.ConnectionPool(
            connection_class=pool.connection_class, max_connections=pool.max_connections, **blocking_kwargs
        )
    )
    return client, blocking_client


def sentinel_clients(
    client_module: Any, url: str, redis_options: Mapping[str, Any], safe_url: str
) -> tuple[Any, Any]:
    """The two clients of :func:`clients` for a Sentinel URL: each on a pool of its own
    (redis-py's SentinelConnectionPool), whose connections ask the Sentinels where the
    primary is when they connect, and drop and reconnect on a READONLY reply (the primary
    they reached was demoted), so that the client's retry policy sends the call again to
    the new primary. The Sentinels are reached with the socket options and, if given, the
    ``sentinel_username``/``sentinel_password`` options."""
    options = dict(redis_options)
    sentinel_credentials = {
        name.removeprefix("sentinel_"): options.pop(name) for name in _SENTINEL_OPTIONS if name in options
    }
    parsed = sentinel_url(url)
    connection_kwargs = {**options, **redis.connection.parse_url(parsed.primary_url)}
    for placeholder in ("host", "port"):
        connection_kwargs.pop(placeholder, None)
    if connection_kwargs.pop("connection_class", None) is not None:  # rediss: SSLConnection
        connection_kwargs["ssl"] = True
    sentinel_kwargs = {name: value for name, value in connection_kwargs.items() if name.startswith("socket_")}
    sentinel_kwargs.update(sentinel_credentials)
    try:
        manager = client_module.sentinel.Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_kwargs, **connection_kwargs)
        client = manager.master_for(parsed.master, redis_class=client_module.Redis)
        blocking_timeout = connection_kwargs.get("socket_timeout")
        blocking = {} if blocking_timeout is None else {"socket_timeout": max(float(blocking_timeout), MAX_BLOCK + 5.0)}
        blocking_client = manager.master_for(parsed.master, redis_class=client_module.Redis, **blocking)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad redis URL or option for {safe_url}: {exc}") from None
    return client, blocking_client


def pipelined_wait(wait: ReplicaWait | None, request: Pipeline) -> ReplicaWait | None:
    """``wait`` when the pipeline writes (a prelude command, or a writing function), else None."""
    if wait is None or (request.prelude is None and not any(wait.after(call.function) for call in request.calls)):
        return None
    return wait


def replied_after_wait(read: Callable[[], Any], wait: ReplicaWait, safe_url: str) -> Any:
    """A function call's reply, read with ``read``, then its WAIT's answer, checked: a
    call's error reply is raised only once WAIT's is read, leaving the connection clean
    (a connection error raises at once: the connection is dropped anyway). WAIT's own
    error after a refused call is dropped: a node that refused a call for a cluster's
    redirection may be a replica by now, which refuses WAIT too, and the call's refusal
    is what says where to send it."""
    try:
        reply = read()
    except redis.exceptions.ResponseError as exc:
        try:
            read()
        except redis.exceptions.ResponseError:
            pass
        raise exc
    wait.check(read(), safe_url)
    return reply


def sentinel_manager(client: Any) -> Any:
    """The redis-py Sentinel object behind a client of :func:`sentinel_clients` (None for
    other clients): its connections to the Sentinels are closed with the backend."""
    return getattr(client.connection_pool, "sentinel_manager", None)


def blpop_timeout(timeout: float) -> float:
    """BLPOP's timeout for a wait of ``timeout`` seconds: 0 means "forever" to BLPOP, so
    never less than a millisecond."""
    return max(timeout, 0.001)


def signalled(reply: Any) -> list[bytes]:
    """The reply of WaitSignals from a BLPOP's: the key a token came from, if any."""
    return [] if reply is None else [reply[0]]


def translated(exc: redis.exceptions.RedisError, safe_url: str) -> BackendError:
    """The project's error for a redis-py error (the one place they are translated)."""
    if isinstance(exc, redis.sentinel.MasterNotFoundError):
        return BackendUnavailable(
            f"redis at {safe_url} is unavailable: no Sentinel named a primary by the URL's ?master= name, or none "
            f"was reachable ({exc}); check the name against the Sentinels' `sentinel monitor NAME ...` lines"
        )
    if isinstance(exc, _TRANSPORT_ERRORS):
        return BackendUnavailable(f"redis at {safe_url} is unavailable: {exc}")
    return BackendError(f"redis at {safe_url} refused the operation: {exc}")


@contextmanager
def translated_errors(safe_url: str) -> Iterator[None]:
    """redis-py's errors raised inside the block as the project's (:func:`translated`)."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise translated(exc, safe_url) from None


# What holds per-process state of this module (RedisOperations' message ids, RedisBackend's
# kept connections): each resets it in a forked child (_after_fork_in_child).
_PER_PROCESS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for owner in list(_PER_PROCESS):
        owner._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- partitions ----------------------------------------------------------------------------

MAX_PARTITIONS = 1024
# A partition whose lease call found nothing is not asked again by that consumer for this
# long (less when it said something comes due sooner), unless a wake-up token came from it
# (WaitSignals names the list): an idle consumer over P partitions makes P lease calls per
# QUIET_PERIOD, and a partition that fills while its consumers are busy elsewhere is
# leased from within QUIET_PERIOD.
QUIET_PERIOD = 3.0


def partitions_option(value: Any) -> int | None:
    """The ``partitions`` option, checked (None: the executor's default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARTITIONS:
        raise ConfigurationError(f"partitions must be a whole number from 1 to {MAX_PARTITIONS}, not {value!r}")
    return value


def partition_of(value: str, count: int) -> int:
    """The partition of a shard key (or a dedup id, or a schedule's name) in a queue of
    ``count`` partitions: CRC-32 of its UTF-8 text, the same in every process and version."""
    return zlib.crc32(_text(value)) % count


def partition_name(queue: str, partition: int, count: int) -> str:
    """The name whose hash tag holds partition ``partition`` of ``queue``: ``queue#p``, or
    the queue's own name when it has one partition. '#' is not allowed in queue names, so
    no queue's keys are those of another's partition."""
    return queue if count == 1 else f"{queue}#{partition}"


def home_of_id(queue: str, message_id: str) -> str:
    """The partition name of a message by its id, which ends in ``-<p>`` in a queue of
    several partitions (ids of one-partition queues have no '-'). An id that is not one of
    ours names a partition that holds nothing: the message is then not found."""
    _, dash, partition = message_id.rpartition("-")
    return f"{queue}#{partition}" if dash and partition.isascii() and partition.isdigit() else queue


def _id_counter(message_id: str) -> int:
    """The counter part of one of our ids (random prefix of 16 hex digits, counter in hex,
    then ``-<p>``): of two ids of one client, the later has the larger. 0 for another id."""
    try:
        return int(message_id.partition("-")[0][16:], 16)
    except ValueError:
        return 0


class _Rotation:
    """One consumer's turn over the partitions of one queue in lease calls.

    Each call asks the partitions a wake-up token came from first, then the others from
    the one after the last that answered with messages, skipping those quiet (found empty
    less than QUIET_PERIOD ago, or less than the time they said something comes due),
    until the call's ``limit`` is filled. So a non-empty partition is asked at least once
    in every ``count`` lease calls of a consumer, and one that fills while marked quiet
    within QUIET_PERIOD: none starves. Shared by the threads of a process without a lock:
    a race can only ask a partition once more or once less.
    """

    def __init__(self, count: int, skip_quiet: bool, start: int) -> None:
        self.count = count
        self.skip_quiet = skip_quiet
        self.cursor = start % count
        self.quiet_until = [0.0] * count
        self.hinted: set[int] = set()

    def order(self, now: float) -> tuple[list[int], float | None]:
        """The partitions to ask now, in order, and the seconds until the first skipped
        one stops being quiet (None when none was skipped)."""
        # A hint stays until its partition is asked (answered): a call whose limit fills
        # before it keeps it for the next.
        hinted = list(self.hinted)
        turn, skipped = list(hinted), None
        for offset in range(self.count):
            partition = (self.cursor + offset) % self.count
            if partition in hinted:
                continue
            quiet_for = self.quiet_until[partition] - now
            if self.skip_quiet and quiet_for > 0:
                skipped = quiet_for if skipped is None else min(skipped, quiet_for)
            else:
                turn.append(partition)
        return turn, skipped

    def answered(self, partition: int, found: bool, retry_in: float | None, now: float) -> None:
        self.hinted.discard(partition)
        if found:
            self.cursor = (partition + 1) % self.count
            self.quiet_until[partition] = 0.0
        else:
            self.quiet_until[partition] = now + min(QUIET_PERIOD, QUIET_PERIOD if retry_in is None else retry_in)


class RedisOperations:
    """Every operation of the Redis backend as steps (see "requests" above): the keys,
    arguments and reply of each function, and the client-side logic around them (chunked
    purge and replay, the queue registry), for any executor.

    ``prefix`` (default ``"sb"``) starts every key name; ``clock`` replaces the server's
    clock (tests only); ``metrics_window``, ``key_metrics_window`` and ``events`` are the
    backend's options of those names. ``shard_channels``: events go out with SPUBLISH on
    the queue's shard channel (a Redis Cluster), not PUBLISH, which a cluster broadcasts
    to every node. ``partitions``: the partitions of a queue first used by this client
    (None: ``default_partitions``); given, a queue stored with another count is refused
    unless it is empty, then stored anew (see :meth:`_settle_partitions`).
    """

    def __init__(
        self,
        *,
        prefix: str = "sb",
        clock: Callable[[], float] | None = None,
        metrics_window: float = DEFAULT_METRICS_WINDOW,
        key_metrics_window: float | None = None,
        events: bool = True,
        shard_channels: bool = False,
        partitions: int | None = None,
        default_partitions: int = 1,
    ) -> None:
        try:
            queue_name(prefix)  # a prefix obeys the rules of a queue name: no braces, no spaces
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad prefix: {exc}".replace("queue name", "prefix")) from None
        if clock is not None and not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, not {clock!r}")
        self.prefix = prefix
        self._clock = clock
        window = metrics_window_option(metrics_window)
        self._kept_minutes = kept_minutes(window)
        self._key_kept_minutes = kept_minutes(key_metrics_window_option(key_metrics_window, window))
        self.events = events_option(events)
        self.shard_channels = shard_channels
        self._library = _LIBRARY
        self._queue_keys: dict[str, list[bytes]] = {}
        self._options: dict[QueueSettings, bytes] = {}
        # Message ids: a random prefix of this backend (64 bits) and a counter, shorter than
        # a UUID (ids are stored in several indexes) and as unique in practice. A forked
        # child draws a prefix of its own (_after_fork_in_child).
        self._after_fork_in_child()
        _PER_PROCESS.add(self)
        self._registered: set[str] = set()
        self._registered_lock = threading.Lock()
        self._wanted_partitions = partitions_option(partitions)
        self._default_partitions = partitions_option(default_partitions) or 1
        # Each queue's partition count as stored, read once (_settle_partitions).
        self._partition_counts: dict[str, int] = {}
        self._rotations: dict[str, _Rotation] = {}
        # A signal list's (queue, partition), for the hints of wait_any's replies.
        self._signal_owners: dict[bytes, tuple[str, int]] = {}
        # The partition of the next enqueue_many of unkeyed messages without a dedup id.
        self._spread = itertools.count(0 if clock is not None else random.randrange(MAX_PARTITIONS))

    # -- plumbing -----------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """A new id prefix (also the first one). A forked child inherits its parent's
        prefix and counter, so the parent and every child forked from it (a prefork
        server's workers, opened before the fork) would make the same next ids; and the
        enqueue function takes an id it already stores for a resent call, storing nothing:
        the later message was silently lost."""
        self._id_prefix = secrets.token_hex(8)
        self._id_counter = itertools.count(1)

    def queue_keys(self, queue: str) -> list[bytes]:
        # Encoded once: redis-py passes bytes through, where it would encode text on every call.
        keys = self._queue_keys.get(queue)
        if keys is None:
            keys = self._queue_keys[queue] = [_text(f"{self.prefix}:{{{queue}}}:{name}") for name in QUEUE_KEYS]
        return keys

    def _registry_key(self) -> str:
        return f"{self.prefix}:queues"

    def _bindings_key(self, exchange: str) -> bytes:
        return _text(f"{self.prefix}:bindings:{{{exchange}}}")

    def _clock_arg(self) -> str:
        return "" if self._clock is None else _us(self._clock())

    def _options_arg(self, settings: QueueSettings) -> bytes:
        """The queue settings and the metrics and events options as one MessagePack map by
        name (read by options() in _common.lua, decoded there once per distinct argument)."""
        packed = self._options.get(settings)
        if packed is None:
            packed = _pack({
                **({} if settings.max_deliveries is None else {"max_deliveries": settings.max_deliveries}),
                "key_concurrency": settings.key_concurrency,
                "interval": round(settings.interval * 1_000_000),
                "retry_position": settings.retry_position,
                "dedup_window": round(settings.dedup_window * 1_000_000),
                "unique_while_pending": settings.unique_while_pending,
                # Backpressure only when set: unset, enqueue reads no more than before.
                **({} if settings.max_pending_per_key is None else {"max_pending_per_key": settings.max_pending_per_key}),
                **({} if settings.max_pending is None else {"max_pending": settings.max_pending}),
                **(
                    {}
                    if settings.max_pending_per_key is None and settings.max_pending is None
                    else {"on_full": settings.on_full}
                ),
                "kept": self._kept_minutes,
                "key_kept": self._key_kept_minutes,
                # "shard": SPUBLISH (see shard_channels); else PUBLISH when on
                "publish": ("shard" if self.shard_channels else True) if self.events else False,
            })
            self._options[settings] = packed
        return packed

    def _run(self, function: str, queue: str, args: Sequence[Any]) -> Steps[Any]:
        """One call of ``function`` on ``queue`` (a queue's or a partition's name)."""
        return self._library.call(function, self.queue_keys(queue), args)

    # -- partitions (see partition_name) ------------------------------------------------

    def _partitions_key(self, queue: str) -> str:
        return f"{self.prefix}:{{{queue}}}:partitions"

    def partition_count(self, queue: str) -> Steps[int]:
        """How many partitions ``queue`` is stored as (read from the server once).
        enqueue_many and lease read the cache inline: a generator per call is a
        microsecond of every one."""
        return self._partition_counts.get(queue) or (yield from self._settle_partitions(queue))

    def _settle_partitions(self, queue: str) -> Steps[int]:
        """The partition count of ``queue``: the stored one, or, for a queue never used, the
        one this client asks for (``partitions``, else the default), stored with SET NX so
        that of clients starting together the first one's count holds. A queue that holds
        data from before partitions were stored keeps its one partition. An explicit
        ``partitions`` different from the stored count is refused unless the queue is
        empty (nothing waiting, delayed, leased or dead, and no schedule), then stored."""
        key = self._partitions_key(queue)
        wanted = self._wanted_partitions
        count = wanted or self._default_partitions
        stored = None
        if count > 1:
            stored = yield Command("get", (key,))
            legacy = [*(self.queue_keys(queue)[QUEUE_KEYS.index(name)] for name in ("msgs", "dead", "state")),
                      *self._schedule_keys(queue)[len(QUEUE_KEYS):]]
            if stored is None and (yield Command("exists", tuple(legacy))):
                if wanted is not None:
                    raise self._refused_partitions(queue, 1, wanted)
                count = 1
        if stored is None:
            # SET NX GET: the count stored before, if another client was first.
            stored = yield Command("set", (key, count), {"nx": True, "get": True})
            if stored is None:
                self._partition_counts[queue] = count
                return count
        count = int(stored)
        if wanted is not None and wanted != count:
            if not (yield from self._empty(queue, count)):
                raise self._refused_partitions(queue, count, wanted)
            yield Command("set", (key, wanted))
            self._rotations.pop(queue, None)
            count = wanted
        self._partition_counts[queue] = count
        return count

    @staticmethod
    def _refused_partitions(queue: str, count: int, wanted: int) -> ConfigurationError:
        return ConfigurationError(
            f"queue {queue!r} is stored as {count} partition(s) and is not empty: partitions={wanted} needs it empty "
            f"(drain or purge it, its dead letters and schedules too), or connect without partitions= to use its {count}"
        )

    def _empty(self, queue: str, count: int) -> Steps[bool]:
        """Whether no partition of ``queue`` holds a message (in any state) or a schedule."""
        stats = yield from self._on_every_partition("stats", queue, count, [self._clock_arg()])
        if any(sum(int(n) for n in answer[:4]) for answer in stats):
            return False
        schedules = yield from self._on_every_partition(
            "schedule_list", queue, count, [self._clock_arg()], keys=self._schedule_keys
        )
        return not any(schedules)

    def partitions(self, queue: str, count: int) -> list[str]:
        """The names of every partition of ``queue``, in order."""
        return [partition_name(queue, p, count) for p in range(count)]

    def _on_every_partition(
        self, function: str, queue: str, count: int, args: Sequence[Any],
        keys: Callable[[str], list[bytes]] | None = None,
    ) -> Steps[list[Any]]:
        """The answers of one call of ``function`` on every partition of ``queue``, in
        partition order, in one round trip (``keys``: a partition's keys, default its queue keys)."""
        keys_of = keys or self.queue_keys
        return (yield from self._calls(function, [(keys_of(part), list(args)) for part in self.partitions(queue, count)]))

    def _calls(self, function: str, calls: list[tuple[list[bytes], list[Any]]]) -> Steps[list[Any]]:
        """The answers of several calls of ``function``: one alone as a plain call, more in
        one pipelined round trip."""
        if len(calls) == 1:
            return [(yield from self._library.call(function, *calls[0]))]
        return (yield from self._pipelined(function, calls))

    def _key_home(self, queue: str, key: str) -> Steps[str]:
        """The partition name of shard key ``key`` in ``queue``."""
        count = yield from self.partition_count(queue)
        return partition_name(queue, partition_of(key, count), count)

    def _per_partition_settings(self, settings: QueueSettings, count: int) -> QueueSettings:
        """``settings`` for one of ``count`` partitions: ``max_pending`` is shared out
        (rounded up), since no call sees the other partitions' messages."""
        if count == 1 or settings.max_pending is None:
            return settings
        return settings.replace(max_pending=-(-settings.max_pending // count))

    # -- the contract -------------------------------------------------------------------

    def now(self) -> Steps[float]:
        if self._clock is not None:
            return self._clock()
        seconds, micros = yield Command("time")
        return seconds + micros / 1_000_000

    def enqueue_many(self, queue: str, messages: Sequence[Message], settings: QueueSettings) -> Steps[list[str]]:
        """One enqueue call per partition the messages go to, all in one round trip (each
        atomic: over several partitions, a refusal by one leaves the others' messages
        enqueued). A keyed message goes to its key's partition, an unkeyed one with a dedup
        id to that id's, the other unkeyed messages of one call to one partition, the next
        call's to the next."""
        count = self._partition_counts.get(queue) or (yield from self._settle_partitions(queue))
        if count == 1:
            parts: list[tuple[str, Sequence[Message], list[int] | None, str]] = [(queue, messages, None, "")]
        else:
            settings = self._per_partition_settings(settings, count)
            spread = next(self._spread) % count
            by_partition: dict[int, list[int]] = {}
            for index, m in enumerate(messages):
                named = m.key if m.key is not None else m.dedup_id
                by_partition.setdefault(spread if named is None else partition_of(named, count), []).append(index)
            parts = [
                (f"{queue}#{p}", [messages[i] for i in indexes], indexes, f"-{p}")
                for p, indexes in by_partition.items()
            ]
        options = self._options_arg(settings)
        calls = [(self.queue_keys(part), self._enqueue_args(batch, options, suffix)) for part, batch, _, suffix in parts]
        if queue in self._registered and len(calls) == 1:
            answers = [(yield from self._library.call("enqueue", *calls[0]))]
        elif queue in self._registered:
            answers = yield from self._pipelined("enqueue", calls)
        else:
            # The registry lives outside the queue's hash tag, so a function may not
            # touch it; it is written once per process per queue, in the same round trip.
            [_, *answers] = yield from self._pipelined(
                "enqueue", calls, prelude=Command("sadd", (self._registry_key(), queue))
            )
            with self._registered_lock:
                self._registered.add(queue)
        for answer in answers:
            _raise_refusal(queue, answer)
        if count == 1:
            return [_str(i) for i in answers[0]]
        ids: list[str] = [""] * len(messages)
        for (_, _, indexes, _), answer in zip(parts, answers):
            for index, mid in zip(indexes or (), answer):
                ids[index] = _str(mid)
        return ids

    def _enqueue_args(self, messages: Sequence[Message], options: bytes, id_suffix: str) -> list[Any]:
        """The enqueue function's arguments for ``messages``, with new ids ending in ``id_suffix``."""
        prefix, counter = self._id_prefix, self._id_counter
        fields: list[Any] = []
        envelopes: list[bytes] = []
        refs = [None if m.ref is None else _text(m.ref) for m in messages]
        for m in messages:
            key = None if m.key is None else _text(m.key)
            dedup_id = None if m.dedup_id is None else _text(m.dedup_id)
            headers = headers_text(m.headers)
            fields += (
                f"{prefix}{next(counter):x}{id_suffix}", key, m.priority, round(m.delay * 1_000_000) if m.delay else 0,
                dedup_id, m.at_head,
            )
            # The record's first six values (a fixarray's values: its one-byte header cut).
            envelopes.append(_pack((key, m.priority, headers, dedup_id, m.at_head, m.payload))[1:])
        if any(ref is not None for ref in refs):
            fields += refs  # only then: messages without a ref send nothing more
        return [self._clock_arg(), options, _pack(fields), *envelopes]

    def lease(
        self, queue: str, limit: int, per_key: int, visibility_timeout: float, settings: QueueSettings
    ) -> Steps[LeaseResult]:
        """On a queue of several partitions, one lease call per partition in the order of
        the consumer's :class:`_Rotation`, each for what the ones before left of ``limit``,
        until ``limit`` messages are leased or every partition of the turn was asked."""
        args = [self._clock_arg(), self._options_arg(settings), limit, per_key, _us(visibility_timeout)]
        count = self._partition_counts.get(queue) or (yield from self._settle_partitions(queue))
        if count == 1:
            return self._leases(queue, (yield from self._run("lease", queue, args)))
        rotation = self._rotations.get(queue)
        if rotation is None:
            # Processes start at different partitions, so consumers started together
            # spread. With a test clock, time is the test's: every partition is asked
            # every call, from the first, so that a test's order is the same every run.
            testing = self._clock is not None
            rotation = self._rotations.setdefault(
                queue, _Rotation(count, skip_quiet=not testing, start=0 if testing else random.randrange(count))
            )
        now = time.monotonic()
        turn, retry_in = rotation.order(now)
        leases: list[Lease] = []
        for partition in turn:
            args[2] = limit - len(leases)
            result = self._leases(queue, (yield from self._run("lease", f"{queue}#{partition}", args)))
            rotation.answered(partition, bool(result.leases), result.retry_in, now)
            leases += result.leases
            if result.retry_in is not None:
                retry_in = result.retry_in if retry_in is None else min(retry_in, result.retry_in)
            if len(leases) >= limit:
                break
        return LeaseResult(leases, retry_in)

    @staticmethod
    def _leases(queue: str, answer: list[Any]) -> LeaseResult:
        """A lease function's answer read: retry_in, then five values per lease."""
        retry_in = answer[0] / 1e6 if answer[0] != b"" else None
        leases = []
        for i in range(1, len(answer), 5):
            mid, raw, token, deadline, batch_id = answer[i : i + 5]
            key, priority, headers, dedup_id, _, payload, enqueued_at, *rest = _record(raw)
            mid_text = _str(mid)
            leases.append(Lease(
                queue=queue,
                id=mid_text,
                key=_str(key) if key is not None else None,
                payload=payload,
                priority=priority,
                attempts=(rest[2] or 0) + 1 if len(rest) > 2 else 1,
                headers=json.loads(headers),
                token=_str(token),
                deadline=deadline / 1e6,
                enqueued_at=enqueued_at / 1e6,
                batch_id=_str(batch_id) if batch_id else mid_text,
                dedup_id=_str(dedup_id) if dedup_id is not None else None,
                ref=_str(rest[9]) if len(rest) > 9 else None,
            ))
        return LeaseResult(leases, retry_in)

    @staticmethod
    def _lease_args(lease: Lease) -> tuple[Any, ...]:
        """How a function names a lease: id, token, key ('' = unkeyed), batch id."""
        return (lease.id, lease.token, b"" if lease.key is None else _text(lease.key), lease.batch_id)

    def ack_many(self, leases: Sequence[Lease]) -> Steps[list[bool]]:
        observe = self._options_arg(_OBSERVE_ONLY)
        answers = yield from self._per_queue(
            "ack", leases, lambda queue: [self._clock_arg(), observe],
            # Its ref too: ack reads no record, and the ref's entry goes with the message.
            lambda i: (*self._lease_args(leases[i]), _text(leases[i].ref or "")),
        )
        return [bool(answer) for answer in answers]

    def release_many(self, leases: Sequence[Lease]) -> Steps[list[bool]]:
        observe = self._options_arg(_OBSERVE_ONLY)
        answers = yield from self._per_queue(
            "release", leases, lambda queue: [self._clock_arg(), observe], lambda i: self._lease_args(leases[i])
        )
        return [bool(answer) for answer in answers]

    def _per_queue(
        self,
        function: str,
        leases: Sequence[Lease],
        head_args: Callable[[str], list[Any]],
        lease_args: Callable[[int], Sequence[Any]],
    ) -> Steps[list[Any]]:
        """One call of a per-lease function for each queue partition the leases belong to
        (named by their ids: :func:`home_of_id`), all in one round trip; the answers, one
        per lease, in the order of ``leases``. ``lease_args(i)``: the function's arguments
        for ``leases[i]``."""
        by_queue: dict[str, list[int]] = {}
        for index, lease in enumerate(leases):
            by_queue.setdefault(home_of_id(lease.queue, lease.id), []).append(index)
        calls = []
        for queue, indexes in by_queue.items():
            args = head_args(queue)
            for index in indexes:
                args += lease_args(index)
            calls.append((queue, indexes, args))
        if len(calls) == 1:
            answers = [(yield from self._run(function, calls[0][0], calls[0][2]))]
        else:
            answers = yield from self._pipelined(function, [(self.queue_keys(q), args) for q, _, args in calls])
        results: list[Any] = [None] * len(leases)
        for (_, indexes, _), answer in zip(calls, answers):
            for index, value in zip(indexes, answer):
                results[index] = value
        return results

    def _pipelined(
        self, function: str, calls: list[tuple[list[bytes], list[Any]]], prelude: Command | None = None
    ) -> Steps[list[Any]]:
        """Several calls of one function (after an optional plain command) in one round
        trip, loading the library first if the server lacks it."""
        request = Pipeline([FunctionCall(function, keys, args) for keys, args in calls], prelude)
        for attempt in range(2):
            answers = yield request
            if attempt or not any(_missing_function(a) for a in answers):
                break
            # A call refused for a missing function changed nothing (and the prelude is
            # idempotent): load the library and send them all again.
            yield from self._library.load()
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers

    def nack(
        self, lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings
    ) -> Steps[bool]:
        args = [
            self._clock_arg(), self._options_arg(settings), *self._lease_args(lease), _us(delay),
            "1" if dead else "0", "" if reason is None else _text(reason),
        ]
        return bool((yield from self._run("nack", home_of_id(lease.queue, lease.id), args)))

    def extend_many(self, leases: Sequence[Lease], visibility_timeouts: Sequence[float]) -> Steps[list[float | None]]:
        answers = yield from self._per_queue(
            "extend", leases, lambda queue: [self._clock_arg()],
            lambda i: (*self._lease_args(leases[i]), _us(visibility_timeouts[i])),
        )
        return [answer / 1e6 if answer != b"" else None for answer in answers]

    def set_interval(self, queue: str, key: str, seconds: float | None) -> Steps[None]:
        home = yield from self._key_home(queue, key)
        yield from self._run("set_interval", home, [self._clock_arg(), _text(key), "" if seconds is None else _us(seconds)])

    def set_weight(self, queue: str, key: str, weight: int | None) -> Steps[None]:
        home = yield from self._key_home(queue, key)
        yield from self._run("set_weight", home, [self._clock_arg(), _text(key), "" if weight is None else str(weight)])

    def set_paused(self, queue: str, key: str | None, paused: bool) -> Steps[None]:
        flag = "1" if paused else "0"
        if key is not None:
            home = yield from self._key_home(queue, key)
            yield from self._run("set_paused", home, [self._clock_arg(), _text(key), flag])
            return
        count = yield from self.partition_count(queue)
        yield from self._on_every_partition("set_paused", queue, count, [self._clock_arg(), b"", flag])

    def stats(self, queue: str) -> Steps[QueueStats]:
        count = yield from self.partition_count(queue)
        answers = yield from self._on_every_partition("stats", queue, count, [self._clock_arg()])
        ready, leased, delayed, dead, keys = (sum(int(answer[i]) for answer in answers) for i in range(5))
        return QueueStats(
            queue=queue, ready=ready, leased=leased, delayed=delayed, dead=dead, keys=keys,
            oldest_age=max(answer[5] for answer in answers) / 1e6, paused=any(answer[6] for answer in answers),
        )

    def queues(self) -> Steps[list[str]]:
        names = yield Command("smembers", (self._registry_key(),))
        return sorted(_str(name) for name in names)

    def dead_letters(self, queue: str, limit: int, offset: int) -> Steps[list[DeadLetter]]:
        """Oldest death first: over several partitions, the first ``offset + limit`` of
        each, merged by time of death."""
        count = yield from self.partition_count(queue)
        pages = yield from self._on_every_partition(
            "dead_letters", queue, count, [self._clock_arg(), offset if count == 1 else 0, limit if count == 1 else offset + limit]
        )
        letters = []
        for rows in pages:
            for mid, key, payload, priority, attempts, headers, enqueued_at, dedup_id, reason, died_at, ref in rows:
                letters.append(
                    DeadLetter(
                        queue=queue, id=_str(mid), key=_str(key) if key else None, payload=payload,
                        priority=int(priority), attempts=int(attempts), headers=json.loads(headers),
                        reason=_str(reason), enqueued_at=enqueued_at / 1e6, died_at=died_at / 1e6,
                        dedup_id=_str(dedup_id) if dedup_id else None, ref=_str(ref) if ref else None,
                    )
                )
        if count == 1:
            return letters
        letters.sort(key=lambda letter: letter.died_at)  # stable: a partition's own order holds
        return letters[offset : offset + limit]

    def replay(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> Steps[int]:
        """Each partition's dead letters replayed as in one queue (:meth:`_replay_partition`)."""
        count = yield from self.partition_count(queue)
        if count == 1:
            return (yield from self._replay_partition(queue, ids, position))
        if ids is None:
            by_home: dict[str, list[str] | None] = dict.fromkeys(self.partitions(queue, count))
        else:
            by_home = {}
            for mid in ids:
                by_home.setdefault(home_of_id(queue, mid), []).append(mid)  # type: ignore[union-attr]
        moved = 0
        for home, home_ids in by_home.items():
            moved += yield from self._replay_partition(home, home_ids, position)
        return moved

    def _replay_partition(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> Steps[int]:
        """Up to ``CHUNK`` dead letters are replayed in one atomic script call. More are
        replayed in chunks of ``CHUNK``, so Redis serves other clients between them: the
        client first reads where each goes (priority, then seq: the order of a replay done
        at once) and replays them chunk by chunk in that order. Replaying all replays the
        dead letters there when it started, not those that die meanwhile."""
        dead_key = self.queue_keys(queue)[QUEUE_KEYS.index("dead")]
        if ids is None:
            small = (yield Command("zcard", (dead_key,))) <= CHUNK
            if small:
                return int((yield from self._run("replay", queue, [self._clock_arg(), position, "1"])))
            ids = yield from self._all_dead(dead_key)
        ids = list(dict.fromkeys(ids))
        if len(ids) <= CHUNK:
            return int((yield from self._run("replay", queue, [self._clock_arg(), position, "0", *ids])))
        places: list[tuple[int, int, bytes]] = []
        for start in range(0, len(ids), CHUNK):
            rows = yield from self._run(
                "dead_order", queue, [self._clock_arg(), *(_text(i) for i in ids[start : start + CHUNK])]
            )
            places.extend((int(priority), int(seq), mid) for mid, priority, seq in rows)
        places.sort(key=lambda place: place[:2])
        chunks = [places[start : start + CHUNK] for start in range(0, len(places), CHUNK)]
        if position == "head":
            chunks.reverse()  # each chunk takes seqs ahead of the chunk after it
        moved = 0
        for chunk in chunks:
            moved += int((yield from self._run(
                "replay", queue, [self._clock_arg(), position, "0", *(mid for _, _, mid in chunk)]
            )))
        return moved

    def _all_dead(self, dead_key: bytes) -> Steps[list[str]]:
        """The ids of the dead letters there now, in order of death, read page by page."""
        newest = yield Command("zrevrange", (dead_key, 0, 0), {"withscores": True})
        if not newest:
            return []
        last = newest[0][1]
        ids: list[str] = []
        after = "-inf"
        while True:
            page = yield Command(
                "zrangebyscore", (dead_key, after, last), {"start": 0, "num": CHUNK, "withscores": True}
            )
            ids.extend(_str(entry[0]) for entry in page)
            if len(page) < CHUNK:
                return ids
            after = f"({page[-1][1]!r}"

    def purge(self, queue: str, dead: bool) -> Steps[int]:
        """Deletes in chunks of at most ``CHUNK`` messages, one script call each, so Redis
        serves other clients between chunks; each chunk is atomic and leaves the queue
        consistent. It deletes at most as many messages as were there when it started:
        messages enqueued meanwhile may be among them (in place of as many older ones).
        A queue of several partitions is purged one partition after the other."""
        count = yield from self.partition_count(queue)
        deleted = 0
        for part in self.partitions(queue, count):
            budget = None
            while True:
                chunk_deleted, left = yield from self._run(
                    "purge", part, [self._clock_arg(), "1" if dead else "0", "" if budget is None else budget, CHUNK]
                )
                deleted += int(chunk_deleted)
                budget = int(left)
                if budget <= 0 or not chunk_deleted:
                    break
        return deleted

    def cancel(
        self, queue: str, message_id: str | None, settings: QueueSettings, ref: str | None = None
    ) -> Steps[CancelResult]:
        """One call of lua/cancel.lua, on the message's partition (by ref over several:
        the partition where :meth:`get` finds it)."""
        home = yield from self._home_of(queue, message_id, ref)
        if home is None:
            return CancelResult(queue, message_id, False, None, ref=ref)
        count = self._partition_counts[queue]
        state, key, found, found_ref = yield from self._run(
            "cancel", home,
            [self._clock_arg(), self._options_arg(self._per_partition_settings(settings, count)),
             *self._id_or_ref_args(message_id, ref)],
        )
        if not state:
            return CancelResult(queue, message_id, False, None, ref=ref)
        public = PUBLIC_STATES[_str(state)]
        return CancelResult(
            queue, _str(found), public in ("waiting", "delayed"), public, _str(key) if key else None,
            _str(found_ref) if found_ref else None,
        )

    def _home_of(self, queue: str, message_id: str | None, ref: str | None) -> Steps[str | None]:
        """The partition name holding a message named by id or ref (None: found nowhere)."""
        count = yield from self.partition_count(queue)
        if count == 1:
            return queue
        if message_id is not None:
            return home_of_id(queue, message_id)
        info = yield from self.get(queue, None, ref)
        return None if info is None else home_of_id(queue, info.id)

    @staticmethod
    def _id_or_ref_args(message_id: str | None, ref: str | None) -> tuple[bytes, bytes]:
        """How cancel and get name a message: id, ref ('' for the one not given)."""
        return (b"" if message_id is None else _text(message_id), b"" if ref is None else _text(ref))

    def get(self, queue: str, message_id: str | None, ref: str | None = None) -> Steps[MessageInfo | None]:
        """One call of lua/get.lua (by ref over several partitions: one on each, the
        newest message found answering)."""
        args = [self._clock_arg(), *self._id_or_ref_args(message_id, ref)]
        count = yield from self.partition_count(queue)
        if message_id is not None or count == 1:
            home = queue if count == 1 else home_of_id(queue, message_id or "")
            rows = [(yield from self._run("get", home, args))]
        else:
            rows = yield from self._on_every_partition("get", queue, count, args)
        found_rows = [row for row in rows if row]
        if not found_rows:
            return None
        # A ref names the newest message given it (per partition: each keeps its own).
        row = max(found_rows, key=lambda found_row: (int(found_row[4]), _id_counter(_str(found_row[12]))))
        (state, key, priority, attempts, enqueued_at, size, dedup_id, not_before, deadline, leased_at, reason,
         died_at, found, found_ref) = row
        return describe(
            queue, _str(found), _str(key) if key else None, _str(state), priority=int(priority),
            attempts=int(attempts), enqueued_at=enqueued_at / 1e6, size=int(size),
            dedup_id=_str(dedup_id) if dedup_id else None, not_before=not_before / 1e6,
            deadline=None if deadline == b"" else int(deadline) / 1e6,
            leased_at=None if leased_at == b"" else int(leased_at) / 1e6, reason=_str(reason), died_at=died_at / 1e6,
            ref=_str(found_ref) if found_ref else None,
        )

    def bind(self, exchange: str, queue: str) -> Steps[None]:
        yield from self._library.call("bind", [self._bindings_key(exchange)], [queue])

    def unbind(self, exchange: str, queue: str) -> Steps[None]:
        yield from self._library.call("unbind", [self._bindings_key(exchange)], [queue])

    def bound_queues(self, exchange: str) -> Steps[list[str]]:
        names = yield Command("smembers", (self._bindings_key(exchange),))
        return sorted(_str(name) for name in names)

    def metrics(self, queue: str, minutes: int, key: str | None) -> Steps[list[MinuteMetrics]]:
        """A key's from its partition; the queue's summed over its partitions, minute by minute."""
        key_arg = b"" if key is None else b"+" + _text(key)
        kept = self._kept_minutes if key is None else self._key_kept_minutes
        args = [self._clock_arg(), kept, minutes, key_arg]
        if key is not None:
            answers = [(yield from self._run("metrics", (yield from self._key_home(queue, key)), args))]
        else:
            count = yield from self.partition_count(queue)
            answers = yield from self._on_every_partition("metrics", queue, count, args)
        width = len(COUNTERS)
        by_minute: dict[float, list[int]] = {}
        for answer in answers:
            first, values = float(answer[0]), [int(v) for v in answer[1:]]
            for i in range(len(values) // width):
                counts = values[i * width : (i + 1) * width]
                summed = by_minute.setdefault(first + 60 * i, [0] * width)
                for c in range(width):
                    summed[c] += counts[c]
        minutes_seen = sorted(by_minute)
        if len(answers) > 1:
            # The partitions' servers may be in different minutes: the last ``minutes`` of them.
            minutes_seen = minutes_seen[len(minutes_seen) - minutes:] if minutes else []
        return [MinuteMetrics(at, *by_minute[at]) for at in minutes_seen]

    def keys(self, queue: str, limit: int, sort: KeySort) -> Steps[list[KeyInfo]]:
        """Over several partitions: each one's ``limit`` largest backlogs merged, or every
        key's head time read from each, then the ``limit`` longest waits read in full."""
        count = yield from self.partition_count(queue)
        if sort == "backlog":
            pages = yield from self._on_every_partition("keys", queue, count, [self._clock_arg(), "backlog", limit])
            now = yield from self.now()
            views = [self._key_view(queue, row, now) for rows in pages for row in rows]
            return sorted(views, key=lambda view: (-view.backlog, view.key))[:limit]
        heads = yield from self._on_every_partition("keys", queue, count, [self._clock_arg(), "lag"])
        now = yield from self.now()
        lags = sorted(
            ((-(max(0.0, now - t / 1e6) if t != b"" else 0.0), _str(key)) for rows in heads for key, t in rows)
        )[:limit]
        if not lags:
            return []
        infos = yield from self._key_rows(queue, "keys", "info", [key for _, key in lags])
        return [self._key_view(queue, row, now) for _, row in infos]

    def _key_rows(
        self, queue: str, function: str, mode: str, keys: Sequence[str], skip: int = 0
    ) -> Steps[list[tuple[list[Any], Any]]]:
        """Per key, in the order of ``keys``: the first ``skip`` values of the answer of
        ``function`` called with ``mode`` and the keys of its partition, and the key's row
        of that answer; one call on each partition holding some, in one round trip."""
        count = yield from self.partition_count(queue)
        by_partition: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            by_partition.setdefault(0 if count == 1 else partition_of(key, count), []).append(index)
        calls = [
            (self.queue_keys(partition_name(queue, p, count)), [self._clock_arg(), mode, *(_text(keys[i]) for i in indexes)])
            for p, indexes in by_partition.items()
        ]
        answers = yield from self._calls(function, calls)
        rows: list[tuple[list[Any], Any]] = [([], None)] * len(keys)
        for indexes, answer in zip(by_partition.values(), answers):
            head = list(answer[:skip])
            for index, row in zip(indexes, answer[skip:]):
                rows[index] = (head, row)
        return rows

    def key_info(self, queue: str, key: str) -> Steps[KeyInfo]:
        home = yield from self._key_home(queue, key)
        [row] = yield from self._run("keys", home, [self._clock_arg(), "info", _text(key)])
        return self._key_view(queue, row, (yield from self.now()))

    @staticmethod
    def _key_view(queue: str, row: list[Any], now: float) -> KeyInfo:
        key, backlog, slots, paused, interval, head_row, weight = row
        head = None
        if head_row:
            mid, priority, attempts, enqueued_at, not_before, size = head_row
            head = HeadMessage(_str(mid), int(priority), int(attempts), enqueued_at / 1e6, not_before / 1e6, int(size))
        return KeyInfo(
            queue=queue,
            key=_str(key),
            backlog=int(backlog),
            leased=int(slots),
            lag=max(0.0, now - head.enqueued_at) if head is not None else 0.0,
            paused=bool(paused),
            interval=int(interval) / 1e6 if interval else None,
            head=head,
            weight=int(weight) if weight else 1,
        )

    def key_facts(self, queue: str, keys: Sequence[str]) -> Steps[list[KeyFacts]]:
        """One call of the ``why`` function for all ``keys`` (lua/why.lua) of each partition."""
        rows = yield from self._key_rows(queue, "why", "facts", keys, skip=2)
        facts = []
        for (now_us, queue_paused), (
            key, paused, backlog, slots, ready_at, last_delivery, interval, head_row, next_delayed, holds, weight,
        ) in rows:
            head = None
            if head_row:
                mid, priority, attempts, enqueued_at, not_before, size = head_row
                head = HeadMessage(_str(mid), int(priority), int(attempts), enqueued_at / 1e6, not_before / 1e6, int(size))
            facts.append(KeyFacts(
                queue=queue,
                key=_str(key),
                now=now_us / 1e6,
                queue_paused=bool(queue_paused),
                key_paused=bool(paused),
                backlog=int(backlog),
                slots=int(slots),
                head=head,
                next_delayed=None if next_delayed == b"" else int(next_delayed) / 1e6,
                ready_at=None if ready_at == b"" else int(ready_at) / 1e6,
                last_delivery=None if last_delivery == b"" else int(last_delivery) / 1e6,
                own_interval=None if interval == b"" else int(interval) / 1e6,
                weight=int(weight) if weight else 1,
                holds=tuple(sorted(
                    (
                        HeldBatch(
                            batch_id=_str(batch_id), message_id=_str(mid), token=_str(token), attempts=int(attempts),
                            deadline=int(deadline) / 1e6, size=int(size), settled=int(settled),
                            leased_at=int(leased_at) / 1e6,
                        )
                        for batch_id, mid, token, attempts, deadline, size, settled, leased_at in holds
                    ),
                    key=lambda hold: (hold.deadline, hold.message_id),
                )),
            ))
        return facts

    def head_times(self, queue: str, keys: Sequence[str]) -> Steps[tuple[float, list[float | None]]]:
        if not keys:
            return (yield from self.now()), []
        rows = yield from self._key_rows(queue, "why", "heads", keys, skip=1)
        now_us = min(head[0] for head, _ in rows)
        return now_us / 1e6, [None if t == b"" else int(t) / 1e6 for _, t in rows]

    def backlog_keys(self, queue: str, offset: int, count: int) -> Steps[list[str]]:
        """Over several partitions: each one's first ``offset + count`` merged (a
        partition holds about 1/P of the keys, so a page reads about every key at most)."""
        partitions = yield from self.partition_count(queue)
        index = QUEUE_KEYS.index("backlog")
        if partitions == 1:
            keys = yield Command("zrange", (self.queue_keys(queue)[index], offset, offset + count - 1))
            return [_str(key) for key in keys]
        ranked: list[tuple[float, bytes]] = []
        for part in self.partitions(queue, partitions):
            page = yield Command("zrange", (self.queue_keys(part)[index], 0, offset + count - 1), {"withscores": True})
            ranked.extend((score, key) for key, score in page)
        ranked.sort()
        return [_str(key) for _, key in ranked[offset : offset + count]]

    def wait_any(self, queues: Sequence[str], timeout: float) -> Steps[None]:
        """One wait on the signal lists of every partition of ``queues``; the partitions a
        token came from are asked first by this consumer's next lease call (_Rotation)."""
        if timeout <= 0 or not queues:
            return
        signal = QUEUE_KEYS.index("signal")
        signal_keys = []
        for queue in queues:
            count = yield from self.partition_count(queue)
            for p, part in enumerate(self.partitions(queue, count)):
                key = self.queue_keys(part)[signal]
                signal_keys.append(key)
                if count > 1:
                    self._signal_owners[key] = (queue, p)
        taken = yield WaitSignals(signal_keys, min(timeout, MAX_BLOCK))
        for key in taken or ():
            owner = self._signal_owners.get(key)
            rotation = None if owner is None else self._rotations.get(owner[0])
            if rotation is not None:
                rotation.hinted.add(owner[1])  # type: ignore[index]

    # -- schedules (lua/_schedules.lua and schedule_*.lua) ---------------------------------

    def _schedule_keys(self, queue: str) -> list[bytes]:
        """The keys of a schedule function: the queue's, then SCHEDULE_KEYS."""
        return [*self.queue_keys(queue), *(_text(f"{self.prefix}:{{{queue}}}:{name}") for name in SCHEDULE_KEYS)]

    def _run_schedule(self, function: str, queue: str, args: Sequence[Any]) -> Steps[Any]:
        return self._library.call(function, self._schedule_keys(queue), args)

    # A schedule lives in the partition of its key (the messages it fires go there), or of
    # its name when it has no key; reads and changes by name alone ask every partition.
    # The partitions holding some are listed in a set beside the partition count
    # (<prefix>:{<queue>}:scheduled), so that the consumers' look for due schedules, every
    # second, asks only those: none for a queue without schedules.

    def _scheduled_key(self, queue: str) -> str:
        return f"{self.prefix}:{{{queue}}}:scheduled"

    def _scheduled_partitions(self, queue: str, count: int) -> Steps[list[str]]:
        """The partitions that may hold a schedule (all of a one-partition queue)."""
        if count == 1:
            return [queue]
        members = yield Command("smembers", (self._scheduled_key(queue),))
        return [f"{queue}#{p}" for p in sorted(int(m) for m in members) if p < count]

    def _forget_unscheduled(self, queue: str, parts: Sequence[str]) -> Steps[None]:
        """Drop from the set the partitions of ``parts`` left without a schedule."""
        listed = yield from self._pipelined("schedule_list", [(self._schedule_keys(part), [self._clock_arg()]) for part in parts])
        empty = [part.rpartition("#")[2] for part, flat in zip(parts, listed) if not flat]
        if empty:
            yield Command("srem", (self._scheduled_key(queue), *empty))

    def _schedule_home(self, queue: str, name: str, key: str | None) -> Steps[tuple[str, int, str]]:
        """The partition name of a schedule, the queue's partition count, and the ending of
        the ids of the messages it fires."""
        count = yield from self.partition_count(queue)
        if count == 1:
            return queue, 1, ""
        partition = partition_of(name if key is None else key, count)
        return f"{queue}#{partition}", count, f"-{partition}"

    def put_schedule(self, queue: str, schedule: Schedule) -> Steps[Schedule]:
        packed = _pack({
            "pl": schedule.payload, "k": None if schedule.key is None else _text(schedule.key), "p": schedule.priority,
            "h": compact_json(schedule.headers),
            "ev": None if schedule.every is None else round(schedule.every * 1_000_000),
            "cr": schedule.cron, "nd": round(schedule.next_due * 1_000_000),
        })
        home, count, _ = yield from self._schedule_home(queue, schedule.name, schedule.key)
        name = _text(schedule.name)
        if count > 1:
            # Put again with another key, it moves partition: it is replaced where it is
            # (keeping what a replaced schedule keeps), copied as stored to its new
            # partition, then removed from the old one.
            others = [part for part in self.partitions(queue, count) if part != home]
            listed = yield from self._pipelined(
                "schedule_list", [(self._schedule_keys(part), [self._clock_arg()]) for part in others]
            )
            old_home = next((part for part, flat in zip(others, listed) if name in flat[::2]), None)
            if old_home is not None:
                packed = yield from self._run_schedule("schedule_put", old_home, [self._clock_arg(), name, packed])
            [_, stored] = yield from self._pipelined(
                "schedule_put", [(self._schedule_keys(home), [self._clock_arg(), name, packed])],
                prelude=Command("sadd", (self._scheduled_key(queue), home.rpartition("#")[2])),
            )
            if old_home is not None:
                yield from self._run_schedule("schedule_remove", old_home, [self._clock_arg(), name])
                yield from self._forget_unscheduled(queue, [old_home])
            return _schedule(queue, name, stored)
        stored = yield from self._run_schedule("schedule_put", home, [self._clock_arg(), name, packed])
        return _schedule(queue, name, stored)

    def _every_schedule_partition(self, function: str, queue: str, args: Sequence[Any]) -> Steps[list[Any]]:
        count = yield from self.partition_count(queue)
        return (yield from self._on_every_partition(function, queue, count, args, keys=self._schedule_keys))

    def schedules(self, queue: str) -> Steps[list[Schedule]]:
        found: list[Schedule] = []
        for flat in (yield from self._every_schedule_partition("schedule_list", queue, [self._clock_arg()])):
            found.extend(_schedule(queue, flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        return sorted(found, key=lambda schedule: schedule.name)

    def due_schedules(self, queue: str, limit: int) -> Steps[tuple[float, list[Schedule]]]:
        count = yield from self.partition_count(queue)
        parts = yield from self._scheduled_partitions(queue, count)
        if not parts:
            return (yield from self.now()), []
        args = [self._clock_arg(), limit]
        answers = yield from self._calls("schedule_due", [(self._schedule_keys(part), args) for part in parts])
        due: list[Schedule] = []
        for _, *flat in answers:
            due.extend(_schedule(queue, flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        if len(answers) > 1:
            due = sorted(due, key=lambda schedule: (schedule.next_due, schedule.name))[:limit]
        return min(answer[0] for answer in answers) / 1e6, due

    def fire_schedule(
        self, queue: str, name: str, expected_due: float, next_due: float, message: Message, settings: QueueSettings
    ) -> Steps[str | None]:
        home, count, id_suffix = yield from self._schedule_home(queue, name, message.key)
        key = None if message.key is None else _text(message.key)
        headers = headers_text(message.headers)
        envelope = _pack((key, message.priority, headers, None, False, message.payload))[1:]
        mid = f"{self._id_prefix}{next(self._id_counter):x}{id_suffix}"
        args = [
            self._clock_arg(), self._options_arg(self._per_partition_settings(settings, count)), _text(name),
            _us(expected_due), _us(next_due), mid, b"" if key is None else key, message.priority, envelope,
        ]
        if queue in self._registered:
            answer = yield from self._run_schedule("schedule_fire", home, args)
        else:
            # queues() lists it once it holds a message: the registry is outside the
            # queue's hash tag (see enqueue_many), written in the same round trip.
            [_, answer] = yield from self._pipelined(
                "schedule_fire", [(self._schedule_keys(home), args)], prelude=Command("sadd", (self._registry_key(), queue))
            )
            with self._registered_lock:
                self._registered.add(queue)
        _raise_refusal(queue, answer)
        return None if answer is None else _str(answer)

    def set_schedule_paused(self, queue: str, name: str, paused: bool, next_due: float | None) -> Steps[bool]:
        return any((yield from self._every_schedule_partition("schedule_set_paused", queue, [
            self._clock_arg(), _text(name), "1" if paused else "0", "" if next_due is None else _us(next_due),
        ])))

    def remove_schedule(self, queue: str, name: str) -> Steps[bool]:
        count = yield from self.partition_count(queue)
        removed = yield from self._on_every_partition(
            "schedule_remove", queue, count, [self._clock_arg(), _text(name)], keys=self._schedule_keys
        )
        if count > 1 and any(removed):
            yield from self._forget_unscheduled(
                queue, [part for part, gone in zip(self.partitions(queue, count), removed) if gone]
            )
        return any(removed)

    # -- events: the subscription itself is the executor's ------------------------------

    def events_channels(self, queue: str) -> Steps[list[bytes]]:
        """The pub/sub channels of ``queue``'s events, one per partition (ConfigurationError
        when they are off)."""
        if not self.events:
            raise ConfigurationError("events are off for this broker; connect with events=True to subscribe")
        count = yield from self.partition_count(queue)
        return [self.queue_keys(part)[QUEUE_KEYS.index("events")] for part in self.partitions(queue, count)]

    @staticmethod
    def parse_events(queue: str, data: bytes) -> list[Event]:
        """The events of one published message (every event of one function call)."""
        events = []
        for line in data.split(b"\n"):
            kind, mid, key, at = line.split(b"\0")
            events.append(Event(_str(kind), queue, _str(mid), _str(key[1:]) if key else None, int(at) / 1e6))  # type: ignore[arg-type]
        return events


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class PackedCalls:
    """FCALL commands as RESP bytes, packed here instead of by redis-py's command packer.

    redis-py packs every argument of every command anew (type checks, encoding, a length
    header each): for an FCALL with a queue's 16 key names that was more client time than
    the round trip itself. The part that never changes, ``FCALL <function> <numkeys>
    <keys...>``, is packed once per function and queue; only the arguments are packed per
    call (bytes and text as they are, anything else through the client's encoder).
    """

    def __init__(self, functions: Mapping[str, str], encoder: Any) -> None:
        self._functions = functions
        self._encoder = encoder
        self._heads: dict[tuple[str, bytes, int], bytes] = {}

    def pack(self, call: FunctionCall) -> bytes:
        keys = call.keys
        # A call's keys are those of one queue (or exchange), named by their first.
        cached = (call.function, keys[0] if keys else b"", len(keys))
        head = self._heads.get(cached)
        if head is None:
            head = self._heads[cached] = b"".join((
                _bulk(b"FCALL"), _bulk(self._functions[call.function].encode()), _bulk(b"%d" % len(keys)),
                *map(_bulk, keys),
            ))
        parts = [b"*%d\r\n" % (3 + len(keys) + len(call.args)), head]
        for arg in call.args:
            if type(arg) is str:
                arg = arg.encode()
            elif type(arg) is not bytes:
                arg = self._encoder.encode(arg)
            parts.append(b"$%d\r\n" % len(arg))
            parts.append(arg)
            parts.append(b"\r\n")
        return b"".join(parts)


def kept_connection(pool: Any, idle: list[Any]) -> Any:
    """A connection of ``pool`` for one FCALL: one kept in ``idle`` from an earlier call,
    checked as redis-py's pool checks the connections it lends (one that has data to read
    or a closed socket goes back to the pool, which reconnects it), else one from the pool.

    Kept rather than returned: the pool's bookkeeping per loan (its lock, fork check and
    connection-count metrics, twice) took about 7 µs of every call, a tenth of a
    one-message enqueue's client time. A list's pop and append are atomic: threads never
    share a connection.
    """
    try:
        conn = idle.pop()
    except IndexError:
        return pool.get_connection()
    try:
        dirty = conn.can_read()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        dirty = True
    if not dirty:
        return conn
    pool.release(conn)
    return pool.get_connection()


Executor = TypeVar("Executor", bound="RedisExecutor")


class RedisExecutor:
    """What the two executors of :class:`RedisOperations` (:class:`RedisBackend` and
    ``redis_asyncio.AsyncRedisBackend``) set up alike from a URL and the options of
    :class:`RedisBackend`: the operations, redis-py clients of ``client_module`` (``redis``
    or ``redis.asyncio``) and the packer of their FCALLs. ``url`` keeps no password (it
    stays with redis-py only)."""

    client_module: Any
    # Events on shard channels (SSUBSCRIBE, SPUBLISH), as a cluster executor wants them.
    shard_channels = False
    # The partitions of a queue first used without the partitions option: one server runs
    # every partition on one core, so more would only cost calls; a cluster spreads them.
    default_partitions = 1

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sb",
        clock: Callable[[], float] | None = None,
        metrics_window: float = DEFAULT_METRICS_WINDOW,
        key_metrics_window: float | None = None,
        events: bool = True,
        wait_replicas: int | None = None,
        wait_timeout: float | None = None,
        partitions: int | None = None,
        **redis_options: Any,
    ) -> None:
        self.url = self._safe_url = redact_url(url)
        # wait_replicas: the WAIT after each writing call (None: no WAIT).
        self._replica_wait = replica_wait(wait_replicas, wait_timeout)
        self._ops = RedisOperations(
            prefix=prefix, clock=clock, metrics_window=metrics_window, key_metrics_window=key_metrics_window,
            events=events, shard_channels=self.shard_channels, partitions=partitions,
            default_partitions=self.default_partitions,
        )
        self.prefix = prefix
        self._client, self._blocking_client = self._clients(url, redis_options)
        self._functions = _LIBRARY.functions
        self._packed = PackedCalls(self._functions, self._client.get_encoder())

    def _clients(self, url: str, redis_options: Mapping[str, Any]) -> tuple[Any, Any]:
        """The client for requests and the one for blocking waits (a cluster executor's differ)."""
        return clients(self.client_module, url, redis_options, self._safe_url)

    @classmethod
    def from_url(cls: type[Executor], url: str, **options: Any) -> Executor:
        checked_options(url, options)
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._safe_url} prefix={self.prefix!r}>"


class RedisBackend(RedisExecutor, Backend):
    """Queues in a Redis server (7.0 or later), shared by every process that uses it.

    ``prefix`` (default ``"sb"``) starts every key name; two prefixes on one server are
    fully isolated. ``clock`` replaces the server's clock (tests only). ``metrics_window``
    (seconds, default 3600) bounds the per-minute metrics kept, and ``key_metrics_window``
    (seconds, default ``metrics_window``, never longer) those of each key; ``events`` (default True)
    publishes lifecycle events. Any other option is a redis-py connection option
    (``socket_timeout``, ``ssl_ca_certs``, ...).

    Runs the steps of :class:`RedisOperations` on redis-py's blocking client.
    """

    client_module = redis

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        # Connections kept between FCALLs (see _idle_connection), in the process that took them.
        self._idle: list[Any] = []
        _PER_PROCESS.add(self)

    def _after_fork_in_child(self) -> None:
        """The kept connections are the parent's sockets: dropped, never used (the pool
        resets itself in the child on its next loan)."""
        self._idle = []

    # -- the executor -------------------------------------------------------------------

    def _drive(self, steps: Steps[T]) -> T:
        """Run an operation's steps: send each request, hand back its reply (or throw its
        error in), until the operation answers."""
        # A try, not translated_errors(): that context manager costs a generator per
        # operation, about a microsecond of every enqueue, lease and ack.
        try:
            request = next(steps)
            while True:
                try:
                    reply = self._send(request)
                except redis.exceptions.RedisError as exc:
                    request = steps.throw(exc)
                else:
                    request = steps.send(reply)
        except StopIteration as done:
            return done.value
        except redis.exceptions.RedisError as exc:
            raise translated(exc, self._safe_url) from None

    def _send(self, request: Request) -> Any:
        if type(request) is FunctionCall:
            wait = self._replica_wait
            if wait is not None and wait.after(request.function):
                return self._fcall(self._packed.pack(request), wait)
            return self._fcall(self._packed.pack(request))
        if type(request) is WaitSignals:
            return signalled(self._blocking_client.blpop(request.keys, timeout=blpop_timeout(request.timeout)))
        if type(request) is Command:
            self._return_idle_connections()
            return getattr(self._client, request.method)(*request.args, **request.kwargs)
        assert type(request) is Pipeline
        self._return_idle_connections()
        pipe = self._client.pipeline(transaction=False)
        if request.prelude is not None:
            getattr(pipe, request.prelude.method)(*request.prelude.args, **request.prelude.kwargs)
        for call in request.calls:
            pipe.fcall(self._functions[call.function], len(call.keys), *call.keys, *call.args)
        wait = pipelined_wait(self._replica_wait, request)
        if wait is None:
            return pipe.execute(raise_on_error=False)
        pipe.wait(wait.replicas, wait.millis)
        *replies, acknowledged = pipe.execute(raise_on_error=False)
        try:
            wait.check(acknowledged, self._safe_url)
        except ReplicasShort:
            self._reconnect()
            raise
        return replies

    def _fcall(self, command: bytes, wait: ReplicaWait | None = None) -> Any:
        """Send one packed FCALL and read its reply as redis-py's execute_command does: a
        pooled connection, the client's retry policy (each failed attempt disconnects), the
        server's error reply raised as ResponseError. With ``wait``, its WAIT goes in the
        same write and its answer is read and checked after the call's. A connection that
        served a call whole stays with this backend for its next FCALL
        (:meth:`_idle_connection`); one that failed goes back to the pool, which checks it
        before lending it again."""
        conn = self._idle_connection()

        def attempt() -> Any:
            if wait is None:
                conn.send_packed_command([command])
                return conn.read_response()
            conn.send_packed_command([command, wait.command])
            return replied_after_wait(conn.read_response, wait, self._safe_url)

        try:
            reply = conn.retry.call_with_retry(attempt, lambda error: conn.disconnect())
        except ReplicasShort:
            self._client.connection_pool.release(conn)
            self._reconnect()
            raise
        except BaseException:
            self._client.connection_pool.release(conn)
            raise
        self._idle.append(conn)
        return reply

    def _reconnect(self) -> None:
        """Drop the idle connections, so that each reconnects on its next use: after a
        write short of replicas the server may be a primary that Sentinel just replaced
        (it keeps taking writes until Sentinel demotes it, and has no replica left), and a
        reconnecting Sentinel connection asks the Sentinels where the primary is now."""
        self._return_idle_connections()
        self._client.connection_pool.disconnect(inuse_connections=False)

    def _idle_connection(self) -> Any:
        """A connection for one FCALL (:func:`kept_connection`). Kept connections stay
        lent in the pool's accounting; they go back before any other command
        (:meth:`_return_idle_connections`), so redis-py's own calls find the pool as they
        would without them, and a forked child drops them (:meth:`_after_fork_in_child`)."""
        return kept_connection(self._client.connection_pool, self._idle)

    def _return_idle_connections(self) -> None:
        """Give the kept FCALL connections back to the pool (for redis-py's own commands)."""
        pool = self._client.connection_pool
        while self._idle:
            try:
                conn = self._idle.pop()
            except IndexError:  # another thread took the last one
                break
            pool.release(conn)

    def _keys(self, queue: str) -> list[bytes]:
        """The key names of ``queue``, in the order of ``QUEUE_KEYS``."""
        return self._ops.queue_keys(queue)

    # -- the contract -------------------------------------------------------------------

    def now(self) -> float:
        return self._drive(self._ops.now())

    def enqueue_many(self, queue: str, messages: Sequence[Message], settings: QueueSettings) -> list[str]:
        return self._drive(self._ops.enqueue_many(queue, messages, settings))

    def lease(
        self, queue: str, limit: int, per_key: int, visibility_timeout: float, settings: QueueSettings
    ) -> LeaseResult:
        return self._drive(self._ops.lease(queue, limit, per_key, visibility_timeout, settings))

    def ack_many(self, leases: Sequence[Lease]) -> list[bool]:
        return self._drive(self._ops.ack_many(leases))

    def release_many(self, leases: Sequence[Lease]) -> list[bool]:
        return self._drive(self._ops.release_many(leases))

    def nack(
        self, lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings
    ) -> bool:
        return self._drive(self._ops.nack(lease, delay=delay, dead=dead, reason=reason, settings=settings))

    def extend(self, lease: Lease, visibility_timeout: float) -> float | None:
        return self.extend_many([lease], [visibility_timeout])[0]

    def extend_many(self, leases: Sequence[Lease], visibility_timeouts: Sequence[float]) -> list[float | None]:
        return self._drive(self._ops.extend_many(leases, visibility_timeouts))

    def set_interval(self, queue: str, key: str, seconds: float | None) -> None:
        self._drive(self._ops.set_interval(queue, key, seconds))

    def set_weight(self, queue: str, key: str, weight: int | None) -> None:
        self._drive(self._ops.set_weight(queue, key, weight))

    def set_paused(self, queue: str, key: str | None, paused: bool) -> None:
        self._drive(self._ops.set_paused(queue, key, paused))

    def stats(self, queue: str) -> QueueStats:
        return self._drive(self._ops.stats(queue))

    def queues(self) -> list[str]:
        return self._drive(self._ops.queues())

    def dead_letters(self, queue: str, limit: int, offset: int) -> list[DeadLetter]:
        return self._drive(self._ops.dead_letters(queue, limit, offset))

    def replay(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> int:
        return self._drive(self._ops.replay(queue, ids, position))

    def purge(self, queue: str, dead: bool) -> int:
        return self._drive(self._ops.purge(queue, dead))

    def cancel(
        self, queue: str, message_id: str | None, settings: QueueSettings, ref: str | None = None
    ) -> CancelResult:
        return self._drive(self._ops.cancel(queue, message_id, settings, ref))

    def get(self, queue: str, message_id: str | None, ref: str | None = None) -> MessageInfo | None:
        return self._drive(self._ops.get(queue, message_id, ref))

    def bind(self, exchange: str, queue: str) -> None:
        self._drive(self._ops.bind(exchange, queue))

    def unbind(self, exchange: str, queue: str) -> None:
        self._drive(self._ops.unbind(exchange, queue))

    def bound_queues(self, exchange: str) -> list[str]:
        return self._drive(self._ops.bound_queues(exchange))

    def metrics(self, queue: str, minutes: int, key: str | None) -> list[MinuteMetrics]:
        return self._drive(self._ops.metrics(queue, minutes, key))

    def keys(self, queue: str, limit: int, sort: KeySort) -> list[KeyInfo]:
        return self._drive(self._ops.keys(queue, limit, sort))

    def key_info(self, queue: str, key: str) -> KeyInfo:
        return self._drive(self._ops.key_info(queue, key))

    def key_facts(self, queue: str, keys: Sequence[str]) -> list[KeyFacts]:
        return self._drive(self._ops.key_facts(queue, keys))

    def head_times(self, queue: str, keys: Sequence[str]) -> tuple[float, list[float | None]]:
        return self._drive(self._ops.head_times(queue, keys))

    def backlog_keys(self, queue: str, offset: int, count: int) -> list[str]:
        return self._drive(self._ops.backlog_keys(queue, offset, count))

    def put_schedule(self, queue: str, schedule: Schedule) -> Schedule:
        return self._drive(self._ops.put_schedule(queue, schedule))

    def schedules(self, queue: str) -> list[Schedule]:
        return self._drive(self._ops.schedules(queue))

    def due_schedules(self, queue: str, limit: int) -> tuple[float, list[Schedule]]:
        return self._drive(self._ops.due_schedules(queue, limit))

    def fire_schedule(
        self, queue: str, name: str, expected_due: float, next_due: float, message: Message, settings: QueueSettings
    ) -> str | None:
        return self._drive(self._ops.fire_schedule(queue, name, expected_due, next_due, message, settings))

    def set_schedule_paused(self, queue: str, name: str, paused: bool, next_due: float | None) -> bool:
        return self._drive(self._ops.set_schedule_paused(queue, name, paused, next_due))

    def remove_schedule(self, queue: str, name: str) -> bool:
        return self._drive(self._ops.remove_schedule(queue, name))

    def subscribe(self, queue: str) -> EventSubscription:
        channels = self._drive(self._ops.events_channels(queue))
        with translated_errors(self._safe_url):
            pubsub = self._blocking_client.pubsub()
            pubsub.subscribe(*channels)
            # Wait for the server's confirmations: events published from now on are received.
            deadline = time.monotonic() + MAX_BLOCK + 5.0
            for _ in channels:
                confirmation = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if confirmation is None or confirmation["type"] != "subscribe":
                    pubsub.close()
                    raise BackendUnavailable(f"redis at {self._safe_url} did not confirm the events subscription")
        return _RedisSubscription(self, queue, pubsub)

    # A BLPOP timeout ends at the server's next cron tick (hz 10 by default).
    wait_resolution = 0.1

    def wait(self, queue: str, timeout: float) -> None:
        self.wait_any([queue], timeout)

    def wait_any(self, queues: Sequence[str], timeout: float) -> None:
        self._drive(self._ops.wait_any(queues, timeout))

    def close(self) -> None:
        self._return_idle_connections()
        self._client.close()
        self._blocking_client.close()
        self._client.connection_pool.disconnect()
        self._blocking_client.connection_pool.disconnect()
        manager = sentinel_manager(self._client)
        if manager is not None:
            manager.close()


def _schedule(queue: str, name: bytes, raw: bytes) -> Schedule:
    """A schedule as lua/_schedules.lua stores it."""
    fields = {k.decode(): v for k, v in msgpack.unpackb(raw, raw=True).items()}
    key, every, cron, last_fired = fields.get("k"), fields.get("ev"), fields.get("cr"), fields.get("lf")
    return Schedule(
        queue=queue, name=_str(name), payload=fields["pl"], key=None if key is None else _str(key),
        priority=int(fields["p"]), headers=json.loads(fields["h"]), every=None if every is None else every / 1e6,
        cron=None if cron is None else _str(cron), next_due=fields["nd"] / 1e6, paused=bool(fields.get("pa")),
        last_fired=None if last_fired is None else last_fired / 1e6, fired=int(fields.get("n") or 0),
    )


class _RedisSubscription(EventSubscription):
    """A pub/sub connection on a queue's events channel."""

    def __init__(self, backend: RedisBackend, queue: str, pubsub: Any) -> None:
        self._backend = backend
        self._queue = queue
        self._pubsub = pubsub

    def get(self, timeout: float) -> list[Event]:
        events: list[Event] = []
        with translated_errors(self._backend._safe_url):
            message = self._pubsub.get_message(timeout=timeout)
            while message is not None:
                if message["type"] == "message":
                    events.extend(RedisOperations.parse_events(self._queue, message["data"]))
                message = self._pubsub.get_message(timeout=0)
        return events

    def close(self) -> None:
        self._pubsub.close()
