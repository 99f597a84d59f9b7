"""CMakeLists.txt still configures and builds the CPU kernels, and the library it builds works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ecp_fast.ops import reference
from ecp_fast.ops import SCHEMAS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh interpreter that never imports ecp_fast: the CMake library alone provides the CPU
# kernels there, behind the same schemas.
CHILD = """
import json, sys, torch
schemas, library, inputs, output = json.loads(sys.argv[1])
lib = torch.library.Library("ecp", "DEF")
for schema in schemas:
    lib.define(schema)
torch.ops.load_library(library)
x, g, weight = torch.load(inputs)
torch.save(torch.ops.ecp.score(x, g, weight), output)
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_a_working_library(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build), *generator, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        check=True, capture_output=True, text=True,
    )
    subprocess.run(["cmake", "--build", str(build), "--parallel", "2"], check=True, capture_output=True, text=True)
    library = build / "libecp_fast_cpu.so"
    assert library.exists()

    generator_ = torch.Generator().manual_seed(0)
    x = torch.randn(70, 9, generator=generator_) + 4
    g = torch.randn(2, 70, 5, generator=generator_)
    weight = torch.randn(5, 9, generator=generator_)
    torch.save((x, g, weight), tmp_path / "inputs.pt")
    arguments = json.dumps([list(SCHEMAS.values()), str(library), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")])
    subprocess.run([sys.executable, "-c", CHILD, arguments], check=True, capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": ""})
    importance, bias_delta = torch.load(tmp_path / "out.pt")
    expected_importance, expected_delta = reference.score(x, g, weight)
    torch.testing.assert_close(importance, expected_importance, rtol=1e-4, atol=1e-5 * float(expected_importance.max()))
    torch.testing.assert_close(bias_delta, expected_delta, rtol=1e-4, atol=1e-5 * float(expected_delta.abs().max()))
