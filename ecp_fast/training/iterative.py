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
Criteria: ``"magnitude"`` (``prune.global_unstructured`` with L1 over the remaining weights),
``"ecp"`` (elimination-compensation pruning: weights ranked by the output error left after the
best shift of their neuron's bias, which is applied), or any callable with the signature of
:data:`PruneFn`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import prune

from ecp_fast._deprecation import renamed_attribute, renamed_keyword
from ecp_fast.training.regularize import RelevanceDecay, WeightRef, eligible_weights, sparsity

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
    return max(0, min(int(round(target_sparsity * total)), total) - already)


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
        if not batches:
            raise ValueError("ECPPruneStep: argument 'batches' must hold at least one calibration batch")
        if sensitivity == "loss" and loss_fn is None:
            raise ValueError("ECPPruneStep: sensitivity='loss' needs argument 'loss_fn'")
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.sensitivity = sensitivity
        self.probes = probes
        self.method = method
        self.seed = seed
        self.last_report: Any = None

    def __call__(self, model: nn.Module, weights: list[WeightRef], target_sparsity: float) -> None:
        """Prune ``weights`` to the global ``target_sparsity`` with bias compensation."""
        from ecp_fast.pruning.pruner import Pruner

        unsupported = [ref.qualified_name for ref in weights
                       if ref.name != "weight" or not isinstance(ref.module, (nn.Linear, nn.Conv2d))]
        if unsupported:
            raise ValueError(
                f"ECPPruneStep: the Pruner handles nn.Linear and nn.Conv2d weights only, got {unsupported}; "
                "pass weights=... without them to iterative_prune"
            )
        layers = list(dict.fromkeys(ref.module_name for ref in weights))
        was_training = model.training
        model.eval()
        try:
            pruner = Pruner(model, sensitivity=self.sensitivity, probes=self.probes, layers=layers,
                            seed=self.seed, progress=False)
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


def _resolve_prune_step(prune_step: Union[str, PruneFn]) -> PruneFn:
    if callable(prune_step):
        return prune_step
    if prune_step == "magnitude":
        return magnitude_prune
    if prune_step == "ecp":
        raise ValueError("iterative_prune: prune_step 'ecp' needs calibration data: pass ECPPruneStep(batches, loss_fn)")
    raise ValueError(
        f"iterative_prune: argument 'prune_step' must be 'magnitude', an ECPPruneStep or a callable, got {prune_step!r}"
    )


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
    prune_step: Union[str, PruneFn] = "magnitude",
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
        batches: training batches ``(inputs, targets)``, iterated again when exhausted.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar.
        optimizer: optimizer over the model's parameters (create it before or after this call:
            masking keeps the same parameter objects, renamed ``weight_orig``).
        metric_fn: validation metric of the model, higher is better (e.g. accuracy in percent).
        bound: the lowest acceptable metric.
        interval: optimizer steps between evaluations (and pruning steps).
        prune_fraction: fraction of the remaining weights removed per pruning step.
        prune_step: the pruning callback: ``"magnitude"``, an :class:`ECPPruneStep`, or a :data:`PruneFn`.
        regularizer: relevance decay applied at every step and restarted after every pruning step.
        scheduler: a learning-rate scheduler, stepped once per interval (after the evaluation) or,
            with ``scheduler_step="step"``, after every optimizer step.
        scheduler_step: ``"interval"`` or ``"step"``.
        weights: the weights to prune; default :func:`~ecp_fast.training.regularize.eligible_weights`.
        recovery_intervals: intervals of training allowed below the bound before stopping.
        backoff: None (the source's procedure) stops when a pruning step fails for good. A factor in
            ``(0, 1)`` instead rolls model and optimizer back to the last checkpoint, multiplies
            ``prune_fraction`` by it and prunes again, until the fraction falls below
            ``min_prune_fraction``.
        min_prune_fraction: the smallest fraction tried with ``backoff``.
        warmup_intervals: dense training intervals before the first pruning step.
        max_steps: hard cap on optimizer steps.
        max_sparsity: no pruning step beyond this global sparsity.
        time_limit_s: stop (returning the last good checkpoint) after this many seconds.
        eval_after_prune: also evaluate right after each pruning step (for the history only).
        progress: show a tqdm bar.
        description: label of the progress bar.

    Returns:
        :class:`IterativeResult` whose ``model`` is ``model`` restored to the last checkpoint that
        met the bound; if none did, the final state with ``met_bound=False``.
    """
    from tqdm.auto import tqdm

    if interval < 1:
        raise ValueError(f"iterative_prune: argument 'interval' must be >= 1, got {interval}")
    if not 0 < prune_fraction < 1:
        raise ValueError(f"iterative_prune: argument 'prune_fraction' must be in (0, 1), got {prune_fraction}")
    if scheduler_step not in ("interval", "step"):
        raise ValueError(f"iterative_prune: argument 'scheduler_step' must be 'interval' or 'step', got {scheduler_step!r}")
    if backoff is not None and not 0 < backoff < 1:
        raise ValueError(f"iterative_prune: argument 'backoff' must be None or in (0, 1), got {backoff}")
    if recovery_intervals < 0 or warmup_intervals < 0:
        raise ValueError("iterative_prune: 'recovery_intervals' and 'warmup_intervals' must be >= 0")
    prune_fn = _resolve_prune_step(prune_step)
    weights = eligible_weights(model) if weights is None else list(weights)
    if not weights:
        raise ValueError("iterative_prune: the model has no eligible weights to prune")
    ensure_masks(weights)

    start = time.perf_counter()
    history: list[HistoryEntry] = []
    checkpoint: dict[str, Any] | None = None
    optimizer_checkpoint: dict[str, Any] | None = None
    fraction = prune_fraction
    rollbacks = 0
    best = (0.0, -math.inf, 0)  # sparsity, metric, step of the checkpoint
    step = 0
    intervals_done = 0
    below = 0
    prune_steps = 0
    stop_reason = "max_steps"
    stream = _batches_forever(batches)
    bar = tqdm(total=max_steps, desc=description, disable=not progress, leave=False)
    try:
        while step < max_steps:
            model.train()
            for _ in range(min(interval, max_steps - step)):
                inputs, targets = next(stream)[:2]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                if regularizer is not None:
                    regularizer.apply()
                optimizer.step()
                zero_pruned(weights)
                if scheduler is not None and scheduler_step == "step":
                    scheduler.step()
                step += 1
            bar.update(interval)
            intervals_done += 1
            if scheduler is not None and scheduler_step == "interval":
                scheduler.step()
            model.eval()
            metric = float(metric_fn(model))
            current = sparsity(weights)
            history.append(HistoryEntry(step, current, metric, "train"))
            bar.set_postfix(sparsity=f"{current:.4f}", metric=f"{metric:.3f}")
            logger.debug("%s: step %d sparsity %.4f metric %.4f", description, step, current, metric)

            rolled_back = False
            if metric >= bound:
                checkpoint = copy.deepcopy(model.state_dict())
                if backoff is not None:
                    optimizer_checkpoint = copy.deepcopy(optimizer.state_dict())
                best = (current, metric, step)
                below = 0
            else:
                below += 1
                if prune_steps > 0 and below > recovery_intervals:
                    if backoff is None or checkpoint is None or fraction * backoff < min_prune_fraction:
                        stop_reason = "bound"
                        break
                    # The last pruning step was too large: back to the checkpoint, prune less.
                    model.load_state_dict(checkpoint)
                    if optimizer_checkpoint is not None:
                        optimizer.load_state_dict(optimizer_checkpoint)
                    fraction *= backoff
                    rollbacks += 1
                    below = 0
                    rolled_back = True
                    current = sparsity(weights)
                    history.append(HistoryEntry(step, current, best[1], "rollback"))
                    logger.info("%s: step %d, rolled back to sparsity %.4f; prune fraction now %.4f",
                                description, step, current, fraction)
                else:
                    if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                        stop_reason = "time_limit"
                        break
                    continue
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                stop_reason = "time_limit"
                break
            if intervals_done <= warmup_intervals and not rolled_back:
                continue
            if step >= max_steps:
                break
            target = min(1.0 - (1.0 - current) * (1.0 - fraction), max_sparsity)
            if _prune_count(weights, target) == 0:
                stop_reason = "max_sparsity"  # nothing left to prune below max_sparsity
                break
            prune_fn(model, weights, target)
            zero_pruned(weights)
            logger.info("%s: step %d, metric %.4f at sparsity %.4f; pruned to %.4f",
                        description, step, metric, current, sparsity(weights))
            prune_steps += 1
            if regularizer is not None:
                regularizer.restart()
            if eval_after_prune:
                model.eval()
                history.append(HistoryEntry(step, sparsity(weights), float(metric_fn(model)), "prune"))
    finally:
        bar.close()

    met_bound = checkpoint is not None
    if checkpoint is not None:
        model.load_state_dict(checkpoint)
        state = checkpoint
        final_sparsity, final_metric, final_step = best
    else:
        logger.warning("%s: the metric never reached the bound %.4f; returning the final model", description, bound)
        state = copy.deepcopy(model.state_dict())
        final_sparsity = sparsity(weights)
        final_metric = history[-1].metric if history else math.nan
        final_step = step
    seconds = time.perf_counter() - start
    logger.info(
        "%s: stopped (%s) after %d steps, %d pruning steps; returned sparsity %.4f, metric %.4f (step %d)",
        description, stop_reason, step, prune_steps, final_sparsity, final_metric, final_step,
    )
    return IterativeResult(
        model=model,
        state_dict=state,
        sparsity=final_sparsity,
        metric=final_metric,
        step=final_step,
        met_bound=met_bound,
        stop_reason=stop_reason,
        history=history,
        prune_steps=prune_steps,
        rollbacks=rollbacks,
        total_steps=step,
        seconds=seconds,
    )


__getattr__ = renamed_attribute(__name__, {"ECPCriterion": ("ECPPruneStep", ECPPruneStep)})
