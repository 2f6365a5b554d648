"""Settings from the environment (sharded_broker/environment.py): SHARDED_BROKER_URL and
SHARDED_BROKER_<OPTION>, parsed by type, under connect()'s explicit arguments."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sharded_broker
from sharded_broker import environment
from sharded_broker.errors import ConfigurationError, InvalidURL

ROOT = Path(__file__).resolve().parents[1]


def test_without_url_or_variable_connect_opens_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    with sharded_broker.connect() as broker:
        assert repr(broker.backend) == "<MemoryBackend memory://>"
        assert broker.defaults == sharded_broker.QueueSettings()


def test_the_url_variable_names_the_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHARDED_BROKER_URL", f"sqlite:///{tmp_path}/env.db")
    with sharded_broker.connect() as broker:
        broker.enqueue("q", b"x")
    assert (tmp_path / "env.db").exists()
    # An explicit URL beats the variable.
    with sharded_broker.connect("memory://explicit-env-test") as broker:
        assert repr(broker.backend) == "<MemoryBackend memory://explicit-env-test>"


def test_option_variables_set_what_the_caller_leaves_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_MAX_DELIVERIES", "none")
    monkeypatch.setenv("SHARDED_BROKER_KEY_CONCURRENCY", "3")
    monkeypatch.setenv("SHARDED_BROKER_INTERVAL", "0.5")
    monkeypatch.setenv("SHARDED_BROKER_RETRY_POSITION", "Tail")
    monkeypatch.setenv("SHARDED_BROKER_DEDUP_WINDOW", "60")
    monkeypatch.setenv("SHARDED_BROKER_UNIQUE_WHILE_PENDING", "yes")
    monkeypatch.setenv("SHARDED_BROKER_VISIBILITY_TIMEOUT", "12.5")
    monkeypatch.setenv("SHARDED_BROKER_MAX_PAYLOAD_SIZE", "1024")
    monkeypatch.setenv("SHARDED_BROKER_METRICS_WINDOW", "600")
    monkeypatch.setenv("SHARDED_BROKER_KEY_METRICS_WINDOW", "120")
    monkeypatch.setenv("SHARDED_BROKER_EVENTS", "off")
    with sharded_broker.connect("memory://env-options", key_concurrency=7) as broker:
        assert broker.defaults == sharded_broker.QueueSettings(
            max_deliveries=None, key_concurrency=7, interval=0.5, retry_position="tail", dedup_window=60.0,
            unique_while_pending=True, visibility_timeout=12.5,
        )
        assert broker.max_payload_size == 1024
        with pytest.raises(sharded_broker.InvalidArgument, match="maximum is 1024"):
            broker.enqueue("q", b"x" * 1025)
    assert environment.options({}, "memory://") == {
        "max_deliveries": None, "key_concurrency": 3, "interval": 0.5, "retry_position": "tail",
        "dedup_window": 60.0, "unique_while_pending": True, "visibility_timeout": 12.5,
        "max_payload_size": 1024, "metrics_window": 600.0, "key_metrics_window": 120.0, "events": False,
    }


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_URL", "")
    monkeypatch.setenv("SHARDED_BROKER_KEY_CONCURRENCY", "")
    assert environment.url(None) is None
    assert environment.options({}, "memory://") == {}


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        ("SHARDED_BROKER_KEY_CONCURRENCY", "two", "SHARDED_BROKER_KEY_CONCURRENCY must be a positive integer, not 'two'"),
        ("SHARDED_BROKER_KEY_CONCURRENCY", "0", "SHARDED_BROKER_KEY_CONCURRENCY must be a positive integer, not '0'"),
        ("SHARDED_BROKER_KEY_CONCURRENCY", "2.5", "SHARDED_BROKER_KEY_CONCURRENCY must be a positive integer, not '2.5'"),
        ("SHARDED_BROKER_KEY_CONCURRENCY", "20000",
         "SHARDED_BROKER_KEY_CONCURRENCY='20000': key_concurrency must be between 1 and 10000, not 20000"),
        ("SHARDED_BROKER_MAX_DELIVERIES", "-1", "SHARDED_BROKER_MAX_DELIVERIES must be a positive integer or 'none', not '-1'"),
        ("SHARDED_BROKER_INTERVAL", "soon", "SHARDED_BROKER_INTERVAL must be a number of seconds (e.g. 30 or 2.5), not 'soon'"),
        ("SHARDED_BROKER_DEDUP_WINDOW", "nan", "SHARDED_BROKER_DEDUP_WINDOW must be a number of seconds (e.g. 30 or 2.5), not 'nan'"),
        ("SHARDED_BROKER_VISIBILITY_TIMEOUT", "0",
         "SHARDED_BROKER_VISIBILITY_TIMEOUT='0': visibility_timeout must be > 0, not 0.0"),
        ("SHARDED_BROKER_RETRY_POSITION", "middle", "SHARDED_BROKER_RETRY_POSITION must be 'head' or 'tail', not 'middle'"),
        ("SHARDED_BROKER_UNIQUE_WHILE_PENDING", "maybe",
         "SHARDED_BROKER_UNIQUE_WHILE_PENDING must be true or false (1/0, yes/no, on/off), not 'maybe'"),
        ("SHARDED_BROKER_EVENTS", "2", "SHARDED_BROKER_EVENTS must be true or false (1/0, yes/no, on/off), not '2'"),
        ("SHARDED_BROKER_MAX_PAYLOAD_SIZE", "1e9", "SHARDED_BROKER_MAX_PAYLOAD_SIZE must be a positive integer, not '1e9'"),
        ("SHARDED_BROKER_METRICS_WINDOW", "30",
         "SHARDED_BROKER_METRICS_WINDOW='30': metrics_window must be a number of seconds from 60 to 604800, not 30.0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str, message: str
) -> None:
    monkeypatch.setenv(variable, text)
    with pytest.raises(ConfigurationError) as refused:
        sharded_broker.connect("memory://env-bad")
    assert str(refused.value) == message


def test_an_explicit_argument_hides_a_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_KEY_CONCURRENCY", "two")
    with sharded_broker.connect("memory://env-hidden", key_concurrency=2) as broker:
        assert broker.defaults.key_concurrency == 2


def test_an_unknown_variable_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_KEY_CONCURENCY", "2")  # a typo
    with pytest.raises(ConfigurationError, match=r"^unknown environment variable\(s\) SHARDED_BROKER_KEY_CONCURENCY; known: "):
        sharded_broker.connect("memory://env-typo")


def test_variables_read_elsewhere_are_not_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_DASHBOARD_TOKEN", "secret-token")
    with sharded_broker.connect("memory://env-token"):
        pass
    assert environment.dashboard_token() == "secret-token"
    assert environment.dashboard_token("given") == "given"


def test_prefix_applies_only_to_redis_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_PREFIX", "app1")
    assert environment.options({}, "redis://localhost:6379/0") == {"prefix": "app1"}
    assert environment.options({}, "redis+cluster://10.0.0.1:7000") == {"prefix": "app1"}
    with pytest.raises(
        ConfigurationError,
        match=r"^SHARDED_BROKER_PREFIX applies only to redis://, rediss://, redis\+cluster://, "
        r"redis\+sentinel://, rediss\+cluster:// and rediss\+sentinel:// URLs, not 'memory://'$",
    ):
        sharded_broker.connect("memory://")


def test_wait_replicas_applies_to_every_redis_url_cluster_ones_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_WAIT_REPLICAS", "1")
    monkeypatch.setenv("SHARDED_BROKER_WAIT_TIMEOUT", "0.5")
    expected = {"wait_replicas": 1, "wait_timeout": 0.5}
    for url in ("redis://h/0", "rediss+cluster://10.0.0.1:7000", "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"):
        assert environment.options({}, url) == expected
    with pytest.raises(ConfigurationError, match=r"^SHARDED_BROKER_WAIT_REPLICAS applies only to redis://"):
        environment.options({}, "sqlite:///q.db")


def test_the_sentinels_password_applies_only_to_sentinel_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_SENTINEL_PASSWORD", "pw")
    monkeypatch.setenv("SHARDED_BROKER_WAIT_REPLICAS", "1")
    assert environment.options({}, "redis+sentinel://h/0?master=m") == {"sentinel_password": "pw", "wait_replicas": 1}
    with pytest.raises(ConfigurationError, match=r"^SHARDED_BROKER_SENTINEL_PASSWORD applies only to redis\+sentinel://"):
        environment.options({}, "redis://h/0")


def test_a_malformed_url_variable_is_named_and_its_password_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_BROKER_URL", "localhost:hunter2@redis-host:6379")
    with pytest.raises(InvalidURL) as refused:
        sharded_broker.connect()
    assert str(refused.value).startswith("SHARDED_BROKER_URL must be a broker URL")
    assert "hunter2" not in str(refused.value) and "redis-host:6379" in str(refused.value)


def test_only_the_environment_module_reads_the_environment() -> None:
    readers = []
    for folder in ("sharded_broker", "integrations"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "environment.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                    readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                elif isinstance(node, ast.keyword) and node.arg in ("envvar", "auto_envvar_prefix"):
                    readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers == []
