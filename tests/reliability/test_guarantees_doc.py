"""The README's Guarantees section names a test for every promise: each named test must exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def test_every_test_the_guarantees_name_exists() -> None:
    guarantees = README.read_text(encoding="utf-8").split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", guarantees)
    assert len(named) > 40
    missing = [
        f"{path}::{name}" for path, name in named
        if not (ROOT / path).exists() or not re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M)
    ]
    assert not missing, f"the README's Guarantees section names tests that do not exist: {missing}"
