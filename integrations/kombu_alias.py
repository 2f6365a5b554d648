"""Make kombu resolve ``sharded+...`` broker URLs in every process, with no import by the app.

kombu looks transports up in ``kombu.transport.TRANSPORT_ALIASES`` and has no entry-point
group for third-party transports. ``pip install sharded-broker`` therefore ships a ``.pth``
file (``sharded_broker_kombu_alias.pth``) that runs this module's source at interpreter
start. It imports nothing but ``sys``: it puts a finder at the front of ``sys.meta_path``
that waits for ``kombu.transport`` to be imported, lets the real loader run, then adds
the ``"sharded"`` alias and removes itself. kombu is never imported early; the cost at
interpreter start is about 0.3 ms (compiling this source).

The same code is importable as ``sharded_broker.integrations.kombu_alias``; calling
:func:`install` again is harmless.
"""

import sys

ALIAS = "sharded"
TRANSPORT = "sharded_broker.integrations.celery:Transport"
WATCHED_MODULE = "kombu.transport"


def register_alias(transport_module) -> None:
    """Add the alias to an imported ``kombu.transport`` (an existing entry is kept)."""
    transport_module.TRANSPORT_ALIASES.setdefault(ALIAS, TRANSPORT)


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
        register_alias(module)


class AliasFinder:
    """A ``sys.meta_path`` finder that only ever answers for ``kombu.transport``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != WATCHED_MODULE:
            return None
        uninstall()  # one shot; also keeps the lookup below from finding this finder again
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def uninstall() -> None:
    # A new list, not an in-place edit: importlib may be iterating the old one right now.
    sys.meta_path = [f for f in sys.meta_path if type(f).__name__ != AliasFinder.__name__]


def install() -> None:
    """Register now if ``kombu.transport`` is already imported, else when it is."""
    module = sys.modules.get(WATCHED_MODULE)
    if module is not None and hasattr(module, "TRANSPORT_ALIASES"):
        register_alias(module)
        return
    if not any(type(f).__name__ == AliasFinder.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())


if __name__ in ("__main__", "sharded_broker_kombu_alias"):
    install()  # run from the .pth file
