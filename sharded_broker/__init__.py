"""Per-key FIFO sharding for Python task queues.

>>> import sharded_broker
>>> broker = sharded_broker.connect("memory://")
>>> broker.enqueue("sms", b"hello", key="user-1")  # doctest: +ELLIPSIS
'...'
>>> [lease.payload for lease in broker.lease("sms")]
[b'hello']
"""

from .backend import Backend
from .broker import Broker, connect
from .errors import (
    BackendUnavailable,
    ConfigurationError,
    InvalidArgument,
    InvalidArgumentType,
    InvalidURL,
    QueueFull,
    ShardedBrokerError,
)
from .urls import display_url, redact_url
from .models import (
    CancelResult, DeadLetter, Event, HeadMessage, HeldBatch, KeyDiagnosis, KeyFacts, KeyInfo, Lease, LeaseResult,
    Message, MessageInfo, MessageState, MinuteMetrics, QueueSettings, QueueStats, Schedule,
)

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Broker",
    "CancelResult",
    "ConfigurationError",
    "DeadLetter",
    "Event",
    "HeadMessage",
    "HeldBatch",
    "InvalidArgument",
    "InvalidArgumentType",
    "InvalidURL",
    "KeyDiagnosis",
    "KeyFacts",
    "KeyInfo",
    "Lease",
    "LeaseResult",
    "Message",
    "MessageInfo",
    "MessageState",
    "MinuteMetrics",
    "QueueFull",
    "QueueSettings",
    "QueueStats",
    "Schedule",
    "ShardedBrokerError",
    "connect",
    "display_url",
    "redact_url",
]
__version__ = "0.1.0"
