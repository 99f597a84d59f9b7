"""Allocation: how a total sparsity is split across layers.

* ``"uniform"``: every layer at the total sparsity.
* ``"global"``: one ranking of a registered importance over all layers (the layers' shares follow).
* ``"search"``: a small set of candidate splits, each pruned and scored by the divergence between
  the dense and the pruned model's outputs on the calibration batches (KL for classifiers, mean
  squared error otherwise); never labels or test data. The candidates are the uniform split, the
  global split, their even blend, and splits that prune larger layers harder
  (``density_l ~ size_l^-alpha``), so the search costs a handful of reconstructions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ecp_fast.distributed import all_reduce_sum, from_rank_zero, is_distributed
from ecp_fast.pruning.batches import (
    call_model,
    eval_mode,
    model_output,
    module_device,
    sample_weights,
    split_batch,
    to_device,
)

ALLOCATIONS = ("global", "uniform", "search")
DIVERGENCES = ("auto", "kl", "mse")
#: Exponents of the size-based candidates (0 is the uniform split).
SIZE_EXPONENTS = (0.5, 1.0)
#: Blends ``(1 - beta) * uniform + beta * global`` tried by the search.
GLOBAL_BLENDS = (0.5, 1.0)

Split = dict[str, float]


def uniform_split(sizes: Mapping[str, int], sparsity: float) -> Split:
    """Every layer at ``sparsity``."""
    return {name: sparsity for name in sizes}


def size_split(sizes: Mapping[str, int], sparsity: float, alpha: float) -> Split:
    """Densities ``min(1, kappa * (size / mean size)^-alpha)`` with ``kappa`` meeting the total."""
    total = sum(sizes.values())
    mean = total / len(sizes)
    target = (1.0 - sparsity) * total
    shape = {name: (size / mean) ** -alpha for name, size in sizes.items()}

    def kept(kappa: float) -> float:
        return sum(min(1.0, kappa * shape[name]) * size for name, size in sizes.items())

    low, high = 0.0, 1.0
    while kept(high) < target and high < 1e12:
        high *= 2.0
    for _ in range(100):  # bisection: kept() is monotone in kappa
        middle = (low + high) / 2
        low, high = (middle, high) if kept(middle) < target else (low, middle)
    return {name: 1.0 - min(1.0, high * shape[name]) for name in sizes}


def blend(first: Split, second: Split, beta: float) -> Split:
    """``(1 - beta) * first + beta * second`` per layer (the total is kept when both meet it)."""
    return {name: (1.0 - beta) * first[name] + beta * second[name] for name in first}


def floored_split(split: Split, floor: Split, sizes: Mapping[str, int], sparsity: float) -> Split:
    """``split`` with every layer at least at its ``floor`` (the sparsity it has already), the total
    still ``sparsity`` where the floors allow: what the floors add is taken back from the layers above
    theirs, each giving up the same fraction of its sparsity above its floor."""
    total = sum(sizes.values())
    base = sum(floor[name] * size for name, size in sizes.items())
    above = {name: split[name] - floor[name] for name in sizes if split[name] > floor[name]}
    room = sum(margin * sizes[name] for name, margin in above.items())
    scale = 0.0 if room <= 0 else min(1.0, max(0.0, (sparsity * total - base) / room))
    return {name: floor[name] + scale * above.get(name, 0.0) for name in sizes}


def capped_split(split: Split, cap: float, sizes: Mapping[str, int], sparsity: float) -> Split:
    """``split`` with no layer above ``cap`` nor emptied (one weight of a layer stays), the total still
    ``sparsity`` where that allows: what the capped layers give up is taken by the layers below their
    caps, each taking the same fraction of its room (a global ranking may ask for all of a layer, which
    a reconstruction never empties)."""
    caps = {name: min(cap, (size - 1) / size) if size else 0.0 for name, size in sizes.items()}
    if all(split[name] <= caps[name] for name in sizes):
        return dict(split)
    capped = {name: min(split[name], caps[name]) for name in sizes}
    missing = sparsity * sum(sizes.values()) - sum(capped[name] * size for name, size in sizes.items())
    room = sum((caps[name] - capped[name]) * size for name, size in sizes.items())
    scale = 0.0 if missing <= 0 or room <= 0 else min(1.0, missing / room)
    return {name: capped[name] + scale * (caps[name] - capped[name]) for name in sizes}


def split_from_keep(keep: Mapping[str, torch.Tensor]) -> Split:
    """Per-layer sparsity of keep masks (for example the result of a global selection)."""
    return {name: 1.0 - float(mask.double().mean()) for name, mask in keep.items()}


def candidate_splits(sizes: Mapping[str, int], sparsity: float, global_split: Split | None) -> dict[str, Split]:
    """The search's candidates by label: uniform, size-based, and blends with the global split."""
    candidates = {"uniform": uniform_split(sizes, sparsity)}
    for alpha in SIZE_EXPONENTS:
        candidates[f"size^-{alpha:g}"] = size_split(sizes, sparsity, alpha)
    if global_split is not None:
        for beta in GLOBAL_BLENDS:
            label = "global" if beta == 1.0 else f"blend {beta:g}"
            candidates[label] = blend(candidates["uniform"], global_split, beta)
    return candidates


# ---- divergence ----------------------------------------------------------------------------------


OutputFn = Callable[[Any], torch.Tensor]


def resolve_divergence(
    divergence: str, batches: Sequence[Any], model: nn.Module, output_fn: OutputFn | None = None, *, group: Any = None
) -> tuple[str, OutputFn | None]:
    """The measure the allocation search compares outputs with, and the output function to read them by.

    KL compares class probabilities along the output's class axis, which it finds beside integer
    class targets on the first batch (:func:`class_axis`); a class axis other than the last is moved
    last by the returned output function. ``"auto"`` takes KL where there is such an axis, else the
    mean squared error (a regression, or one logit per sample). ``"kl"`` with targets that are not
    class indices reads the last axis, which must then hold two or more values.

    Under ``torch.distributed`` (``group``: None is the default group) all but ``"mse"`` is a
    collective: rank 0's first batch decides for every rank (the first batch of one process on all
    the ranks' round-robin shards), so every rank compares alike.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"argument 'divergence' must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "mse":
        return "mse", output_fn
    axis = from_rank_zero(_divergence_axis(divergence, batches, model, output_fn), group)
    if isinstance(axis, str):
        raise ValueError(axis)
    if axis is None:
        return "mse", output_fn
    return "kl", output_fn if axis == -1 else functools.partial(_classes_last, output_fn)


def _divergence_axis(
    divergence: str, batches: Sequence[Any], model: nn.Module, output_fn: OutputFn | None
) -> int | str | None:
    """The class axis :func:`resolve_divergence` compares along (None: the mean squared error), or the
    message of the error it raises (returned, so that every rank can raise it)."""
    targets = split_batch(batches[0])[1]
    output = _first_output(model, batches[0], output_fn)
    axis = class_axis(output, targets)
    if axis is None and divergence == "kl" and not _class_indices(targets) and output.dim() and output.shape[-1] > 1:
        axis = -1
    if axis is None and divergence == "kl":
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else None
        return (
            f"argument 'divergence': 'kl' compares class probabilities, but the model's output (shape "
            f"{tuple(output.shape)}) has no axis of two or more classes for the targets (shape {shape}); "
            "use divergence='mse'"
        )
    return axis


def _class_indices(targets: Any) -> bool:
    return isinstance(targets, torch.Tensor) and not targets.is_floating_point() and not targets.is_complex()


def class_axis(output: torch.Tensor, targets: Any) -> int | None:
    """The axis of ``output`` holding the scores of the classes that integer ``targets`` index, or None.

    The last (-1) where the output's shape is the targets' and one more axis (``(B, C)`` for ``(B,)``,
    ``(B, T, V)`` for ``(B, T)``); else 1 where an axis was inserted after the first (``(B, C, H, W)``
    for ``(B, H, W)``, as ``nn.CrossEntropyLoss`` reads them). The axis must hold two or more classes.
    """
    if not _class_indices(targets):
        return None
    shape, wanted = tuple(output.shape), tuple(targets.shape)
    if len(shape) != len(wanted) + 1:
        return None
    if shape[:-1] == wanted and shape[-1] > 1:
        return -1
    if len(wanted) >= 2 and shape[:1] + shape[2:] == wanted and shape[1] > 1:
        return 1
    return None


def _first_output(model: nn.Module, batch: Any, output_fn: OutputFn | None) -> torch.Tensor:
    """The model's output on ``batch`` as read for the comparison, padding positions kept."""
    with eval_mode(model), torch.no_grad():
        inputs = to_device(split_batch(batch)[0], module_device(model))
        return (output_fn or model_output)(call_model(model, inputs))


def _classes_last(output_fn: OutputFn | None, output: Any) -> torch.Tensor:
    return (output_fn or model_output)(output).movedim(1, -1)


def iter_outputs(
    model: nn.Module, batches: Iterable[Any], output_fn: Callable[[Any], torch.Tensor] | None = None
) -> Iterator[torch.Tensor]:
    """The model's output on each batch in turn, in eval mode (restored after), without a graph;
    padding positions are left out."""
    device = module_device(model)
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            inputs = to_device(split_batch(batch)[0], device)
            output = (output_fn or model_output)(call_model(model, inputs)).detach()
            weights = sample_weights(inputs)  # padding positions are left out of the comparison
            if weights is not None and output.dim() >= 2 and output.shape[:2].numel() == weights.numel():
                output = output.flatten(0, 1)[weights.to(output.device) != 0]
            yield output


def model_outputs(
    model: nn.Module, batches: Sequence[Any], output_fn: Callable[[Any], torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """The model's outputs on every batch (see :func:`iter_outputs`)."""
    return list(iter_outputs(model, batches, output_fn))


def output_divergence(
    reference: Iterable[torch.Tensor], outputs: Iterable[torch.Tensor], kind: str, *, group: Any = None
) -> float:
    """Mean KL(reference || outputs) over samples of softmax outputs (classes on the last axis: see
    :func:`resolve_divergence`), or the mean squared error; the two are read batch by batch, side by side.

    Under ``torch.distributed`` (``group``: None is the default group) it is a collective: the sum and
    the count are added across the ranks, so every rank gets the mean over all the ranks' batches."""
    total, count = 0.0, 0
    for expected, actual in zip(reference, outputs, strict=True):
        expected, actual = expected.double(), actual.double()
        if kind == "kl":
            flat_expected = expected.reshape(-1, expected.shape[-1])
            flat_actual = actual.reshape(-1, actual.shape[-1])
            total += float(
                F.kl_div(
                    F.log_softmax(flat_actual, -1), F.log_softmax(flat_expected, -1), log_target=True, reduction="sum"
                )
            )
            count += flat_expected.shape[0]
        else:
            total += float((expected - actual).square().sum())
            count += expected.numel()
    if is_distributed(group):
        sums = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64), group).tolist()
        total, count = sums[0], round(sums[1])
    value = total / max(count, 1)
    return value if math.isfinite(value) else math.inf


@dataclass
class SearchResult:
    """The chosen split and the divergence of every candidate tried."""

    chosen: str
    split: Split
    divergences: dict[str, float]
