"""The package's layers (docs/design.md, "Layers"): what importing the engine loads, and
which module may import which."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sharded_broker"


def test_importing_the_engine_or_its_collector_loads_neither_click_nor_rich() -> None:
    # A fresh interpreter: this test process may have the CLI loaded already.
    code = (
        "import sharded_broker, sharded_broker.prometheus, sys; "
        "assert 'click' not in sys.modules and 'rich' not in sys.modules, "
        "sorted(name for name in ('click', 'rich') if name in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _package_imports(path: Path) -> set[str]:
    """The modules of the package that ``path`` imports, as dotted names under sharded_broker."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rpartition(".")[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            names = [name] if node.module else [f"{name}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("sharded_broker"))
    return found


def _imports_of(relative: str) -> set[str]:
    return _package_imports(PACKAGE / relative)


def test_the_url_module_imports_only_the_errors() -> None:
    assert _imports_of("urls.py") == {"sharded_broker.errors"}


def test_backends_import_neither_the_engine_facade_nor_the_command_line() -> None:
    upward = {"sharded_broker.broker", "sharded_broker.cli", "sharded_broker.prometheus"}
    for path in (PACKAGE / "backends").rglob("*.py"):
        assert not _package_imports(path) & upward, path


def test_nothing_but_the_entry_point_imports_the_command_line() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name != "cli.py":
            assert "sharded_broker.cli" not in _package_imports(path), path


def test_the_asyncio_api_sits_on_the_engine_and_nothing_below_imports_it() -> None:
    # aio.py awaits Broker's steps: it imports the engine, never the other way round, and
    # it alone reaches the asyncio Redis executor.
    assert "sharded_broker.broker" in _imports_of("aio.py")
    for path in PACKAGE.rglob("*.py"):
        if path.name != "aio.py":
            assert "sharded_broker.aio" not in _package_imports(path), path
            assert "sharded_broker.backends.redis_asyncio" not in _package_imports(path), path
