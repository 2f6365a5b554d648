"""cProfile across threads, for the worker threads that do a drain.

``cProfile.Profile.enable()`` covers only the calling thread, and the work of an
in-process Dramatiq or Celery worker happens in threads it starts. Inside
:func:`profile_new_threads`, every thread that starts gets its own profiler (installed
by ``threading.setprofile`` on its first call); their figures are merged once the
threads have ended.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def profile_new_threads() -> Iterator[list[cProfile.Profile]]:
    """Profile every thread started inside the block (not the calling thread)."""
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_profiler(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        profiler = cProfile.Profile()
        with lock:
            profilers.append(profiler)
        profiler.enable()

    threading.setprofile(start_profiler)
    try:
        yield profilers
    finally:
        threading.setprofile(None)


# Where idle threads park (waiting for work or for a lock): their time is not work.
IDLE_WAITS = (
    "<method 'get' of '_queue.SimpleQueue' objects>",
    "<method 'acquire' of '_thread.lock' objects>",
    "<method 'acquire' of '_thread.RLock' objects>",
    "<built-in method time.sleep>",
    "<method 'poll' of 'select.epoll' objects>",
    "<built-in method select.select>",
)


def summary(profilers: list[cProfile.Profile], top: int = 20) -> str:
    """The ``top`` functions by own time, then by cumulative time, merged over every
    profiled thread, without the time idle threads spent parked (stated on the first
    line instead)."""
    if not profilers:
        return "(no thread was profiled)"
    stats = pstats.Stats(profilers[0], stream=io.StringIO())
    for profiler in profilers[1:]:
        stats.add(profiler)
    stats.strip_dirs()
    rows = []
    idle = total = 0.0
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        label = name if filename == "~" else f"{filename}:{line}({name})"
        total += own
        if label in IDLE_WAITS:
            idle += own
            continue
        rows.append((own, calls, cumulative, label))
    lines = [
        f"{total - idle:.3f}s of work over {len(profilers)} thread(s) ({idle:.3f}s idle in waits left out)",
        f"{'own s':>9} {'calls':>9} {'cumul. s':>9}  function (by own time)",
    ]
    rows.sort(reverse=True)
    lines += [f"{own:9.3f} {calls:9d} {cumulative:9.3f}  {label}" for own, calls, cumulative, label in rows[:top]]
    lines += ["", f"{'own s':>9} {'calls':>9} {'cumul. s':>9}  function (by cumulative time)"]
    rows.sort(key=lambda row: row[2], reverse=True)
    lines += [f"{own:9.3f} {calls:9d} {cumulative:9.3f}  {label}" for own, calls, cumulative, label in rows[:top]]
    return "\n".join(lines)
