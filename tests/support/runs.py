"""The checker of the fault tests and the fault campaign: what ran, per key, from log lines.

Tasks write one line when they start and one when they end (``start``/``end``, key, seq,
pid, time.time()), each with a single O_APPEND write, so the lines of every process are
in the order they happened. A run is a start line and the end line of the same
(key, seq, pid) after it; a run without an end died with its process.

For each key, with messages numbered 0..n-1 in publish order:

* **overlap**: two runs of the key were going on at once (one started before the other
  ended); a run that never ended cannot be checked, and runs of a process that was
  frozen (SIGSTOP) are counted apart, as ``frozen_overlaps``: a frozen worker's task goes
  on after its lease moved on, and nothing can stop that;
* **order violation**: a run of seq n started while a lower seq m < n had not yet ended
  (and was not dead-lettered), or after a run of a higher seq began;
* **lost**: a message that never ended and was not dead-lettered;
* **duplicate**: a message that ended more than once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


@dataclass
class Run:
    key: str
    seq: int
    pid: int
    start: float
    end: float | None = None


@dataclass
class Report:
    """What the checker found; ``clean`` when nothing is wrong."""

    runs: int = 0
    completed: int = 0
    overlaps: list[str] = field(default_factory=list)
    frozen_overlaps: list[str] = field(default_factory=list)
    order_violations: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.overlaps or self.order_violations or self.lost)

    def counts(self) -> dict[str, int]:
        return {
            "runs": self.runs, "completed": self.completed, "overlaps": len(self.overlaps),
            "frozen_overlaps": len(self.frozen_overlaps), "order_violations": len(self.order_violations),
            "lost": len(self.lost), "duplicates": len(self.duplicates), "dead_lettered": len(self.dead),
        }

    def summary(self, limit: int = 10) -> str:
        lines = [", ".join(f"{name} {count}" for name, count in self.counts().items())]
        for name in ("overlaps", "order_violations", "lost", "duplicates", "frozen_overlaps"):
            found = getattr(self, name)
            if found:
                lines.append(f"{name}: {found[:limit]}{' ...' if len(found) > limit else ''}")
        return "\n".join(lines)


def read_runs(log: Path) -> list[Run]:
    """Runs in the order they started, from a log of start/end lines (other lines ignored)."""
    runs: list[Run] = []
    open_runs: dict[tuple[str, int, int], Run] = {}
    if not log.exists():
        return runs
    for line in log.read_text().splitlines():
        fields = line.split()
        if len(fields) != 5 or fields[0] not in ("start", "end"):
            continue
        kind, key, seq, pid, when = fields[0], fields[1], int(fields[2]), int(fields[3]), float(fields[4])
        if kind == "start":
            run = Run(key, seq, pid, when)
            runs.append(run)
            open_runs[key, seq, pid] = run
        else:
            run = open_runs.pop((key, seq, pid), None)
            if run is not None:
                run.end = when
    return runs


def check(
    runs: Iterable[Run],
    published: dict[str, int],
    dead: Iterable[tuple[str, int]] = (),
    frozen: Iterable[tuple[int, float, float]] = (),
    unordered: Iterable[str] = (),
) -> Report:
    """Check runs against ``published`` (key -> how many messages, numbered 0..n-1),
    ``dead`` (the (key, seq) dead-lettered) and ``frozen`` ((pid, from, to) times a
    process was stopped). The ``unordered`` keys (the unkeyed lane) are checked only for
    lost and duplicate runs."""
    dead_set = set(dead)
    frozen = list(frozen)
    unordered = set(unordered)
    report = Report(dead=sorted(f"{k}#{s}" for k, s in dead_set))
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_key[run.key].append(run)
        report.runs += 1
        report.completed += run.end is not None

    def was_frozen(run: Run) -> bool:
        end = run.end if run.end is not None else float("inf")
        return any(pid == run.pid and start < end and stop > run.start for pid, start, stop in frozen)

    for key, count in published.items():
        key_runs = sorted(by_key.get(key, []), key=lambda r: r.start)
        ends: dict[int, list[float]] = defaultdict(list)
        for run in key_runs:
            if run.end is not None:
                ends[run.seq].append(run.end)
        for seq in range(count):
            if not ends.get(seq) and (key, seq) not in dead_set:
                report.lost.append(f"{key}#{seq}")
            if len(ends.get(seq, [])) > 1:
                report.duplicates.append(f"{key}#{seq} x{len(ends[seq])}")
        if key in unordered:
            continue
        complete = [run for run in key_runs if run.end is not None]
        for i, first in enumerate(complete):
            for second in complete[i + 1:]:
                if second.start >= first.end:
                    continue
                where = f"{key}: #{first.seq} (pid {first.pid}) and #{second.seq} (pid {second.pid})"
                (report.frozen_overlaps if was_frozen(first) or was_frozen(second) else report.overlaps).append(where)
        highest = -1
        for run in key_runs:
            if run.seq < highest and not was_frozen(run):
                report.order_violations.append(f"{key}: #{run.seq} started after #{highest}")
            for earlier in range(run.seq):
                first_end = min(ends.get(earlier, [float("inf")]))
                if first_end > run.start and (key, earlier) not in dead_set and not was_frozen(run):
                    report.order_violations.append(f"{key}: #{run.seq} started before #{earlier} ended")
                    break
            highest = max(highest, run.seq)
    return report
