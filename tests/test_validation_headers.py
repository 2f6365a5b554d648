"""check.headers gives what a JSON round trip gives, whether or not it skips the encoding."""

from __future__ import annotations

import enum
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharded_broker import validation as check
from sharded_broker.errors import InvalidArgument


def round_trip(value: Any) -> Any:
    return json.loads(json.dumps(dict(value), separators=(",", ":")))


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b  # NaN
    return a == b


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                      max_leaves=8)


@given(st.dictionaries(st.text(), values, max_size=6))
def test_any_headers_come_back_as_their_json_round_trip(headers: dict[str, Any]) -> None:
    assert same(check.headers(headers), round_trip(headers))


class Level(enum.IntEnum):
    HIGH = 1


class Name(str):
    pass


@pytest.mark.parametrize("headers", [
    {"actor_name": "noop", "message_id": "abc"},  # what the Dramatiq adapter sends
    {"task": "tasks.add", "id": None},
    {"big": 2**70, "small": -(2**63)},  # ints the shortcut leaves to the full check
    {"nan": float("nan"), "inf": float("inf")},
    {"level": Level.HIGH, "name": Name("n")},  # subclasses: the round trip gives plain values
    {"tuple": (1, 2)},
    {"astral": "\U0001f600" * 10, "surrogate": "\ud800"},
])
def test_headers_of_every_kind_come_back_as_their_json_round_trip(headers: dict[str, Any]) -> None:
    checked = check.headers(headers)
    assert same(checked, round_trip(headers))
    assert checked is not headers  # a copy: the caller's dict may change later


def test_the_size_limit_holds_at_its_edge() -> None:
    # '{"h":"' + text + '"}' is 8 characters more than the text.
    at_limit = {"h": "x" * (check.MAX_HEADERS_SIZE - 8)}
    assert check.headers(at_limit) == at_limit
    with pytest.raises(InvalidArgument, match="maximum"):
        check.headers({"h": "x" * (check.MAX_HEADERS_SIZE - 7)})
    # Escaping counts: 2,000 astral characters take 24,000 characters of JSON.
    with pytest.raises(InvalidArgument, match="maximum"):
        check.headers({f"h{i}": "\U0001f600" * 2000 for i in range(3)})
