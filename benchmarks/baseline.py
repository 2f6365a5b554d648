"""The engine of an earlier commit, measured in the same run as today's (issue 11, goal 5).

"SQLite one per call at least twice today's" compares two versions of ``sharded_broker``
on one machine at one time. The earlier one is checked out of git (``git archive``) into
a temporary directory and measured in a child process that imports it ahead of the
installed one, with this checkout's benchmark code (the engine API it uses, ``connect``,
``enqueue``, ``lease``, ``ack``, is the same in both)::

    python -m benchmarks.baseline TREE URL COUNT KEYS REPEATS   # the child; prints JSON
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from typing import Any

from .common import ROOT, Sizes

# main when issue 11's work started: the engine the issue measured.
BASELINE_REVISION = "a56f71b"


def sqlite_one_per_call(sizes: Sizes, keys: int, revision: str = BASELINE_REVISION) -> dict[str, Any]:
    """``engine_one_per_call`` on ``sqlite://`` with the engine of ``revision``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "sharded_broker"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {revision} failed: {archive.stderr.decode(errors='replace').strip()}")
    with tempfile.TemporaryDirectory(prefix="sharded-broker-baseline-") as tree:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tree, filter="data")
        url = f"sqlite:///{os.path.join(tree, 'baseline.db')}"
        # Run from the tree, so the baseline comes first on sys.path, then this checkout.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, str(ROOT)])}
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.baseline", tree, url, str(sizes.single_messages), str(keys),
             str(sizes.repeats)],
            capture_output=True, text=True, env=env, cwd=tree, timeout=600, check=False,
        )
    if child.returncode != 0:
        raise RuntimeError(f"baseline {revision} measurement failed:\n{child.stderr[-2000:]}")
    figures = json.loads(child.stdout)
    figures["revision"] = revision
    return figures


def main(argv: list[str]) -> None:
    tree, url, count, keys, repeats = argv
    import sharded_broker

    if not os.path.abspath(sharded_broker.__file__).startswith(os.path.abspath(tree)):
        raise SystemExit(f"imported {sharded_broker.__file__}, not the baseline in {tree}")
    from .engine_bench import engine_one_per_call

    print(json.dumps(engine_one_per_call(url, int(count), int(keys), int(repeats))))


if __name__ == "__main__":
    main(sys.argv[1:])
