"""Build hook: ship ``sharded_broker_kombu_alias.pth`` next to the package.

The metadata lives in pyproject.toml; this file only adds the ``build_pth`` step, which
writes the ``.pth`` file that lets kombu resolve ``sharded+...`` broker URLs in every
process without the app importing anything (see integrations/kombu_alias.py). It works for
``pip install .`` (the file lands in build_lib, the root of the wheel) and for
``pip install -e .`` (setuptools assembles an editable wheel from the install directory).
"""

import os

from setuptools import Command, setup
from setuptools.command.build import build

PTH_NAME = "sharded_broker_kombu_alias.pth"
HOOK_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "integrations", "kombu_alias.py")


def pth_line() -> str:
    """One ``import`` line (site.py runs only those) executing the hook's source."""
    with open(HOOK_SOURCE, encoding="utf-8") as f:
        source = f.read()
    return (
        f"import sys; exec(compile({source!r}, {PTH_NAME!r}, 'exec'), "
        "{'__name__': 'sharded_broker_kombu_alias'})\n"
    )


class build_pth(Command):
    description = "write the .pth file registering the sharded+ kombu transport alias"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False
        self.outputs: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self) -> None:
        # An editable wheel is assembled from the install directory, not from build_lib.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(target, exist_ok=True)
        path = os.path.join(target, PTH_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(pth_line())
        self.outputs = [path]

    def get_outputs(self) -> list:
        return self.outputs

    def get_output_mapping(self) -> dict:
        return {}


class build_with_pth(build):
    sub_commands = build.sub_commands + [("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})
