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


def test_a_cluster_url_takes_credentials_given_apart_but_no_port_or_database() -> None:
    parts = {"user": "u", "password": "p/w", "port": 6390, "vhost": "3"}
    given = "redis+cluster://h1:7000,h2:7001"
    assert with_connection_parts(given, **parts) == "redis+cluster://u:p%2Fw@h1:7000,h2:7001"
    with_credentials = "rediss+cluster://a:b@h1:7000/?ssl_cert_reqs=none"
    assert with_connection_parts(with_credentials, **parts) == with_credentials


def test_a_cluster_url_names_its_nodes_and_a_url_for_the_first() -> None:
    from sharded_broker.urls import cluster_parts, redact_url

    url = "rediss+cluster://u:s%23cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/?socket_timeout=2"
    assert cluster_parts(url) == (
        "rediss://u:s%23cret@10.0.0.1:7000/0?socket_timeout=2",
        [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)],
    )
    assert redact_url(url) == "rediss+cluster://u:***@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/?socket_timeout=2"
