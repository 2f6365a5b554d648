"""docs/guarantees.md names a test for every promise: each named test must exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "guarantees.md"


def test_every_test_the_guarantees_name_exists() -> None:
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", DOC.read_text(encoding="utf-8"))
    assert len(named) > 40
    missing = [
        f"{path}::{name}" for path, name in named
        if not (ROOT / path).exists() or not re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M)
    ]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
