"""The adapters' layout (product contract, "Layout"): source in the top-level integrations/
folder, importable as ``sharded_broker.integrations.*`` both from a plain checkout and from
an installed package, and never as a plain ``integrations`` package in site-packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ("celery", "dramatiq", "kombu_alias", "pytest_plugin")

# Prints where each adapter module was loaded from, and whether a plain "integrations"
# package is importable, as "name=path" lines.
PROBE = f"""
import importlib, importlib.util
import sharded_broker.integrations as package
print("package=" + package.__path__[0])
for name in {ADAPTERS!r}:
    print(name + "=" + importlib.import_module("sharded_broker.integrations." + name).__file__)
print("plain=" + str(importlib.util.find_spec("integrations")))
"""


def _probe(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, str]:
    """Run ``command`` (a Python interpreter and its ``-c`` code) and parse PROBE's lines."""
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.splitlines())


def _env_without_pythonpath() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_a_plain_checkout_on_pythonpath_imports_the_adapters(tmp_path: Path) -> None:
    # -S: no site initialisation, so neither the editable install's finder nor any .pth
    # file runs: only the checkout (PYTHONPATH) and, appended by hand, the third-party
    # packages the adapters import.
    site_packages = sysconfig.get_paths()["purelib"]
    env = _env_without_pythonpath() | {"PYTHONPATH": str(ROOT)}
    found = _probe([sys.executable, "-S", "-c", f"import sys; sys.path.append({site_packages!r})\n{PROBE}"], env, tmp_path)
    assert found["package"] == str(ROOT / "integrations")
    for name in ADAPTERS:
        assert found[name] == str(ROOT / "integrations" / f"{name}.py")


def test_the_installed_package_maps_the_adapters_and_no_plain_integrations(tmp_path: Path) -> None:
    # The project's own virtualenv (make venv: pip install -e .), without the checkout on
    # the path: a user's view of the install.
    found = _probe([sys.executable, "-c", PROBE], _env_without_pythonpath(), tmp_path)
    for name in ADAPTERS:
        assert Path(found[name]).resolve() == ROOT / "integrations" / f"{name}.py"
    assert found["plain"] == "None"


def test_the_wheel_ships_the_adapters_under_sharded_broker_only(tmp_path: Path) -> None:
    # Built from a copy: pip builds in the source tree, and a build/ left by an earlier
    # build would ship files since removed.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "results",
    ))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--quiet", "--wheel-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("sharded_broker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if name.startswith("integrations/")]
    for name in ("__init__", *ADAPTERS):
        assert f"sharded_broker/integrations/{name}.py" in names
    # The installed package's __init__ is the adapters' own, not the checkout's pointer.
    shipped = zipfile.ZipFile(wheel).read("sharded_broker/integrations/__init__.py")
    assert shipped == (ROOT / "integrations" / "__init__.py").read_bytes()
