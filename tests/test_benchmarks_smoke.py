"""The benchmark suite's code paths at tiny sizes, so it cannot rot.

No timing is asserted: benchmarks measure, tests check that the measuring works. The
seed libraries (their own virtualenvs, a network install) are left out here; their twin
workloads on this project's backends are exercised directly.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

# benchmarks/ is a top-level folder of the checkout, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report, run, seeds  # noqa: E402
from benchmarks.common import TINY, Results  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Results, object, object]:
    out_dir = tmp_path_factory.mktemp("bench")
    return run.run(TINY, out_dir=out_dir, with_seeds=False, strict=True, log=lambda line: None)


def test_every_section_is_measured_with_positive_rates(tiny_run) -> None:
    results, _, _ = tiny_run
    sections = results.sections
    limit = sections["raw_redis_limit"]
    assert limit["messages"] == TINY.raw_pairs
    for backend in ("memory", "sqlite", "redis"):
        for label in ("unkeyed", "keyed"):
            row = sections["engine"][f"{backend}/{label}"]
            assert row["messages"] == TINY.engine_messages
            assert row["enqueue_per_s"] > 0 and row["drain_per_s"] > 0
            assert row["round_trip_fraction_of_limit"] == pytest.approx(
                row["round_trip_per_s"] / limit["round_trip_per_s"], rel=1e-3
            )
    expected_scaling = {
        f"{b}/backlog={n}/keys={k}"
        for b in ("memory", "sqlite", "redis")
        for n in TINY.scaling_backlogs
        for k in TINY.scaling_keys
    }
    assert set(sections["scaling"]) == expected_scaling
    for target in ("dramatiq/RedisBroker", "dramatiq/ShardedBroker", "celery/redis", "celery/sharded+redis"):
        for label in ("unkeyed", "keyed"):
            row = sections["adapters"][f"{target}/{label}"]
            assert row["tasks"] == TINY.adapter_tasks and row["drain_per_s"] > 0
        latency = sections["latency"][target]
        assert 0 <= latency["p50_ms"] <= latency["p99_ms"]
    memory = sections["redis_memory"]
    assert memory["sharded-broker engine/keyed"] > len(b"x" * 100)  # at least the payload
    assert memory["dramatiq/RedisBroker"] > 0 and memory["celery/redis"] > 0
    assert results.skipped == {"seeds": "left out (--skip-seeds)"}


def test_json_holds_the_raw_figures_and_round_trips(tiny_run) -> None:
    results, json_path, _ = tiny_run
    raw = json.loads(json_path.read_text())
    assert raw["mode"] == "tiny"
    assert raw["machine"]["nproc"] >= 1 and raw["machine"]["redis_server"]
    assert raw["sections"] == json.loads(json.dumps(results.sections))
    assert report.load_json(json_path).sections == raw["sections"]


def test_chart_is_a_png(tiny_run) -> None:
    _, _, png_path = tiny_run
    assert png_path is not None
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_names_every_section_and_goal(tiny_run) -> None:
    results, _, _ = tiny_run
    text = report.table(results)
    for heading in ("Adapters vs plain brokers", "Engine vs the raw Redis limit", "Scaling", "Redis memory",
                    "Latency", "Goals"):
        assert heading in text
    assert "dramatiq/ShardedBroker vs dramatiq/RedisBroker" in text
    assert "celery/sharded+redis vs celery/redis" in text
    assert "seeds: left out" in text


def test_publish_copies_the_files_and_replaces_only_its_block(tiny_run, tmp_path: Path) -> None:
    results, json_path, png_path = tiny_run
    results = report.load_json(json_path)
    results.mode = "quick"  # publishing is for quick and full runs
    start, end = report.markers("quick")
    full_start, full_end = report.markers("full")
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# prose\n{start}\nold figures\n{end}\nmore prose\n{full_start}\nkept\n{full_end}\n")
    written = report.publish(results, json_path, png_path, tmp_path)
    assert sorted(p.name for p in written) == ["benchmarks-keys.png", "benchmarks-latest.json", "benchmarks.md"]
    text = page.read_text()
    assert "old figures" not in text and "Engine vs the raw Redis limit" in text
    assert text.startswith("# prose\n") and "more prose" in text and "kept" in text
    assert "![engine throughput vs number of shard keys](benchmarks-keys.png)" in text
    assert json.loads((tmp_path / "benchmarks-latest.json").read_text())["mode"] == "tiny"


def test_goal_verdicts_follow_the_figures() -> None:
    def row(keys: int, per_key: int, drain: float) -> dict:
        return {"backend": "redis", "backlog": 100, "keys": keys, "per_key": per_key,
                "enqueue_per_s": 100.0, "drain_per_s": drain}

    results = Results("tiny", {}, {"scaling": {
        "redis/backlog=100/keys=10": row(10, 50, 1000.0),  # batched per key: not comparable
        "redis/backlog=100/keys=1000": row(1000, 1, 100.0),
        "redis/backlog=100/keys=100000": row(100000, 1, 50.0),
    }, "adapters": {
        "dramatiq/RedisBroker/keyed": {"drain_per_s": 100.0},
        "dramatiq/ShardedBroker/keyed": {"drain_per_s": 50.0},
        "celery/redis/keyed": {"drain_per_s": 100.0},
        "celery/sharded+redis/keyed": {"drain_per_s": 150.0},
    }})
    verdicts = report.goals(results)
    assert any("dramatiq" in v and "0.50x (MISSED)" in v for v in verdicts)
    assert any("celery" in v and "1.50x (met)" in v for v in verdicts)
    assert any("redis enqueue: slowest/fastest = 1.00" in v and "(flat" in v for v in verdicts)
    assert any("redis lease+ack: slowest/fastest = 0.50" in v and "NOT FLAT" in v for v in verdicts)


def test_seed_twin_workloads(redis_url: str) -> None:
    """The halves of the seed comparisons that run on this project's backends."""
    memory = seeds.memory_twin_of_sharded_queue(requests=300, threads=3)
    assert memory["requests"] == 300 and memory["handle_per_s"] > 0
    sharq_twin = seeds.redis_twin_of_sharq(redis_url, jobs=50, keys=5)
    assert sharq_twin["jobs"] == 50 and sharq_twin["dequeue_finish_per_s"] > 0


def test_profiling_missed_goals_covers_the_worker_and_sending_threads(redis_url: str) -> None:
    bench = run.Run(TINY, redis_url, strict=True, log=lambda line: None)
    measured = {
        "dramatiq/RedisBroker/keyed": {"drain_per_s": 2.0, "enqueue_per_s": 2.0},
        "dramatiq/ShardedBroker/keyed": {"drain_per_s": 1.0, "enqueue_per_s": 1.0},
    }
    profiles = bench.profile_misses(measured)
    assert sorted(profiles) == ["dramatiq/ShardedBroker/keyed drain", "dramatiq/ShardedBroker/keyed enqueue"]
    drain = profiles["dramatiq/ShardedBroker/keyed drain"]
    work = re.match(r"([\d.]+)s of work over (\d+) thread", drain)
    assert work and float(work.group(1)) > 0
    assert int(work.group(2)) > TINY.worker_threads  # Dramatiq's worker threads and its consumer
    assert "send_with_options" in profiles["dramatiq/ShardedBroker/keyed enqueue"]
