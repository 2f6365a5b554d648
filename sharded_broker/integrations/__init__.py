"""``sharded_broker.integrations`` from a source checkout: the adapters' source is the
top-level ``integrations/`` folder (the layout of the product contract).

An installed package maps that folder to this name (``package-dir`` in pyproject.toml) and
does not ship this file. A checkout on ``sys.path`` (``PYTHONPATH=.``) finds this file
instead, which points the package's ``__path__`` at ``integrations/`` and runs that
folder's ``__init__.py``, so ``import sharded_broker.integrations.dramatiq`` and
``sharded_broker.integrations.celery`` load the very same source in both cases, and no
package named plain ``integrations`` is ever importable.
"""

from pathlib import Path

_SOURCE = Path(__file__).resolve().parent.parent.parent / "integrations"
__path__ = [str(_SOURCE)]
_INIT = _SOURCE / "__init__.py"
exec(compile(_INIT.read_text(encoding="utf-8"), str(_INIT), "exec"))
