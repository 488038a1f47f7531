"""Metadata lives in pyproject.toml; this file adds one build step.

The kernel modules of `fastprerl.kernels` live in the top-level `kernels/` folder (see
fastprerl/kernels/__init__.py for why that folder has no `__init__.py`). A wheel has them where an installed
package needs them: next to `fastprerl/kernels/__init__.py`. An editable install needs no copy: the package
finds the folder itself.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib, "fastprerl", "kernels")
        for source in sorted(Path(__file__).parent.joinpath("kernels").glob("*.py")):
            self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": BuildPyWithKernels})
