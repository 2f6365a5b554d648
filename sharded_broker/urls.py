"""Broker URLs: parsing, the SQLite file a URL names, and redaction for display.

The bottom layer: it imports nothing of the package but its errors, so the engine, the
backends, the command line and the adapters all read URLs the same way (docs/design.md,
"Layers").
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from .errors import InvalidURL

# A Redis Cluster URL's scheme -> that of a URL for one of its nodes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Celery names the transport sharded+redis://; the engine wants the plain redis:// URL.
CELERY_URL_PREFIX = "sharded+"
# Shorter pieces of a URL's user:password part are not masked in error reasons (they
# would mask ordinary words); the whole part always is.
MIN_MASKED_PIECE = 3


def scheme(url: str) -> str:
    """The scheme of a broker URL (``redis``, ``sqlite``, ...); InvalidURL when ``url`` is
    not a str or not of the form ``scheme://...``."""
    if not isinstance(url, str):
        raise InvalidURL(f"broker URL must be a str, not {type(url).__name__}")
    try:
        found = urlsplit(url).scheme
    except ValueError as exc:
        raise InvalidURL(f"malformed broker URL: {exc}") from None
    if "://" not in url or not found:
        raise InvalidURL(
            f"malformed broker URL {redact_url(url)!r}: expected scheme://..., e.g. redis://localhost:6379/0"
        )
    return found


def engine_url(url: str) -> str:
    """The engine URL for ``url``: Celery's ``sharded+redis://...`` becomes ``redis://...``."""
    return url[len(CELERY_URL_PREFIX):] if url.startswith(CELERY_URL_PREFIX) else url


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to log."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            if "@" in url and "@" not in parts.netloc:
                # Not parsed as scheme://user:password@host (a missing "://", or a "#" or
                # "?" in the password ending the netloc early): hide everything before
                # the host rather than guess where a password ends.
                return "***@" + url.rpartition("@")[2]
            return url
        netloc = parts.netloc.rpartition("@")
        user = parts.username or ""
        return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()
    except ValueError:
        return "<malformed URL>"


def scrub(text: str, url: str | None) -> str:
    """``text`` on one line, with ``url``'s password (if any) masked, in both spellings:
    as written in the URL (percent-encoded) and as a client uses it."""
    try:
        password = urlsplit(url).password if url else None
    except ValueError:
        password = None
    for spelling in {password, unquote(password)} if password else ():
        text = text.replace(spelling, "***")
    return " ".join(text.split())


def sqlite_path(url: str) -> str | None:
    """The file a well-formed ``sqlite:///relative.db`` / ``sqlite:////absolute.db`` URL
    names, as written (relative paths are relative to the current directory); None for
    other URLs and for malformed ones, which :func:`sqlite_file` refuses precisely."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme != "sqlite" or parts.netloc or parts.query or not parts.path.startswith("/"):
        return None
    return unquote(parts.path[1:]) or None


def sqlite_file(url: str, options: tuple[str, ...]) -> str:
    """The file a ``sqlite://`` URL names, or InvalidURL saying how to write one (``options``:
    the backend's keyword options, named when the URL carries a query string)."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise InvalidURL(
            f"sqlite URL takes no query string ({url!r}); pass options as keyword arguments: {', '.join(options)}"
        )
    if parts.netloc:
        raise InvalidURL(
            f"sqlite URL {url!r} names a host; write sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if not path:
        raise InvalidURL(
            f"sqlite URL {url!r} has no file path; write sqlite:///relative.db or sqlite:////absolute/path.db "
            "(for an in-process store without a file, use memory://)"
        )
    if path == ":memory:" or path.startswith("file:"):
        raise InvalidURL(
            f"sqlite URL {url!r} must name a file; for an in-process store use memory://"
        )
    return path


def display_url(url: str) -> str:
    """``url`` as logs, banners and the command line show it: no password, and a SQLite
    file by its absolute path (``sqlite:////abs/queue.db``), so a relative path shows
    where it led in this process."""
    path = sqlite_path(url)
    return f"sqlite:///{os.path.abspath(path)}" if path else redact_url(url)


def relative_path_hint(url: str) -> str | None:
    """For a ``sqlite:///`` URL with a relative path, how it was read and how to write an
    absolute one (None otherwise): appended to errors about the file."""
    path = sqlite_path(url)
    if path is None or os.path.isabs(path):
        return None
    return (
        f"sqlite:///{path} is relative to the current directory {os.getcwd()}; "
        f"an absolute path takes four slashes: sqlite:////{path} names /{path}"
    )


def relative_path_warning(url: str) -> str | None:
    """A warning for a ``sqlite:///`` URL with a relative path (None otherwise): two
    processes started in different directories would use two different files, so two
    queues, without a word. Adapters log it once per process that consumes."""
    path = sqlite_path(url)
    if path is None or os.path.isabs(path):
        return None
    absolute = os.path.abspath(path)
    return (
        f"broker URL {url} is relative to the current directory: this process uses {absolute}. "
        f"A producer or worker started in another directory uses another file, so another queue; "
        f"write sqlite:///{absolute} (four slashes: an absolute path) to be sure"
    )


def check_redis_url(url: str) -> None:
    """Refuse a malformed redis URL as a URL problem, before any option is looked at.

    redis-py's reason may quote part of the password (a password with a "#" or "?" is
    split there and its start taken for a port): every piece of the URL's
    ``user:password`` part is masked in it."""
    import redis.connection  # only for redis:// URLs: memory:// and sqlite:// need no redis-py

    try:
        redis.connection.parse_url(url)
    except ValueError as exc:
        reason = str(exc)
        after_scheme = url.partition("://")[2]
        userinfo = after_scheme.rpartition("@")[0]
        pieces = {userinfo, *(piece for piece in re.split(r"[:#?/]", userinfo) if len(piece) >= MIN_MASKED_PIECE)}
        for piece in sorted(pieces - {""}, key=len, reverse=True):
            reason = reason.replace(piece, "***").replace(unquote(piece), "***")
        if userinfo and "@" not in urlsplit(url).netloc:
            reason += "; a '#', '?' or '/' in a user name or password must be percent-encoded (%23, %3F, %2F)"
        raise InvalidURL(f"malformed redis URL {redact_url(url)!r}: {reason}") from None


def cluster_parts(url: str) -> tuple[str, list[tuple[str, int]]]:
    """For a ``redis+cluster://`` URL: the one-server URL of its first node (same scheme
    without ``+cluster``, credentials and query; redis-py reads its options from it) and
    every ``(host, port)`` it names. InvalidURL naming what is wrong."""
    safe = redact_url(url)
    parts = urlsplit(url)
    plain_scheme = CLUSTER_SCHEMES.get(parts.scheme)
    if plain_scheme is None:
        raise InvalidURL(f"not a Redis Cluster URL: {safe!r} (expected redis+cluster:// or rediss+cluster://)")
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for address in hosts.split(","):
        name, sep, number = address.strip().rpartition(":")
        if not sep or not name or not number.isdigit() or not 0 < int(number) < 65536:
            raise InvalidURL(
                f"bad node address {address!r} in {safe!r}: each node is host:port, "
                "e.g. redis+cluster://10.0.0.1:7000,10.0.0.2:7000"
            )
        nodes.append((name.strip("[]"), int(number)))
    if parts.path not in ("", "/", "/0"):
        raise InvalidURL(f"a Redis Cluster has only database 0: {safe!r} names {parts.path[1:]!r}")
    if parts.fragment:
        raise InvalidURL(f"a Redis Cluster URL takes no fragment: {safe!r}")
    host, port = nodes[0]
    host_part = f"[{host}]" if ":" in host else host
    netloc = f"{credentials}@{host_part}:{port}" if credentials else f"{host_part}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{plain_scheme}://{netloc}/0{query}", nodes


def with_connection_parts(
    url: str, *, user: str | None, password: str | None, port: int | None, vhost: str | None
) -> str:
    """A ``redis://`` / ``rediss://`` URL completed by parts given apart from it (Celery's
    ``broker_user``, ``broker_password``, ``broker_port``, ``broker_vhost``) where the URL
    leaves them out; a Redis Cluster URL by the credentials only (each node has its port,
    and a cluster has database 0 only); other URLs unchanged."""
    parts = urlsplit(url)
    cluster = parts.scheme in CLUSTER_SCHEMES
    if parts.scheme not in ("redis", "rediss") and not cluster:
        return url
    netloc = parts.netloc
    if "@" not in netloc and (user or password):
        credentials = quote(user or "", safe="")
        if password:
            credentials += ":" + quote(password, safe="")
        netloc = f"{credentials}@{netloc}"
    if cluster:
        return urlunsplit(parts._replace(netloc=netloc))
    if port and parts.port is None and netloc:
        netloc = f"{netloc}:{port}"
    path = parts.path
    database = str(vhost or "").strip("/")
    if path in ("", "/") and database:
        path = "/" + database
    return urlunsplit(parts._replace(netloc=netloc, path=path))


def redis_address(url: str) -> tuple[str, int, float | None] | None:
    """(host, port, socket_connect_timeout or None) of a ``redis://`` / ``rediss://`` URL as
    redis-py reads it; None for a URL it refuses."""
    import redis.connection  # only for redis:// URLs

    try:
        parsed = redis.connection.parse_url(url)
    except ValueError:
        return None
    timeout = parsed.get("socket_connect_timeout")
    return parsed.get("host") or "localhost", int(parsed.get("port") or 6379), float(timeout) if timeout else None
