"""The Redis backend on redis-py's asyncio client, for :mod:`sharded_broker.aio`.

It runs the very steps the blocking backend runs (:class:`~.redis.RedisOperations`: the
same functions, keys, arguments and reply parsing), awaiting each request on a
``redis.asyncio`` connection instead of blocking on one; waiting for work is a BLPOP on an
asyncio connection of its own, and events come from an asyncio pub/sub connection, so no
call blocks the event loop. Each method is the coroutine of the :class:`~..backend.Backend`
method of the same name, with the same arguments and answers.

:class:`AsyncRedisClusterBackend` is the asyncio twin of
:class:`~.redis_cluster.RedisClusterBackend` (``redis+cluster://``), here because this
module alone reaches redis.asyncio for the engine (aio.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping, Sequence, TypeVar

import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.exceptions
from redis._parsers.commands import AsyncCommandsParser
from redis.crc import key_slot

from ..backend import KeySort
from ..errors import BackendUnavailable
from ..models import (
    CancelResult, DeadLetter, Event, KeyFacts, KeyInfo, Lease, LeaseResult, Message, MessageInfo, MinuteMetrics,
    QueueSettings, QueueStats, RetryPosition, Schedule,
)
from .redis import (
    _LIBRARY, MAX_BLOCK, Command, FunctionCall, Pipeline, RedisExecutor, RedisOperations, ReplicasShort, ReplicaWait,
    Request, Steps, WaitSignals, blpop_timeout, pipelined_wait, sentinel_manager, signalled, translated_errors,
)
from .redis_cluster import (
    ASKING, CALL_ATTEMPTS, CONNECTION_ERRORS, REDIRECTIONS, RETRY_PAUSE, SIGNAL_BLOCK, UNREAD, by_master,
    checked_cluster_options, cluster_client, exhausted, fcall_alone, fcall_keys, packed, refused, retry_pause,
    share_short, share_writes, step_alone, unreachable, waited_steps,
)

T = TypeVar("T")


def raise_if_cancelled() -> None:
    """CancelledError if the running task was cancelled and the error never reached it.
    Python 3.11's ``asyncio.wait_for``, which redis.asyncio sends under (``socket_timeout``,
    5 s on a cluster's nodes), returns the send's result when the send finished just as
    the cancel came, dropping the cancel (fixed in 3.12): a cancelled lease then went on
    waiting and leasing. ``Task.cancelling()`` still counts it (3.11 and later)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


async def replied_after_wait(conn: Any, wait: ReplicaWait, safe_url: str) -> Any:
    """:func:`~.redis.replied_after_wait` on an asyncio connection: the call's reply, then
    its WAIT's answer, checked; the call's error raised once WAIT's answer is read (WAIT's
    own error after a refused call dropped)."""
    try:
        reply = await conn.read_response()
    except redis.exceptions.ResponseError as exc:
        try:
            await conn.read_response()
        except redis.exceptions.ResponseError:
            pass
        raise exc
    wait.check(await conn.read_response(), safe_url)
    return reply


class AsyncRedisBackend(RedisExecutor):
    """Queues in a Redis server, reached through ``redis.asyncio``; the options of
    :class:`~.redis.RedisBackend`. Its connections belong to the event loop that first
    uses them."""

    # A BLPOP timeout ends at the server's next cron tick (hz 10 by default).
    wait_resolution = 0.1

    client_module = redis.asyncio

    # -- the executor -------------------------------------------------------------------

    async def _drive(self, steps: Steps[T]) -> T:
        """Run an operation's steps: await each request, hand back its reply (or throw its
        error in), until the operation answers."""
        with translated_errors(self._safe_url):
            try:
                request = next(steps)
                while True:
                    try:
                        reply = await self._send(request)
                    except redis.exceptions.RedisError as exc:
                        raise_if_cancelled()
                        request = steps.throw(exc)
                    else:
                        raise_if_cancelled()
                        request = steps.send(reply)
            except StopIteration as done:
                return done.value

    async def _send(self, request: Request) -> Any:
        if type(request) is FunctionCall:
            wait = self._replica_wait
            if wait is not None and wait.after(request.function):
                return await self._fcall(self._packed.pack(request), wait)
            return await self._fcall(self._packed.pack(request))
        if type(request) is WaitSignals:
            return signalled(await self._blocking_client.blpop(request.keys, timeout=blpop_timeout(request.timeout)))
        if type(request) is Command:
            return await getattr(self._client, request.method)(*request.args, **request.kwargs)
        assert type(request) is Pipeline
        async with self._client.pipeline(transaction=False) as pipe:
            if request.prelude is not None:
                getattr(pipe, request.prelude.method)(*request.prelude.args, **request.prelude.kwargs)
            for call in request.calls:
                pipe.fcall(self._functions[call.function], len(call.keys), *call.keys, *call.args)
            wait = pipelined_wait(self._replica_wait, request)
            if wait is None:
                return await pipe.execute(raise_on_error=False)
            pipe.wait(wait.replicas, wait.millis)
            *replies, acknowledged = await pipe.execute(raise_on_error=False)
        try:
            wait.check(acknowledged, self._safe_url)
        except ReplicasShort:
            await self._client.connection_pool.disconnect(inuse_connections=False)  # as RedisBackend._reconnect
            raise
        return replies

    async def _fcall(self, command: bytes, wait: ReplicaWait | None = None) -> Any:
        """One packed FCALL, sent and read as RedisBackend._fcall does (a pooled connection,
        the client's retry policy, error replies raised; with ``wait``, its WAIT in the same
        write, read and checked as redis.replied_after_wait does)."""
        pool = self._client.connection_pool
        conn = await pool.get_connection()

        async def attempt() -> Any:
            if wait is None:
                await conn.send_packed_command([command])
                return await conn.read_response()
            await conn.send_packed_command([command, wait.command])
            return await replied_after_wait(conn, wait, self._safe_url)

        short_of_replicas = False
        try:
            return await conn.retry.call_with_retry(attempt, lambda error: conn.disconnect())
        except ReplicasShort:
            short_of_replicas = True
            raise
        finally:
            await pool.release(conn)
            if short_of_replicas:
                await pool.disconnect(inuse_connections=False)  # as RedisBackend._reconnect

    # -- the contract, awaitable ----------------------------------------------------------

    async def now(self) -> float:
        return await self._drive(self._ops.now())

    async def enqueue_many(self, queue: str, messages: Sequence[Message], settings: QueueSettings) -> list[str]:
        return await self._drive(self._ops.enqueue_many(queue, messages, settings))

    async def lease(
        self, queue: str, limit: int, per_key: int, visibility_timeout: float, settings: QueueSettings
    ) -> LeaseResult:
        return await self._drive(self._ops.lease(queue, limit, per_key, visibility_timeout, settings))

    async def ack_many(self, leases: Sequence[Lease]) -> list[bool]:
        return await self._drive(self._ops.ack_many(leases))

    async def release_many(self, leases: Sequence[Lease]) -> list[bool]:
        return await self._drive(self._ops.release_many(leases))

    async def nack(
        self, lease: Lease, *, delay: float, dead: bool, reason: str | None, settings: QueueSettings
    ) -> bool:
        return await self._drive(self._ops.nack(lease, delay=delay, dead=dead, reason=reason, settings=settings))

    async def extend(self, lease: Lease, visibility_timeout: float) -> float | None:
        return (await self.extend_many([lease], [visibility_timeout]))[0]

    async def extend_many(self, leases: Sequence[Lease], visibility_timeouts: Sequence[float]) -> list[float | None]:
        return await self._drive(self._ops.extend_many(leases, visibility_timeouts))

    async def set_interval(self, queue: str, key: str, seconds: float | None) -> None:
        await self._drive(self._ops.set_interval(queue, key, seconds))

    async def set_weight(self, queue: str, key: str, weight: int | None) -> None:
        await self._drive(self._ops.set_weight(queue, key, weight))

    async def set_paused(self, queue: str, key: str | None, paused: bool) -> None:
        await self._drive(self._ops.set_paused(queue, key, paused))

    async def stats(self, queue: str) -> QueueStats:
        return await self._drive(self._ops.stats(queue))

    async def queues(self) -> list[str]:
        return await self._drive(self._ops.queues())

    async def dead_letters(self, queue: str, limit: int, offset: int) -> list[DeadLetter]:
        return await self._drive(self._ops.dead_letters(queue, limit, offset))

    async def replay(self, queue: str, ids: Sequence[str] | None, position: RetryPosition) -> int:
        return await self._drive(self._ops.replay(queue, ids, position))

    async def purge(self, queue: str, dead: bool) -> int:
        return await self._drive(self._ops.purge(queue, dead))

    async def cancel(
        self, queue: str, message_id: str | None, settings: QueueSettings, ref: str | None = None
    ) -> CancelResult:
        return await self._drive(self._ops.cancel(queue, message_id, settings, ref))

    async def get(self, queue: str, message_id: str | None, ref: str | None = None) -> MessageInfo | None:
        return await self._drive(self._ops.get(queue, message_id, ref))

    async def bind(self, exchange: str, queue: str) -> None:
        await self._drive(self._ops.bind(exchange, queue))

    async def unbind(self, exchange: str, queue: str) -> None:
        await self._drive(self._ops.unbind(exchange, queue))

    async def bound_queues(self, exchange: str) -> list[str]:
        return await self._drive(self._ops.bound_queues(exchange))

    async def metrics(self, queue: str, minutes: int, key: str | None) -> list[MinuteMetrics]:
        return await self._drive(self._ops.metrics(queue, minutes, key))

    async def keys(self, queue: str, limit: int, sort: KeySort) -> list[KeyInfo]:
        return await self._drive(self._ops.keys(queue, limit, sort))

    async def key_info(self, queue: str, key: str) -> KeyInfo:
        return await self._drive(self._ops.key_info(queue, key))

    async def key_facts(self, queue: str, keys: Sequence[str]) -> list[KeyFacts]:
        return await self._drive(self._ops.key_facts(queue, keys))

    async def head_times(self, queue: str, keys: Sequence[str]) -> tuple[float, list[float | None]]:
        return await self._drive(self._ops.head_times(queue, keys))

    async def backlog_keys(self, queue: str, offset: int, count: int) -> list[str]:
        return await self._drive(self._ops.backlog_keys(queue, offset, count))

    async def put_schedule(self, queue: str, schedule: Schedule) -> Schedule:
        return await self._drive(self._ops.put_schedule(queue, schedule))

    async def schedules(self, queue: str) -> list[Schedule]:
        return await self._drive(self._ops.schedules(queue))

    async def due_schedules(self, queue: str, limit: int) -> tuple[float, list[Schedule]]:
        return await self._drive(self._ops.due_schedules(queue, limit))

    async def fire_schedule(
        self, queue: str, name: str, expected_due: float, next_due: float, message: Message, settings: QueueSettings
    ) -> str | None:
        return await self._drive(self._ops.fire_schedule(queue, name, expected_due, next_due, message, settings))

    async def set_schedule_paused(self, queue: str, name: str, paused: bool, next_due: float | None) -> bool:
        return await self._drive(self._ops.set_schedule_paused(queue, name, paused, next_due))

    async def remove_schedule(self, queue: str, name: str) -> bool:
        return await self._drive(self._ops.remove_schedule(queue, name))

    async def wait(self, queue: str, timeout: float) -> None:
        await self.wait_any([queue], timeout)

    async def wait_any(self, queues: Sequence[str], timeout: float) -> None:
        await self._drive(self._ops.wait_any(queues, timeout))

    async def subscribe(self, queue: str) -> "AsyncRedisSubscription":
        channels = await self._drive(self._ops.events_channels(queue))
        with translated_errors(self._safe_url):
            pubsub = self._blocking_client.pubsub()
            await pubsub.subscribe(*channels)
            # Wait for the server's confirmations: events published from now on are received.
            deadline = time.monotonic() + MAX_BLOCK + 5.0
            for _ in channels:
                confirmation = await pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if confirmation is None or confirmation["type"] != "subscribe":
                    await pubsub.aclose()
                    raise BackendUnavailable(f"redis at {self._safe_url} did not confirm the events subscription")
        return AsyncRedisSubscription(self._safe_url, queue, pubsub)

    async def close(self) -> None:
        await self._client.aclose()
        await self._blocking_client.aclose()
        await self._client.connection_pool.disconnect()
        await self._blocking_client.connection_pool.disconnect()
        manager = sentinel_manager(self._client)
        if manager is not None:
            await manager.aclose()


class AsyncRedisSubscription:
    """An asyncio pub/sub connection on a queue's events channel."""

    def __init__(self, safe_url: str, queue: str, pubsub: Any) -> None:
        self._safe_url = safe_url
        self._queue = queue
        self._pubsub = pubsub

    async def get(self, timeout: float) -> list[Event]:
        """The events received since the last call, waiting up to ``timeout`` seconds for the first."""
        events: list[Event] = []
        with translated_errors(self._safe_url):
            message = await self._pubsub.get_message(timeout=timeout)
            while message is not None:
                if message["type"] == "message":
                    events.extend(RedisOperations.parse_events(self._queue, message["data"]))
                message = await self._pubsub.get_message(timeout=0)
        return events

    async def close(self) -> None:
        await self._pubsub.aclose()


# -- on a Redis Cluster (redis_cluster.py has the blocking executor and what both share) --


class _AsyncLocalFcallKeys(AsyncCommandsParser):
    """:class:`_LocalFcallKeys` for redis.asyncio's cluster."""

    async def get_keys(self, *args: Any) -> Any:
        keys = fcall_keys(args)
        return keys if keys is not None else await super().get_keys(*args)


class _AsyncSignalWaits:
    """:class:`_SignalWaits` on asyncio: each BLPOP in flight is a task reading its own
    connection, kept across waits."""

    def __init__(self, client: redis.asyncio.cluster.RedisCluster) -> None:
        self._client = client
        self._in_flight: dict[bytes, asyncio.Task[Any]] = {}
        self._connections: dict[bytes, Any] = {}
        self._taken: set[bytes] = set()
        self._retry_at: dict[bytes, float] = {}

    async def wait(self, keys: Sequence[bytes], timeout: float) -> list[bytes]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for key in [key for key, task in self._in_flight.items() if task.done()]:
                await self._collect(key)
            # One token per wait, as one server's BLPOP takes: a lease call asks the
            # partitions hinted by a wait and stops once its limit is filled, so the hints
            # of tokens taken together would be lost and their partitions left quiet.
            answered = next((key for key in keys if key in self._taken), None)
            if answered is not None:
                self._taken.discard(answered)
                return [answered]
            await self._send_missing(keys)
            raise_if_cancelled()  # each of its sends may have dropped a cancel
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return []
            tasks = [self._in_flight[key] for key in keys if key in self._in_flight]
            if not tasks:
                await asyncio.sleep(min(remaining, RETRY_PAUSE))
                continue
            await asyncio.wait(tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    async def _send_missing(self, keys: Sequence[bytes]) -> None:
        failures: list[Exception] = []
        now = asyncio.get_running_loop().time()
        for key in keys:
            if key in self._in_flight or self._retry_at.get(key, 0.0) > now:
                continue
            node = self._client.nodes_manager.get_node_from_slot(key_slot(key))
            kwargs = dict(node.connection_kwargs)
            if kwargs.get("socket_timeout") is not None:
                kwargs["socket_timeout"] = max(float(kwargs["socket_timeout"]), SIGNAL_BLOCK + 5.0)
            conn = node.connection_class(**kwargs)
            try:
                await conn.send_command("BLPOP", key, SIGNAL_BLOCK)
            except CONNECTION_ERRORS as exc:
                self._retry_at[key] = now + RETRY_PAUSE
                failures.append(exc)
                await conn.disconnect()
                continue
            if key in self._in_flight:  # another task's wait sent one meanwhile: that one stands
                await conn.disconnect()
                continue
            self._connections[key] = conn
            self._in_flight[key] = asyncio.ensure_future(conn.read_response())
        if failures and not any(key in self._in_flight for key in keys):
            await self._client.nodes_manager.initialize()
            raise redis.exceptions.ConnectionError(str(failures[0]))

    async def _collect(self, key: bytes) -> None:
        """Read a finished BLPOP. Several tasks of one loop wait at once: the first to come
        collects it (the pops come before any await), the others find it gone."""
        task = self._in_flight.pop(key, None)
        conn = self._connections.pop(key, None)
        if task is None or conn is None:  # collected by another task, or closed
            return
        # the BLPOP answered (or failed): its connection is closed, the next wait sends anew
        await conn.disconnect()
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, redis.exceptions.MovedError):
            await self._client.nodes_manager.move_slot(exc)
        elif exc is not None:
            self._retry_at[key] = asyncio.get_running_loop().time() + RETRY_PAUSE
        elif task.result() is not None:
            self._taken.add(key)

    async def close(self) -> None:
        # Taken before the first await: a wait cancelled meanwhile may collect its BLPOP.
        tasks, connections = list(self._in_flight.values()), list(self._connections.values())
        self._in_flight, self._connections = {}, {}
        for task in tasks:
            task.cancel()
        for conn in connections:
            await conn.disconnect()


class AsyncRedisClusterBackend(AsyncRedisBackend):
    """:class:`RedisClusterBackend` on ``redis.asyncio``'s cluster client."""

    default_partitions = 16
    shard_channels = True

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._signals = _AsyncSignalWaits(self._client)

    def _clients(self, url: str, redis_options: Mapping[str, Any]) -> tuple[Any, Any]:
        client = cluster_client(redis.asyncio.cluster, url, redis_options, self._safe_url)
        client.commands_parser.__class__ = _AsyncLocalFcallKeys
        return client, client

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "AsyncRedisClusterBackend":
        checked_cluster_options(url, options)
        return cls(url, **options)

    async def _send(self, request: Request) -> Any:
        try:
            return await self._send_to_cluster(request)
        except redis.exceptions.RedisClusterException as exc:
            raise unreachable(exc) from None

    async def _send_to_cluster(self, request: Request) -> Any:
        if type(request) is FunctionCall:
            wait = self._replica_wait
            if wait is not None and wait.after(request.function):
                return await self._call_on_master(key_slot(request.keys[0]), self._packed.pack(request), wait)
            return await self._fcall_on_slot(request)
        if type(request) is WaitSignals:
            await self._client.initialize()  # the slots' masters, known after a first command
            return await self._signals.wait(request.keys, request.timeout)
        if type(request) is Command:
            if request.method == "function_load":
                return await self._load_everywhere(*request.args)
            return await getattr(self._client, request.method)(*request.args, **request.kwargs)
        assert type(request) is Pipeline
        return await self._pipeline_on_masters(request, pipelined_wait(self._replica_wait, request))

    async def _fcall_on_slot(self, call: FunctionCall) -> Any:
        """As :meth:`RedisClusterBackend._fcall_on_slot`: the packed FCALL on a connection
        the slot's master lends (redis.asyncio's ClusterNode keeps its free ones at hand);
        refused by a cluster in motion (or the connection lost), sent again by redis-py's
        execute_command, which routes, packs and parses each command anew."""
        await self._client.initialize()  # the slots' masters, known after a first command
        node = self._client.nodes_manager.get_node_from_slot(key_slot(call.keys[0]))
        conn = node.acquire_connection()
        try:
            await node.disconnect_if_needed(conn)  # one marked by redis-py after a failover
            await conn.send_packed_command([self._packed.pack(call)])
            reply = await conn.read_response()
        except REDIRECTIONS as exc:
            node.release(conn)
            if isinstance(exc, redis.exceptions.MovedError):
                await self._client.nodes_manager.move_slot(exc)  # else redis-py would send it to the old master again
            return await self._client.execute_command(*fcall_alone(self._functions, call))
        except CONNECTION_ERRORS:
            await conn.disconnect()
            node.release(conn)
            # The slot's master as last known may be gone (its replica promoted since).
            await self._client.nodes_manager.initialize()
            return await self._client.execute_command(*fcall_alone(self._functions, call))
        except BaseException:
            # A server's error reply was read whole; a cancelled send or read disconnected
            # the connection (redis.asyncio does on any exception there).
            node.release(conn)
            raise
        node.release(conn)
        return reply

    async def _pipeline_on_masters(self, request: Pipeline, wait: ReplicaWait | None) -> list[Any]:
        """As :meth:`RedisClusterBackend._pipeline_on_masters`."""
        await self._client.initialize()  # the slots' masters, known after a first command
        nodes = self._client.nodes_manager
        steps = waited_steps(self._client, self._packed, request, wait)
        replies: list[Any] = [UNREAD] * len(steps)
        one_by_one: list[int] = []
        in_flight = []
        lost: Exception | None = None
        for node, indexes in by_master(nodes, steps):
            conn = node.acquire_connection()
            waited = wait is not None and any(steps[index].writes for index in indexes)
            try:
                await node.disconnect_if_needed(conn)
                await conn.connect()
            except CONNECTION_ERRORS:
                await conn.disconnect()
                node.release(conn)
                one_by_one += indexes  # not sent: each follows its slot's master as the map says next
                continue
            try:
                await conn.send_packed_command(share_writes(conn, steps, indexes, wait if waited else None))
            except CONNECTION_ERRORS as exc:
                await conn.disconnect()
                node.release(conn)
                lost = lost or exc
                if wait is None:
                    one_by_one += indexes
                continue
            in_flight.append((node, conn, indexes, waited))
        short: BackendUnavailable | None = None
        for node, conn, indexes, waited in in_flight:
            try:
                for index in indexes:
                    try:
                        replies[index] = await conn.read_response()
                    except redis.exceptions.ResponseError as exc:
                        replies[index] = exc
                if waited:
                    assert wait is not None
                    try:
                        acknowledged = await conn.read_response()
                    except redis.exceptions.ResponseError as exc:
                        acknowledged = exc
                    short = short or share_short(steps, replies, indexes, acknowledged, wait, self._safe_url)
            except CONNECTION_ERRORS as exc:
                await conn.disconnect()
                lost = lost or exc
                if wait is None:
                    one_by_one += [index for index in indexes if replies[index] is UNREAD]
            finally:
                node.release(conn)
        if wait is None:
            return await self._pipeline_rest(request, replies, one_by_one, lost is not None)
        if lost is not None:
            await nodes.initialize()  # for the next call: the node may be gone for good
            raise lost
        if one_by_one:  # a master that could not be connected to: a failover may have moved its slots
            await nodes.initialize()
        moved: list[Any] = []
        one_by_one += refused(replies, moved.append)
        for moved_error in moved:
            await nodes.move_slot(moved_error)
        for index in sorted(one_by_one):
            step = steps[index]
            try:
                replies[index] = await self._call_on_master(step.slot, step.command, wait if step.writes else None)
            except redis.exceptions.ResponseError as exc:
                replies[index] = exc
            except ReplicasShort as exc:
                short = short or exc
        if short is not None:
            raise short
        return replies

    async def _pipeline_rest(
        self, request: Pipeline, replies: list[Any], unanswered: list[int], lost: bool
    ) -> list[Any]:
        """As :meth:`RedisClusterBackend._pipeline_rest`."""
        nodes = self._client.nodes_manager
        if unanswered or lost:
            await nodes.initialize()  # a node unreachable: a failover may have moved its slots
        moved: list[Any] = []
        resend = sorted(unanswered + refused(replies, moved.append))
        for moved_error in moved:
            await nodes.move_slot(moved_error)
        for index in resend:
            try:
                replies[index] = await self._client.execute_command(*step_alone(self._functions, request, index))
            except redis.exceptions.RedisError as exc:  # in its place, as redis-py's pipeline has it
                replies[index] = exc
        return replies

    async def _call_on_master(self, slot: int, command: bytes | tuple[Any, ...], wait: ReplicaWait | None) -> Any:
        """As :meth:`RedisClusterBackend._call_on_master`, on a connection of the node's
        own (redis.asyncio's ClusterNode lends them), given back after each attempt."""
        await self._client.initialize()  # the slots' masters, known after a first command
        nodes = self._client.nodes_manager
        asked: Any = None  # the node an ASK named, for the next attempt only
        last: Exception | None = None
        for attempt in range(CALL_ATTEMPTS):
            node = asked or nodes.get_node_from_slot(slot)
            conn = node.acquire_connection()
            try:
                try:
                    await node.disconnect_if_needed(conn)  # one marked by redis-py after a failover
                    await conn.connect()
                except CONNECTION_ERRORS:
                    # Not sent. The node is down: a failover gives its slots to a replica.
                    await conn.disconnect()
                    await nodes.initialize()
                    if asked is None and nodes.get_node_from_slot(slot).name == node.name:
                        raise
                    asked = None
                    continue
                writes = [*packed(conn, command), wait.command] if wait is not None else packed(conn, command)
                try:
                    if asked is not None:
                        await conn.send_packed_command([ASKING, *writes])
                        await conn.read_response()  # ASKING's OK
                    else:
                        await conn.send_packed_command(writes)
                    if wait is None:
                        return await conn.read_response()
                    return await replied_after_wait(conn, wait, self._safe_url)
                except redis.exceptions.MovedError as exc:  # before AskError: a subclass of it
                    await nodes.move_slot(exc)
                    asked, last = None, exc
                except redis.exceptions.AskError as exc:
                    asked = self._client.get_node(host=exc.host, port=exc.port)
                    if asked is None:  # a node the client has not heard of yet
                        await nodes.initialize()
                        asked = self._client.get_node(host=exc.host, port=exc.port)
                    last = exc
                except (redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError) as exc:
                    await asyncio.sleep(retry_pause(attempt))
                    if isinstance(exc, redis.exceptions.ClusterDownError):
                        await nodes.initialize()
                    asked, last = None, exc
                except CONNECTION_ERRORS:
                    await conn.disconnect()
                    await nodes.initialize()  # for the next call: the node may be gone for good
                    raise
            finally:
                node.release(conn)
        raise exhausted(slot, last)

    async def _load_everywhere(self, source: str) -> None:
        """As :meth:`RedisClusterBackend._load_everywhere`."""
        await self._client.initialize()
        loaded = False
        for node in self._client.get_primaries():
            try:
                await self._client.execute_command("FUNCTION LOAD", source, target_nodes=node)
                loaded = True
            except redis.exceptions.ResponseError as exc:
                if "already exists" not in str(exc):
                    raise
        if not loaded:
            raise redis.exceptions.ResponseError(f"Library '{_LIBRARY.name}' already exists")

    async def subscribe(self, queue: str) -> AsyncRedisSubscription:
        channels = await self._drive(self._ops.events_channels(queue))
        with translated_errors(self._safe_url):
            await self._client.initialize()
            pubsub = self._client.pubsub()
            await pubsub.ssubscribe(*channels)
            deadline = time.monotonic() + MAX_BLOCK + 5.0
            confirmed = 0
            while confirmed < len(channels) and time.monotonic() < deadline:
                confirmation = await pubsub.get_sharded_message(timeout=0.05)
                confirmed += confirmation is not None and confirmation["type"] == "ssubscribe"
            if confirmed < len(channels):
                await pubsub.aclose()
                raise BackendUnavailable(f"redis at {self._safe_url} did not confirm the events subscription")
        return AsyncClusterSubscription(self._safe_url, queue, pubsub)

    async def close(self) -> None:
        await self._signals.close()
        await self._client.aclose()


class AsyncClusterSubscription(AsyncRedisSubscription):
    """Shard-channel subscriptions on asyncio (redis-py's ClusterPubSub): each node is
    asked in turn, its share of the timeout each."""

    async def get(self, timeout: float) -> list[Event]:
        events: list[Event] = []
        nodes = max(1, len(self._pubsub.node_pubsub_mapping))
        with translated_errors(self._safe_url):
            message = await self._pubsub.get_sharded_message(timeout=timeout / nodes)
            while message is not None:
                if message["type"] == "smessage":
                    events.extend(RedisOperations.parse_events(self._queue, message["data"]))
                message = await self._pubsub.get_sharded_message(timeout=0)
        return events

