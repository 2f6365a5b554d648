"""SharQ's enqueue / dequeue / finish loop, run inside its virtualenv.

Enqueues N jobs one by one over K queue ids (SharQ's shard keys, interval 0), then
dequeues and finishes them one by one until none is left. Prints one JSON object.
Standalone: it runs with SharQ's own interpreter and its pinned redis-py.

Usage: python sharq_workload.py REDIS_HOST REDIS_PORT JOBS KEYS
"""

import json
import os
import sys
import tempfile
import time

from sharq import SharQ

PAYLOAD = "x" * 100
CONFIG = """[sharq]
job_expire_interval = 30000
job_requeue_interval = 1000
default_job_requeue_limit = -1

[redis]
db = 0
key_prefix = sharq_bench
conn_type = tcp_sock
port = {port}
host = {host}
clustered = false
password =
"""


def main(host: str, port: str, jobs: int, keys: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as config:
        config.write(CONFIG.format(host=host, port=port))
    try:
        queue = SharQ(config.name)
    finally:
        os.unlink(config.name)
    start = time.perf_counter()
    for i in range(jobs):
        queue.enqueue(payload=PAYLOAD, interval=0, job_id=f"job-{i}", queue_id=f"key-{i % keys}", queue_type="bench")
    enqueued = time.perf_counter()
    finished = 0
    while True:
        job = queue.dequeue(queue_type="bench")
        if job["status"] != "success":
            break
        queue.finish(job_id=job["job_id"], queue_id=job["queue_id"], queue_type="bench")
        finished += 1
    drained = time.perf_counter()
    if finished != jobs:
        raise SystemExit(f"finished {finished} of {jobs} jobs")
    return {
        "jobs": jobs,
        "keys": keys,
        "enqueue_per_s": round(jobs / (enqueued - start), 1),
        "dequeue_finish_per_s": round(jobs / (drained - enqueued), 1),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
