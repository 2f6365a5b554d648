"""Settings from the environment: ``SHARDED_BROKER_URL`` and ``SHARDED_BROKER_<OPTION>``.

The one place the package reads the process environment. ``connect()``, both adapters and
the command line call :func:`url` and :func:`options`; an explicit argument always beats
the environment, and the environment beats the built-in default.

Values arrive as text: each is parsed by its option's type, then range-checked by the same
checks an explicit argument gets (validation.py, backend.py), every error naming the
variable and the bad value. A ``SHARDED_BROKER_*``
variable that is neither an option nor one the project reads elsewhere is refused by name,
so that a typo is never silently ignored. An empty variable counts as unset (``VAR= cmd``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

from . import validation as check
from .backend import key_metrics_window_option, metrics_window_option
from .errors import ConfigurationError, InvalidArgument, InvalidArgumentType, InvalidURL
from .models import QUEUE_SETTING_NAMES
from .urls import redact_url, scheme

PREFIX = "SHARDED_BROKER_"
URL_VARIABLE = PREFIX + "URL"
DASHBOARD_TOKEN_VARIABLE = PREFIX + "DASHBOARD_TOKEN"
# Variables of this prefix read by something other than connect()'s options.
OTHER_VARIABLES = frozenset({URL_VARIABLE, DASHBOARD_TOKEN_VARIABLE})

# The longest metrics_window a backend takes (backend.metrics_window_option).
MAX_METRICS_WINDOW = 7 * 24 * 3600.0
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _positive_integer(variable: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigurationError(f"{variable} must be a positive integer, not {text!r}")
    return value


def _optional_positive_integer(variable: str, text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return _positive_integer(variable, text)
    except ConfigurationError:
        raise ConfigurationError(f"{variable} must be a positive integer or 'none', not {text!r}") from None


def _seconds(variable: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"{variable} must be a number of seconds (e.g. 30 or 2.5), not {text!r}")
    return value


def _boolean(variable: str, text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigurationError(f"{variable} must be true or false (1/0, yes/no, on/off), not {text!r}")


def _retry_position(variable: str, text: str) -> str:
    word = text.strip().lower()
    if word not in ("head", "tail"):
        raise ConfigurationError(f"{variable} must be 'head' or 'tail', not {text!r}")
    return word


def _on_full(variable: str, text: str) -> str:
    word = text.strip().lower()
    if word not in check.ON_FULL_CHOICES:
        raise ConfigurationError(f"{variable} must be one of {', '.join(check.ON_FULL_CHOICES)}, not {text!r}")
    return word


def _text(variable: str, text: str) -> str:
    return text


# Each connect() option the environment can set, with the parser of its text.
OPTION_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "max_deliveries": _optional_positive_integer,
    "key_concurrency": _positive_integer,
    "interval": _seconds,
    "retry_position": _retry_position,
    "dedup_window": _seconds,
    "unique_while_pending": _boolean,
    "visibility_timeout": _seconds,
    "max_pending_per_key": _optional_positive_integer,
    "max_pending": _optional_positive_integer,
    "on_full": _on_full,
    "max_payload_size": _positive_integer,
    "metrics_window": _seconds,
    "key_metrics_window": _seconds,
    "events": _boolean,
    "prefix": _text,
    "wait_replicas": _positive_integer,
    "wait_timeout": _seconds,
    "sentinel_password": _text,
    "partitions": _positive_integer,
}
# Options that only some URL schemes take; elsewhere the variable is refused by name.
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"})
SCHEME_OPTIONS: dict[str, frozenset[str]] = {
    "prefix": REDIS_SCHEMES,
    "partitions": REDIS_SCHEMES,
    "wait_replicas": REDIS_SCHEMES,
    "wait_timeout": REDIS_SCHEMES,
    "sentinel_password": frozenset({"redis+sentinel", "rediss+sentinel"}),
}


def variable_of(option: str) -> str:
    """The environment variable of a connect() option: ``key_concurrency`` ->
    ``SHARDED_BROKER_KEY_CONCURRENCY``."""
    return PREFIX + option.upper()


def _read(variable: str) -> str | None:
    """The variable's text; None when it is unset or empty."""
    return os.environ.get(variable) or None


def url(explicit: str | None = None) -> str | None:
    """The broker URL: ``explicit`` when given, else ``SHARDED_BROKER_URL``, else None (the
    caller applies its own default, or says that no URL was given).

    A malformed URL from the environment raises :class:`InvalidURL` naming the variable,
    its password masked."""
    if explicit is not None:
        return explicit
    found = _read(URL_VARIABLE)
    if found is None:
        return None
    try:
        scheme(found)
    except InvalidURL:
        raise InvalidURL(
            f"{URL_VARIABLE} must be a broker URL (scheme://..., e.g. redis://localhost:6379/0), "
            f"not {redact_url(found)!r}"
        ) from None
    return found


def dashboard_token(explicit: str | None = None) -> str | None:
    """The dashboard's action token: ``explicit``, else ``SHARDED_BROKER_DASHBOARD_TOKEN``."""
    return explicit if explicit is not None else _read(DASHBOARD_TOKEN_VARIABLE)


def check_variables() -> None:
    """Refuse, by name, a ``SHARDED_BROKER_*`` variable nothing reads (a typo)."""
    known = OTHER_VARIABLES | {variable_of(name) for name in OPTION_PARSERS}
    unknown = sorted(name for name in os.environ if name.startswith(PREFIX) and name not in known)
    if unknown:
        raise ConfigurationError(
            f"unknown environment variable(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def options(explicit: Mapping[str, Any], broker_url: str) -> dict[str, Any]:
    """``explicit`` connect() options, plus every option they leave out that the
    environment sets, parsed and checked. ``broker_url`` is the URL being opened: a
    variable of an option its scheme does not take (``SHARDED_BROKER_PREFIX`` with
    ``sqlite://``) is refused by name."""
    check_variables()
    merged = dict(explicit)
    for name, parse in OPTION_PARSERS.items():
        variable = variable_of(name)
        text = _read(variable)
        if text is None or name in explicit:
            continue
        schemes = SCHEME_OPTIONS.get(name)
        if schemes is not None and _scheme_or_none(broker_url) not in schemes:
            *others, last = [f"{s}://" for s in sorted(schemes, key=lambda s: (len(s), s))]
            raise ConfigurationError(
                f"{variable} applies only to {', '.join(others)}{' and ' if others else ''}{last} URLs, "
                f"not {redact_url(broker_url)!r}"
            )
        merged[name] = _checked(name, parse(variable, text), variable, text, merged)
    return merged


def _checked(name: str, value: Any, variable: str, text: str, merged: Mapping[str, Any]) -> Any:
    """``value`` after the range check an explicit argument gets, its error naming the
    variable (``SHARDED_BROKER_KEY_CONCURRENCY='20000': key_concurrency must be ...``)."""
    try:
        if name in QUEUE_SETTING_NAMES:
            check.queue_settings({name: value})
        elif name == "max_payload_size":
            check.positive_int(value, name, maximum=check.MAX_PAYLOAD_SIZE_LIMIT)
        elif name == "metrics_window":
            metrics_window_option(value)
        elif name == "key_metrics_window":
            key_metrics_window_option(value, merged.get("metrics_window", MAX_METRICS_WINDOW))
    except (ConfigurationError, InvalidArgument, InvalidArgumentType) as exc:
        raise ConfigurationError(f"{variable}={text!r}: {exc}") from None
    return value


def _scheme_or_none(broker_url: str) -> str | None:
    try:
        return scheme(broker_url)
    except InvalidURL:
        return None
