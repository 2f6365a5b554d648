"""Make kombu resolve ``sharded+...`` broker URLs in every process, with no import by the app,
and have Celery check a task's ``shard_key`` option when the task is declared.

kombu looks transports up in ``kombu.transport.TRANSPORT_ALIASES`` and has no entry-point
group for third-party transports. ``pip install sharded-broker`` therefore ships a ``.pth``
file (``sharded_broker_kombu_alias.pth``) that runs this module's source at interpreter
start. It imports nothing but ``sys``: it puts a finder at the front of ``sys.meta_path``
that waits for the watched modules to be imported, lets their real loaders run, then
acts on each, and removes itself once every one was seen:

- ``kombu.transport``: adds the ``"sharded"`` alias;
- ``celery.app``: wraps ``Celery.task`` and ``shared_task`` so that a ``shard_key`` that
  names no argument of the task (a typo such as ``shard_key="acount"``), or a ``batch``
  option without ``base=BatchTask``, raises ``ConfigurationError`` when the task is
  declared, as Dramatiq's actor options do, instead of at its first call. Tasks without
  a ``shard_key`` or ``batch`` option are untouched.

Neither kombu nor Celery is imported early; the cost at interpreter start is about
0.3 ms (compiling this source).

The same code is importable as ``sharded_broker.integrations.kombu_alias``; calling
:func:`install` again is harmless.
"""

import sys

ALIAS = "sharded"
TRANSPORT = "sharded_broker.integrations.celery:Transport"
TRANSPORT_MODULE = "kombu.transport"
CELERY_APP_MODULE = "celery.app"
# Marks a wrapped Celery decorator, so that installing twice never wraps twice.
CHECKED = "_sharded_broker_checks_shard_key"
# Marks sharded_broker.integrations.celery.BatchTask and its subclasses.
BATCH_TASK = "_sharded_broker_batch_task"


def register_alias(transport_module) -> None:
    """Add the alias to an imported ``kombu.transport`` (an existing entry is kept)."""
    transport_module.TRANSPORT_ALIASES.setdefault(ALIAS, TRANSPORT)


def check_task_shard_key(fun, options) -> None:
    """Refuse, when a task is declared, a ``shard_key`` task option that can never work:
    not an argument name or a callable, or naming no argument of ``fun`` (unless ``fun``
    takes ``**kwargs``, where the key may arrive by keyword). With ``bind=True`` the
    first argument is the task itself, not one a caller passes.

    Raises ``sharded_broker.ConfigurationError`` naming the task, the option and the
    task's arguments (sharded_broker is imported only then: a valid app imports nothing
    of ours before it connects).
    """
    task_name = options.get("name") or f"{getattr(fun, '__module__', '?')}.{getattr(fun, '__qualname__', fun)}"
    if options.get("batch") is not None:
        import importlib

        from sharded_broker.errors import ConfigurationError

        if not getattr(options.get("base"), BATCH_TASK, False):
            raise ConfigurationError(
                f"task {task_name!r}: the batch option needs base=BatchTask "
                "(from sharded_broker.integrations.celery import BatchTask)"
            )
        # By name: this source also runs from the .pth file, outside its package.
        importlib.import_module("sharded_broker.integrations.celery_batch").check_batch_size(options["batch"], task_name)
    source = options.get("shard_key")
    if source is None or callable(source):
        return
    if not isinstance(source, str) or not source.isidentifier():
        problem = f"shard_key of task {task_name!r} must be an argument name or a callable(args, kwargs), not {source!r}"
    else:
        import inspect

        try:
            parameters = list(inspect.signature(fun).parameters.values())
        except (TypeError, ValueError):
            return  # no signature to check against: checked when a message is published
        if options.get("batch") is not None:
            return  # a batch task takes the batch; its messages pass the key by keyword
        if options.get("bind"):
            parameters = parameters[1:]
        names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if source in names or any(p.kind is p.VAR_KEYWORD for p in parameters):
            return
        problem = (
            f"task {task_name!r} has no argument {source!r} to take its shard key from "
            f"(shard_key={source!r}); its arguments are: {', '.join(names) or '(none)'}"
        )
    from sharded_broker.errors import ConfigurationError

    raise ConfigurationError(problem)


def _checking_shard_key(decorator_factory, takes_self):
    """``decorator_factory`` (``Celery.task`` or ``shared_task``), checking a ``shard_key``
    option against the decorated function before Celery sees it."""

    def factory(*args, **options):
        if "shard_key" not in options and "batch" not in options:
            return decorator_factory(*args, **options)
        given = args[1:] if takes_self else args
        if len(given) == 1 and callable(given[0]):  # @app.task(shard_key=...) applied directly: app.task(fun, ...)
            check_task_shard_key(given[0], options)
            return decorator_factory(*args, **options)
        decorate = decorator_factory(*args, **options)

        def checked(fun):
            check_task_shard_key(fun, options)
            return decorate(fun)

        return checked

    factory.__name__ = decorator_factory.__name__
    factory.__doc__ = decorator_factory.__doc__
    setattr(factory, "__wrapped__", decorator_factory)  # noqa: B010 (what functools.wraps sets)
    setattr(factory, CHECKED, True)
    return factory


def check_celery_tasks(app_module) -> None:
    """Wrap ``Celery.task`` and ``shared_task`` of an imported ``celery.app``."""
    celery_class = app_module.Celery
    if not getattr(celery_class.task, CHECKED, False):
        celery_class.task = _checking_shard_key(celery_class.task, takes_self=True)
    if not getattr(app_module.shared_task, CHECKED, False):
        app_module.shared_task = _checking_shard_key(app_module.shared_task, takes_self=False)


WATCHED = {TRANSPORT_MODULE: register_alias, CELERY_APP_MODULE: check_celery_tasks}


class _RegisteringLoader:
    """Wraps the real loader of ``kombu.transport``: registers the alias once it has run."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace
        WATCHED[module.__name__](module)


class AliasFinder:
    """A ``sys.meta_path`` finder that only ever answers for the modules it still waits for."""

    def __init__(self, waiting) -> None:
        self.waiting = set(waiting)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.waiting:
            return None
        self.waiting.discard(fullname)
        # Out of the way while the real finders look (and for good once nothing is left).
        uninstall()
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec(fullname, path, target) if find_spec is not None else None
                if spec is not None:
                    break
            else:
                return None
        finally:
            if self.waiting:
                sys.meta_path = [self, *sys.meta_path]
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def uninstall() -> None:
    # A new list, not an in-place edit: importlib may be iterating the old one right now.
    sys.meta_path = [f for f in sys.meta_path if type(f).__name__ != AliasFinder.__name__]


def _imported(name: str):
    """The module ``name`` if it is imported and done executing, else None."""
    module = sys.modules.get(name)
    if module is None:
        return None
    ready = hasattr(module, "TRANSPORT_ALIASES") if name == TRANSPORT_MODULE else hasattr(module, "shared_task")
    return module if ready else None


def install() -> None:
    """Act now on each watched module already imported, and on the others when they are."""
    waiting = []
    for name, act in WATCHED.items():
        module = _imported(name)
        if module is not None:
            act(module)
        else:
            waiting.append(name)
    if waiting and not any(type(f).__name__ == AliasFinder.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder(waiting))


if __name__ in ("__main__", "sharded_broker_kombu_alias"):
    install()  # run from the .pth file
