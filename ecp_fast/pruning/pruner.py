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
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ecp_fast._deprecation import renamed_keyword
from ecp_fast.distributed import (
    CALIBRATED_WITH_KEY,
    announce_failure,
    check_agreement,
    checked_seed,
    is_distributed,
    synchronize_calibration,
)
from ecp_fast.pruning.allocation import (
    ALLOCATIONS,
    DIVERGENCES,
    candidate_splits,
    capped_split,
    floored_split,
    resolve_divergence,
    split_from_keep,
    uniform_split,
)
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
from ecp_fast.pruning.importance import (
    IMPORTANCES,
    Importance,
    Method,
    ScoringContext,
    check_importances,
    check_nonlinear_size,
    get_method,
)
from ecp_fast.pruning.masks import check_maskable, install_mask
from ecp_fast.pruning.reconstruction import (
    MAX_LAYER_SPARSITY,
    RECONSTRUCTIVE_METHODS,
    REFIT_ONLY,
    ReconstructionRun,
    apply_outcomes,
    reconstruct_best,
    sensitivity_weights,
)
from ecp_fast.pruning.report import LayerReport, PruneReport
from ecp_fast.pruning.selection import (
    Scope,
    parse_scope,
    resolve_sparsity,
    select_weights,
    step_sparsities,
)
from ecp_fast.pruning.transaction import model_transaction

if TYPE_CHECKING:
    from ecp_fast.pruning.structured import StructuredReport

#: ``scope="neuron"`` is served by :func:`ecp_fast.pruning.structured.prune_neurons`, which builds on
#: this module and registers itself here, so that the dependency runs one way only.
_NEURON_PRUNING: Callable[..., Any] | None = None


def register_neuron_pruning(function: Callable[..., Any]) -> None:
    """Let ``Pruner.prune(scope="neuron")`` call ``function(pruner, ratio, method=..., scope=...)``, which
    removes hidden units only where the producer (the layer whose outputs go) is one of ``pruner.layers``."""
    global _NEURON_PRUNING
    _NEURON_PRUNING = function


logger = logging.getLogger(__name__)

# ---- the pruner ------------------------------------------------------------------------------------


class Pruner:
    """Elimination-compensation pruning (and its baselines) of a model's Linear and Conv2d layers.

    Args:
        model: the network to prune, in place.
        sensitivity: where the sensitivities come from: ``"output"`` (exact Jacobian rows up to 32
            outputs, Rademacher probes above or when ``probes`` is given), ``"loss"`` (per-sample loss
            gradients, needs ``loss_fn`` and targets) or ``"local"`` (``c = 1``, no backward pass).
        probes: number of Rademacher probes, or None for exact rows where the outputs are few.
        layers: names of the layers to prune; None prunes every supported Linear, Conv2d and
            transformers ``Conv1D``, except output heads and layers whose weight is tied to another
            parameter (as Wanda and SparseGPT do).
        exclude: names or glob patterns of layers to leave out (a parent's pattern covers its children).
        include_output_head: also prune the output head (``lm_head``) when it is not tied.
        process_group: the ``torch.distributed`` group whose ranks' statistics :meth:`calibrate`
            merges (None: the default group, when one is initialised).
        keep_inputs: keep up to 1,024 calibration inputs for the ``nonlinear`` baseline (the only
            method that replays them). None keeps them in a single process and not in a
            distributed run, where they would be gathered from every rank for nothing.
        add_bias: let compensation add a bias to layers that have none; False prunes those layers
            without compensation (for architectures that cannot hold the bias, see
            :func:`ecp_fast.pruning.hf.prepare_for_save_pretrained`).
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
        *,
        exclude: Sequence[str] | str | None = None,
        include_output_head: bool = False,
        add_bias: bool = True,
        process_group: Any = None,
        keep_inputs: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
        if sensitivity not in SENSITIVITIES:
            raise ValueError(f"argument 'sensitivity' must be one of {SENSITIVITIES}, got {sensitivity!r}")
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
            raise ValueError(f"argument 'probes' must be a positive integer or None, got {probes!r}")
        _check_switches(include_output_head=include_output_head, add_bias=add_bias)
        if keep_inputs is not None:
            _check_switches(keep_inputs=keep_inputs)
        self.model = model
        self.sensitivity = sensitivity
        self.probes = probes
        self.layers: dict[str, LayerSpec] = resolve_layers(
            model, layers, exclude, include_output_head=include_output_head
        )
        self.add_bias = bool(add_bias)
        self.process_group = process_group
        self.keep_inputs = not is_distributed(process_group) if keep_inputs is None else bool(keep_inputs)
        self.output_fn = output_fn
        self.seed = checked_seed(seed)
        self.progress = progress
        self.calibration: CalibrationResult | None = None
        self._calibrated_state: tuple = ()  # _model_state when calibrated
        self._batches: Iterable[Any] | None = None
        self._loss_fn: LossFn | None = None
        self._loss_reduction: str | None = None

    @property
    def statistics(self) -> dict[str, LayerStatistics]:
        """Accumulated statistics per layer (empty before :meth:`calibrate`)."""
        return {} if self.calibration is None else self.calibration.statistics

    # ---- calibration ----------------------------------------------------------------------------

    def calibrate(
        self,
        batches: Iterable[Any],
        loss_fn: LossFn | None = None,
        loss_reduction: str | None = None,
        *,
        row_sensitivities: bool = False,
    ) -> CalibrationResult:
        """Stream the calibration batches (inputs, or ``(inputs, targets)``) through the model.

        ``loss_fn(outputs, targets)`` enables the ``loss`` sensitivity and the ``gradient`` and
        ``taylor`` baselines; a mean-reduced loss is rescaled to a per-sample sum (see
        :class:`~ecp_fast.pruning.calibration.Calibrator`). ``row_sensitivities`` also keeps each
        batch's per-row sensitivities (``N`` float64 values per layer and batch), which
        ``method="ecp-obs"`` would otherwise compute in a second pass over the batches; the batches
        are then kept as they came (a list), since they must be paired with the very samples they
        were computed on (a shuffling ``DataLoader`` would bring others). The model's weights are
        not modified; on error the previous statistics stay in place.
        """
        if row_sensitivities and not isinstance(batches, (list, tuple)):
            batches = list(batches)
        calibrator = self._calibrator(loss_fn, loss_reduction)
        # Under torch.distributed every rank streams its own shard; the merge makes the statistics,
        # and so the scores, masks and biases, identical on all ranks (a no-op in one process).
        try:
            run = calibrator.run(batches, progress=self.progress, row_sensitivities=row_sensitivities)
        except Exception as error:
            announce_failure(error, self.process_group)  # the other ranks raise too instead of waiting
            raise
        run.extra[CALIBRATED_WITH_KEY] = (self.sensitivity, self.probes)  # the ranks must agree on these
        result = synchronize_calibration(run, group=self.process_group)
        self._calibrated_state = _model_state(self.model)
        self.calibration = result
        self._batches = batches
        self._loss_fn = loss_fn
        self._loss_reduction = loss_reduction
        return result

    def _calibrator(self, loss_fn: LossFn | None, loss_reduction: str | None) -> Calibrator:
        """A calibrator for this pruner; ``loss_reduction`` None reads ``loss_fn.reduction`` (default
        ``"mean"``) for this call alone, whatever an earlier call was given."""
        return Calibrator(
            self.model,
            self.layers,
            sensitivity=self.sensitivity,
            probes=self.probes,
            loss_fn=loss_fn,
            loss_reduction=loss_reduction,
            output_fn=self.output_fn,
            seed=self.seed,
            keep_inputs=self.keep_inputs,
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
        if chosen.name == "nonlinear" and not self.keep_inputs:
            raise RuntimeError(
                "method 'nonlinear' replays the calibration inputs: create the Pruner with keep_inputs=True "
                "(they are not kept by default in a distributed run)"
            )
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
        activation_cache: float | None = None,
    ) -> PruneReport | StructuredReport:
        """Remove the least important weights, compensate biases, and install the masks.

        Args:
            sparsity: target fraction of zero weights in ``[0, 1)`` (default 0.9); for an ``"N:M"``
                scope it is implied by the pattern (pass None or ``1 - N/M``).
            method: a registered importance method (``ecp``, ``obd``, ``magnitude``, ``gradient``,
                ``taylor``, ``wanda``, ``random``, ``nonlinear``) or a reconstructive one (``sparsegpt``,
                ``ecp-obs``).
            scope: ``"global"`` (one ranking over all layers), ``"layer"`` (the same sparsity in
                every layer), ``"row"`` (per output neuron), ``"N:M"`` (keep N of every M
                consecutive inputs of a neuron) or ``"neuron"`` (remove whole hidden units and
                shrink the model; ``sparsity`` is then the fraction of hidden units removed, see
                :func:`ecp_fast.pruning.structured.prune_neurons`; only hidden layers whose producer
                is one of the pruner's layers shrink, so ``layers=`` and ``exclude=`` hold).
            steps: prune iteratively on a geometric schedule of the remaining density, recalibrating
                on the same batches between steps (they must be re-iterable, e.g. a list or DataLoader).
            importances: precomputed :meth:`importances` for the current weights (``steps=1`` only),
                to prune copies of one model at several sparsities without scoring again.
            reconstruct: after the masks are chosen, refit every layer in forward order towards the
                dense network's pre-activations (:mod:`ecp_fast.pruning.reconstruction`). Implied by
                the reconstructive methods ``sparsegpt`` and ``ecp-obs``.
            allocation: the split of a global scope's total across layers when reconstructing:
                ``"global"``, ``"uniform"`` or ``"search"`` (:mod:`ecp_fast.pruning.allocation`); by
                default search for ``ecp-obs``, uniform for ``sparsegpt``, else global (others: uniform).
            divergence: the search's measure between dense and pruned outputs on the calibration
                batches: ``"kl"``, ``"mse"`` or ``"auto"`` (KL when the targets are class indices and the
                output has an axis of two or more classes beside them, else MSE).
            activation_cache: memory a reconstruction may keep activations in for reuse, in sizes of
                the largest layer's float64 Gram matrix ``H`` (default 1): 0 recomputes every activation
                (the least memory, the longest time), more is faster until all fit; the result is the same.

        Returns:
            A :class:`PruneReport` (a :class:`~ecp_fast.pruning.structured.StructuredReport` for
            ``scope="neuron"``). Removed weights stay out of later selections.
        """
        if method in RECONSTRUCTIVE_METHODS or reconstruct is True or steps != 1:  # collectives follow
            call = (sparsity, method, scope, steps, importances is not None, reconstruct, allocation, divergence)
            check_agreement((*call, activation_cache), self.process_group, "Pruner.prune")  # every rank alike
        _check_reconstruction_request(method, reconstruct, allocation, divergence, scope, activation_cache)
        if scope == "neuron":
            return self._prune_neurons(sparsity, method, steps, importances, reconstruct)
        if method in RECONSTRUCTIVE_METHODS or reconstruct:
            return self._prune_reconstructive(
                sparsity, method, scope, steps, importances, allocation, divergence, activation_cache=activation_cache
            )
        return self._prune_masks(sparsity, method, scope, steps, importances)

    def _prune_masks(
        self, sparsity: float | None, method: str, scope: str, steps: int, importances: Mapping[str, Importance] | None
    ) -> PruneReport:
        """Masks chosen by an importance, biases compensated, in ``steps`` (see :meth:`prune`)."""
        request = self._validate(sparsity, method, scope, steps, importances)
        self._warn_if_sparser(request.target)
        calibration = self.calibration
        with model_transaction(self.model) as transaction:
            transaction.on_rollback(lambda: setattr(self, "calibration", calibration))
            before = {name: _bias_copy(spec.module) for name, spec in self.layers.items()}
            added = self._run_steps(request)
        return self._report(method, scope, request.target, steps, before, added)

    def _prune_neurons(
        self,
        sparsity: float | None,
        method: str,
        steps: int,
        importances: Mapping[str, Importance] | None,
        reconstruct: bool,
    ) -> StructuredReport:
        """``scope="neuron"``: whole hidden units removed (see :meth:`prune`)."""
        _check_neuron_request(sparsity, method, reconstruct)
        if steps != 1 or importances is not None:
            raise ValueError(
                "argument 'scope': scope='neuron' prunes in one step from the calibrated statistics "
                f"(steps=1, importances=None), got steps={steps!r} and "
                f"importances={'given' if importances else None}"
            )
        if _NEURON_PRUNING is None:
            raise RuntimeError("scope='neuron' needs ecp_fast.pruning.structured, which was not imported")
        return _NEURON_PRUNING(self, 0.5 if sparsity is None else sparsity, method=method, scope="global")

    def _validate(
        self, sparsity: float | None, method: str, scope: str, steps: int, importances: Mapping[str, Importance] | None
    ) -> _Request:
        """Every check that can be made before the model is touched."""
        chosen = get_method(method)
        parsed_scope = parse_scope(scope)
        target = resolve_sparsity(sparsity, parsed_scope)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"argument 'steps' must be a positive integer, got {steps!r}")
        if steps > 1 and parsed_scope.kind == "n:m":
            raise ValueError(f"argument 'steps': an N:M scope prunes in one step, got steps={steps}")
        if importances is not None:
            if steps != 1:
                raise ValueError(f"argument 'importances' can only be given with steps=1, got steps={steps}")
            check_importances(importances, self.layers, chosen.compensates)
        else:
            self._check_ready(chosen)
        if steps > 1 and chosen.needs_calibration:
            batches = self._batches
            if batches is None or iter(batches) is batches:
                raise ValueError(
                    f"argument 'steps': steps={steps} recalibrates between steps and needs re-iterable batches "
                    "(a list or DataLoader), but calibrate() was given a one-shot iterator"
                )
        self._check_layers_fit(parsed_scope)
        return _Request(chosen, parsed_scope, target, steps, importances)

    def _check_layers_fit(self, scope: Scope) -> None:
        """Every layer can take a mask, and an N:M pattern's groups tile its inputs."""
        for name, spec in self.layers.items():
            check_maskable(spec.module, name)
            if scope.kind == "n:m" and spec.fan_in % scope.m:
                raise ValueError(
                    f"argument 'scope': pattern {scope.n}:{scope.m} needs the input size of layer {name!r} to be a "
                    f"multiple of {scope.m}, got {spec.fan_in}"
                )

    def _warn_if_sparser(self, target: float) -> None:
        keep = [self._keep_mask(spec) for spec in self.layers.values()]
        current = 1.0 - sum(int(mask.sum()) for mask in keep) / sum(mask.numel() for mask in keep)
        if current > target + 1e-12:
            warnings.warn(
                f"the layers are already {current:.4f} sparse, above the requested sparsity {target:.4f}: no weight "
                "is restored, and only a layer (or row) still below its share of the target loses more (the "
                "report shows the sparsity the layers have)",
                UserWarning,
                stacklevel=4,
            )

    def _run_steps(self, request: _Request) -> list[str]:
        """Score, select and apply each step; masks are installed after the last. Returns layers given a bias."""
        added: list[str] = []
        keep = {name: self._keep_mask(spec) for name, spec in self.layers.items()}
        total = sum(mask.numel() for mask in keep.values())
        initial_density = sum(int(mask.sum()) for mask in keep.values()) / total
        schedule = step_sparsities(initial_density, request.target, request.steps)
        progress = tqdm(schedule, desc="prune", disable=not self.progress or request.steps == 1, leave=False)
        for step, step_sparsity in enumerate(progress, start=1):
            if step > 1 and request.method.needs_calibration:
                assert self._batches is not None
                self.calibrate(self._batches, self._loss_fn, self._loss_reduction)
            scores = request.importances if request.importances is not None else self.importances(request.method.name)
            removed = select_weights(
                {name: scores[name].score for name in self.layers}, keep, step_sparsity, request.scope
            )
            # Everything of this step is computed; only now touch the model.
            for name, spec in self.layers.items():
                bias_delta = scores[name].bias_delta if request.method.compensates else None
                if self._apply(spec, removed[name], bias_delta):
                    added.append(name)
                keep[name] = keep[name] & ~removed[name]
            logger.info(
                "step %d/%d (%s): sparsity %.4f",
                step,
                request.steps,
                request.method.name,
                1.0 - sum(int(mask.sum()) for mask in keep.values()) / total,
            )
        for name, spec in self.layers.items():
            stored = weight_parameter(spec.module)
            install_mask(
                spec.module, spec.mask_to_weight_shape(keep[name]).to(device=stored.device, dtype=stored.dtype)
            )
        return added

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
        *,
        activation_cache: float | None,
    ) -> PruneReport:
        """Masks and compensation by layer-wise reconstruction (see :meth:`prune`)."""
        config = RECONSTRUCTIVE_METHODS.get(method, REFIT_ONLY)
        parsed_scope = parse_scope(scope)
        target = resolve_sparsity(sparsity, parsed_scope)
        allocation = self._check_reconstructive(method, parsed_scope, steps, importances, allocation)
        _warn_beyond_reconstruction(target)
        self._warn_if_sparser(target)
        batches = self._reconstruction_batches()
        pattern: Any = {"row": "row", "n:m": (parsed_scope.n, parsed_scope.m)}.get(parsed_scope.kind, "unstructured")
        scores = None
        if method not in RECONSTRUCTIVE_METHODS:
            scores = {name: importance.score for name, importance in self.importances(method).items()}
        elif allocation in ("global", "search") and self.calibration is not None:
            scores = {name: importance.score for name, importance in self.importances("ecp").items()}
        candidates = self._allocation_candidates(allocation, target, parsed_scope, scores)
        keep_fn = None if scores is None or method in RECONSTRUCTIVE_METHODS else self._keep_for(scores, parsed_scope)
        weights = self._sensitivity_weights(batches) if config.weighting == "sensitivity" else None
        alternative = None
        if config.alternative is not None and allocation == "search" and self.calibration is not None:
            if config.alternative == "ecp" and scores is not None:
                method_scores = scores  # a reconstructive method's scores above are ECP's
            else:
                method_scores = {
                    name: importance.score for name, importance in self.importances(config.alternative).items()
                }
            alternative = self._keep_for(method_scores, parsed_scope)
        run = ReconstructionRun(config, batches, weights, add_bias=self.add_bias, group=self.process_group)
        run.activation_cache = activation_cache
        kind, output_fn = resolve_divergence(divergence, batches, self.model, self.output_fn, group=self.process_group)
        outcomes, chosen, divergences = reconstruct_best(
            self.model,
            self.layers,
            candidates,
            pattern,
            run,
            keep_fn=keep_fn,
            divergence=kind,
            output_fn=output_fn,
            alternative=alternative,
        )
        before = {name: _bias_copy(spec.module) for name, spec in self.layers.items()}
        with model_transaction(self.model):
            added = apply_outcomes(self.layers, outcomes, add_bias=self.add_bias)
        report = self._report(method, scope, target, 1, before, added)
        report.allocation, report.divergences = allocation, divergences
        report.candidate = chosen if len(candidates) > 1 else None
        return report

    def _check_reconstructive(
        self, method: str, scope: Scope, steps: int, importances: Any, allocation: str | None
    ) -> str:
        if method not in RECONSTRUCTIVE_METHODS:
            get_method(method)  # a clear error for an unknown name
        if importances is not None:
            asked = f"method={method!r}" if method in RECONSTRUCTIVE_METHODS else "reconstruct=True"
            raise ValueError(
                f"argument 'importances': reconstructive pruning ({asked}) chooses the masks while it "
                "refits each layer in turn from the calibration batches, so precomputed importances do not apply; "
                f"expected importances=None, got a {type(importances).__name__}"
            )
        if steps != 1:
            raise ValueError(
                f"argument 'steps': reconstructive pruning runs in one step from the calibration batches "
                f"(steps=1), got steps={steps!r}"
            )
        if allocation is not None and allocation not in ALLOCATIONS:
            raise ValueError(f"argument 'allocation' must be one of {ALLOCATIONS} or None, got {allocation!r}")
        self._check_layers_fit(scope)
        if scope.kind in ("layer", "row", "n:m"):  # the scope gives every layer the same sparsity
            if allocation not in (None, "uniform"):
                shown = f"{scope.n}:{scope.m}" if scope.kind == "n:m" else scope.kind
                raise ValueError(
                    f"argument 'allocation': scope={shown!r} prunes every layer to the same sparsity "
                    f"(allocation='uniform'), got allocation={allocation!r}; scope='global' lets layers differ"
                )
            return "uniform"
        if allocation is None:
            default = {"ecp-obs": "search", "sparsegpt": "uniform"}
            return default.get(method, "global")
        return allocation

    def _sensitivity_weights(self, batches: list[Any]) -> dict[str, list[torch.Tensor | None]]:
        """Each layer's row sensitivities per batch: those calibration kept, while the model is as it
        was calibrated (the same passes would give the same values), else a pass over the batches."""
        kept = None if self.calibration is None else self.calibration.row_sensitivities
        if kept is not None and len(kept) == len(batches) and self._calibrated_state == _model_state(self.model):
            weights = {name: [rows.get(name) for rows in kept] for name in self.layers}  # None: did not run
        else:
            weights = sensitivity_weights(
                self._calibrator(self._loss_fn, self._loss_reduction), batches, self.layers, self.seed
            )
        return _reaching_the_output(weights)

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
        """Candidate per-layer sparsities; a layer never goes below the sparsity its mask already has
        (the search's candidates still meet the total where they can, see :func:`floored_split`)."""
        sizes = {name: spec.fan_out * spec.fan_in for name, spec in self.layers.items()}
        keep = {name: self._keep_mask(spec) for name, spec in self.layers.items()}
        global_split = None
        if scores is not None and scope.kind in ("global", "layer"):
            removed = select_weights(scores, keep, target, Scope("global"))
            global_split = split_from_keep({name: keep[name] & ~removed[name] for name in keep})
        if allocation == "uniform":
            candidates = {"uniform": uniform_split(sizes, target)}
        elif allocation == "global":
            if global_split is None:
                raise RuntimeError("allocation='global' ranks ECP importances: call Pruner.calibrate(batches) first")
            candidates = {"global": global_split}
        else:
            candidates = candidate_splits(sizes, target, global_split)
        # a layer is never emptied (MAX_LAYER_SPARSITY): what a split asks beyond that goes to the others
        candidates = {
            label: capped_split(split, MAX_LAYER_SPARSITY, sizes, target) for label, split in candidates.items()
        }
        floor = split_from_keep(keep)  # removed weights stay removed (they count toward the target)
        if scope.kind in ("row", "n:m") or not any(floor.values()):
            return candidates  # a row or group counts its removed weights toward its own target
        if allocation == "search":  # the candidates are splits of the total: they keep meeting it
            return {label: floored_split(split, floor, sizes, target) for label, split in candidates.items()}
        return {label: {name: max(s, floor[name]) for name, s in split.items()} for label, split in candidates.items()}

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
        """``(out, in)`` bool: True where the weight is still present (no mask: everywhere)."""
        mask = spec.mask_2d()
        if mask is None:
            return torch.ones(spec.fan_out, spec.fan_in, dtype=torch.bool, device=weight_parameter(spec.module).device)
        return mask != 0

    def _apply(self, spec: LayerSpec, removed: torch.Tensor, bias_delta: torch.Tensor | None) -> bool:
        """Zero the removed weights and add their compensation to the bias; True if a bias was added."""
        module = spec.module
        weight = weight_parameter(module)
        added = False
        with torch.no_grad():
            spec.zero_weights(removed)
            if module.bias is None and not self.add_bias:
                bias_delta = None
            if bias_delta is not None and bool(removed.any()):
                shift = torch.where(removed, bias_delta.to(torch.float64), 0.0).sum(dim=1)
                bias = _bias_of(module)
                if bias is None:
                    bias = module.bias = nn.Parameter(  # trainable as the weight is: a frozen model stays frozen
                        torch.zeros(spec.fan_out, dtype=weight.dtype, device=weight.device),
                        requires_grad=weight_parameter(module).requires_grad,
                    )
                    added = True
                    logger.info("layer %r had no bias; added one to receive the compensation", spec.name)
                bias.add_(shift.to(bias.dtype))
        return added

    def _report(
        self,
        method: str,
        scope: str,
        target: float,
        steps: int,
        before: Mapping[str, torch.Tensor | None],
        added_bias: list[str],
    ) -> PruneReport:
        """What the layers hold now: masks counted, bias changes measured against ``before``."""
        report = PruneReport(
            method=method, scope=scope, sensitivity=self.sensitivity, target_sparsity=target, steps=steps
        )
        for name, spec in self.layers.items():
            mask = existing_mask(spec.module)
            pruned = int((mask == 0).sum()) if mask is not None else 0
            after, previous = _bias_of(spec.module), before[name]
            if after is None:
                change = 0.0
            elif previous is None:
                change = float(after.detach().abs().sum())
            else:
                change = float((after.detach() - previous).abs().sum())
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
        emptied = [layer.name for layer in report.layers if layer.weights and layer.pruned == layer.weights]
        if emptied:
            warnings.warn(
                f"layers {emptied} lost every weight (their outputs are now their biases alone, whatever the "
                "input); scope='layer' or 'row' keeps part of every layer, exclude= leaves a layer out",
                UserWarning,
                stacklevel=3,
            )
        logger.info("pruned with %s/%s to sparsity %.4f", method, scope, report.sparsity)
        return report


def _model_state(model: nn.Module) -> tuple:
    """Which tensors the model computes with, and how often each was changed in place: equal states
    mean equal outputs (a new tensor, a renamed one or an in-place change all differ)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return tuple((name, id(tensor), tensor._version) for name, tensor in tensors)


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    """The module's bias tensor, or None (typed: ``nn.Module`` attributes are not)."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _check_switches(**switches: object) -> None:
    """Switches must be bools: a string such as "False" would count as true."""
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise TypeError(f"argument {name!r} must be True or False, got {value!r}")


def _warn_beyond_reconstruction(target: float) -> None:
    """A reconstruction leaves something of every layer to refit: a target beyond that is not reached."""
    if target > MAX_LAYER_SPARSITY:
        warnings.warn(
            f"reconstructive pruning leaves every layer at most {MAX_LAYER_SPARSITY:g} sparse (something to "
            f"refit); sparsity {target:g} is not reached: the report gives what was",
            UserWarning,
            stacklevel=4,  # the caller of Pruner.prune
        )


def _calibration_batches(batches: Iterable[Any] | None, method: str, reconstruct: bool) -> Iterable[Any] | None:
    """``batches`` as :func:`prune` calibrates on them: a one-shot iterator is listed where the layers are
    reconstructed (they run the batches again); None is refused where the method needs data."""
    reconstructive = method in RECONSTRUCTIVE_METHODS or reconstruct
    registered = IMPORTANCES.get(method)
    if batches is None and (reconstructive or (registered is not None and registered.needs_calibration)):
        raise ValueError(f"argument 'batches': method {method!r} needs calibration batches, got None")
    if reconstructive and isinstance(batches, Iterator):
        return list(batches)
    return batches


def _check_reconstruction_request(
    method: str,
    reconstruct: object,
    allocation: object,
    divergence: object,
    scope: object,
    activation_cache: object = None,
) -> None:
    """``method`` is known (the neuron scope checks its own), ``reconstruct`` a bool, ``divergence`` one
    of the search's, ``allocation`` and ``activation_cache`` given only where layers are reconstructed."""
    known = sorted(IMPORTANCES) + sorted(RECONSTRUCTIVE_METHODS)
    if scope != "neuron" and (not isinstance(method, str) or method not in known):
        raise ValueError(f"argument 'method' must be one of {known}, got {method!r}")
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"argument 'divergence' must be one of {DIVERGENCES}, got {divergence!r}")
    if not isinstance(reconstruct, bool):
        raise TypeError(f"argument 'reconstruct' must be True or False, got {reconstruct!r}")
    if allocation is not None and method not in RECONSTRUCTIVE_METHODS and not reconstruct:
        raise ValueError(
            f"argument 'allocation' splits the total across reconstructed layers (method='ecp-obs' or "
            f"'sparsegpt', or reconstruct=True); got allocation={allocation!r} with method={method!r}, which "
            "reconstructs nothing (its scope alone decides the split)"
        )
    check_activation_cache(activation_cache, method in RECONSTRUCTIVE_METHODS or reconstruct is True)


def check_activation_cache(activation_cache: object, reconstructs: bool) -> None:
    """``activation_cache``: None, or a finite number >= 0 (not a bool), given only where layers are reconstructed."""
    if activation_cache is None:
        return
    if (
        isinstance(activation_cache, (bool, np.bool_))
        or not isinstance(activation_cache, numbers.Real)
        or not math.isfinite(float(activation_cache))
        or float(activation_cache) < 0
    ):
        raise ValueError(
            "argument 'activation_cache' must be a finite number >= 0 (in sizes of the largest layer's Gram "
            f"matrix), got {activation_cache!r}"
        )
    if not reconstructs:
        raise ValueError(
            f"argument 'activation_cache' sizes the caches of a reconstruction (method='ecp-obs' or 'sparsegpt', "
            f"or reconstruct=True); got activation_cache={activation_cache!r} with a method that reconstructs nothing"
        )


def _check_neuron_request(sparsity: object, method: str, reconstruct: bool) -> None:
    """``scope="neuron"`` removes whole hidden units: a fraction of them, and no reconstruction."""
    if method in RECONSTRUCTIVE_METHODS or reconstruct:
        name, value = ("reconstruct", reconstruct) if reconstruct else ("method", method)
        raise ValueError(
            f"argument '{name}': scope='neuron' removes whole hidden units and refits nothing, so it does not "
            f"take {name}={value!r}; use a mask method (e.g. method='ecp') with it, or another scope"
        )
    # numbers.Real: Python and NumPy numbers alike, as resolve_sparsity takes them; bool is not a fraction
    if sparsity is not None and (
        isinstance(sparsity, (bool, np.bool_)) or not isinstance(sparsity, numbers.Real) or not 0 <= float(sparsity) < 1
    ):
        raise ValueError(
            f"argument 'sparsity' (with scope='neuron': the fraction of hidden units removed) must be a number in "
            f"[0, 1), got {sparsity!r}"
        )


def _reaching_the_output(weights: dict[str, list[torch.Tensor | None]]) -> dict[str, list[torch.Tensor | None]]:
    """The layers' row sensitivities, without the layers whose sensitivities are 0 on every sample:
    their output never reaches the output the sensitivities measure (an auxiliary head), so every
    sample would weigh 0; such a layer is reconstructed with every sample weighing 1 instead."""
    unreached = [name for name, rows in weights.items() if not any(row is not None and bool(row.any()) for row in rows)]
    if unreached:
        logger.warning(
            "layers %s do not affect the output the sensitivities measure (all 0): their samples weigh 1", unreached
        )
    return {name: rows for name, rows in weights.items() if name not in unreached}


def _bias_copy(module: nn.Module) -> torch.Tensor | None:
    bias = _bias_of(module)
    return None if bias is None else bias.detach().clone()


@dataclass(frozen=True)
class _Request:
    """A validated call of :meth:`Pruner.prune`."""

    method: Method
    scope: Scope
    target: float
    steps: int
    importances: Mapping[str, Importance] | None


@renamed_keyword("criterion", "sensitivity")
def prune(
    model: nn.Module,
    batches: Iterable[Any] | None,
    sparsity: float | None = None,
    method: str = "ecp",
    *,
    scope: str = "global",
    steps: int = 1,
    sensitivity: str | None = None,
    probes: int | None = None,
    layers: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    progress: bool = True,
    reconstruct: bool = False,
    allocation: str | None = None,
    divergence: str = "auto",
    activation_cache: float | None = None,
    exclude: Sequence[str] | str | None = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    add_bias: bool = True,
) -> PruneReport | StructuredReport:
    """Calibrate on ``batches`` and prune ``model`` in place in one call; see :class:`Pruner`.

    ``batches`` may be None for the methods that need no data (``magnitude``, ``random``).
    ``sensitivity`` defaults to ``"output"``, and to ``"local"`` for ``sparsegpt``, which weights
    every sample alike and so needs no backward pass. ``method="ecp-obs"`` is the best one-shot
    configuration: sensitivity-weighted OBS, refit towards the dense network and an allocation search.
    """
    if sensitivity is None:
        sensitivity = "local" if method == "sparsegpt" else "output"
    pruner = Pruner(
        model,
        sensitivity=sensitivity,
        probes=probes,
        layers=layers,
        output_fn=output_fn,
        seed=seed,
        progress=progress,
        exclude=exclude,
        add_bias=add_bias,
    )
    _check_reconstruction_request(method, reconstruct, allocation, divergence, scope, activation_cache)  # first
    registered = IMPORTANCES.get(method)
    if registered is not None and registered.needs_loss and loss_fn is None:
        raise ValueError(f"argument 'loss_fn': method {method!r} needs loss gradients, got loss_fn=None")
    batches = _calibration_batches(batches, method, reconstruct)
    if batches is not None:
        weighting = RECONSTRUCTIVE_METHODS.get(method, REFIT_ONLY).weighting
        pruner.calibrate(batches, loss_fn=loss_fn, row_sensitivities=weighting == "sensitivity")
    return pruner.prune(
        sparsity=sparsity,
        method=method,
        scope=scope,
        steps=steps,
        reconstruct=reconstruct,
        allocation=allocation,
        divergence=divergence,
        activation_cache=activation_cache,
    )
