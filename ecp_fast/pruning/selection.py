"""Selection: which weights a scope removes to reach a sparsity, and the schedule of several steps.

A scope compares importances within all layers (``global``), one layer (``layer``), one output
neuron (``row``) or ``m`` consecutive inputs of a neuron (``N:M``). Already removed weights are never
selected again and count toward the target. :meth:`~ecp_fast.pruning.pruner.Pruner.prune` and
:func:`~ecp_fast.training.iterative_prune` share :func:`prune_count`; ``steps=k`` of the former
follows :func:`step_sparsities`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

SCOPES = ("global", "layer", "row")
DEFAULT_SPARSITY = 0.9


# ---- scope ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """``kind`` is one of :data:`SCOPES` or ``"n:m"`` (keep ``n`` of every ``m`` consecutive inputs)."""

    kind: str
    n: int = 0
    m: int = 0


def parse_scope(scope: str) -> Scope:
    """``"global"``, ``"layer"``, ``"row"`` or an ``"N:M"`` pattern such as ``"2:4"``."""
    if not isinstance(scope, str):
        raise TypeError(f"argument 'scope' must be a string, got {type(scope).__name__}")
    if scope in SCOPES:
        return Scope(scope)
    if ":" in scope:
        parts = scope.split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"argument 'scope': an N:M pattern must be two integers such as '2:4', got {scope!r}")
        n, m = (int(part) for part in parts)
        if not 0 < n < m:
            raise ValueError(f"argument 'scope': an N:M pattern needs 0 < N < M, got N={n}, M={m} in {scope!r}")
        return Scope("n:m", n, m)
    raise ValueError(
        f"argument 'scope' must be one of {SCOPES}, 'neuron' or an N:M pattern such as '2:4', got {scope!r}"
    )


def resolve_sparsity(sparsity: float | None, scope: Scope) -> float:
    """The target sparsity: checked, defaulted (0.9), or implied by an N:M scope."""
    # numbers.Real: Python and NumPy numbers alike (np.float32 is no float subclass); bool is not a sparsity
    if sparsity is not None and (isinstance(sparsity, (bool, np.bool_)) or not isinstance(sparsity, numbers.Real)):
        raise TypeError(f"argument 'sparsity' must be a float in [0, 1) or None, got {type(sparsity).__name__}")
    if scope.kind == "n:m":
        implied = 1 - scope.n / scope.m
        if sparsity is not None and not math.isclose(float(sparsity), implied, abs_tol=1e-9):
            raise ValueError(
                f"argument 'sparsity': scope '{scope.n}:{scope.m}' prunes exactly {implied:g} of the weights, "
                f"got sparsity={sparsity}; pass sparsity=None or {implied:g}"
            )
        return implied
    if sparsity is None:
        return DEFAULT_SPARSITY
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"argument 'sparsity' must be in [0, 1), got {sparsity}")
    return float(sparsity)


# ---- selection -------------------------------------------------------------------------------------


def _pick_smallest(scores: torch.Tensor, available: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Along the last dimension, mark the ``count`` smallest available scores (ties: first index).

    ``scores``, ``available`` ``(..., K)``; ``count`` ``(...)``. Returns a bool tensor like ``scores``.
    """
    ranked = torch.where(available, scores.to(torch.float64), torch.inf)
    order = torch.argsort(ranked, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < count.unsqueeze(-1)) & available


def _pick_smallest_flat(scores: torch.Tensor, available: torch.Tensor, count: int) -> torch.Tensor:
    """1-D: mark exactly ``min(count, available)`` smallest available scores (ties in any fixed order).

    ``topk`` on the smaller side (removed or kept) instead of a full sort: pruning 90% of a large
    model selects the 10% to keep.
    """
    selected = torch.zeros_like(available)
    free = int(available.sum())
    count = min(count, free)
    if count <= 0:
        return selected
    values = scores.to(torch.float64)
    if count <= free - count:
        return _top(torch.where(available, values, torch.inf), count, largest=False)
    if free - count == 0:
        return available.clone()
    return available & ~_top(torch.where(available, values, -torch.inf), free - count, largest=True)


def _top(values: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """Bool mask of the ``count`` largest (or smallest) of 1-D ``values``: the set ``torch.topk`` picks.

    On CPU a linear-time partition finds the threshold (ten times faster than ``topk`` on 266k
    scores); where ties at the threshold leave the choice open, or a NaN is present, ``topk`` decides,
    so the set is always the one ``topk`` returns.
    """
    if values.device.type == "cpu" and 0 < count < values.numel():
        array = (values if largest else -values).numpy()
        threshold = np.partition(array, array.size - count)[array.size - count]
        chosen = array >= threshold
        if int(chosen.sum()) == count and not np.isnan(array).any():
            return torch.from_numpy(chosen)
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    mask[torch.topk(values, count, largest=largest, sorted=False).indices] = True
    return mask


def select_weights(
    scores: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor], sparsity: float, scope: Scope
) -> dict[str, torch.Tensor]:
    """Weights to remove now (bool ``(out, in)`` per layer) so that the scope reaches ``sparsity``.

    ``keep`` marks weights still present; already removed ones are never selected again and count
    toward the target. Importances are compared within the scope: all layers (``global``), one layer
    (``layer``), one output neuron (``row``) or ``m`` consecutive inputs of a neuron (``n:m``).
    """
    selected: dict[str, torch.Tensor] = {}
    if scope.kind == "global":
        names = list(scores)
        total = sum(keep[name].numel() for name in names)
        already = sum(int((~keep[name]).sum()) for name in names)
        count = prune_count(total, already, sparsity)
        flat_scores = torch.cat([scores[name].reshape(-1).to(torch.float64) for name in names])
        flat_keep = torch.cat([keep[name].reshape(-1) for name in names])
        flat = _pick_smallest_flat(flat_scores, flat_keep, count)
        offset = 0
        for name in names:
            size = keep[name].numel()
            selected[name] = flat[offset : offset + size].reshape(keep[name].shape)
            offset += size
        return selected
    for name, score in scores.items():
        available = keep[name]
        if scope.kind == "layer":
            count = prune_count(available.numel(), int((~available).sum()), sparsity)
            selected[name] = _pick_smallest_flat(score.reshape(-1), available.reshape(-1), count).reshape(
                available.shape
            )
        elif scope.kind == "row":
            per_row = available.shape[1]
            counts = (target_count(per_row, sparsity) - (~available).sum(dim=1)).clamp_min(0)
            selected[name] = _pick_smallest(score, available, counts)
        else:
            fan_out, fan_in = available.shape
            if fan_in % scope.m:
                raise ValueError(
                    f"argument 'scope': pattern {scope.n}:{scope.m} needs the input size of layer {name!r} to be a "
                    f"multiple of {scope.m}, got {fan_in}"
                )
            groups = (fan_out, fan_in // scope.m, scope.m)
            group_keep = available.reshape(groups)
            counts = ((scope.m - scope.n) - (~group_keep).sum(dim=-1)).clamp_min(0)
            selected[name] = _pick_smallest(score.reshape(groups), group_keep, counts).reshape(available.shape)
    return selected


# ---- schedule ---------------------------------------------------------------------------------------


def target_count(total: int, sparsity: float) -> int:
    """Weights of a scope of ``total`` that ``sparsity`` removes: the nearest count, but a sparsity below 1
    leaves at least one (rounding up to all of a small row or layer would empty it, which no sparsity
    below 1 asks for)."""
    count = min(int(round(sparsity * total)), total)
    return min(count, total - 1) if 0 < total and sparsity < 1 else count


def prune_count(total: int, already: int, sparsity: float) -> int:
    """Weights still to remove so that ``sparsity`` of ``total`` are removed (``already`` are)."""
    return max(0, target_count(total, sparsity) - already)


def step_sparsities(initial_density: float, target: float, steps: int) -> list[float]:
    """Sparsity after each of ``steps`` steps: the remaining density falls geometrically to ``1 - target``.

    The last step reaches ``target`` exactly. A model already sparser than the target takes ``target``
    at every step: per layer or row it prunes only where ``target`` asks (its overall sparsity would
    prune every layer and row below it to that sparsity), and globally nothing.
    """
    final_density = 1.0 - target
    sparsities = []
    for step in range(1, steps + 1):
        if step == steps:
            sparsities.append(target)
        elif initial_density > final_density:
            sparsities.append(1.0 - initial_density * (final_density / initial_density) ** (step / steps))
        else:
            sparsities.append(target)
    return sparsities
