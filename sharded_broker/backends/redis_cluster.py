"""The Redis backend on a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``).

It runs the very steps of :class:`~.redis.RedisOperations` that the one-server backend
runs; only how a request reaches the servers differs:

- a :class:`~.redis.FunctionCall` (whose keys share one hash tag, so one slot) is an FCALL
  on the master of that slot, packed once as on one server; a MOVED, ASK, TRYAGAIN or
  CLUSTERDOWN refusal (the script did not run) sends it again through redis-py's
  ``RedisCluster.execute_command``, which follows redirections and retries with backoff;
- with ``wait_replicas``, a writing call is followed by its ``WAIT`` on the same
  connection, in the same write (:class:`~.redis.ReplicaWait`): WAIT counts the replicas
  that have this connection's writes, so both go to the slot's master on one connection,
  and a refusal is followed here (:meth:`RedisClusterBackend._call_on_master`), not by
  redis-py, which would send the call again on a connection of its choosing. A call whose
  connection broke after it was sent may have run: it is not sent again (the caller gets
  BackendUnavailable, the slot map reread for its next call);
- the library is loaded on every primary when a node lacks it (a new or flushed master);
- a :class:`~.redis.Pipeline` goes as redis-py's cluster pipeline would, cheaper: each
  master's share of it packed in one write on a kept connection, every master written to
  before any is read (about one round trip in all), a refused call (or one whose
  connection was lost before its reply was read) then sent alone through redis-py's
  ``execute_command``; with ``wait_replicas``, each share is followed by one WAIT and a
  refused call is followed here (:meth:`RedisClusterBackend._call_on_master`);
- a :class:`~.redis.WaitSignals` keeps one BLPOP in flight per signal list, each on a
  connection of its own to the list's master, across waits (:class:`_SignalWaits`): a
  cluster refuses a BLPOP over keys of several slots, and re-sending BLPOPs at every wait
  would cost calls per second per partition even when idle.

Its asyncio twin, AsyncRedisClusterBackend, is in redis_asyncio.py.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import redis
import redis.cluster
import redis.exceptions
from redis._parsers.commands import CommandsParser
from redis.crc import key_slot

from ..backend import EventSubscription
from ..errors import BackendUnavailable, ConfigurationError
from ..models import Event
from ..urls import check_redis_url, cluster_parts
from .redis import (
    _LIBRARY, MAX_BLOCK, Command, FunctionCall, PackedCalls, Pipeline, RedisBackend, RedisOperations, ReplicasShort,
    ReplicaWait, Request, WaitSignals, checked_options, kept_connection, pipelined_wait, replied_after_wait,
    translated, translated_errors,
)

# A signal list's BLPOP stays in flight this long (then it is sent again): an idle consumer
# over P partitions makes P / SIGNAL_BLOCK calls a second for its waits.
SIGNAL_BLOCK = 25
# A signal list whose BLPOP failed (its node down, the cluster in failover) is sent again
# after this pause, not at once: an error reply comes at once and would spin the wait.
RETRY_PAUSE = 0.1
# Refusals of a call by a cluster in motion: the script did not run, so sending it again
# (through redis-py, which follows the redirection) cannot apply it twice.
REDIRECTIONS = (
    redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)
CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# A call followed by its WAIT (wait_replicas) is sent at most this many times while the
# cluster refuses it (redirections, TRYAGAIN, CLUSTERDOWN), as redis-py's
# RedisClusterRequestTTL bounds its own retries; TRYAGAIN and CLUSTERDOWN pause first,
# RETRY_PAUSE doubling up to MAX_RETRY_PAUSE (a failover settles in a second or two).
CALL_ATTEMPTS = 16
MAX_RETRY_PAUSE = 0.5
ASKING = b"*1\r\n$6\r\nASKING\r\n"
# Routes remembered by the one-call path (a queue's partitions' first keys): more are
# forgotten all at once, so that a process touching many queues keeps a bounded table.
MAX_ROUTES = 4096


def retry_pause(attempt: int) -> float:
    """The pause before attempt ``attempt`` + 1 of a call refused with TRYAGAIN or CLUSTERDOWN."""
    return min(MAX_RETRY_PAUSE, RETRY_PAUSE * 2 ** attempt)


def exhausted(slot: int, last: Exception | None) -> redis.exceptions.ConnectionError:
    """The error of a call the cluster refused CALL_ATTEMPTS times (it never ran)."""
    return redis.exceptions.ConnectionError(
        f"the cluster refused a call to slot {slot} {CALL_ATTEMPTS} times (it did not run); last: {last}"
    )


class WaitedStep(NamedTuple):
    """One command of a pipeline: its slot, the command (packed, or its arguments to
    pack), and whether it writes under wait_replicas (so WAIT must follow it)."""

    slot: int
    command: bytes | tuple[Any, ...]
    writes: bool


def waited_steps(client: Any, packer: PackedCalls, request: Pipeline, wait: ReplicaWait | None) -> list[WaitedStep]:
    """A pipeline's prelude (a plain command whose first argument is its key, as the queue
    registry's SADD) and calls, as steps (none writing under wait_replicas when ``wait``
    is None)."""
    steps = []
    if request.prelude is not None:
        prelude = request.prelude
        assert not prelude.kwargs, "a prelude is a plain command with positional arguments"
        steps.append(WaitedStep(
            client.keyslot(prelude.args[0]), (prelude.method.upper(), *prelude.args), wait is not None
        ))
    for call in request.calls:
        steps.append(WaitedStep(
            key_slot(call.keys[0]), packer.pack(call), wait is not None and wait.after(call.function)
        ))
    return steps


def by_master(nodes: Any, steps: Sequence[WaitedStep]) -> list[tuple[Any, list[int]]]:
    """The steps' indexes grouped by the master of their slot as the slot map says."""
    groups: dict[str, tuple[Any, list[int]]] = {}
    for index, step in enumerate(steps):
        node = nodes.get_node_from_slot(step.slot)
        groups.setdefault(node.name, (node, []))[1].append(index)
    return list(groups.values())


def packed(conn: Any, command: bytes | tuple[Any, ...]) -> list[bytes]:
    """A command packed (an FCALL is already), for ``conn``'s send_packed_command."""
    return [command] if type(command) is bytes else conn.pack_command(*command)


def share_writes(conn: Any, steps: Sequence[WaitedStep], indexes: Sequence[int], wait: ReplicaWait | None) -> list[bytes]:
    """One master's share of a waited pipeline, then its WAIT (unless ``wait`` is None)."""
    writes = [chunk for index in indexes for chunk in packed(conn, steps[index].command)]
    if wait is not None:
        writes.append(wait.command)
    return writes


def share_short(
    steps: Sequence[WaitedStep], replies: Sequence[Any], indexes: Sequence[int], acknowledged: Any,
    wait: ReplicaWait, safe_url: str,
) -> BackendUnavailable | None:
    """The error of one master's WAIT answer after its share of a waited pipeline (None
    when enough replicas acknowledged, or when no write of the share ran: every one was
    refused, and WAIT's answer, even its refusal by a node demoted since, says nothing)."""
    if not any(steps[index].writes and not isinstance(replies[index], REDIRECTIONS) for index in indexes):
        return None
    try:
        wait.check(acknowledged, safe_url)
    except BackendUnavailable as exc:
        return exc
    return None


def refused(replies: list[Any], move_slot: Callable[[Any], Any]) -> list[int]:
    """The indexes of the replies that are a cluster's refusals (the calls did not run),
    each MOVED given to ``move_slot`` (the slot map updated, for their second send)."""
    found = []
    for index, reply in enumerate(replies):
        if isinstance(reply, REDIRECTIONS):
            if isinstance(reply, redis.exceptions.MovedError):
                move_slot(reply)
            found.append(index)
    return found


def step_alone(functions: Mapping[str, str], request: Pipeline, index: int) -> tuple[Any, ...]:
    """Step ``index`` of a pipeline (:func:`waited_steps`) as a command's arguments, for
    redis-py's ``execute_command``, which follows redirections and retries."""
    if request.prelude is not None:
        if index == 0:
            return (request.prelude.method.upper(), *request.prelude.args)
        index -= 1
    return fcall_alone(functions, request.calls[index])


def fcall_alone(functions: Mapping[str, str], call: FunctionCall) -> tuple[Any, ...]:
    """A call as FCALL's arguments, for redis-py's ``execute_command``."""
    return ("FCALL", functions[call.function], len(call.keys), *call.keys, *call.args)


# A pipeline's reply not read yet (None is a reply: a function's nil).
UNREAD: Any = object()


def unreachable(exc: Exception) -> redis.exceptions.ConnectionError:
    """redis-py's RedisClusterException (not a RedisError: the executors would not translate
    it), raised when no node answers for the cluster's layout, as a connection error."""
    return redis.exceptions.ConnectionError(f"no node of the cluster answered: {exc}")


def fcall_keys(args: Sequence[Any]) -> tuple[Any, ...] | None:
    """An FCALL's keys read from its arguments (None for another command)."""
    if len(args) >= 3 and str(args[0]).upper() in ("FCALL", "FCALL_RO"):
        return tuple(args[3:3 + int(args[2])])
    return None


class _LocalFcallKeys(CommandsParser):
    """redis-py's command parser, reading FCALL's keys from its numkeys argument: redis-py
    asks the server (COMMAND GETKEYS, a round trip) for every command with movable keys."""

    def get_keys(self, redis_conn: Any, *args: Any) -> Any:
        keys = fcall_keys(args)
        return list(keys) if keys is not None else super().get_keys(redis_conn, *args)


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
        raise translated(unreachable(exc), safe_url) from None
    return client


class _SignalWaits:
    """BLPOPs on signal lists, each on a connection of its own to the list's master, kept
    in flight across waits (for SIGNAL_BLOCK seconds, then sent again). A token one of them
    took while nobody waited on its list is kept and answered at the next wait on it; a
    wait answers one token, as one server's BLPOP does, the others kept for the next waits.
    A MOVED reply or a lost connection drops that BLPOP: the next wait sends it again to
    the slot's master as the client knows it then (after RETRY_PAUSE for an error: an ASK
    while its slot migrates makes it about ten calls a second until the migration ends).

    Shared by the threads of a process: one of the waiting threads polls every BLPOP in
    flight (the others sleep on a condition until it read something or left); a thread
    that sends a new BLPOP meanwhile wakes the poller through a pipe to poll that one too.
    """

    def __init__(self, client: redis.cluster.RedisCluster) -> None:
        self._client = client
        self._in_flight: dict[bytes, Any] = {}
        self._taken: set[bytes] = set()
        self._retry_at: dict[bytes, float] = {}
        # a list's connection whose BLPOP answered, for its next one
        self._idle: dict[bytes, Any] = {}
        self._changed = threading.Condition()
        self._polling = False
        self._wake_read, self._wake_write = _nonblocking_pipe()

    def wait(self, keys: Sequence[bytes], timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                # One token per wait, as one server's BLPOP takes: a lease call asks the
                # partitions hinted by a wait and stops once its limit is filled, so the hints
                # of tokens taken together would be lost and their partitions left quiet.
                answered = next((key for key in keys if key in self._taken), None)
                if answered is not None:
                    self._taken.discard(answered)
                    return [answered]
                sent = self._send_missing(keys)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                if self._polling:
                    if sent:
                        try:
                            os.write(self._wake_write, b"x")
                        except BlockingIOError:
                            pass  # the pipe is full: the poller wakes anyway
                    self._changed.wait(remaining)
                elif not any(key in self._in_flight for key in keys):
                    self._changed.wait(min(remaining, RETRY_PAUSE))
                else:
                    self._poll(remaining)

    def _poll(self, timeout: float) -> None:
        """Poll every BLPOP in flight (and the wake pipe) for up to ``timeout``, the lock
        released meanwhile; read what answered. Only the poller reads or drops a BLPOP."""
        by_fd = {conn._sock.fileno(): key for key, conn in self._in_flight.items() if conn._sock is not None}
        poll = select.poll()
        for fd in (*by_fd, self._wake_read):
            poll.register(fd, select.POLLIN)
        self._polling = True
        self._changed.release()
        try:
            ready = poll.poll(timeout * 1000)
        finally:
            self._changed.acquire()
            self._polling = False
        for fd, _ in ready:
            if fd == self._wake_read:
                try:
                    os.read(self._wake_read, 4096)
                except BlockingIOError:
                    pass
            else:
                self._read(by_fd[fd])
        self._changed.notify_all()

    def _send_missing(self, keys: Sequence[bytes]) -> bool:
        """Send the BLPOPs of ``keys`` not in flight (nor pausing after an error); whether
        one was sent. ConnectionError when none of ``keys`` has one in flight after it."""
        failures: list[Exception] = []
        sent = False
        now = time.monotonic()
        for key in keys:
            if key not in self._in_flight and self._retry_at.get(key, 0.0) <= now:
                try:
                    self._in_flight[key] = self._send(key)
                    sent = True
                except CONNECTION_ERRORS as exc:
                    self._retry_at[key] = now + RETRY_PAUSE
                    failures.append(exc)
        if failures and not any(key in self._in_flight for key in keys):
            self._client.nodes_manager.initialize()
            raise redis.exceptions.ConnectionError(str(failures[0]))
        return sent

    def _send(self, key: bytes) -> Any:
        conn = self._idle.pop(key, None)
        if conn is not None:
            try:
                conn.send_command("BLPOP", key, SIGNAL_BLOCK)
                return conn
            except CONNECTION_ERRORS:
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
        self._changed = threading.Condition()
        self._polling = False
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)  # this process's copies only
        self._wake_read, self._wake_write = _nonblocking_pipe()

    def close(self) -> None:
        with self._changed:
            for conn in [*self._in_flight.values(), *self._idle.values()]:
                conn.disconnect()
            self._in_flight = {}
            self._idle = {}


def _nonblocking_pipe() -> tuple[int, int]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    return read, write


class RedisClusterBackend(RedisBackend):
    """Queues in a Redis Cluster (7.0 or later): the options and guarantees of
    :class:`~.redis.RedisBackend`, each queue partition's keys on the master of their slot.
    The URL names one or more nodes, ``redis+cluster://[user:password@]host:port[,host:port...]``."""

    default_partitions = 16
    shard_channels = True

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._signals = _SignalWaits(self._client)
        # FCALL connections kept between calls (kept_connection), per node's pool
        self._kept: dict[Any, list[Any]] = {}
        # A call's route, by its first key: the pool of its slot's master as the slot map
        # said, and that pool's kept connections (:meth:`_fcall_on_slot`).
        self._routes: dict[bytes, tuple[Any, list[Any]]] = {}

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
        self._routes = {}
        self._signals.forget()

    def _send(self, request: Request) -> Any:
        try:
            return self._send_to_cluster(request)
        except redis.exceptions.RedisClusterException as exc:
            raise unreachable(exc) from None

    def _send_to_cluster(self, request: Request) -> Any:
        if type(request) is FunctionCall:
            wait = self._replica_wait
            if wait is not None and wait.after(request.function):
                return self._call_on_master(key_slot(request.keys[0]), self._packed.pack(request), wait)
            return self._fcall_on_slot(request)
        if type(request) is WaitSignals:
            return self._signals.wait(request.keys, request.timeout)
        if type(request) is Command:
            if request.method == "function_load":
                return self._load_everywhere(*request.args)
            return getattr(self._client, request.method)(*request.args, **request.kwargs)
        assert type(request) is Pipeline
        return self._pipeline_on_masters(request, pipelined_wait(self._replica_wait, request))

    def _pipeline_on_masters(self, request: Pipeline, wait: ReplicaWait | None) -> list[Any]:
        """A pipeline: per master, its share of the prelude and calls packed in one write on
        one connection (kept between calls, as an FCALL's), every master's write sent
        before any reply is read; each call's reply or error in its place, as a pipeline's.

        Without wait_replicas (``wait`` None) it is redis-py's cluster pipeline, cheaper: a
        call refused by a cluster in motion (it did not run), a share that could not be
        connected to (not sent), and the calls of a connection lost before their replies
        were read are then sent one by one through redis-py's ``execute_command`` (which
        follows redirections and retries), the slot map reread after a connection error.

        With wait_replicas, each share that writes is followed by one WAIT on its
        connection (none for a share of read-only calls); a refused call and an
        unconnected share then go one by one (:meth:`_call_on_master`). As on one server,
        every call is sent though a master came up short of replicas, then ReplicasShort
        is raised; a connection lost after its write was sent is raised once the others
        are read (its calls may have run; the refused ones are not sent again)."""
        nodes = self._client.nodes_manager
        steps = waited_steps(self._client, self._packed, request, wait)
        replies: list[Any] = [UNREAD] * len(steps)
        one_by_one: list[int] = []
        in_flight = []
        lost: Exception | None = None
        for node, indexes in by_master(nodes, steps):
            pool, kept = self._pool_of(node)
            try:
                conn = kept_connection(pool, kept)
            except CONNECTION_ERRORS:
                one_by_one += indexes  # not sent: each follows its slot's master as the map says next
                continue
            waited = wait is not None and any(steps[index].writes for index in indexes)
            try:
                conn.send_packed_command(share_writes(conn, steps, indexes, wait if waited else None))
            except CONNECTION_ERRORS as exc:
                conn.disconnect()
                pool.release(conn)
                lost = lost or exc
                if wait is None:
                    one_by_one += indexes
                continue
            in_flight.append((pool, kept, conn, indexes, waited))
        short: BackendUnavailable | None = None
        for pool, kept, conn, indexes, waited in in_flight:
            try:
                for index in indexes:
                    try:
                        replies[index] = conn.read_response()
                    except redis.exceptions.ResponseError as exc:
                        replies[index] = exc
                if waited:
                    assert wait is not None
                    try:
                        acknowledged = conn.read_response()
                    except redis.exceptions.ResponseError as exc:
                        acknowledged = exc
                    short = short or share_short(steps, replies, indexes, acknowledged, wait, self._safe_url)
            except CONNECTION_ERRORS as exc:
                conn.disconnect()
                pool.release(conn)
                lost = lost or exc
                if wait is None:
                    one_by_one += [index for index in indexes if replies[index] is UNREAD]
                continue
            kept.append(conn)
        if wait is None:
            return self._pipeline_rest(request, replies, one_by_one, lost is not None)
        if lost is not None:
            nodes.initialize()  # for the next call: the node may be gone for good
            raise lost
        if one_by_one:  # a master that could not be connected to: a failover may have moved its slots
            nodes.initialize()
        one_by_one += refused(replies, nodes.move_slot)
        for index in sorted(one_by_one):
            step = steps[index]
            try:
                replies[index] = self._call_on_master(step.slot, step.command, wait if step.writes else None)
            except redis.exceptions.ResponseError as exc:
                replies[index] = exc
            except ReplicasShort as exc:
                short = short or exc
        if short is not None:
            raise short
        return replies

    def _pipeline_rest(self, request: Pipeline, replies: list[Any], unanswered: list[int], lost: bool) -> list[Any]:
        """A pipeline without wait_replicas, its ``unanswered`` steps (not sent, or their
        connection lost) and its refused ones sent one by one through redis-py, as its
        cluster pipeline does; ``replies`` completed."""
        nodes = self._client.nodes_manager
        if unanswered or lost:
            nodes.initialize()  # a node unreachable: a failover may have moved its slots
        for index in sorted(unanswered + refused(replies, nodes.move_slot)):
            try:
                replies[index] = self._client.execute_command(*step_alone(self._functions, request, index))
            except redis.exceptions.RedisError as exc:  # in its place, as redis-py's pipeline has it
                replies[index] = exc
        return replies

    def _call_on_master(self, slot: int, command: bytes | tuple[Any, ...], wait: ReplicaWait | None) -> Any:
        """``command`` (packed, or a command's arguments to pack) on a connection to the
        master of ``slot``, followed on it by ``wait``'s WAIT in the same write (none
        when None); the command's reply, once WAIT's answer is read and checked
        (:func:`~.redis.replied_after_wait`: ReplicasShort when too few replicas had it).

        A refusal by a cluster in motion (the command did not run) is followed on a
        connection of this backend's choosing, so that WAIT always follows the command
        on the connection that ran it: MOVED updates the slot map and goes to the new
        master; ASK sends ``ASKING`` and the command to the node it names, for that
        attempt only; TRYAGAIN and CLUSTERDOWN pause (:func:`retry_pause`, the slot map
        reread after CLUSTERDOWN) and try again; at most CALL_ATTEMPTS sends in all. A
        node that cannot be connected to (nothing sent) has the slot map reread, and the
        command goes to the slot's new master if the map names another, else raises the
        connection error. A connection that breaks after the command was sent raises at
        once: the command may have run, and is never sent twice."""
        nodes = self._client.nodes_manager
        asked: Any = None  # the node an ASK named, for the next attempt only
        last: Exception | None = None
        for attempt in range(CALL_ATTEMPTS):
            node = asked or nodes.get_node_from_slot(slot)
            pool, kept = self._pool_of(node)
            try:
                conn = kept_connection(pool, kept)
            except CONNECTION_ERRORS:
                # Not sent. The node is down: a failover gives its slots to a replica.
                nodes.initialize()
                if asked is None and nodes.get_node_from_slot(slot).name == node.name:
                    raise
                asked = None
                continue
            writes = [*packed(conn, command), wait.command] if wait is not None else packed(conn, command)
            try:
                if asked is not None:
                    conn.send_packed_command([ASKING, *writes])
                    conn.read_response()  # ASKING's OK
                else:
                    conn.send_packed_command(writes)
                reply = conn.read_response() if wait is None else replied_after_wait(
                    conn.read_response, wait, self._safe_url
                )
            except redis.exceptions.MovedError as exc:  # before AskError: a subclass of it
                kept.append(conn)
                nodes.move_slot(exc)
                asked, last = None, exc
                continue
            except redis.exceptions.AskError as exc:
                kept.append(conn)
                asked = self._client.get_node(host=exc.host, port=exc.port)
                if asked is None:  # a node the client has not heard of yet
                    nodes.initialize()
                    asked = self._client.get_node(host=exc.host, port=exc.port)
                last = exc
                continue
            except (redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError) as exc:
                kept.append(conn)
                time.sleep(retry_pause(attempt))
                if isinstance(exc, redis.exceptions.ClusterDownError):
                    nodes.initialize()
                asked, last = None, exc
                continue
            except CONNECTION_ERRORS:
                conn.disconnect()
                pool.release(conn)
                nodes.initialize()  # for the next call: the node may be gone for good
                raise
            except BaseException:
                pool.release(conn)
                raise
            kept.append(conn)
            return reply
        raise exhausted(slot, last)

    def _fcall_on_slot(self, call: FunctionCall) -> Any:
        """The packed FCALL on a connection to its slot's master (one kept from an earlier
        call to that node, as RedisBackend keeps its own); refused by a cluster in motion
        (or the connection lost), sent again by redis-py's execute_command.

        The route (the master's pool) is remembered per first key: the slot map's lookup
        and lock took about 2 µs of every call. A remembered route may be stale (a slot
        moved, a master failed over): the old master then refuses the call, which did not
        run, or cannot be reached; either way the routes are forgotten and the call goes
        through redis-py as before, so a stale route costs one refused send, never a
        second run."""
        route = self._routes.get(call.keys[0])
        if route is None:
            route = self._route(call.keys[0])
        pool, kept = route
        try:
            conn = kept_connection(pool, kept)
        except CONNECTION_ERRORS:
            # The slot's master as last known is unreachable (killed, its replica promoted
            # since): the slot map must be read again, else every call goes to the dead node.
            self._routes.clear()
            self._client.nodes_manager.initialize()
            return self._client.execute_command(*fcall_alone(self._functions, call))
        try:
            conn.send_packed_command([self._packed.pack(call)])
            reply = conn.read_response()
        except REDIRECTIONS as exc:
            pool.release(conn)
            self._routes.clear()
            if isinstance(exc, redis.exceptions.MovedError):
                self._client.nodes_manager.move_slot(exc)  # else redis-py would send it to the old master again
            return self._client.execute_command(*fcall_alone(self._functions, call))
        except CONNECTION_ERRORS:
            conn.disconnect()
            pool.release(conn)
            self._routes.clear()
            self._client.nodes_manager.initialize()
            return self._client.execute_command(*fcall_alone(self._functions, call))
        except BaseException:
            pool.release(conn)
            raise
        kept.append(conn)
        return reply

    def _route(self, key: bytes) -> tuple[Any, list[Any]]:
        """The pool of ``key``'s slot's master as the slot map says now, and its kept
        connections; remembered for the key's next calls (at most MAX_ROUTES keys)."""
        route = self._pool_of(self._client.nodes_manager.get_node_from_slot(key_slot(key)))
        if len(self._routes) >= MAX_ROUTES:
            self._routes.clear()
        self._routes[key] = route
        return route

    def _pool_of(self, node: Any) -> tuple[Any, list[Any]]:
        """``node``'s connection pool and the FCALL connections kept from it."""
        pool = (node.redis_connection or self._client.get_redis_connection(node)).connection_pool
        kept = self._kept.get(pool)
        if kept is None:
            kept = self._kept.setdefault(pool, [])
        return pool, kept

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

    def subscribe(self, queue: str) -> EventSubscription:
        channels = self._drive(self._ops.events_channels(queue))
        with translated_errors(self._safe_url):
            pubsub = self._client.pubsub()
            pubsub.ssubscribe(*channels)
            subscription = _ClusterSubscription(self, queue, pubsub)
            # Wait for the server's confirmation: events published from now on are received.
            if not subscription.confirmed(MAX_BLOCK + 5.0):
                pubsub.close()
                raise BackendUnavailable(f"redis at {self._safe_url} did not confirm the events subscription")
        return subscription

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


class _ClusterSubscription(EventSubscription):
    """Shard-channel subscriptions (SSUBSCRIBE), one connection per node holding a channel
    of the queue; redis-py's ClusterPubSub moves one whose slot migrates. Its own
    ``get_sharded_message`` waits its timeout on each node in turn: here the nodes'
    sockets are polled together instead."""

    def __init__(self, backend: RedisClusterBackend, queue: str, pubsub: Any) -> None:
        self._backend = backend
        self._queue = queue
        self._pubsub = pubsub

    def _messages(self, timeout: float) -> list[dict[str, Any]]:
        """The messages ready now, or the first to come within ``timeout``."""
        client = self._backend._client
        deadline = time.monotonic() + timeout
        while True:
            found = []
            by_fd = {}
            for name, node_pubsub in list(self._pubsub.node_pubsub_mapping.items()):
                node = client.get_node(node_name=name)
                while node is not None:
                    message = self._pubsub.get_sharded_message(timeout=0, target_node=node)
                    if message is None:
                        break
                    found.append(message)
                conn = node_pubsub.connection
                if conn is not None and conn._sock is not None:
                    by_fd[conn._sock.fileno()] = name
            remaining = deadline - time.monotonic()
            if found or remaining <= 0 or not by_fd:
                return found
            poll = select.poll()
            for fd in by_fd:
                poll.register(fd, select.POLLIN)
            poll.poll(remaining * 1000)

    def confirmed(self, timeout: float) -> bool:
        """Whether the server confirmed every shard-channel subscription within ``timeout``."""
        deadline = time.monotonic() + timeout
        wanted = len(self._pubsub.shard_channels)
        seen = 0
        while seen < wanted and time.monotonic() < deadline:
            seen += sum(m["type"] == "ssubscribe" for m in self._messages(deadline - time.monotonic()))
        return seen >= wanted

    def get(self, timeout: float) -> list[Event]:
        events: list[Event] = []
        with translated_errors(self._backend._safe_url):
            for message in self._messages(timeout):
                if message["type"] == "smessage":
                    events.extend(RedisOperations.parse_events(self._queue, message["data"]))
        return events

    def close(self) -> None:
        self._pubsub.close()
