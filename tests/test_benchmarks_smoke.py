"""The benchmark suite's code paths at tiny sizes, so it cannot rot.

No timing is asserted: benchmarks measure, tests check that the measuring works. The
seed libraries (their own virtualenvs, a network install) are left out here; their twin
workloads on this project's backends are exercised directly.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

# benchmarks/ is a top-level folder of the checkout, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report, run, seeds, server_cost  # noqa: E402
from benchmarks.common import TINY, RedisServer, Results  # noqa: E402


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
            for phase in ("send", "fetch_ack"):
                cost = row["server"][phase]
                # Every task was sent and fetched through Redis: some commands, some time.
                assert cost["commands_sent"] >= 1 and cost["server_us"] > 0 and cost["cpu_us"] > 0
                # Counting nested commands once can only make the figure smaller.
                assert cost["server_us"] <= cost["naive_sum_us"]
            total = row["server"]["total"]
            assert total["server_us"] == pytest.approx(
                row["server"]["send"]["server_us"] + row["server"]["fetch_ack"]["server_us"], abs=0.02
            )
        latency = sections["latency"][target]
        assert 0 <= latency["p50_ms"] <= latency["p99_ms"]
    engine = sections["engine"]["redis/keyed"]
    assert (engine["batch"], engine["lease_batch"]) == (TINY.batch, TINY.lease_batch)
    nesting = sections["commandstats_nesting"]
    assert nesting["script"]["eval_usec"] >= nesting["script"]["nested_set_usec"] > 0
    assert nesting["function"]["fcall_usec"] >= nesting["function"]["nested_set_usec"] > 0
    assert nesting["transaction"]["exec_usec"] >= nesting["transaction"]["nested_set_usec"] > 0
    baseline = sections["baseline"]
    assert baseline["revision"] == "a56f71b" and baseline["messages"] == TINY.single_messages
    assert baseline["round_trip_per_s"] > 0
    memory = sections["redis_memory"]
    assert memory["sharded-broker engine/keyed"] > len(b"x" * 100)  # at least the payload
    assert memory["dramatiq/RedisBroker"] > 0 and memory["celery/redis"] > 0
    assert results.skipped == {"seeds": "left out (--skip-seeds)"}


def test_scale_out_runs_every_topology_with_each_masters_server_time(tiny_run) -> None:
    results, _, png_path = tiny_run
    scale = results.sections["scale_out"]
    assert set(scale) == {f"{t}/{kind}" for t in ("plain", "cluster-1", "cluster-3") for kind in ("engine", "dramatiq")}
    for topology, masters in (("plain", 1), ("cluster-1", 1), ("cluster-3", 3)):
        engine, drain = scale[f"{topology}/engine"], scale[f"{topology}/dramatiq"]
        assert engine["messages"] == TINY.cluster_messages and engine["processes"] == masters
        assert engine["round_trip_per_s"] > 0 and drain["drain_per_s"] > 0 and drain["tasks"] == TINY.cluster_tasks
        cpu = engine["server_cpu_us_per_message"]
        assert len(cpu["total"]) == masters and sum(cpu["total"]) > 0 and len(drain["server_cpu_us_per_task"]) == masters
        assert engine["capacity_per_s"] == pytest.approx(1e6 / max(cpu["total"]), rel=1e-3)
    assert report.scale_out_chart_path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    goals = report.scale_out_goals(results)
    assert [g.number for g in goals] == [1, 1, 1, 1, 2, 2, 2, 2] and all(g.met is not None for g in goals)
    assert "Scale-out: one queue over Redis Cluster masters" in report.table(results)


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
    for heading in ("Redis server cost per task through the adapters", "Adapters vs plain brokers",
                    "Engine vs the raw Redis limit", "Scaling", "Redis memory", "Latency", "Goals of issue 11"):
        assert heading in text
    assert "Checked on this server: one EVAL of 2,000 SETs" in text
    goals = report.goal_rows(results)
    assert sorted({g.number for g in goals}) == [1, 2, 3, 4, 5]
    for goal in goals:
        assert f"| {goal.what}" in text
    # Everything but the 1,000,000-message backlog (full mode) and the 10 vs 100,000 keys
    # rows (not among the tiny sizes) is measured in a tiny run.
    unmeasured = {g.what for g in goals if g.met is None}
    assert all("1,000,000 backlog" in what or "100,000 keys / 10 keys" in what for what in unmeasured)
    assert len(unmeasured) == 6
    assert "seeds: left out" in text


def test_publish_copies_the_files_and_replaces_only_its_block(tiny_run, tmp_path: Path) -> None:
    results, json_path, png_path = tiny_run
    results = report.load_json(json_path)
    results.mode = "quick"  # publishing is for quick and full runs
    start, end = report.markers("quick")
    full_start, full_end = report.markers("full")
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "benchmarks.md"
    page.write_text(f"# prose\n{start}\nold figures\n{end}\nmore prose\n{full_start}\nkept\n{full_end}\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# project\n{report.README_MARKERS[0]}\nold table\n{report.README_MARKERS[1]}\nthe rest\n")
    written = report.publish(results, json_path, png_path, docs)
    assert sorted(p.name for p in written) == ["README.md", "benchmarks-cluster.png", "benchmarks-keys.png",
                                               "benchmarks-latest.json", "benchmarks.md"]
    text = page.read_text()
    assert "old figures" not in text and "Engine vs the raw Redis limit" in text
    assert text.startswith("# prose\n") and "more prose" in text and "kept" in text
    assert "![engine throughput vs number of shard keys](benchmarks-keys.png)" in text
    assert "![one queue over 1 and 3 Redis Cluster masters](benchmarks-cluster.png)" in text
    assert json.loads((docs / "benchmarks-latest.json").read_text())["mode"] == "tiny"
    # The README's block: this run's adapters against their plain brokers, nothing else touched.
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# project\n") and text.endswith("the rest\n")
    assert "| Dramatiq `ShardedBroker` (redis) | unkeyed |" in text and "| Celery `redis://` | unkeyed |" in text
    assert f"commit {results.machine['commit']}" in text and "Redis bytes per queued message" in text


def _server(send_us: float, fetch_us: float, cpu_us: float = 10.0) -> dict:
    phase = {"server_us": 0.0, "cpu_us": cpu_us / 2, "naive_sum_us": 0.0, "commands_sent": 1.0}
    return {"send": {**phase, "server_us": send_us}, "fetch_ack": {**phase, "server_us": fetch_us},
            "total": {**phase, "server_us": send_us + fetch_us, "cpu_us": cpu_us}}


def test_goal_verdicts_follow_the_figures() -> None:
    def row(keys: int, per_key: int, drain: float, backlog: int = 100) -> dict:
        return {"backend": "redis", "backlog": backlog, "keys": keys, "per_key": per_key,
                "enqueue_per_s": 100.0, "drain_per_s": drain}

    def adapter(enqueue: float, drain: float, server: dict) -> dict:
        return {"enqueue_per_s": enqueue, "drain_per_s": drain, "server": server}

    sqlite_small = {**row(1000, 1, 100.0), "backend": "sqlite"}
    sqlite_big = {**row(1000, 1, 70.0, backlog=1_000_000), "backend": "sqlite"}
    results = Results("tiny", {}, {
        "scaling": {
            "redis/backlog=100/keys=10": row(10, 50, 1000.0),
            "redis/backlog=100/keys=1000": row(1000, 1, 100.0),
            "redis/backlog=100/keys=100000": row(100000, 1, 50.0),
            "sqlite/backlog=100/keys=1000": sqlite_small,
            "sqlite/backlog=1000000/keys=1000": sqlite_big,
        },
        "adapters": {
            "dramatiq/RedisBroker/keyed": adapter(100.0, 100.0, _server(10.0, 30.0)),
            "dramatiq/ShardedBroker/keyed": adapter(100.0, 50.0, _server(20.0, 29.0)),  # 1.225x: met
            "celery/redis/keyed": adapter(100.0, 100.0, _server(10.0, 30.0)),
            "celery/sharded+redis/keyed": adapter(90.0, 150.0, _server(20.0, 29.0)),  # 1.225x: missed
        },
        "engine": {
            "redis/keyed": {"keys": 1000, "batch": 500, "lease_batch": 100, "round_trip_per_s": 60_000.0},
            "redis/keyed, one per call": {"round_trip_fraction_of_limit": 0.4},
            "sqlite/keyed, one per call": {"round_trip_per_s": 300.0},
        },
        "baseline": {"revision": "a56f71b", "round_trip_per_s": 100.0},
        "redis_memory": {"dramatiq/RedisBroker": 456.0, "dramatiq/ShardedBroker (keyed)": 400.0,
                         "celery/redis": 1000.0, "celery/sharded+redis (keyed)": 1018.0},
    })
    verdicts = {g.what: g for g in report.goal_rows(results)}

    def verdict(what: str) -> str:
        return verdicts[what].verdict

    assert verdict("server time keyed, dramatiq/ShardedBroker / dramatiq/RedisBroker") == "met"
    assert verdicts["server time keyed, dramatiq/ShardedBroker / dramatiq/RedisBroker"].measured.startswith("1.23x")
    assert verdict("server time keyed, celery/sharded+redis / celery/redis") == "MISSED"
    assert verdict("server time unkeyed, celery/sharded+redis / celery/redis") == "not measured"
    assert verdict("drain keyed, dramatiq/ShardedBroker / dramatiq/RedisBroker") == "MISSED"
    assert verdict("enqueue keyed, dramatiq/ShardedBroker / dramatiq/RedisBroker") == "met"
    assert verdict("drain keyed, celery/sharded+redis / celery/redis") == "met"
    assert verdict("enqueue keyed, celery/sharded+redis / celery/redis") == "MISSED"
    assert verdict("engine full cycle, redis, 1,000 keys (enqueue_many 500, lease 100, ack_many)") == "met"
    assert verdict("engine one per call, redis / raw unpipelined LPUSH+RPOP") == "MISSED"
    assert verdict("engine enqueue, redis, 100,000 keys / 10 keys") == "met"
    assert verdict("engine lease+ack, redis, 100,000 keys / 10 keys") == "MISSED"  # 50 vs 1,000
    assert verdict("Redis bytes per keyed message, dramatiq/ShardedBroker / dramatiq/RedisBroker") == "met"
    assert verdict("Redis bytes per keyed message, celery/sharded+redis / celery/redis") == "MISSED"
    assert verdict("sqlite one per call full cycle / a56f71b's") == "met"  # 3x
    assert verdict("sqlite lease+ack at a 1,000,000 backlog / smallest backlog") == "MISSED"  # 0.7x
    assert verdict("sqlite enqueue at a 1,000,000 backlog / smallest backlog") == "met"
    assert verdict("memory enqueue at a 1,000,000 backlog / smallest backlog") == "not measured"
    flatness = report.goals(results)[len(verdicts):]
    assert any("redis enqueue: slowest/fastest = 1.00" in v and "(flat" in v for v in flatness)
    assert any("redis lease+ack: slowest/fastest = 0.50" in v and "NOT FLAT" in v for v in flatness)


def test_server_time_counts_each_command_once() -> None:
    """Against a real server: nested commands (in a script, in EXEC) are not counted
    again; top-level ones are; the meter's own commands are left out."""
    import redis

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        with server_cost.ServerMeter(server.url) as meter:
            client.eval("for i = 1, 100 do redis.call('SET', KEYS[1], i) end return 1", 1, "k")
            pipe = client.pipeline(transaction=True)
            for _ in range(10):
                pipe.lpush("queued", b"x")
            pipe.execute()
            for _ in range(5):
                client.get("k")
        client.close()
    stats = meter.stats
    assert stats["set"]["calls"] == 100 and stats["lpush"]["calls"] == 10 and stats["get"]["calls"] == 5
    counted = {name: entry["usec"] for name, entry in stats.items()
               if name not in ("set", "lpush", "config|resetstat", "info")}
    assert {"eval", "exec", "multi", "get"} <= set(counted)
    assert meter.usec == pytest.approx(sum(counted.values()))
    assert meter.naive_usec == pytest.approx(meter.usec + stats["set"]["usec"] + stats["lpush"]["usec"])
    assert meter.shared == [] and meter.cpu_seconds > 0


def test_top_level_share_of_a_command_that_ran_both_ways() -> None:
    stats = {
        "evalsha": {"calls": 2, "usec": 100},
        "hset": {"calls": 4, "usec": 40},  # 1 sent by a client, 3 inside the scripts
        "zadd": {"calls": 6, "usec": 60},  # inside the scripts only
        "config|resetstat": {"calls": 1, "usec": 500},
    }
    counted, shared = server_cost.top_level_commands(stats, Counter({"evalsha": 2, "hset": 1}))
    assert counted == {"evalsha": (2, 100.0), "hset": (1, 10.0)} and shared == ["hset"]


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
