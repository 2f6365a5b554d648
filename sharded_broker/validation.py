"""Argument checks shared by every backend, run before anything is written."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from .errors import ConfigurationError, InvalidArgument, InvalidArgumentType
from .models import QUEUE_SETTING_NAMES, Message, QueueSettings

MAX_QUEUE_NAME_LENGTH = 200
MAX_KEY_LENGTH = 512
# A key's weight is how many consecutive turns it may take in a round of the ready keys.
MAX_WEIGHT = 1_000
MAX_DEDUP_ID_LENGTH = 512
MAX_REF_LENGTH = 512
MAX_HEADERS_SIZE = 64 * 1024
MAX_REASON_LENGTH = 8 * 1024
PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1
MAX_DELAY = 10 * 365 * 24 * 3600.0
DEFAULT_MAX_PAYLOAD_SIZE = 8 * 1024 * 1024
MAX_PAYLOAD_SIZE_LIMIT = 512 * 1024 * 1024  # the largest max_payload_size a broker takes
MAX_PENDING_LIMIT = 2**40  # the largest max_pending(_per_key): far beyond any store
ON_FULL_CHOICES = ("reject", "drop_oldest", "replace")

# Queue names become part of backend key names (Redis keys with a {queue} hash tag,
# SQLite rows): no braces, whitespace or control characters.
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:@+\-]+")
# Keys live inside values, never in key names; NUL is the engine's separator.
_FORBIDDEN_IN_KEY = re.compile(r"[\x00-\x1f\x7f]")


# Queue names already found valid: a process uses a handful, and every enqueue and lease
# names one, so the common case is one set lookup. Bounded, so that a stream of distinct
# names (bad input) cannot grow it without end.
_valid_queue_names: set[str] = set()
_MAX_REMEMBERED_QUEUE_NAMES = 1024


def queue_name(name: Any) -> str:
    if type(name) is str and name in _valid_queue_names:
        return name
    if not isinstance(name, str):
        raise InvalidArgumentType(f"queue name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidArgument("queue name must not be empty")
    if len(name) > MAX_QUEUE_NAME_LENGTH:
        raise InvalidArgument(
            f"queue name is {len(name)} characters long; the maximum is {MAX_QUEUE_NAME_LENGTH}"
        )
    if not _QUEUE_NAME.fullmatch(name):
        raise InvalidArgument(
            f"queue name {name!r} may only contain letters, digits and _ . : @ + -"
        )
    if type(name) is str and len(_valid_queue_names) < _MAX_REMEMBERED_QUEUE_NAMES:
        _valid_queue_names.add(name)
    return name


def utf8_text(value: str, name: str) -> str:
    """``value``, refused when UTF-8 cannot encode it (a lone surrogate): every backend
    stores text as UTF-8, and SQLite cannot store such a string at all."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{name} {value!r:.80} is not valid Unicode: it contains a lone surrogate") from None
    return value


def shard_key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str):
        raise InvalidArgumentType(
            f"shard key must be a str or None, not {type(key).__name__} ({key!r:.80})"
        )
    if not key:
        raise InvalidArgument("shard key must not be empty (use None for unkeyed messages)")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"shard key is {len(key)} characters long; the maximum is {MAX_KEY_LENGTH}")
    if _FORBIDDEN_IN_KEY.search(key):
        raise InvalidArgument(f"shard key {key!r:.80} contains a control character")
    return utf8_text(key, "shard key")


def payload(data: Any, max_size: int) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise InvalidArgumentType(f"payload must be bytes, not {type(data).__name__}")
    if len(data) > max_size:
        raise InvalidArgument(f"payload is {len(data)} bytes; the maximum is {max_size} (max_payload_size)")
    return data


def priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"priority must be an int, not {type(value).__name__}")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise InvalidArgument(f"priority {value} is out of range [{PRIORITY_MIN}, {PRIORITY_MAX}]")
    return value


def seconds(value: Any, name: str, *, allow_zero: bool = True, maximum: float = MAX_DELAY) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(f"{name} must be a number of seconds, not {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {value}")
    if value > maximum:
        raise InvalidArgument(f"{name} of {value} seconds exceeds the maximum of {maximum}")
    return value


def positive_int(value: Any, name: str, *, maximum: int = 1_000_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"{name} must be an int, not {type(value).__name__}")
    if not 1 <= value <= maximum:
        raise InvalidArgument(f"{name} must be between 1 and {maximum}, not {value}")
    return value


def weight(value: Any) -> int | None:
    """A key's weight as the backends store it: an int > 1, or None for the default 1."""
    if value is None:
        return None
    checked = positive_int(value, "weight", maximum=MAX_WEIGHT)
    return None if checked == 1 else checked


def _optional_name(value: Any, name: str, maximum: int) -> str | None:
    """None, or a non-empty str of at most ``maximum`` characters (a dedup id, a ref)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{name} must be a str or None, not {type(value).__name__}")
    if not value or len(value) > maximum:
        raise InvalidArgument(f"{name} must be 1 to {maximum} characters long, not {len(value)}")
    return utf8_text(value, name)


def dedup_id(value: Any) -> str | None:
    return _optional_name(value, "dedup_id", MAX_DEDUP_ID_LENGTH)


def ref(value: Any) -> str | None:
    """A message's ref (see Message.ref): a non-empty str of at most MAX_REF_LENGTH characters."""
    return _optional_name(value, "ref", MAX_REF_LENGTH)


# JSON values that a JSON round trip gives back equal and of the same type.
_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})
# The longest JSON text of one character: a character outside the BMP, as two \uXXXX.
_MAX_JSON_PER_CHAR = 12
_MAX_JSON_SCALAR = 24  # the longest repr of a float or of an int below 2**63


def headers(value: Any) -> dict[str, Any]:
    """A plain dict equal to ``value``'s JSON round trip (what every backend stores)."""
    if value is None:
        return {}
    # A dict first: typing.Mapping's isinstance check costs a microsecond per message.
    if type(value) is not dict and not isinstance(value, Mapping):
        raise InvalidArgumentType(f"headers must be a mapping, not {type(value).__name__}")
    copied = _flat_headers(value)
    if copied is not None:
        return copied
    for name in value:
        if not isinstance(name, str):
            raise InvalidArgumentType(f"header names must be str, not {type(name).__name__}")
    try:
        encoded = json.dumps(dict(value), separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentType(f"headers must be JSON-serializable: {exc}") from None
    if len(encoded) > MAX_HEADERS_SIZE:
        raise InvalidArgument(f"headers are {len(encoded)} bytes as JSON; the maximum is {MAX_HEADERS_SIZE}")
    return json.loads(encoded)


def _flat_headers(value: Mapping[Any, Any]) -> dict[str, Any] | None:
    """A copy of ``value`` when it maps str names to JSON scalars (what adapters send,
    on every message) and is certainly within MAX_HEADERS_SIZE as JSON: its JSON round
    trip would give the very same dict, so it is neither encoded nor decoded. None when
    that is not certain; then the full check decides."""
    bound = 2
    for name, item in value.items():
        kind = type(item)
        if type(name) is not str or kind not in _JSON_SCALARS:
            return None
        if kind is float and not math.isfinite(item):
            return None
        if kind is int and not -(2**63) < item < 2**63:
            return None
        size = _MAX_JSON_PER_CHAR * len(item) + 2 if kind is str else _MAX_JSON_SCALAR
        bound += _MAX_JSON_PER_CHAR * len(name) + 4 + size
    return dict(value) if bound <= MAX_HEADERS_SIZE else None


def message(msg: Any, max_payload_size: int) -> Message:
    """A checked copy of ``msg`` with normalised fields."""
    if not isinstance(msg, Message):
        raise InvalidArgumentType(f"expected a sharded_broker.Message, not {type(msg).__name__}")
    return message_of(
        msg.payload, msg.key, msg.priority, msg.delay, msg.dedup_id, msg.headers, msg.at_head, max_payload_size,
        msg.ref,
    )


def message_of(
    data: Any, key: Any, prio: Any, delay: Any, dedup: Any, head: Any, at_head: Any, max_payload_size: int,
    reference: Any = None,
) -> Message:
    """A checked :class:`Message` from its fields (what ``Broker.enqueue`` is given), built once."""
    return Message(
        payload=payload(data, max_payload_size),
        key=shard_key(key),
        priority=priority(prio),
        delay=seconds(delay, "delay"),
        dedup_id=dedup_id(dedup),
        headers=headers(head),
        at_head=bool(at_head),
        ref=ref(reference),
    )


def queue_settings(options: Mapping[str, Any], base: QueueSettings | None = None) -> QueueSettings:
    """Settings from ``options``, every name and value checked."""
    unknown = sorted(set(options) - QUEUE_SETTING_NAMES)
    if unknown:
        raise ConfigurationError(
            f"unknown queue setting(s) {', '.join(unknown)}; known: {', '.join(sorted(QUEUE_SETTING_NAMES))}"
        )
    checked: dict[str, Any] = {}
    for name, value in options.items():
        if name == "max_deliveries":
            checked[name] = None if value is None else positive_int(value, name)
        elif name == "key_concurrency":
            checked[name] = positive_int(value, name, maximum=10_000)
        elif name in ("interval", "dedup_window"):
            checked[name] = seconds(value, name)
        elif name == "visibility_timeout":
            checked[name] = seconds(value, name, allow_zero=False)
        elif name == "retry_position":
            if value not in ("head", "tail"):
                raise ConfigurationError(f"retry_position must be 'head' or 'tail', not {value!r}")
            checked[name] = value
        elif name in ("max_pending_per_key", "max_pending"):
            checked[name] = None if value is None else positive_int(value, name, maximum=MAX_PENDING_LIMIT)
        elif name == "on_full":
            if value not in ON_FULL_CHOICES:
                raise ConfigurationError(
                    f"on_full must be one of {', '.join(repr(c) for c in ON_FULL_CHOICES)}, not {value!r}"
                )
            checked[name] = value
        elif name == "unique_while_pending":
            if not isinstance(value, bool):
                raise ConfigurationError(f"unique_while_pending must be a bool, not {value!r}")
            checked[name] = value
    return (base or QueueSettings()).replace(**checked)
