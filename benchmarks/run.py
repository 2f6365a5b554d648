"""Run the benchmarks side by side and report: ``python -m benchmarks.run [--quick|--full]``.

One throwaway redis-server serves every Redis-based measurement of the run, so their
ratios are comparable. Prints the table, writes the raw figures as JSON and the chart of
throughput vs number of keys to ``benchmarks/results/`` (``--publish`` also copies them to
``docs/``). A section that fails is reported as not measured and the run goes on
(``strict`` makes it raise instead, for the smoke test).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from . import adapters, baseline, cluster_scaling, engine_bench, report, seeds, server_cost
from .common import MODES, ROOT, RedisServer, Results, Sizes, redis_client
from .profiling import summary

RESULTS_DIR = ROOT / "benchmarks" / "results"
DOCS_DIR = ROOT / "docs"


def machine(redis_url: str) -> dict[str, Any]:
    """What the figures were measured on; the load average says how busy it was."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    client = redis_client(redis_url)
    redis_version = client.info("server")["redis_version"]
    client.close()
    versions = {}
    for package in ("redis", "celery", "kombu", "dramatiq", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_server": redis_version,
        "packages": versions,
        "commit": commit,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


class Run:
    """One benchmark run: the sizes, the Redis server and what was measured."""

    def __init__(
        self, sizes: Sizes, redis_url: str, *, strict: bool, log: Callable[[str], None], profile: bool = True
    ) -> None:
        self.sizes = sizes
        self.redis_url = redis_url
        self.strict = strict
        self.profile = profile
        self.log = log
        self.results = Results(sizes.name, machine(redis_url))

    def section(self, name: str, measure: Callable[[], Any]) -> Any:
        """Measure one section; a failure is recorded (or raised when strict)."""
        self.log(f"-- {name}")
        started = time.monotonic()
        try:
            figures = measure()
        except Exception as exc:
            if self.strict:
                raise
            traceback.print_exc()
            self.results.skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            return None
        self.log(f"   {time.monotonic() - started:.1f}s")
        if figures is not None:
            self.results.sections[name] = figures
        return figures

    def engine_sections(self) -> None:
        self.section("commandstats_nesting", lambda: server_cost.nesting_check(self.redis_url))
        with engine_bench.workdir() as workdir:
            backends = engine_bench.available_backends(self.redis_url, workdir, self.results.skipped)
            limit = self.section("raw_redis_limit", lambda: engine_bench.raw_redis_limit(self.redis_url, self.sizes))
            if limit:
                self.section("engine", lambda: engine_bench.engine_vs_limit(backends, limit, self.sizes, self.sizes.adapter_keys))
            if any(name == "sqlite" for name, _ in backends):
                self.section("baseline", lambda: baseline.sqlite_one_per_call(self.sizes, self.sizes.adapter_keys))
            profiles: dict[str, Any] | None = {} if self.profile else None
            rows: dict[str, Any] = {}
            try:
                self.section("scaling", lambda: engine_bench.scaling(backends, self.sizes, self.redis_url, profiles, rows))
            finally:
                if rows:  # the rows measured before a failure are worth keeping
                    self.results.sections["scaling"] = rows
                if profiles:
                    self.results.sections["scaling_profiles"] = profiles

    def adapter_targets(self) -> list[str]:
        usable = []
        for name in adapters.TARGETS:
            missing = adapters.target_missing(name)
            if missing:
                self.results.skipped[f"adapters/{name}"] = missing
            else:
                usable.append(name)
        return usable

    def adapter_sections(self) -> None:
        with adapters.quiet_frameworks():
            self.measure_adapters()

    def measure_adapters(self) -> None:
        targets = self.adapter_targets()
        keys = self.sizes.adapter_keys

        def rates() -> dict[str, Any]:
            figures = {}
            for name in targets:
                for label, key_count in (("unkeyed", None), ("keyed", keys)):
                    self.log(f"   {name} {label}")
                    figures[f"{name}/{label}"] = adapters.enqueue_and_drain(name, self.redis_url, self.sizes, key_count)
            return figures

        measured = self.section("adapters", rates) or {}
        self.section("latency", lambda: {
            name: adapters.latency(name, self.redis_url, self.sizes, keys) for name in targets
        })

        def memory() -> dict[str, Any]:
            figures = engine_bench.engine_memory_per_message(self.redis_url, self.sizes, keys)
            for name in targets:
                label = f"{name} (keyed)" if name in report.PLAIN_OF else name
                figures[label] = adapters.memory_per_message(name, self.redis_url, self.sizes, keys)
            return figures

        self.section("redis_memory", memory)
        if self.profile:
            self.section("profiles", lambda: self.profile_misses(measured) or None)

    def profile_misses(self, measured: dict[str, Any]) -> dict[str, str]:
        """cProfile of each sharded adapter phase that was slower than the plain broker's
        with keys: the worker threads for the drain, the sending thread for the enqueue."""
        profiles = {}
        for sharded, plain in report.PLAIN_OF.items():
            keyed, base = measured.get(f"{sharded}/keyed"), measured.get(f"{plain}/keyed")
            if not keyed or not base:
                continue
            slow_drain = keyed["drain_per_s"] < base["drain_per_s"]
            slow_enqueue = keyed["enqueue_per_s"] < base["enqueue_per_s"]
            if not slow_drain and not slow_enqueue:
                continue
            self.log(f"   profiling {sharded} keyed")
            sender = cProfile.Profile() if slow_enqueue else None
            workers: list[cProfile.Profile] | None = [] if slow_drain else None
            adapters.enqueue_and_drain(
                sharded, self.redis_url, self.sizes, self.sizes.adapter_keys,
                enqueue_profiler=sender, worker_profilers=workers,
            )
            if sender is not None:
                profiles[f"{sharded}/keyed enqueue"] = summary([sender])
            if workers is not None:
                profiles[f"{sharded}/keyed drain"] = summary(workers)
        return profiles

    def seed_sections(self) -> None:
        self.section("seeds", lambda: {
            "sharded-queue": seeds.sharded_queue_vs_memory(self.sizes),
            "sharq": seeds.sharq_vs_redis(self.redis_url, self.sizes),
        })


def run(
    sizes: Sizes,
    *,
    out_dir: Path = RESULTS_DIR,
    with_seeds: bool = True,
    profile_misses: bool = True,
    strict: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> tuple[Results, Path, Path | None]:
    """Measure everything, write the JSON and the chart; (results, JSON path, PNG path)."""
    started = time.monotonic()
    with RedisServer() as server:
        bench = Run(sizes, server.url, strict=strict, log=log, profile=profile_misses)
        bench.engine_sections()
        bench.adapter_sections()
        # Its own servers and clusters, one topology at a time (the shared server idles).
        bench.section("scale_out", lambda: cluster_scaling.scale_out(sizes, log))
        if with_seeds:
            bench.seed_sections()
        else:
            bench.results.skipped["seeds"] = "left out (--skip-seeds)"
    results = bench.results
    results.machine["seconds"] = round(time.monotonic() - started, 1)
    results.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path = out_dir / f"{sizes.name}-latest.json"
    report.write_json(results, json_path)
    png_path = out_dir / f"{sizes.name}-keys.png"
    report.scale_out_chart(results, report.scale_out_chart_path(png_path))
    return results, json_path, png_path if report.chart(results, png_path) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    for name in MODES:
        mode.add_argument(f"--{name}", dest="mode", action="store_const", const=name, help=f"{name} sizes")
    parser.add_argument("--skip-seeds", action="store_true", help="leave out the seed libraries (no virtualenvs)")
    parser.add_argument("--no-profile", action="store_true", help="do not profile missed goals")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON and PNG go")
    parser.add_argument("--from-json", type=Path, metavar="PATH",
                        help="measure nothing: report (and chart, and publish) the figures of an earlier run")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the JSON and chart to docs/ and write the results into docs/benchmarks.md "
                        "(quick and full mode only)")
    args = parser.parse_args(argv)
    if args.from_json:
        results = report.load_json(args.from_json)
        json_path = args.from_json
        png_path: Path | None = args.out / f"{results.mode}-keys.png"
        report.scale_out_chart(results, report.scale_out_chart_path(png_path))
        if not report.chart(results, png_path):
            png_path = None
    else:
        results, json_path, png_path = run(
            MODES[args.mode or "quick"], out_dir=args.out, with_seeds=not args.skip_seeds,
            profile_misses=not args.no_profile,
        )
    m = results.machine
    print(f"## sharded-broker benchmarks, {results.mode} mode ({m['seconds']}s)\n")
    print(f"Machine: {m['nproc']} x {m['cpu']}, Python {m['python']}, Redis {m['redis_server']}, "
          f"commit {m['commit']}, load average {m['load_average_at_start']} -> {m['load_average_at_end']}. "
          "Shared machine: quote ratios from one run, not absolute rates.\n")
    print(report.table(results))
    for title, text in report.profiles_of_misses(results):
        print(f"\n### Profile: {title}\n\n```\n{text}\n```")
    print(f"\nraw figures: {json_path}" + (f"\nchart: {png_path}" if png_path else ""))
    if args.publish:
        if results.mode not in report.PUBLISHED:
            parser.error(f"--publish is for quick and full runs, not {results.mode}")
        written = report.publish(results, json_path, png_path, DOCS_DIR)
        print("published: " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
