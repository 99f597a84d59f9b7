"""Builds the native CPU kernels (csrc/) as ecp_fast/_C with torch's extension tooling and ninja.

Install with ``pip install --no-build-isolation -e .`` so the build uses the environment's torch
(the extension must be compiled against the exact torch it is loaded into).
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))

# -fopenmp: at::parallel_for is header-inlined and only runs in parallel when OpenMP is on.
extra_compile_args = ["-O3", "-fopenmp", "-std=c++17"]
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
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
