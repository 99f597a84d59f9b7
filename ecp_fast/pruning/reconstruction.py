"""Compensation by reconstruction: layer by layer, the kept weights (and the bias) absorb what is removed.

The layers of a model are pruned one at a time in forward order. Layer ``k`` sees the inputs that
the already pruned layers ``0 .. k-1`` produce (``x~p = [a_pruned; 1]``); its quadratic is the
sample-weighted Gram matrix ``H = sum_s w_s x~p x~p^T`` (op ``ecp.gram``). The mask is chosen by an
Optimal Brain Surgeon sweep on ``[W | b]`` (the bias column is never pruned) or taken from a
registered importance, and with ``refit`` the kept weights and bias are then solved exactly towards
the *dense* network's pre-activations, through the cross term ``C = sum_s w_s x~p x~d^T``
(METHOD.md, "compensation by reconstruction"; derivation in docs/method.md).

Sample weights ``w_s`` are 1 (SparseGPT) or the row-mean ``c-bar_s`` of the layer's ECP
sensitivities: weighting by each neuron's own ``c_i^s`` would be zero wherever a ReLU unit is off,
and the compensation would then switch such units on; the row-mean keeps every sample in every row.

Everything is computed on a working copy of the model; the caller's model is changed only when every
layer is done (:func:`apply_outcomes`), so a failure never leaves a half-pruned model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ecp_fast.ops import gram
from ecp_fast.pruning import obs
from ecp_fast.pruning.batches import (
    call_model,
    module_device,
    sample_weights,
    split_batch,
    storage_address,
    storages,
    to_device,
)
from ecp_fast.pruning.layers import LayerSpec, weight_parameter
from ecp_fast.pruning.masks import install_mask
from ecp_fast.pruning.replay import OutputReplay

logger = logging.getLogger(__name__)


Pattern = obs.Pattern


@dataclass(frozen=True)
class ReconstructionConfig:
    """How a reconstructive method chooses and compensates.

    ``weighting``: ``"uniform"`` (``w_s = 1``) or ``"sensitivity"`` (``w_s = c-bar_s``).
    ``refit``: solve the kept weights towards the dense pre-activations after the mask is chosen;
    without it the OBS sweep's own update (towards the layer's output on the pruned inputs) stays.
    ``damp``: dampening of ``H``, a fraction of its mean diagonal.
    """

    weighting: str
    refit: bool
    damp: float = 0.01
    block_size: int = 128
    budget: str = "block"  # unstructured removals per block: "block" (SparseGPT) or "layer" (see obs_sweep)
    alternative: str | None = None  # a registered importance whose masks the search also tries


#: The reconstructive methods: SparseGPT as published (here with the bias column), and ECP-OBS.
RECONSTRUCTIVE_METHODS: dict[str, ReconstructionConfig] = {
    "sparsegpt": ReconstructionConfig(weighting="uniform", refit=False),
    "ecp-obs": ReconstructionConfig(weighting="sensitivity", refit=True, budget="layer", alternative="ecp"),
}
#: ``reconstruct=True`` with a mask method: masks as the method chooses them, then the refit.
REFIT_ONLY = ReconstructionConfig(weighting="uniform", refit=True)


@dataclass
class LayerPlan:
    """What to do with one layer: a fixed ``keep`` mask ``(out, in)``, or a sparsity and a pattern."""

    sparsity: float = 0.0
    pattern: Pattern = "unstructured"
    keep: torch.Tensor | None = None
    present: torch.Tensor | None = None  # weights not removed before this call (they may not return)


@dataclass
class LayerOutcome:
    """A layer's new ``(out, in)`` weight, bias and keep mask, ready to apply."""

    weight: torch.Tensor
    bias: torch.Tensor
    keep: torch.Tensor


class _StopForward(Exception):
    """Raised by a capture hook once the layer of interest has run: the rest is not needed."""


# ---- capturing a layer's inputs ----------------------------------------------------------------


def _layer_inputs(model: nn.Module, module: nn.Module, spec: LayerSpec, inputs: Any) -> torch.Tensor:
    """``(N, in)`` inputs of ``module`` for one batch, stopping the forward pass right after it."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append(spec.inputs_2d(args[0].detach()))
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        call_model(model, inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"argument 'layers': layer {spec.name!r} never ran during the model's forward pass")
    return captured[0]


def forward_order(model: nn.Module, specs: Mapping[str, LayerSpec], inputs: Any) -> list[str]:
    """Names of ``specs`` in the order their modules first run on ``inputs``."""
    order: list[str] = []
    handles = []
    for name, spec in specs.items():

        def hook(_module: nn.Module, _args: tuple, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(spec.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in specs if name not in order]
    if missing:
        raise ValueError(f"argument 'layers': layers {missing} never ran during the model's forward pass")
    return order


def token_weights(inputs: Any, rows: int) -> torch.Tensor | None:
    """0/1 per row from a batch's attention mask (padding never counts), or None."""
    weights = sample_weights(inputs)
    return weights if weights is not None and weights.numel() == rows else None


#: The activations a reconstruction keeps for reuse (the dense model's layer inputs, the same for every
#: allocation candidate; the working copy's replayed outputs) fit, each, this many times the largest
#: Gram matrix of the layers reconstructed. Memory then stays the model and one layer's ``H`` (times a
#: constant) however many calibration samples there are; what does not fit is recomputed.
CACHE_GRAMS = 1


def cache_budget(specs: Mapping[str, LayerSpec]) -> int:
    """Bytes each activation cache of a reconstruction of ``specs`` may hold (see :data:`CACHE_GRAMS`)."""
    return CACHE_GRAMS * max((spec.fan_in + 1) ** 2 for spec in specs.values()) * 8


def _resident(batches: Sequence[Any]) -> set[int]:
    """Storages of the calibration inputs as the caller holds them: views of them cost a cache nothing."""
    return storages([split_batch(batch)[0] for batch in batches])


def _replay(specs: Mapping[str, LayerSpec], batches: Sequence[Any]) -> OutputReplay:
    """An output replay within :func:`cache_budget`, in which the calibration inputs cost nothing."""
    return OutputReplay(cache_budget(specs), _resident(batches))


def _dense_reference(model: nn.Module, specs: Mapping[str, LayerSpec], batches: Sequence[Any]) -> DenseReference:
    """The dense reference of a reconstruction of ``specs``, its cache within :func:`cache_budget`."""
    return DenseReference(model, cache_budget(specs), _resident(batches))


class DenseReference:
    """The dense model whose pre-activations a refit aims at, with a bounded cache of its layer inputs,
    and what every allocation candidate shares about the first layer pruned (its quadratic, its
    sweep's inverse factor and its sweeps)."""

    def __init__(self, model: nn.Module, budget: int, resident: set[int] | None = None) -> None:
        self.model = copy.deepcopy(model).eval()
        self.modules = dict(self.model.named_modules())
        self.budget = budget
        #: Storages held anyway (the caller's calibration inputs): kept views of them cost no budget.
        self.resident = resident or set()
        self.cache: dict[tuple[str, int], torch.Tensor] = {}
        self.cached_bytes = 0
        #: Gram matrices of the first layer pruned, whose inputs no pruning has touched yet: the
        #: same for every allocation candidate (prefix caching).
        self.first_grams: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        #: The first layer's inverse factor for the sweep (see obs.inverse_factor), per (name, bias_free, damp).
        self.first_factors: dict[tuple, torch.Tensor] = {}
        #: The first layer's sweeps by settings, with the weight and bias they started from: a
        #: candidate's proxy and its exact reconstruction sweep the first layer alike. An allocation
        #: search keeps only the closest candidate's (:meth:`retain_first_sweeps`): a layer's weights.
        self.first_sweeps: dict[tuple, tuple[torch.Tensor, torch.Tensor, obs.ObsResult]] = {}
        #: Keys of the first-layer sweeps the latest reconstruction used (see :meth:`retain_first_sweeps`).
        self.sweeps_used: set[tuple] = set()

    def layer_inputs(self, spec: LayerSpec, index: int, inputs: Any) -> torch.Tensor:
        """The dense ``(N, in)`` inputs of layer ``spec`` on batch ``index`` (whose inputs are ``inputs``)."""
        key = (spec.name, index)
        if key in self.cache:
            return self.cache[key]
        dense_inputs = _layer_inputs(self.model, self.modules[spec.name], spec, inputs)
        resident = storage_address(dense_inputs) in self.resident  # a view of a batch: free
        size = 0 if resident else dense_inputs.numel() * dense_inputs.element_size()
        if self.cached_bytes + size <= self.budget:
            self.cache[key] = dense_inputs
            self.cached_bytes += size
        return dense_inputs

    def first_sweep(self, key: tuple, weight: torch.Tensor, bias: torch.Tensor) -> obs.ObsResult | None:
        """The first layer's sweep kept under ``key``, if it started from this ``weight`` and ``bias``
        (shared, not copied: a sweep's result is only read)."""
        stored = self.first_sweeps.get(key)
        if stored is None or not (torch.equal(stored[0], weight) and torch.equal(stored[1], bias)):
            return None
        self.sweeps_used.add(key)
        return stored[2]

    def keep_first_sweep(self, key: tuple, weight: torch.Tensor, bias: torch.Tensor, result: obs.ObsResult) -> None:
        """Keep a first-layer sweep (and a copy of the weight and bias it started from) for :meth:`first_sweep`."""
        if key not in self.first_sweeps:
            self.first_sweeps[key] = (weight.clone(), bias.clone(), result)
        self.sweeps_used.add(key)

    def retain_first_sweeps(self, keys: set[tuple]) -> None:
        """Drop every kept first-layer sweep but those under ``keys`` (the closest candidate's so far)."""
        for key in [key for key in self.first_sweeps if key not in keys]:
            del self.first_sweeps[key]

    def release_first_factors(self) -> None:
        """Drop the first layer's inverse factors once no more sweeps of it are expected."""
        self.first_factors.clear()


def layer_grams(
    work: nn.Module,
    dense: DenseReference | None,
    spec: LayerSpec,
    batches: Sequence[Any],
    sample_weights: Sequence[torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``H`` of the layer's inputs in ``work`` and, with a ``dense`` reference, the cross term ``C``.

    Where the layer's inputs in ``work`` are still the dense ones (nothing before it was pruned), ``C``
    is ``H``: it is then the same tensor, neither computed nor stored a second time.
    """
    work_module = dict(work.named_modules())[spec.name]
    device = module_device(work)
    hessian: torch.Tensor | None = None
    cross: torch.Tensor | None = None  # None while every batch's dense inputs were the pruned ones
    with torch.no_grad():
        for index, batch in enumerate(batches):
            inputs = to_device(split_batch(batch)[0], device)
            pruned_inputs = _layer_inputs(work, work_module, spec, inputs)
            weight = token_weights(inputs, pruned_inputs.shape[0]) if sample_weights is None else sample_weights[index]
            weight = None if weight is None else weight.to(device=pruned_inputs.device, dtype=pruned_inputs.dtype)
            part = gram(pruned_inputs, None, weight, float64=True)
            if dense is not None:
                dense_inputs = dense.layer_inputs(spec, index, inputs)
                same = dense_inputs is pruned_inputs or torch.equal(dense_inputs, pruned_inputs)
                if cross is None and not same:
                    cross = torch.zeros_like(part) if hessian is None else hessian.clone()
                if cross is not None:
                    cross.add_(part if same else gram(pruned_inputs, dense_inputs, weight, float64=True))
            hessian = part if hessian is None else hessian.add_(part)  # in place: no fresh (in + 1)^2 per batch
            del part  # not alive while the next batch's part is made
    assert hessian is not None
    return hessian, hessian if cross is None and dense is not None else cross


# ---- one layer -----------------------------------------------------------------------------------


def _augmented(module: nn.Module, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The effective ``(out, in)`` weight (mask applied) and the bias (zeros when there is none)."""
    same = LayerSpec(spec.name, module, spec.kind)
    weight = same.weight_2d()
    bias = getattr(module, "bias", None)
    return weight, bias.detach() if isinstance(bias, torch.Tensor) else weight.new_zeros(spec.fan_out)


def _without_bias(matrix: torch.Tensor, columns: bool = True) -> torch.Tensor:
    """``matrix`` with the fitted layer's bias row (and column) zeroed: the bias then only meets the ridge."""
    matrix = matrix.clone()
    matrix[-1, :] = 0
    if columns:
        matrix[:, -1] = 0
    return matrix


@dataclass
class ReconstructionRun:
    """What every layer of one reconstruction shares.

    ``sample_weights`` per layer and batch (None: 1, or the attention mask); ``dense`` the shared
    dense reference (made on first use when the config refits); ``exact=False`` keeps the sweep's own
    update instead of the final refit (the cheap proxy that compares allocation candidates);
    ``add_bias=False`` keeps layers without a bias without one.
    """

    config: ReconstructionConfig
    batches: Sequence[Any]
    sample_weights: Mapping[str, Sequence[torch.Tensor]] | None = None
    dense: DenseReference | None = None
    exact: bool = True
    add_bias: bool = True


def _layer_quadratic(
    work: nn.Module, spec: LayerSpec, run: ReconstructionRun, first: bool, bias_free: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``H`` and the cross term ``C`` of a layer; the first layer's are computed once per dense reference."""
    dense = run.dense
    if dense is not None and first and spec.name in dense.first_grams:
        hessian, cross = dense.first_grams[spec.name]
    else:
        weights = None if run.sample_weights is None else run.sample_weights[spec.name]
        hessian, cross = layer_grams(work, dense if run.config.refit else None, spec, run.batches, weights)
        if dense is not None and first:
            dense.first_grams[spec.name] = (hessian, cross)
    if bias_free:
        hessian, cross = _without_bias(hessian), None if cross is None else _without_bias(cross, columns=False)
    return hessian, cross


def _refit(
    weight: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor, quadratic: tuple, dense: tuple, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    hessian, cross = quadratic
    dense_weight, dense_bias = dense
    return obs.refit(
        weight, bias, keep, hessian, cross=cross, dense_weight=dense_weight, dense_bias=dense_bias, ridge=ridge
    )


def _sweep_layer(
    weight: torch.Tensor,
    bias: torch.Tensor,
    hessian: torch.Tensor,
    plan: LayerPlan,
    run: ReconstructionRun,
    first: tuple[str, bool] | None,
) -> obs.ObsResult:
    """The OBS sweep of a layer. ``first`` ``(name, bias_free)`` marks the first layer pruned: its inputs
    are the same for every allocation candidate, so the dense reference keeps its inverse factor and
    its sweeps (a candidate's proxy and its exact reconstruction sweep it alike) for reuse."""
    config, dense = run.config, run.dense
    sweep = partial(
        obs.obs_sweep,
        weight,
        bias,
        hessian,
        plan.sparsity,
        pattern=plan.pattern,
        block_size=config.block_size,
        damp=config.damp,
        budget=config.budget,
        measure_error=False,
    )
    if first is None or dense is None:
        return sweep()
    pattern = tuple(plan.pattern) if isinstance(plan.pattern, list) else plan.pattern
    key = (*first, float(plan.sparsity), pattern, config.block_size, config.damp, config.budget)
    result = dense.first_sweep(key, weight, bias)
    if result is None:
        factor = dense.first_factors.get((*first, config.damp))
        if factor is None:
            factor = dense.first_factors[(*first, config.damp)] = obs.inverse_factor(hessian, config.damp)
        result = sweep(factor=factor)
        dense.keep_first_sweep(key, weight, bias, result)
    return result


def solve_layer(
    work: nn.Module,
    spec: LayerSpec,
    plan: LayerPlan,
    run: ReconstructionRun,
    first: bool = False,
    bias_free: bool = False,
) -> LayerOutcome:
    """Choose the layer's mask and compensation from its Gram matrices (the model is not changed).

    ``first`` marks the first layer pruned (its inputs are the dense ones); ``bias_free`` keeps a
    layer without a bias without one: the bias column is taken out of the quadratic, so it stays 0.
    """
    config = run.config
    quadratic = _layer_quadratic(work, spec, run, first, bias_free)
    weight, bias = _augmented(dict(work.named_modules())[spec.name], spec)
    dense = _augmented(run.dense.modules[spec.name], spec) if config.refit and run.dense else (None, None)
    if config.refit and plan.keep is None and not first:
        # The quadratic towards the dense pre-activations is minimised, before any pruning, by the
        # unmasked least-squares fit; the OBS sweep must start from that minimiser to rank and
        # compensate removals of *this* objective (starting from the dense weights would measure the
        # error towards the layer's own output on the already pruned inputs instead). The first
        # layer sees the dense inputs, so its own weights are that minimiser already.
        present = torch.ones(spec.fan_out, spec.fan_in, dtype=torch.bool, device=weight.device)
        if plan.present is not None:
            present = plan.present.to(present.device)
        weight, bias = _refit(weight, bias, present, quadratic, dense, config.damp)
    if plan.keep is None:
        result = _sweep_layer(weight, bias, quadratic[0], plan, run, (spec.name, bias_free) if first else None)
        keep, weight, bias = result.mask, result.weight, result.bias
        if plan.present is not None:  # removed weights stay removed, even where the sweep would keep them
            keep = keep & plan.present.to(keep.device)
    else:
        keep = plan.keep.to(device=weight.device, dtype=torch.bool)
        weight = weight * keep
    if config.refit and (run.exact or plan.keep is not None):
        weight, bias = _refit(weight, bias, keep, quadratic, dense, config.damp)
    return LayerOutcome(weight=weight * keep, bias=bias, keep=keep)


def _write(module: nn.Module, spec: LayerSpec, outcome: LayerOutcome, add_bias: bool) -> bool:
    """Put ``outcome`` into ``module``'s stored weight and bias; True when a bias was added.

    A layer without a bias gets one only with ``add_bias``; otherwise its compensation is the weights'.
    """
    stored = weight_parameter(module)
    added = False
    with torch.no_grad():
        stored.copy_(spec.mask_to_weight_shape(outcome.weight).to(stored.dtype))
        if module.bias is None and add_bias and bool(outcome.bias.abs().sum() > 0):
            module.bias = nn.Parameter(torch.zeros(spec.fan_out, dtype=stored.dtype, device=stored.device))
            added = True
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(outcome.bias.to(bias.dtype))
    return added


# ---- the driver ----------------------------------------------------------------------------------


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy whose masked weights are folded in, so weights can be written directly."""
    work = copy.deepcopy(model)
    for module in work.modules():
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig"):
            torch_prune.remove(module, "weight")
    return work


def reconstruct(
    model: nn.Module, specs: Mapping[str, LayerSpec], plans: Mapping[str, LayerPlan], run: ReconstructionRun
) -> tuple[dict[str, LayerOutcome], nn.Module]:
    """Prune every layer of ``plans`` in forward order on a working copy of ``model``.

    Returns the outcome per layer and the pruned working copy (for evaluation); ``model`` itself
    is not changed (:func:`apply_outcomes` does that).
    """
    replay = _replay(specs, run.batches)
    try:
        return _reconstruct(model, specs, plans, run, replay)
    finally:
        replay.remove()


def _reconstruct(
    model: nn.Module,
    specs: Mapping[str, LayerSpec],
    plans: Mapping[str, LayerPlan],
    run: ReconstructionRun,
    replay: OutputReplay,
) -> tuple[dict[str, LayerOutcome], nn.Module]:
    """:func:`reconstruct`, with the working copy's layers installed in ``replay``: each pass over the
    batches then recomputes only the layers pruned since the pass before (the caller removes it)."""
    work = _plain_copy(model)
    if run.config.refit and run.dense is None:
        run.dense = _dense_reference(model, specs, run.batches)
    work_specs = {name: LayerSpec(name, dict(work.named_modules())[name], spec.kind) for name, spec in specs.items()}
    first_inputs = to_device(split_batch(run.batches[0])[0], module_device(work))
    order = [name for name in forward_order(work, work_specs, first_inputs) if name in plans]
    work.eval()  # a copy: its mode needs no restoring
    replay.install(work_specs[name].module for name in order)
    outcomes: dict[str, LayerOutcome] = {}
    for position, name in enumerate(order):
        spec = work_specs[name]
        bias_free = not run.add_bias and getattr(spec.module, "bias", None) is None
        present = specs[name].mask_2d()
        plan = plans[name] if present is None else replace(plans[name], present=present != 0)
        outcome = solve_layer(work, spec, plan, run, first=position == 0, bias_free=bias_free)
        _write(spec.module, spec, outcome, add_bias=run.add_bias)
        outcomes[name] = outcome
        logger.debug("reconstructed %s: sparsity %.4f", name, 1.0 - float(outcome.keep.double().mean()))
    return outcomes, work


def apply_outcomes(
    specs: Mapping[str, LayerSpec], outcomes: Mapping[str, LayerOutcome], add_bias: bool = True
) -> list[str]:
    """Write every outcome into the caller's model and install the masks; returns layers given a bias."""
    added = []
    for name, outcome in outcomes.items():
        spec = specs[name]
        if _write(spec.module, spec, outcome, add_bias=add_bias):
            added.append(name)
        stored = weight_parameter(spec.module)
        install_mask(spec.module, spec.mask_to_weight_shape(outcome.keep).to(device=stored.device, dtype=stored.dtype))
    return added


# ---- sample weights ------------------------------------------------------------------------------


def sensitivity_weights(
    calibrator: Any, batches: Sequence[Any], names: Iterable[str], seed: int = 0
) -> dict[str, list[torch.Tensor]]:
    """``c-bar_s``, the row-mean of each layer's ECP sensitivities, per layer and batch (dense model).

    ``calibrator`` is a :class:`~ecp_fast.pruning.calibration.Calibrator` of the dense model; its
    sensitivity decides ``c`` (``local`` gives ones); padding tokens get 0.
    """
    device = module_device(calibrator.model)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    weights: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    was_training = calibrator.model.training
    calibrator.model.eval()
    try:
        for index, batch in enumerate(batches):
            inputs, targets = split_batch(batch)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            use_targets = targets if calibrator.loss_fn is not None else None
            for name, row in calibrator.row_sensitivities(inputs, use_targets, generator, index).items():
                if name in weights:
                    weights[name].append(row)
    finally:
        calibrator.model.train(was_training)
    return weights


# ---- candidates and the search -------------------------------------------------------------------


KeepFn = Callable[[Mapping[str, float]], Mapping[str, torch.Tensor]]


#: A layer is never emptied by a split: a global ranking may ask for it, but nothing would be left to refit.
MAX_LAYER_SPARSITY = 0.995


def _plans(split: Mapping[str, float], pattern: Pattern, keep_fn: KeepFn | None) -> dict[str, LayerPlan]:
    split = {name: min(sparsity, MAX_LAYER_SPARSITY) for name, sparsity in split.items()}
    keep = None if keep_fn is None else keep_fn(split)
    return {
        name: LayerPlan(sparsity=sparsity, pattern=pattern, keep=None if keep is None else keep[name])
        for name, sparsity in split.items()
    }


def reconstruct_best(
    model: nn.Module,
    specs: Mapping[str, LayerSpec],
    candidates: Mapping[str, Mapping[str, float]],
    pattern: Pattern,
    run: ReconstructionRun,
    *,
    keep_fn: KeepFn | None = None,
    divergence: str = "mse",
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    alternative: KeepFn | None = None,
) -> tuple[dict[str, LayerOutcome], str, dict[str, float]]:
    """Reconstruct once per candidate split and keep the one whose outputs stay closest to the dense model.

    Candidates whose masks the OBS sweep chooses are compared through the sweep's own update (no
    final refit, the expensive step), and only the chosen one is reconstructed exactly; with
    ``alternative`` (masks of an importance at given per-layer sparsities) the chosen split is also
    reconstructed with those masks, and the closer of the two is kept. Returns the outcomes, the
    chosen label, and the divergence of everything tried (empty for a single candidate).
    """
    if run.config.refit and run.dense is None:
        run.dense = _dense_reference(model, specs, run.batches)
    if len(candidates) == 1:
        label, split = next(iter(candidates.items()))
        return reconstruct(model, specs, _plans(split, pattern, keep_fn), run)[0], label, {}
    proxy = run.config.refit and keep_fn is None
    reference = ReferenceOutputs(model, run.batches, output_fn, cache_budget(specs))
    compare = _Comparison(reference, divergence, keep_outcomes=not proxy)
    for label, split in candidates.items():
        compare.reconstruct(label, model, specs, _plans(split, pattern, keep_fn), replace(run, exact=not proxy))
    chosen = compare.best_label
    if not proxy:
        return compare.best, chosen, compare.divergences
    if run.dense is not None:  # the chosen split's first-layer sweep is kept: no new sweep of the layer
        run.dense.release_first_factors()
    finalists = {f"{chosen}, refit": None, f"{chosen}, refit, importance masks": alternative}
    final = _Comparison(reference, divergence)
    for label, masks in finalists.items():
        if label.endswith(", refit") or masks is not None:
            final.reconstruct(label, model, specs, _plans(candidates[chosen], pattern, masks), run)
    return final.best, final.best_label, {**compare.divergences, **final.divergences}


class ReferenceOutputs:
    """The unpruned model's outputs on the calibration batches, which allocation candidates are compared
    with: kept while they fit ``budget`` bytes, recomputed from ``model`` (unchanged until the outcomes
    are applied) otherwise. Iterating gives them batch by batch."""

    def __init__(
        self, model: nn.Module, batches: Sequence[Any], output_fn: Callable[[Any], torch.Tensor] | None, budget: int
    ) -> None:
        self.model, self.batches, self.output_fn, self.budget = model, batches, output_fn, budget
        self.kept: dict[int, torch.Tensor] = {}
        self.used = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        from ecp_fast.pruning.allocation import model_outputs

        for index, batch in enumerate(self.batches):
            output = self.kept.get(index)
            if output is None:
                output = model_outputs(self.model, [batch], self.output_fn)[0]
                size = output.numel() * output.element_size()
                if self.used + size <= self.budget:
                    self.kept[index], self.used = output, self.used + size
            yield output


class _Comparison:
    """Divergences of pruned working copies from the dense outputs; keeps the closest outcome.

    Each candidate's outputs are compared batch by batch as they are computed, never all held.
    """

    def __init__(self, reference: ReferenceOutputs, divergence: str, keep_outcomes: bool = True) -> None:
        self.reference, self.kind = reference, divergence
        self.keep_outcomes = keep_outcomes  # False: only the label is wanted (the proxies of a search)
        self.divergences: dict[str, float] = {}
        self.best: dict[str, LayerOutcome] = {}
        self.best_label = ""
        self.best_sweeps: set[tuple] = set()  # the first-layer sweeps the closest candidate used

    def reconstruct(
        self,
        label: str,
        model: nn.Module,
        specs: Mapping[str, LayerSpec],
        plans: Mapping[str, LayerPlan],
        run: ReconstructionRun,
    ) -> None:
        """:func:`reconstruct` and :meth:`add`, the outputs measured while the working copy still replays
        its pruned layers' outputs (only the last layer runs again). Of the first-layer sweeps the dense
        reference keeps, only the closest candidate's stay: only the chosen split is reconstructed again."""
        replay = _replay(specs, run.batches)
        dense = run.dense
        if dense is not None:
            dense.sweeps_used.clear()
        try:
            self.add(label, *_reconstruct(model, specs, plans, run, replay))
        finally:
            replay.remove()
        if dense is not None:
            if self.best_label == label:
                self.best_sweeps = set(dense.sweeps_used)
            dense.retain_first_sweeps(self.best_sweeps)

    def add(self, label: str, outcomes: dict[str, LayerOutcome], work: nn.Module) -> None:
        """Measure ``work`` and keep ``outcomes`` when it is the closest so far (ties: the first)."""
        from ecp_fast.pruning.allocation import iter_outputs, output_divergence

        reference = self.reference
        value = output_divergence(reference, iter_outputs(work, reference.batches, reference.output_fn), self.kind)
        if not self.divergences or value < min(self.divergences.values()):
            self.best, self.best_label = outcomes if self.keep_outcomes else {}, label
        self.divergences[label] = value
        logger.info("allocation candidate %s: divergence %.6g", label, value)
