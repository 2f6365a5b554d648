"""The pytest plugin used as docs/testing.md shows, in throwaway projects (pytester)."""

from __future__ import annotations

import pytest

from plugin import celery_project, dramatiq_project


def dramatiq_project_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app=dramatiq_project.APP, test_app=dramatiq_project.TESTS)
    pytester.makeconftest(dramatiq_project.CONFTEST)


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis"])
def test_dramatiq_fixtures_and_helpers(pytester: pytest.Pytester, backend: str, request) -> None:
    dramatiq_project_in(pytester)
    url = {"memory": "memory://", "sqlite": "sqlite://"}.get(backend) or request.getfixturevalue("redis_url")
    result = pytester.runpytest_subprocess(f"--sharded-broker-url={url}", "-p", "no:cacheprovider")
    if backend == "redis":  # no test clock: the two tests that move time skip
        result.assert_outcomes(passed=3, skipped=2)
    else:
        result.assert_outcomes(passed=5)


def test_an_ini_option_names_the_url_and_a_bad_one_is_refused(pytester: pytest.Pytester) -> None:
    dramatiq_project_in(pytester)
    pytester.makeini("[pytest]\nsharded_broker_url = sqlite://\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "engine_fixture").assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("--sharded-broker-url=postgres://x", "-k", "engine_fixture")
    result.stdout.fnmatch_lines(["*postgres*"])
    assert result.ret != 0


def test_the_plugin_is_inert_until_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_other="""
        import sys

        def test_nothing_imported():
            assert "dramatiq" not in sys.modules
    """)
    pytester.runpytest_subprocess("-p", "no:celery", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def celery_project_in(pytester: pytest.Pytester) -> None:
    pytester.makeini(celery_project.INI)
    pytester.makeconftest(celery_project.CONFTEST)
    pytester.makepyfile(test_tasks=celery_project.TESTS, test_session=celery_project.SESSION_TESTS)


def test_celery_fixtures_and_helpers(pytester: pytest.Pytester) -> None:
    celery_project_in(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_tasks.py")
    result.assert_outcomes(passed=2)


def test_celery_session_fixtures_on_sqlite(pytester: pytest.Pytester) -> None:
    celery_project_in(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sharded-broker-url=sqlite://", "test_session.py")
    result.assert_outcomes(passed=1)


def test_the_celery_override_is_off_unless_asked_for(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_default="""
        def test_celery_config_is_celerys_own(celery_config):
            assert celery_config == {}
    """)
    pytester.runpytest_subprocess("-p", "celery.contrib.pytest", "-p", "no:cacheprovider").assert_outcomes(passed=1)
