"""A kombu transport over the sharded-broker engine: per-key FIFO for Celery apps.

An existing Celery app switches by its broker URL alone::

    app.conf.broker_url = "sharded+redis://localhost:6379/0"   # or sharded+rediss://...,
                                                               # sharded+sqlite:///q.db,
                                                               # sharded+memory://

kombu splits ``sharded+`` off the URL and hands the rest (the *engine URL*) to this
transport; a bare ``sharded://`` takes the engine URL from ``SHARDED_BROKER_URL``, and
every transport option left out may come from its ``SHARDED_BROKER_<OPTION>`` variable
(docs/operations.md, "Settings from the environment"). Publishing enqueues, consuming leases, ``basic_ack`` acks, reject/requeue
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
      In a process that uses this transport (decided from the transport the app's
      connections resolve to, however the URL reached Celery), every task of the app
      acknowledges late (``acks_late=True``) and is delivered again when its pool
      process dies (``reject_on_worker_lost=True``), whatever the settings say (an
      explicit ``False`` gets a warning naming the consequence), so the next message of a
      key starts only after the previous task finished, whatever the pool, and a task
      killed with its process comes back (counted toward ``max_deliveries``).
    * **Leases.** A delivered message is leased for ``visibility_timeout`` seconds
      (default 30). A heartbeat thread in the consuming process extends the leases of
      every delivered, unsettled message every ``visibility_timeout / 3`` seconds, so a
      task that runs for hours is never delivered twice, while the messages of a worker
      killed with SIGKILL come back, at the head of their keys, about one timeout later.
      A failed extension is retried at once with backoff until the leases' deadline, so
      an outage shorter than ``visibility_timeout - heartbeat_interval - 0.5 s`` expires
      nothing (:mod:`sharded_broker.heartbeat`).
    * **Consumer restarts.** When Celery restarts its consumer after a lost connection,
      the tasks already handed to its pool keep their leases (and heartbeat) and settle
      when they end; only messages Celery dropped unrun are given back. A late ack
      refused because the lease had moved on (a frozen worker) is logged.
    * **Delays stay in the broker.** ``countdown``/``eta`` become engine delays: the
      message is invisible until due and does not hold its key meanwhile. A retry
      (``task.retry(countdown=...)``) goes back to the *head* of its key and holds the key
      until it runs.
    * **Priority** follows Celery's Redis convention: 0 (the default) runs first, 9 last,
      within a key and within the unkeyed lane.
    * **Fanout and topic exchanges** (remote control, ``celery inspect``, events) route
      through bindings stored in the engine, shared by every process; broadcast messages
      are unkeyed.
    * **Revoke removes a waiting task from the broker.** A task's message carries its task
      id as its engine ref (``Message.ref``), so ``AsyncResult.revoke()``,
      ``app.control.revoke(task_id)`` or ``celery control revoke`` in any process using
      this transport cancels its message in the broker (``Broker.cancel(queue, ref=...)``)
      as the revoke is broadcast, so it never runs even if every worker restarts and
      forgets its revoked list, and its key moves on at once; workers still get the
      broadcast and discard a copy already delivered, as Celery always does. A leased
      (running) task is left to the workers (``terminate=True`` is theirs).
      :func:`cancel` and :func:`get` by task id work from any process too.

``driver_type`` is ``"sharded"``: Celery enables mingle and gossip only for "amqp" and
"redis", so workers start without the mingle round trip and send no gossip, and
``worker_disable_prefetch`` (Redis only) is ignored; prefetching is harmless here because
a prefetched keyed message already holds its key.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import socket
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from queue import Empty
from typing import Any, Callable, Iterator, Mapping, cast

from kombu.exceptions import DecodeError
from kombu.serialization import loads as deserialize
from kombu.transport import virtual
from kombu.utils.json import JSONEncoder
from kombu.utils.json import loads as json_loads
from kombu.utils.uuid import uuid

import sharded_broker
from sharded_broker import environment
from sharded_broker import validation as check
from sharded_broker.urls import relative_path_warning, with_connection_parts
from sharded_broker.errors import BackendUnavailable, ConfigurationError, InvalidArgument, InvalidArgumentType, InvalidURL
from sharded_broker.broker import MAX_LEASE_LIMIT
from sharded_broker.group_commit import AckGroup
from sharded_broker.models import QUEUE_SETTING_NAMES, CancelResult, Lease, MessageInfo

from .kombu_alias import ALIAS, BATCH_TASK, install
from .support import (
    ArgumentKey, BatchFailed, LeaseHeartbeat, cancel_by_ref, coerce_key, framework_ref, get_by_ref, queues_to_search,
)

# A broker URL naming no engine URL: the transport takes SHARDED_BROKER_URL's.
BARE_URL = f"{ALIAS}://"

# BatchTask and BatchItem come through __getattr__ below.
__all__ = ["BatchFailed", "Channel", "Transport", "cancel", "get", "register", "SHARD_KEY_HEADER"]


def __getattr__(name: str) -> Any:
    """``BatchTask`` and ``BatchItem`` import Celery (integrations/celery_batch.py), which
    this transport module does not: kombu works without Celery."""
    if name in ("BatchTask", "BatchItem"):
        from . import celery_batch

        return getattr(celery_batch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

logger = logging.getLogger(__name__)

# kombu's json.dumps (kombu.utils.json.dumps), its encoder built once rather than at every
# publish (json.dumps builds one per call when given a cls). Encoding keeps no state in
# the encoder, and its default() reads kombu's registered types at each call.
json_dumps = JSONEncoder().encode

#: The message header that carries the shard key (Celery copies headers on retry).
SHARD_KEY_HEADER = "shard_key"

#: Most messages leased in one call when the consumer sets no prefetch limit.
MAX_LEASE_BATCH = 10

#: Longest wait, on closing, for a lease heartbeat in flight (one backend call).
HEARTBEAT_JOIN_TIMEOUT = 5.0

# Engine URLs whose relative SQLite path this process has warned about (once each).
_warned_relative_urls: set[str] = set()
_warned_relative_lock = threading.Lock()

#: Least time between two looks at the remote-control queues when a drain starts (an
#: idle loop spends at most about 100 lease calls a second on them); every batch of
#: tasks leased is also preceded by one look, so a revoke published first wins.
CONTROL_CHECK_INTERVAL = 0.01

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
    return coerce_key(value, f"shard key for task {task_name!r} ({source})")


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
        elif isinstance(source, str) and _is_batch_task(task):
            # The function takes the batch, not one message's arguments: by keyword only.
            owner = f"batch task {task_name!r} (its messages pass the key by keyword)"
            reader = (ArgumentKey(owner, source, None), f"{where}={source!r}")
        elif isinstance(source, str):
            reader = (ArgumentKey(f"task {task_name!r}", source, getattr(task, "run", None)), f"{where}={source!r}")
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


def _is_batch_task(task: Any) -> bool:
    """True for a task built on ``BatchTask`` (integrations/celery_batch.py)."""
    return task is not None and getattr(type(task), BATCH_TASK, False) is True


@dataclass
class _HeldBatch:
    """The leases after the first of a batch delivered as one Celery message (the first is
    in ``Channel._leases`` like any message's), and which message failed, if one did:
    ``(index, error, retry delay)``, recorded by the task's ``BatchRequest``."""

    rest: list[Lease]
    failure: tuple[int, BaseException, float] | None = None


def _task_queue(app: Any, task: Any) -> str:
    """The queue name ``app`` routes a call of ``task`` to (without arguments: a routing
    function that needs them leaves the default queue)."""
    try:
        queue = app.amqp.router.route({}, task.name, (), {}).get("queue")
    except Exception:  # a user's routing function failing on a call without arguments
        return app.conf.task_default_queue
    return getattr(queue, "name", queue) or app.conf.task_default_queue


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
        # Delivery tags of batch deliveries (see BatchTask), with their other leases.
        self._batches: dict[str, _HeldBatch] = {}
        self._leases_lock = threading.Lock()
        # Delivery tags of leases kept past this channel's close because a Celery worker
        # of this process still runs (or will run) their tasks: each with a weak
        # reference to Celery's request, so a request Celery drops gives its lease back.
        self._kept: dict[str, Callable[[], Any]] = {}
        # Leases the heartbeat found expired (moved on to another delivery), by tag, so
        # the late ack of their task can say so.
        self._lost: dict[str, Lease] = {}
        self._noack_queues: set[str] = set()
        # kombu clears ``connection`` when the channel closes; kept leases still settle
        # through the transport's engine, which stays open for them.
        self._transport = connection
        super().__init__(connection, **kwargs)

    @property
    def broker(self) -> sharded_broker.Broker:
        return self._transport.broker

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
            # The task id names the message from any process (revoke, cancel, get).
            ref=framework_ref(headers.get("id")) if "task" in headers else None,
        )

    def _decode_task_body(self, message: Mapping[str, Any]) -> Any:
        properties = message.get("properties") or {}
        raw = self.decode_body(message.get("body"), properties.get("body_encoding"))
        # accept=None is safe here: this is the body this very process just serialized for
        # publishing (to read the shard key argument), never bytes received from outside.
        return deserialize(raw, message.get("content-type"), message.get("content-encoding"), accept=None)

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any) -> None:
        if exchange.endswith(".pidbox"):  # Celery's remote control (kombu's Mailbox exchange)
            self._cancel_revoked(message)
        payload = json_dumps(message).encode()
        for _, queue in self._bindings(exchange):
            self.broker.enqueue(queue, payload)

    def _cancel_revoked(self, message: Mapping[str, Any]) -> None:
        """A ``revoke`` broadcast leaving this process (every broadcast is sent through a
        transport like this one, whichever process sends it): cancel in the broker the
        waiting messages of the revoked tasks, found by their task ids, the refs of their
        messages (the broadcast still goes to the workers, which discard what they already
        hold)."""
        try:
            command = self._decode_task_body(message)
        except (DecodeError, TypeError, ValueError):
            return  # not a command this transport can read: the workers judge it
        if not isinstance(command, dict) or command.get("method") != "revoke":
            return
        task_ids = (command.get("arguments") or {}).get("task_id")
        task_ids = [task_ids] if isinstance(task_ids, str) else list(task_ids or ())
        task_ids = [task_id for task_id in task_ids if isinstance(task_id, str) and task_id]
        if not task_ids:
            return
        queues = _queues_holding_tasks(self.broker, _current_app())
        for task_id in task_ids:
            try:
                result = cancel_by_ref(self.broker, task_id, queues)
            except InvalidArgument:
                continue  # not a ref the engine takes (too long): no message carries it
            logger.debug("revoke of task %s: %s", task_id, result.summary)

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
        # A queue with a batch task is leased in ordered batches of its size, each
        # delivered as one message; ``limit`` then counts deliveries.
        per_key = 1 if no_ack else self._transport.batch_size(queue)
        leases = self.broker.lease(queue, min(limit * per_key, MAX_LEASE_LIMIT), per_key=per_key)
        if no_ack:
            self.broker.ack_many(leases)
        messages = []
        for _, batch in itertools.groupby(leases, key=lambda lease: lease.batch_id):
            messages.extend(self._deliveries(queue, list(batch), no_ack))
        if leases and not no_ack:
            self._transport.start_heartbeat(self)
        return messages

    def _deliveries(self, queue: str, leases: list[Lease], no_ack: bool) -> list[dict[str, Any]]:
        """The messages Celery gets for one ordered batch of one key (one lease, unless
        the queue has a batch task): a batch task's leading messages become one message
        for it (see ``_batch_message``). The batch ends early at an undecodable message
        (dead-lettered) or one for another task (given back with every later one: the
        engine returns the rest of a batch with any member); a batch led by a message of
        another task delivers that message alone."""
        taken: list[tuple[Lease, dict[str, Any]]] = []
        batch_task: Any = None
        for index, lease in enumerate(leases):
            message = self._decode(queue, lease, no_ack)
            if message is None:  # dead-lettered: the engine gave the later ones back
                break
            task: Any = None if no_ack else self._transport.batch_task((message.get("headers") or {}).get("task"))
            if index == 0:
                batch_task = task
            elif task is None or task is not batch_task or index >= task.batch:
                _release_leases(self.broker, [lease])  # and every later one
                break
            if task is not None:
                try:
                    message["_item"] = self._batch_item(message)
                except ValueError as exc:
                    logger.error("Dead-lettering message %s of batch task %r: %s", lease.id, task.name, exc)
                    self.broker.nack(lease, dead=True, reason=f"not a batch task message: {exc}")
                    break
            taken.append((lease, message))
        if not taken:
            return []
        if batch_task is None:
            return [self._track(taken[0][1], [taken[0][0]], no_ack, batch=False)]
        delivery = self._batch_message([message for _, message in taken])
        return [self._track(delivery, [lease for lease, _ in taken], no_ack, batch=True)]

    def _decode(self, queue: str, lease: Lease, no_ack: bool) -> dict[str, Any] | None:
        try:
            message = json_loads(lease.payload)
            if not isinstance(message, dict):
                raise ValueError(f"a JSON {type(message).__name__}, not a message object")
        except (TypeError, ValueError) as exc:
            # A corrupted body must not fail every fetch and block its key: dead-letter it.
            logger.error("Dead-lettering undecodable message %s from queue %r: %s", lease.id, queue, exc)
            if not no_ack:
                self.broker.nack(lease, dead=True, reason=f"undecodable message: {exc}")
            return None
        return message

    def _track(self, message: dict[str, Any], leases: list[Lease], no_ack: bool, *, batch: bool) -> dict[str, Any]:
        """Give a delivery its tag and remember its leases until Celery settles it."""
        properties = message.setdefault("properties", {})
        tag = properties["delivery_tag"] = uuid()
        properties.setdefault("delivery_info", {})["redelivered"] = leases[0].attempts > 1
        if not no_ack:
            with self._leases_lock:
                self._leases[tag] = leases[0]
                if batch:
                    self._batches[tag] = _HeldBatch(leases[1:])
        return message

    def _batch_item(self, message: dict[str, Any]) -> dict[str, Any]:
        """``{id, args, kwargs}`` of one message of a batch task (ValueError: not JSON)."""
        if message.get("content-type") != "application/json":
            raise ValueError(
                f"content type {message.get('content-type')!r}: a batch task's messages must be "
                "JSON (task_serializer='json', Celery's default)"
            )
        properties = message.get("properties") or {}
        raw = self.decode_body(message.get("body"), properties.get("body_encoding"))
        args, kwargs = _task_arguments(json_loads(raw))
        return {"id": (message.get("headers") or {}).get("id"), "args": args, "kwargs": kwargs}

    def _batch_message(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """One Celery message for a batch task, whose one argument lists the batch's
        messages (``BatchTask`` hands them to the function as ``BatchItem`` values), with
        an id of its own; the members' callbacks, chains and ETAs do not apply."""
        first = messages[0]
        batch_id = uuid()
        items = [message.pop("_item") for message in messages]
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        properties = dict(first.get("properties") or {})
        body, encoding = self.encode_body(json_dumps([[items], {}, embed]), properties.get("body_encoding"))
        properties.update(correlation_id=batch_id, body_encoding=encoding)
        headers = dict(
            first.get("headers") or {}, id=batch_id, root_id=batch_id, parent_id=None, group=None, retries=0,
            eta=None, expires=None, argsrepr=f"<batch of {len(items)}>", kwargsrepr="{}",
        )
        return dict(first, body=body, headers=headers, properties=properties)

    def record_batch_failure(self, delivery_tag: str, index: int, error: BaseException, retry_delay: float) -> None:
        """A batch task's ``BatchRequest``: the message at ``index`` of the batch delivered
        as ``delivery_tag`` failed; the channel settles the batch when Celery acks it."""
        with self._leases_lock:
            held = self._batches.get(delivery_tag)
            if held is not None:
                if not 0 <= index <= len(held.rest):
                    logger.error(
                        "batch task failed with BatchFailed(%r) for a batch of %d messages; failing it at message 0",
                        index, len(held.rest) + 1,
                    )
                    index = 0
                held.failure = (index, error, retry_delay)

    def _settle_batch(self, leases: list[Lease], held: _HeldBatch, *, dead: bool) -> None:
        """As the contract's ordered batches: the messages before the failed one are acked;
        the failed one is retried after its delay at the head of its key, or dead-lettered
        when ``dead`` (Celery rejected the message) or it reached ``max_deliveries``; the
        engine gives the later ones back unprocessed. No failure recorded: all acked (or,
        when ``dead``, the first dead-lettered)."""
        if held.failure is None:
            index, error, delay = (0 if dead else len(leases)), None, 0.0
        else:
            index, error, delay = held.failure
        if index:
            for lease, accepted in zip(leases, self.broker.ack_many(leases[:index])):
                if not accepted:
                    self._warn_fenced(lease)
        if index == len(leases):
            return
        lease = leases[index]
        max_deliveries = self.broker.settings(lease.queue).max_deliveries
        exhausted = max_deliveries is not None and lease.attempts >= max_deliveries
        if dead or exhausted:
            reason = "rejected by the consumer" if error is None else f"{type(error).__name__}: {error}"
            where = f"message {index + 1} of a batch of {len(leases)}"
            if exhausted:
                where += f", after {lease.attempts} deliveries"
            self.broker.nack(lease, dead=True, reason=f"{reason} ({where})")
        else:
            self.broker.nack(lease, delay=min(delay, check.MAX_DELAY))

    def _get_bulk(self, queue: str, callback: Callable[..., Any], timeout: float | None = None) -> None:
        room = self.qos.can_consume_max_estimate()
        limit = MAX_LEASE_BATCH if room is None else min(room, MAX_LEASE_BATCH)
        if not limit:
            raise Empty()
        control = queue in self._noack_queues
        messages = self._lease(queue, limit, control)
        if not messages:
            raise Empty()
        if not control:
            # A revoke published before these tasks is stored before them: handled
            # first, it finds them still to come, so it wins the race.
            self.connection._deliver_control_messages(every_time=True)
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

    def _take_lease(self, delivery_tag: str) -> tuple[Lease | None, bool]:
        """The lease of a message being settled, and whether it was kept past this
        channel's close (then call :meth:`_kept_settled` once it is settled)."""
        with self._leases_lock:
            return self._leases.pop(delivery_tag, None), self._kept.pop(delivery_tag, None) is not None

    def _take_batch(self, delivery_tag: str) -> _HeldBatch | None:
        """The rest of a batch delivery being settled (None for a single message). Its
        first lease settles through :meth:`_take_lease`; releasing or nacking that one
        returns the rest too, which is all that closing or a requeue need."""
        with self._leases_lock:
            return self._batches.pop(delivery_tag, None)

    def _kept_settled(self, kept: bool) -> None:
        if kept:
            self._transport.kept_lease_settled()

    def unsettled_leases(self) -> list[Lease]:
        with self._leases_lock:
            return [*self._leases.values(), *(lease for held in self._batches.values() for lease in held.rest)]

    def has_kept_leases(self) -> bool:
        with self._leases_lock:
            return bool(self._kept)

    def forget_lease(self, lease: Lease) -> bool:
        """Stop tracking ``lease`` (it expired); False when it was settled meanwhile."""
        with self._leases_lock:
            for tag, held in list(self._leases.items()):
                if held is lease:
                    del self._leases[tag]
                    self._batches.pop(tag, None)  # the engine returned the rest with it
                    self._lost[tag] = lease
                    break
            else:
                return False
            kept = self._kept.pop(tag, None) is not None
        if kept:
            self._transport.kept_lease_settled()
        return True

    def release_dropped_requests(self) -> None:
        """Give back the kept leases whose Celery request no longer exists: Celery dropped
        the task without running it to the end, so no ack will ever come."""
        with self._leases_lock:
            dropped = [tag for tag, request in self._kept.items() if request() is None]
            leases = [self._leases.pop(tag) for tag in dropped if tag in self._leases]
            for tag in dropped:
                del self._kept[tag]
                self._batches.pop(tag, None)  # released with its first lease
        if leases:
            logger.info("giving back %d message(s) Celery dropped after the connection was lost", len(leases))
            _release_leases(self.broker, leases)
        for _ in dropped:
            self._transport.kept_lease_settled()

    def _warn_fenced(self, lease: Lease) -> None:
        logger.warning(
            "late ack of message %s (key %r) refused: its lease had expired and the message "
            "was delivered again (a frozen or cut-off worker?), so this run's side effects may "
            "have happened alongside or after the next run of the message",
            lease.id, lease.key,
        )

    def basic_ack(self, delivery_tag, multiple=False):
        batch = self._take_batch(delivery_tag)
        lease, kept = self._take_lease(delivery_tag)
        try:
            # Pool threads ack concurrently: the transport's AckGroup sends acks that arrive
            # while one is in flight together, in one ack_many. Through _transport, not
            # connection: kombu clears connection on close, and a kept lease settles later.
            if lease is not None and batch is not None:
                self._settle_batch([lease, *batch.rest], batch, dead=False)
            elif lease is not None and not self._transport.acks.ack(lease):
                self._warn_fenced(lease)
            elif lease is None:
                with self._leases_lock:
                    lost = self._lost.pop(delivery_tag, None)
                if lost is not None:
                    self._warn_fenced(lost)
        finally:
            self._kept_settled(kept)
        super().basic_ack(delivery_tag)

    def basic_reject(self, delivery_tag, requeue=False):
        batch = self._take_batch(delivery_tag)
        lease, kept = self._take_lease(delivery_tag)
        try:
            if lease is not None:
                # A batch's other leases go back with its first one here, except when a
                # batch task recorded which message failed.
                if requeue and _celery_worker_terminating():
                    # A cold shutdown killed the task: given back uncounted, as on closing.
                    _release_leases(self.broker, [lease])
                elif requeue:
                    self.broker.nack(lease)  # back to the head of its key, the delivery counted
                elif batch is not None:
                    self._settle_batch([lease, *batch.rest], batch, dead=True)
                else:
                    self.broker.nack(lease, dead=True, reason="rejected by the consumer (requeue=False)")
        finally:
            self._kept_settled(kept)
        with self._leases_lock:
            self._lost.pop(delivery_tag, None)
        self.qos.reject(delivery_tag, requeue=False)

    def _restore(self, message) -> None:
        """Give an unacked message back to the engine (channel close, basic_recover)."""
        with self._leases_lock:
            if message.delivery_tag in self._kept:
                return  # its task still runs: it settles when it ends
        self._take_batch(message.delivery_tag)  # its other leases go back with the first
        lease, _ = self._take_lease(message.delivery_tag)  # never a kept one: see above
        if lease is not None:
            _release_leases(self.broker, [lease])

    def _restore_at_beginning(self, message) -> None:
        self._restore(message)

    def close(self) -> None:
        # Unsettled leases go back in one call, except those of tasks a Celery worker of
        # this process still runs or will run (a consumer restart after a lost connection
        # closes the channel under them): those stay leased and extended, and settle
        # through this channel when their tasks end. kombu's QoS would then restore the
        # messages one call each, finding none left.
        transport = self._transport
        with self._leases_lock:
            if not self.closed:
                self._kept = _celery_requests_by_tag(self._leases)
            given_back = [lease for tag, lease in self._leases.items() if tag not in self._kept]
            self._leases = {tag: lease for tag, lease in self._leases.items() if tag in self._kept}
            self._batches = {tag: held for tag, held in self._batches.items() if tag in self._kept}
        if self._kept and not self.closed:
            logger.warning(
                "channel closed under %d running or queued task(s): their leases are kept and "
                "extended until they end; %d prefetched message(s) given back",
                len(self._kept), len(given_back),
            )
        if transport is not None and given_back:
            _release_leases(transport.broker, given_back)
        super().close()


# The channel class by a name the Transport's own body does not shadow (its ``Channel``
# attribute, which kombu reads, is a variable to a type checker).
_LeaseChannel = Channel


# -- cancel and get by task id ------------------------------------------------------------


def _task_id(task: Any) -> str:
    """A Celery task id from an id or an ``AsyncResult`` (anything with a str ``id``)."""
    task_id = task if isinstance(task, str) else getattr(task, "id", None)
    if not isinstance(task_id, str) or not task_id:
        raise InvalidArgumentType(f"expected a Celery task id or AsyncResult, not {task!r:.80}")
    return task_id


def _current_app() -> Any:
    """The Celery app this process uses, if any (read without creating or finalizing one)."""
    state = sys.modules.get("celery._state")
    return None if state is None else (getattr(state._tls, "current_app", None) or state.default_app)


def _queues_holding_tasks(broker: sharded_broker.Broker, app: Any) -> list[str]:
    """Where a task's message may be, in the order cancel and get ask: the app's task
    queues (its default queue first), then every other queue of the engine, except those
    Celery keeps for remote control and events (``*.pidbox``, ``celeryev.*``: one per
    worker and per ``inspect`` call, and never a task in them)."""
    queues = queues_to_search(broker, _task_queues(app) if app is not None else [])
    return [queue for queue in queues if not (queue.endswith(".pidbox") or queue.startswith("celeryev."))]


def _task_queues(app: Any) -> list[str]:
    """The queues ``app`` routes tasks to, its default queue first."""
    default = app.conf.task_default_queue or "celery"
    try:
        declared = list(app.amqp.queues)
    except Exception:  # an app whose queues cannot be built (bad configuration): the default only
        declared = []
    return list(dict.fromkeys([default, *declared]))


@contextmanager
def _engine(app: Any) -> Iterator[sharded_broker.Broker]:
    """The engine broker of a connection of ``app`` (its ``sharded+`` broker URL)."""
    with app.connection_for_write() as connection:
        transport = connection.transport
        if not isinstance(transport, Transport):
            raise ConfigurationError(
                f"the app's broker transport is {type(transport).__module__}.{type(transport).__name__}, not "
                f"sharded-broker's: cancel and get need a {ALIAS}+ broker URL"
            )
        yield transport.broker


def cancel(app: Any, task: Any, *, queue: str | None = None) -> CancelResult:
    """Cancel a task that is still waiting (or delayed) in the broker, from any process
    (``task``: its id or its ``AsyncResult``): its message is deleted and never runs, and
    its key moves on (``Broker.cancel(queue, ref=task_id)``: the task id is its message's
    ref). A task already running (``state="leased"``) or dead-lettered is refused, and one
    already done answers ``state=None``: the answer (:class:`~sharded_broker.CancelResult`)
    says which; it is truthy when cancelled.

    ``queue``: the queue the task was sent to; by default the app's task queues are
    searched (its default queue first), then every other queue of the engine but Celery's
    remote-control and event queues, one call each, until one holds the task. ``AsyncResult.revoke()`` does the same as this, and
    tells the workers too."""
    task_id = _task_id(task)
    with _engine(app) as broker:
        return cancel_by_ref(broker, task_id, [queue] if queue is not None else _queues_holding_tasks(broker, app))


def get(app: Any, task: Any, *, queue: str | None = None) -> MessageInfo | None:
    """What the message of a task is doing now (waiting, delayed, leased, dead:
    :class:`~sharded_broker.MessageInfo`), from any process, or ``None`` once it is done
    or cancelled. ``queue`` as for :func:`cancel`."""
    task_id = _task_id(task)
    with _engine(app) as broker:
        return get_by_ref(broker, task_id, [queue] if queue is not None else _queues_holding_tasks(broker, app))


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


def _lost_lease(channel: "Channel", lease: Lease) -> None:
    """The heartbeat could not extend ``lease``: settled since the beat began (nothing to
    say), or really expired."""
    if channel.forget_lease(lease):
        logger.warning("lease of message %s (key %r) expired before its heartbeat: it will run again", lease.id, lease.key)


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
    # kombu declares these as 1-tuples; a transport adds its own errors to them.
    connection_errors = virtual.Transport.connection_errors + (BackendUnavailable,)  # type: ignore[assignment]
    channel_errors = virtual.Transport.channel_errors + (BackendUnavailable,)  # type: ignore[assignment]

    def __init__(self, client, **kwargs: Any) -> None:
        options = dict(client.transport_options or {})
        self.engine_url = engine_url(client)
        try:
            sharded_broker.broker.backend_class(self.engine_url)  # unknown scheme: fail now
        except InvalidURL as exc:
            raise InvalidURL(f"broker URL {ALIAS}+{sharded_broker.redact_url(self.engine_url)}: {exc}") from None
        self.shard_keys, heartbeat_option, self.engine_options = _split_options(options)
        self.engine_options.update(_ssl_options(client, self.engine_url))
        # Before connect(): an error of a SHARDED_BROKER_* variable names the variable, not
        # broker_transport_options.
        self.engine_options = environment.options(self.engine_options, self.engine_url)
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
        if heartbeat_option is not None and heartbeat_option >= self.visibility_timeout:
            self.broker.close()
            raise ConfigurationError(
                f"transport option heartbeat_interval {heartbeat_option:g} must be shorter than "
                f"the shortest visibility_timeout {self.visibility_timeout:g} (leases would expire "
                f"between beats and long tasks run twice); the default is a third of it"
            )
        self.heartbeat_interval: float = (
            self.visibility_timeout / 3 if heartbeat_option is None else heartbeat_option
        )
        # Pool threads ack concurrently: acks arriving while one is in flight go together.
        self.acks = AckGroup(self.broker)
        _connect_worker_init()  # Celery may have been imported after this module
        self._control_checked_at = 0.0
        self._heartbeat: LeaseHeartbeat[_LeaseChannel] | None = None
        self._heartbeat_lock = threading.Lock()
        # Channels that leased messages: open ones, and closed ones keeping the leases of
        # tasks still running. The engine stays open until the last kept lease settles.
        self._lease_channels: list[_LeaseChannel] = []
        self._connection_closed = False
        self._engine_closed = False
        self.auto_delete_queues: set[str] = set()
        self._batch_sizes: dict[str, tuple[int, int]] = {}  # queue -> (task count, size)

    def batch_task(self, name: Any) -> Any:
        """The ``BatchTask`` registered as ``name`` in a Celery app of this process, if any."""
        task = _find_task(name) if isinstance(name, str) else None
        return task if _is_batch_task(task) else None

    def batch_size(self, queue: str) -> int:
        """How many messages of a key to lease at once from ``queue``: the largest
        ``batch`` of the batch tasks routed to it (as ``task_routes`` route a call without
        arguments, else ``task_default_queue``), 1 without any. Recomputed when the apps'
        task registries change size."""
        state = sys.modules.get("celery._state")
        if state is None:
            return 1
        apps = [app for app in list(state._get_active_apps()) if getattr(app, "configured", False)]
        registries = [getattr(app, "_tasks", {}) for app in apps]
        version = sum(len(tasks) for tasks in registries)
        cached = self._batch_sizes.get(queue)
        if cached is not None and cached[0] == version:
            return cached[1]
        sizes = [
            task.batch
            for app, tasks in zip(apps, registries)
            for task in list(tasks.values())
            if _is_batch_task(task) and _task_queue(app, task) == queue
        ]
        size = max(sizes, default=1)
        self._batch_sizes[queue] = (version, size)
        return size

    def start_heartbeat(self, channel: _LeaseChannel) -> None:
        """Start extending the leases of ``channel`` (one heartbeat per transport, in the
        consuming process)."""
        with self._heartbeat_lock:
            if channel not in self._lease_channels:
                self._lease_channels.append(channel)
            if self._heartbeat is None:
                # Extends the leases of delivered, unsettled messages until the transport
                # closes (and, after it closed, until the tasks whose leases it kept end).
                self._heartbeat = LeaseHeartbeat(
                    self.broker, held=self._leases_to_extend, expired=_lost_lease,
                    interval=lambda: self.heartbeat_interval, visibility_timeout=lambda: self.visibility_timeout,
                    logger=logger,
                )
                self._heartbeat.start()

    def _leases_to_extend(self) -> list[tuple[_LeaseChannel, Lease]]:
        """The heartbeat's beat: first give back what Celery dropped (which may close the
        engine and stop the heartbeat), then every unsettled lease with its channel."""
        channels = self.lease_channels()
        for channel in channels:
            channel.release_dropped_requests()
        return [(channel, lease) for channel in channels for lease in channel.unsettled_leases()]

    # verify_connection is kombu's default (True, no backend call), as for kombu's redis://
    # transport: kombu asks it on every publish, where a round trip doubled the calls per
    # message. A backend that went away shows as BackendUnavailable, a connection error,
    # on the next operation, and kombu's retries handle that.

    def lease_channels(self) -> list[_LeaseChannel]:
        """The channels whose leases the heartbeat extends; closed channels without kept
        leases are dropped."""
        with self._heartbeat_lock:
            self._lease_channels = [c for c in self._lease_channels if not c.closed or c.has_kept_leases()]
            return list(self._lease_channels)

    def kept_lease_settled(self) -> None:
        """A lease kept past its channel's close settled: once the connection is closed
        and none is left, stop the heartbeat and close the engine."""
        if self._connection_closed and not any(c.has_kept_leases() for c in self.lease_channels()):
            self._close_engine()

    def _close_engine(self) -> None:
        with self._heartbeat_lock:
            if self._engine_closed:
                return
            self._engine_closed = True
            heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stopped.set()
            if heartbeat is not threading.current_thread():
                # A beat in flight finishes before the engine closes under it.
                heartbeat.join(HEARTBEAT_JOIN_TIMEOUT)
        self.broker.close()

    def establish_connection(self):
        self.broker.now()  # reach the backend now, so kombu's connection retry applies
        _hold_keys_in_celery_apps()
        return super().establish_connection()

    def close_connection(self, connection) -> None:
        try:
            super().close_connection(connection)  # closes channels: unacked messages go back
        finally:
            self._connection_closed = True
            if not any(c.has_kept_leases() for c in self.lease_channels()):
                self._close_engine()

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
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
            if self._deliver_control_messages():
                return
            try:
                cast(virtual.base.FairCycle, self.cycle).get(self._deliver, timeout=timeout)  # built by kombu's __init__
                return
            except Empty:
                pass
            remaining = None if timeout is None else timeout - (time.monotonic() - started)
            if remaining is not None and remaining <= 0:
                raise socket.timeout()
            pause = self.polling_interval if remaining is None else min(self.polling_interval, remaining)
            self._wait_for_work(pause)

    def _deliver_control_messages(self, every_time: bool = False) -> bool:
        """Deliver waiting remote-control messages (the queues consumed with ``no_ack``:
        Celery's pidbox and reply queues) ahead of tasks; True when some were delivered.

        So ``ping``, ``inspect`` and ``revoke`` are answered before the tasks queued with
        them run, and a ``revoke`` sent just before the task it names wins the race.
        Without ``every_time``, at most once per ``CONTROL_CHECK_INTERVAL``.
        """
        now = time.monotonic()
        if not every_time and now - self._control_checked_at < CONTROL_CHECK_INTERVAL:
            return False
        self._control_checked_at = now
        delivered = False
        for channel in list(self.channels):
            for queue in [q for q in channel._active_queues if q in channel._noack_queues]:
                try:
                    channel._get_bulk(queue, self._deliver)
                    delivered = True
                except Empty:
                    pass
        return delivered

    def _wait_for_work(self, seconds: float) -> None:
        """Block up to ``seconds`` in one backend call over every queue consumed (the
        remote-control queue included); it returns early when a message may have come."""
        queues = sorted({queue for channel in self.channels for queue in channel._active_queues})
        if queues:
            self.broker.wait_for_work(queues, seconds)
        else:
            time.sleep(seconds)

    def driver_version(self) -> str:
        return sharded_broker.__version__

    @classmethod
    def as_uri(cls, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The broker URL; for display (the worker banner, logs) without the password and
        with a SQLite file by its absolute path, so a relative path shows where it led."""
        if uri in ("", BARE_URL):
            # Shown as the engine URL SHARDED_BROKER_URL gave, never with its password.
            uri = environment.url(None) or uri
        if include_password:
            return f"{ALIAS}+{uri}"
        return f"{ALIAS}+{sharded_broker.display_url(uri).replace('***', mask)}"


def _celery_requests_by_tag(leases: Mapping[str, Lease]) -> dict[str, Callable[[], Any]]:
    """The delivery tags among ``leases`` whose tasks a Celery worker of this process
    has taken and not finished (reserved: handed to its pool, or running), each with a
    weak reference to Celery's request.

    Celery's prefork and threads pools run what was handed to them even after the
    connection it came from closed; a request Celery dropped (a cancelled ETA timer, a
    rate-limit bucket) is garbage, and its weak reference dies.
    """
    state = sys.modules.get("celery.worker.state")
    if state is None or not leases:
        return {}
    found: dict[str, Callable[[], Any]] = {}
    for request in _snapshot(state.reserved_requests) + _snapshot(state.active_requests):
        message = getattr(request, "_message", None)
        tag = getattr(message, "delivery_tag", None)
        if isinstance(tag, str) and tag in leases:
            try:
                found[tag] = weakref.ref(request)
            except TypeError:  # a request type without weak references: kept as is
                found[tag] = _strong_reference(request)
    return found


def _strong_reference(request: Any) -> Callable[[], Any]:
    return lambda: request


def _snapshot(requests: Any) -> list[Any]:
    """A copy of one of Celery's request sets, which the pool's result thread changes."""
    while True:
        try:
            return list(requests)
        except RuntimeError:  # changed size during iteration: read it again
            continue


def _celery_worker_terminating() -> bool:
    """True once a Celery worker in this process is in a cold shutdown."""
    state = sys.modules.get("celery.worker.state")
    return state is not None and state.should_terminate not in (None, False)


def _celery_worker_stopping() -> bool:
    """True once a Celery worker in this process was told to stop, warm or cold (the
    flags ``celery.worker.state.maybe_shutdown`` acts on)."""
    state = sys.modules.get("celery.worker.state")
    if state is None:
        return False
    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


def engine_url(client) -> str:
    """The engine URL of a kombu connection to ``sharded+<engine URL>``.

    ``sharded://`` alone takes the engine URL from ``SHARDED_BROKER_URL``.
    kombu passes everything after ``sharded+`` as ``hostname``; credentials, port and
    virtual host given separately (Celery's ``broker_user``, ``broker_password``,
    ``broker_port``, ``broker_vhost``) fill what the URL leaves out.
    """
    url = client.hostname or ""
    if url in ("", BARE_URL):
        # Bare sharded:// names no engine URL: SHARDED_BROKER_URL does.
        url = environment.url(None) or ""
        if not url:
            raise InvalidURL(
                f"broker URL {ALIAS}:// takes its engine URL from {environment.URL_VARIABLE}, which is not set; "
                f"set it or use sharded+<engine URL>, e.g. sharded+redis://localhost:6379/0"
            )
    if "://" not in url:
        raise InvalidURL(
            f"broker URL must be sharded+<engine URL>, e.g. sharded+redis://localhost:6379/0, "
            f"sharded+sqlite:///q.db or sharded+memory://; got engine URL {url!r}"
        )
    return with_connection_parts(
        url, user=client.userid, password=client.password, port=client.port, vhost=client.virtual_host
    )


def _ssl_options(client, url: str) -> dict[str, Any]:
    """Celery's ``broker_use_ssl`` (redis-py ``ssl_*`` arguments) for a ``rediss://`` URL."""
    if not url.startswith(("rediss://", "rediss+cluster://")) or not isinstance(client.ssl, Mapping):
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


# -- Celery: control replies while the pool is busy -----------------------------------------


def _free_the_consumer_from_a_busy_pool(sender: Any = None, **_: Any) -> None:
    """``worker_init``: a worker on this transport does not wait for a free pool slot
    before taking its next message.

    The transport has no event loop, so Celery runs its blocking loop, where a pool
    with "putlocks" (the default) blocks the consumer's only thread until a process is
    free: remote-control messages (``ping``, ``inspect``, ``revoke``) then wait behind
    busy tasks. Without them, delivered tasks wait in the pool's own queue instead (as
    many as the prefetch limit allows) and control replies go out at once. Celery reads
    the setting before this transport loads, so the worker's own attribute is changed,
    before its Pool step is built.
    """
    app = getattr(sender, "app", None)
    urls = [app.conf.get("broker_url"), app.conf.get("broker_read_url")] if app is not None else []
    if any(isinstance(url, str) and url.lower().startswith((f"{ALIAS}+", BARE_URL)) for url in urls):
        sender.pool_putlocks = False


def _connect_worker_init() -> None:
    if "celery" not in sys.modules:
        return  # kombu used without Celery
    from celery.signals import worker_init

    worker_init.connect(_free_the_consumer_from_a_busy_pool, weak=False, dispatch_uid="sharded-broker-putlocks")


_connect_worker_init()


# -- Celery: order under the default task_acks_late=False ----------------------------------

# Task attributes this transport sets on every task of an app that consumes through it,
# with the setting that gives their default and why.
_FORCED_TASK_OPTIONS = (
    ("acks_late", "task_acks_late",
     "an early ack releases a task's shard key when it starts, so the next task of the key "
     "would run at the same time"),
    ("reject_on_worker_lost", "task_reject_on_worker_lost",
     "a task whose pool process dies (SIGKILL, the OOM killer) would be acked as failed, "
     "lost, and its key would move on"),
)

_warned: set[tuple[str, str]] = set()


def _uses_this_transport(app: Any) -> bool:
    """True when the connections ``app`` opens use this transport, whichever way the URL
    reached Celery: ``app.conf.broker_url`` (a string or a failover list), ``-b``,
    ``CELERY_BROKER_URL``, ``broker_read_url``. Decided by the transport class kombu
    resolves for the app's own connections, not by the configuration's text."""
    from kombu.transport import resolve_transport

    for open_connection in (app.connection_for_read, app.connection_for_write):
        try:
            connection = open_connection()
        except Exception:  # not our transport's business: the app reports its own URL errors
            continue
        try:
            transport = resolve_transport(connection.transport_cls)
        except Exception:
            continue
        finally:
            connection.release()
        if isinstance(transport, type) and issubclass(transport, Transport):
            return True
    return False


def _explicitly_set(app: Any, setting: str) -> bool:
    """True when the app's configuration (not Celery's defaults) sets ``setting``."""
    maps = getattr(app.conf, "maps", None) or []
    return any(setting in layer for layer in maps[:-1])


def _hold_keys_in_celery_apps() -> None:
    """Make every task of the Celery apps using this transport acknowledge late and be
    delivered again when its pool process dies.

    With ``acks_late=False`` Celery acks a message when the task *starts*, which would
    release its key and let the key's next message run concurrently; with
    ``reject_on_worker_lost=False`` it acks the ``WorkerLostError`` of a killed pool
    process, losing the message. The transport sets both (a task killed with its process
    comes back at the head of its key, counted toward ``max_deliveries``, so one that
    always kills its process is dead-lettered) and warns, naming the consequence, when the
    configuration explicitly asks otherwise. Runs when the transport connects, which in a
    worker is the consumer's Connection step, before the Tasks step builds the task
    strategies.
    """
    state = sys.modules.get("celery._state")
    if state is None:
        return
    for app in list(state._get_active_apps()):
        if not getattr(app, "configured", False) or not _uses_this_transport(app):
            continue
        for attribute, setting, consequence in _FORCED_TASK_OPTIONS:
            configured = bool(app.conf.get(setting))
            if not configured and _explicitly_set(app, setting):
                _warn_once(app.main, setting, f"{setting}=False is ignored with a sharded+ broker: {consequence}")
            app.conf[setting] = True  # tasks bound from now on
            for name, task in list(getattr(app, "_tasks", {}).items()):
                value = getattr(task, attribute, None)
                if not value:  # False, or None: Celery's default for reject_on_worker_lost
                    if configured and value is False:  # the task's own option, against the app's
                        _warn_once(name, attribute, f"task {name!r}: {attribute}=False is ignored with "
                                                    f"a sharded+ broker: {consequence}")
                    setattr(task, attribute, True)


def _warn_once(owner: str, what: str, text: str) -> None:
    if (owner, what) not in _warned:
        _warned.add((owner, what))
        logger.warning(text)
