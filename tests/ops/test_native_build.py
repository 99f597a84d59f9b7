"""The native library describes itself (TORCH_LIBRARY in C++), and Python's copy of the schemas agrees.

* The C++ schemas equal :data:`ecp_fast.ops.SCHEMAS`, the strings Python declares when the native
  library is not loaded.
* With ``ECP_FAST_DISABLE_NATIVE=1`` the schemas come from Python and the reference kernels serve.
* CMakeLists.txt builds a library that registers and runs the ops in a process that never imports
  ecp_fast (slow: a full build).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ecp_fast import ops
from ecp_fast.ops import SCHEMAS, _native, reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
native = pytest.mark.skipif(not ops.NATIVE_CPU, reason="the native library is not built or is disabled")


def declared_schemas() -> dict[str, str]:
    """The schemas of the ecp ops as the dispatcher holds them, without the namespace."""
    return {name: str(getattr(torch.ops.ecp, name).default._schema).removeprefix("ecp::") for name in SCHEMAS}


def python_schemas() -> dict[str, str]:
    """:data:`SCHEMAS`, normalised by torch's schema parser the same way."""
    return {
        name: str(torch._C.parse_schema(f"ecp::{schema}")).removeprefix("ecp::") for name, schema in SCHEMAS.items()
    }


@native
def test_cpp_schemas_equal_the_python_ones():
    assert declared_schemas() == python_schemas()
    for name in SCHEMAS:
        # Declared by the C++ library itself, not by the Python fallback.
        assert "register.cpp" in torch._C._dispatch_dump(f"ecp::{name}").splitlines()[2], name


@native
def test_extension_is_built_against_the_limited_api():
    """setup.py builds an abi3 extension: one .so serves every Python >= 3.10 of the same torch."""
    assert ".abi3." in os.path.basename(_native.library_path())


def clang_format() -> str | None:
    """clang-format from the virtual environment (``pip install clang-format``) or the PATH."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "clang-format")
    return beside_python if os.access(beside_python, os.X_OK) else shutil.which("clang-format")


@pytest.mark.skipif(clang_format() is None, reason="clang-format is not installed (pip install clang-format)")
def test_csrc_is_clang_format_clean():
    """The style is .clang-format at the repository root; `clang-format -i csrc/*` fixes a failure."""
    sources = sorted(os.path.join(ROOT, "csrc", name) for name in os.listdir(os.path.join(ROOT, "csrc")))
    finished = subprocess.run(
        [clang_format(), "--dry-run", "--Werror", *sources], capture_output=True, text=True, cwd=ROOT
    )
    assert finished.returncode == 0, finished.stderr[-3000:]


FALLBACK_CHILD = """
import json, torch
import ecp_fast.ops as ops
schemas = {name: str(getattr(torch.ops.ecp, name).default._schema).removeprefix("ecp::") for name in ops.SCHEMAS}
a = torch.randn(9, 4)
error = ""
try:
    ops.gram(a.requires_grad_())
except RuntimeError as caught:
    error = str(caught)
h = ops.gram(a.detach(), None, torch.rand(9))
print(json.dumps({"native": ops.NATIVE_CPU, "schemas": schemas, "error": error, "shape": list(h.shape),
                  "dump": torch._C._dispatch_dump("ecp::gram")}))
"""


def test_fallback_declares_the_schemas_from_python():
    """ECP_FAST_DISABLE_NATIVE=1: SCHEMAS declares the ops, the reference serves, autograd is refused."""
    environment = {**os.environ, "ECP_FAST_DISABLE_NATIVE": "1"}
    finished = subprocess.run(
        [sys.executable, "-c", FALLBACK_CHILD], env=environment, capture_output=True, text=True, timeout=300, check=True
    )
    child = json.loads(finished.stdout.strip().splitlines()[-1])
    assert child["native"] is False
    assert child["schemas"] == python_schemas()
    assert "register.cpp" not in child["dump"]
    assert child["shape"] == [5, 5]
    assert child["error"].startswith("ecp.gram: argument 'a' requires grad, but the ecp ops have no derivative")


# Runs in a fresh interpreter that never imports ecp_fast: the CMake library alone declares the ops
# and provides their CPU kernels and autograd policy.
CMAKE_CHILD = """
import json, sys, torch
library, inputs, output = json.loads(sys.argv[1])
torch.ops.load_library(library)
assert "ecp_fast" not in sys.modules
x, g, weight, sample_weight = torch.load(inputs)
results = {"score": torch.ops.ecp.score(x, g, weight), "gram": torch.ops.ecp.gram(x, g[0], sample_weight)}
try:
    torch.ops.ecp.score(x, g, weight.requires_grad_())
    results["error"] = ""
except RuntimeError as error:
    results["error"] = str(error).splitlines()[0]
OPS = ("moments", "score", "finalize", "gram")
results["schemas"] = {name: str(getattr(torch.ops.ecp, name).default._schema) for name in OPS}
torch.save(results, output)
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_a_self_describing_library(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build), *generator, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run(["cmake", "--build", str(build), "--parallel", "2"], check=True, capture_output=True, text=True)
    library = build / "libecp_fast_cpu.so"
    assert library.exists()

    generator_ = torch.Generator().manual_seed(0)
    x = torch.randn(70, 9, generator=generator_) + 4
    g = torch.randn(2, 70, 5, generator=generator_)
    weight = torch.randn(5, 9, generator=generator_)
    sample_weight = torch.rand(70, generator=generator_)
    torch.save((x, g, weight, sample_weight), tmp_path / "inputs.pt")
    arguments = json.dumps([str(library), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")])
    subprocess.run(
        [sys.executable, "-c", CMAKE_CHILD, arguments],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
        cwd=tmp_path,
    )
    results = torch.load(tmp_path / "out.pt")
    assert {name: schema.removeprefix("ecp::") for name, schema in results["schemas"].items()} == python_schemas()
    assert results["error"].startswith("ecp.score: argument 'weight' requires grad")
    importance, bias_delta = results["score"]
    expected_importance, expected_delta = reference.score(x, g, weight)
    torch.testing.assert_close(importance, expected_importance, rtol=1e-4, atol=1e-5 * float(expected_importance.max()))
    torch.testing.assert_close(bias_delta, expected_delta, rtol=1e-4, atol=1e-5 * float(expected_delta.abs().max()))
    expected_gram = reference.gram(x, g[0], sample_weight)
    torch.testing.assert_close(results["gram"], expected_gram, rtol=1e-5, atol=1e-5 * float(expected_gram.abs().max()))
