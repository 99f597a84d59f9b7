"""The pruner: calibrate -> score -> select -> apply masks and bias compensation.

::

    pruner = Pruner(model, sensitivity="output")
    pruner.calibrate(batches, loss_fn=None)
    report = pruner.prune(sparsity=0.9, method="ecp", scope="global", steps=1)

Nothing is applied until every score and selection of a step is computed, and any failure restores
the weights, biases and statistics exactly as they were: there is never a half-pruned model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ecp_fast._deprecation import renamed_keyword
from ecp_fast.pruning.batches import module_device
from ecp_fast.pruning.calibration import (
    SENSITIVITIES,
    CalibrationResult,
    Calibrator,
    LayerSpec,
    LayerStatistics,
    LossFn,
    existing_mask,
    resolve_layers,
    weight_2d,
    weight_parameter,
)
from ecp_fast.distributed import synchronize_calibration
from ecp_fast.pruning.importance import Importance, Method, ScoringContext, check_nonlinear_size, get_method
from ecp_fast.pruning.allocation import ALLOCATIONS, candidate_splits, resolve_divergence, split_from_keep, uniform_split
from ecp_fast.pruning.masks import install_mask
from ecp_fast.pruning.reconstruction import (
    RECONSTRUCTIVE_METHODS,
    REFIT_ONLY,
    apply_outcomes,
    reconstruct_best,
    sensitivity_weights,
)

if TYPE_CHECKING:
    from ecp_fast.pruning.structured import StructuredReport

logger = logging.getLogger(__name__)

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


def _resolve_sparsity(sparsity: float | None, scope: Scope) -> float:
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
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"argument 'sparsity' must be a float in [0, 1), got {type(sparsity).__name__}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"argument 'sparsity' must be in [0, 1), got {sparsity}")
    return float(sparsity)


# ---- report ----------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One layer after pruning."""

    name: str
    kind: str
    weights: int
    pruned: int
    bias_change_l1: float  # sum_i |b_i(after) - b_i(before)|
    bias_added: bool

    @property
    def sparsity(self) -> float:
        """Fraction of the layer's weights that are zero by mask."""
        return self.pruned / self.weights if self.weights else 0.0


@dataclass
class PruneReport:
    """What :meth:`Pruner.prune` did, per layer and overall; ``str(report)`` is a table."""

    method: str
    scope: str
    sensitivity: str
    target_sparsity: float
    steps: int
    layers: list[LayerReport] = field(default_factory=list)
    allocation: str | None = None  # how the total was split across layers (reconstructive pruning)
    candidate: str | None = None  # the split the allocation search chose
    divergences: dict[str, float] = field(default_factory=dict)  # every searched candidate's divergence

    @property
    def total_weights(self) -> int:
        """Weights in the scored layers."""
        return sum(layer.weights for layer in self.layers)

    @property
    def total_pruned(self) -> int:
        """Weights removed (masked) in the scored layers."""
        return sum(layer.pruned for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Overall sparsity of the scored layers."""
        return self.total_pruned / self.total_weights if self.total_weights else 0.0

    @property
    def added_biases(self) -> list[str]:
        """Layers that had no bias and received one for the compensation."""
        return [layer.name for layer in self.layers if layer.bias_added]

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per layer, for CSV or logging."""
        return [
            {
                "layer": layer.name,
                "kind": layer.kind,
                "weights": layer.weights,
                "pruned": layer.pruned,
                "sparsity": layer.sparsity,
                "bias_change_l1": layer.bias_change_l1,
                "bias_added": layer.bias_added,
            }
            for layer in self.layers
        ]

    def __str__(self) -> str:
        header = (
            f"method={self.method} scope={self.scope} sensitivity={self.sensitivity} steps={self.steps} "
            f"target={self.target_sparsity:.4g} achieved={self.sparsity:.4f}"
        )
        name_width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        if self.allocation is not None:
            header += f" allocation={self.allocation}" + (f" ({self.candidate})" if self.candidate else "")
        lines = [
            header,
            f"{'layer':<{name_width}}  {'kind':<6}  {'weights':>9}  {'pruned':>9}  {'sparsity':>8}  "
            f"{'sum|db|':>10}  bias added",
        ]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{name_width}}  {layer.kind:<6}  {layer.weights:>9}  {layer.pruned:>9}  "
                f"{layer.sparsity:>8.4f}  {layer.bias_change_l1:>10.4g}  {'yes' if layer.bias_added else 'no'}"
            )
        lines.append(
            f"{'total':<{name_width}}  {'':<6}  {self.total_weights:>9}  {self.total_pruned:>9}  {self.sparsity:>8.4f}"
        )
        if self.divergences:
            searched = ", ".join(f"{label} {value:.4g}" for label, value in self.divergences.items())
            lines.append(f"allocation search (calibration divergence): {searched}")
        return "\n".join(lines)


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
        index = torch.topk(torch.where(available, values, torch.inf), count, largest=False, sorted=False).indices
        selected[index] = True
        return selected
    kept = torch.zeros_like(available)
    if free - count > 0:
        index = torch.topk(torch.where(available, values, -torch.inf), free - count, largest=True, sorted=False).indices
        kept[index] = True
    return available & ~kept


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
        count = max(round(sparsity * total) - already, 0)
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
            count = max(round(sparsity * available.numel()) - int((~available).sum()), 0)
            selected[name] = _pick_smallest_flat(score.reshape(-1), available.reshape(-1), count).reshape(available.shape)
        elif scope.kind == "row":
            per_row = available.shape[1]
            counts = (round(sparsity * per_row) - (~available).sum(dim=1)).clamp_min(0)
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


# ---- the pruner ------------------------------------------------------------------------------------


class Pruner:
    """Elimination-compensation pruning (and its baselines) of a model's Linear and Conv2d layers.

    Args:
        model: the network to prune, in place.
        sensitivity: where the sensitivities come from: ``"output"`` (exact Jacobian rows up to 32
            outputs, Rademacher probes above or when ``probes`` is given), ``"loss"`` (per-sample loss
            gradients, needs ``loss_fn`` and targets) or ``"local"`` (``c = 1``, no backward pass).
        probes: number of Rademacher probes, or None for exact rows where the outputs are few.
        layers: names of the layers to prune; None prunes every supported Linear and Conv2d.
        output_fn: selects the output tensor from what the model returns (for models returning tuples).
        seed: seeds the probes and the ``random`` method.
        progress: show tqdm progress bars.

    After :meth:`calibrate`, ``pruner.statistics[name]`` holds each layer's
    :class:`~ecp_fast.pruning.calibration.LayerStatistics` (moments and baseline sums).
    """

    @renamed_keyword("criterion", "sensitivity")
    def __init__(
        self,
        model: nn.Module,
        sensitivity: str = "output",
        probes: int | None = None,
        layers: Sequence[str] | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
        if sensitivity not in SENSITIVITIES:
            raise ValueError(f"argument 'sensitivity' must be one of {SENSITIVITIES}, got {sensitivity!r}")
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
            raise ValueError(f"argument 'probes' must be a positive integer or None, got {probes!r}")
        self.model = model
        self.sensitivity = sensitivity
        self.probes = probes
        self.layers: dict[str, LayerSpec] = resolve_layers(model, layers)
        self.output_fn = output_fn
        self.seed = seed
        self.progress = progress
        self.calibration: CalibrationResult | None = None
        self._batches: Iterable[Any] | None = None
        self._loss_fn: LossFn | None = None
        self._loss_reduction: str | None = None

    @property
    def statistics(self) -> dict[str, LayerStatistics]:
        """Accumulated statistics per layer (empty before :meth:`calibrate`)."""
        return {} if self.calibration is None else self.calibration.statistics

    # ---- calibration ----------------------------------------------------------------------------

    def calibrate(
        self, batches: Iterable[Any], loss_fn: LossFn | None = None, loss_reduction: str | None = None
    ) -> CalibrationResult:
        """Stream the calibration batches (inputs, or ``(inputs, targets)``) through the model.

        ``loss_fn(outputs, targets)`` enables the ``loss`` sensitivity and the ``gradient`` and
        ``taylor`` baselines; a mean-reduced loss is rescaled to a per-sample sum (see
        :class:`~ecp_fast.pruning.calibration.Calibrator`). The model's weights are not modified; on error the
        previous statistics stay in place.
        """
        calibrator = self._calibrator(loss_fn, loss_reduction)
        # Under torch.distributed every rank streams its own shard; the merge makes the statistics,
        # and so the scores, masks and biases, identical on all ranks (a no-op in one process).
        result = synchronize_calibration(calibrator.run(batches, progress=self.progress))
        self.calibration = result
        self._batches = batches
        self._loss_fn = loss_fn
        self._loss_reduction = loss_reduction
        return result

    def _calibrator(self, loss_fn: LossFn | None, loss_reduction: str | None) -> Calibrator:
        return Calibrator(
            self.model,
            self.layers,
            sensitivity=self.sensitivity,
            probes=self.probes,
            loss_fn=loss_fn,
            loss_reduction=loss_reduction if loss_reduction is not None else self._loss_reduction,
            output_fn=self.output_fn,
            seed=self.seed,
        )

    # ---- scoring --------------------------------------------------------------------------------

    def importances(self, method: str = "ecp") -> dict[str, Importance]:
        """Score every weight of every layer with ``method`` at the model's current weights."""
        chosen = get_method(method)
        self._check_ready(chosen)
        generator = torch.Generator(device=module_device(self.model))
        generator.manual_seed(self.seed)
        result = {}
        for name, spec in self.layers.items():
            context = ScoringContext(
                layer=spec,
                weight=weight_2d(spec.module),
                statistics=self.statistics.get(name),
                calibration=self.calibration,
                model=self.model,
                generator=generator,
            )
            importance = chosen.function(context)
            if not torch.isfinite(importance.score).all():
                raise ValueError(f"method {method!r} gave non-finite importances for layer {name!r}")
            result[name] = importance
        return result

    def _check_ready(self, chosen: Method) -> None:
        if chosen.needs_calibration and self.calibration is None:
            raise RuntimeError(
                f"method {chosen.name!r} needs calibration statistics: call Pruner.calibrate(batches) before prune()"
            )
        if chosen.needs_loss and self.calibration is not None and not self.calibration.has_loss:
            raise RuntimeError(
                f"method {chosen.name!r} needs loss gradients: call Pruner.calibrate(batches, loss_fn=...) "
                "with (inputs, targets) batches"
            )
        if chosen.name == "nonlinear":
            check_nonlinear_size(self.layers, self.calibration)

    # ---- pruning --------------------------------------------------------------------------------

    def prune(
        self,
        sparsity: float | None = None,
        method: str = "ecp",
        scope: str = "global",
        steps: int = 1,
        importances: Mapping[str, Importance] | None = None,
        *,
        reconstruct: bool = False,
        allocation: str | None = None,
        divergence: str = "auto",
    ) -> PruneReport | StructuredReport:
        """Remove the least important weights, compensate biases, and install the masks.

        Args:
            sparsity: target fraction of zero weights in ``[0, 1)`` (default 0.9); for an ``"N:M"``
                scope it is implied by the pattern (pass None or ``1 - N/M``).
            method: a registered importance method: ``ecp``, ``obd``, ``magnitude``, ``gradient``,
                ``taylor``, ``wanda``, ``random``, ``nonlinear``.
            scope: ``"global"`` (one ranking over all layers), ``"layer"`` (the same sparsity in
                every layer), ``"row"`` (per output neuron), ``"N:M"`` (keep N of every M
                consecutive inputs of a neuron) or ``"neuron"`` (remove whole hidden units and
                shrink the model; ``sparsity`` is then the fraction of hidden units removed, see
                :func:`ecp_fast.pruning.structured.prune_neurons`).
            steps: prune iteratively on a geometric schedule of the remaining density, recalibrating
                on the same batches between steps (they must be re-iterable, e.g. a list or DataLoader).
            importances: precomputed :meth:`importances` for the current weights (``steps=1`` only),
                to prune copies of one model at several sparsities without scoring again.
            reconstruct: after the masks are chosen, refit every layer in forward order towards the
                dense network's pre-activations (:mod:`ecp_fast.pruning.reconstruction`). Implied by
                the reconstructive methods ``sparsegpt`` and ``ecp-obs``.
            allocation: how the total is split across layers when reconstructing: ``"global"``,
                ``"uniform"`` or ``"search"`` (:mod:`ecp_fast.pruning.allocation`). Default: search
                for ``ecp-obs``, uniform for ``sparsegpt``, and what ``scope`` implies otherwise.
            divergence: the search's measure between dense and pruned outputs on the calibration
                batches: ``"kl"``, ``"mse"`` or ``"auto"`` (KL when the targets are class indices).

        Returns:
            A :class:`PruneReport` (a :class:`~ecp_fast.pruning.structured.StructuredReport` for
            ``scope="neuron"``). Removed weights stay out of later selections.
        """
        if method in RECONSTRUCTIVE_METHODS or reconstruct:
            return self._prune_reconstructive(sparsity, method, scope, steps, importances, allocation, divergence)
        if scope == "neuron":
            if steps != 1 or importances is not None:
                raise ValueError(
                    "argument 'scope': scope='neuron' prunes in one step from the calibrated statistics "
                    f"(steps=1, importances=None), got steps={steps!r} and importances={'given' if importances else None}"
                )
            # Imported here: structured builds on this module.
            from ecp_fast.pruning.structured import prune_neurons

            return prune_neurons(self, 0.5 if sparsity is None else sparsity, method=method, scope="global")
        chosen = get_method(method)
        parsed_scope = parse_scope(scope)
        target = _resolve_sparsity(sparsity, parsed_scope)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"argument 'steps' must be a positive integer, got {steps!r}")
        if steps > 1 and parsed_scope.kind == "n:m":
            raise ValueError(f"argument 'steps': an N:M scope prunes in one step, got steps={steps}")
        if importances is not None:
            if steps != 1:
                raise ValueError(f"argument 'importances' can only be given with steps=1, got steps={steps}")
            missing = sorted(set(self.layers) - set(importances))
            if missing:
                raise ValueError(f"argument 'importances' lacks layers {missing}")
            for name, spec in self.layers.items():
                expected = (spec.fan_out, spec.fan_in)
                if tuple(importances[name].score.shape) != expected:
                    raise ValueError(
                        f"argument 'importances': layer {name!r} must have scores of shape {expected}, "
                        f"got {tuple(importances[name].score.shape)}"
                    )
        else:
            self._check_ready(chosen)
        if steps > 1 and chosen.needs_calibration:
            batches = self._batches
            if batches is None or iter(batches) is batches:
                raise ValueError(
                    f"argument 'steps': steps={steps} recalibrates between steps and needs re-iterable batches "
                    "(a list or DataLoader), but calibrate() was given a one-shot iterator"
                )
        if parsed_scope.kind == "n:m":
            for name, spec in self.layers.items():
                if spec.fan_in % parsed_scope.m:
                    raise ValueError(
                        f"argument 'scope': pattern {scope} needs the input size of layer {name!r} to be a multiple "
                        f"of {parsed_scope.m}, got {spec.fan_in}"
                    )

        snapshot = self._snapshot()
        added_bias: list[str] = []
        try:
            keep = {name: self._keep_mask(spec) for name, spec in self.layers.items()}
            total = sum(mask.numel() for mask in keep.values())
            initial_density = sum(int(mask.sum()) for mask in keep.values()) / total
            final_density = 1.0 - target
            for step in tqdm(range(1, steps + 1), desc="prune", disable=not self.progress or steps == 1, leave=False):
                if step > 1 and chosen.needs_calibration:
                    assert self._batches is not None
                    self.calibrate(self._batches, self._loss_fn, self._loss_reduction)
                if initial_density > final_density:
                    density = initial_density * (final_density / initial_density) ** (step / steps)
                else:
                    density = initial_density
                step_sparsity = target if step == steps else 1.0 - density
                scores = importances if importances is not None else self.importances(method)
                removed = select_weights(
                    {name: importance.score for name, importance in scores.items() if name in self.layers},
                    keep,
                    step_sparsity,
                    parsed_scope,
                )
                # Everything is computed; only now touch the model.
                for name, spec in self.layers.items():
                    bias_delta = scores[name].bias_delta if chosen.compensates else None
                    if self._apply(spec, removed[name], bias_delta):
                        added_bias.append(name)
                    keep[name] = keep[name] & ~removed[name]
                logger.info(
                    "step %d/%d (%s, %s): sparsity %.4f",
                    step,
                    steps,
                    method,
                    scope,
                    1.0 - sum(int(mask.sum()) for mask in keep.values()) / total,
                )
            for name, spec in self.layers.items():
                install_mask(spec.module, keep[name].reshape(weight_parameter(spec.module).shape).to(
                    weight_parameter(spec.module).dtype
                ))
        except BaseException:
            self._restore(snapshot, added_bias)
            raise
        return self._report(method, scope, target, steps, snapshot, added_bias)

    # ---- reconstructive pruning -----------------------------------------------------------------

    def _prune_reconstructive(
        self,
        sparsity: float | None,
        method: str,
        scope: str,
        steps: int,
        importances: Mapping[str, Importance] | None,
        allocation: str | None,
        divergence: str,
    ) -> PruneReport:
        """Masks and compensation by layer-wise reconstruction (see :meth:`prune`)."""
        config = RECONSTRUCTIVE_METHODS.get(method, REFIT_ONLY)
        parsed_scope = parse_scope(scope)
        target = _resolve_sparsity(sparsity, parsed_scope)
        allocation = self._check_reconstructive(method, parsed_scope, steps, importances, allocation)
        batches = self._reconstruction_batches()
        pattern: Any = {"row": "row", "n:m": (parsed_scope.n, parsed_scope.m)}.get(parsed_scope.kind, "unstructured")
        scores = None
        if method not in RECONSTRUCTIVE_METHODS:
            scores = {name: importance.score for name, importance in self.importances(method).items()}
        elif allocation in ("global", "search") and self.calibration is not None:
            scores = {name: importance.score for name, importance in self.importances("ecp").items()}
        candidates = self._allocation_candidates(allocation, target, parsed_scope, scores)
        keep_fn = None if scores is None or method in RECONSTRUCTIVE_METHODS else self._keep_for(scores, parsed_scope)
        weights = None
        if config.weighting == "sensitivity":
            weights = sensitivity_weights(self._calibrator(self._loss_fn, None), batches, self.layers, self.seed)
        alternative = None
        if config.alternative is not None and allocation == "search" and self.calibration is not None:
            method_scores = {name: importance.score for name, importance in self.importances(config.alternative).items()}
            alternative = self._keep_for(method_scores, parsed_scope)
        outcomes, chosen, divergences = reconstruct_best(
            self.model, self.layers, candidates, pattern, config, batches, keep_fn, weights,
            resolve_divergence(divergence, batches), self.output_fn, alternative,
        )
        snapshot = self._snapshot()
        added: list[str] = []
        try:
            added = apply_outcomes(self.layers, outcomes)
        except BaseException:
            self._restore(snapshot, added)
            raise
        report = self._report(method, scope, target, 1, snapshot, added)
        report.allocation, report.divergences = allocation, divergences
        report.candidate = chosen if len(candidates) > 1 else None
        return report

    def _check_reconstructive(
        self, method: str, scope: Scope, steps: int, importances: Any, allocation: str | None
    ) -> str:
        if method not in RECONSTRUCTIVE_METHODS:
            get_method(method)  # a clear error for an unknown name
        if steps != 1 or importances is not None:
            raise ValueError(
                f"argument 'steps': reconstructive pruning runs in one step from the calibration batches "
                f"(steps=1, importances=None), got steps={steps!r}"
            )
        if allocation is not None and allocation not in ALLOCATIONS:
            raise ValueError(f"argument 'allocation' must be one of {ALLOCATIONS} or None, got {allocation!r}")
        if scope.kind == "n:m" or scope.kind == "row":
            return "uniform"  # the pattern fixes every layer's sparsity
        if allocation is None:
            default = {"ecp-obs": "search", "sparsegpt": "uniform"}
            return default.get(method, "global" if scope.kind == "global" else "uniform")
        return allocation

    def _reconstruction_batches(self) -> list[Any]:
        batches = self._batches
        if batches is None:
            raise RuntimeError("reconstructive pruning needs calibration batches: call Pruner.calibrate(batches) first")
        if iter(batches) is batches:
            raise ValueError(
                "argument 'batches': reconstruction runs the batches once per layer and needs re-iterable "
                "batches (a list or DataLoader), but calibrate() was given a one-shot iterator"
            )
        return list(batches)

    def _allocation_candidates(
        self, allocation: str, target: float, scope: Scope, scores: Mapping[str, torch.Tensor] | None
    ) -> dict[str, dict[str, float]]:
        sizes = {name: spec.fan_out * spec.fan_in for name, spec in self.layers.items()}
        global_split = None
        if scores is not None and scope.kind in ("global", "layer"):
            keep = {name: self._keep_mask(spec) for name, spec in self.layers.items()}
            removed = select_weights(scores, keep, target, Scope("global"))
            global_split = split_from_keep({name: keep[name] & ~removed[name] for name in keep})
        if allocation == "uniform":
            return {"uniform": uniform_split(sizes, target)}
        if allocation == "global":
            if global_split is None:
                raise RuntimeError("allocation='global' ranks ECP importances: call Pruner.calibrate(batches) first")
            return {"global": global_split}
        return candidate_splits(sizes, target, global_split)

    def _keep_for(self, scores: Mapping[str, torch.Tensor], scope: Scope) -> Callable[[Mapping[str, float]], dict]:
        """Keep masks from ``scores`` at given per-layer sparsities (within a row or N:M group per scope)."""
        per_layer = scope if scope.kind in ("row", "n:m") else Scope("layer")

        def keep_fn(split: Mapping[str, float]) -> dict[str, torch.Tensor]:
            result = {}
            for name, spec in self.layers.items():
                keep = self._keep_mask(spec)
                removed = select_weights({name: scores[name]}, {name: keep}, split[name], per_layer)[name]
                result[name] = keep & ~removed
            return result

        return keep_fn

    # ---- helpers --------------------------------------------------------------------------------

    def _keep_mask(self, spec: LayerSpec) -> torch.Tensor:
        mask = existing_mask(spec.module)
        weight = weight_parameter(spec.module)
        if mask is None:
            return torch.ones(spec.fan_out, spec.fan_in, dtype=torch.bool, device=weight.device)
        return (mask != 0).reshape(spec.fan_out, spec.fan_in)

    def _apply(self, spec: LayerSpec, removed: torch.Tensor, bias_delta: torch.Tensor | None) -> bool:
        """Zero the removed weights and add their compensation to the bias; True if a bias was added."""
        module = spec.module
        weight = weight_parameter(module)
        added = False
        with torch.no_grad():
            weight.view(spec.fan_out, spec.fan_in)[removed] = 0
            if bias_delta is not None and bool(removed.any()):
                shift = torch.where(removed, bias_delta.to(torch.float64), 0.0).sum(dim=1)
                if module.bias is None:
                    module.bias = nn.Parameter(torch.zeros(spec.fan_out, dtype=weight.dtype, device=weight.device))
                    added = True
                    logger.info("layer %r had no bias; added one to receive the compensation", spec.name)
                module.bias.add_(shift.to(module.bias.dtype))
        return added

    def _snapshot(self) -> dict[str, Any]:
        return {
            "weights": {name: weight_parameter(spec.module).detach().clone() for name, spec in self.layers.items()},
            "biases": {
                name: None if spec.module.bias is None else spec.module.bias.detach().clone()
                for name, spec in self.layers.items()
            },
            "masks": {name: existing_mask(spec.module) is not None for name, spec in self.layers.items()},
            "calibration": self.calibration,
        }

    def _restore(self, snapshot: dict[str, Any], added_bias: list[str]) -> None:
        with torch.no_grad():
            for name, spec in self.layers.items():
                weight_parameter(spec.module).copy_(snapshot["weights"][name])
                if name in added_bias:
                    spec.module.register_parameter("bias", None)
                elif snapshot["biases"][name] is not None:
                    spec.module.bias.copy_(snapshot["biases"][name])
        self.calibration = snapshot["calibration"]
        logger.warning("pruning failed; the model was restored to its state before prune()")

    def _report(
        self, method: str, scope: str, target: float, steps: int, snapshot: dict[str, Any], added_bias: list[str]
    ) -> PruneReport:
        report = PruneReport(method=method, scope=scope, sensitivity=self.sensitivity, target_sparsity=target, steps=steps)
        for name, spec in self.layers.items():
            mask = existing_mask(spec.module)
            pruned = int((mask == 0).sum()) if mask is not None else 0
            before = snapshot["biases"][name]
            after = spec.module.bias
            if after is None:
                change = 0.0
            elif before is None:
                change = float(after.detach().abs().sum())
            else:
                change = float((after.detach() - before).abs().sum())
            report.layers.append(
                LayerReport(
                    name=name,
                    kind=spec.kind,
                    weights=spec.fan_out * spec.fan_in,
                    pruned=pruned,
                    bias_change_l1=change,
                    bias_added=name in added_bias,
                )
            )
        logger.info("pruned with %s/%s to sparsity %.4f", method, scope, report.sparsity)
        return report


@renamed_keyword("criterion", "sensitivity")
def prune(
    model: nn.Module,
    batches: Iterable[Any] | None,
    sparsity: float | None = None,
    method: str = "ecp",
    scope: str = "global",
    steps: int = 1,
    sensitivity: str | None = None,
    probes: int | None = None,
    layers: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    reconstruct: bool = False,
    allocation: str | None = None,
    divergence: str = "auto",
) -> PruneReport:
    """Calibrate on ``batches`` and prune ``model`` in place in one call; see :class:`Pruner`.

    ``batches`` may be None for the methods that need no data (``magnitude``, ``random``).
    ``sensitivity`` defaults to ``"output"``, and to ``"local"`` for ``sparsegpt``, which weights
    every sample alike and so needs no backward pass. ``method="ecp-obs"`` is the best one-shot
    configuration: sensitivity-weighted OBS, refit towards the dense network and an allocation search.
    """
    if sensitivity is None:
        sensitivity = "local" if method == "sparsegpt" else "output"
    pruner = Pruner(model, sensitivity=sensitivity, probes=probes, layers=layers, seed=seed, progress=progress)
    if batches is not None:
        pruner.calibrate(batches, loss_fn=loss_fn)
    return pruner.prune(
        sparsity=sparsity, method=method, scope=scope, steps=steps, reconstruct=reconstruct, allocation=allocation,
        divergence=divergence,
    )
