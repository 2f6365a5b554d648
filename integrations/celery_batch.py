"""Celery batch tasks over the sharded transport: one call per ordered batch of one key.

::

    from sharded_broker.integrations.celery import BatchFailed, BatchTask

    @app.task(base=BatchTask, batch=50, shard_key="user_id", queue="sync")
    def sync(requests):                       # a list of BatchItem(id, args, kwargs)
        for index, request in enumerate(requests):
            try:
                push(**request.kwargs)
            except TransientError as exc:
                raise BatchFailed(index, exc)  # acks 0..index-1, retries index, gives back the rest

    sync.delay(user_id=42, text="hi")         # one message; its key is "42"

How it works (the consumer-side grouping, in ``integrations/celery.py``): the transport
leases a batch task's queue with ``per_key=batch``; the engine hands one ordered batch of
up to ``batch`` consecutive messages of one key, and the transport turns it into one
Celery message for the task, whose one argument lists the messages. The key stays held
until the batch is settled, so no other delivery of the key overlaps it. When the task
ends, :class:`BatchRequest` (in the worker's main process) tells the channel which
message failed, and the channel settles the engine leases: all acked on success; on
:class:`BatchFailed` ``(index, error)`` the messages before ``index`` are acked, the one
at ``index`` is retried after the task's ``default_retry_delay`` at the head of its key
(dead-lettered once it reached ``max_deliveries``, or at once when Celery rejects the
message: ``task_acks_on_failure_or_timeout=False``), and the later ones go back
unprocessed. Any other exception, a hard time limit or a lost pool process fails the
batch at its first message.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import celery
from billiard.einfo import ExceptionWithTraceback
from celery.exceptions import Ignore, TimeLimitExceeded
from celery.worker.request import Request

from sharded_broker.broker import MAX_LEASE_LIMIT
from sharded_broker.errors import ConfigurationError

from .kombu_alias import BATCH_TASK
from .support import BatchFailed

__all__ = ["BatchFailed", "BatchItem", "BatchRequest", "BatchTask"]


class BatchItem(NamedTuple):
    """One message of a batch: its Celery task id and the arguments it was sent with."""

    id: str
    args: tuple
    kwargs: dict


def _items(value: Any) -> bool:
    """True for the batch argument the transport builds: a list of {id, args, kwargs}."""
    return isinstance(value, list) and all(isinstance(i, dict) and set(i) == {"id", "args", "kwargs"} for i in value)


def check_batch_size(batch: Any, task_name: str) -> None:
    """Refuse a ``batch`` that is not a count of messages the engine can lease at once."""
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_LEASE_LIMIT:
        raise ConfigurationError(
            f"batch of task {task_name!r} must be an int from 1 to {MAX_LEASE_LIMIT} "
            f"(the most messages per call), not {batch!r}"
        )


class BatchRequest(Request):
    """The Celery request of a batch: records, in the worker's main process, which message
    of the batch failed, for the channel to settle the batch's leases when Celery acks or
    rejects it."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        error = exc_info.exception
        if isinstance(error, ExceptionWithTraceback):
            error = error.exc
        if not isinstance(error, Ignore):  # Ignore acks the message: the whole batch
            self._record_failure(error)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:  # a soft limit raises inside the task, and comes to on_failure if uncaught
            self._record_failure(TimeLimitExceeded(timeout))
        super().on_timeout(soft, timeout)

    def _record_failure(self, error: BaseException) -> None:
        if isinstance(error, BatchFailed):
            index, cause = error.index, (error.error if error.error is not None else error)
        else:
            index, cause = 0, error
        record = getattr(self._message.channel, "record_batch_failure", None)
        if record is not None:  # delivered by the sharded transport
            record(self._message.delivery_tag, index, cause, float(self.task.default_retry_delay or 0))


class BatchTask(celery.Task):
    """Base class of a batch task: ``@app.task(base=BatchTask, batch=M, queue=...)``.

    The function takes one argument, a list of :class:`BatchItem` (up to ``batch``
    consecutive messages of one shard key, in order); callers send single messages with
    the arguments each item carries (``task.delay(user_id=42, text="hi")``: a string
    ``shard_key`` names a keyword argument, since the function's own signature is the
    batch's). ``batch`` defaults to 10. The transport batches the task's messages in the
    task's ``queue`` (default: ``task_default_queue``); elsewhere each arrives as a batch
    of one. ``self.retry()`` is refused: raise :class:`BatchFailed` instead.
    """

    batch: int = 10
    typing = False  # callers pass one message's arguments, not the function's batch
    Request = "sharded_broker.integrations.celery_batch:BatchRequest"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_batch_size(cls.__dict__.get("batch", cls.batch), cls.__dict__.get("name") or cls.__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and _items(args[0]):
            items = [BatchItem(item["id"], tuple(item["args"]), dict(item["kwargs"])) for item in args[0]]
            return super().__call__(items)
        return super().__call__(*args, **kwargs)

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigurationError(
            f"task {self.name!r} is a batch task: raise BatchFailed(index, error) to retry the message "
            "at index (the engine retries it at the head of its key), not self.retry()"
        )


setattr(BatchTask, BATCH_TASK, True)
