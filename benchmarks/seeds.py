"""The seed libraries' own workloads against this project doing the same work.

sharded-queue and SharQ pin redis-py versions that conflict with each other and with this
project, so each gets its own virtualenv under ``benchmarks/.venvs/`` (created on first
run with ``python -m venv`` and pip) and runs its workload as a subprocess that prints
JSON (``benchmarks/seed_workloads/``). The twin workloads run here, in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import sharded_broker
from sharded_broker import Message

from .common import PAYLOAD, ROOT, Sizes, flush

VENVS = ROOT / "benchmarks" / ".venvs"
WORKLOADS = ROOT / "benchmarks" / "seed_workloads"
# sharded-queue 0.2.10's wheel declares no dependencies; these are what it imports.
REQUIREMENTS = {
    "sharded-queue": ("sharded-queue==0.2.10", "pydantic-settings>=2", "python-dateutil", "redis"),
    "sharq": ("sharq==1.3.0",),
}
BATCH = 512  # sharded-queue's benchmark batch size


def seed_python(name: str) -> Path:
    """The interpreter of the seed's virtualenv, creating and filling it on first use."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    requirement = REQUIREMENTS[name]
    if stamp.exists() and stamp.read_text() == " ".join(requirement) and python.exists():
        return python
    print(f"creating {venv} ({' '.join(requirement)}), once", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirement],
        check=True,
    )
    stamp.write_text(" ".join(requirement))
    return python


def run_workload(name: str, script: str, *args: object) -> dict[str, Any]:
    python = seed_python(name)
    done = subprocess.run(
        [str(python), str(WORKLOADS / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} workload failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_twin_of_sharded_queue(requests: int, threads: int) -> dict[str, Any]:
    """Register ``requests`` messages keyed over ``threads`` keys in one call, then lease
    and ack them in ordered per-key batches of 512, as sharded-queue's worker handles a
    tube's requests."""
    messages = [Message(PAYLOAD, key=f"thread-{n % threads}") for n in range(requests)]
    with sharded_broker.connect(f"memory://seed-twin-{time.monotonic_ns()}") as broker:
        start = time.perf_counter()
        broker.enqueue_many("bench", messages)
        registered = time.perf_counter()
        handled = 0
        while handled < requests:
            leases = broker.lease("bench", limit=BATCH, per_key=BATCH)
            if not leases:
                raise RuntimeError(f"memory twin stalled after {handled} of {requests}")
            broker.ack_many(leases)
            handled += len(leases)
        done = time.perf_counter()
    return {
        "requests": requests,
        "threads": threads,
        "batch": BATCH,
        "register_per_s": round(requests / (registered - start), 1),
        "handle_per_s": round(requests / (done - registered), 1),
    }


def redis_twin_of_sharq(redis_url: str, jobs: int, keys: int) -> dict[str, Any]:
    """SharQ's loop on the Redis backend: enqueue one by one, then lease one and ack it
    until the queue is empty."""
    flush(redis_url)
    with sharded_broker.connect(redis_url) as broker:
        start = time.perf_counter()
        for i in range(jobs):
            broker.enqueue("bench", PAYLOAD, key=f"key-{i % keys}")
        enqueued = time.perf_counter()
        finished = 0
        while True:
            leases = broker.lease("bench")
            if not leases:
                break
            broker.ack(leases[0])
            finished += 1
        drained = time.perf_counter()
    if finished != jobs:
        raise RuntimeError(f"redis twin finished {finished} of {jobs} jobs")
    return {
        "jobs": jobs,
        "keys": keys,
        "enqueue_per_s": round(jobs / (enqueued - start), 1),
        "dequeue_finish_per_s": round(jobs / (drained - enqueued), 1),
    }


def best_rates(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's figures with every ``*_per_s`` rate replaced by the best of all runs
    (the least disturbed by other processes)."""
    best = dict(runs[0])
    for name in best:
        if name.endswith("_per_s"):
            best[name] = max(run[name] for run in runs)
    return best


def sharded_queue_vs_memory(sizes: Sizes) -> dict[str, Any]:
    """Seed and twin alternately, ``repeats`` times each; the best rates of each."""
    seed_runs, twin_runs = [], []
    for _ in range(sizes.repeats):
        seed_runs.append(run_workload("sharded-queue", "sharded_queue_workload.py", sizes.seed_requests, sizes.seed_threads))
        twin_runs.append(memory_twin_of_sharded_queue(sizes.seed_requests, sizes.seed_threads))
    seed, twin = best_rates(seed_runs), best_rates(twin_runs)
    return {
        "sharded-queue 0.2.10 (RuntimeStorage)": seed,
        "sharded-broker memory://": twin,
        "register_ratio": round(twin["register_per_s"] / seed["register_per_s"], 3),
        "handle_ratio": round(twin["handle_per_s"] / seed["handle_per_s"], 3),
    }


def sharq_vs_redis(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """Seed and twin alternately on the same server, ``repeats`` times each; the best
    rates of each."""
    address = urlsplit(redis_url)
    seed_runs, twin_runs = [], []
    for _ in range(sizes.repeats):
        flush(redis_url)
        seed_runs.append(
            run_workload("sharq", "sharq_workload.py", address.hostname, address.port, sizes.sharq_jobs, sizes.sharq_keys)
        )
        twin_runs.append(redis_twin_of_sharq(redis_url, sizes.sharq_jobs, sizes.sharq_keys))
    seed, twin = best_rates(seed_runs), best_rates(twin_runs)
    return {
        "SharQ 1.3.0": seed,
        "sharded-broker redis://": twin,
        "enqueue_ratio": round(twin["enqueue_per_s"] / seed["enqueue_per_s"], 3),
        "dequeue_finish_ratio": round(twin["dequeue_finish_per_s"] / seed["dequeue_finish_per_s"], 3),
    }
