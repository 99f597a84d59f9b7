"""Relevance-gated weight decay: shrink the weights the loss does not care about.

From "Regularization-based Pruning of Irrelevant Weights in Deep Neural Architectures" (Bonetta,
Ribero, Cancelliere, Applied Intelligence 2023). The regulariser is

    R = gamma * sum_w exp(-|dL/dw| / alpha) * w^2

with the loss gradient ``dL/dw`` of the current step held constant. Its gradient,
``2 * gamma * exp(-|dL/dw| / alpha) * w``, is simply added to ``.grad`` after ``loss.backward()``
and before the optimizer step, so no second backward pass is needed. A weight with a large loss
gradient (relevant) gets almost its plain update; one with a small gradient (irrelevant) decays
like under plain L2 weight decay of strength ``gamma``, and a later magnitude (or ECP) pruning step
removes it at little cost.

Masked parameters (``torch.nn.utils.prune``, which keeps ``weight_orig`` and ``weight_mask``) are
handled: the term is added to the parameter the optimizer updates (``weight_orig``), with the
gradient of the effective weight ``weight = weight_orig * weight_mask`` and multiplied by the mask,
so pruned entries get no decay and, with :meth:`RelevanceDecay.zero_pruned`, stay exactly zero.

Usage::

    decay = RelevanceDecay(model, gamma=1e-5, alpha=1.0, decay_steps=1000)
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        decay.apply()          # adds the regulariser's gradient, advances the gamma schedule
        optimizer.step()
    ...
    decay.restart()            # after a pruning step: gamma back to its initial value
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ecp_fast._arguments import check_module
from ecp_fast.training._checks import check_int, check_real

logger = logging.getLogger(__name__)

#: Module types whose ``weight`` the regulariser (and the iterative pruner) treats by default.
ELIGIBLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
)


@dataclass(frozen=True)
class WeightRef:
    """A prunable weight: the module that owns it and the tensor's name (``weight``, ``in_proj_weight``)."""

    module_name: str
    module: nn.Module
    name: str

    @property
    def qualified_name(self) -> str:
        """``module_name.name``, as in ``model.named_parameters()`` before pruning."""
        return f"{self.module_name}.{self.name}" if self.module_name else self.name

    @property
    def is_masked(self) -> bool:
        """Whether ``torch.nn.utils.prune`` reparametrised this weight (``<name>_orig`` / ``<name>_mask``)."""
        return hasattr(self.module, f"{self.name}_orig") and hasattr(self.module, f"{self.name}_mask")

    @property
    def parameter(self) -> nn.Parameter:
        """The parameter the optimizer updates: ``<name>_orig`` when masked, ``<name>`` otherwise."""
        return getattr(self.module, f"{self.name}_orig") if self.is_masked else getattr(self.module, self.name)

    @property
    def mask(self) -> torch.Tensor | None:
        """The pruning mask, or None when the weight is not reparametrised."""
        return getattr(self.module, f"{self.name}_mask") if self.is_masked else None

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (``<name>_orig * <name>_mask`` when masked)."""
        parameter = self.parameter
        mask = self.mask
        return parameter if mask is None else parameter * mask

    def numel(self) -> int:
        """Number of entries of the weight."""
        return self.parameter.numel()

    def count_zeros(self) -> int:
        """Number of pruned entries (mask zeros), or exact zeros when the weight is not masked."""
        mask = self.mask
        if mask is not None:
            return int((mask == 0).sum())
        return int((self.parameter == 0).sum())


def eligible_weights(
    model: nn.Module,
    module_types: tuple[type[nn.Module], ...] = ELIGIBLE_MODULES,
    exclude: Iterable[str] = (),
) -> list[WeightRef]:
    """The weights relevance decay and iterative pruning apply to, in module order.

    ``weight`` of every Linear, Conv1d/2d/3d and Embedding (``module_types``) and, for every
    ``nn.MultiheadAttention``, its ``in_proj_weight`` (or ``q/k/v_proj_weight`` when key and value
    sizes differ); its ``out_proj`` is an ``nn.Linear`` and is found as such. Biases are left out.
    Modules whose name is in ``exclude`` are skipped.
    """
    check_module(model)
    excluded = {exclude} if isinstance(exclude, str) else set(exclude)  # a lone name, not its characters
    refs: list[WeightRef] = []
    for module_name, module in model.named_modules():
        if module_name in excluded:
            continue
        if isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                ref = WeightRef(module_name, module, name)
                if _has_tensor(module, name):
                    refs.append(ref)
        elif isinstance(module, module_types) and _has_tensor(module, "weight"):
            refs.append(WeightRef(module_name, module, "weight"))
    return refs


def _has_tensor(module: nn.Module, name: str) -> bool:
    return getattr(module, f"{name}_orig", None) is not None or isinstance(getattr(module, name, None), torch.Tensor)


def sparsity(weights: Iterable[WeightRef]) -> float:
    """Fraction of pruned entries over all ``weights`` together (0 for an empty list)."""
    weights = list(weights)
    total = sum(ref.numel() for ref in weights)
    return sum(ref.count_zeros() for ref in weights) / total if total else 0.0


class GammaSchedule:
    """``gamma`` decaying linearly from ``gamma0`` to ``gamma_final`` over ``decay_steps`` steps.

    ``decay_steps=None`` (or 0) keeps ``gamma0`` constant. :meth:`restart` puts the schedule back at
    step 0, which the iterative pruner does after every pruning step.
    """

    def __init__(self, gamma0: float, decay_steps: int | None = None, gamma_final: float = 0.0) -> None:
        check_real("GammaSchedule", "gamma0", gamma0, 0.0, open_low=False)
        check_real("GammaSchedule", "gamma_final", gamma_final, 0.0, open_low=False)
        check_int("GammaSchedule", "decay_steps", decay_steps, 0, allow_none=True)
        self.gamma0 = float(gamma0)
        self.gamma_final = float(gamma_final)
        self.decay_steps = decay_steps or None
        self.step_count = 0

    @property
    def gamma(self) -> float:
        """The value of gamma at the current step."""
        if self.decay_steps is None:
            return self.gamma0
        progress = min(self.step_count / self.decay_steps, 1.0)
        return self.gamma0 + (self.gamma_final - self.gamma0) * progress

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.step_count += 1

    def restart(self) -> None:
        """Back to step 0 (gamma = gamma0)."""
        self.step_count = 0

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state, for checkpoints."""
        return {
            "gamma0": self.gamma0,
            "gamma_final": self.gamma_final,
            "decay_steps": self.decay_steps,
            "step_count": self.step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        _check_state("GammaSchedule", state, ("gamma0", "gamma_final", "decay_steps", "step_count"))
        # checked as the constructor checks them, before anything changes
        restored = GammaSchedule(state["gamma0"], state["decay_steps"], state["gamma_final"])
        check_int("GammaSchedule.load_state_dict", "state['step_count']", state["step_count"], 0)
        self.gamma0, self.gamma_final = restored.gamma0, restored.gamma_final
        self.decay_steps, self.step_count = restored.decay_steps, int(state["step_count"])


def _check_state(owner: str, state: object, keys: tuple[str, ...]) -> None:
    """``ValueError`` naming ``state`` unless it is a mapping with ``keys`` (what ``state_dict`` returns)."""
    missing = [key for key in keys if key not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise ValueError(
            f"{owner}.load_state_dict: argument 'state' must be what state_dict() returns (keys {list(keys)}), "
            f"got {type(state).__name__}{' without ' + ', '.join(missing) if isinstance(state, dict) else ''}"
        )


def relevance_gate(grad: torch.Tensor, alpha: float) -> torch.Tensor:
    """``exp(-|grad| / alpha)``: 1 for weights the loss ignores, towards 0 for relevant ones."""
    return torch.exp(-grad.abs() / alpha)


def relevance_penalty(weight: torch.Tensor, grad: torch.Tensor, gamma: float, alpha: float = 1.0) -> torch.Tensor:
    """The explicit regulariser ``gamma * sum exp(-|grad| / alpha) * weight^2`` (``grad`` detached).

    For logging, or to train with a second backward pass; :class:`RelevanceDecay` adds its
    gradient directly instead.
    """
    return gamma * (relevance_gate(grad.detach(), alpha) * weight.square()).sum()


class RelevanceDecay:
    """Adds the gradient of the relevance-gated L2 penalty to the weights' ``.grad``.

    Args:
        model_or_weights: a model (its :func:`eligible_weights` are used) or a list of
            :class:`WeightRef`.
        gamma: initial strength (the paper's default is ``1e-5``; up to ``1e-3`` for small conv nets).
        alpha: gate temperature: weights with ``|dL/dw|`` well below ``alpha`` get the full decay.
        decay_steps: optimizer steps over which gamma decays linearly to ``gamma_final``; None keeps
            it constant. :meth:`restart` starts the decay over.
        gamma_final: the value gamma decays to.

    Call :meth:`apply` after ``loss.backward()`` and before ``optimizer.step()``; or wrap the
    optimizer with :class:`RelevanceDecayOptimizer`.
    """

    def __init__(
        self,
        model_or_weights: nn.Module | Iterable[WeightRef],
        gamma: float = 1e-5,
        alpha: float = 1.0,
        decay_steps: int | None = None,
        gamma_final: float = 0.0,
    ) -> None:
        # checked under this class's own argument names (GammaSchedule calls gamma 'gamma0')
        check_real("RelevanceDecay", "gamma", gamma, 0.0, open_low=False)
        check_real("RelevanceDecay", "alpha", alpha, 0.0)
        check_int("RelevanceDecay", "decay_steps", decay_steps, 0, allow_none=True)
        check_real("RelevanceDecay", "gamma_final", gamma_final, 0.0, open_low=False)
        schedule = GammaSchedule(gamma, decay_steps, gamma_final)
        if isinstance(model_or_weights, nn.Module):
            weights = eligible_weights(model_or_weights)
        elif isinstance(model_or_weights, Iterable) and not isinstance(model_or_weights, (str, torch.Tensor)):
            weights = list(model_or_weights)
        else:
            raise TypeError(
                "RelevanceDecay: argument 'model_or_weights' must be an nn.Module or a list of WeightRef, got "
                f"{type(model_or_weights).__name__}"
            )
        if not weights:
            raise ValueError("RelevanceDecay: no eligible weights (Linear, Conv, Embedding, attention projections)")
        wrong = [type(ref).__name__ for ref in weights if not isinstance(ref, WeightRef)]
        if wrong:
            raise TypeError(f"RelevanceDecay: argument 'model_or_weights' must hold WeightRef objects, got {wrong[0]}")
        self.weights = weights
        self.alpha = float(alpha)
        self.schedule = schedule

    @property
    def gamma(self) -> float:
        """The current strength."""
        return self.schedule.gamma

    def restart(self) -> None:
        """Restart the gamma schedule (after a pruning step)."""
        self.schedule.restart()

    @torch.no_grad()
    def apply(self, advance: bool = True) -> None:
        """Add ``2 gamma exp(-|g| / alpha) w`` to every weight's gradient, then advance the schedule.

        ``g`` is the gradient of the effective weight. For masked weights the optimizer's parameter
        is ``weight_orig``, whose gradient autograd already multiplied by the mask, so on unpruned
        entries it equals ``g``; the added term is multiplied by the mask too, so pruned entries are
        left alone. Weights without a gradient (unused this step) or with a sparse one
        (``nn.Embedding(sparse=True)``) are skipped.
        """
        gamma = self.schedule.gamma
        if gamma > 0:
            for ref in self.weights:
                parameter = ref.parameter
                if parameter.grad is None or parameter.grad.is_sparse:
                    continue  # unused this step; or a sparse embedding gradient, which the gate cannot read
                mask = ref.mask
                term = relevance_gate(parameter.grad, self.alpha).mul_(parameter).mul_(2.0 * gamma)
                if mask is not None:
                    term.mul_(mask)
                parameter.grad.add_(term)
        if advance:
            self.schedule.step()

    @torch.no_grad()
    def zero_pruned(self) -> None:
        """Set the pruned entries of ``weight_orig`` to zero (they are masked out either way).

        Keeps a reparametrised model's stored values equal to its effective ones, so that
        optimizer side effects (momentum, decoupled weight decay) cannot grow pruned entries and
        ``prune.remove`` gives the same tensor.
        """
        for ref in self.weights:
            mask = ref.mask
            if mask is not None:
                ref.parameter.mul_(mask)

    def penalty(self) -> torch.Tensor:
        """The current value of ``R`` from the gradients now in ``.grad`` (0 where none)."""
        total = torch.zeros(())
        for ref in self.weights:
            parameter = ref.parameter
            if parameter.grad is None:
                continue
            total = total + relevance_penalty(ref.weight.detach(), parameter.grad, self.schedule.gamma, self.alpha)
        return total

    def state_dict(self) -> dict[str, Any]:
        """Schedule state and alpha, for checkpoints."""
        return {"alpha": self.alpha, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        _check_state("RelevanceDecay", state, ("alpha", "schedule"))
        check_real("RelevanceDecay.load_state_dict", "state['alpha']", state["alpha"], 0.0)
        self.schedule.load_state_dict(state["schedule"])  # checks everything before it changes anything
        self.alpha = float(state["alpha"])


class RelevanceDecayOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer so that ``step()`` first applies :class:`RelevanceDecay`, then steps.

    Pruned entries of masked weights are reset to zero after every step. Everything else
    (``zero_grad``, ``param_groups``, ``state_dict``, learning-rate schedulers) is the wrapped
    optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decay: RelevanceDecay) -> None:
        # Not calling Optimizer.__init__: the wrapped optimizer owns param_groups and state.
        if not isinstance(getattr(optimizer, "param_groups", None), list) or not callable(
            getattr(optimizer, "step", None)
        ):
            raise TypeError(
                "RelevanceDecayOptimizer: argument 'optimizer' must be a torch.optim.Optimizer, "
                f"got {type(optimizer).__name__}"
            )
        if not isinstance(decay, RelevanceDecay):
            raise TypeError(
                f"RelevanceDecayOptimizer: argument 'decay' must be a RelevanceDecay, got {type(decay).__name__}"
            )
        self.optimizer = optimizer
        self.decay = decay

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's parameter groups."""
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's state."""
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's defaults."""
        return self.optimizer.defaults

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply the regulariser, step the wrapped optimizer, keep pruned entries at zero.

        A ``closure`` goes to the wrapped optimizer (LBFGS evaluates it several times); the regulariser
        is added to the gradients after each evaluation, and its schedule advances once per step.
        """
        if closure is None:
            self.decay.apply()
            loss = self.optimizer.step()
        else:

            def regularised() -> float:
                value = closure()
                self.decay.apply(advance=False)
                return value

            loss = self.optimizer.step(regularised)
            self.decay.schedule.step()
        self.decay.zero_pruned()
        return loss

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        """Registered on the wrapped optimizer (its ``step`` runs it, with itself as the optimizer)."""
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:
        """Registered on the wrapped optimizer (its ``step`` runs it, with itself as the optimizer)."""
        return self.optimizer.register_step_post_hook(hook)

    def __getstate__(self) -> dict[str, Any]:
        """What a copy or ``torch.save`` keeps: the wrapped optimizer and the regulariser (torch's
        ``Optimizer`` state methods expect attributes this wrapper does not have)."""
        return {"optimizer": self.optimizer, "decay": self.decay}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.optimizer, self.decay = state["optimizer"], state["decay"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (the wrapped optimizer's ``zero_grad``)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state and the regulariser's schedule."""
        return {"optimizer": self.optimizer.state_dict(), "decay": self.decay.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        _check_state("RelevanceDecayOptimizer", state_dict, ("optimizer", "decay"))
        self.decay.load_state_dict(state_dict["decay"])  # checked before the optimizer changes
        self.optimizer.load_state_dict(state_dict["optimizer"])

    def __repr__(self) -> str:
        return f"RelevanceDecayOptimizer({self.optimizer!r}, gamma={self.decay.gamma}, alpha={self.decay.alpha})"


def check_regularizer(regularizer: RelevanceDecay, model: nn.Module, owner: str = "iterative_prune") -> None:
    """Raise unless ``regularizer``'s settings are valid and its weights belong to ``model``.

    Catches a regulariser built for another model (it would decay nothing the run trains) and
    settings changed after construction (``alpha``, the gamma schedule).
    """
    check_real(owner, "regularizer.alpha", regularizer.alpha, 0.0)
    schedule = regularizer.schedule
    check_real(owner, "regularizer.schedule.gamma0", schedule.gamma0, 0.0, open_low=False)
    check_real(owner, "regularizer.schedule.gamma_final", schedule.gamma_final, 0.0, open_low=False)
    check_int(owner, "regularizer.schedule.decay_steps", schedule.decay_steps, 1, allow_none=True)
    modules = {id(module) for module in model.modules()}
    foreign = [ref.qualified_name for ref in regularizer.weights if id(ref.module) not in modules]
    if foreign:
        raise ValueError(
            f"{owner}: argument 'regularizer' decays weights that are not in the model ({foreign[:3]}); "
            "build it from the model being pruned"
        )


def iter_parameters(weights: Iterable[WeightRef]) -> Iterator[nn.Parameter]:
    """The parameters the optimizer updates for ``weights`` (``weight_orig`` where masked)."""
    for ref in weights:
        yield ref.parameter
