"""Shared setup for the op benchmarks: the benchmarked shapes and their inputs."""

from __future__ import annotations

from typing import NamedTuple

import torch


class OpCase(NamedTuple):
    """One layer shape: ``n`` samples, ``fan_in`` inputs, ``fan_out`` outputs, ``probes`` gradients."""

    n: int
    fan_in: int
    fan_out: int
    probes: int = 1

    @property
    def id(self) -> str:
        return f"N{self.n}-in{self.fan_in}-out{self.fan_out}-P{self.probes}"

    @property
    def gemm_flops(self) -> int:
        """FLOPs of the two GEMMs (out x N) @ (N x in) that the op's work is equivalent to."""
        return 2 * 2 * self.n * self.fan_in * self.fan_out


CPU_CASES = [OpCase(4096, 1024, 1024), OpCase(16384, 784, 300), OpCase(512, 4096, 4096)]


def make_layer_inputs(case: OpCase, dtype: torch.dtype = torch.float32, seed: int = 0):
    """ReLU-like inputs (non-negative, non-zero mean), gradients and weights for one case."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.fan_in, generator=generator).relu_().to(dtype)
    g = torch.randn(case.n, case.fan_out, generator=generator).to(dtype)
    if case.probes > 1:
        g = torch.randn(case.probes, case.n, case.fan_out, generator=generator).to(dtype)
    weight = torch.randn(case.fan_out, case.fan_in, generator=generator).to(dtype)
    return x, g, weight


def two_matmuls(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The roofline: the two (out x N) @ (N x in) GEMMs of the same shapes, nothing else."""
    sensitivity_t = (g if g.dim() == 2 else g[0]).t()
    return sensitivity_t @ x, sensitivity_t @ x
