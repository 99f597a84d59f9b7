"""Sensitivity-weighted moments as a value: the triple the ``ecp::moments`` op returns, and its merge."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Moments(NamedTuple):
    """``s0`` ``(out,)``, ``mean`` and ``m2`` ``(out, in)`` as METHOD.md defines them (sums, not means)."""

    s0: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def merge_moments(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> Moments:
    """Merge the moments of two disjoint sets of samples exactly (Chan et al.'s pairwise form).

    ``S0 = S0a + S0b``, ``d = mean_b - mean_a``, ``mean = mean_a + d S0b / S0`` and
    ``M2 = M2a + M2b + d^2 S0a S0b / S0``. Rows where both parts have ``S0 = 0`` stay zero. Works on
    any device and dtype; ``a`` and ``b`` are ``(s0, mean, m2)`` triples of matching shapes.
    """
    s0_a, mean_a, m2_a = a
    s0_b, mean_b, m2_b = b
    for name, t_a, t_b in (("s0", s0_a, s0_b), ("mean", mean_a, mean_b), ("m2", m2_a, m2_b)):
        if t_a.shape != t_b.shape:
            raise ValueError(
                f"merge_moments: '{name}' of both parts must have the same shape, got "
                f"{tuple(t_a.shape)} and {tuple(t_b.shape)}"
            )
    s0 = s0_a + s0_b
    safe = torch.where(s0 > 0, s0, torch.ones_like(s0)).unsqueeze(-1)
    weight_b = (s0_b.unsqueeze(-1) / safe)
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta.square() * s0_a.unsqueeze(-1) * weight_b
    return Moments(s0, mean, m2)
