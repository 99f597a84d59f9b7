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


class GramCase(NamedTuple):
    """One Gram shape: ``n`` samples of ``fan_in`` features; ``cross`` adds a second stream ``b``."""

    n: int
    fan_in: int
    cross: bool = False
    weighted: bool = False

    @property
    def id(self) -> str:
        return f"N{self.n}-in{self.fan_in}" + ("-cross" if self.cross else "") + ("-weighted" if self.weighted else "")


# The shapes of the target (at most 1.15x one torch.mm of the same shapes), b = a and b given.
GRAM_CASES = [
    GramCase(n, fan_in, cross, weighted)
    for n, fan_in in ((4096, 1024), (16384, 784))
    for cross in (False, True)
    for weighted in (False, True)
]


def make_gram_inputs(case: GramCase, dtype: torch.dtype = torch.float32, seed: int = 0):
    """ReLU-like ``a``, an independent ``b`` when ``case.cross``, positive weights when ``case.weighted``."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(case.n, case.fan_in, generator=generator).relu_().to(dtype)
    b = torch.randn(case.n, case.fan_in, generator=generator).to(dtype) if case.cross else None
    weight = torch.rand(case.n, generator=generator).to(dtype) if case.weighted else None
    return a, b, weight


def one_matmul(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The roofline of ``ecp::gram``: the single ``torch.mm(a.T, b)`` (``b = a`` when None)."""
    return torch.mm(a.T, a if b is None else b)
