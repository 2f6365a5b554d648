"""sharded_broker.urls: the one module that reads broker URLs."""

from __future__ import annotations

import pytest

from sharded_broker import InvalidURL
from sharded_broker.urls import engine_url, scheme, scrub, with_connection_parts


def test_parts_given_apart_fill_only_what_the_url_leaves_out() -> None:
    parts = {"user": "u", "password": "p/w", "port": 6390, "vhost": "3"}
    assert with_connection_parts("redis://h", **parts) == "redis://u:p%2Fw@h:6390/3"
    assert with_connection_parts("rediss://h", **parts) == "rediss://u:p%2Fw@h:6390/3"
    given = "redis://:pw@h:6380/2?socket_timeout=3"
    assert with_connection_parts(given, **parts) == given
    assert with_connection_parts("sqlite:///tmp/q.db", **parts) == "sqlite:///tmp/q.db"
    assert with_connection_parts("redis://h", user=None, password=None, port=None, vhost=None) == "redis://h"


def test_celery_urls_name_the_engine_url() -> None:
    assert engine_url("sharded+redis://:pw@h:1/0") == "redis://:pw@h:1/0"
    assert engine_url("memory://") == "memory://"


def test_a_password_is_masked_in_both_spellings() -> None:
    url = "redis://:p%40ss@h:1/0"
    assert scrub("login p%40ss refused for p@ss\n  twice", url) == "login *** refused for *** twice"


@pytest.mark.parametrize("url", ["localhost:6379", "://h", 42])
def test_a_url_without_a_scheme_is_refused(url: object) -> None:
    with pytest.raises(InvalidURL):
        scheme(url)  # type: ignore[arg-type]
