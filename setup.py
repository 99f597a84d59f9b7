"""Builds the native CPU kernels (csrc/) as ecp_fast/_C with torch's extension tooling and ninja.

Install with ``pip install --no-build-isolation -e .`` so the build uses the environment's torch
(the extension must be compiled against the exact torch it is loaded into).

As in pytorch/extension-cpp, the extension uses no Python C API at all: it is a plain shared library
that registers the ``ecp`` ops (schemas and kernels) and is loaded with ``torch.ops.load_library``.
It is therefore built against the limited Python API (``py_limited_api=True``, an ``abi3`` wheel):
torch's tooling then defines ``Py_LIMITED_API`` (Python 3.10's) and drops libtorch_python, so any
accidental use of the full API fails to compile or link.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
# -fopenmp: at::parallel_for is header-inlined and only runs in parallel when OpenMP is on. No -std
# flag: torch's extension tooling adds the standard its headers need (C++20 for torch 2.13).
extra_compile_args = ["-O3", "-fopenmp"]
if os.environ.get("ECP_FAST_NATIVE_ARCH") == "1":
    extra_compile_args.append("-march=native")

setup(
    ext_modules=[
        CppExtension(
            name="ecp_fast._C",
            sources=sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp"))),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # cp310: the Py_LIMITED_API version that torch defines for py_limited_api extensions.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
