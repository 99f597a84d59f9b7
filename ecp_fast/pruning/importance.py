"""Importance methods: one function per method, one call signature.

Every method takes a :class:`ScoringContext` (the layer, its effective ``(out, in)`` weight and
the calibration statistics) and returns an :class:`Importance`: a score per weight (the smallest
scores are removed) and, for the methods that compensate, the bias shift each removal asks for.
New methods register with :func:`register_importance` and are then available by name to the
pruner and the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ecp_fast.ops import finalize, reference
from ecp_fast.pruning.calibration import CalibrationResult, LayerSpec, LayerStatistics
from ecp_fast.pruning.masks import copy_model

logger = logging.getLogger(__name__)

#: ``nonlinear`` replays the network once per weight and Newton step: refuse larger problems.
NONLINEAR_MAX_WEIGHTS = 20_000
#: ... and at most this many calibration samples (see ``calibration.MAX_STORED_SAMPLES``).
NONLINEAR_MAX_SAMPLES = 1024
#: ... and at most this many (weights of one layer) x (samples) replays in one vectorised call.
NONLINEAR_MAX_WORK = 2_500_000


class Importance(NamedTuple):
    """``score`` ``(out, in)``: larger means keep; ``bias_delta`` ``(out, in)`` or None (no compensation)."""

    score: torch.Tensor
    bias_delta: torch.Tensor | None


@dataclass
class ScoringContext:
    """What a method may use to score one layer."""

    layer: LayerSpec
    weight: torch.Tensor  # effective weight (mask applied), (out, in), detached
    statistics: LayerStatistics | None
    calibration: CalibrationResult | None
    model: nn.Module
    generator: torch.Generator


ImportanceFn = Callable[[ScoringContext], Importance]


@dataclass(frozen=True)
class Method:
    """A registered importance: the function and what it needs."""

    name: str
    function: ImportanceFn
    compensates: bool
    needs_calibration: bool
    needs_loss: bool = False
    description: str = ""


IMPORTANCES: dict[str, Method] = {}
#: Names :func:`register_importance` does not take: the library's methods (filled as they register)
#: and the reconstructive ones (``ecp_fast.pruning.reconstruction.RECONSTRUCTIVE_METHODS``).
PROTECTED_NAMES: set[str] = {"sparsegpt", "ecp-obs"}


def register_importance(
    name: str, *, compensates: bool, needs_calibration: bool, needs_loss: bool = False, description: str = ""
) -> Callable[[ImportanceFn], ImportanceFn]:
    """Decorator that makes ``function(context) -> Importance`` available as ``method=name``.

    ``name`` must be a new string (a method of the library or a reconstructive one is not replaced;
    a name registered before by the caller is); the flags are bools and ``function`` a callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_importance: argument 'name' must be a non-empty string, got {name!r}")
    if name in PROTECTED_NAMES:
        raise ValueError(f"register_importance: argument 'name' must not be a method of the library, got {name!r}")
    flags = {"compensates": compensates, "needs_calibration": needs_calibration, "needs_loss": needs_loss}
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"register_importance: argument {flag!r} must be a bool, got {type(value).__name__}")

    def decorate(function: ImportanceFn) -> ImportanceFn:
        if not callable(function):
            raise TypeError(
                f"register_importance: the decorated object must be a function of a ScoringContext, "
                f"got {type(function).__name__}"
            )
        IMPORTANCES[name] = Method(name, function, compensates, needs_calibration, needs_loss, description)
        return function

    return decorate


def get_method(method: str) -> Method:
    """The registered method ``method``; ``ValueError`` naming the known ones otherwise."""
    if method not in IMPORTANCES:
        raise ValueError(f"argument 'method' must be one of {sorted(IMPORTANCES)}, got {method!r}")
    return IMPORTANCES[method]


def _statistics(context: ScoringContext, method: str) -> LayerStatistics:
    if context.statistics is None:
        raise RuntimeError(
            f"method {method!r} needs calibration statistics for layer {context.layer.name!r}; "
            "call Pruner.calibrate(batches) first"
        )
    return context.statistics


def _loss_gradient(context: ScoringContext, method: str) -> torch.Tensor:
    stats = _statistics(context, method)
    if stats.loss_grad_sum is None:
        raise RuntimeError(
            f"method {method!r} needs loss gradients: calibrate with loss_fn=... and (inputs, targets) batches"
        )
    return stats.loss_grad_sum


@register_importance("ecp", compensates=True, needs_calibration=True, description="w^2 M2, bias += w mu")
def ecp_importance(context: ScoringContext) -> Importance:
    """Elimination-compensation: ``I = w^2 M2``, ``bias_delta = w mu`` (docs/method.md)."""
    s0, mean, m2 = _statistics(context, "ecp").moments
    importance, bias_delta = finalize(s0, mean, m2, context.weight.to(mean.dtype))
    return Importance(importance, bias_delta)


@register_importance("obd", compensates=False, needs_calibration=True, description="w^2 sum c a^2")
def obd_importance(context: ScoringContext) -> Importance:
    """Uncompensated error (``compensate=False``): ``I = w^2 sum_s c a^2 = w^2 (M2 + S0 mu^2)``."""
    s0, mean, m2 = _statistics(context, "obd").moments
    # Adding the two non-negative parts loses no precision, unlike the raw-sum difference.
    raw_second_moment = m2 + s0.unsqueeze(1) * mean.square()
    weight = context.weight.to(mean.dtype)
    return Importance(weight.square() * raw_second_moment, None)


@register_importance("magnitude", compensates=False, needs_calibration=False, description="|w|")
def magnitude_importance(context: ScoringContext) -> Importance:
    """``|w|``."""
    return Importance(context.weight.abs(), None)


@register_importance(
    "gradient", compensates=False, needs_calibration=True, needs_loss=True, description="|dL/dw| (full set)"
)
def gradient_importance(context: ScoringContext) -> Importance:
    """``|dL/dw|`` of the loss summed over the whole calibration set."""
    return Importance(_loss_gradient(context, "gradient").abs(), None)


@register_importance("taylor", compensates=False, needs_calibration=True, needs_loss=True, description="|w dL/dw|")
def taylor_importance(context: ScoringContext) -> Importance:
    """First-order Taylor ``|w dL/dw|`` with the full-set gradient."""
    gradient = _loss_gradient(context, "taylor")
    return Importance((context.weight.to(gradient.dtype) * gradient).abs(), None)


@register_importance("wanda", compensates=False, needs_calibration=True, description="|w| ||a_j||")
def wanda_importance(context: ScoringContext) -> Importance:
    """Wanda: ``|w_ij| * ||a_j||_2`` over the calibration samples."""
    column_norm = _statistics(context, "wanda").activation_sq_sum.sqrt()
    return Importance(context.weight.abs() * column_norm.to(context.weight.dtype).unsqueeze(0), None)


@register_importance("random", compensates=False, needs_calibration=False, description="uniform random")
def random_importance(context: ScoringContext) -> Importance:
    """Uniform random scores (seeded through the pruner)."""
    score = torch.rand(context.weight.shape, generator=context.generator, device=context.generator.device)
    return Importance(score.to(context.weight.device), None)


def check_nonlinear_size(layers: dict[str, LayerSpec], calibration: CalibrationResult | None) -> None:
    """Raise ``ValueError`` unless the exact non-linear baseline fits the documented limits."""
    for spec in layers.values():
        if spec.kind != "linear":
            raise ValueError(
                f"argument 'method': 'nonlinear' supports nn.Linear layers only, layer {spec.name!r} is {spec.kind}"
            )
    total = sum(spec.fan_out * spec.fan_in for spec in layers.values())
    if total > NONLINEAR_MAX_WEIGHTS:
        raise ValueError(
            f"argument 'method': 'nonlinear' replays the network once per weight and supports at most "
            f"{NONLINEAR_MAX_WEIGHTS} weights in the scored layers, got {total}; use method='ecp'"
        )
    if calibration is None:
        return
    if not calibration.inputs_complete or calibration.inputs is None:
        raise ValueError(
            f"argument 'method': 'nonlinear' needs at most {NONLINEAR_MAX_SAMPLES} calibration samples given as "
            f"tensors, got {calibration.samples} samples; calibrate on fewer samples"
        )
    samples = int(calibration.inputs.shape[0])
    if samples > NONLINEAR_MAX_SAMPLES:
        raise ValueError(
            f"argument 'method': 'nonlinear' supports at most {NONLINEAR_MAX_SAMPLES} calibration samples, "
            f"got {samples}"
        )
    largest = max(spec.fan_out * spec.fan_in for spec in layers.values())
    if largest * samples > NONLINEAR_MAX_WORK:
        raise ValueError(
            f"argument 'method': 'nonlinear' supports at most {NONLINEAR_MAX_WORK} (weights of a layer x samples), "
            f"got {largest} x {samples} = {largest * samples}; calibrate on fewer samples or use method='ecp'"
        )


def _plain_copy(model: nn.Module, layer: LayerSpec) -> nn.Module:
    """A copy of the model without pruning re-parametrisations and with a bias on ``layer``."""
    plain = copy_model(model)
    for module in plain.modules():
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig"):
            torch_prune.remove(module, "weight")
    target = dict(plain.named_modules())[layer.name]
    if target.bias is None:
        weight = target.weight
        zeros = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        target.bias = nn.Parameter(zeros, requires_grad=weight.requires_grad)
    return plain


@register_importance(
    "nonlinear", compensates=True, needs_calibration=True, description="exact error after the best bias shift"
)
def nonlinear_importance(context: ScoringContext) -> Importance:
    """The exact non-linear compensated error (``reference.exact_compensated_error``), small models only."""
    calibration = context.calibration
    if calibration is None or calibration.inputs is None:
        raise RuntimeError("method 'nonlinear' needs the calibration inputs; call Pruner.calibrate(batches) first")
    plain = _plain_copy(context.model, context.layer)
    plain.eval()
    exact = reference.exact_compensated_error(plain, calibration.inputs, context.layer.name)
    dtype = context.weight.dtype
    # Removing an already-zero weight changes nothing; its exact error is 0 like every method's.
    return Importance(exact.error.to(dtype), exact.bias_delta.to(dtype))


def check_importances(importances: Any, layers: Mapping[str, LayerSpec], compensates: bool) -> None:
    """Refuse precomputed importances that would prune wrongly: missing layers, shapes, NaN or Inf.

    ``bias_delta`` is checked when the method compensates (it is added to the biases).
    """
    if not isinstance(importances, Mapping):
        raise TypeError(
            f"argument 'importances' must be a mapping of layer name to Importance, got {type(importances).__name__}"
        )
    missing = sorted(set(layers) - set(importances))
    if missing:
        raise ValueError(f"argument 'importances' lacks layers {missing}")
    for name, spec in layers.items():
        importance = importances[name]
        if not isinstance(importance, Importance):
            raise TypeError(
                f"argument 'importances': layer {name!r} must map to an Importance(score, bias_delta), "
                f"got {type(importance).__name__}"
            )
        expected = (spec.fan_out, spec.fan_in)
        parts = [("score", importance.score)]
        if compensates and importance.bias_delta is not None:
            parts.append(("bias_delta", importance.bias_delta))
        for part, tensor in parts:
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(
                    f"argument 'importances': layer {name!r} must have a {part} of shape {expected}, got {shape}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"argument 'importances': the {part} of layer {name!r} contains NaN or Inf (expected finite values)"
                )


PROTECTED_NAMES.update(IMPORTANCES)  # every method registered above is the library's
