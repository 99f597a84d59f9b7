"""Iterative pruning during training, bounded by a validation metric.

The procedure of Bonetta et al. (Applied Intelligence 2023), with the pruning step a choice:

1. train for ``interval`` optimizer steps (optionally with :class:`~ecp_fast.training.regularize.RelevanceDecay`);
2. evaluate the validation metric; while it is at or above ``bound``, checkpoint the model
   (``state_dict`` with the masks) and prune a further ``prune_fraction`` of the remaining weights,
   globally over all eligible layers, then restart the regulariser's gamma schedule;
3. when the metric is below the bound, give the network ``recovery_intervals`` more intervals of
   training; if it does not come back, stop and return the last checkpoint that met the bound.

Masks live in ``torch.nn.utils.prune`` (``weight_orig`` / ``weight_mask``): every eligible weight is
reparametrised (identity mask) before training starts, so all checkpoints have the same keys.
A pruning step removes at least one weight, even when ``prune_fraction`` of the remaining ones rounds to
none. A rollback (``backoff``) restores weights, masks and the optimizer's state (momentum, moments,
through the optimizer's own ``load_state_dict``, so wrappers work), but keeps the parameter groups'
current learning rates and other hyperparameters and does not touch the scheduler: optimizer and
scheduler stay consistent and the schedule keeps counting optimizer steps. The per-interval scheduler
steps after the evaluation; a ``ReduceLROnPlateau`` steps on the metric.

Criteria: ``"magnitude"`` (``prune.global_unstructured`` with L1 over the remaining weights),
``"ecp"`` (elimination-compensation pruning: weights ranked by the output error left after the
best shift of their neuron's bias, which is applied), or any callable with the signature of
:data:`PruneFn`.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ecp_fast._deprecation import renamed_attribute, renamed_keyword
from ecp_fast.pruning.batches import eval_mode
from ecp_fast.pruning.layers import tied_weights, unsupported_reason
from ecp_fast.pruning.masks import weight_reparametrization
from ecp_fast.pruning.selection import prune_count
from ecp_fast.pruning.transaction import model_transaction
from ecp_fast.training._checks import (
    check_batches,
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_real,
    checked_loss,
    non_finite_loss,
)
from ecp_fast.training.regularize import RelevanceDecay, WeightRef, check_regularizer, eligible_weights, sparsity

logger = logging.getLogger(__name__)

Batch = Sequence[torch.Tensor]
#: A pruning step: prune ``weights`` of ``model`` to the global ``target_sparsity`` (a fraction
#: of all their entries), keeping what is already pruned pruned.
PruneFn = Callable[[nn.Module, list[WeightRef], float], None]


@dataclass
class HistoryEntry:
    """One evaluation: after ``step`` optimizer steps, at global ``sparsity``, the ``metric``.

    ``event`` is ``"train"`` (end of a training interval), ``"prune"`` (right after a pruning
    step, before any retraining) or ``"rollback"`` (back to the last checkpoint, with its metric).
    """

    step: int
    sparsity: float
    metric: float
    event: str


@dataclass
class IterativeResult:
    """What :func:`iterative_prune` returns.

    ``model`` holds the last checkpoint that met the bound (or, when none did, the final state and
    ``met_bound`` False); ``state_dict`` is that checkpoint, masks included.
    """

    model: nn.Module
    state_dict: dict[str, Any]
    sparsity: float
    metric: float
    step: int
    met_bound: bool
    stop_reason: str
    history: list[HistoryEntry] = field(default_factory=list)
    prune_steps: int = 0
    rollbacks: int = 0
    total_steps: int = 0
    seconds: float = 0.0


def ensure_masks(weights: Iterable[WeightRef]) -> None:
    """Reparametrise every weight with ``prune.identity`` (mask of ones) unless already masked."""
    for ref in weights:
        if not ref.is_masked:
            prune.identity(ref.module, ref.name)


@torch.no_grad()
def zero_pruned(weights: Iterable[WeightRef]) -> None:
    """Set the pruned entries of every ``weight_orig`` to zero (they are masked out anyway)."""
    for ref in weights:
        mask = ref.mask
        if mask is not None:
            ref.parameter.mul_(mask)


def _prune_count(weights: list[WeightRef], target_sparsity: float) -> int:
    total = sum(ref.numel() for ref in weights)
    already = sum(ref.count_zeros() for ref in weights)
    return prune_count(total, already, target_sparsity)


def magnitude_prune(model: nn.Module, weights: list[WeightRef], target_sparsity: float) -> None:
    """Global L1 pruning of the remaining entries of ``weights`` up to ``target_sparsity``."""
    count = _prune_count(weights, target_sparsity)
    if count == 0:
        return
    prune.global_unstructured(
        [(ref.module, ref.name) for ref in weights], pruning_method=prune.L1Unstructured, amount=count
    )


# ---- ECP -----------------------------------------------------------------------------------------


class ECPPruneStep:
    """Prune by elimination-compensation importance with :class:`ecp_fast.pruning.pruner.Pruner`.

    At every pruning step the pruner is calibrated afresh on ``batches`` (the weights changed since
    the last step), ranks the remaining weights globally by the output error left after the best
    shift of their neuron's bias, removes the least important ones up to the target sparsity and
    adds their compensation to the biases. Only ``nn.Linear`` and ``nn.Conv2d`` weights are
    supported (the Pruner's layers).

    :func:`iterative_prune` refuses weights the Pruner cannot prune (an Embedding, a grouped
    convolution, a tied weight) before it trains or masks anything.

    Args:
        batches: calibration batches ``(inputs, targets)`` (a list: it is iterated at every step).
        loss_fn: the training loss, for ``sensitivity="loss"`` (a mean loss is rescaled by the Pruner).
        sensitivity: the Pruner's sensitivity: ``"output"``, ``"loss"`` or ``"local"``.
        probes: Rademacher probes for ``sensitivity="output"`` (None: exact Jacobian rows).
        method: the Pruner's scoring method (``"ecp"``; any of its methods works).
        seed: seeds the Pruner's probes.
    """

    @renamed_keyword("criterion", "sensitivity")
    def __init__(
        self,
        batches: Sequence[Batch],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        sensitivity: str = "loss",
        probes: int | None = None,
        method: str = "ecp",
        seed: int = 0,
    ) -> None:
        from ecp_fast.pruning.calibration import SENSITIVITIES
        from ecp_fast.pruning.importance import get_method

        if isinstance(batches, (list, tuple)) and not batches:
            raise ValueError("ECPPruneStep: argument 'batches' must hold at least one calibration batch")
        check_batches("ECPPruneStep", batches, reiterable=False, items=None)
        check_choice("ECPPruneStep", "sensitivity", sensitivity, SENSITIVITIES)
        check_callable("ECPPruneStep", "loss_fn", loss_fn, allow_none=True)
        if sensitivity == "loss" and loss_fn is None:
            raise ValueError("ECPPruneStep: sensitivity='loss' needs argument 'loss_fn'")
        check_int("ECPPruneStep", "probes", probes, 1, allow_none=True)
        check_int("ECPPruneStep", "seed", seed, -(2**63))
        if not isinstance(method, str):
            raise TypeError(f"ECPPruneStep: argument 'method' must be a string, got {type(method).__name__}")
        if get_method(method).needs_loss and loss_fn is None:
            raise ValueError(f"ECPPruneStep: method {method!r} needs loss gradients: argument 'loss_fn' is required")
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.sensitivity = sensitivity
        self.probes = probes
        self.method = method
        self.seed = seed
        self.last_report: Any = None

    @staticmethod
    def unsupported(model: nn.Module, weights: Sequence[WeightRef]) -> dict[str, str]:
        """``{qualified weight name: why}`` for the ``weights`` of ``model`` the Pruner cannot prune."""
        tied = tied_weights(model, list(dict.fromkeys(ref.module_name for ref in weights if ref.name == "weight")))
        reasons: dict[str, str] = {}
        for ref in weights:
            if ref.name != "weight":
                reasons[ref.qualified_name] = f"only a layer's 'weight' is supported, not {ref.name!r}"
            elif (reason := unsupported_reason(ref.module)) is not None:
                reasons[ref.qualified_name] = reason
            elif ref.module_name in tied:
                reasons[ref.qualified_name] = f"tied to {', '.join(tied[ref.module_name])}"
        return reasons

    def __call__(self, model: nn.Module, weights: list[WeightRef], target_sparsity: float) -> None:
        """Prune ``weights`` to the global ``target_sparsity`` with bias compensation."""
        from ecp_fast.pruning.pruner import Pruner

        unsupported = self.unsupported(model, weights)
        if unsupported:
            raise ValueError(
                "ECPPruneStep: argument 'weights' must hold nn.Linear or nn.Conv2d (groups=1) weights the Pruner "
                f"can prune, got {unsupported}; pass weights=... without them to iterative_prune"
            )
        layers = list(dict.fromkeys(ref.module_name for ref in weights))
        was_training = model.training
        model.eval()
        try:
            pruner = Pruner(
                model, sensitivity=self.sensitivity, probes=self.probes, layers=layers, seed=self.seed, progress=False
            )
            pruner.calibrate(self.batches, loss_fn=self.loss_fn)
            self.last_report = pruner.prune(target_sparsity, method=self.method, scope="global")
        finally:
            model.train(was_training)


# ---- the driver ----------------------------------------------------------------------------------


def _batches_forever(batches: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        produced = 0
        for batch in batches:
            produced += 1
            yield batch
        if produced == 0:
            raise ValueError(
                "iterative_prune: argument 'batches' yielded nothing; pass a re-iterable (a DataLoader "
                "or a list), not a generator"
            )


def _resolve_prune_step(prune_step: str | PruneFn) -> PruneFn:
    if isinstance(prune_step, ECPPruneStep) or callable(prune_step):
        return prune_step
    if prune_step == "magnitude":
        return magnitude_prune
    if prune_step == "ecp":
        raise ValueError(
            "iterative_prune: prune_step 'ecp' needs calibration data: pass ECPPruneStep(batches, loss_fn)"
        )
    raise ValueError(
        f"iterative_prune: argument 'prune_step' must be 'magnitude', an ECPPruneStep or a callable, got {prune_step!r}"
    )


@dataclass
class _Settings:
    """The validated arguments of :func:`iterative_prune` that the loop reads."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    metric_fn: Callable[[nn.Module], float]
    bound: float
    interval: int
    prune_fraction: float
    prune_fn: PruneFn
    regularizer: RelevanceDecay | None
    scheduler: Any
    scheduler_step: str
    recovery_intervals: int
    backoff: float | None
    min_prune_fraction: float
    warmup_intervals: int
    max_steps: int
    max_sparsity: float
    time_limit_s: float | None
    eval_after_prune: bool
    description: str


class _IterativeRun:
    """The state of one :func:`iterative_prune` run and the steps of its loop."""

    def __init__(
        self, model: nn.Module, batches: Iterable[Batch], weights: list[WeightRef], settings: _Settings
    ) -> None:
        self.model, self.weights, self.settings = model, weights, settings
        self.stream = _batches_forever(batches)
        self.start = time.perf_counter()
        self.history: list[HistoryEntry] = []
        self.checkpoint: dict[str, Any] | None = None
        self.optimizer_checkpoint: OptimizerCheckpoint | None = None
        self.fraction = settings.prune_fraction
        self.best = (0.0, -math.inf, 0)  # sparsity, metric, step of the checkpoint
        self.step = self.intervals_done = self.below = self.prune_steps = self.rollbacks = 0
        self.stop_reason = "max_steps"
        self.added: list[nn.Parameter] = []  # parameters a prune step created, given to the optimizer

    def train_interval(self, bar: Any) -> None:
        """``interval`` optimizer steps (fewer at the end of ``max_steps``), with the per-step scheduler."""
        s = self.settings
        self.model.train()
        finite: torch.Tensor | None = None  # on the loss's device, checked once per interval: no sync per step
        for _ in range(min(s.interval, s.max_steps - self.step)):
            inputs, targets = next(self.stream)[:2]
            s.optimizer.zero_grad(set_to_none=True)
            loss = checked_loss("iterative_prune", s.loss_fn(self.model(inputs), targets))
            step_finite = torch.isfinite(loss.detach()).reshape(())
            finite = step_finite if finite is None else finite & step_finite
            loss.backward()
            if s.regularizer is not None:
                s.regularizer.apply()
            s.optimizer.step()
            zero_pruned(self.weights)
            if s.scheduler is not None and s.scheduler_step == "step":
                s.scheduler.step()
            self.step += 1
        if finite is not None and not bool(finite):
            raise non_finite_loss("iterative_prune", f"of an optimizer step up to step {self.step}")
        bar.update(s.interval)
        self.intervals_done += 1

    def step_scheduler(self, metric: float) -> None:
        """The per-interval scheduler, after the evaluation; a ReduceLROnPlateau steps on the ``metric``."""
        s = self.settings
        if s.scheduler is None or s.scheduler_step != "interval":
            return
        if isinstance(s.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            s.scheduler.step(metric)
        else:
            s.scheduler.step()

    def evaluate(self, bar: Any) -> tuple[float, float]:
        """The metric and the sparsity after a training interval, recorded in the history."""
        self.model.eval()
        metric = _metric(self.settings.metric_fn, self.model)
        current = sparsity(self.weights)
        self.history.append(HistoryEntry(self.step, current, metric, "train"))
        bar.set_postfix(sparsity=f"{current:.4f}", metric=f"{metric:.3f}")
        logger.debug("%s: step %d sparsity %.4f metric %.4f", self.settings.description, self.step, current, metric)
        return metric, current

    def _out_of_time(self) -> bool:
        limit = self.settings.time_limit_s
        if limit is not None and time.perf_counter() - self.start > limit:
            self.stop_reason = "time_limit"
            return True
        return False

    def _roll_back(self) -> float:
        """Back to the checkpoint with a smaller prune fraction; returns the sparsity there.

        Weights, masks and the optimizer's state (momentum, moments) go back; the parameter groups'
        learning rates and other hyperparameters stay as the scheduler set them, and the scheduler
        is not rolled back, so the two agree and the schedule keeps counting optimizer steps.
        """
        s = self.settings
        assert self.checkpoint is not None
        load_checkpoint(self.model, self.checkpoint)
        if self.optimizer_checkpoint is not None:
            hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in s.optimizer.param_groups]
            load_optimizer_state(s.optimizer, self.optimizer_checkpoint)
            for group, values in zip(s.optimizer.param_groups, hyperparameters, strict=True):
                group.update(values)
        self.fraction *= s.backoff  # type: ignore[operator]
        self.rollbacks += 1
        self.below = 0
        current = sparsity(self.weights)
        self.history.append(HistoryEntry(self.step, current, self.best[1], "rollback"))
        logger.info(
            "%s: step %d, rolled back to sparsity %.4f; prune fraction now %.4f",
            s.description,
            self.step,
            current,
            self.fraction,
        )
        return current

    def judge(self, metric: float, current: float) -> tuple[str, float]:
        """After an evaluation: ``("stop" | "train" | "prune", sparsity)``; checkpoints and rolls back."""
        s = self.settings
        rolled_back = False
        if metric >= s.bound:
            self.checkpoint = copy.deepcopy(self.model.state_dict())
            if s.backoff is not None:
                self.optimizer_checkpoint = optimizer_checkpoint(s.optimizer)
            self.best = (current, metric, self.step)
            self.below = 0
        else:
            self.below += 1
            if not (self.prune_steps > 0 and self.below > s.recovery_intervals):
                return ("stop" if self._out_of_time() else "train"), current
            if s.backoff is None or self.checkpoint is None or self.fraction * s.backoff < s.min_prune_fraction:
                self.stop_reason = "bound"
                return "stop", current
            # The last pruning step was too large: back to the checkpoint, prune less.
            current, rolled_back = self._roll_back(), True
        if self._out_of_time():
            return "stop", current
        if self.intervals_done <= s.warmup_intervals and not rolled_back:
            return "train", current
        return ("stop" if self.step >= s.max_steps else "prune"), current

    def _target(self, current: float) -> float | None:
        """The sparsity the next pruning step goes to from ``current``: ``fraction`` of the remaining weights
        or, when that rounds to none, one weight; at most ``max_sparsity``. None when no weight fits below it."""
        target = min(1.0 - (1.0 - current) * (1.0 - self.fraction), self.settings.max_sparsity)
        if _prune_count(self.weights, target) > 0:
            return target
        total = sum(ref.numel() for ref in self.weights)
        one_more = (sum(ref.count_zeros() for ref in self.weights) + 1) / total
        if one_more <= self.settings.max_sparsity and _prune_count(self.weights, one_more) > 0:
            return one_more
        return None

    def prune(self, metric: float, current: float) -> bool:
        """One pruning step from sparsity ``current``; False when nothing is left below ``max_sparsity``."""
        s = self.settings
        target = self._target(current)
        if target is None:
            self.stop_reason = "max_sparsity"  # not one more weight can be pruned below max_sparsity
            return False
        before = {id(parameter) for parameter in self.model.parameters()}
        s.prune_fn(self.model, self.weights, target)
        zero_pruned(self.weights)
        self.added += _train_new_parameters(self.model, s.optimizer, before)
        logger.info(
            "%s: step %d, metric %.4f at sparsity %.4f; pruned to %.4f",
            s.description,
            self.step,
            metric,
            current,
            sparsity(self.weights),
        )
        self.prune_steps += 1
        if s.regularizer is not None:
            s.regularizer.restart()
        if s.eval_after_prune:
            self.model.eval()
            metric_after = _metric(s.metric_fn, self.model)
            self.history.append(HistoryEntry(self.step, sparsity(self.weights), metric_after, "prune"))
        return True

    def loop(self, bar: Any) -> None:
        """Train, evaluate, checkpoint and prune until a stopping rule fires."""
        while self.step < self.settings.max_steps:
            self.train_interval(bar)
            metric, current = self.evaluate(bar)
            self.step_scheduler(metric)
            action, current = self.judge(metric, current)
            if action == "stop":
                break
            if action == "prune" and not self.prune(metric, current):
                break

    def result(self) -> IterativeResult:
        """Load the last checkpoint that met the bound (if any) and describe the run."""
        s = self.settings
        if self.checkpoint is not None:
            load_checkpoint(self.model, self.checkpoint)
            _drop_orphan_parameters(self.model, s.optimizer, self.added)
            state = self.checkpoint
            final_sparsity, final_metric, final_step = self.best
        else:
            logger.warning(
                "%s: the metric never reached the bound %.4f; returning the final model", s.description, s.bound
            )
            refresh_pruned_weights(self.model)
            state = copy.deepcopy(self.model.state_dict())
            final_sparsity = sparsity(self.weights)
            final_metric = self.history[-1].metric if self.history else math.nan
            final_step = self.step
        logger.info(
            "%s: stopped (%s) after %d steps, %d pruning steps; returned sparsity %.4f, metric %.4f (step %d)",
            s.description,
            self.stop_reason,
            self.step,
            self.prune_steps,
            final_sparsity,
            final_metric,
            final_step,
        )
        return IterativeResult(
            model=self.model,
            state_dict=state,
            sparsity=final_sparsity,
            metric=final_metric,
            step=final_step,
            met_bound=self.checkpoint is not None,
            stop_reason=self.stop_reason,
            history=self.history,
            prune_steps=self.prune_steps,
            rollbacks=self.rollbacks,
            total_steps=self.step,
            seconds=time.perf_counter() - self.start,
        )


# ---- checks and the entry point --------------------------------------------------------------------


def _check_numbers(arguments: dict[str, Any]) -> None:
    """The numeric and flag arguments of :func:`iterative_prune`."""
    owner = "iterative_prune"
    check_real(owner, "bound", arguments["bound"])
    check_int(owner, "interval", arguments["interval"], 1)
    check_real(owner, "prune_fraction", arguments["prune_fraction"], 0.0, 1.0)
    check_choice(owner, "scheduler_step", arguments["scheduler_step"], ("interval", "step"))
    check_real(owner, "backoff", arguments["backoff"], 0.0, 1.0, allow_none=True)
    check_real(owner, "min_prune_fraction", arguments["min_prune_fraction"], 0.0, 1.0)
    check_int(owner, "recovery_intervals", arguments["recovery_intervals"], 0)
    check_int(owner, "warmup_intervals", arguments["warmup_intervals"], 0)
    check_int(owner, "max_steps", arguments["max_steps"], 1)
    check_real(owner, "max_sparsity", arguments["max_sparsity"], 0.0, 1.0, open_high=False)
    check_real(owner, "time_limit_s", arguments["time_limit_s"], 0.0, allow_none=True)
    check_bool(owner, "eval_after_prune", arguments["eval_after_prune"])
    check_bool(owner, "progress", arguments["progress"])
    if not isinstance(arguments["description"], str):
        description = type(arguments["description"]).__name__
        raise TypeError(f"{owner}: argument 'description' must be a string, got {description}")


def _check_objects(model: Any, arguments: dict[str, Any]) -> None:
    """The callables, the optimizer, the scheduler and the regulariser of :func:`iterative_prune`."""
    owner = "iterative_prune"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: argument 'model' must be an nn.Module, got {type(model).__name__}")
    check_callable(owner, "loss_fn", arguments["loss_fn"])
    check_callable(owner, "metric_fn", arguments["metric_fn"])
    _check_optimizer(arguments["optimizer"])
    _check_scheduler(arguments["scheduler"], arguments["scheduler_step"])
    regularizer = arguments["regularizer"]
    if regularizer is not None:
        if not isinstance(regularizer, RelevanceDecay):
            raise TypeError(
                f"{owner}: argument 'regularizer' must be a RelevanceDecay or None, got {type(regularizer).__name__}"
            )
        check_regularizer(regularizer, model, owner)


def _check_optimizer(optimizer: Any) -> None:
    """``optimizer`` is an optimizer: parameter groups, a state dict (see :func:`_check_optimizer_holds`)."""
    owner = "iterative_prune"
    methods = ("zero_grad", "step", "state_dict", "load_state_dict")
    groups = getattr(optimizer, "param_groups", None)
    if (
        not all(callable(getattr(optimizer, name, None)) for name in methods)
        or not isinstance(groups, list)
        or not all(isinstance(group, dict) and "params" in group for group in groups)
    ):
        raise TypeError(
            f"{owner}: argument 'optimizer' must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )


def _check_optimizer_holds(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``optimizer`` trains some of ``model``'s parameters (one built for another model would train nothing)."""
    owner = "iterative_prune"
    held = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    if not any(id(parameter) in held for parameter in model.parameters()):
        raise ValueError(
            f"{owner}: argument 'optimizer' must hold the model's parameters (build it from model.parameters()), "
            f"got a {type(optimizer).__name__} over {len(held)} parameters, none of them the model's"
        )


def _check_scheduler(scheduler: Any, scheduler_step: Any) -> None:
    """``scheduler`` has ``step``; a ReduceLROnPlateau steps once per interval, on the metric."""
    owner = "iterative_prune"
    if scheduler is None:
        return
    if not callable(getattr(scheduler, "step", None)):
        raise TypeError(
            f"{owner}: argument 'scheduler' must be a learning-rate scheduler or None, got {type(scheduler).__name__}"
        )
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return
    if scheduler_step != "interval":
        raise ValueError(
            f"{owner}: argument 'scheduler_step' must be 'interval' for a ReduceLROnPlateau scheduler (it steps on "
            f"the metric, evaluated once per interval), got {scheduler_step!r}"
        )
    if scheduler.mode != "max":
        warnings.warn(
            f"{owner}: argument 'scheduler' is a ReduceLROnPlateau with mode={scheduler.mode!r}, but metric_fn is "
            "higher-is-better; build it with mode='max'",
            UserWarning,
            stacklevel=6,  # the caller of iterative_prune (through its keyword-renaming wrapper)
        )


def _check_weights(model: nn.Module, weights: list[WeightRef], max_sparsity: float) -> None:
    """The weights exist in ``model``, can be masked, and are sparser than nothing above ``max_sparsity``."""
    if not weights:
        raise ValueError(
            "iterative_prune: argument 'weights' must name at least one weight; the model has no "
            "eligible weights to prune"
        )
    modules = {id(module) for module in model.modules()}
    seen: set[tuple[int, str]] = set()
    for ref in weights:
        if not isinstance(ref, WeightRef):
            raise TypeError(
                f"iterative_prune: argument 'weights' must hold WeightRef objects, got {type(ref).__name__}"
            )
        if id(ref.module) not in modules:
            raise ValueError(
                f"iterative_prune: argument 'weights': {ref.qualified_name!r} is not a weight of this model"
            )
        if (id(ref.module), ref.name) in seen:
            raise ValueError(
                f"iterative_prune: argument 'weights' must name each weight once, got {ref.qualified_name!r} twice"
            )
        seen.add((id(ref.module), ref.name))
        kind = weight_reparametrization(ref.module, ref.name)
        if kind is not None:
            raise ValueError(
                f"iterative_prune: layer {ref.module_name!r} has a parametrized weight (weight_norm/parametrize; found "
                f"{kind}); remove the parametrization or exclude the layer"
            )
    current = sparsity(weights)
    if current >= max_sparsity:
        raise ValueError(
            f"iterative_prune: argument 'max_sparsity' ({max_sparsity:.4g}) must be above the sparsity the weights "
            f"already have ({current:.4g}); nothing would be pruned"
        )


def refresh_pruned_weights(model: nn.Module) -> None:
    """Recompute every masked weight (``weight = weight_orig * weight_mask``), as the pruning hook does
    before the next forward pass, so that ``module.weight`` shows the loaded values right away."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                hook(module, ())


def load_checkpoint(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Load a state dict taken earlier in the run: a bias a compensating prune step has added since
    (a layer that had none) is removed first, so the model is as it was when ``state`` was taken;
    the masked weights are recomputed from the loaded ``weight_orig`` and ``weight_mask``."""
    for prefix, module in model.named_modules():
        key = f"{prefix}.bias" if prefix else "bias"
        if isinstance(getattr(module, "bias", None), nn.Parameter) and key not in state:
            module.bias = None
    model.load_state_dict(state)
    refresh_pruned_weights(model)


@dataclass
class OptimizerCheckpoint:
    """An optimizer's ``state_dict()`` (any layout: a wrapper's too) and the size of each parameter group."""

    sizes: list[int]
    state: dict[str, Any]


def optimizer_checkpoint(optimizer: torch.optim.Optimizer) -> OptimizerCheckpoint:
    """A deep copy of ``optimizer``'s state, for :func:`load_optimizer_state`."""
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    return OptimizerCheckpoint(sizes, copy.deepcopy(optimizer.state_dict()))


def load_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint: OptimizerCheckpoint) -> None:
    """Load an optimizer state taken earlier in the run, first dropping from each group the parameters
    added to it since (the biases a compensating prune step added, see :func:`_train_new_parameters`).

    The optimizer's own ``load_state_dict`` reads the state, so a wrapper (``RelevanceDecayOptimizer``)
    restores what it saved; a copy is loaded, since torch keeps the loaded tensors and updates them in
    place, and the checkpoint may be loaded again."""
    state = getattr(optimizer, "state", {})
    for group, size in zip(optimizer.param_groups, checkpoint.sizes, strict=True):
        for parameter in group["params"][size:]:
            state.pop(parameter, None)
        del group["params"][size:]
    optimizer.load_state_dict(copy.deepcopy(checkpoint.state))


def _train_new_parameters(model: nn.Module, optimizer: torch.optim.Optimizer, before: set[int]) -> list[nn.Parameter]:
    """Give the optimizer the parameters a prune step created (a compensating step adds a bias to a
    layer that had none), so they are trained too. They join the last parameter group: a new group
    would not be known to a learning-rate scheduler (OneCycleLR, ReduceLROnPlateau keep per-group
    state), and the group's own hyperparameters apply to them."""
    new = [p for p in model.parameters() if id(p) not in before and p.requires_grad]
    if new:
        optimizer.param_groups[-1]["params"].extend(new)
        logger.info("iterative pruning: %d parameters the prune step added now train with the optimizer", len(new))
    return new


def _drop_orphan_parameters(model: nn.Module, optimizer: torch.optim.Optimizer, added: list[nn.Parameter]) -> None:
    """Drop from the optimizer, with their state, the parameters of ``added`` (see
    :func:`_train_new_parameters`) the model no longer holds: the checkpoint loaded predates them."""
    held = {id(parameter) for parameter in model.parameters()}
    gone = {id(p) for p in added if id(p) not in held}
    for group in optimizer.param_groups:
        for parameter in [p for p in group["params"] if id(p) in gone]:
            optimizer.state.pop(parameter, None)
        group["params"][:] = [p for p in group["params"] if id(p) not in gone]


def _register_rollbacks(transaction: Any, settings: _Settings) -> None:
    """Undo actions for what the run changes outside the model: optimizer, scheduler, regulariser, prune step."""
    transaction.on_rollback(partial(load_optimizer_state, settings.optimizer, optimizer_checkpoint(settings.optimizer)))
    scheduler = settings.scheduler
    if scheduler is not None and callable(getattr(scheduler, "state_dict", None)):
        transaction.on_rollback(partial(scheduler.load_state_dict, copy.deepcopy(scheduler.state_dict())))
    if settings.regularizer is not None:
        transaction.on_rollback(partial(settings.regularizer.load_state_dict, settings.regularizer.state_dict()))
    if isinstance(settings.prune_fn, ECPPruneStep):
        transaction.on_rollback(partial(setattr, settings.prune_fn, "last_report", settings.prune_fn.last_report))


@renamed_keyword("criterion", "prune_step")
def iterative_prune(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    metric_fn: Callable[[nn.Module], float],
    bound: float,
    *,
    interval: int,
    prune_fraction: float = 0.2,
    prune_step: str | PruneFn = "magnitude",
    regularizer: RelevanceDecay | None = None,
    scheduler: Any = None,
    scheduler_step: str = "interval",
    weights: list[WeightRef] | None = None,
    recovery_intervals: int = 2,
    backoff: float | None = None,
    min_prune_fraction: float = 0.01,
    warmup_intervals: int = 1,
    max_steps: int = 100_000,
    max_sparsity: float = 0.999,
    time_limit_s: float | None = None,
    eval_after_prune: bool = True,
    progress: bool = True,
    description: str = "iterative pruning",
) -> IterativeResult:
    """Train ``model`` and prune it step by step while ``metric_fn`` stays at or above ``bound``.

    Args:
        model: the network; its eligible weights (or ``weights``) get ``torch.nn.utils.prune`` masks.
        batches: training batches ``(inputs, targets)``, iterated again when exhausted (a list or a DataLoader).
        loss_fn, metric_fn, bound: ``loss_fn(outputs, targets)``; ``metric_fn(model)``, higher is better, >= ``bound``.
        optimizer: over the model's parameters (one holding none is refused), made before or after this call (masks
            keep the parameter objects); a wrapper such as ``RelevanceDecayOptimizer`` works (its own state dict).
        interval, prune_fraction: optimizer steps between evaluations; fraction of the remaining weights cut per step.
        prune_step: the pruning callback: ``"magnitude"``, an :class:`ECPPruneStep`, or a :data:`PruneFn`.
        regularizer: relevance decay applied at every step and restarted after every pruning step.
        scheduler, scheduler_step: a learning-rate scheduler, stepped once per interval after the evaluation
            (``"interval"``; a ``ReduceLROnPlateau``, ``mode="max"``, steps on the metric) or after every step.
        weights: the weights to prune, each once; default :func:`~ecp_fast.training.regularize.eligible_weights`.
        recovery_intervals, warmup_intervals: intervals allowed below the bound; dense ones before the first prune.
        backoff, min_prune_fraction: None (the source's procedure) stops when a pruning step fails for good; a factor
            in ``(0, 1)`` rolls model and optimizer back to the last checkpoint and prunes again with
            ``prune_fraction`` times the factor, until the fraction falls below ``min_prune_fraction``. Weights, masks
            and optimizer state (momentum) go back; learning rates and scheduler do not (the schedule runs on).
        max_steps, time_limit_s: hard cap on optimizer steps; stop (returning the last good checkpoint) after seconds.
        max_sparsity: no pruning step beyond this global sparsity; must be above the weights' current sparsity.
        eval_after_prune: also evaluate right after each pruning step (for the history only).
        progress, description: show a tqdm bar with this label.

    Returns:
        :class:`IterativeResult`; ``model`` at the last checkpoint that met the bound, else (not met_bound) at its end.

    Raises:
        TypeError / ValueError: a bad argument (weights an ECPPruneStep cannot prune too), before any mask is installed.
        When the run fails (``KeyboardInterrupt`` too), model, optimizer, scheduler and regulariser are restored to
        their state before the call and it re-raises.
    """
    settings, weights = _prepare(model, dict(locals()))
    return _run(model, batches, weights, settings, progress)


def _prepare(model: nn.Module, arguments: dict[str, Any]) -> tuple[_Settings, list[WeightRef]]:
    """Check the arguments of :func:`iterative_prune` before any mask is installed; the loop's settings and weights."""
    _check_objects(model, arguments)
    _check_numbers(arguments)
    prune_fn = _resolve_prune_step(arguments["prune_step"])
    _check_optimizer_holds(model, arguments["optimizer"])
    check_batches("iterative_prune", arguments["batches"], reiterable=True, items=(2, None))
    weights = eligible_weights(model) if arguments["weights"] is None else list(arguments["weights"])
    _check_weights(model, weights, arguments["max_sparsity"])
    if isinstance(prune_fn, ECPPruneStep) and (unsupported := prune_fn.unsupported(model, weights)):
        raise ValueError(
            "iterative_prune: argument 'weights' must hold weights the ECPPruneStep of argument 'prune_step' can "
            f"prune (nn.Linear, nn.Conv2d with groups=1), got {unsupported}; pass weights=... without them"
        )
    values: dict[str, Any] = {entry.name: arguments.get(entry.name) for entry in fields(_Settings)}
    values.update(
        prune_fn=prune_fn,
        bound=float(arguments["bound"]),
        prune_fraction=float(arguments["prune_fraction"]),
        max_sparsity=float(arguments["max_sparsity"]),
    )
    return _Settings(**values), weights


def _metric(metric_fn: Callable[[nn.Module], Any], model: nn.Module) -> float:
    """``metric_fn(model)`` as a float; ``TypeError`` naming ``metric_fn`` when it returns no real number."""
    value = metric_fn(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"iterative_prune: argument 'metric_fn' must return a real number, got {value!r}")
    return float(value)


def _run(
    model: nn.Module, batches: Iterable[Batch], weights: list[WeightRef], settings: _Settings, progress: bool
) -> IterativeResult:
    """The loop of :func:`iterative_prune` in a transaction that restores what it changed when it fails."""
    from tqdm.auto import tqdm

    with model_transaction(model) as transaction:
        _register_rollbacks(transaction, settings)
        ensure_masks(weights)
        run = _IterativeRun(model, batches, weights, settings)
        bar = tqdm(total=settings.max_steps, desc=settings.description, disable=not progress, leave=False)
        with eval_mode(model):  # every submodule's train/eval mode as it came, after the run
            try:
                run.loop(bar)
            finally:
                bar.close()
            return run.result()


__getattr__ = renamed_attribute(__name__, {"ECPCriterion": ("ECPPruneStep", ECPPruneStep)})
