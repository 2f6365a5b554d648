"""The SQLite and memory backends' figures of goal 5 (issue 11), for one source tree or two
side by side.

What it measures, with the engine benchmark's own code (``engine_bench``):

- one message per call (``enqueue``, then ``lease()`` + ``ack``: what a worker does) over
  1,000 keys, best of three rounds;
- the scaling rows (a backlog enqueued first, then a timed sample of enqueues and of
  lease+acks on top of it) for a small and a large backlog, so that each large-backlog
  rate can be quoted as a fraction of the small-backlog rate of the same keys.

``--against DIR`` also measures the source tree in DIR (for example a ``git archive`` of
main) in the same run, alternating the two trees section by section so that both see
the same machine load, and prints their ratios::

    git archive main | tar -x -C /tmp/main-tree
    .venv/bin/python -m benchmarks.embedded --against /tmp/main-tree

Each measurement runs in a child process importing the chosen tree, so no state (the
memory backend's stores, SQLite's caches) is shared between trees or sections.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("sqlite", "memory")


def measure(section: str, backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """One section for one backend, in this process (whatever tree it imported)."""
    from benchmarks import engine_bench
    from benchmarks.common import QUICK

    with engine_bench.workdir() as workdir:
        [(_, fresh_url)] = [b for b in engine_bench.backend_urls(None, workdir) if b[0] == backend]
        if section == "one_per_call":
            return engine_bench.engine_one_per_call(fresh_url(), options["messages"], options["keys"], 3)
        sizes = replace(
            QUICK,
            scaling_backlogs=(options["backlog"],),
            scaling_keys=(options["keys"],),
            scaling_sample=options["sample"],
        )
        [row] = engine_bench.scaling([(backend, fresh_url)], sizes).values()
        return row


def in_child(tree: str, section: str, backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """``measure`` in a fresh interpreter that imports ``sharded_broker`` from ``tree``."""
    program = (
        "import sys, json\n"
        # An editable install's finder would import this checkout whatever sys.path says.
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
        f"sys.path.insert(0, {tree!r})\n"
        "import sharded_broker, runpy\n"
        f"assert sharded_broker.__file__.startswith({tree!r}), sharded_broker.__file__\n"
        # This file, whichever tree's benchmarks package the child imports.
        f"measure = runpy.run_path({os.path.abspath(__file__)!r})['measure']\n"
        f"print(json.dumps(measure({section!r}, {backend!r}, {options!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{section}/{backend} in {tree} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", metavar="DIR", help="also measure the source tree in DIR, side by side")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: sqlite, memory")
    parser.add_argument("--single", type=int, default=3000, help="messages of the one-per-call cycle")
    parser.add_argument("--keys", default="1000,100000", help="key counts of the backlog rows")
    parser.add_argument("--small", type=int, default=100_000, help="the small backlog")
    parser.add_argument("--large", type=int, default=1_000_000, help="the large backlog (0: skip)")
    parser.add_argument("--sample", type=int, default=5000, help="messages timed on top of each backlog")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args(argv)
    trees = {"this": HERE}
    if args.against:
        trees["against"] = os.path.abspath(args.against)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for backend in backends:
        jobs.append(("one_per_call", backend, {"messages": args.single, "keys": 1000}))
        for keys in (int(k) for k in args.keys.split(",") if k):
            for backlog in (args.small, args.large):
                if backlog:
                    jobs.append(("scaling", backend, {"backlog": backlog, "keys": keys, "sample": args.sample}))
    figures: dict[str, dict[str, Any]] = {}
    for section, backend, options in jobs:
        name = f"{backend}/{section}/" + ",".join(f"{k}={v}" for k, v in options.items())
        figures[name] = {}
        for label, tree in trees.items():  # alternate the trees, one section at a time
            figures[name][label] = result = in_child(tree, section, backend, options)
            rates = {k: v for k, v in result.items() if k.endswith("_per_s")}
            print(f"{name:<55} {label:<8} {rates}", flush=True)
        if "against" in trees:
            ratios = {k: round(figures[name]["this"][k] / v, 2) for k, v in figures[name]["against"].items()
                      if k.endswith("_per_s") and v}
            print(f"{name:<55} {'ratio':<8} {ratios}", flush=True)
    print()
    for backend in backends:
        for keys in (int(k) for k in args.keys.split(",") if k):
            if not args.large:
                continue
            small = f"{backend}/scaling/backlog={args.small},keys={keys},sample={args.sample}"
            large = f"{backend}/scaling/backlog={args.large},keys={keys},sample={args.sample}"
            for label in trees:
                flat = {k: round(figures[large][label][k] / figures[small][label][k], 2)
                        for k in ("enqueue_per_s", "drain_per_s")}
                print(f"{backend} keys={keys} {label}: rate at {args.large:,} / rate at {args.small:,} = {flat}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
