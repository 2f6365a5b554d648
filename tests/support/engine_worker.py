"""A raw engine consumer process for the reliability tests, driven by its payloads.

Run as ``python tests/support/engine_worker.py '<json config>'``. It leases from one queue
and, for each message, appends one JSON line per event to the shared events file with a
single unbuffered ``write`` (O_APPEND, so lines of concurrent workers never interleave and
a SIGKILL loses no line already written):

* ``{"e": "start", "id", "k", "n", "a", "pid", "t"}`` when it starts a message (payload
  ``{"k": key, "n": number in the key, "do": what}``, optionally ``"s"``: seconds of
  work, instead of ``work``), then, after the work:
* ``{"e": "ack", "id", "ok", "pid", "done"}`` with the ack's answer (``ok`` false: the
  lease was stale, or an earlier try of this ack took effect but its reply was lost) and
  the time the work ended (``t`` and ``done`` are ``time.time()``), or
  ``{"e": "nack", ...}`` for ``"fail"``.

``do`` is ``"ok"`` (sleep ``work`` seconds, ack), ``"fail"`` (nack for retry: a task that
always fails) or ``"kill"`` (SIGKILL itself mid-task: a task that always kills its
worker). Transport failures (:class:`sharded_broker.BackendUnavailable`) are retried with
exponential backoff, as any consumer loop should; each is logged as an ``"unavailable"``
event. ``rss`` events report the process's resident memory after every ``rss_every``
messages and on exit.

Config keys: ``url``, ``queue``, ``events``, ``vt`` (visibility timeout), ``limit``
(lease batch), ``work`` (seconds per message), ``idle_exit`` (exit after this many
seconds without work; default never), ``stop_file`` (exit at the first lease that finds
nothing once this file exists: the test says the queue is drained), ``clock_skew`` (seconds added to this process's
``time.time``: a host with a wrong clock), ``options`` (connect options), ``rss_every``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def main(config: dict) -> None:
    skew = float(config.get("clock_skew", 0.0))
    if skew:
        real_time = time.time
        time.time = lambda: real_time() + skew  # before the engine is imported and used

    import sharded_broker

    fd = os.open(config["events"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()

    def log(**event) -> None:
        os.write(fd, (json.dumps(event) + "\n").encode())

    def retrying(call):
        backoff = 0.05
        while True:
            try:
                return call()
            except sharded_broker.BackendUnavailable as exc:
                log(e="unavailable", pid=pid, error=str(exc)[:200])
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    broker = sharded_broker.connect(config["url"], **config.get("options", {}))
    queue, vt, work = config["queue"], float(config.get("vt", 2.0)), float(config.get("work", 0.0))
    limit = int(config.get("limit", 1))
    idle_exit = config.get("idle_exit")
    stop_file = config.get("stop_file")
    rss_every = int(config.get("rss_every", 0))
    done = 0
    idle_since = time.monotonic()
    log(e="up", pid=pid, time=time.time())
    while True:
        leases = retrying(lambda: broker.lease(queue, limit, visibility_timeout=vt, wait=0.2))
        if not leases:
            if stop_file is not None and os.path.exists(stop_file):
                break
            if idle_exit is not None and time.monotonic() - idle_since > float(idle_exit):
                break
            continue
        idle_since = time.monotonic()
        for lease in leases:
            body = json.loads(lease.payload)
            log(e="start", id=lease.id, k=body["k"], n=body["n"], a=lease.attempts, pid=pid, t=time.time())
            if body["do"] == "kill":
                os.kill(pid, signal.SIGKILL)
            if body["do"] == "fail":
                ok = retrying(lambda: broker.nack(lease))
                log(e="nack", id=lease.id, ok=ok, pid=pid)
                continue
            seconds = float(body.get("s", work))
            if seconds:
                time.sleep(seconds)
            done_at = time.time()
            ok = retrying(lambda: broker.ack(lease))
            log(e="ack", id=lease.id, ok=ok, pid=pid, done=done_at)
            done += 1
            if rss_every and done % rss_every == 0:
                log(e="rss", pid=pid, kib=rss_kib(), done=done)
    log(e="rss", pid=pid, kib=rss_kib(), done=done)
    log(e="exit", pid=pid)
    broker.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
