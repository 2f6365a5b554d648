"""A randomized fault campaign: producers send keyed and unkeyed tasks while a driver
injects faults at random moments; a checker then reports, per key, overlaps, order
violations, lost and duplicate runs (tests/support/runs.py), with the seed that replays
the schedule.

Everything runs against a throwaway redis-server with AOF (``appendfsync always``); the
workers reach it through a TCP proxy (so their connections can be cut), the producer
and the checker directly. Faults (each target picks those that apply to it):

* ``kill_worker``: SIGKILL of a whole worker (main process and its children), restarted;
* ``kill_child``: SIGKILL of a single pool process (Celery prefork child, Dramatiq
  worker process);
* ``freeze``: SIGSTOP of a whole worker for longer than the visibility timeout, then
  SIGCONT;
* ``client_kill``: ``CLIENT KILL TYPE normal`` (every client connection cut at once);
* ``outage_short`` / ``outage_long``: the proxy cuts and refuses every connection for
  less than the survivable outage (sharded_broker/heartbeat.py), or for longer than the
  visibility timeout;
* ``redis_restart``: redis-server SIGKILLed and started again from its AOF.

The random generator is seeded from ``SB_CAMPAIGN_SEED`` (else a fresh seed, printed);
the campaign lasts ``SB_CAMPAIGN_SECONDS`` (default 180) per target. Thread timing still
varies from run to run: the seed replays the schedule of faults and tasks, not the
interleaving.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import redis

import sharded_broker
from sharded_broker.heartbeat import survivable_outage
from support.redis_server import RedisServer
from support.runs import Report, Run, check, read_runs
from support.tcp_proxy import TcpProxy
from support.workload import wait_until

AOF = ["--appendonly", "yes", "--appendfsync", "always"]
ALL_FAULTS = ("kill_worker", "kill_child", "freeze", "client_kill", "outage_short", "outage_long", "redis_restart")
UNKEYED = "-"


def campaign_seconds() -> float:
    return float(os.environ.get("SB_CAMPAIGN_SECONDS", "180"))


def campaign_seed() -> int:
    value = os.environ.get("SB_CAMPAIGN_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**32)


def process_group(pid: int) -> list[int]:
    """``pid`` and its children, whichever of its threads forked them (billiard forks
    replacement pool processes from a supervisor thread)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += map(int, (task / "children").read_text().split())
        except OSError:
            pass
    return [pid, *children]


class Slot:
    """One worker (a process group), started again by ``ensure`` when it died."""

    def __init__(self, start: Callable[[int], subprocess.Popen]) -> None:
        self._start = start
        self.starts = 0
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        self.starts += 1
        return self._start(self.starts)

    def alive(self) -> bool:
        return self.process.poll() is None

    def ensure(self) -> None:
        if not self.alive():
            self.process = self._spawn()

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Target:
    """What one campaign runs: how to start a worker and publish, which faults apply."""

    name: str
    queue: str
    faults: tuple[str, ...]
    start_worker: Callable[[str, Path, int], subprocess.Popen]  # (worker URL, log, n)
    make_publisher: Callable[[str], Callable[[str | None, int, float], None]]  # direct URL
    decode_dead: Callable[[bytes], tuple[str, int]]
    runs: Callable[[Path], list[Run]] = read_runs
    workers: int = 2
    children_per_worker: int = 2


@dataclass
class Outcome:
    seed: int
    seconds: float
    faults: dict[str, int] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)
    report: Report = field(default_factory=Report)

    def summary(self) -> str:
        return (
            f"campaign seed {self.seed} ({self.seconds:.0f} s): faults {self.faults}; "
            f"published {sum(self.published.values())} ({self.published.get(UNKEYED, 0)} unkeyed); "
            f"{self.report.summary()}"
        )


class Producer(threading.Thread):
    """Publishes numbered tasks, keyed (``keys``) and unkeyed, retrying each until the
    broker takes it."""

    def __init__(self, publish: Callable[[str | None, int, float], None], keys: list[str], rng: random.Random,
                 rate: float, max_task_seconds: float) -> None:
        super().__init__(name="campaign-producer", daemon=True)
        self.publish, self.keys, self.rng = publish, keys, rng
        self.rate, self.max_task_seconds = rate, max_task_seconds
        self.published: dict[str, int] = {}
        self.planned: dict[tuple[str, int], float] = {}  # (key, seq) -> seconds of work
        self.stopped = threading.Event()
        self.retries = 0

    def run(self) -> None:
        while not self.stopped.wait(self.rng.expovariate(self.rate)):
            key = self.rng.choice(self.keys) if self.rng.random() < 0.8 else None
            name = key or UNKEYED
            seq = self.published.get(name, 0)
            seconds = round(self.rng.uniform(0.02, self.max_task_seconds), 3)
            self.planned[name, seq] = seconds
            while True:
                try:
                    self.publish(key, seq, seconds)
                    break
                except Exception:  # broker down in the middle of a fault: try again
                    self.retries += 1
                    if self.stopped.wait(0.2):
                        return
            self.published[name] = seq + 1


def run_campaign(target: Target, tmp_path: Path, *, vt: float = 3.0, seconds: float | None = None,
                 seed: int | None = None, keys: int = 8, rate: float = 6.0, max_task_seconds: float = 0.4) -> Outcome:
    seed = campaign_seed() if seed is None else seed
    seconds = campaign_seconds() if seconds is None else seconds
    rng = random.Random(seed)
    outcome = Outcome(seed, seconds)
    print(f"{target.name} campaign: seed {seed}, {seconds:.0f} s (SB_CAMPAIGN_SEED={seed} replays it)", flush=True)
    log = tmp_path / "runs.log"
    log.touch()
    frozen: list[tuple[int, float, float]] = []
    with RedisServer(AOF) as server, TcpProxy(server.port) as proxy:
        worker_url = f"redis://127.0.0.1:{proxy.port}/0"
        slots = [Slot(lambda n, i=i: target.start_worker(worker_url, log, i * 1000 + n)) for i in range(target.workers)]
        producer = Producer(target.make_publisher(server.url), [f"k{i}" for i in range(keys)],
                            random.Random(rng.random()), rate, max_task_seconds)
        admin = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            producer.start()
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                time.sleep(rng.uniform(1.0, 4.0))
                fault = rng.choice(target.faults)
                outcome.faults[fault] = outcome.faults.get(fault, 0) + 1
                began = time.time()
                detail = _inject(fault, rng, slots, server, proxy, admin, vt, frozen,
                                 lambda pids: _busy(target.runs(log), producer.planned, pids))
                with open(tmp_path / "faults.jsonl", "a") as faults_log:
                    faults_log.write(json.dumps({"fault": fault, "from": began, "to": time.time(), **detail}) + "\n")
                for slot in slots:
                    slot.ensure()
            producer.stopped.set()
            producer.join(30)
            outcome.published = dict(producer.published)
            for slot in slots:
                slot.signal(signal.SIGCONT)
                slot.ensure()
            with sharded_broker.connect(server.url) as engine:
                def drained() -> bool:
                    for slot in slots:
                        slot.ensure()  # a worker that died on its own is replaced too
                    stats = engine.stats(target.queue)
                    return stats.ready + stats.leased + stats.delayed == 0
                wait_until(drained, 240, f"the {target.name} campaign's queue to drain", step=0.5)
                time.sleep(vt + 1)  # a last lost lease would come back by then
                wait_until(drained, 120, "the queue to drain again", step=0.5)
                dead = [target.decode_dead(d.payload) for d in _all_dead(engine, target.queue)]
        finally:
            producer.stopped.set()
            for slot in slots:
                slot.kill()
            admin.close()
    outcome.report = check(target.runs(log), outcome.published, dead=dead, frozen=frozen,
                           unordered={UNKEYED})
    print(outcome.summary(), flush=True)
    return outcome


def _all_dead(engine: sharded_broker.Broker, queue: str) -> Iterator[sharded_broker.DeadLetter]:
    offset = 0
    while True:
        page = engine.dead_letters(queue, limit=500, offset=offset)
        yield from page
        if len(page) < 500:
            return
        offset += len(page)


def _inject(fault: str, rng: random.Random, slots: list[Slot], server: RedisServer, proxy: TcpProxy,
            admin: redis.Redis, vt: float, frozen: list[tuple[int, float, float]],
            busy: Callable[[list[int]], list[int]]) -> dict[str, Any]:
    """Inject one fault; answers what it hit, for the campaign's fault log."""
    slot = rng.choice(slots)
    pids = process_group(slot.process.pid)
    if fault == "kill_worker":
        slot.kill()
        slot.ensure()
    elif fault == "kill_child":
        # A pool process killed in the middle of a task, as the OOM killer does. Not an
        # idle one: killed while it waits for a job, a prefork child can die holding the
        # pool's queue lock and wedge the whole pool (billiard#104, celery#2011).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            running = busy(process_group(slot.process.pid)[1:])
            if running:
                victim = rng.choice(running)
                os.kill(victim, signal.SIGKILL)
                return {"pids": [victim]}
            time.sleep(0.01)
        return {"pids": [], "skipped": "no pool process in the middle of a task"}
    elif fault == "freeze":
        since = time.time()
        slot.signal(signal.SIGSTOP)
        time.sleep(vt + rng.uniform(1.0, 2.0))
        slot.signal(signal.SIGCONT)
        # A frozen worker's prefetched tasks may still start once it is thawed: they count
        # as frozen runs for as long as it may take it to get through them.
        until = time.time() + FROZEN_GRACE
        frozen.extend((pid, since, until) for pid in pids)
    elif fault == "client_kill":
        _admin_call(lambda: admin.client_kill_filter(_type="normal"))
    elif fault in ("outage_short", "outage_long"):
        length = (rng.uniform(0.3, 0.6) * survivable_outage(vt, vt / 3) if fault == "outage_short"
                  else vt + rng.uniform(1.0, 2.0))
        proxy.refuse(True)
        proxy.drop_connections()
        time.sleep(length)
        proxy.refuse(False)
    elif fault == "redis_restart":
        server.kill()
        time.sleep(rng.uniform(0.3, 2.0))
        server.start()
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return {"pids": pids}


def _busy(runs: list[Run], planned: dict[tuple[str, int], float], pids: list[int]) -> list[int]:
    """Those of ``pids`` running a task with at least 0.1 s of work left."""
    now = time.time()
    return sorted({
        run.pid for run in runs
        if run.end is None and run.pid in pids and run.start + planned.get((run.key, run.seq), 0.0) > now + 0.1
    })


#: Seconds after a SIGCONT during which the thawed worker's runs count as frozen ones.
FROZEN_GRACE = 3.0


def _admin_call(call: Callable[[], Any]) -> None:
    try:
        call()
    except redis.RedisError:
        pass  # the server restarting under the driver: the fault simply did not happen


# -- the three targets ---------------------------------------------------------------------

TESTS = Path(__file__).resolve().parents[1]


def _popen(args: list[str], env: dict[str, str], cwd: Path, output: Path) -> subprocess.Popen:
    with open(output, "ab") as sink:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def engine_target(tmp_path: Path, vt: float = 3.0) -> Target:
    queue = "campaign"

    def start(url: str, log: Path, n: int) -> subprocess.Popen:
        config = {"url": url, "queue": queue, "events": str(tmp_path / "events.jsonl"), "vt": vt, "limit": 1,
                  "options": {"socket_timeout": 2}}
        return _popen([sys.executable, str(TESTS / "support" / "engine_worker.py"), json.dumps(config)],
                      dict(os.environ), TESTS, tmp_path / f"engine-{n}.out")

    def publisher(url: str) -> Callable[[str | None, int, float], None]:
        engine = sharded_broker.connect(url, max_deliveries=None)

        def publish(key: str | None, seq: int, seconds: float) -> None:
            body = json.dumps({"k": key or UNKEYED, "n": seq, "do": "ok", "s": seconds}).encode()
            engine.enqueue(queue, body, key=key, dedup_id=f"{key or UNKEYED}:{seq}")
        return publish

    def runs(_: Path) -> list[Run]:
        events = tmp_path / "events.jsonl"
        found: list[Run] = []
        open_runs: dict[tuple[str, int], Run] = {}
        for line in events.read_text().splitlines() if events.exists() else []:
            event = json.loads(line)
            if event["e"] == "start":
                run = Run(event["k"], event["n"], event["pid"], event["t"])
                found.append(run)
                open_runs[event["id"], event["pid"]] = run
            elif event["e"] == "ack" and (event["id"], event["pid"]) in open_runs:
                open_runs.pop((event["id"], event["pid"])).end = event["done"]
        return found

    def decode(payload: bytes) -> tuple[str, int]:
        body = json.loads(payload)
        return body["k"], body["n"]

    faults = tuple(f for f in ALL_FAULTS if f != "kill_child")  # an engine worker is one process
    return Target("engine", queue, faults, start, publisher, decode, runs=runs, workers=3)


def celery_target(tmp_path: Path, vt: float = 3.0) -> Target:
    from support.celery_worker import APP_DIR, CELERY, app_env

    def start(url: str, log: Path, n: int) -> subprocess.Popen:
        # Prefetch 1: what a frozen worker still runs once thawed stays within FROZEN_GRACE.
        env = app_env(log, f"sharded+{url}", vt=str(vt), max_deliveries="1000", prefetch="1")
        return _popen([CELERY, "-A", "worker_app", "worker", "-n", f"c{n}@%h", "-l", "info", "-P", "prefork",
                       "-c", "2", "--without-heartbeat", "--without-gossip", "--without-mingle"],
                      env, APP_DIR, tmp_path / f"celery-{n}.out")

    def publisher(url: str) -> Callable[[str | None, int, float], None]:
        from celery import Celery

        app = Celery("campaign-producer", broker=f"sharded+{url}", set_as_current=False)
        app.conf.broker_transport_options = {"visibility_timeout": vt, "max_deliveries": 1000}

        def publish(key: str | None, seq: int, seconds: float) -> None:
            if key is None:
                app.send_task("worker_app.free", args=(seq, seconds), retry=False)
            else:
                app.send_task("worker_app.span", args=(key, seq, seconds, "ok"), shard_key=key, retry=False)
        return publish

    def decode(payload: bytes) -> tuple[str, int]:
        import base64

        message = json.loads(payload)
        args = json.loads(base64.b64decode(message["body"]))[0]
        return (UNKEYED, args[0]) if message["headers"]["task"] == "worker_app.free" else (args[0], args[1])

    return Target("celery", "celery", ALL_FAULTS, start, publisher, decode)


def dramatiq_target(tmp_path: Path, vt: float = 3.0) -> Target:
    app_dir = TESTS / "reliability"

    def start(url: str, log: Path, n: int) -> subprocess.Popen:
        env = dict(os.environ, SB_CAMPAIGN_URL=url, SB_CAMPAIGN_VT=str(vt), SB_CAMPAIGN_LOG=str(log),
                   dramatiq_worker_timeout="250")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(app_dir), os.environ.get("PYTHONPATH")]))
        return _popen([sys.executable, "-m", "dramatiq", "campaign_dramatiq_app", "--path", str(app_dir),
                       "--processes", "2", "--threads", "2", "--worker-shutdown-timeout", "5000"],
                      env, app_dir, tmp_path / f"dramatiq-{n}.out")

    def publisher(url: str) -> Callable[[str | None, int, float], None]:
        import dramatiq

        from sharded_broker.integrations.dramatiq import ShardedBroker

        broker = ShardedBroker(url=url, visibility_timeout=vt, max_deliveries=None)

        @dramatiq.actor(broker=broker, shard_key="key", queue_name="campaign", actor_name="span")
        def span(key: str, seq: int, seconds: float) -> None: ...

        @dramatiq.actor(broker=broker, queue_name="campaign", actor_name="free")
        def free(seq: int, seconds: float) -> None: ...

        def publish(key: str | None, seq: int, seconds: float) -> None:
            if key is None:
                free.send(seq, seconds)
            else:
                span.send(key, seq, seconds)
        return publish

    def decode(payload: bytes) -> tuple[str, int]:
        import dramatiq

        message = dramatiq.Message.decode(payload)
        return (UNKEYED, message.args[0]) if message.actor_name == "free" else (message.args[0], message.args[1])

    return Target("dramatiq", "campaign", ALL_FAULTS, start, publisher, decode)
