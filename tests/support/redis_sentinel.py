"""A throwaway Redis Sentinel group on free loopback ports, for tests: a primary, one replica
(``--replicaof``) and three ``redis-sentinel`` processes monitoring the primary as
``MASTER_NAME`` with a quorum of 2 and short timeouts, so a failover takes a few seconds.

Sentinels rewrite their configuration files as the group changes, so each has its own
file in the group's temporary directory. ``stop`` kills every process of the group.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import redis

from .redis_server import RedisServer, free_port
from .runs import Report, check

MASTER_NAME = "sbprimary"
# A Sentinel deems the primary down after this long without a valid reply; a failover
# (election and promotion) then takes about as long again.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


def redis_sentinel_binary() -> str:
    path = shutil.which("redis-sentinel")
    if path is None:
        raise RuntimeError(
            "redis-sentinel is not installed; run `make test` (it installs it with apt-get) "
            "or `apt-get install -y redis-sentinel`"
        )
    return path


class SentinelProcess:
    """One ``redis-sentinel`` child process with a configuration file of its own."""

    def __init__(self, directory: str, lines: list[str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.config = os.path.join(directory, f"sentinel-{self.port}.conf")
        with open(self.config, "w") as config:
            config.write("\n".join([
                f"port {self.port}", "bind 127.0.0.1", f"dir {directory}", "daemonize no", "loglevel warning",
                *lines,
            ]) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> "SentinelProcess":
        self.process = subprocess.Popen(
            [redis_sentinel_binary(), self.config], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"redis-sentinel exited with {self.process.returncode}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-sentinel did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def monitor_lines(name: str, primary_port: int, quorum: int = 2) -> list[str]:
    return [
        f"sentinel monitor {name} 127.0.0.1 {primary_port} {quorum}",
        f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {name} 1",
    ]


class SentinelGroup:
    """A primary, a replica and three Sentinels; :attr:`url` reaches the primary through them."""

    def __init__(self, sentinels: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="sharded-broker-sentinel-")
        self.servers = [RedisServer(), RedisServer()]
        # Their configuration names the primary's port, so they are made once it runs.
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[SentinelProcess] = []

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def url(self, db: int = 0, master: str = MASTER_NAME, scheme: str = "redis+sentinel") -> str:
        return f"{scheme}://{self.addresses}/{db}?master={master}"

    def start(self, timeout: float = 30.0) -> "SentinelGroup":
        primary, replica = self.servers
        try:
            primary.start()
            replica.extra_args = ["--replicaof", "127.0.0.1", str(primary.port)]
            replica.start()
            for port in self.sentinel_ports:
                self.sentinels.append(SentinelProcess(self.dir, monitor_lines(MASTER_NAME, primary.port), port).start())
            self.wait_settled(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[index], decode_responses=True, socket_timeout=2)

    def primary_port(self) -> int:
        """The primary's port, as the first Sentinel says."""
        with self.sentinel_client() as client:
            return int(client.sentinel_get_master_addr_by_name(MASTER_NAME)[1])

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def wait_settled(self, timeout: float = 30.0) -> None:
        """Until every Sentinel names the same primary and knows the other Sentinels and a
        replica, and the primary has its replica online (asked of the servers: a Sentinel
        refreshes what it knows of a replica only every 10 s): the group can fail over."""
        deadline = time.monotonic() + timeout
        others = len(self.sentinel_ports) - 1
        while True:
            try:
                states = []
                for index in range(len(self.sentinel_ports)):
                    with self.sentinel_client(index) as client:
                        state = client.sentinel_master(MASTER_NAME)
                        replicas = client.sentinel_slaves(MASTER_NAME)
                    states.append((state, replicas))
                ports = {int(state["port"]) for state, _ in states}
                ready = (
                    len(ports) == 1
                    and all(state["num-other-sentinels"] >= others and state["is_master"] for state, _ in states)
                    and all(replicas for _, replicas in states)
                )
                if ready:
                    with redis.Redis(port=ports.pop(), socket_timeout=2) as primary:
                        info = primary.info("replication")
                    online = [value for name, value in info.items() if name.startswith("slave") and isinstance(value, dict)
                              and value.get("state") == "online"]
                    if info["role"] == "master" and online:
                        return
            except (redis.RedisError, OSError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Sentinel group did not settle within {timeout}s")
            time.sleep(0.1)

    def failover(self, timeout: float = 30.0) -> int:
        """``SENTINEL FAILOVER``: the replica becomes the primary, the old primary its
        replica. Waits until the group is settled again; returns the new primary's port."""
        before = self.primary_port()
        with self.sentinel_client() as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        deadline = time.monotonic() + timeout
        while self.primary_port() == before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no failover within {timeout}s")
            time.sleep(0.05)
        self.wait_settled(timeout)
        return self.primary_port()

    def kill_primary(self, timeout: float = 30.0) -> int:
        """SIGKILL the primary, as a crash would; once the Sentinels have promoted the
        replica, restart the killed server (its data gone: no persistence) as a replica of
        the new primary, as an operator would, and wait until the group is settled again.
        Returns the new primary's port."""
        before = self.primary_port()
        killed = self.server_on(before)
        killed.kill()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.primary_port() != before:
                    break
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Sentinels promoted no replica within {timeout}s")
            time.sleep(0.05)
        after = self.primary_port()
        killed.extra_args = ["--replicaof", "127.0.0.1", str(after)]
        killed.start()
        self.wait_settled(timeout)
        return after

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SentinelGroup":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


TESTS = Path(__file__).resolve().parents[1]


def failover_under_load(url: str, tmp_path: Path, fail_over: Callable[[], object], *,
                        consumers: int = 3, keys: int = 12) -> tuple[Report, int, int]:
    """Run ``fail_over`` while ``consumers`` engine worker processes
    (support/engine_worker.py) drain a queue that a producer fills over ``keys`` keys,
    every side with ``wait_replicas=1``; then wait (up to a minute) until every message
    acknowledged to the producer has run. The producer resends a refused enqueue with the
    same dedup id until it is acknowledged, so a message counts as published only once
    acknowledged. Returns the checker's report (support/runs.py), how many messages were
    published and how many enqueues were refused on the way."""
    import sharded_broker
    from .campaign import engine_target
    from .workload import wait_until

    queue = "campaign"  # engine_target's queue, whose run log target.runs reads
    target = engine_target(tmp_path)
    options = {"socket_timeout": 2, "wait_replicas": 1, "wait_timeout": 0.5}
    workers = []
    for n in range(consumers):
        config = {"url": url, "queue": queue, "events": str(tmp_path / "events.jsonl"), "vt": 3.0, "limit": 1,
                  "options": options}
        with open(tmp_path / f"engine-{n}.out", "wb") as output:
            workers.append(subprocess.Popen(
                [sys.executable, str(TESTS / "support" / "engine_worker.py"), json.dumps(config)],
                cwd=TESTS, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            ))
    producer_broker = sharded_broker.connect(url, max_deliveries=None, **options)
    published = {f"k{i}": 0 for i in range(keys)}
    refused = 0
    stop = threading.Event()

    def produce() -> None:
        nonlocal refused
        while not stop.is_set():
            for key, seq in list(published.items()):
                body = json.dumps({"k": key, "n": seq, "do": "ok", "s": 0.01}).encode()
                while True:
                    try:
                        producer_broker.enqueue(queue, body, key=key, dedup_id=f"{key}:{seq}")
                        break
                    except sharded_broker.BackendUnavailable:
                        refused += 1
                        time.sleep(0.05)
                published[key] = seq + 1
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        # The fault hits a loaded group: every consumer has run messages (however slowly
        # they started), three rounds of keys at least.
        wait_until(lambda: (lambda done: len({run.pid for run in done}) == consumers and len(done) >= 3 * keys)(
            [run for run in target.runs(tmp_path) if run.end is not None]), 60, "every consumer running")
        before = sum(published.values())
        fail_over()
        # Three rounds published through the group as the failover left it, then stop.
        after = sum(published.values())
        wait_until(lambda: sum(published.values()) >= after + 3 * keys or not producer.is_alive(), 30,
                   "rounds published after the failover")
        stop.set()
        producer.join(30)
        if sum(published.values()) <= before:
            raise AssertionError("nothing was published after the failover")
        deadline = time.monotonic() + 60
        while True:
            report = check(target.runs(tmp_path), published)
            if not report.lost or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        producer.join(30)
        for worker in workers:
            worker.kill()
            worker.wait(10)
        producer_broker.close()
    return report, sum(published.values()), refused
