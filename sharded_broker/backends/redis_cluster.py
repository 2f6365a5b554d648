"""The Redis backend on a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``).

It runs the very steps of :class:`~.redis.RedisOperations` that the one-server backend
runs; only how a request reaches the servers differs:

- a :class:`~.redis.FunctionCall` (whose keys share one hash tag, so one slot) is an FCALL
  on the master of that slot, packed once as on one server; a MOVED, ASK, TRYAGAIN or
  CLUSTERDOWN refusal (the script did not run) sends it again through redis-py's
  ``RedisCluster.execute_command``, which follows redirections and retries with backoff;
- the library is loaded on every primary when a node lacks it (a new or flushed master);
- a :class:`~.redis.Pipeline` is redis-py's cluster pipeline: one round trip per node;
- a :class:`~.redis.WaitSignals` keeps one BLPOP in flight per signal list, each on a
  connection of its own to the list's master, across waits (:class:`_SignalWaits`): a
  cluster refuses a BLPOP over keys of several slots, and re-sending BLPOPs at every wait
  would cost calls per second per partition even when idle.
"""

from __future__ import annotations

import asyncio
import select
import threading
import time
from typing import Any, Mapping, Sequence

import redis
import redis.asyncio.cluster
import redis.cluster
import redis.exceptions
from redis._parsers.commands import AsyncCommandsParser, CommandsParser
from redis.crc import key_slot

from ..errors import BackendUnavailable, ConfigurationError
from ..urls import check_redis_url, cluster_parts
from .redis import (
    _LIBRARY, MAX_BLOCK, Command, FunctionCall, Pipeline, RedisBackend, Request, WaitSignals, checked_options,
    kept_connection, translated, translated_errors,
)
from .redis_asyncio import AsyncRedisBackend, AsyncRedisSubscription

# A signal list's BLPOP stays in flight this long (then it is sent again): an idle consumer
# over P partitions makes P / SIGNAL_BLOCK calls a second for its waits.
SIGNAL_BLOCK = 25
# A signal list whose BLPOP failed (its node down, the cluster in failover) is sent again
# after this pause, not at once: an error reply comes at once and would spin the wait.
RETRY_PAUSE = 0.1
# Refusals of a call by a cluster in motion: the script did not run, so sending it again
# (through redis-py, which follows the redirection) cannot apply it twice.
_REDIRECTIONS = (
    redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)
_TRANSPORT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def _fcall_keys(args: Sequence[Any]) -> tuple[Any, ...] | None:
    """An FCALL's keys read from its arguments (None for another command)."""
    if len(args) >= 3 and str(args[0]).upper() in ("FCALL", "FCALL_RO"):
        return tuple(args[3:3 + int(args[2])])
    return None


class _LocalFcallKeys(CommandsParser):
    """redis-py's command parser, reading FCALL's keys from its numkeys argument: redis-py
    asks the server (COMMAND GETKEYS, a round trip) for every command with movable keys."""

    def get_keys(self, redis_conn: Any, *args: Any) -> Any:
        keys = _fcall_keys(args)
        return list(keys) if keys is not None else super().get_keys(redis_conn, *args)


class _AsyncLocalFcallKeys(AsyncCommandsParser):
    """:class:`_LocalFcallKeys` for redis.asyncio's cluster."""

    async def get_keys(self, *args: Any) -> Any:
        keys = _fcall_keys(args)
        return keys if keys is not None else await super().get_keys(*args)


def checked_cluster_options(url: str, options: Mapping[str, Any]) -> None:
    """The checks of a one-server URL and its options (:func:`~.redis.checked_options`), on
    the URL of the cluster's first node."""
    node_url = cluster_parts(url)[0]
    check_redis_url(node_url)
    checked_options(node_url, options)


def cluster_client(module: Any, url: str, options: Mapping[str, Any], safe_url: str) -> Any:
    """A RedisCluster of ``module`` (``redis.cluster`` or ``redis.asyncio.cluster``) on
    every node ``url`` names (any one reachable is enough: the others are discovered)."""
    node_url, nodes = cluster_parts(url)
    try:
        client = module.RedisCluster.from_url(
            node_url, startup_nodes=[module.ClusterNode(host, port) for host, port in nodes[1:]], **options
        )
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad Redis Cluster URL or option for {safe_url}: {exc}") from None
    except redis.exceptions.RedisError as exc:
        raise translated(exc, safe_url) from None
    except redis.exceptions.RedisClusterException as exc:
        # not a RedisError: what redis-py says when no node named answers as a cluster
        raise BackendUnavailable(f"redis cluster at {safe_url} is unavailable: {exc}") from None
    return client


class _SignalWaits:
    """BLPOPs on signal lists, each on a connection of its own to the list's master, kept
    in flight across waits (for SIGNAL_BLOCK seconds, then sent again). A token one of them
    took while nobody waited on its list is kept and answered at the next wait on it.
    A MOVED reply or a lost connection drops that BLPOP: the next wait sends it again to
    the slot's master as the client knows it then. One thread waits at a time."""

    def __init__(self, client: redis.cluster.RedisCluster) -> None:
        self._client = client
        self._in_flight: dict[bytes, Any] = {}
        self._taken: set[bytes] = set()
        self._retry_at: dict[bytes, float] = {}
        # a list's connection whose BLPOP answered, for its next one
        self._idle: dict[bytes, Any] = {}
        self._lock = threading.Lock()

    def wait(self, keys: Sequence[bytes], timeout: float) -> list[bytes]:
        if not self._lock.acquire(timeout=timeout):
            return []
        try:
            return self._wait(keys, time.monotonic() + timeout)
        finally:
            self._lock.release()

    def _wait(self, keys: Sequence[bytes], deadline: float) -> list[bytes]:
        while True:
            answered = [key for key in keys if key in self._taken]
            if answered:
                self._taken.difference_update(answered)
                return answered
            self._send_missing(keys)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if not any(key in self._in_flight for key in keys):
                time.sleep(min(remaining, RETRY_PAUSE))
                continue
            by_fd = {conn._sock.fileno(): key for key, conn in self._in_flight.items() if conn._sock is not None}
            poll = select.poll()
            for fd in by_fd:
                poll.register(fd, select.POLLIN)
            for fd, _ in poll.poll(remaining * 1000):
                self._read(by_fd[fd])

    def _send_missing(self, keys: Sequence[bytes]) -> None:
        failures: list[Exception] = []
        now = time.monotonic()
        for key in keys:
            if key not in self._in_flight and self._retry_at.get(key, 0.0) <= now:
                try:
                    self._in_flight[key] = self._send(key)
                except _TRANSPORT as exc:
                    self._retry_at[key] = now + RETRY_PAUSE
                    failures.append(exc)
        if failures and not any(key in self._in_flight for key in keys):
            self._client.nodes_manager.initialize()
            raise redis.exceptions.ConnectionError(str(failures[0]))

    def _send(self, key: bytes) -> Any:
        conn = self._idle.pop(key, None)
        if conn is not None:
            try:
                conn.send_command("BLPOP", key, SIGNAL_BLOCK)
                return conn
            except _TRANSPORT:
                conn.disconnect()
        node = self._client.nodes_manager.get_node_from_slot(key_slot(key))
        pool = self._client.get_redis_connection(node).connection_pool
        kwargs = dict(pool.connection_kwargs)
        if kwargs.get("socket_timeout") is not None:
            kwargs["socket_timeout"] = max(float(kwargs["socket_timeout"]), SIGNAL_BLOCK + 5.0)
        conn = pool.connection_class(**kwargs)
        conn.send_command("BLPOP", key, SIGNAL_BLOCK)
        return conn

    def _read(self, key: bytes) -> None:
        conn = self._in_flight.pop(key)
        try:
            reply = conn.read_response()
        except redis.exceptions.MovedError as exc:
            conn.disconnect()
            self._client.nodes_manager.move_slot(exc)
            return
        except (redis.exceptions.RedisError, OSError):
            conn.disconnect()
            self._retry_at[key] = time.monotonic() + RETRY_PAUSE
            return
        if reply is not None:
            self._taken.add(key)
        self._idle[key] = conn

    def forget(self) -> None:
        """In a forked child: the connections are the parent's; dropped, never used."""
        self._in_flight = {}
        self._taken = set()
        self._retry_at = {}
        self._idle = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        for conn in [*self._in_flight.values(), *self._idle.values()]:
            conn.disconnect()
        self._in_flight = {}
        self._idle = {}


class RedisClusterBackend(RedisBackend):
    """Queues in a Redis Cluster (7.0 or later): the options and guarantees of
    :class:`~.redis.RedisBackend`, each queue partition's keys on the master of their slot.
    The URL names one or more nodes, ``redis+cluster://[user:password@]host:port[,host:port...]``."""

    default_partitions = 16

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._signals = _SignalWaits(self._client)
        # FCALL connections kept between calls (kept_connection), per node's pool
        self._kept: dict[Any, list[Any]] = {}

    def _clients(self, url: str, redis_options: Mapping[str, Any]) -> tuple[Any, Any]:
        client = cluster_client(redis.cluster, url, redis_options, self._safe_url)
        client.commands_parser.__class__ = _LocalFcallKeys
        return client, client

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "RedisClusterBackend":
        checked_cluster_options(url, options)
        return cls(url, **options)

    def _after_fork_in_child(self) -> None:
        self._kept = {}
        self._signals.forget()

    def _send(self, request: Request) -> Any:
        if type(request) is FunctionCall:
            return self._fcall_on_slot(request)
        if type(request) is WaitSignals:
            return self._signals.wait(request.keys, request.timeout)
        if type(request) is Command:
            if request.method == "function_load":
                return self._load_everywhere(*request.args)
            return getattr(self._client, request.method)(*request.args, **request.kwargs)
        assert type(request) is Pipeline
        pipe = self._client.pipeline()
        if request.prelude is not None:
            getattr(pipe, request.prelude.method)(*request.prelude.args, **request.prelude.kwargs)
        for call in request.calls:
            pipe.fcall(self._functions[call.function], len(call.keys), *call.keys, *call.args)
        return pipe.execute(raise_on_error=False)

    def _fcall_on_slot(self, call: FunctionCall) -> Any:
        """The packed FCALL on a connection to its slot's master (one kept from an earlier
        call to that node, as RedisBackend keeps its own); refused by a cluster in motion
        (or the connection lost), sent again by redis-py's execute_command."""
        node = self._client.nodes_manager.get_node_from_slot(key_slot(call.keys[0]))
        pool = (node.redis_connection or self._client.get_redis_connection(node)).connection_pool
        kept = self._kept.get(pool)
        if kept is None:
            kept = self._kept.setdefault(pool, [])
        try:
            conn = kept_connection(pool, kept)
        except _TRANSPORT:
            # The slot's master as last known is unreachable (killed, its replica promoted
            # since): the slot map must be read again, else every call goes to the dead node.
            self._client.nodes_manager.initialize()
            return self._client.execute_command(
                "FCALL", self._functions[call.function], len(call.keys), *call.keys, *call.args
            )
        try:
            conn.send_packed_command([self._packed.pack(call)])
            reply = conn.read_response()
        except _REDIRECTIONS:
            pool.release(conn)
            return self._client.execute_command(
                "FCALL", self._functions[call.function], len(call.keys), *call.keys, *call.args
            )
        except _TRANSPORT:
            conn.disconnect()
            pool.release(conn)
            self._client.nodes_manager.initialize()
            return self._client.execute_command(
                "FCALL", self._functions[call.function], len(call.keys), *call.keys, *call.args
            )
        except BaseException:
            pool.release(conn)
            raise
        kept.append(conn)
        return reply

    def _load_everywhere(self, source: str) -> None:
        """FUNCTION LOAD on every primary (one that has the library already is fine);
        ResponseError "already exists" when every one had it, as on one server."""
        loaded = False
        for node in self._client.get_primaries():
            try:
                self._client.get_redis_connection(node).function_load(source)
                loaded = True
            except redis.exceptions.ResponseError as exc:
                if "already exists" not in str(exc):
                    raise
        if not loaded:
            raise redis.exceptions.ResponseError(f"Library '{_LIBRARY.name}' already exists")

    def _return_idle_connections(self) -> None:
        """Give the kept FCALL connections back to their nodes' pools (redis-py's own
        commands take other connections of them meanwhile: no need before each)."""
        for pool, kept in list(self._kept.items()):
            while kept:
                try:
                    conn = kept.pop()
                except IndexError:  # another thread took the last one
                    break
                pool.release(conn)

    def close(self) -> None:
        self._return_idle_connections()
        self._signals.close()
        self._client.close()


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
            answered = [key for key in keys if key in self._taken]
            if answered:
                self._taken.difference_update(answered)
                return answered
            await self._send_missing(keys)
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
            except _TRANSPORT as exc:
                self._retry_at[key] = now + RETRY_PAUSE
                failures.append(exc)
                await conn.disconnect()
                continue
            self._connections[key] = conn
            self._in_flight[key] = asyncio.ensure_future(conn.read_response())
        if failures and not any(key in self._in_flight for key in keys):
            await self._client.nodes_manager.initialize()
            raise redis.exceptions.ConnectionError(str(failures[0]))

    async def _collect(self, key: bytes) -> None:
        task = self._in_flight.pop(key)
        conn = self._connections.pop(key)
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
        for task in self._in_flight.values():
            task.cancel()
        for conn in self._connections.values():
            await conn.disconnect()
        self._in_flight = {}
        self._connections = {}


class AsyncRedisClusterBackend(AsyncRedisBackend):
    """:class:`RedisClusterBackend` on ``redis.asyncio``'s cluster client."""

    default_partitions = 16

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
        if type(request) is FunctionCall:
            return await self._client.execute_command(
                "FCALL", self._functions[request.function], len(request.keys), *request.keys, *request.args
            )
        if type(request) is WaitSignals:
            await self._client.initialize()  # the slots' masters, known after a first command
            return await self._signals.wait(request.keys, request.timeout)
        if type(request) is Command:
            if request.method == "function_load":
                return await self._load_everywhere(*request.args)
            return await getattr(self._client, request.method)(*request.args, **request.kwargs)
        assert type(request) is Pipeline
        pipe = self._client.pipeline()
        if request.prelude is not None:
            getattr(pipe, request.prelude.method)(*request.prelude.args, **request.prelude.kwargs)
        for call in request.calls:
            pipe.fcall(self._functions[call.function], len(call.keys), *call.keys, *call.args)
        return await pipe.execute(raise_on_error=False)

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
        channel = self._ops.events_channel(queue)
        with translated_errors(self._safe_url):
            await self._client.initialize()
            pubsub = self._client.pubsub()
            await pubsub.subscribe(channel)
            confirmation = await pubsub.get_message(timeout=MAX_BLOCK + 5.0)
            if confirmation is None or confirmation["type"] != "subscribe":
                await pubsub.aclose()
                raise redis.exceptions.ConnectionError("the events subscription was not confirmed")
        return AsyncRedisSubscription(self._safe_url, queue, pubsub)

    async def close(self) -> None:
        await self._signals.close()
        await self._client.aclose()

