from __future__ import annotations

from pathlib import Path

import pytest

# Fault tests run on the backends shared by several processes: Redis and SQLite.
SHARED_BACKENDS = ("redis", "sqlite")


@pytest.fixture(params=SHARED_BACKENDS)
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store on each backend that several processes can share."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/q.db"
    return request.getfixturevalue("redis_url")
