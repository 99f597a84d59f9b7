"""Compensation by reconstruction: layer by layer, the kept weights (and the bias) absorb what is removed.

The layers of a model are pruned one at a time in forward order. Layer ``k`` sees the inputs that
the already pruned layers ``0 .. k-1`` produce (``x~p = [a_pruned; 1]``); its quadratic is the
sample-weighted Gram matrix ``H = sum_s w_s x~p x~p^T`` (op ``ecp.gram``). The mask is chosen by an
Optimal Brain Surgeon sweep on ``[W | b]`` (the bias column is never pruned) or taken from a
registered importance, and with ``refit`` the kept weights and bias are then solved exactly towards
the *dense* network's pre-activations, through the cross term ``C = sum_s w_s x~p x~d^T``
(docs/method.md, "Compensation by reconstruction").

Sample weights ``w_s`` are 1 (SparseGPT) or the row-mean ``c-bar_s`` of the layer's ECP
sensitivities: weighting by each neuron's own ``c_i^s`` would be zero wherever a ReLU unit is off,
and the compensation would then switch such units on; the row-mean keeps every sample in every row.

Everything is computed on a working copy of the model; the caller's model is changed only when every
layer is done (:func:`apply_outcomes`), so a failure never leaves a half-pruned model.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import prune as torch_prune

from ecp_fast.distributed import all_reduce_sum, is_distributed
from ecp_fast.ops import gram
from ecp_fast.pruning import obs
from ecp_fast.pruning.batches import (
    call_model,
    eval_mode,
    module_device,
    sample_weights,
    split_batch,
    storages,
    to_device,
)
from ecp_fast.pruning.layers import LayerSpec, layer_input, weight_parameter
from ecp_fast.pruning.masks import copy_model, install_mask
from ecp_fast.pruning.replay import CacheBudget, OutputReplay

logger = logging.getLogger(__name__)


Pattern = obs.Pattern


@dataclass(frozen=True)
class ReconstructionConfig:
    """How a reconstructive method chooses and compensates.

    ``weighting``: ``"uniform"`` (``w_s = 1``) or ``"sensitivity"`` (``w_s = c-bar_s``).
    ``refit``: solve the kept weights towards the dense pre-activations after the mask is chosen;
    without it the OBS sweep's own update (towards the layer's output on the pruned inputs) stays.
    ``damp``: dampening of ``H``, a fraction of its mean diagonal about the inputs' means (``obs.damping_scale``).
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


def _layer_inputs(model: nn.Module, module: nn.Module, spec: LayerSpec, inputs: Any) -> torch.Tensor | None:
    """``(N, in)`` inputs of ``module`` for one batch, stopping the forward pass right after it; None
    when the module does not run on this batch (a branch the batch does not take)."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append(spec.inputs_2d(layer_input(spec.name, args).detach()))
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        call_model(model, inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


def forward_order(
    model: nn.Module, specs: Mapping[str, LayerSpec], inputs: Any | Iterable[Any], *, group: Any = None
) -> list[str]:
    """Names of ``specs`` in the order their modules run on ``inputs``, or on each batch's inputs of an
    iterator, taken until every module has run (a layer in a branch the first batch does not take
    runs on a later one); the orders of those batches are merged (:func:`_merged_order`).

    Under ``torch.distributed`` (``group``: None is the default group) it is a collective: the ranks'
    batches are taken in turn (rank 0's first, rank 1's first, ..., as :func:`~ecp_fast.distributed.shard`
    deals them out), so every rank finds the same order, and a layer is missing only when it runs on
    no rank's batches."""
    runs = _batch_runs(model, specs, inputs)
    if is_distributed(group):
        runs = _interleaved_runs(runs, group)
    seen: dict[str, None] = {}  # in order of first appearance
    taken = 0
    while taken < len(runs) and len(seen) < len(specs):
        seen.update(dict.fromkeys(runs[taken]))
        taken += 1
    missing = [name for name in specs if name not in seen]
    if missing:
        raise ValueError(
            f"argument 'layers': layers {missing} ran on none of the calibration batches; leave them out "
            f"(exclude={missing!r}) or calibrate on batches that reach them"
        )
    return _merged_order(runs[:taken], list(seen))


def _batch_runs(model: nn.Module, specs: Mapping[str, LayerSpec], inputs: Any | Iterable[Any]) -> list[list[str]]:
    """The layers of ``specs`` each batch of ``inputs`` (see :func:`forward_order`) runs, in their order,
    batch after batch until every layer has run."""
    batches = inputs if isinstance(inputs, Iterator) else iter([inputs])
    runs: list[list[str]] = []  # the layers each batch ran, in their order
    handles = []
    for name, spec in specs.items():

        def hook(_module: nn.Module, _args: tuple, name: str = name) -> None:
            if name not in runs[-1]:
                runs[-1].append(name)

        handles.append(spec.module.register_forward_pre_hook(hook))
    seen: dict[str, None] = {}  # in order of first appearance
    try:
        with torch.no_grad():
            for batch_inputs in batches:
                runs.append([])
                call_model(model, batch_inputs)
                seen.update(dict.fromkeys(runs[-1]))
                if len(seen) == len(specs):
                    break
    finally:
        for handle in handles:
            handle.remove()
    return runs


def _interleaved_runs(runs: list[list[str]], group: Any) -> list[list[str]]:
    """Every rank's :func:`_batch_runs` (a collective), taken in turn: rank 0's first batch, rank 1's
    first, ..., rank 0's second, ...: the batches' order in one process for round-robin shards."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, runs, group=group)
    longest = max(len(rank_runs) for rank_runs in gathered)
    return [rank_runs[index] for index in range(longest) for rank_runs in gathered if index < len(rank_runs)]


def _merged_order(runs: Sequence[Sequence[str]], seen: list[str]) -> list[str]:
    """One order of the layers that keeps every batch's order (each layer after those it followed in
    some batch), ties going to the first seen; ``seen`` itself where batches contradict each other."""
    after: dict[str, set[str]] = {name: set() for name in seen}
    waiting = dict.fromkeys(seen, 0)  # layers each one still waits for
    for run in runs:
        for before, later in itertools.pairwise(run):
            if later not in after[before]:
                after[before].add(later)
                waiting[later] += 1
    order: list[str] = []
    ready = [name for name in seen if waiting[name] == 0]
    while ready:
        name = min(ready, key=seen.index)
        ready.remove(name)
        order.append(name)
        for later in after[name]:
            waiting[later] -= 1
            if waiting[later] == 0:
                ready.append(later)
    return order if len(order) == len(seen) else seen


def token_weights(inputs: Any, rows: int) -> torch.Tensor | None:
    """0/1 per row from a batch's attention mask (padding never counts), or None."""
    weights = sample_weights(inputs)
    return weights if weights is not None and weights.numel() == rows else None


#: The activations a reconstruction keeps for reuse (the dense model's layer inputs, the same for every
#: allocation candidate; the working copy's replayed outputs; the dense outputs candidates are compared
#: with) fit, all together, this many times the largest Gram matrix of the layers reconstructed. Memory
#: then stays the model and one layer's ``H`` (times a constant) however many calibration samples
#: there are; what does not fit is recomputed. The default of ``activation_cache`` (``Pruner.prune``):
#: 0 recomputes everything (the least memory, the most time), more keeps more until everything fits.
CACHE_GRAMS = 1.0


def cache_budget(specs: Mapping[str, LayerSpec], grams: float | None = None) -> int:
    """Bytes the activation caches of a reconstruction of ``specs`` share: ``grams`` times the largest
    float64 Gram matrix of its layers (None: :data:`CACHE_GRAMS`)."""
    grams = CACHE_GRAMS if grams is None else grams
    budget = grams * max((spec.fan_in + 1) ** 2 for spec in specs.values()) * 8
    return int(min(budget, 2**62))  # any size holds everything that fits into memory beyond this


def _cache(specs: Mapping[str, LayerSpec], batches: Sequence[Any], grams: float | None) -> CacheBudget:
    """The budget of a reconstruction's caches, in which the calibration inputs as the caller holds
    them (and views of them) cost nothing."""
    return CacheBudget(cache_budget(specs, grams), storages([split_batch(batch)[0] for batch in batches]))


class DenseReference:
    """The dense model whose pre-activations a refit aims at, with a cache of its layer inputs.

    It is the caller's model itself, which nothing changes until the outcomes are applied (no copy is
    made; a reconstruction holds it in eval mode while it runs). Its layer inputs are kept within
    ``budget`` (a :class:`CacheBudget` other caches may share); ``first`` holds what allocation
    candidates share about the first layer pruned (see :class:`FirstLayer`), when a search runs.
    """

    def __init__(self, model: nn.Module, budget: int | CacheBudget, resident: set[int] | None = None) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.budget = CacheBudget.of(budget, resident)
        self.cache: dict[tuple[str, int], torch.Tensor] = {}
        self.cached_bytes = 0
        self.first: FirstLayer | None = None

    def layer_inputs(self, spec: LayerSpec, index: int, inputs: Any) -> torch.Tensor | None:
        """The dense ``(N, in)`` inputs of layer ``spec`` on batch ``index`` (whose inputs are ``inputs``),
        None when the layer does not run on that batch."""
        key = (spec.name, index)
        if key in self.cache:
            return self.cache[key]
        dense_inputs = _layer_inputs(self.model, self.modules[spec.name], spec, inputs)
        if dense_inputs is None:
            return None
        size = self.budget.cost(dense_inputs)  # a view of a batch: free
        # every candidate reads these again (a replayed output serves one candidate): they come first
        if self.budget.take(size, evict=True):
            self.cache[key] = dense_inputs
            self.cached_bytes += size
        return dense_inputs


class FirstLayer:
    """What every allocation candidate shares about the first layer pruned, whose inputs no pruning has
    touched yet (prefix caching).

    Its quadratic ``(H, C)`` is kept once an exact reconstruction computes it (the next candidate
    refits the layer from it again); while candidates are compared through their sweeps alone, only
    the sweep's inverse factor is kept instead (it serves every sweep; ``H`` is made for it and let
    go), and of the sweeps only the closest candidate's (:meth:`retain_sweeps`): its exact
    reconstruction sweeps the layer alike. Sweeps are shared only from the dense weights.
    """

    def __init__(self) -> None:
        self.grams: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.factors: dict[tuple, obs.InverseFactor] = {}
        self.sweeps: dict[tuple, obs.ObsResult] = {}
        #: Keys of the sweeps the latest reconstruction used (see :meth:`retain_sweeps`).
        self.used: set[tuple] = set()

    def sweep(self, key: tuple) -> obs.ObsResult | None:
        """The sweep kept under ``key`` (shared, not copied: a sweep's result is only read), or None."""
        result = self.sweeps.get(key)
        if result is not None:
            self.used.add(key)
        return result

    def keep_sweep(self, key: tuple, result: obs.ObsResult) -> None:
        """Keep a sweep of the layer from its dense weights for :meth:`sweep`."""
        self.sweeps.setdefault(key, result)
        self.used.add(key)

    def retain_sweeps(self, keys: set[tuple]) -> None:
        """Drop every kept sweep but those under ``keys`` (the closest candidate's so far)."""
        for key in [key for key in self.sweeps if key not in keys]:
            del self.sweeps[key]

    def release_factors(self) -> None:
        """Drop the inverse factors once no more sweeps of the layer are expected."""
        self.factors.clear()


def layer_grams(
    work: nn.Module,
    dense: DenseReference | None,
    spec: LayerSpec,
    batches: Sequence[Any],
    sample_weights: Sequence[torch.Tensor | None] | None,
    *,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``H`` of the layer's inputs in ``work`` and, with a ``dense`` reference, the cross term ``C``.

    Where the layer's inputs in ``work`` are still the dense ones (nothing before it was pruned), ``C``
    is ``H``: it is then the same tensor, neither computed nor stored a second time. A batch on which
    the layer does not run (in ``work``, or in the dense model) adds nothing.

    Under ``torch.distributed`` (``group``: None is the default group) it is a collective: each rank
    sums its own batches, and the sums are added across the ranks (:func:`_summed_over_ranks`), so
    every rank holds the ``H`` and ``C`` of all the ranks' batches.
    """
    work_module = dict(work.named_modules())[spec.name]
    device = module_device(work)
    hessian: torch.Tensor | None = None
    cross: torch.Tensor | None = None  # None while every batch's dense inputs were the pruned ones
    with torch.no_grad():
        for index, batch in enumerate(batches):
            inputs = to_device(split_batch(batch)[0], device)
            pruned_inputs = _layer_inputs(work, work_module, spec, inputs)
            dense_inputs = None if dense is None or pruned_inputs is None else dense.layer_inputs(spec, index, inputs)
            if pruned_inputs is None or (dense is not None and dense_inputs is None):
                continue  # a branch this batch does not take: the layer's samples have no part of it
            weight = None if sample_weights is None else sample_weights[index]
            weight = token_weights(inputs, pruned_inputs.shape[0]) if weight is None else weight
            weight = None if weight is None else weight.to(device=pruned_inputs.device, dtype=pruned_inputs.dtype)
            part = gram(pruned_inputs, None, weight, float64=True)
            if dense_inputs is not None:
                same = dense_inputs is pruned_inputs or torch.equal(dense_inputs, pruned_inputs)
                if cross is None and not same:
                    cross = torch.zeros_like(part) if hessian is None else hessian.clone()
                if cross is not None:
                    cross.add_(part if same else gram(pruned_inputs, dense_inputs, weight, float64=True))
            hessian = part if hessian is None else hessian.add_(part)  # in place: no fresh (in + 1)^2 per batch
            del part  # not alive while the next batch's part is made
    if is_distributed(group):
        hessian, cross = _summed_over_ranks(hessian, cross, spec, device, sample_weights is not None, group)
    if hessian is None:
        raise ValueError(
            f"argument 'batches': layer {spec.name!r} runs on none of them (in the pruned and the dense model alike)"
        )
    return hessian, hessian if cross is None and dense is not None else cross


def _summed_over_ranks(
    hessian: torch.Tensor | None,
    cross: torch.Tensor | None,
    spec: LayerSpec,
    device: torch.device,
    weighted: bool,
    group: Any,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """This rank's ``H`` and ``C`` (:func:`layer_grams`) summed over the ranks of ``group``; every rank
    gets the same tensors (None, None when the layer runs on no rank's batches).

    A rank on none of whose batches the layer runs adds zeros. So does a rank without sample weights
    for the layer (``weighted`` false) while another rank has them: its own sensitivities were 0 on
    every sample (the caller left the layer out, see ``ReconstructionRun.sample_weights``), which
    weighs its samples 0, as one process on all the batches would. ``C`` is made on every rank (as
    ``H``, where it was ``H``) once some rank's ``C`` differs from its ``H``.
    """
    flags = torch.tensor([hessian is not None, cross is not None, weighted], dtype=torch.int64)
    ran, crossed, weighted_somewhere = (bool(flag) for flag in all_reduce_sum(flags, group).tolist())
    if not ran:
        return None, None
    if weighted_somewhere and not weighted:
        hessian = cross = None
    if hessian is None:
        hessian = torch.zeros(spec.fan_in + 1, spec.fan_in + 1, dtype=torch.float64, device=device)
    if crossed and cross is None:
        cross = hessian.clone()
    all_reduce_sum(hessian, group)
    if cross is not None:
        all_reduce_sum(cross, group)
    return hessian, cross


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

    ``sample_weights`` per layer and batch (None, or a layer left out: 1, or the attention mask); ``dense`` the shared
    dense reference (made on first use when the config refits); ``exact=False`` keeps the sweep's own
    update instead of the final refit (the cheap proxy that compares allocation candidates);
    ``add_bias=False`` keeps layers without a bias without one; ``cache`` the budget the run's
    activation caches share (made on first use, ``activation_cache`` times the largest ``H``, see
    :func:`cache_budget`; None: :data:`CACHE_GRAMS`).

    ``group`` is the ``torch.distributed`` process group whose ranks reconstruct together, each from
    its own ``batches`` (None: the default group). Under ``torch.distributed`` with more than one rank
    the Gram matrices, the forward order and the allocation search's divergences are summed or
    agreed across its ranks (every rank must run the same reconstruction), so every rank ends with
    the same masks and weights as one process on all the batches; otherwise nothing is communicated.
    A layer left out of ``sample_weights`` on one rank only (its sensitivities 0 on all of that
    rank's samples) weighs that rank's samples 0.
    """

    config: ReconstructionConfig
    batches: Sequence[Any]
    sample_weights: Mapping[str, Sequence[torch.Tensor | None]] | None = None
    dense: DenseReference | None = None
    exact: bool = True
    add_bias: bool = True
    cache: CacheBudget | None = None
    group: Any = None
    activation_cache: float | None = None


def _layer_quadratic(
    work: nn.Module, spec: LayerSpec, run: ReconstructionRun, first: bool, bias_free: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``H`` and the cross term ``C`` of a layer; an exact reconstruction keeps the first layer's for
    the next allocation candidate (see :class:`FirstLayer`)."""
    shared = run.dense.first if run.dense is not None and first else None
    if shared is not None and spec.name in shared.grams:
        hessian, cross = shared.grams[spec.name]
    else:
        weights = None if run.sample_weights is None else run.sample_weights.get(spec.name)
        dense = run.dense if run.config.refit else None
        hessian, cross = layer_grams(work, dense, spec, run.batches, weights, group=run.group)
        if shared is not None and run.exact:
            shared.grams[spec.name] = (hessian, cross)
    if bias_free:
        hessian, cross = _without_bias(hessian), None if cross is None else _without_bias(cross, columns=False)
    return hessian, cross


Quadratic = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def _refit(
    weight: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor, quadratic: Quadratic, dense: tuple, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    hessian, cross = quadratic()
    dense_weight, dense_bias = dense
    return obs.refit(
        weight, bias, keep, hessian, cross=cross, dense_weight=dense_weight, dense_bias=dense_bias, ridge=ridge
    )


def _sweep_layer(
    weight: torch.Tensor,
    bias: torch.Tensor,
    quadratic: Quadratic,
    plan: LayerPlan,
    run: ReconstructionRun,
    shared: tuple[str, bool] | None,
) -> obs.ObsResult:
    """The OBS sweep of a layer. ``shared`` ``(name, bias_free)`` marks the first layer pruned, swept from
    its dense weights during an allocation search: its inverse factor and sweeps are then shared with
    the other candidates (:class:`FirstLayer`)."""
    config = run.config
    sweep = functools.partial(
        obs.obs_sweep,
        weight,
        bias,
        sparsity=plan.sparsity,
        pattern=plan.pattern,
        block_size=config.block_size,
        damp=config.damp,
        budget=config.budget,
        measure_error=False,
        removed=None if plan.present is None else ~plan.present.to(weight.device),
    )
    first = None if shared is None or run.dense is None else run.dense.first
    if first is None or shared is None:
        return sweep(quadratic()[0])
    pattern = tuple(plan.pattern) if isinstance(plan.pattern, list) else plan.pattern
    key = (*shared, float(plan.sparsity), pattern, config.block_size, config.damp, config.budget)
    result = first.sweep(key)
    if result is None:
        if run.exact:  # the refit needs H as well: it is kept, and the factor made from it is not
            result = sweep(quadratic()[0])
        else:
            result = sweep(None, factor=_first_factor(first, (*shared, config.damp), quadratic))
        first.keep_sweep(key, result)
    return result


def _first_factor(first: FirstLayer, key: tuple, quadratic: Quadratic) -> obs.InverseFactor:
    """The first layer's inverse factor while candidates are swept: made once, from an ``H`` made for
    it alone and handed over (a candidate compared through its sweep never refits the first layer)."""
    factor = first.factors.get(key)
    if factor is None:
        factor = first.factors[key] = obs.inverse_factor([quadratic()[0]], key[-1])
    return factor


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
    The Gram matrices are computed when first needed, and only if needed.
    """
    config = run.config
    quadratic: Quadratic = functools.cache(lambda: _layer_quadratic(work, spec, run, first, bias_free))
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
        from_dense = first and dense[0] is not None and torch.equal(weight, dense[0]) and torch.equal(bias, dense[1])
        shared = (spec.name, bias_free) if from_dense else None
        if not run.exact and shared is not None:  # a proxy needs H only for the factor: it must not hold it
            quadratic = functools.partial(_layer_quadratic, work, spec, run, first, bias_free)
        result = _sweep_layer(weight, bias, quadratic, plan, run, shared)
        keep, weight, bias = result.mask, result.weight, result.bias
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
            zeros = torch.zeros(spec.fan_out, dtype=stored.dtype, device=stored.device)
            module.bias = nn.Parameter(zeros, requires_grad=stored.requires_grad)  # a frozen model stays frozen
            added = True
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(outcome.bias.to(bias.dtype))
    return added


# ---- the driver ----------------------------------------------------------------------------------


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy whose masked weights are folded in, so weights can be written directly."""
    work = copy_model(model)  # a pruned layer's computed weight is no leaf: deepcopy alone refuses it
    for module in work.modules():
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig"):
            torch_prune.remove(module, "weight")
    return work


def reconstruct(
    model: nn.Module, specs: Mapping[str, LayerSpec], plans: Mapping[str, LayerPlan], run: ReconstructionRun
) -> tuple[dict[str, LayerOutcome], nn.Module]:
    """Prune every layer of ``plans`` in forward order on a working copy of ``model``.

    Returns the outcome per layer and the pruned working copy (for evaluation); each outcome's weight
    is the working copy's own tensor (no second copy), so change the copy only after the outcomes are
    applied. ``model`` itself is not changed (:func:`apply_outcomes` does that).
    """
    # the dense reference computes as in evaluation
    with _call(model, specs, run), eval_mode(model), _replaying(run) as replay:
        return _reconstruct(model, specs, plans, run, replay)


@contextlib.contextmanager
def _replaying(run: ReconstructionRun) -> Iterator[OutputReplay]:
    """An output replay within the run's cache budget, removed after (its modules' forward restored)."""
    assert run.cache is not None
    replay = OutputReplay(run.cache)
    try:
        yield replay
    finally:
        replay.remove()


@contextlib.contextmanager
def _call(model: nn.Module, specs: Mapping[str, LayerSpec], run: ReconstructionRun) -> Iterator[None]:
    """The caches' budget and the dense reference of one call, made where the run has none and let go
    after: a run used again (after its outcomes were applied, or on other layers) starts afresh."""
    made_cache, made_dense = run.cache is None, run.dense is None
    if run.cache is None:
        run.cache = _cache(specs, run.batches, run.activation_cache)
    if run.config.refit and run.dense is None:
        run.dense = DenseReference(model, run.cache)
    try:
        yield
    finally:
        if made_cache:
            run.cache = None
        if made_dense:
            run.dense = None


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
    work_specs = {name: LayerSpec(name, dict(work.named_modules())[name], spec.kind) for name, spec in specs.items()}
    device = module_device(work)
    inputs = (to_device(split_batch(batch)[0], device) for batch in run.batches)
    order = [name for name in forward_order(work, work_specs, inputs, group=run.group) if name in plans]
    work.eval()  # a copy: its mode needs no restoring
    replay.install(work_specs[name].module for name in order)
    outcomes: dict[str, LayerOutcome] = {}
    changed = False  # whether a layer before this one was changed (then every later one is refit)
    for position, name in enumerate(order):
        spec = work_specs[name]
        bias_free = not run.add_bias and getattr(spec.module, "bias", None) is None
        present = specs[name].mask_2d()
        plan = plans[name] if present is None else replace(plans[name], present=present != 0)
        try:
            outcome = solve_layer(work, spec, plan, run, first=position == 0, bias_free=bias_free)
        except obs.SingularError as error:
            raise ValueError(
                f"layer {name!r} cannot be reconstructed: its calibration inputs leave its least-squares problem "
                f"singular even after dampening; calibrate on more (or more varied) samples, or leave the layer "
                f"out (exclude=[{name!r}])"
            ) from error
        if not changed and _removes_nothing(outcome.keep, plan.present):
            # Its inputs are the dense ones and it loses no weight: a refit could only add rounding
            # (and a bias of rounding noise to a bias-free layer), so it stays as it is.
            weight, bias = _augmented(spec.module, spec)
            outcome = LayerOutcome(weight=weight, bias=bias, keep=outcome.keep)
        else:
            _write(spec.module, spec, outcome, add_bias=run.add_bias)
            changed = True
        outcomes[name] = _shared_weight(spec, outcome)
        logger.debug("reconstructed %s: sparsity %.4f", name, 1.0 - float(outcome.keep.double().mean()))
    return outcomes, work


def _removes_nothing(keep: torch.Tensor, present: torch.Tensor | None) -> bool:
    """Whether ``keep`` keeps every weight still ``present`` (every weight where there is no mask)."""
    return bool(keep.all()) if present is None else torch.equal(keep, present.to(keep.device))


def _shared_weight(spec: LayerSpec, outcome: LayerOutcome) -> LayerOutcome:
    """``outcome`` with the working copy's own weight (written once, never changed) as its weight: no
    second copy. A weight that has no ``(out, in)`` view (a ``channels_last`` convolution) keeps its own."""
    stored = weight_parameter(spec.module).detach()
    if spec.kind != "conv1d" and not stored.is_contiguous():
        return outcome
    return replace(outcome, weight=spec.as_2d(stored))


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
) -> dict[str, list[torch.Tensor | None]]:
    """``c-bar_s``, the row-mean of each layer's ECP sensitivities, per layer and batch (dense model;
    None for a batch on which the layer does not run).

    ``calibrator`` is a :class:`~ecp_fast.pruning.calibration.Calibrator` of the dense model; its
    sensitivity decides ``c`` (``local`` gives ones); padding tokens get 0.
    """
    device = module_device(calibrator.model)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    weights: dict[str, list[torch.Tensor | None]] = {name: [] for name in names}
    with eval_mode(calibrator.model):
        for index, batch in enumerate(batches):
            inputs, targets = split_batch(batch)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            use_targets = targets if calibrator.loss_fn is not None else None
            rows = calibrator.row_sensitivities(inputs, use_targets, generator, index)
            for name, per_batch in weights.items():
                per_batch.append(rows.get(name))  # None where the layer does not run on this batch
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

    ``model`` itself is the dense reference (never copied, held in eval mode while the candidates
    run, its modes restored after) and is not changed; the caches of all candidates share one
    budget (:func:`cache_budget`).
    """
    if len(candidates) == 1:
        label, split = next(iter(candidates.items()))
        return reconstruct(model, specs, _plans(split, pattern, keep_fn), run)[0], label, {}
    with _call(model, specs, run), eval_mode(model), _first_layer_shared(run):
        assert run.cache is not None
        proxy = run.config.refit and keep_fn is None
        reference = ReferenceOutputs(model, run.batches, output_fn, run.cache)
        reference.keep_first()
        compare = _Comparison(reference, divergence, keep_outcomes=not proxy, group=run.group)
        for label, split in candidates.items():
            compare.reconstruct(label, model, specs, _plans(split, pattern, keep_fn), replace(run, exact=not proxy))
        if not proxy:
            return compare.best, compare.best_label, compare.divergences
        final = _finals(compare, model, specs, candidates[compare.best_label], pattern, run, alternative)
        return final.best, final.best_label, {**compare.divergences, **final.divergences}


@contextlib.contextmanager
def _first_layer_shared(run: ReconstructionRun) -> Iterator[None]:
    """While the candidates of a search run, the dense reference keeps what they share about the
    first layer (:class:`FirstLayer`); it is let go after."""
    if run.dense is not None:
        run.dense.first = FirstLayer()
    try:
        yield
    finally:
        if run.dense is not None:
            run.dense.first = None


def _finals(
    compare: _Comparison,
    model: nn.Module,
    specs: Mapping[str, LayerSpec],
    split: Mapping[str, float],
    pattern: Pattern,
    run: ReconstructionRun,
    alternative: KeepFn | None,
) -> _Comparison:
    """The chosen split reconstructed exactly, with the sweep's masks and with ``alternative``'s."""
    first = None if run.dense is None else run.dense.first
    if first is not None:  # the chosen split's sweep is kept: no new sweep of the first layer
        first.release_factors()
    chosen = compare.best_label
    finalists = {f"{chosen}, refit": None, f"{chosen}, refit, importance masks": alternative}
    final = _Comparison(compare.reference, compare.kind, group=compare.group)
    for label, masks in finalists.items():
        if label.endswith(", refit") or masks is not None:
            final.reconstruct(label, model, specs, _plans(split, pattern, masks), run)
        if first is not None:  # the next finalist's masks are given: no sweep
            first.sweeps.clear()
    return final


class ReferenceOutputs:
    """The unpruned model's outputs on the calibration batches, which allocation candidates are compared
    with: kept while they fit ``budget`` bytes, recomputed from ``model`` (unchanged until the outcomes
    are applied) otherwise. Iterating gives them batch by batch."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        output_fn: Callable[[Any], torch.Tensor] | None,
        budget: int | CacheBudget,
    ) -> None:
        self.model, self.batches, self.output_fn = model, batches, output_fn
        self.budget = CacheBudget.of(budget)
        self.kept: dict[int, torch.Tensor] = {}
        self.used = 0

    def keep_first(self) -> None:
        """Keep the outputs of the batches in order while they fit, before any other cache fills: every
        candidate reads each of them and recomputing one is a whole forward pass, so for their bytes
        they spare the most (a model's output is mostly the smallest of its activations)."""
        from ecp_fast.pruning.allocation import model_outputs

        size = 0  # the last output's: batches are about alike, so one that would not fit is not computed
        for index, batch in enumerate(self.batches):
            if self.budget.used + max(size, 1) > self.budget.limit:
                return
            output = model_outputs(self.model, [batch], self.output_fn)[0]
            size = self.budget.cost(output)
            if not self.budget.take(size, evict=True):
                return
            self.kept[index], self.used = output, self.used + size

    def __iter__(self) -> Iterator[torch.Tensor]:
        from ecp_fast.pruning.allocation import model_outputs

        for index, batch in enumerate(self.batches):
            output = self.kept.get(index)
            if output is None:
                output = model_outputs(self.model, [batch], self.output_fn)[0]
                size = self.budget.cost(output)
                if self.budget.take(size, evict=True):  # read for every candidate, as the dense inputs
                    self.kept[index], self.used = output, self.used + size
            yield output


class _Comparison:
    """Divergences of pruned working copies from the dense outputs; keeps the closest outcome.

    Each candidate's outputs are compared batch by batch as they are computed, never all held; under
    ``torch.distributed`` the divergence is that of every rank's batches (``group``, see
    :func:`~ecp_fast.pruning.allocation.output_divergence`), so every rank keeps the same candidate.
    """

    def __init__(
        self, reference: ReferenceOutputs, divergence: str, keep_outcomes: bool = True, group: Any = None
    ) -> None:
        self.reference, self.kind, self.group = reference, divergence, group
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
        its pruned layers' outputs (only the last layer runs again). Of the first-layer sweeps kept
        (:class:`FirstLayer`), only the closest candidate's stay: only the chosen split is reconstructed again."""
        first = None if run.dense is None else run.dense.first
        if first is not None:
            first.used.clear()
        with _replaying(run) as replay:
            self.add(label, *_reconstruct(model, specs, plans, run, replay))
        if first is not None:
            if self.best_label == label:
                self.best_sweeps = set(first.used)
            first.retain_sweeps(self.best_sweeps)

    def add(self, label: str, outcomes: dict[str, LayerOutcome], work: nn.Module) -> None:
        """Measure ``work`` and keep ``outcomes`` when it is the closest so far (ties: the first)."""
        from ecp_fast.pruning.allocation import iter_outputs, output_divergence

        reference = self.reference
        outputs = iter_outputs(work, reference.batches, reference.output_fn)
        value = output_divergence(reference, outputs, self.kind, group=self.group)
        if not self.divergences or value < min(self.divergences.values()):
            self.best, self.best_label = outcomes if self.keep_outcomes else {}, label
        self.divergences[label] = value
        logger.info("allocation candidate %s: divergence %.6g", label, value)
