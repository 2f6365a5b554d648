"""The Celery app the subprocess tests run with ``celery -A worker_app worker``.

It never imports sharded_broker: the ``sharded+`` alias must come from the installed
``.pth`` hook. Configured by environment variables:

``SB_BROKER_URL``   the broker URL (sharded+redis://..., sharded+sqlite:///...)
``SB_LOG``          a file each finished task appends one line to: ``<task> <key> <seq> <pid>``
``SB_VT``           visibility timeout in seconds (default 30)
``SB_TASK_SECONDS`` how long ``record`` sleeps (default 0)
"""

import os
import time

from celery import Celery

app = Celery("worker_app", broker=os.environ["SB_BROKER_URL"])
app.conf.broker_transport_options = {
    "visibility_timeout": float(os.environ.get("SB_VT", "30")),
    "shard_keys": {"worker_app.by_config": "account"},
}
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
