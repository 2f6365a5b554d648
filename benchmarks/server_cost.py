"""What a piece of work cost the Redis server: its command time, counted once, and its CPU.

``INFO commandstats`` counts every command the server runs, including the commands a
script (``EVAL``/``EVALSHA``/``FCALL``) or a transaction (``EXEC``) runs inside itself,
and the script's or transaction's own ``usec`` already includes their time (checked on
the server by :func:`nesting_check`). Summing every line therefore counts nested work
twice. :class:`ServerMeter` counts each command once: the *top-level* commands only,
meaning those a client sent, known from this process's own tally of what redis-py sent
(every client of a benchmark, the frameworks' included, lives in this process):

* a script or transaction command: its whole ``usec`` (nested commands included);
* any other command: its ``usec`` times the share of its calls that clients sent outside
  a transaction (1 when every call came from a client, 0 when every call ran inside a
  script or ``EXEC``; a command that ran both ways is shared by its mean time per call,
  and named in ``shared_commands``);
* the meter's own ``CONFIG RESETSTAT`` and ``INFO`` are left out.

The second, independent measure is the server main thread's CPU time (``INFO cpu``
``used_cpu_user_main_thread`` + ``used_cpu_sys_main_thread``), which also covers what
commandstats leaves out (reading requests, writing replies, the event loop), and which
other processes on a busy machine cannot inflate, unlike commandstats' wall-clock
``usec``.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import redis
from redis import connection as redis_connection

# Commands whose commandstats usec includes the commands they run inside themselves.
CONTAINERS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro", "exec"})
# Commands that commandstats names with their subcommand ("config|resetstat").
WITH_SUBCOMMAND = frozenset({
    "acl", "client", "cluster", "command", "config", "function", "latency", "memory", "module",
    "object", "pubsub", "script", "slowlog", "xgroup", "xinfo",
})
_MEASURING = frozenset({"config|resetstat", "info"})


def _name(args: tuple[Any, ...]) -> str:
    """The commandstats name of a command as redis-py packs it."""
    words: list[Any] = []
    for arg in args[:2]:
        words.extend(arg.split() if isinstance(arg, (str, bytes)) else [arg])
    parts = [w.decode() if isinstance(w, bytes) else str(w) for w in words[:2]]
    name = parts[0].lower()
    if name in WITH_SUBCOMMAND and len(parts) > 1:
        return f"{name}|{parts[1].lower()}"
    return name


class CommandTally:
    """Counts, per command name, what redis-py clients of this process send, telling
    commands sent inside ``MULTI`` ... ``EXEC`` (run by the server inside ``EXEC``) apart.

    Installed once (:func:`tally`) by wrapping the serializers' ``pack``, which every
    command of every redis-py connection (pipelines and pub/sub included) goes through.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.top_level: Counter[str] = Counter()
        self._local = threading.local()

    def reset(self) -> None:
        with self.lock:
            self.top_level.clear()

    def snapshot(self) -> Counter[str]:
        """Commands sent at top level (not queued in a transaction), per name."""
        with self.lock:
            return Counter(self.top_level)

    def sent(self, args: tuple[Any, ...]) -> None:
        local = self._local
        if getattr(local, "paused", False) or not args:
            return
        name = _name(args)
        queued = getattr(local, "in_multi", False)
        if name == "multi":
            local.in_multi = True
        elif name in ("exec", "discard"):
            local.in_multi = queued = False
        if not queued:
            with self.lock:
                self.top_level[name] += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """What this thread sends inside the block is not counted (the meter's own reads)."""
        self._local.paused = True
        try:
            yield
        finally:
            self._local.paused = False


_tally: CommandTally | None = None
_install_lock = threading.Lock()


def tally() -> CommandTally:
    """The process's command tally, installed on first use."""
    global _tally
    with _install_lock:
        if _tally is None:
            _tally = CommandTally()
            for serializer in (redis_connection.PythonRespSerializer, redis_connection.HiredisRespSerializer):
                _count_packs(serializer, _tally)
            _count_engine_fcalls(_tally)
        return _tally


def _count_engine_fcalls(counter: CommandTally) -> None:
    """The engine packs its FCALLs itself (PackedCalls, past redis-py's serializers):
    each one it packs is one FCALL sent. (An older checkout measured as a baseline sends
    everything through redis-py.)"""
    try:
        from sharded_broker.backends.redis import PackedCalls
    except ImportError:
        return
    pack = PackedCalls.pack

    def counted_pack(self: Any, call: Any) -> bytes:
        counter.sent(("FCALL",))
        return pack(self, call)

    PackedCalls.pack = counted_pack  # type: ignore[method-assign]


def _count_packs(serializer: type, counter: CommandTally) -> None:
    pack = serializer.pack

    def counted_pack(self: Any, *args: Any) -> Any:
        counter.sent(args)
        return pack(self, *args)

    serializer.pack = counted_pack  # type: ignore[method-assign]


def _cpu_seconds(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])


def top_level_commands(
    stats: dict[str, dict[str, Any]], sent: Counter[str]
) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Per command in ``stats`` (INFO commandstats, keyed by command name): its top-level
    (calls, microseconds), from what clients ``sent`` outside transactions, for the
    commands with any; and the commands that ran both at top level and nested, whose
    time was shared by mean time per call."""
    counted: dict[str, tuple[float, float]] = {}
    shared = []
    for name, entry in stats.items():
        if name in _MEASURING:
            continue
        usec, calls = float(entry["usec"]), int(entry["calls"])
        top = calls if name in CONTAINERS else min(sent.get(name, 0), calls)
        if 0 < top < calls:
            shared.append(name)
        if top:
            counted[name] = (top, usec * top / calls)
    return counted, sorted(shared)


class ServerMeter:
    """Measures one block of work on one Redis server (see the module docstring).

    ``with ServerMeter(url) as cost: work()`` then ``cost.figures(count)`` for the costs
    per message. The server's counters are reset at the start, so only one meter may
    run at a time on a server.
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.tally = tally()
        self.usec = self.naive_usec = self.cpu_seconds = 0.0
        self.commands = 0
        self.shared: list[str] = []
        self.by_command: dict[str, tuple[float, float]] = {}
        self.stats: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> "ServerMeter":
        self._client = redis.Redis.from_url(self.redis_url)
        with self.tally.paused():
            self._client.config_resetstat()
            self._cpu_before = _cpu_seconds(self._client)
        self.tally.reset()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            with self.tally.paused():
                if exc_info[0] is None:
                    self.stats = {
                        name.removeprefix("cmdstat_"): entry
                        for name, entry in self._client.info("commandstats").items()
                    }
                    self.cpu_seconds = _cpu_seconds(self._client) - self._cpu_before
        finally:
            self._client.close()
        sent = self.tally.snapshot()
        self.by_command, self.shared = top_level_commands(self.stats, sent)
        self.usec = sum(usec for _, usec in self.by_command.values())
        self.naive_usec = float(sum(e["usec"] for n, e in self.stats.items() if n not in _MEASURING))
        self.commands = sum(sent.values())

    def figures(self, count: int) -> dict[str, Any]:
        """The block's costs divided by ``count`` messages."""
        return {
            "server_us": round(self.usec / count, 2),
            "cpu_us": round(self.cpu_seconds * 1e6 / count, 2),
            "naive_sum_us": round(self.naive_usec / count, 2),
            "commands_sent": round(self.commands / count, 2),
            "shared_commands": self.shared,
            # Where the server time went: top-level calls and µs per message, by command.
            "by_command": {
                name: {"calls": round(calls / count, 3), "us": round(usec / count, 2)}
                for name, (calls, usec) in sorted(self.by_command.items(), key=lambda item: -item[1][1])
            },
        }


_NESTING_LIBRARY = "sb_nesting_check"
_NESTING_BODY = "for i = 1, tonumber(ARGV[1]) do redis.call('SET', KEYS[1], i) end return 1"


def nesting_check(redis_url: str, nested_calls: int = 2000) -> dict[str, Any]:
    """Shows on the run's server that a script's, a function's and a transaction's usec
    include the commands they run: ``EVAL``'s usec is at least the sum of its nested
    ``SET`` calls', and so are ``FCALL``'s and ``EXEC``'s. Raises when it is not so (then
    the meter's method would be wrong for this server)."""
    client = redis.Redis.from_url(redis_url)
    function_source = (
        f"#!lua name={_NESTING_LIBRARY}\n"
        f"redis.register_function('{_NESTING_LIBRARY}', function(KEYS, ARGV) {_NESTING_BODY} end)"
    )
    figures: dict[str, Any] = {}
    try:
        with tally().paused():
            client.function_load(function_source, replace=True)
            for what, container in (("script", "eval"), ("function", "fcall"), ("transaction", "exec")):
                client.config_resetstat()
                if what == "script":
                    client.eval(_NESTING_BODY, 1, "nesting-check", nested_calls)
                elif what == "function":
                    client.fcall(_NESTING_LIBRARY, 1, "nesting-check", nested_calls)
                else:
                    pipe = client.pipeline(transaction=True)
                    for i in range(nested_calls):
                        pipe.set("nesting-check", i)
                    pipe.execute()
                stats = client.info("commandstats")
                nested = stats["cmdstat_set"]
                outer = stats[f"cmdstat_{container}"]
                if nested["calls"] != nested_calls:
                    raise RuntimeError(f"nesting check: {nested['calls']} SET calls counted, expected {nested_calls}")
                if outer["usec"] < nested["usec"]:
                    raise RuntimeError(
                        f"nesting check: {container} took {outer['usec']} µs but its nested SETs "
                        f"{nested['usec']} µs: its usec does not include them on this server"
                    )
                figures[what] = {f"{container}_usec": outer["usec"], "nested_set_usec": nested["usec"],
                                 "nested_calls": nested_calls}
            client.delete("nesting-check")
            client.function_delete(_NESTING_LIBRARY)
    finally:
        client.close()
    return figures
