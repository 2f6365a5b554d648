"""The Celery app the subprocess tests run with ``celery -A worker_app worker``.

It never imports sharded_broker: the ``sharded+`` alias must come from the installed
``.pth`` hook. Configured by environment variables:

``SB_BROKER_URL``   the broker URL (sharded+redis://..., sharded+sqlite:///...)
``SB_BROKER_FORM``  how the app gets it: ``conf`` (default: the string in ``app.conf``),
                    ``list`` (a kombu failover list) or ``none`` (not at all: the URL comes
                    from ``celery -b`` or ``CELERY_BROKER_URL``)
``SB_MAX_DELIVERIES`` the transport's ``max_deliveries`` (default: the engine's)
``SB_PREFETCH``     ``worker_prefetch_multiplier`` (default: Celery's, 4)
``SB_WORKER_LOST_WAIT`` Celery's ``worker_lost_wait``: how long it waits before failing
                    the job of a dead pool process (default 10 s)
``SB_LOG``          a file each finished task appends one line to: ``<task> <key> <seq> <pid>``
``SB_VT``           visibility timeout in seconds (default 30)
``SB_TASK_SECONDS`` how long ``record`` sleeps (default 0)
``SB_MARKS``        a directory where ``span`` notes the crashes it already did

``span(key, seq, seconds, action)`` logs ``start`` and ``end`` lines with times, for the
overlap checks: ``<start|end> <key> <seq> <pid> <time.time()>``. ``action`` is ``ok``,
``crash_once`` (its first run SIGKILLs its own pool process) or ``crash`` (every run does).
``free(seq, seconds)`` is its unkeyed twin, logged with the key ``-``.
"""

import os
import signal
import time

from celery import Celery

_FORM = os.environ.get("SB_BROKER_FORM", "conf")
if _FORM == "conf":
    app = Celery("worker_app", broker=os.environ["SB_BROKER_URL"])
elif _FORM == "list":
    app = Celery("worker_app")
    app.conf.broker_url = [os.environ["SB_BROKER_URL"], os.environ["SB_BROKER_URL"]]
else:
    app = Celery("worker_app")
app.conf.broker_transport_options = {
    "visibility_timeout": float(os.environ.get("SB_VT", "30")),
    "shard_keys": {"worker_app.by_config": "account"},
}
if os.environ.get("SB_MAX_DELIVERIES"):
    app.conf.broker_transport_options["max_deliveries"] = int(os.environ["SB_MAX_DELIVERIES"])
if os.environ.get("SB_WORKER_LOST_WAIT"):
    app.conf.worker_lost_wait = float(os.environ["SB_WORKER_LOST_WAIT"])
if os.environ.get("SB_PREFETCH"):
    app.conf.worker_prefetch_multiplier = int(os.environ["SB_PREFETCH"])
app.conf.beat_schedule = {"tick": {"task": "worker_app.record", "schedule": 0.5, "args": ("beat", 0)}}
app.conf.worker_hijack_root_logger = False


def _log(*fields) -> None:
    line = " ".join(str(f) for f in fields) + "\n"
    # One short O_APPEND write per line: lines from concurrent processes never interleave.
    fd = os.open(os.environ["SB_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.task(shard_key="key")
def record(key, seq):
    time.sleep(float(os.environ.get("SB_TASK_SECONDS", "0")))
    _log("record", key, seq, os.getpid())


@app.task
def by_config(account, seq):
    _log("by_config", account, seq, os.getpid())


@app.task(shard_key="key")
def span(key, seq, seconds=0.0, action="ok"):
    _log("start", key, seq, os.getpid(), time.time())
    if action == "crash" or action == "crash_once":
        mark = os.path.join(os.environ["SB_MARKS"], f"{key}-{seq}")
        if action == "crash" or not os.path.exists(mark):
            open(mark, "a").close()
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does to a pool process
    time.sleep(seconds)
    _log("end", key, seq, os.getpid(), time.time())


@app.task
def free(seq, seconds=0.0):
    _log("start", "-", seq, os.getpid(), time.time())
    time.sleep(seconds)
    _log("end", "-", seq, os.getpid(), time.time())
