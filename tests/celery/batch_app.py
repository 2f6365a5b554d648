"""The Celery app of the batch-task process tests: ``celery -A batch_app worker -P prefork``.

``SB_BROKER_URL`` is the broker URL; ``SB_LOG`` a file each run appends lines to
(``start|end <key> <numbers> <pid> <time>``, ``done <key> <n>``); ``SB_MARKS`` a
directory where ``handle`` notes the failures it already did.

``handle`` fails at its message ``n == 2`` once (then it succeeds) and at ``n == 5``
every time (dead-lettered after ``max_deliveries``), with ``BatchFailed``, which the
prefork pool sends back to the worker's main process.
"""

import os
import time

from celery import Celery

from sharded_broker.integrations.celery import BatchFailed, BatchTask

app = Celery("batch_app", broker=os.environ["SB_BROKER_URL"])
app.conf.task_default_queue = "batches"
app.conf.broker_transport_options = {"visibility_timeout": 10, "max_deliveries": 3}
app.conf.worker_hijack_root_logger = False


def _log(*fields) -> None:
    # One short O_APPEND write per line: lines from concurrent processes never interleave.
    fd = os.open(os.environ["SB_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(str(f) for f in fields) + "\n").encode())
    finally:
        os.close(fd)


@app.task(base=BatchTask, batch=4, shard_key="key", default_retry_delay=0.05)
def handle(items):
    key = items[0].kwargs["key"]
    numbers = ",".join(str(item.kwargs["n"]) for item in items)
    _log("start", key, numbers, os.getpid(), time.time())
    try:
        for index, item in enumerate(items):
            n = item.kwargs["n"]
            mark = os.path.join(os.environ["SB_MARKS"], f"{key}-{n}")
            if n == 5 or (n == 2 and not os.path.exists(mark)):
                open(mark, "a").close()
                raise BatchFailed(index, ValueError(f"{key} message {n} failed"))
            time.sleep(0.01)
            _log("done", key, n)
    finally:
        _log("end", key, numbers, os.getpid(), time.time())
