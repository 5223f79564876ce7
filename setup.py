"""Builds the native kernels (csrc/) as ``batchnorm._C`` against the installed torch.

Everything else is declared in pyproject.toml. The build needs torch at build time, so it runs
without pip's build isolation (``pip install --no-build-isolation``, as the Makefile does). Where
no C++ compiler or torch is available, the package installs without the extension and runs on
the Python backends (``batchnorm.backends`` warns once).
"""

from __future__ import annotations

import os
import platform
import sys

from setuptools import setup


def _cpu_flags() -> list[str]:
    """AVX2/FMA vector code when the building machine has it: the extension is built where it
    runs (an editable or local install). ``BATCHNORM_PORTABLE=1`` builds the generic code."""
    if os.environ.get("BATCHNORM_PORTABLE") == "1" or platform.machine() not in ("x86_64", "AMD64"):
        return ["-DCPU_CAPABILITY=DEFAULT"]
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(cpuinfo.read().split())
    except OSError:
        flags = set()
    if {"avx2", "fma"} <= flags:
        return ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _extensions() -> tuple[list[object], dict[str, object]]:
    if os.environ.get("BATCHNORM_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # no torch at build time (an isolated build): pure Python
        return [], {}
    extension = CppExtension(
        "batchnorm._C",
        ["csrc/batch_norm.cpp", "csrc/masked.cpp", "csrc/autograd.cpp"],
        depends=["csrc/common.h"],  # a header change rebuilds every file
        # -fopenmp: at::parallel_for is a header template over `#pragma omp parallel`; without
        # the flag it silently runs on one thread. The library resolves to torch's own libgomp.
        extra_compile_args=["-O3", "-fopenmp", *_cpu_flags()],
        extra_link_args=["-fopenmp"],
        optional=True,  # a failed build (no compiler) installs the package without it
    )
    base = BuildExtension.with_options(use_ninja=False)

    class OptionalBuild(base):  # type: ignore[misc,valid-type]
        """A build that fails (no C++ compiler, a compiler torch rejects) leaves the extension out
        instead of failing the install; batchnorm then warns once and runs its Python kernels."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001 - any build failure means: no native kernels
                print(f"batchnorm: native kernels not built ({type(error).__name__}: {error})", file=sys.stderr)

    return [extension], {"build_ext": OptionalBuild}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
