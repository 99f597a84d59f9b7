"""Small networks the test modules build."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


def tanh_mlp(
    sizes: Sequence[int] = (7, 11, 5, 3), seed: int = 0, bias: bool = True, dtype: torch.dtype = torch.float64
) -> nn.Sequential:
    """Linear layers of ``sizes`` with tanh between them, seeded initialisation, in ``dtype``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if index < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)
