"""One queue over 1 and 3 masters of a Redis Cluster, and on a plain server (issue 13's goals).

Three topologies, each started for the measurement and stopped after it: a plain
redis-server, a Redis Cluster of one master and one of three masters (no replicas: a
replica's replication stream would count in the machine's load, not in the queue's
work). On each, with ``cluster_keys`` keys and as many producer and consumer processes
as the topology has masters (:mod:`benchmarks.cluster_worker`):

* **engine full cycle**: the producers ``enqueue_many`` ``cluster_messages`` messages
  (batches of ``batch``), side by side; then the consumers ``lease(limit=lease_batch)``
  + ``ack_many`` them, side by side. Each phase's rate is messages / (last message's end
  - first one's start, over all processes); the round trip counts each message once for
  both phases (messages / (enqueue time + drain time)), as :mod:`benchmarks.engine_bench`;
* **Dramatiq keyed drain**: ``cluster_tasks`` no-op tasks sent over the keys (from this
  process), then drained by Dramatiq ``Worker`` processes (``worker_threads`` each) on a
  ``ShardedBroker``: tasks / (last task's end - first task's start).

For every master, its CPU time (``INFO cpu``: the main thread's user + system seconds,
read before and after each phase) per message of the phase: what each master spent on
its share. On a machine with fewer cores than masters + clients the rates cannot scale,
but the busiest master's time per message still says what one queue could do with a core
per master: ``1e6 / busiest master's µs per message`` messages a second (``capacity``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import redis

import sharded_broker

from .common import ROOT, RedisServer, Sizes, rate
from .cluster_worker import ACTOR, QUEUE, noop

sys.path.insert(0, str(ROOT / "tests"))
from support.redis_cluster import RedisCluster  # noqa: E402

# (name, masters; 0 for the plain server)
TOPOLOGIES = (("plain", 0), ("cluster-1", 1), ("cluster-3", 3))


@contextmanager
def topology(masters: int) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """A fresh plain server (``masters`` 0) or cluster: its URL and its masters' addresses."""
    if masters == 0:
        with RedisServer() as server:
            yield server.url, [("127.0.0.1", server.port)]
    else:
        with RedisCluster(masters=masters, replicas_per_master=0) as cluster:
            yield cluster.url, [("127.0.0.1", node.port) for node in cluster.primaries()]


class MasterClock:
    """Each master's main-thread CPU seconds (INFO cpu) at the start of a phase, and the
    function calls (FCALL) all masters served."""

    def __init__(self, masters: list[tuple[str, int]]) -> None:
        self.clients = [redis.Redis(host=host, port=port) for host, port in masters]
        self.names = [f"{host}:{port}" for host, port in masters]
        self.start = self.read()
        self.calls_start = self.function_calls()

    def function_calls(self) -> int:
        return sum(
            int(client.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0)) for client in self.clients
        )

    def calls_per_message(self, count: int) -> float:
        """Function calls served by all masters since the start (or the last call), per message:
        a queue's partitions split batches into more calls, each with a fixed cost."""
        now = self.function_calls()
        per_message = round((now - self.calls_start) / count, 3)
        self.calls_start = now
        return per_message

    def read(self) -> list[float]:
        seconds = []
        for client in self.clients:
            cpu = client.info("cpu")
            seconds.append(float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"]))
        return seconds

    def us_per_message(self, count: int) -> list[float]:
        """Each master's CPU µs since the start (or the last call), per message."""
        now = self.read()
        spent = [round((after - before) * 1e6 / count, 2) for before, after in zip(self.start, now)]
        self.start = now
        return spent

    def close(self) -> None:
        for client in self.clients:
            client.close()


class Processes:
    """Benchmark processes started together: ready, then go, then stop, then their tallies."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.cluster_worker", json.dumps(config)],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            for config in configs
        ]
        for process in self.processes:
            self._expect(process, "ready")

    @staticmethod
    def _expect(process: subprocess.Popen[str], word: str) -> None:
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != word:
            raise RuntimeError(f"benchmark process said {line!r} instead of {word!r} (exit {process.poll()})")

    def tell(self, word: str) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(word + "\n")
            process.stdin.flush()

    def results(self, timeout: float) -> list[dict[str, Any]]:
        """Each process's tally, once it exits."""
        tallies = []
        for process in self.processes:
            out, _ = process.communicate(timeout=timeout)
            if process.returncode != 0:
                raise RuntimeError(f"benchmark process exited with {process.returncode}")
            tallies.append(json.loads(out.strip().splitlines()[-1]))
        return tallies

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def _phase(tallies: list[dict[str, Any]], expected: int, what: str) -> tuple[float, float, float]:
    """(first start, last end, seconds) over the processes' tallies, checking the count."""
    count = sum(t["count"] for t in tallies)
    if count != expected:
        raise RuntimeError(f"{what}: {count} messages handled, expected {expected}")
    first = min(t["first"] for t in tallies if t["count"])
    last = max(t["last"] for t in tallies if t["count"])
    return first, last, last - first


def wait_drained(url: str, timeout: float) -> None:
    with sharded_broker.connect(url) as broker:
        deadline = time.monotonic() + timeout
        while True:
            stats = broker.stats(QUEUE)
            if stats.ready == stats.leased == stats.delayed == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"queue not drained within {timeout:.0f}s: {stats}")
            time.sleep(0.05)


def _capacity(us_per_message: list[float]) -> float | None:
    busiest = max(us_per_message)
    return round(1e6 / busiest, 1) if busiest > 0 else None


def engine_cycle(url: str, masters: list[tuple[str, int]], sizes: Sizes) -> dict[str, Any]:
    """The engine's full cycle with one producer and one consumer process per master."""
    count, processes = sizes.cluster_messages, len(masters)
    shares = [count // processes + (i < count % processes) for i in range(processes)]
    clock = MasterClock(masters)
    with ExitStack() as stack:
        producers = Processes([
            {"role": "produce", "url": url, "index": i, "producers": processes, "keys": sizes.cluster_keys,
             "count": shares[i], "batch": sizes.batch}
            for i in range(processes)
        ])
        stack.callback(producers.kill)
        clock.us_per_message(1)  # the connecting is not the phase's
        clock.calls_per_message(1)
        producers.tell("go")
        enqueue = _phase(producers.results(timeout=120), count, "enqueue")
        enqueue_cpu = clock.us_per_message(count)
        enqueue_calls = clock.calls_per_message(count)
        consumers = Processes([
            {"role": "consume", "url": url, "lease_batch": sizes.lease_batch} for _ in range(processes)
        ])
        stack.callback(consumers.kill)
        clock.us_per_message(1)
        clock.calls_per_message(1)
        consumers.tell("go")
        wait_drained(url, timeout=120)
        consumers.tell("stop")
        drain = _phase(consumers.results(timeout=60), count, "lease+ack")
        drain_cpu = clock.us_per_message(count)
        drain_calls = clock.calls_per_message(count)
    clock.close()
    total_cpu = [round(e + d, 2) for e, d in zip(enqueue_cpu, drain_cpu)]
    return {
        "messages": count,
        "keys": sizes.cluster_keys,
        "processes": processes,
        "enqueue_per_s": rate(count, enqueue[2]),
        "drain_per_s": rate(count, drain[2]),
        "round_trip_per_s": rate(count, enqueue[2] + drain[2]),
        "server_cpu_us_per_message": {"enqueue": enqueue_cpu, "lease_ack": drain_cpu, "total": total_cpu},
        "server_cpu_us_per_message_all_masters": round(sum(total_cpu), 2),
        "function_calls_per_message": {"enqueue": enqueue_calls, "lease_ack": drain_calls},
        "capacity_per_s": _capacity(total_cpu),
    }


def dramatiq_drain(url: str, masters: list[tuple[str, int]], sizes: Sizes) -> dict[str, Any]:
    """A Dramatiq keyed drain: tasks sent from here, drained by one worker process per master."""
    import dramatiq

    from sharded_broker.integrations.dramatiq import ShardedBroker

    count = sizes.cluster_tasks
    broker = ShardedBroker(url=url)
    try:
        actor = dramatiq.actor(noop, broker=broker, actor_name=ACTOR, queue_name=QUEUE, max_retries=0)
        for index in range(count):
            actor.send_with_options(args=(index,), shard_key=f"key-{index % sizes.cluster_keys}")
    finally:
        broker.close()
    clock = MasterClock(masters)
    workers = Processes([
        {"role": "dramatiq", "url": url, "worker_threads": sizes.worker_threads} for _ in masters
    ])
    try:
        clock.us_per_message(1)
        clock.calls_per_message(1)
        workers.tell("go")
        wait_drained(url, timeout=60 + count / 50)
        workers.tell("stop")
        _, _, seconds = _phase(workers.results(timeout=60), count, "dramatiq drain")
    finally:
        workers.kill()
    cpu = clock.us_per_message(count)
    calls = clock.calls_per_message(count)
    clock.close()
    return {
        "tasks": count,
        "keys": sizes.cluster_keys,
        "processes": len(masters),
        "worker_threads": sizes.worker_threads,
        "drain_per_s": rate(count, seconds),
        "server_cpu_us_per_task": cpu,
        "server_cpu_us_per_task_all_masters": round(sum(cpu), 2),
        "function_calls_per_task": calls,
        "capacity_per_s": _capacity(cpu),
    }


def scale_out(sizes: Sizes, log: Any = lambda line: None) -> dict[str, Any]:
    """Every topology's engine cycle and Dramatiq drain, then the goals' ratios."""
    figures: dict[str, Any] = {}
    for name, masters in TOPOLOGIES:
        log(f"   {name}")
        with topology(masters) as (url, addresses):
            figures[f"{name}/engine"] = {"masters": masters, **engine_cycle(url, addresses, sizes)}
        with topology(masters) as (url, addresses):
            figures[f"{name}/dramatiq"] = {"masters": masters, **dramatiq_drain(url, addresses, sizes)}
    return figures
