"""The Redis backend on redis-py's asyncio client, for :mod:`sharded_broker.aio`.

It runs the very steps the blocking backend runs (:class:`~.redis.RedisOperations`: the
same functions, keys, arguments and reply parsing), awaiting each request on a
``redis.asyncio`` connection instead of blocking on one; waiting for work is a BLPOP on an
asyncio connection of its own, and events come from an asyncio pub/sub connection, so no
call blocks the event loop. Each method is the coroutine of the :class:`~..backend.Backend`
method of the same name, with the same arguments and answers.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import redis.asyncio
import redis.asyncio.sentinel
import redis.exceptions

from ..backend import KeySort
from ..errors import BackendUnavailable
from ..models import (
    CancelResult, DeadLetter, Event, KeyFacts, KeyInfo, Lease, LeaseResult, Message, MessageInfo, MinuteMetrics,
    QueueSettings, QueueStats, RetryPosition, Schedule,
)
from .redis import (
    MAX_BLOCK, Command, FunctionCall, Pipeline, RedisExecutor, RedisOperations, ReplicasShort, ReplicaWait, Request,
    Steps, WaitSignals, blpop_timeout, pipelined_wait, sentinel_manager, signalled, translated_errors,
)

T = TypeVar("T")


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
                        request = steps.throw(exc)
                    else:
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
            try:
                reply = await conn.read_response()
            except redis.exceptions.ResponseError:
                await conn.read_response()
                raise
            wait.check(await conn.read_response(), self._safe_url)
            return reply

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
        channel = self._ops.events_channel(queue)
        with translated_errors(self._safe_url):
            pubsub = self._blocking_client.pubsub()
            await pubsub.subscribe(channel)
            # Wait for the server's confirmation: events published from now on are received.
            confirmation = await pubsub.get_message(timeout=MAX_BLOCK + 5.0)
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
