"""Builds idefix's optional native kernels, idefix/native/kernels.c (everything else is in pyproject.toml).

Where it cannot be built (no C compiler, not Linux on x86-64) the install goes on without it, and idefix uses
its PyTorch kernels (idefix/quant/linear.py says which kernel serves which type).
"""

import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        for ext in self.extensions:  # an editable install copies the library into the source tree, folder and all
            Path(*ext.name.split(".")[:-1]).mkdir(parents=True, exist_ok=True)
        super().run()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # a missing compiler, or one without OpenMP or AVX-512 intrinsics
            print(f"idefix: the native kernel {ext.name} was not built ({error}); the PyTorch kernels serve instead")


NATIVE = sys.platform.startswith("linux") and platform.machine() == "x86_64"
KERNELS = [
    Extension(
        # In a folder without __init__.py: a plain shared library, not a module, so that nothing that walks
        # idefix's packages (pkgutil) mistakes it for one and tries to import it.
        "idefix.native._lib.kernels",
        sources=["idefix/native/kernels.c"],
        # -ffp-contract=off: a product and a sum stay two roundings unless a kernel writes out a fused multiply-add
        # (GCC would otherwise fuse them behind the code's back, and the rounding the comments promise would not hold).
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_link_args=["-fopenmp"],
    )
]
setup(ext_modules=KERNELS if NATIVE else [], cmdclass={"build_ext": OptionalBuildExt})
