"""Sensitivity-weighted moments as a value: the triple the ``ecp::moments`` op returns, and its merge."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Moments(NamedTuple):
    """``s0`` ``(out,)``, ``mean`` and ``m2`` ``(out, in)`` as docs/method.md defines them (sums, not means)."""

    s0: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_part(name: str, part: object) -> Moments:
    """The ``(s0, mean, m2)`` triple passed as argument ``name``, or an error that says what is wrong."""
    if not isinstance(part, (tuple, list)):
        raise TypeError(
            f"merge_moments: argument '{name}' must be an (s0, mean, m2) triple such as Moments, "
            f"got {type(part).__name__}"
        )
    if len(part) != 3:
        raise ValueError(
            f"merge_moments: argument '{name}' must be an (s0, mean, m2) triple, got a "
            f"{type(part).__name__} of length {len(part)}"
        )
    triple = Moments(*part)
    for field, t in zip(Moments._fields, triple, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"merge_moments: '{field}' of argument '{name}' must be a torch.Tensor, got {type(t).__name__}"
            )
        if not t.is_floating_point():
            raise TypeError(f"merge_moments: '{field}' of argument '{name}' must have a floating dtype, got {t.dtype}")
        if t.device != triple.s0.device:
            raise ValueError(
                f"merge_moments: '{field}' of argument '{name}' must be on the same device as its 's0' "
                f"({triple.s0.device}), got {t.device}"
            )
    if triple.mean.dim() < 1:
        raise ValueError(
            f"merge_moments: 'mean' of argument '{name}' must have at least 1 dimension, (..., in), "
            f"got shape {_shape(triple.mean)}"
        )
    if triple.s0.shape != triple.mean.shape[:-1]:
        raise ValueError(
            f"merge_moments: 's0' of argument '{name}' must have the shape of 'mean' without its last "
            f"dimension, {_shape(triple.mean)[:-1]}, got {_shape(triple.s0)}"
        )
    if triple.m2.shape != triple.mean.shape:
        raise ValueError(
            f"merge_moments: 'm2' of argument '{name}' must have the shape of 'mean', {_shape(triple.mean)}, "
            f"got {_shape(triple.m2)}"
        )
    return triple


def merge_moments(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> Moments:
    """Merge the moments of two disjoint sets of samples exactly (Chan et al.'s pairwise form).

    ``S0 = S0a + S0b``, ``d = mean_b - mean_a``, ``mean = mean_a + d S0b / S0`` and
    ``M2 = M2a + M2b + d^2 S0a S0b / S0``. Rows where both parts have ``S0 = 0`` stay zero; rows whose
    ``S0`` overflows to inf are merged without dividing by it (see :func:`_merge_overflowed`). Works on
    any device and floating dtype; ``a`` and ``b`` are ``(s0, mean, m2)`` triples (``Moments`` or
    tuples) of matching shapes on one device. Malformed arguments raise ``TypeError``/``ValueError``
    naming the argument and the field.
    """
    s0_a, mean_a, m2_a = _check_part("a", a)
    s0_b, mean_b, m2_b = _check_part("b", b)
    for name, t_a, t_b in (("s0", s0_a, s0_b), ("mean", mean_a, mean_b), ("m2", m2_a, m2_b)):
        if t_a.shape != t_b.shape:
            raise ValueError(
                f"merge_moments: '{name}' of both parts must have the same shape, got "
                f"{tuple(t_a.shape)} and {tuple(t_b.shape)}"
            )
    if s0_a.device != s0_b.device:
        raise ValueError(f"merge_moments: both parts must be on the same device, got {s0_a.device} and {s0_b.device}")
    s0 = s0_a + s0_b
    # Only empty rows (s0 <= 0) divide by 1 instead; a NaN s0 stays NaN, as in the kernels.
    safe = torch.where(s0 <= 0, torch.ones_like(s0), s0).unsqueeze(-1)
    weight_b = s0_b.unsqueeze(-1) / safe
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta.square() * s0_a.unsqueeze(-1) * weight_b
    # Rows whose S0 overflowed (inf) would get inf / inf = NaN: merge them by the overflow-safe form,
    # made only when there is such a row (merges run once per batch and layer during calibration).
    # A graph being compiled cannot branch on the data: it always makes it, and selects alike.
    overflow = s0.isposinf()
    if not torch.compiler.is_compiling() and not bool(overflow.any()):
        return Moments(s0, mean, m2)
    mean_wide, m2_wide = _merge_overflowed(s0_a, s0_b, mean_a, m2_a, m2_b, delta)
    overflow = overflow.unsqueeze(-1)
    return Moments(s0, torch.where(overflow, mean_wide, mean), torch.where(overflow, m2_wide, m2))


def _merge_overflowed(
    s0_a: torch.Tensor,
    s0_b: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    m2_b: torch.Tensor,
    delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan's ``mean`` and ``M2`` written without ``S0``, for the rows where ``S0a + S0b`` overflowed.

    ``S0b / S0 = 1 / (1 + S0a / S0b)`` and ``S0a S0b / S0`` stay finite for finite parts. A part whose
    own ``S0`` is inf outweighs a finite one entirely; two infinite parts, whose sizes are lost beyond
    the dtype's range, count equally. Between-part spread is zero where the means agree (no 0 * inf).
    """
    a, b = s0_a.unsqueeze(-1), s0_b.unsqueeze(-1)
    both_infinite = a.isinf() & b.isinf()
    weight_b = torch.where(both_infinite, 0.5, 1 / (1 + a / b))
    between = torch.where(a.isinf(), b, a * weight_b)  # S0a S0b / S0, its limit where S0a is inf
    spread = torch.where(delta == 0, 0.0, delta.square() * between)
    return mean_a + delta * weight_b, m2_a + m2_b + spread
