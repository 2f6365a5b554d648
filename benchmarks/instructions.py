"""Redis server instructions per message, counted by callgrind: a measure of server work that
does not move with the machine's load (rates and µs do, by tens of percent on shared machines).

    python -m benchmarks.instructions [--messages 1000] [--keys 1000] [--refs]
    python -m benchmarks.instructions --breakdown --redis-server PATH


Starts a throwaway ``redis-server`` under ``valgrind --tool=callgrind --instr-atstart=no`` (counting
only the functions that serve requests, see COUNTED) on a
free loopback port, and for each phase zeroes the counters, turns instrumentation on, runs the
phase, turns it off and dumps (``callgrind_control -z / -i on / -i off / -d``): the dump's total
divided by the phase's messages. Each engine phase starts on an empty server. Dramatiq's
``RedisBroker`` is driven the same way (``broker.enqueue``, then its consumer) for comparison.
Needs valgrind (Debian package ``valgrind``); takes a few minutes.

``--breakdown`` also splits each phase's count by where the server spent it (see
BREAKDOWN), from callgrind's inclusive cost of a few functions. That needs a
``redis-server`` with its symbols (Debian's binary is stripped): build the same release
from its source (``make`` in a checkout of the redis repository at tag 7.0.15) and pass
its ``src/redis-server`` as ``--redis-server``; allocation there is libc's (``make
MALLOC=libc``) or jemalloc as built, so totals differ from Debian's by a few percent.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable

import redis

import sharded_broker
from sharded_broker import Message

from .common import RedisServer  # noqa: F401  (puts tests/support on the path)
from support.redis_server import free_port


# Only the work of serving requests is counted: reading and running each command and
# writing its reply. The server's periodic and idle work (serverCron, the event loop) grows
# with wall time, which a loaded machine stretches, and would add tens of percent.
COUNTED = ("--toggle-collect=readQueryFromClient", "--toggle-collect=writeToClient")


# Where a phase's instructions went, from the inclusive cost of these functions of
# redis-server 7.0 (FCALL and EVALSHA both run through luaCallFunction): each row is one
# function's cost less the next one's, and the last is what remains inside redis.call.
BREAKDOWN = (
    ("reading, parsing and dispatching requests, writing replies", None, "luaCallFunction"),
    ("entering and leaving the script (KEYS and ARGV tables, the reply)", "luaCallFunction", "lua_pcall"),
    ("the script's own Lua (interpreter, tables, strings, allocation, collector, cmsgpack)", "lua_pcall",
     "luaRedisGenericCommand"),
    ("redis.call: converting arguments and replies", "luaRedisGenericCommand", "scriptCall"),
    ("redis.call: the commands themselves", "scriptCall", None),
)


def inclusive_costs(dump: str) -> dict[str, int]:
    """Inclusive instructions of each function named in BREAKDOWN, from callgrind_annotate."""
    wanted = {name for _, *names in BREAKDOWN for name in names if name}
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", dump],
                          check=True, capture_output=True, text=True).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].replace(",", "").isdigit():
            continue
        function = parts[2].rsplit(":", 1)[-1]
        if function in wanted:
            costs[function] = max(costs.get(function, 0), int(parts[0].replace(",", "")))
    missing = wanted - costs.keys()
    if missing:
        raise SystemExit(f"no cost for {sorted(missing)} in the dump: is --redis-server a build with symbols?")
    return costs


def breakdown(total: int, costs: dict[str, int]) -> list[int]:
    """Instructions per BREAKDOWN row (they add up to total)."""
    return [(costs[outer] if outer else total) - (costs[inner] if inner else 0) for _, outer, inner in BREAKDOWN]


class CallgrindServer:
    """A redis-server whose instructions callgrind counts, phase by phase."""

    def __init__(self, server: str = "redis-server") -> None:
        if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
            raise SystemExit("valgrind is not installed (apt-get install -y valgrind)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sb-callgrind-")
        self.out = os.path.join(self.dir, "cg.out")
        self.process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", *COUNTED, f"--callgrind-out-file={self.out}",
             server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port)
        for _ in range(600):
            try:
                self.client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        raise SystemExit("redis-server under callgrind did not start")

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.process.pid)], check=True, capture_output=True)

    def instructions(self, phase: Callable[[], None], costs: dict[str, int] | None = None) -> int:
        """The instructions phase() caused; with costs, also fills in inclusive_costs()."""
        for dump in glob.glob(self.out + ".*"):
            os.remove(dump)
        self._control("-z")
        self._control("-i", "on")
        phase()
        self._control("-i", "off")
        self._control("-d")
        total = 0
        for _ in range(100):
            for dump in glob.glob(self.out + ".*"):
                with open(dump, errors="replace") as lines:
                    for line in lines:
                        if line.startswith(("summary:", "totals:")):
                            total = max(total, int(line.split()[1]))
                if total and costs is not None:
                    costs.update(inclusive_costs(dump))
            if total:
                return total
            time.sleep(0.1)
        raise SystemExit("callgrind wrote no dump")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def engine_phases(
    messages: int, keys: int, refs: bool = False
) -> dict[str, tuple[Callable[[sharded_broker.Broker], None] | None, Callable[[sharded_broker.Broker], None]]]:
    names = [f"user-{i}" for i in range(keys)]
    payload = b"x" * 100

    def enqueue(keyed: bool, with_ref: bool = False) -> Callable[[sharded_broker.Broker], None]:
        def run(broker: sharded_broker.Broker) -> None:
            for i in range(messages):
                # A ref as Celery's task ids are: a UUID's 36 characters.
                ref = f"{i:08x}-0000-4000-8000-000000000000" if with_ref else None
                broker.enqueue("q", payload, key=names[i % keys] if keyed else None, ref=ref)
        return run

    def lease_ack(broker: sharded_broker.Broker) -> None:
        done = 0
        while done < messages:
            for lease in broker.lease("q", limit=1):
                broker.ack(lease)
                done += 1

    def enqueue_many(broker: sharded_broker.Broker) -> None:
        for start in range(0, messages, 200):
            broker.enqueue_many("q", [Message(payload, key=names[i % keys]) for i in range(start, start + 200)])

    def lease_ack_many(broker: sharded_broker.Broker) -> None:
        done = 0
        while done < messages:
            leases = broker.lease("q", limit=100)
            broker.ack_many(leases)
            done += len(leases)

    with_refs = {
        "enqueue, one per call, keyed, with a ref": (None, enqueue(True, True)),
        "lease + ack, one per call, keyed, with a ref": (enqueue(True, True), lease_ack),
    }
    return {
        **(with_refs if refs else {}),
        "enqueue, one per call, keyed": (None, enqueue(True)),
        "lease + ack, one per call, keyed": (enqueue(True), lease_ack),
        "enqueue_many 200, keyed": (None, enqueue_many),
        "lease 100 + ack_many, keyed": (enqueue_many, lease_ack_many),
        "enqueue, one per call, unkeyed": (None, enqueue(False)),
        "lease + ack, one per call, unkeyed": (enqueue(False), lease_ack),
    }


def dramatiq_phases(server: CallgrindServer, messages: int) -> dict[str, Callable[[], None]]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=server.url)
    broker.declare_queue("dq")
    batch = [dramatiq.Message(queue_name="dq", actor_name="noop", args=("x" * 100,), kwargs={}, options={})
             for _ in range(messages)]

    def send() -> None:
        for message in batch:
            broker.enqueue(message)

    def consume(prefetch: int) -> Callable[[], None]:
        def run() -> None:
            consumer = broker.consume("dq", prefetch=prefetch, timeout=100)
            done = 0
            while done < messages:
                message = next(consumer)
                if message is not None:
                    consumer.ack(message)
                    done += 1
            consumer.close()
        return run

    return {"send": send, "fetch (prefetch 1) + ack": consume(1), "resend": send,
            "fetch (prefetch 16) + ack": consume(16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--refs", action="store_true", help="also the keyed one-per-call phases with a ref per message")
    parser.add_argument("--breakdown", action="store_true",
                        help="split each count by where the server spent it (needs --redis-server with symbols)")
    parser.add_argument("--redis-server", default="redis-server", help="the redis-server binary to run")
    options = parser.parse_args()
    server = CallgrindServer(options.redis_server)
    rows: list[tuple[str, int, dict[str, int]]] = []

    def count(name: str, phase: Callable[[], None]) -> None:
        costs: dict[str, int] | None = {} if options.breakdown else None
        total = server.instructions(phase, costs)
        rows.append((name, total, costs or {}))
        print(f"| {name} | {total / options.messages / 1000:,.0f} |", flush=True)

    try:
        print(f"Redis server instructions per message (callgrind), {options.messages:,} messages, "
              f"{options.keys:,} keys, 100-byte payload")
        print("| phase | k instructions per message |\n| --- | --- |")
        for name, (before, phase) in engine_phases(options.messages, options.keys, options.refs).items():
            server.client.flushall()
            with sharded_broker.connect(server.url, socket_timeout=300) as broker:
                broker.enqueue("q", b"warm-up", key="warm-up")  # loads the functions
                broker.ack_many(broker.lease("q", 1))
                if before is not None:
                    before(broker)
                count(f"sharded-broker {name}", functools.partial(phase, broker))
        server.client.flushall()
        for name, dramatiq_phase in dramatiq_phases(server, options.messages).items():
            if name == "resend":
                dramatiq_phase()
                continue
            count(f"Dramatiq RedisBroker {name}", dramatiq_phase)
    finally:
        server.close()
    if options.breakdown:
        print("\nWhere they went, k instructions per message:\n")
        print("| phase | " + " | ".join(label for label, _, _ in BREAKDOWN) + " |")
        print("| --- |" + " --- |" * len(BREAKDOWN))
        for name, total, costs in rows:
            parts = breakdown(total, costs)
            print(f"| {name} | " + " | ".join(f"{part / options.messages / 1000:,.0f}" for part in parts) + " |")


if __name__ == "__main__":
    main()
