"""A kombu transport over the sharded-broker engine: per-key FIFO for Celery apps.

An existing Celery app switches by its broker URL alone::

    app.conf.broker_url = "sharded+redis://localhost:6379/0"   # or sharded+rediss://...,
                                                               # sharded+sqlite:///q.db,
                                                               # sharded+memory://

kombu splits ``sharded+`` off the URL and hands the rest (the *engine URL*) to this
transport. Publishing enqueues, consuming leases, ``basic_ack`` acks, reject/requeue
nacks; the engine decides order, fairness, intervals, leases and dead letters.

Guarantees
    * **Per-key FIFO.** Messages of one (queue, shard key) run one at a time, in publish
      order (then by priority). Unkeyed messages run in parallel as before.
    * **Where the key comes from**, first match wins: ``apply_async(shard_key=...)``
      (moved into the message *headers*, so ``task.retry`` keeps it); the task option
      ``@app.task(shard_key="arg_name")`` or ``shard_key=callable(args, kwargs)``; the
      transport option ``shard_keys={"task.name": "arg_name" or callable}``. A key must be
      a ``str`` or an ``int``: anything else is refused at publish time and nothing is
      queued.
    * **Order with Celery's defaults.** A key is released only when its message is acked.
      In a process that uses this transport, every task of the app acknowledges late
      (``acks_late=True``), whatever the ``task_acks_late`` setting says, so the next
      message of a key starts only after the previous task finished, whatever the pool.
    * **Leases.** A delivered message is leased for ``visibility_timeout`` seconds
      (default 30). A heartbeat thread in the consuming process extends the leases of
      every delivered, unsettled message every ``visibility_timeout / 3`` seconds, so a
      task that runs for hours is never delivered twice, while the messages of a worker
      killed with SIGKILL come back, at the head of their keys, about one timeout later.
    * **Delays stay in the broker.** ``countdown``/``eta`` become engine delays: the
      message is invisible until due and does not hold its key meanwhile. A retry
      (``task.retry(countdown=...)``) goes back to the *head* of its key and holds the key
      until it runs.
    * **Priority** follows Celery's Redis convention: 0 (the default) runs first, 9 last,
      within a key and within the unkeyed lane.
    * **Fanout and topic exchanges** (remote control, ``celery inspect``, events) route
      through bindings stored in the engine, shared by every process; broadcast messages
      are unkeyed.

``driver_type`` is ``"sharded"``: Celery enables mingle and gossip only for "amqp" and
"redis", so workers start without the mingle round trip and send no gossip, and
``worker_disable_prefetch`` (Redis only) is ignored; prefetching is harmless here because
a prefetched keyed message already holds its key.
"""

from __future__ import annotations

import inspect
import logging
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from queue import Empty
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from kombu.serialization import loads as deserialize
from kombu.transport import virtual
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads
from kombu.utils.uuid import uuid

import sharded_broker
from sharded_broker import validation as check
from sharded_broker.broker import relative_path_warning
from sharded_broker.errors import BackendUnavailable, ConfigurationError, InvalidArgument, InvalidArgumentType, InvalidURL
from sharded_broker.models import QUEUE_SETTING_NAMES, Lease

from .kombu_alias import ALIAS, install

__all__ = ["Channel", "Transport", "register", "SHARD_KEY_HEADER"]

logger = logging.getLogger(__name__)

#: The message header that carries the shard key (Celery copies headers on retry).
SHARD_KEY_HEADER = "shard_key"

#: Most messages leased in one call when the consumer sets no prefetch limit.
MAX_LEASE_BATCH = 10

#: Longest wait, on closing, for a lease heartbeat in flight (one backend call).
HEARTBEAT_JOIN_TIMEOUT = 5.0

# Engine URLs whose relative SQLite path this process has warned about (once each).
_warned_relative_urls: set[str] = set()
_warned_relative_lock = threading.Lock()

# Transport options of this transport (beyond the engine's queue settings).
OWN_OPTIONS = frozenset({"shard_keys", "polling_interval", "heartbeat_interval"})
# Read by kombu itself (connection retries, virtual channel), accepted and left to it.
KOMBU_OPTIONS = frozenset(
    {
        "max_retries", "interval_start", "interval_step", "interval_max",
        "connect_retries_timeout", "errback", "callback", "body_encoding", "deadletter_queue",
    }
)
# Options of kombu's redis:// transport that apps switching from it often carry and that
# mean nothing here (bindings are always shared and pattern-exact): accepted, ignored.
IGNORED_REDIS_OPTIONS = frozenset({"fanout_prefix", "fanout_patterns"})
# Options of kombu's redis:// transport with an equivalent here.
REDIS_OPTION_HINTS = {
    "global_keyprefix": "use 'prefix' (a redis backend option)",
    "queue_order_strategy": "keys are always served round-robin",
    "priority_steps": "priorities 0-9 are always exact",
    "sep": "not needed",
}


def register() -> None:
    """Register the ``sharded`` alias with kombu, and the check of ``shard_key`` task
    options at declaration with Celery, by hand.

    Needed only where the ``.pth`` hook installed with the package does not run (for
    example when the source tree is on ``PYTHONPATH`` without ``pip install``). Importing
    this module registers too; tasks declared before that are checked at their first call.
    """
    install()


register()


# -- the shard key ------------------------------------------------------------------


def _normalise_key(value: Any, task_name: str, source: str) -> str | None:
    """A checked engine key from a user's value; bool and floats are refused on purpose."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidArgumentType(
            f"shard key for task {task_name!r} ({source}) must be a str or an int, "
            f"not {type(value).__name__} ({value!r:.80})"
        )
    try:
        return check.shard_key(str(value))
    except InvalidArgument as exc:
        raise InvalidArgument(f"shard key for task {task_name!r} ({source}): {exc}") from None


class _ArgumentKey:
    """Reads the key from one argument of a task, by keyword or by position.

    Without the task's signature (a task published by name from a process that does not
    define it) only keyword arguments can be read.
    """

    def __init__(self, task_name: str, argument: str, run: Callable[..., Any] | None) -> None:
        self.task_name = task_name
        self.argument = argument
        self.position: int | None = None
        self.default: Any = _MISSING
        try:
            parameters = list(inspect.signature(run).parameters.values()) if run is not None else []
        except (TypeError, ValueError):
            parameters = []
        for index, parameter in enumerate(parameters):
            if parameter.name == argument:
                if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                    self.position = index
                if parameter.default is not parameter.empty:
                    self.default = parameter.default
                break

    def __call__(self, args: list[Any], kwargs: Mapping[str, Any]) -> Any:
        if self.argument in kwargs:
            return kwargs[self.argument]
        if self.position is not None and self.position < len(args):
            return args[self.position]
        if self.default is _MISSING:
            raise InvalidArgument(
                f"task {self.task_name!r} takes its shard key from argument {self.argument!r}, "
                f"but the call passes no such argument"
            )
        return self.default


_MISSING = object()


def _find_task(name: str) -> Any:
    """The task object registered as ``name`` in a Celery app of this process, if any.

    Read without finalizing any app: a task that is being published has been created.
    """
    state = sys.modules.get("celery._state")
    if state is None:
        return None
    apps = [getattr(state._tls, "current_app", None), state.default_app, *state._get_active_apps()]
    for app in apps:
        task = getattr(app, "_tasks", {}).get(name) if app is not None else None
        if task is not None:
            return task
    return None


_KEY_ERRORS = (InvalidArgument, InvalidArgumentType, ConfigurationError)


class ShardKeyResolver:
    """Finds the shard key of a Celery task message (see the module docstring for the order)."""

    def __init__(self, shard_keys: Mapping[str, Any]) -> None:
        if not isinstance(shard_keys, Mapping):
            raise ConfigurationError(
                f"transport option shard_keys must map task names to an argument name or a "
                f"callable, not {type(shard_keys).__name__}"
            )
        for task_name, source in shard_keys.items():
            if not isinstance(task_name, str) or not (isinstance(source, str) or callable(source)):
                raise ConfigurationError(
                    f"transport option shard_keys: {task_name!r} must map to an argument name "
                    f"(str) or a callable(args, kwargs), not {source!r}"
                )
        self.shard_keys = dict(shard_keys)
        self._readers: dict[tuple[str, int], tuple[Callable[..., Any], str] | None] = {}
        self._lock = threading.Lock()

    def _reader(self, task_name: str) -> tuple[Callable[..., Any], str] | None:
        task = _find_task(task_name)
        cache_key = (task_name, id(task))
        with self._lock:
            if cache_key in self._readers:
                return self._readers[cache_key]
        # Read without binding: a function stored as a task option is not a method.
        source = inspect.getattr_static(task, "shard_key", None) if task is not None else None
        if isinstance(source, (staticmethod, classmethod)):
            source = source.__func__
        where = "task option shard_key"
        if source is None:
            source = self.shard_keys.get(task_name)
            where = "transport option shard_keys"
        if source is None:
            reader = None
        elif callable(source):
            reader = (source, where)
        elif isinstance(source, str):
            reader = (_ArgumentKey(task_name, source, getattr(task, "run", None)), f"{where}={source!r}")
        else:
            raise ConfigurationError(
                f"{where} of task {task_name!r} must be an argument name or a callable(args, kwargs), not {source!r}"
            )
        with self._lock:
            self._readers[cache_key] = reader
        return reader

    def resolve(self, message: dict[str, Any], decode_body: Callable[[], Any]) -> str | None:
        """The message's key, recorded in its headers; ``None`` for unkeyed messages."""
        headers = message.setdefault("headers", {})
        properties = message.setdefault("properties", {})
        task_name = headers.get("task") or "?"
        per_call = properties.pop(SHARD_KEY_HEADER, None)  # apply_async(shard_key=...)
        if per_call is not None:
            key = _normalise_key(per_call, task_name, "apply_async(shard_key=...)")
        elif headers.get(SHARD_KEY_HEADER) is not None:  # a retry, or headers={"shard_key": ...}
            key = _normalise_key(headers[SHARD_KEY_HEADER], task_name, "message header shard_key")
        else:
            reader = self._reader(task_name) if "task" in headers else None
            if reader is None:
                return None
            read, where = reader
            args, kwargs = _task_arguments(decode_body())
            try:
                value = read(args, kwargs)
            except _KEY_ERRORS:
                raise
            except Exception as exc:
                raise InvalidArgument(f"shard key of task {task_name!r} from {where} failed: {exc!r}") from exc
            key = _normalise_key(value, task_name, where)
        if key is None:
            headers.pop(SHARD_KEY_HEADER, None)
        else:
            headers[SHARD_KEY_HEADER] = key
        return key


def _task_arguments(body: Any) -> tuple[list[Any], dict[str, Any]]:
    """``(args, kwargs)`` of a Celery task body (protocol 2 tuple, or protocol 1 dict)."""
    if isinstance(body, (list, tuple)) and len(body) >= 2:
        return list(body[0] or ()), dict(body[1] or {})
    if isinstance(body, Mapping):
        return list(body.get("args") or ()), dict(body.get("kwargs") or {})
    return [], {}


def _eta_delay(headers: Mapping[str, Any]) -> float:
    """Seconds until the message's ``eta`` header (0 when absent or past)."""
    eta = headers.get("eta")
    if not eta:
        return 0.0
    try:
        when = datetime.fromisoformat(str(eta))
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return min(max(0.0, when.timestamp() - time.time()), check.MAX_DELAY)


# -- bindings stored in the engine ------------------------------------------------------
#
# A binding (exchange, routing key, queue) is stored as engine binding (exchange, entry)
# with entry = escaped routing key + "+" + queue. Engine names allow letters, digits and
# "_ . : @ + -", so the routing key's "@", "+", "*" and "#" are escaped with "@".

_ESCAPES = {"@": "@a", "+": "@p", "*": "@s", "#": "@h"}
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}


def binding_entry(routing_key: str, queue: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in routing_key or "") + "+" + queue


def parse_binding_entry(entry: str) -> tuple[str, str]:
    escaped, _, queue = entry.partition("+")
    routing_key, chars = [], iter(escaped)
    for c in chars:
        routing_key.append(_UNESCAPES.get(next(chars, ""), "") if c == "@" else c)
    return "".join(routing_key), queue


# -- the channel ------------------------------------------------------------------------


class Channel(virtual.Channel):
    """One kombu channel over the transport's engine broker.

    Delivered, unsettled messages are tracked by delivery tag with their engine lease;
    the transport's heartbeat extends them until they are acked or rejected.
    """

    supports_fanout = True
    # Unacked messages are released back to the engine (to their places at the head of
    # their keys, their delivery not counted) when the channel closes, never copied.
    do_restore = True

    def __init__(self, connection: "Transport", **kwargs: Any) -> None:
        self._leases: dict[str, Lease] = {}
        self._leases_lock = threading.Lock()
        self._noack_queues: set[str] = set()
        super().__init__(connection, **kwargs)

    @property
    def broker(self) -> sharded_broker.Broker:
        return self.connection.broker

    # publishing

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        headers = message.setdefault("headers", {})
        key = self.connection.shard_keys.resolve(message, lambda: self._decode_task_body(message))
        # A retry returns to the head of its key and, with a countdown, holds the key
        # (unless the queue's retry_position is "tail", as for any other returned message).
        retry = (
            bool(headers.get("retries"))
            and "task" in headers
            and self.broker.settings(queue).retry_position == "head"
        )
        self.broker.enqueue(
            queue,
            json_dumps(message).encode(),
            key=key,
            priority=self._get_message_priority(message, reverse=False),
            delay=_eta_delay(headers),
            at_head=retry,
            headers={"task": headers.get("task"), "id": headers.get("id")} if "task" in headers else None,
        )

    def _decode_task_body(self, message: Mapping[str, Any]) -> Any:
        properties = message.get("properties") or {}
        raw = self.decode_body(message.get("body"), properties.get("body_encoding"))
        # accept=None is safe here: this is the body this very process just serialized for
        # publishing (to read the shard key argument), never bytes received from outside.
        return deserialize(raw, message.get("content-type"), message.get("content-encoding"), accept=None)

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any) -> None:
        payload = json_dumps(message).encode()
        for _, queue in self._bindings(exchange):
            self.broker.enqueue(queue, payload)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: Any, queue: str) -> None:
        self.broker.bind(exchange, binding_entry(routing_key, queue))

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        if exchange:
            self.broker.unbind(exchange, binding_entry(routing_key, queue))

    def _bindings(self, exchange: str) -> list[tuple[str, str]]:
        return [parse_binding_entry(e) for e in self.broker.bound_queues(exchange)]

    def get_table(self, exchange: str) -> list[tuple[str, Any, str]]:
        """Bindings of ``exchange`` from the engine, shared by every process."""
        exchange_type = self.typeof(exchange)
        return [exchange_type.prepare_bind(queue, exchange, rk, None) for rk, queue in self._bindings(exchange)]

    # queues

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        check.queue_name(queue)  # refuse a bad name at declaration
        if kwargs.get("auto_delete"):
            self.connection.auto_delete_queues.add(queue)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return True  # engine queues exist as soon as they are named

    def _size(self, queue: str) -> int:
        stats = self.broker.stats(queue)
        return stats.ready + stats.delayed

    def _purge(self, queue: str) -> int:
        return self.broker.purge(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        if len(args) >= 2 and args[0]:
            exchange, routing_key = args[0], args[1]
            self.broker.unbind(exchange, binding_entry(routing_key, queue))
        self._purge(queue)

    # consuming

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        _warn_once_if_relative(self.connection.engine_url)
        if no_ack:
            self._noack_queues.add(queue)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        if queue is not None:
            self._noack_queues.discard(queue)
        super().basic_cancel(consumer_tag)
        # AMQP auto-delete: the queue (remote control, events, replies) goes with its last
        # consumer, so broadcasts stop piling up in it. A closed channel (lost connection,
        # about to reconnect) leaves it alone.
        transport = self.connection
        if transport is not None and queue in transport.auto_delete_queues and queue not in self._active_queues:
            transport.auto_delete_queues.discard(queue)
            self.queue_delete(queue)

    def _reset_cycle(self) -> None:
        self._cycle = virtual.base.FairCycle(self._get_bulk, self._active_queues, Empty)

    def _lease(self, queue: str, limit: int, no_ack: bool) -> list[dict[str, Any]]:
        leases = self.broker.lease(queue, limit)  # for the queue's visibility_timeout
        if no_ack:
            self.broker.ack_many(leases)
        messages = []
        for lease in leases:
            try:
                message = json_loads(lease.payload)
                if not isinstance(message, dict):
                    raise ValueError(f"a JSON {type(message).__name__}, not a message object")
            except (TypeError, ValueError) as exc:
                # A corrupted body must not fail every fetch and block its key: dead-letter it.
                logger.error("Dead-lettering undecodable message %s from queue %r: %s", lease.id, queue, exc)
                if not no_ack:
                    self.broker.nack(lease, dead=True, reason=f"undecodable message: {exc}"[:500])
                continue
            properties = message.setdefault("properties", {})
            tag = properties["delivery_tag"] = uuid()
            properties.setdefault("delivery_info", {})["redelivered"] = lease.attempts > 1
            if not no_ack:
                with self._leases_lock:
                    self._leases[tag] = lease
            messages.append(message)
        if leases and not no_ack:
            self.connection.start_heartbeat()
        return messages

    def _get_bulk(self, queue: str, callback: Callable[..., Any], timeout: float | None = None) -> None:
        room = self.qos.can_consume_max_estimate()
        limit = MAX_LEASE_BATCH if room is None else min(room, MAX_LEASE_BATCH)
        if not limit:
            raise Empty()
        messages = self._lease(queue, limit, queue in self._noack_queues)
        if not messages:
            raise Empty()
        for message in messages:
            callback(message, queue)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        messages = self._lease(queue, 1, False)
        if not messages:
            raise Empty()
        return messages[0]

    def basic_get(self, queue, no_ack=False, **kwargs):
        messages = self._lease(queue, 1, no_ack)
        if not messages:
            return None
        message = self.Message(messages[0], channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    # settling

    def _take_lease(self, delivery_tag: str) -> Lease | None:
        with self._leases_lock:
            return self._leases.pop(delivery_tag, None)

    def unsettled_leases(self) -> list[Lease]:
        with self._leases_lock:
            return list(self._leases.values())

    def forget_lease(self, lease: Lease) -> bool:
        """Stop tracking ``lease``; False when it was settled meanwhile."""
        with self._leases_lock:
            for tag, held in list(self._leases.items()):
                if held is lease:
                    del self._leases[tag]
                    return True
        return False

    def basic_ack(self, delivery_tag, multiple=False):
        lease = self._take_lease(delivery_tag)
        if lease is not None and not self.broker.ack(lease):
            logger.warning(
                "ack of message %s (key %r) came after its lease was lost: it may have run twice",
                lease.id, lease.key,
            )
        super().basic_ack(delivery_tag)

    def basic_reject(self, delivery_tag, requeue=False):
        lease = self._take_lease(delivery_tag)
        if lease is not None:
            if requeue:
                self.broker.nack(lease)  # back to the head of its key
            else:
                self.broker.nack(lease, dead=True, reason="rejected by the consumer (requeue=False)")
        self.qos.reject(delivery_tag, requeue=False)

    def _restore(self, message) -> None:
        """Give an unacked message back to the engine (channel close, basic_recover)."""
        lease = self._take_lease(message.delivery_tag)
        if lease is not None:
            _release_leases(self.broker, [lease])

    def _restore_at_beginning(self, message) -> None:
        self._restore(message)

    def close(self) -> None:
        # Every unsettled lease (delivered to a consumer or not yet) goes back in one call;
        # kombu's QoS would then restore its messages one call each, finding none left.
        transport = self.connection
        with self._leases_lock:
            unsettled, self._leases = list(self._leases.values()), {}
        if transport is not None and unsettled:
            _release_leases(transport.broker, unsettled)
        super().close()


def _warn_once_if_relative(url: str) -> None:
    """Log, once per process and URL, that a consumer's SQLite path is relative: its
    producers may be using another file without anyone noticing."""
    warning = relative_path_warning(url)
    if warning is None:
        return
    with _warned_relative_lock:
        if url in _warned_relative_urls:
            return
        _warned_relative_urls.add(url)
    logger.warning("%s", warning)


def _release_leases(broker: sharded_broker.Broker, leases: list[Lease]) -> None:
    """Give leases back (one round trip): each message returns to its place at the head
    of its key and its delivery does not count toward ``max_deliveries``, so closing
    connections (warm shutdowns, restarts) never dead-letters a message that did not
    run. If the backend is unreachable, the leases expiring bring the messages back
    anyway (that return counts as a delivery), so there is nothing to dump or retry."""
    try:
        broker.release_many(leases)
    except BackendUnavailable as exc:
        logger.warning(
            "could not give back %d message(s) now (%s); they come back when their leases expire",
            len(leases), exc,
        )


# -- the transport -----------------------------------------------------------------------


class _Heartbeat(threading.Thread):
    """Extends the leases of delivered, unsettled messages until the transport closes."""

    def __init__(self, transport: "Transport") -> None:
        super().__init__(name="sharded-broker-lease-heartbeat", daemon=True)
        self.transport = transport
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.transport.heartbeat_interval):
            held = [(channel, lease) for channel in list(self.transport.channels) for lease in channel.unsettled_leases()]
            if not held:
                continue
            try:
                # One round trip for every lease of the transport, each by its queue's timeout.
                extended = self.transport.broker.extend_many([lease for _, lease in held])
            except BackendUnavailable as exc:
                logger.warning("lease heartbeat failed, will retry: %s", exc)
                continue
            except Exception:
                logger.exception("lease heartbeat failed")
                continue
            for (channel, lease), alive in zip(held, extended):
                # Refused either because the message was settled since the snapshot
                # (nothing to say) or because the lease really expired.
                if not alive and channel.forget_lease(lease):
                    logger.warning(
                        "lease of message %s (key %r) expired before its heartbeat: it will run again",
                        lease.id, lease.key,
                    )


class Transport(virtual.Transport):
    """kombu transport for ``sharded+<engine URL>`` broker URLs."""

    Channel = Channel

    can_parse_url = True  # kombu hands over the engine URL untouched
    driver_type = "sharded"
    driver_name = "sharded-broker"
    default_port = None
    polling_interval = 0.5  # longest wait between polls; the backend wakes consumers earlier

    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )
    connection_errors = virtual.Transport.connection_errors + (BackendUnavailable,)
    channel_errors = virtual.Transport.channel_errors + (BackendUnavailable,)

    def __init__(self, client, **kwargs: Any) -> None:
        options = dict(client.transport_options or {})
        self.engine_url = engine_url(client)
        try:
            sharded_broker.broker.backend_class(self.engine_url)  # unknown scheme: fail now
        except InvalidURL as exc:
            raise InvalidURL(f"broker URL {ALIAS}+{sharded_broker.redact_url(self.engine_url)}: {exc}") from None
        self.shard_keys, self.heartbeat_interval, self.engine_options = _split_options(options)
        self.engine_options.update(_ssl_options(client, self.engine_url))
        super().__init__(client, **kwargs)
        try:
            self.broker = sharded_broker.connect(self.engine_url, **self.engine_options)
        except InvalidURL as exc:
            # The URL (or the file it names) is the problem, not the transport options.
            raise InvalidURL(f"broker URL {ALIAS}+{sharded_broker.redact_url(self.engine_url)}: {exc}") from None
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"broker_transport_options: {exc} (sharded+ transport options: "
                f"{', '.join(sorted(OWN_OPTIONS | QUEUE_SETTING_NAMES | {'queues', 'max_payload_size'}))}, "
                f"the backend's own options, and kombu's {', '.join(sorted(KOMBU_OPTIONS))})"
            ) from None
        # Leases last their queue's visibility_timeout; one heartbeat serves every queue,
        # so it beats for the shortest.
        self.visibility_timeout = min(
            [self.broker.defaults.visibility_timeout]
            + [self.broker.settings(name).visibility_timeout for name in self.engine_options.get("queues") or {}]
        )
        if self.heartbeat_interval is None:
            self.heartbeat_interval = self.visibility_timeout / 3
        elif self.heartbeat_interval >= self.visibility_timeout:
            self.broker.close()
            raise ConfigurationError(
                f"transport option heartbeat_interval {self.heartbeat_interval:g} must be shorter than "
                f"the shortest visibility_timeout {self.visibility_timeout:g} (leases would expire "
                f"between beats and long tasks run twice); the default is a third of it"
            )
        self._heartbeat: _Heartbeat | None = None
        self._heartbeat_lock = threading.Lock()
        self.auto_delete_queues: set[str] = set()

    def start_heartbeat(self) -> None:
        """Start extending delivered leases (once per transport, in the consuming process)."""
        with self._heartbeat_lock:
            if self._heartbeat is None:
                self._heartbeat = _Heartbeat(self)
                self._heartbeat.start()

    def establish_connection(self):
        self.broker.now()  # reach the backend now, so kombu's connection retry applies
        _require_late_acks()
        return super().establish_connection()

    def close_connection(self, connection) -> None:
        try:
            super().close_connection(connection)  # closes channels: unacked messages go back
        finally:
            with self._heartbeat_lock:
                heartbeat, self._heartbeat = self._heartbeat, None
            if heartbeat is not None:
                heartbeat.stopped.set()
                # A beat in flight finishes before the engine closes under it.
                heartbeat.join(HEARTBEAT_JOIN_TIMEOUT)
            self.broker.close()

    def drain_events(self, connection, timeout: float | None = None) -> None:
        """Deliver one batch of messages, waiting up to ``timeout`` seconds for it.

        Once the Celery worker of this process is shutting down it consumes nothing more
        and returns at once: Celery's blocking loop (``celery.worker.loops.synloop``, used
        for transports without an event loop) drains once more after the shutdown signal,
        which would otherwise block for its full 2-second timeout, twice, before the
        worker even starts closing its pool.
        """
        started = time.monotonic()
        while True:
            if _celery_worker_stopping():
                raise socket.timeout()
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            remaining = None if timeout is None else timeout - (time.monotonic() - started)
            if remaining is not None and remaining <= 0:
                raise socket.timeout()
            pause = self.polling_interval if remaining is None else min(self.polling_interval, remaining)
            self._wait_for_work(pause)

    def _wait_for_work(self, seconds: float) -> None:
        """Block up to ``seconds``; the backend returns early when a message may have come."""
        for channel in self.channels:
            if channel._active_queues:
                self.broker.backend.wait(channel._active_queues[0], seconds)
                return
        time.sleep(seconds)

    def verify_connection(self, connection) -> bool:
        try:
            self.broker.now()
        except BackendUnavailable:
            return False
        return True

    def driver_version(self) -> str:
        return sharded_broker.__version__

    @classmethod
    def as_uri(cls, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The broker URL; for display (the worker banner, logs) without the password and
        with a SQLite file by its absolute path, so a relative path shows where it led."""
        if include_password:
            return f"{ALIAS}+{uri}"
        return f"{ALIAS}+{sharded_broker.display_url(uri).replace('***', mask)}"


def _celery_worker_stopping() -> bool:
    """True once a Celery worker in this process was told to stop, warm or cold (the
    flags ``celery.worker.state.maybe_shutdown`` acts on)."""
    state = sys.modules.get("celery.worker.state")
    if state is None:
        return False
    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


def engine_url(client) -> str:
    """The engine URL of a kombu connection to ``sharded+<engine URL>``.

    kombu passes everything after ``sharded+`` as ``hostname``; credentials, port and
    virtual host given separately (Celery's ``broker_user``, ``broker_password``,
    ``broker_port``, ``broker_vhost``) fill what the URL leaves out.
    """
    url = client.hostname or ""
    if "://" not in url:
        raise InvalidURL(
            f"broker URL must be sharded+<engine URL>, e.g. sharded+redis://localhost:6379/0, "
            f"sharded+sqlite:///q.db or sharded+memory://; got engine URL {url!r}"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return url
    netloc = parts.netloc
    if "@" not in netloc and (client.userid or client.password):
        credentials = quote(client.userid or "", safe="")
        if client.password:
            credentials += ":" + quote(client.password, safe="")
        netloc = f"{credentials}@{netloc}"
    if client.port and parts.port is None and netloc:
        netloc = f"{netloc}:{client.port}"
    path = parts.path
    vhost = str(client.virtual_host or "").strip("/")
    if path in ("", "/") and vhost:
        path = "/" + vhost
    return urlunsplit(parts._replace(netloc=netloc, path=path))


def _ssl_options(client, url: str) -> dict[str, Any]:
    """Celery's ``broker_use_ssl`` (redis-py ``ssl_*`` arguments) for a ``rediss://`` URL."""
    if not url.startswith("rediss://") or not isinstance(client.ssl, Mapping):
        return {}
    return dict(client.ssl)


def _split_options(options: dict[str, Any]) -> tuple[ShardKeyResolver, float | None, dict[str, Any]]:
    """(key resolver, heartbeat interval, engine options) from transport options."""
    for name in sorted(options):
        if name in REDIS_OPTION_HINTS:
            raise ConfigurationError(
                f"transport option {name!r} is a redis:// transport option; with sharded+ "
                f"{REDIS_OPTION_HINTS[name]}"
            )
    resolver = ShardKeyResolver(options.pop("shard_keys", None) or {})
    heartbeat = options.pop("heartbeat_interval", None)
    if heartbeat is not None:
        heartbeat = check.seconds(heartbeat, "heartbeat_interval", allow_zero=False)
    polling_interval = options.pop("polling_interval", None)
    if polling_interval is not None:
        check.seconds(polling_interval, "polling_interval", allow_zero=False)
    for name in KOMBU_OPTIONS | IGNORED_REDIS_OPTIONS:
        options.pop(name, None)
    # The rest goes to sharded_broker.connect: queue settings, "queues", "max_payload_size"
    # and the backend's own options. The backend refuses, naming it, any option it does
    # not know: that is how an unknown transport option is reported.
    return resolver, heartbeat, options


# -- Celery: order under the default task_acks_late=False ----------------------------------


def _require_late_acks() -> None:
    """Make every task of the Celery apps using this transport acknowledge late.

    With ``acks_late=False`` Celery acks a message when the task *starts*, which would
    release its key and let the key's next message run concurrently. Runs when the
    transport connects, which in a worker is the consumer's Connection step, before the
    Tasks step builds the task strategies that read ``acks_late``.
    """
    state = sys.modules.get("celery._state")
    if state is None:
        return
    for app in list(state._get_active_apps()):
        if not getattr(app, "configured", False):
            continue
        urls = [app.conf.get("broker_url"), app.conf.get("broker_read_url")]
        if not any(isinstance(url, str) and url.lower().startswith(f"{ALIAS}+") for url in urls):
            continue
        app.conf.task_acks_late = True  # tasks bound from now on
        for task in list(getattr(app, "_tasks", {}).values()):
            if not task.acks_late:
                task.acks_late = True
